"""Golden model and fixtures for the generated XCTest target.

A golden model has the exported model's structure at tiny widths (``components.golden_config``), random
fp32 weights written exactly as the real export writes weights, and a ``config.json``. The fixtures are
computed by the **Python runtime** (``wan_dit.load``, ``umt5.load``, ``taehv.load``, ``sampling``) from
that folder, so Swift and Python see the same bytes. fp32 keeps the comparison about the code, not
about half-precision rounding; inputs come from seeded numpy generators (deterministic).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import components as C
from .weights import write_safetensors

GOLDEN_SEED = 20260801
TOKENIZER_PROMPTS = (
    "A corgi runs along a sunny beach, waves crashing behind it.",
    "  Time-lapse of clouds   over Tokyo Tower at dusk, 4K, cinematic &amp; moody  ",
    "Un chat noir saute sur une table en bois; café, croissants et lumière douce.",
    "一只熊猫在竹林里吃竹子，阳光透过树叶。",
)


def _folder_section(component: C.Component, config, dtype: str) -> dict:
    return {**dataclasses.asdict(config), "weights_file": component.weights_file, "dtype": dtype}


def golden_weights(component: C.Component, config) -> dict[str, mx.array]:
    """Random fp32 weights for ``config``; the text encoder is quantized like the real one (same bits,
    group size and predicate, through the Python runtime's ``nn.quantize``)."""
    model = C.build_model(component, config, quantized=False)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(C.random_weights(shapes, GOLDEN_SEED + len(component.name)).items()))
    if component is C.TEXT_ENCODER and config.quantization:
        import mlx.nn as nn

        m, q = component.load().module, config.quantization
        nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda path, mod: hasattr(mod, "to_quantized") and m.is_quantized(path, q))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights


def write_golden_model(folder: Path, configs: dict[str, object], sampler_section: dict) -> dict:
    """``configs``: component name -> golden config. Returns the written config.json."""
    folder.mkdir(parents=True)
    config = {"format": "mlx-video/1"}
    for component in C.MODEL_COMPONENTS:
        cfg = configs[component.name]
        write_safetensors(folder / component.weights_file, golden_weights(component, cfg), {"golden": "1"})
        config[component.name] = _folder_section(component, cfg, "float32")
    config["sampler"] = sampler_section
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


class _Stop(Exception):
    pass


