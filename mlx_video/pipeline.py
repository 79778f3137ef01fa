"""The staged text-to-video pipeline: tokenize -> encode -> denoise -> stream-decode into the MP4.

Each stage loads its model, runs, and frees it before the next (unless ``keep_models``), so peak memory
is the largest stage rather than the sum. A memory budget sets MLX's memory/cache limits and, before
anything runs, chooses the attention chunking and the decoder tiling (``plan_memory``). Every stage is
timed and its peak memory measured. Non-finite latents or frames and black/constant videos stop the run
(fail closed): no MP4 is left, and ``<output>.failure.json`` says why.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from . import sampling
from .models import wan_dit
from .utils import (config_from_dict, config_section, free_memory, max_rss_bytes, parse_dtype, read_config,
                    resolve_model_path)
from .video import GenerationFailed, VideoWriter, check_finite, write_failure_report

VAE_STRIDE = (4, 8, 8)  # latent frames/rows/cols -> video (Wan latent space, TAEHV matches it)
LATENT_CHANNELS = 16
GB = 1024**3

Events = Callable[[dict], None]


# --------------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    height: int = 352
    width: int = 624
    frames: int = 49
    seed: int = 0
    fps: float = 16.0
    sampler: dict = field(default_factory=dict)  # overrides of the model's sampler section

    def validate(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise ValueError("the prompt is empty")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {v}")
        if self.frames < 1 or (self.frames - 1) % 4:
            k = max(0, round((self.frames - 1) / 4))
            raise ValueError(f"frames must be of the form 4k+1 (e.g. {4 * k + 1} or {4 * k + 5}), got {self.frames}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, (self.frames - 1) // VAE_STRIDE[0] + 1, self.height // VAE_STRIDE[1], self.width // VAE_STRIDE[2],
                LATENT_CHANNELS)


@dataclass
class StageStats:
    seconds: float = 0.0
    peak_memory_bytes: int = 0  # MLX's peak counter during the stage
    rss_bytes: int = 0  # process max RSS after the stage (never decreases)
    predicted_peak_bytes: int | None = None


@dataclass
class GenerationResult:
    output: Path | None
    seed: int
    latents: mx.array | None
    stages: dict[str, StageStats]
    metadata: dict


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def parse_memory(text: str | float | int | None) -> int | None:
    """'4GB', '512MB', '3.5G', or a number of bytes."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace("IB", "B")
    units = {"TB": 1024**4, "GB": GB, "MB": 1024**2, "KB": 1024, "T": 1024**4, "G": GB, "M": 1024**2, "K": 1024, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    try:
        value = float(s)
        if value > 0:
            return int(value)
    except ValueError:
        pass
    raise ValueError(f"cannot read memory size {text!r}; use e.g. 4GB or 512MB")


def machine_memory_bytes() -> int:
    try:
        return int(mx.device_info()["memory_size"])
    except Exception:  # noqa: BLE001 - older MLX / CPU builds
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit() -> int:
    """75% of physical memory (the OS, the app and the page cache need the rest)."""
    return int(machine_memory_bytes() * 0.75)


@dataclass
class MemoryPlan:
    limit_bytes: int
    attention_budget_bytes: int
    decoder_tile: int | None
    predicted: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def dit_peak_bytes(config: wan_dit.WanDiTConfig, latent_shape, weight_bytes: int, attention_budget: int) -> int:
    """Predicted DiT-stage peak: weights + per-prompt text K/V + the largest phase of one block.

    Phases, in fp32 activations (``r``: one residual-sized buffer, ``i``: one q/k/v-sized buffer): the
    q/k/v projections with RoPE, 2r + 14i; attention, 2r + 8i + the score chunk; the FFN, 2r + 2 hidden
    chunks. The buffer counts were fitted to MLX's peak counter on the CPU (one 10-head block at 900,
    11154 and 32760 tokens, attention budgets 128 MB to 2 GB: within -9%..+4%).
    """
    from .ops import attention_peak_bytes

    b, f, h, w, _ = latent_shape
    pt, ph, pw = config.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    heads = max(config.self_attn_heads)
    r = b * tokens * config.dim * 4
    i = b * tokens * heads * config.head_dim * 4
    text_kv = sum(2 * b * config.text_len * n * config.head_dim * 4 for n in config.cross_attn_heads)
    hidden = max(config.ffn_dim)
    ffn_chunk = min(tokens, max(1, attention_budget // (hidden * 8)))
    scores = attention_peak_bytes(b, heads, tokens, tokens, attention_budget)
    phases = (2 * r + 14 * i, 2 * r + 8 * i + scores, 2 * r + 2 * b * ffn_chunk * hidden * 4)
    return int(weight_bytes + text_kv + max(phases))


def plan_memory(folder: Path, request: GenerationRequest, limit_bytes: int | None, low_memory: bool,
                text_tokens: int = 512, prompts: int = 1, keep_models: bool = False) -> MemoryPlan:
    """Choose attention chunking and decoder tiling for the budget, and predict each stage's peak."""
    limit = limit_bytes or default_memory_limit()
    attention_budget = max(16 * 1024**2, min(limit // (16 if low_memory else 8), 2 * GB))
    predicted: dict[str, int] = {}
    config = read_config(folder)
    shape = request.latent_shape()
    if "text_encoder" in config and config["text_encoder"].get("weights_file"):
        from .models import umt5

        predicted["encode"] = umt5.text_encoder_peak_bytes(config["text_encoder"], tokens=text_tokens, batch=prompts,
                                                           stream=not keep_models)
    if "dit" in config:
        dit_cfg = config_from_dict(wan_dit.WanDiTConfig, config["dit"])
        weight_bytes = _component_bytes(folder, config["dit"])
        predicted["denoise"] = dit_peak_bytes(dit_cfg, shape, weight_bytes, attention_budget)
    decoder_tile = None
    if "decoder" in config:
        from .models import taehv

        dec_cfg = config_from_dict(taehv.TAEHVConfig, config["decoder"])
        itemsize = 4 if mx.default_device() == mx.cpu else 2
        decoder_budget = max(64 * 1024**2, limit // (8 if low_memory else 4))
        decoder_tile = taehv.choose_tile(dec_cfg, shape, decoder_budget, itemsize=itemsize)
        predicted["decode"] = taehv.decoder_peak_bytes(dec_cfg, shape, tile=decoder_tile, itemsize=itemsize)
    return MemoryPlan(limit, attention_budget, decoder_tile, predicted)


def _component_bytes(folder: Path, section: dict) -> int:
    """Resident bytes of a component's weights once loaded at the compute dtype (fp32 on the CPU)."""
    path = folder / section.get("weights_file", "")
    if not path.is_file():
        return 0
    from converters.common import read_safetensors_header

    elements = sum(math.prod(info["shape"]) for info in read_safetensors_header(path).values())
    itemsize = 4 if mx.default_device() == mx.cpu else 2
    return elements * itemsize


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@contextmanager
def _stage(name: str, stats: dict[str, StageStats], events: Events, predicted: int | None = None):
    free_memory()
    mx.reset_peak_memory()
    events({"event": "stage_start", "stage": name})
    start = time.perf_counter()
    yield
    s = StageStats(time.perf_counter() - start, int(mx.get_peak_memory()), max_rss_bytes(), predicted)
    stats[name] = s
    events({"event": "stage_end", "stage": name, "seconds": round(s.seconds, 4),
            "peak_memory_bytes": s.peak_memory_bytes, "predicted_peak_bytes": predicted})


class Models:
    """Loaded components, kept between generations when ``keep_models`` is set (Python API)."""

    def __init__(self, folder: str | os.PathLike, dtype: mx.Dtype | str | None = None):
        self.folder = resolve_model_path(folder)
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.tokenizer = self.text_encoder = self.dit = self.decoder = None

    def release(self, *names: str) -> None:
        for name in names:
            setattr(self, name, None)
        free_memory()


def encode_text(models: Models, prompts: list[str], cache_dir: Path | None, keep: bool) -> mx.array:
    """T5 embeddings ``[len(prompts), 512, dim]`` (zeros after each prompt's length).

    Unless it is kept resident, the encoder is loaded in streaming mode: each block is read from disk when
    it runs and freed after, so a cached prompt reads no weights at all and a new one peaks at one block.
    """
    from .models import umt5

    if models.text_encoder is None:
        models.text_encoder = umt5.load(models.folder, models.dtype, stream=not keep)
    context = umt5.encode_prompts(models.text_encoder, models.tokenizer, prompts, cache_dir=cache_dir)
    mx.eval(context)
    if not keep:
        models.release("text_encoder")
    return context


def denoise(models: Models, request: GenerationRequest, sampler_cfg: sampling.SamplerConfig, context: mx.array,
            attention_budget: int, keep: bool, progress: Callable | None = None) -> mx.array:
    if models.dit is None:
        models.dit = wan_dit.load(models.folder, models.dtype)
    dit = models.dit
    dit.attention_budget = attention_budget
    text = dit.prepare_text(context[:1])
    uncond = dit.prepare_text(context[1:2]) if sampler_cfg.uses_cfg else None
    mx.eval(text, uncond)

    def velocity(x, t, text=text):
        v = dit(x, [float(t)], text=text)
        mx.eval(v)
        check_finite(v, f"denoise (t={t})")
        return v

    noise = sampling.latent_noise(request.latent_shape(), request.seed)
    latents = sampling.sample(sampler_cfg, velocity, noise,
                              uncond_velocity=(lambda x, t, u=uncond: velocity(x, t, u)) if uncond is not None else None,
                              key=request.seed, progress=progress)
    mx.eval(latents)
    check_finite(latents, "denoise (final latents)")
    if not keep:
        models.release("dit")
    return latents


def decode_to_video(models: Models, latents: mx.array, output: Path, fps: float, tile: int | None, keep: bool,
                    extra_outputs: list[Path] = (), progress: Callable | None = None) -> int:
    """Stream-decode latent frames straight into the writers; returns the number of frames written."""
    from .models import taehv

    if models.decoder is None:
        models.decoder = taehv.load(models.folder, models.dtype)
    writers = [VideoWriter(output, fps=fps)] + [VideoWriter(p, fps=fps) for p in extra_outputs]
    written = 0
    try:
        for frames in taehv.decode_stream(models.decoder, latents, tile=tile):
            mx.eval(frames)
            check_finite(frames, "decode")
            frames = frames[0] if frames.ndim == 5 else frames  # [N, H, W, 3]
            for w in writers:
                w.write(frames)
            written += frames.shape[0] if frames.ndim == 4 else 1
            if progress:
                progress(written)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if not keep:
            models.release("decoder")
    return written


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def generate(model: str | os.PathLike, request: GenerationRequest, output: str | os.PathLike | None = "out.mp4", *,
             models: Models | None = None, dtype: str | None = None, memory_limit: int | str | None = None,
             low_memory: bool = False, keep_models: bool = False, prompt_cache: str | os.PathLike | None = None,
             extra_outputs: list[str] = (), events: Events | None = None, progress: bool = False) -> GenerationResult:
    """Generate one video. ``output=None`` returns the latents without decoding.

    ``models`` (from a previous call with ``keep_models=True``) skips loading. ``events`` receives dicts
    (``--json-events``). Raises ``GenerationFailed`` (after writing ``<output>.failure.json``) on NaN or
    black output.
    """
    request.validate()
    folder = models.folder if models else resolve_model_path(model)
    config = read_config(folder)
    sampler_cfg = sampling.sampler_config(config.get("sampler"), **request.sampler)
    events = events or (lambda e: None)
    output = Path(output) if output is not None else None
    if output is not None:
        _check_writable(output)
    limit = parse_memory(memory_limit) or default_memory_limit()
    mx.set_memory_limit(limit)
    mx.set_cache_limit(0 if low_memory else limit // 4)
    models = models or Models(folder, parse_dtype(dtype))
    prompts = [request.prompt] + ([request.negative_prompt] if sampler_cfg.uses_cfg else [])
    from .tokenizer import load_tokenizer

    if models.tokenizer is None:
        models.tokenizer = load_tokenizer(folder)
    text_tokens = max(len(models.tokenizer.encode(p)) for p in prompts)
    plan = plan_memory(folder, request, limit, low_memory, text_tokens, len(prompts), keep_models)
    stats: dict[str, StageStats] = {}
    metadata = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
        "height": request.height, "width": request.width, "frames": request.frames, "fps": request.fps,
        "sampler": asdict(sampler_cfg), "timesteps": sampling.sampler_timesteps(
            sampler_cfg.name, sampler_cfg.steps, sampler_cfg.shift, sampler_cfg.denoising_step_list, sampler_cfg.warp),
        "model": str(model), "model_path": str(folder), "dtype": dtype, "memory_plan": plan.as_dict(),
        "low_memory": low_memory, "mlx_version": mx.__version__, "device": str(mx.default_device()),
    }
    events({"event": "start", **{k: metadata[k] for k in ("prompt", "seed", "height", "width", "frames")}})
    try:
        for name in ("dit",) + (("decoder",) if output is not None else ()):
            config_section(folder, name)
        with _stage("encode", stats, events, plan.predicted.get("encode")):
            context = encode_text(models, prompts, Path(prompt_cache) if prompt_cache else None, keep_models)
        steps = len(metadata["timesteps"])
        bar = _bar(progress, steps, "denoise", "step")

        def on_step(i, n, t):
            bar.update(1)
            events({"event": "step", "step": i + 1, "steps": n, "t": float(t)})

        with _stage("denoise", stats, events, plan.predicted.get("denoise")):
            latents = denoise(models, request, sampler_cfg, context, plan.attention_budget_bytes, keep_models, on_step)
        bar.close()
        del context
        if output is not None:
            fbar = _bar(progress, request.frames, "decode", "frame")

            def on_frames(n):
                fbar.update(n - fbar.n)
                events({"event": "frames", "written": n, "total": request.frames})

            with _stage("decode", stats, events, plan.predicted.get("decode")):
                n = decode_to_video(models, latents, output, request.fps, plan.decoder_tile, keep_models,
                                    [Path(p) for p in extra_outputs], on_frames)
            fbar.close()
            if n != request.frames:
                raise GenerationFailed(f"decoder produced {n} frames, expected {request.frames}", "decode")
    except GenerationFailed as exc:
        metadata.update(stages={k: asdict(v) for k, v in stats.items()})
        if output is not None:
            report = write_failure_report(output, exc.reason, {"stage": exc.stage, **exc.details, "request": metadata})
            events({"event": "error", "reason": exc.reason, "stage": exc.stage, "failure_report": str(report)})
        raise
    metadata["stages"] = {k: asdict(v) for k, v in stats.items()}
    metadata["total_seconds"] = sum(s.seconds for s in stats.values())
    metadata["peak_memory_bytes"] = max((s.peak_memory_bytes for s in stats.values()), default=0)
    if output is not None:
        sidecar = metadata_path(output)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        tmp.replace(sidecar)
    events({"event": "complete", "output": str(output) if output else None, "seconds": metadata["total_seconds"],
            "stages": metadata["stages"]})
    return GenerationResult(output, request.seed, latents, stats, metadata)


def metadata_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def random_seed() -> int:
    return random.SystemRandom().randrange(0, 2**31 - 1)


def _check_writable(output: Path) -> None:
    parent = output.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output folder {parent} is not writable")


class _NoBar:
    n = 0

    def update(self, k=1):
        self.n += k

    def close(self):
        pass


def _bar(enabled: bool, total: int, desc: str, unit: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=True, file=sys.stderr)
