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
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from . import causal, sampling
from .models import wan_dit
from .utils import (UsageError, config_from_dict, config_section, free_memory, max_rss_bytes, parse_dtype,
                    read_config, resolve_model_path)
from . import fsio
from .video import (GenerationFailed, VideoWriter, check_finite, check_output, failure_report_path,
                    write_failure_report)

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
    prompt_extension: dict | None = None  # generate --extend-prompt: {"model", "original_prompt"} (prompt = extended)
    # block-causal models (LongLive): [(video frame, prompt), ...], the prompts that take over after `prompt`
    prompt_schedule: list = field(default_factory=list)

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
        for entry in self.prompt_schedule:
            if len(entry) != 2 or not isinstance(entry[1], str) or not entry[1].strip():
                raise ValueError(f"prompt schedule entries are (video frame, prompt) with a non-empty prompt, got "
                                 f"{entry!r:.80}")

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


MIN_MEMORY_LIMIT = 64 * 1024**2  # below this not even the tiny demo model's stages fit
MIN_ATTENTION_BUDGET = 16 * 1024**2  # the smallest attention-score budget a re-plan goes down to


def parse_memory(text: str | float | int | None, flag: str = "--memory-limit") -> int | None:
    """'4GB', '512MB', '3.5G', '2GiB' or a number of bytes; finite, at least 64 MB (``UsageError`` otherwise)."""
    if text is None:
        return None
    units = {"TB": 1024**4, "GB": GB, "MB": 1024**2, "KB": 1024, "T": 1024**4, "G": GB, "M": 1024**2, "K": 1024, "B": 1}
    value = None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().upper().replace("IB", "B")
        unit = next((u for u in units if s.endswith(u)), "")
        try:
            value = float(s[: len(s) - len(unit)]) * units.get(unit, 1)
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{flag}: cannot read {text!r} as a memory size; use a positive size such as 4GB or 512MB")
    if value < MIN_MEMORY_LIMIT:
        raise UsageError(f"{flag} {text} is below the {MIN_MEMORY_LIMIT // 2**20} MB minimum; use e.g. 4GB")
    return int(value)


def machine_memory_bytes() -> int:
    try:
        return int(mx.device_info()["memory_size"])
    except Exception:  # noqa: BLE001 - older MLX / CPU builds
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit() -> int:
    """75% of physical memory (the OS, the app and the page cache need the rest)."""
    return int(machine_memory_bytes() * 0.75)


def check_memory_limit(limit: int | None, flag: str = "--memory-limit") -> int:
    """The limit to plan with: the default when ``None``; a limit above the machine's memory is refused."""
    if limit is None:
        return default_memory_limit()
    if limit > machine_memory_bytes():
        raise UsageError(f"{flag} {_gb(limit)} is more than this machine's memory ({_gb(machine_memory_bytes())}); "
                         f"the default is {_gb(default_memory_limit())}")
    return limit


@dataclass
class MemoryPlan:
    limit_bytes: int
    attention_budget_bytes: int
    decoder_tile: int | None
    predicted: dict[str, int]
    stream_text_encoder: bool = True  # read the encoder's blocks from disk as they run (else kept resident)
    notes: list[str] = field(default_factory=list)  # how the plan was changed to fit the limit

    def as_dict(self) -> dict:
        return asdict(self)


class MemoryPlanError(UsageError):
    """The job cannot run within the memory limit, whatever the chunking and tiling (exit 2, before any work)."""


def encode_peak_bytes(config: dict, tokens: int, prompts: int, stream: bool) -> int:
    """Predicted encode-stage peak of a model folder's ``config``: the text encoder's own peak and the stage's
    output, each prompt's embeddings zero-padded to the DiT's text length."""
    from .models import umt5

    section = config["text_encoder"]
    out_len = max(tokens, int(config.get("dit", {}).get("text_len", tokens)))
    return (umt5.text_encoder_peak_bytes(section, tokens=tokens, batch=prompts, stream=stream)
            + prompts * out_len * int(section.get("dim", 0)) * 4)


