"""Why the teacher ignores the motion words: a probe on a motion-only world.

    MKL_NUM_THREADS=1 python -m mlx_video.recipe.motion_probe --from .recipe-out/teacher3 --out /tmp/probe \
        --steps 800 [--oracle] [--dit-patch 1]

Trains a teacher (``stages.train_teacher``, the recipe's own code) on a world where only the motion varies (a
large red square on black), reusing the autoencoder and text encoder of ``--from``. ``--oracle`` replaces each
caption's text embedding by a fixed random vector per motion word (a perfect conditioning signal, so the text
encoder is out of the question). Then samples every motion at seeds 0..N-1 with the folder's sampler (UniPC +
CFG) and prints how often the scorer reads the prompted motion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from . import score, stages, world

FIXED = dict(shape="square", colour="red", background="black", size="large")
COPIED = ("config.json", "decoder.safetensors", "spiece.model", "text_encoder.safetensors")


def _oracle_table(real):
    def table(out, scenes):
        rows, index = real(out, scenes)
        rng = np.random.default_rng(123)
        vectors = {m: rng.standard_normal(rows.shape[2]).astype(np.float32) * float(rows.std())
                   for m in (*world.MOTIONS, "unsaid")}
        for text, i in index.items():
            if text:
                rows[i] = vectors[world.caption_attributes(text)["motion"]]
        np.save(out / "oracle_vectors.npy", np.stack([vectors[m] for m in world.MOTIONS]))
        np.save(out / "oracle_empty.npy", rows[index[""]])
        return rows, index
    return table


def train(source: Path, out: Path, steps: int, oracle: bool, patch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copy2(source / name, out / name)
    config = json.loads((out / "config.json").read_text())
    for section in ("dit", "sampler", "world"):
        config.pop(section, None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    sample_scene, caption_table = world.sample_scene, stages.caption_table
    world.sample_scene = lambda rng, **kw: sample_scene(rng, **{**FIXED, **kw})
    if oracle:
        stages.caption_table = _oracle_table(caption_table)
    try:
        sizes = dataclasses.replace(stages.SIZES["default"], pool_clips=512, pool_images=16, image_fraction=0.0,
                                    dit_patch=patch)
        stages.train_teacher(out, steps, 0, False, sizes, checkpoint_every=10**6, progress=True)
    finally:
        world.sample_scene, stages.caption_table = sample_scene, caption_table


def probe(out: Path, seeds: int, oracle: bool) -> dict:
    import mlx.core as mx

    from .. import sampling
    from .evaluate import Generator

    gen = Generator(out, {})
    prompts = [world.canonical_caption(world.Scene(FIXED["shape"], FIXED["colour"], FIXED["background"], m,
                                                   FIXED["size"], (0.5, 0.5), (0.5, 0.5))) for m in world.MOTIONS]
    hits = {m: 0 for m in world.MOTIONS}
    for seed in range(seeds):
        if oracle:
            vectors, empty = np.load(out / "oracle_vectors.npy"), np.load(out / "oracle_empty.npy")
            text = gen.dit.prepare_text(mx.array(np.repeat(vectors[:, None], empty.shape[0], axis=1)))
            uncond = gen.dit.prepare_text(mx.array(np.repeat(empty[None], len(prompts), axis=0)))
            shape = (1, (gen.frames - 1) // 4 + 1, gen.height // 8, gen.width // 8, 16)
            noise = mx.concatenate([sampling.latent_noise(shape, seed)] * len(prompts))
            latents = sampling.sample(gen.sampler, lambda x, t: gen.dit(x, [float(t)], text=text), noise,
                                      uncond_velocity=lambda x, t: gen.dit(x, [float(t)], text=uncond), key=seed)
            frames = gen.taehv.decode(gen.decoder, latents)
            videos = [np.array(frames[i]) for i in range(len(prompts))]
        else:
            videos = gen.videos(prompts, seed, batch=len(prompts))
        for motion, video in zip(world.MOTIONS, videos):
            read = score.analyse(video).get("motion")
            hits[motion] += read == motion
            print(f"seed {seed}: {motion:5s} -> {read}")
    return hits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", required=True, help="recipe folder with the autoencoder and text encoder")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--oracle", action="store_true", help="a perfect motion signal in place of the text embeddings")
    p.add_argument("--dit-patch", type=int, choices=(1, 2), default=2)
    p.add_argument("--seeds", type=int, default=6)
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / "dit.safetensors").exists():
        train(Path(args.source), out, args.steps, args.oracle, args.dit_patch)
    hits = probe(out, args.seeds, args.oracle)
    print(json.dumps({"hits": hits, "of": args.seeds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
