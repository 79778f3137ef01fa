"""``mlx-video eval``: how faithfully a model draws world prompts, scored from its frames alone.

Generates every prompt (default: every colour x shape x motion of the shapes world, 105 canonical
captions) for each seed with the model folder's sampler (or the flags), decodes it, and scores colour,
shape and motion (see ``recipe/score.py``). Generation runs the runtime's own pieces (tokenizer, text
encoder, DiT, sampler, decoder) batched over prompts; each video equals what `mlx-video generate
--prompt P --seed S` writes for it. Also reports the autoencoder's round-trip PSNR on held-out clips
(when the folder holds an encoder) and frame-to-frame consistency. --ground-truth scores rendered clips
instead of a model (the scorer's own accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import score, world


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a model's prompt faithfulness on the shapes world",
                              description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (e.g. from `mlx-video recipe`)")
    p.add_argument("--ground-truth", action="store_true", help="score rendered world clips instead of a model")
    p.add_argument("--prompts", default=None, help="file with one canonical world caption per line "
                   "(default: the fixed set of 105, every colour x shape x motion)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt: 0..N-1 (default 2)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model folder's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model folder's)")
    p.add_argument("--shift", type=float, default=None, help="flow-matching shift (default: the model folder's)")
    p.add_argument("--sampler", choices=("unipc", "euler", "fewstep"), default=None, help="sampler (default: the folder's)")
    p.add_argument("--batch", type=int, default=35, help="prompts generated together (default 35)")
    p.add_argument("--output", "-o", default=None, help="write the full results (JSON) here")
    p.add_argument("--strip", default=None, metavar="PNG", help="write a frame strip of the first prompts here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run, _parser=p)


def read_prompts(path: str | None) -> list[str]:
    from ..utils import UsageError

    if path is None:
        return world.eval_prompts()
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise UsageError(f"--prompts {path}: cannot read it ({exc.strerror})") from None
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompts")
    for i, p in enumerate(prompts):
        try:
            world.parse_caption(p)
        except ValueError as exc:
            raise UsageError(f"--prompts {path}, prompt {i + 1}: {exc}") from None
    return prompts


def ground_truth_videos(prompts: list[str], seed: int) -> list[np.ndarray]:
    """Rendered clips for the prompts (positions and travel drawn from ``seed``)."""
    out = []
    for i, p in enumerate(prompts):
        a = world.parse_caption(p)
        rng = np.random.default_rng([seed, i, 99])
        scene = world.sample_scene(rng, shape=a["shape"], colour=a["colour"], background=a["background"],
                                   motion=a["motion"], size=a["size"])
        out.append(world.render_clip(scene))
    return out


class Generator:
    """The runtime models of a folder, loaded once; ``videos(prompts, seed)`` -> frames per prompt."""

    def __init__(self, folder, sampler_overrides: dict):
        import mlx.core as mx

        from .. import sampling
        from ..models import taehv, umt5, wan_dit
        from ..tokenizer import load_tokenizer
        from ..utils import read_config, resolve_model_path

        self.mx, self.sampling, self.taehv, self.umt5 = mx, sampling, taehv, umt5
        self.folder = resolve_model_path(folder)
        config = read_config(self.folder)
        self.config = config
        self.sampler = sampling.sampler_config(config.get("sampler"), **sampler_overrides)
        self.tokenizer = load_tokenizer(self.folder)
        self.encoder = umt5.load(self.folder)
        self.dit = wan_dit.load(self.folder)
        self.decoder = taehv.load(self.folder)
        w = config.get("world", {})
        self.frames = int(w.get("frames", world.FRAMES))
        self.height = int(w.get("height", world.RESOLUTION))
        self.width = int(w.get("width", world.RESOLUTION))

    def videos(self, prompts: list[str], seed: int, batch: int, progress=None) -> list[np.ndarray]:
        mx, sampling = self.mx, self.sampling
        shape = (1, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8, 16)
        out = []
        for s in range(0, len(prompts), batch):
            chunk = prompts[s:s + batch]
            ctx = self.umt5.encode_prompts(self.encoder, self.tokenizer, chunk + [""])
            text = self.dit.prepare_text(ctx[:-1])
            uncond = self.dit.prepare_text(mx.repeat(ctx[-1:], len(chunk), axis=0)) if self.sampler.uses_cfg else None
            noise = mx.concatenate([sampling.latent_noise(shape, seed)] * len(chunk))  # generate's noise per prompt
            latents = sampling.sample(self.sampler, lambda x, t: self.dit(x, [float(t)], text=text), noise,
                                      uncond_velocity=(lambda x, t: self.dit(x, [float(t)], text=uncond))
                                      if uncond is not None else None, key=seed)
            frames = self.taehv.decode(self.decoder, latents)
            mx.eval(frames)
            out += [np.array(frames[i]) for i in range(len(chunk))]
            if progress:
                progress(len(chunk))
        return out

    def autoencoder(self, clips: int = 16) -> dict | None:
        if not self.config["decoder"].get("has_encoder"):
            return None
        from .stages import autoencoder_psnr, heldout_clips

        ae = self.taehv.load(self.folder, encoder=True)
        return autoencoder_psnr(ae, heldout_clips(clips))


def evaluate(prompts: list[str], seeds: int, videos_for, batch: int, progress: bool = True) -> dict:
    """Score ``videos_for(prompts, seed)`` for seeds 0..seeds-1; returns per-video rows and summaries."""
    rows, flicker, spread, first = [], [], [], None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * seeds, desc="eval", unit="video", file=sys.stderr)
    t0 = time.perf_counter()
    for seed in range(seeds):
        vids = videos_for(prompts, seed, bar.update if bar else None)
        if first is None:
            first = vids
        for prompt, frames in zip(prompts, vids):
            expected = world.parse_caption(prompt)
            predicted = score.analyse(frames)
            rows.append({"prompt": prompt, "seed": seed, **{f"predicted_{k}": predicted.get(k) for k in
                                                           ("colour", "shape", "motion", "background")},
                         **score.score(predicted, expected)})
            c = score.consistency(frames)
            flicker.append(c["background_flicker"])
            spread.append(c["area_spread"])
    if bar:
        bar.close()
    seconds = time.perf_counter() - t0
    result = {"accuracy": score.summarise(rows), "chance": score.chance_levels(),
              "consistency": {"background_flicker": float(np.mean(flicker)), "area_spread": float(np.median(spread))},
              "per_attribute_value": _breakdown(rows), "seconds": round(seconds, 2),
              "seconds_per_video": round(seconds / max(1, len(rows)), 4), "rows": rows}
    return result, first


def _breakdown(rows: list[dict]) -> dict:
    """Accuracy of each attribute split by its expected value (which colours/shapes/motions fail)."""
    out = {}
    for attr in score.ATTRIBUTES:
        by = {}
        for r in rows:
            by.setdefault(world.parse_caption(r["prompt"])[attr], []).append(r[attr])
        out[attr] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by.items())}
    return out


def frame_strip(videos: list[np.ndarray], prompts: list[str], path: Path, rows: int = 6, frames: int = 6) -> None:
    """A PNG grid: one row per prompt, ``frames`` evenly spaced frames, the prompt as the row title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, len(videos))
    fig, axes = plt.subplots(rows, frames, figsize=(frames * 1.3, rows * 1.45), dpi=100, squeeze=False)
    for r in range(rows):
        v = videos[r]
        idx = np.linspace(0, v.shape[0] - 1, frames).round().astype(int)
        for c, k in enumerate(idx):
            ax = axes[r][c]
            ax.imshow(np.clip(v[k], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(prompts[r], fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args) -> int:
    from ..utils import UsageError

    if bool(args.model) == bool(args.ground_truth):
        raise UsageError("give --model DIR, or --ground-truth to score rendered clips")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    prompts = read_prompts(args.prompts)
    extra = {}
    if args.ground_truth:
        def videos_for(p, seed, progress):
            vids = ground_truth_videos(p, seed)
            if progress:
                progress(len(vids))
            return vids
        source = "ground truth (rendered world clips)"
    else:
        overrides = {"name": args.sampler, "steps": args.steps, "guidance": args.guidance, "shift": args.shift}
        gen = Generator(args.model, overrides)
        extra["sampler"] = {k: v for k, v in vars(gen.sampler).items()}
        extra["autoencoder"] = gen.autoencoder()
        source = str(args.model)

        def videos_for(p, seed, progress):
            return gen.videos(p, seed, args.batch, progress)
    result, first = evaluate(prompts, args.seeds, videos_for, args.batch, progress=not args.quiet)
    result = {"source": source, "prompts": len(prompts), "seeds": args.seeds, **extra, **result}
    acc = result["accuracy"]
    line = "  ".join(f"{k} {acc[k] * 100:5.1f}%" for k in (*score.ATTRIBUTES, "all"))
    print(f"{source}: {acc['videos']} videos  {line}", file=sys.stderr)
    if extra.get("autoencoder"):
        print(f"autoencoder PSNR {extra['autoencoder']['psnr_db']:.2f} dB on held-out clips", file=sys.stderr)
    if args.output:
        from .. import fsio

        fsio.write_file(args.output, json.dumps(result, indent=1) + "\n", "json")
    if args.strip:
        frame_strip(first, prompts, Path(args.strip))
    print(json.dumps({k: result[k] for k in ("accuracy", "consistency")}))
    return 0