def dit_peak_bytes(config: wan_dit.WanDiTConfig, latent_shape, weight_bytes: int, attention_budget: int) -> int:
    """Predicted DiT-stage peak: weights + per-prompt text K/V + the largest phase of one block.

    Phases, in fp32 activations (``r``: one residual-sized buffer, ``i``: one q/k/v-sized buffer): the
    q/k/v projections with RoPE, 2r + 14i; attention, 2r + 8i + the score chunk; the FFN, 2r + 2 hidden
    chunks. The buffer counts were fitted to MLX's peak counter on the CPU (one 10-head block at 900,
    11154 and 32760 tokens, attention budgets 128 MB to 2 GB: within -9%..+4%).
    """
    from . import native as native_kernels
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
    # the native kernels rotate q/k without MLX's split/multiply/stack temporaries (fitted the same way:
    # 1,170 to 7,800 tokens, dims 512 and 1536, measured 7.2i..7.5i)
    qkv = 8 * i if native_kernels.enabled() else 14 * i
    phases = (2 * r + qkv, 2 * r + 8 * i + scores, 2 * r + 2 * b * ffn_chunk * hidden * 4)
    return int(weight_bytes + text_kv + max(phases))


DECODER_SECTIONS = {"taehv": "decoder", "wan-vae": "vae"}  # --decoder -> config.json section


def choose_decoder(config: dict, decoder: str | None = None) -> str:
    """The decoder to use: ``decoder`` if given, else TAEHV where the folder has one, else the Wan VAE."""
    if decoder is None:
        return "wan-vae" if "vae" in config and "decoder" not in config else "taehv"
    if decoder not in DECODER_SECTIONS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODER_SECTIONS)}")
    return decoder