def write_fixtures(model_folder: Path, out: Path, tokenizer_file: Path | None) -> list[str]:
    """Run the Python runtime on the golden model; one safetensors file per component. Returns names."""
    from mlx_video import sampling
    from mlx_video.models import taehv, umt5, wan_dit

    out.mkdir(parents=True)
    rng = np.random.default_rng(GOLDEN_SEED)
    config = json.loads((model_folder / "config.json").read_text())
    written = []

    def save(name: str, arrays: dict, metadata: dict | None = None):
        write_safetensors(out / f"{name}.safetensors", {k: mx.array(v) if not isinstance(v, mx.array) else v
                                                        for k, v in arrays.items()}, metadata)
        written.append(name)

    # DiT: one forward pass, fractional timestep, a context shorter than text_len (padding path).
    dit = wan_dit.load(model_folder, dtype=mx.float32)
    dc = dit.config
    latents = rng.standard_normal((1, 2, 4, 6, dc.in_channels)).astype(np.float32)
    context = rng.standard_normal((1, max(1, dc.text_len - 3), dc.text_dim)).astype(np.float32)
    timesteps = np.array([937.5], np.float32)
    velocity = dit(mx.array(latents), [float(timesteps[0])], context=mx.array(context))
    save("dit", {"latents": latents, "context": context, "timesteps": timesteps, "velocity": velocity})

    # Text encoder: a batch of two prompts of different lengths (key masking and zeroed rows).
    enc = umt5.load(model_folder, dtype=mx.float32)
    ec = enc.config
    lengths = [6, 4]
    tokens = [rng.integers(3, ec.vocab_size, n).tolist() for n in lengths]
    embeddings = enc.encode_tokens(tokens, ec.text_len)
    ids = np.full((2, max(lengths)), ec.pad_id, np.int32)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = t
    save("text_encoder", {"ids": ids, "lengths": np.array(lengths, np.int32), "embeddings": embeddings})

    # Decoder: three latent frames -> 9 frames (parallel decode; the Swift test also streams).
    dec = taehv.load(model_folder, dtype=mx.float32)
    z = rng.standard_normal((1, 3, 4, 5, dec.config.latent_channels)).astype(np.float32)
    save("decoder", {"latents": z, "frames": taehv.decode(dec, mx.array(z))})

    # Sampler schedules: the exported few-step list, and the Euler grid at 8 steps.
    scfg = sampling.sampler_config(config.get("sampler"))
    sched = sampling.schedule(scfg)
    euler = sampling.schedule(sampling.sampler_config(name="euler", steps=8, shift=scfg.shift))
    save("sampler", {"timesteps": np.array(sched.timesteps, np.float32), "sigmas": sched.sigmas.astype(np.float32),
                     "euler_timesteps": np.array(euler.timesteps, np.float32),
                     "euler_sigmas": euler.sigmas.astype(np.float32),
                     "euler_shift": np.array(scfg.shift, np.float32)})

    # One full denoise step through sampling.sample: the DiT's velocity, x0, re-noising with injected noise.
    noise = rng.standard_normal((1, 2, 4, 6, dc.in_channels)).astype(np.float32)
    renoise = [rng.standard_normal(noise.shape).astype(np.float32) for _ in range(max(1, len(sched.timesteps) - 1))]
    text = dit.prepare_text(mx.array(context))
    seen: list = []

    def velocity_fn(x, t):
        if seen:
            seen.append(x)
            raise _Stop
        v = dit(x, [t], text=text)
        seen.append(v)
        return v

    try:
        final = sampling.sample(scfg, velocity_fn, mx.array(noise), renoise=[mx.array(r) for r in renoise])
        next_latents = final  # a one-step schedule ends after its only step
    except _Stop:
        next_latents = seen[1]
    save("denoise_step", {"sampler": np.array(0 if scfg.name == "fewstep" else 1, np.int32),  # 1: euler
                          "noise": noise, "context": context, "renoise": renoise[0],
                          "timestep": np.array(sched.timesteps[0], np.float32),
                          "sigma": np.array(sched.sigmas[0], np.float32),
                          "next_sigma": np.array(sched.sigmas[1], np.float32),
                          "velocity": seen[0], "next_latents": next_latents})

    # The staged pipeline end to end (what LightningVideoPipeline runs): UMT5 on fixed ids, the exported
    # sampler from a seed (noise and re-noising drawn by MLX's PRNG, as on the phone), TAEHV decode.
    pipeline_seed = 7
    pipeline_ids = rng.integers(3, ec.vocab_size, 5).tolist() + [ec.eos_id]
    pipeline_context = enc.encode_tokens([pipeline_ids], ec.text_len)
    pipeline_text = dit.prepare_text(pipeline_context)
    pipeline_noise = sampling.latent_noise((1, 2, 4, 6, dc.in_channels), pipeline_seed)
    pipeline_latents = sampling.sample(scfg, lambda x, t: dit(x, [t], text=pipeline_text), pipeline_noise,
                                       key=pipeline_seed)
    save("pipeline", {"ids": np.array(pipeline_ids, np.int32), "seed": np.array(pipeline_seed, np.int32),
                      "context": pipeline_context, "noise": pipeline_noise, "latents": pipeline_latents,
                      "frames": taehv.decode(dec, pipeline_latents)})

    if tokenizer_file is not None:
        from mlx_video.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_file)
        arrays, meta = {}, {}
        for i, prompt in enumerate(TOKENIZER_PROMPTS):
            arrays[f"ids_{i}"] = np.array(tok.encode(prompt), np.int32)
            meta[f"prompt_{i}"] = prompt
        save("tokenizer", arrays, meta)
    return written