def plan_memory(folder: Path, request: GenerationRequest, limit_bytes: int | None, low_memory: bool,
                text_tokens: int = 512, prompts: int = 1, keep_models: bool = False,
                decoder: str | None = None) -> MemoryPlan:
    """Choose attention chunking, decoder tiling and text-encoder streaming so that each stage's predicted peak
    fits the limit, and predict it. Starts from the fastest settings the limit allows and re-plans a stage
    that does not fit (smaller attention chunks, smaller decoder tiles, streamed encoder blocks); raises
    ``MemoryPlanError`` with the figures when a stage cannot fit at all."""
    limit = limit_bytes or default_memory_limit()
    config = read_config(folder)
    shape = request.latent_shape()
    predicted: dict[str, int] = {}
    notes: list[str] = []
    stream = not keep_models
    if "text_encoder" in config and config["text_encoder"].get("weights_file"):
        from .models import umt5

        def encode_peak(streamed):
            return encode_peak_bytes(config, text_tokens, prompts, streamed)

        predicted["encode"] = encode_peak(stream)
        if predicted["encode"] > limit and not stream:
            stream, predicted["encode"] = True, encode_peak(True)
            notes.append("text encoder streamed from disk (its resident weights do not fit)")
    attention_budget = default_attention_budget(limit, low_memory)
    if "dit" in config:
        dit_cfg = config_from_dict(wan_dit.WanDiTConfig, config["dit"])
        weight_bytes = _component_bytes(folder, config["dit"])
        causal_cfg = causal.causal_config(config.get("sampler"))
        if causal_cfg is not None:  # block by block with a KV cache: the cache, not the whole video, sets the peak
            def dit_peak(c, shp, wb, budget):
                return causal.causal_peak_bytes(c, shp, wb, budget, causal_cfg, 4 if mx.default_device() == mx.cpu else 2)
        else:
            dit_peak = dit_peak_bytes
        # beside the DiT's own peak, the sampler's latent-sized buffers (x, noise, velocities with and without
        # the prompt, x0; one block's worth for causal models) and each prompt's raw and embedded text stay
        # alive through the stage
        b, text_dim = shape[0], dit_cfg.text_dim
        block = shape if causal_cfg is None else (shape[0], min(shape[1], causal_cfg.query_frames), *shape[2:])
        sampler_bytes = 5 * math.prod(block) * 4 + 2 * b * dit_cfg.text_len * (text_dim + dit_cfg.dim) * 4
        predicted["denoise"] = dit_peak(dit_cfg, shape, weight_bytes, attention_budget) + sampler_bytes
        first = attention_budget
        while predicted["denoise"] > limit and attention_budget > MIN_ATTENTION_BUDGET:
            attention_budget = max(MIN_ATTENTION_BUDGET, attention_budget // 2)
            predicted["denoise"] = dit_peak(dit_cfg, shape, weight_bytes, attention_budget) + sampler_bytes
        if attention_budget != first:
            notes.append(f"attention chunks shrunk to a {attention_budget / 2**20:.0f} MB score budget")
    decoder_tile = None
    if choose_decoder(config, decoder) == "wan-vae":
        from .models import wan_vae

        try:  # (a folder without a vae section is refused before any work, by generate)
            decoder_tile, peak = wan_vae.plan_decode(config.get("vae"), shape, limit, low_memory, notes)
            predicted.update({} if peak is None else {"decode": peak})
        except MemoryError as exc:
            plan = MemoryPlan(limit, attention_budget, None, predicted, stream, notes)
            raise MemoryPlanError(_plan_refusal(plan, request, {k: v for k, v in predicted.items() if v > limit},
                                                decoder=str(exc))) from None
    elif "decoder" in config:
        from .models import taehv

        dec_cfg = config_from_dict(taehv.TAEHVConfig, config["decoder"])
        itemsize = 4 if mx.default_device() == mx.cpu else 2
        decoder_budget = max(64 * 1024**2, limit // (8 if low_memory else 4))
        try:
            decoder_tile = taehv.choose_tile(dec_cfg, shape, min(decoder_budget, limit), itemsize=itemsize)
            predicted["decode"] = taehv.decoder_peak_bytes(dec_cfg, shape, tile=decoder_tile, itemsize=itemsize)
            if predicted["decode"] > limit:
                raise MemoryError
        except MemoryError:
            try:  # the whole limit for the decoder: smaller tiles
                decoder_tile = taehv.choose_tile(dec_cfg, shape, limit, itemsize=itemsize)
                predicted["decode"] = taehv.decoder_peak_bytes(dec_cfg, shape, tile=decoder_tile, itemsize=itemsize)
                notes.append("decoder planned with the whole limit (its default share does not fit): "
                             + (f"tiles {decoder_tile}" if decoder_tile else "whole frames"))
            except MemoryError as exc:
                plan = MemoryPlan(limit, attention_budget, None, predicted, stream, notes)
                raise MemoryPlanError(_plan_refusal(plan, request, {k: v for k, v in predicted.items() if v > limit},
                                                    decoder=str(exc))) from None
    plan = MemoryPlan(limit, attention_budget, decoder_tile, predicted, stream, notes)
    over = {k: v for k, v in predicted.items() if v > limit}
    if over:
        raise MemoryPlanError(_plan_refusal(plan, request, over))
    return plan


def default_attention_budget(limit: int, low_memory: bool = False) -> int:
    """The plan's first attention-score budget: an eighth of the limit (a sixteenth in low-memory mode), 16 MB
    to 2 GB."""
    return max(MIN_ATTENTION_BUDGET, min(limit // (16 if low_memory else 8), 2 * GB))


def _plan_refusal(plan: MemoryPlan, request: GenerationRequest, over: dict[str, int], decoder: str = "") -> str:
    figures = ", ".join(f"{k} {_gb(v)}" for k, v in plan.predicted.items())
    worst = "; ".join([f"{k} needs {_gb(v)}" for k, v in over.items()] + ([f"decode: {decoder}"] if decoder else []))
    return (f"a {request.height}x{request.width}x{request.frames} video does not fit the memory limit of "
            f"{_gb(plan.limit_bytes)} even with the smallest attention chunks and decoder tiles: {worst} "
            f"(predicted peaks per stage: {figures}; this machine has {_gb(machine_memory_bytes())}). Use a "
            f"smaller --height/--width/--frames, or a larger --memory-limit if the machine has the memory")


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.0f} MB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MB"


def _component_bytes(folder: Path, section: dict) -> int:
    """Resident bytes of a component's weights once loaded at the compute dtype (fp32 on the CPU)."""
    path = folder / section.get("weights_file", "")
    if not path.is_file():
        return 0
    from .safetensors_io import read_safetensors_header

    elements = sum(math.prod(info["shape"]) for info in read_safetensors_header(path).values())
    itemsize = 4 if mx.default_device() == mx.cpu else 2
    return elements * itemsize


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@contextmanager
def _stage(name: str, stats: dict[str, StageStats], events: Events, predicted: int | None = None,
           limit: int | None = None):
    wan_dit.rope_tables.cache_clear()  # a stage starts with only what it needs alive (the limit is process-wide)
    free_memory()
    mx.reset_peak_memory()
    events({"event": "stage_start", "stage": name})
    start = time.perf_counter()
    yield
    s = StageStats(time.perf_counter() - start, int(mx.get_peak_memory()), max_rss_bytes(), predicted)
    stats[name] = s
    if limit and s.peak_memory_bytes > limit:
        print(f"mlx-video: warning: the {name} stage peaked at {_gb(s.peak_memory_bytes)}, above the memory limit "
              f"of {_gb(limit)} (predicted {_gb(predicted or 0)})", file=sys.stderr)
        events({"event": "warning", "stage": name, "reason": "peak memory above the limit",
                "peak_memory_bytes": s.peak_memory_bytes, "limit_bytes": limit})
    events({"event": "stage_end", "stage": name, "seconds": round(s.seconds, 4),
            "peak_memory_bytes": s.peak_memory_bytes, "predicted_peak_bytes": predicted})


class Models:
    """Loaded components, kept between generations when ``keep_models`` is set (Python API)."""

    def __init__(self, folder: str | os.PathLike, dtype: mx.Dtype | str | None = None, loras=()):
        self.folder = resolve_model_path(folder)
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.loras = list(loras)  # mlx_video.lora.LoraSpec: merged into the DiT when it loads (not on disk)
        self.tokenizer = self.text_encoder = self.dit = self.decoder = None

    def load_dit(self):
        """The DiT, loaded (with the LoRAs merged) unless it is resident."""
        if self.dit is None:
            from . import lora

            dit = wan_dit.load(self.folder, self.dtype)
            lora.apply_to_model(dit, self.loras, self.folder, config_section(self.folder, "dit"))
            self.dit = dit
        return self.dit

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
    dit = models.load_dit()
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
                    extra_outputs: list[Path] = (), progress: Callable | None = None,
                    pending: list[VideoWriter] | None = None, decoder: str = "taehv") -> int:
    """Stream-decode latent frames straight into the writers; returns the number of frames written.
    ``decoder``: ``taehv`` (the folder's ``decoder``) or ``wan-vae`` (its ``vae``).

    With ``pending``, the finished and verified writers are appended there unpublished: the caller
    publishes them together with the metadata sidecar (or aborts them)."""
    from .models import taehv, wan_vae

    module = wan_vae if decoder == "wan-vae" else taehv
    if models.decoder is None or type(models.decoder).__module__ != module.__name__:
        models.decoder = module.load(models.folder, models.dtype)
    writers = [VideoWriter(output, fps=fps)] + [VideoWriter(p, fps=fps) for p in extra_outputs]
    written = 0
    try:
        for frames in module.decode_stream(models.decoder, latents, tile=tile):
            mx.eval(frames)
            check_finite(frames, "decode")
            frames = frames[0] if frames.ndim == 5 else frames  # [N, H, W, 3]
            for w in writers:
                w.write(frames)
            written += frames.shape[0] if frames.ndim == 4 else 1
            if progress:
                progress(written)
        for w in writers:
            w.finish()
        if pending is None:
            for w in writers:
                w.publish()
        else:
            pending.extend(writers)
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


def generate(model: str | os.PathLike | Models, request: GenerationRequest,
             output: str | os.PathLike | None = "out.mp4", *,
             models: Models | None = None, dtype: str | None = None, memory_limit: int | str | None = None,
             low_memory: bool = False, keep_models: bool = False, prompt_cache: str | os.PathLike | None = None,
             extra_outputs: list[str] = (), events: Events | None = None, progress: bool = False,
             decoder: str | None = None, loras=()) -> GenerationResult:
    """Generate one video. ``output=None`` returns the latents without decoding. ``decoder``: ``taehv`` or
    ``wan-vae`` (default: TAEHV when the folder has one, else the Wan VAE).

    ``model`` is a model folder (or cached Hugging Face id), or the ``Models`` of a previous call with
    ``keep_models=True`` (as is ``models``), which skips loading. ``events`` receives dicts
    (``--json-events``). Raises ``MemoryPlanError`` (a ``UsageError``, before any work) when the job cannot
    fit ``memory_limit``, and ``GenerationFailed`` (after writing ``<output>.failure.json``) on NaN or
    black output. ``loras``: ``mlx_video.lora.LoraSpec`` merged into the DiT at load (the folder is untouched).
    """
    if isinstance(model, Models):
        models, model = model, model.folder
    request.validate()
    folder = models.folder if models else resolve_model_path(model)
    config = read_config(folder)
    sampler_cfg = sampling.sampler_config(config.get("sampler"), **request.sampler)
    causal_cfg = causal.causal_config(config.get("sampler"), where=str(Path(folder) / "config.json"))
    if causal_cfg is not None:  # block-causal model: its frame count and sampler are checked before any work
        causal_cfg.check_frames(request.latent_shape()[1])
        causal.check_dit(config.get("dit") or {}, config["sampler"].get("preset"), str(Path(folder) / "config.json"))
        causal_cfg.switch_blocks([f for f, _ in request.prompt_schedule], request.frames)  # clear errors now
        if sampler_cfg.name != "fewstep" or sampler_cfg.uses_cfg:
            raise UsageError(f"{folder} holds a block-causal model ({config['sampler'].get('preset', 'causal')}): it "
                             f"samples with its few-step schedule and no guidance, not {sampler_cfg.name!r} with "
                             f"guidance {sampler_cfg.guidance}")
    if request.prompt_schedule and causal_cfg is None:
        raise UsageError(f"{folder} holds a bidirectional model: a prompt schedule switches prompts between the blocks "
                         f"of a block-causal model (LongLive), so it needs one")
    events = events or (lambda e: None)
    output = Path(output) if output is not None else None
    if output is not None:
        check_outputs(output, [Path(p) for p in extra_outputs])
    limit = check_memory_limit(parse_memory(memory_limit))
    models = models or Models(folder, parse_dtype(dtype), loras)
    if loras and models.dit is None:
        models.loras = list(loras)
    prompts = [request.prompt] + ([request.negative_prompt] if sampler_cfg.uses_cfg else []) + \
        [p for _, p in request.prompt_schedule]  # (causal models have no negative prompt)
    from .tokenizer import PromptTruncatedWarning, load_tokenizer

    if models.tokenizer is None:
        models.tokenizer = load_tokenizer(folder)
    with warnings.catch_warnings():  # counting only: the encode stage reports a truncation, once
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        text_tokens = max(len(models.tokenizer.encode(p)) for p in prompts)
    decoder = choose_decoder(config, decoder)
    plan = plan_memory(folder, request, limit, low_memory, text_tokens, len(prompts), keep_models,
                       decoder)  # may refuse
    mx.set_memory_limit(limit)
    mx.set_cache_limit(0 if low_memory else limit // 4)
    stats: dict[str, StageStats] = {}
    metadata = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
        "height": request.height, "width": request.width, "frames": request.frames, "fps": request.fps,
        "sampler": asdict(sampler_cfg), "timesteps": sampling.schedule(sampler_cfg).timesteps,
        "loras": [{"file": str(s.path), "scale": s.scale} for s in models.loras],
        **({"prompt_extension": request.prompt_extension} if request.prompt_extension else {}),
        **({"prompt_schedule": [list(e) for e in request.prompt_schedule]} if request.prompt_schedule else {}),
        "model": str(model), "model_path": str(Path(folder).resolve()), "dtype": dtype, "memory_plan": plan.as_dict(),
        "low_memory": low_memory, "mlx_version": mx.__version__, "device": str(mx.default_device()),
        "decoder": decoder,
    }
    events({"event": "start", **{k: metadata[k] for k in ("prompt", "seed", "height", "width", "frames")}})
    pending: list[VideoWriter] = []  # finished videos, published with the sidecar
    try:
        for name in ("dit",) + ((DECODER_SECTIONS[decoder],) if output is not None else ()):
            config_section(folder, name)
        with _stage("encode", stats, events, plan.predicted.get("encode"), limit):
            context = encode_text(models, prompts, Path(prompt_cache) if prompt_cache else None,
                                  keep_models and not plan.stream_text_encoder)
        if causal_cfg is not None:  # block-causal: generate and stream-decode block by block (mlx_video/causal.py)
            predicted = plan.predicted.get("denoise", 0) + (plan.predicted.get("decode", 0) if output else 0)
            with _stage("generate", stats, events, predicted, limit):
                latents, n, metadata["causal"] = causal.generate_to_video(
                    models, request, sampler_cfg, causal_cfg, context, plan, output, [Path(p) for p in extra_outputs],
                    keep_models, events, progress, pending, decoder)
            del context
            if output is not None and n != request.frames:
                raise GenerationFailed(f"decoder produced {n} frames, expected {request.frames}", "generate")
        steps = len(metadata["timesteps"])
        bar = _bar(progress and causal_cfg is None, steps, "denoise", "step")

        def on_step(i, n, t):
            bar.update(1)
            events({"event": "step", "step": i + 1, "steps": n, "t": float(t)})

        if causal_cfg is None:
            with _stage("denoise", stats, events, plan.predicted.get("denoise"), limit):
                latents = denoise(models, request, sampler_cfg, context, plan.attention_budget_bytes, keep_models,
                                  on_step)
            del context
        bar.close()
        if output is not None and causal_cfg is None:
            fbar = _bar(progress, request.frames, "decode", "frame")

            def on_frames(n):
                fbar.update(n - fbar.n)
                events({"event": "frames", "written": n, "total": request.frames})

            with _stage("decode", stats, events, plan.predicted.get("decode"), limit):
                n = decode_to_video(models, latents, output, request.fps, plan.decoder_tile, keep_models,
                                    [Path(p) for p in extra_outputs], on_frames, pending, decoder)
            fbar.close()
            if n != request.frames:
                raise GenerationFailed(f"decoder produced {n} frames, expected {request.frames}", "decode")
    except GenerationFailed as exc:
        _abort(pending)
        metadata.update(stages={k: asdict(v) for k, v in stats.items()})
        if output is not None:
            report = write_failure_report(output, exc.reason, {"stage": exc.stage, **exc.details, "request": metadata})
            events({"event": "error", "reason": exc.reason, "stage": exc.stage, "failure_report": str(report)})
        raise
    metadata["stages"] = {k: asdict(v) for k, v in stats.items()}
    metadata["total_seconds"] = sum(s.seconds for s in stats.values())
    metadata["peak_memory_bytes"] = max((s.peak_memory_bytes for s in stats.values()), default=0)
    if output is not None:  # the videos and their sidecar appear together, or not at all
        sidecar = None
        try:
            sidecar = fsio.prepare_file(metadata_path(output), json.dumps(metadata, indent=2, default=str) + "\n",
                                        "json")
            for w in pending:
                w.publish()
            sidecar.publish()
        except BaseException:
            _abort(pending)
            if sidecar is not None:
                sidecar.discard()
            raise
    events({"event": "complete", "output": str(output) if output else None, "seconds": metadata["total_seconds"],
            "stages": metadata["stages"]})
    return GenerationResult(output, request.seed, latents, stats, metadata)


def metadata_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def random_seed() -> int:
    return random.SystemRandom().randrange(0, 2**31 - 1)


def check_outputs(output: Path, extra_outputs: list[Path] = ()) -> None:
    """Before any work: refuse (``fsio.OutputRefused``, exit 2) outputs mlx-video may not write or replace -
    the video, the extra videos, the metadata sidecar and the failure report (see ``fsio``)."""
    for path in (output, *extra_outputs):
        check_output(path)
    fsio.check_file_target(metadata_path(output), "json")
    fsio.check_file_target(failure_report_path(output), "json")


def _abort(writers: list[VideoWriter]) -> None:
    for w in writers:
        w.abort()


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
