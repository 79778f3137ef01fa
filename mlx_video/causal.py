"""Causal, streaming generation: Self-Forcing, CausVid and successors, with a KV cache.

Reference: ``shared/reference/checkpoints.md`` §1-§3 ([SF] ``pipeline/causal_inference.py``,
``wan/modules/causal_model.py``) and ``models.md`` §5.3. The checkpoints hold the stock Wan weights; what
makes them causal is this runtime:

- The video is generated in blocks of ``frames_per_block`` latent frames, one after another. Each block
  starts from its slice of the initial noise and runs the few-step schedule: per step, one DiT forward at
  that step's timestep on every frame of the block, ``x0 = x - sigma v``, then re-noising to the next
  sigma with **fresh** noise (the last step keeps x0).
- Self-attention sees the cached keys/values of earlier frames plus the current block (bidirectional
  inside the block). Keys are cached after RoPE, with the time index offset by the block's start frame.
  Repeated steps of a block overwrite the same cache slots. After the last step the clean block is run
  once more at ``context_noise`` (0) so the cache holds clean K/V for the next blocks (skipped after the
  final block, where it changes nothing). Cross-attention K/V are computed once per prompt.
- The cache follows [SF]'s index rules exactly (``global_end``/``local_end`` per layer). Without a window
  it holds ``max_frames`` frames (the trained length, 21) and a longer video is refused up front
  (upstream overflows). With a window (``local_attn_frames``, ``sink_frames``) it has a fixed size: when
  a new block does not fit, the oldest frames after the sink are evicted, so any length runs at constant
  memory. The cache is in the DiT's matmul dtype (fp32 on the CPU, bf16/fp16 on GPUs), heads per layer
  (pruned models); its bytes are part of the memory plan (:func:`causal_peak_bytes`).

Presets (recorded in the model folder's ``sampler`` section by ``convert --sampler NAME``):
``self-forcing``, ``causvid-ar``, ``causal-forcing`` (chunk-wise), ``causal-forcing-framewise`` (and its
``-2step``/``-1step`` Causal-Forcing++ variants: 4 steps for frame 0, then 2 or 1) and ``longlive`` (its
12-frame window with a 3-frame sink; ``convert --lora`` merges its PEFT adapter; interactive prompt
switching with KV re-caching is not implemented). Rolling Forcing's joint window denoising is not
implemented.

Streaming: :func:`causal_blocks` yields each finished block; :func:`generate_to_video` feeds them through
the streaming TAEHV decoder into the video writer while later blocks are still being generated. The
writer commits the file atomically on success, so a killed or failed run leaves no video at all.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import sampling

# Per-preset sampler and causal settings ([SF] configs/self_forcing_dmd.yaml; [CV] wan_causal_dmd.yaml and
# its hard-coded shift 8; [CF] causal_forcing_dmd_{chunkwise,framewise}.yaml; [LL] longlive_inference.yaml).
PRESETS = {
    "self-forcing": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 750, 500, 250], warp=True),
                         causal=dict(frames_per_block=3)),
    "causvid-ar": dict(sampler=dict(shift=8.0, denoising_step_list=[1000, 757, 522], warp=False),
                       causal=dict(frames_per_block=3)),
    "causal-forcing": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 750, 500, 250], warp=True),
                           causal=dict(frames_per_block=3)),
    "causal-forcing-framewise": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 750, 500, 250], warp=True),
                                     causal=dict(frames_per_block=1)),
    # Causal-Forcing++ frame-wise: 4 steps for the first frame, then 2 or 1 ([CF] causal_forcing_dmd_framewise_*step)
    "causal-forcing-framewise-2step": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 500], warp=True),
                                           causal=dict(frames_per_block=1, first_block_steps=[1000, 750, 500, 250])),
    "causal-forcing-framewise-1step": dict(sampler=dict(shift=5.0, denoising_step_list=[1000], warp=True),
                                           causal=dict(frames_per_block=1, first_block_steps=[1000, 750, 500, 250])),
    "longlive": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 750, 500, 250], warp=True),
                     causal=dict(frames_per_block=3, local_attn_frames=12, sink_frames=3, max_frames=None)),
}


@dataclass
class CausalConfig:
    frames_per_block: int = 3
    context_noise: float = 0.0  # timestep of the clean-K/V pass after each block
    local_attn_frames: int = -1  # -1: no window (attend to every earlier frame); else the cache size in frames
    sink_frames: int = 0  # with a window: the first frames, never evicted
    max_frames: int | None = 21  # without a window: the cache capacity in latent frames (None: the video's length)
    first_block_steps: list[float] | None = None  # optional denoising step list for block 0 (Causal-Forcing++)

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.windowed:
            if self.sink_frames < 0 or self.local_attn_frames < self.sink_frames + self.frames_per_block:
                raise ValueError(f"local_attn_frames ({self.local_attn_frames}) must hold the sink "
                                 f"({self.sink_frames}) plus one block ({self.frames_per_block} frames)")
        elif self.local_attn_frames != -1:
            raise ValueError(f"local_attn_frames must be -1 (no window) or >= 1, got {self.local_attn_frames}")
        elif self.sink_frames:
            raise ValueError("sink_frames needs a window (local_attn_frames)")
        if self.max_frames is not None and self.max_frames < self.frames_per_block:
            raise ValueError(f"max_frames ({self.max_frames}) is smaller than one block ({self.frames_per_block})")

    @property
    def windowed(self) -> bool:
        return self.local_attn_frames > 0

    def cache_frames(self, total_frames: int) -> int:
        """Cache capacity in latent frames for a video of ``total_frames`` latent frames."""
        if self.windowed:
            return self.local_attn_frames
        return total_frames if self.max_frames is None else self.max_frames

    def check_frames(self, total_frames: int) -> None:
        """Clear errors, before any work, for lengths the block loop or the cache cannot take."""
        from .utils import UsageError

        n = self.frames_per_block
        if total_frames < 1 or total_frames % n:
            lo = max(n, total_frames // n * n)
            raise UsageError(f"{total_frames} latent frames do not split into blocks of {n}; causal models need a "
                             f"multiple of {n} (e.g. {lo} or {lo + n} latent frames = {4 * (lo - 1) + 1} or "
                             f"{4 * (lo + n - 1) + 1} video frames)")
        if not self.windowed and self.max_frames is not None and total_frames > self.max_frames:
            raise UsageError(f"{total_frames} latent frames exceed this model's KV cache of {self.max_frames} frames "
                             f"(its trained length, {4 * (self.max_frames - 1) + 1} video frames) and it has no "
                             f"attention window; generate at most {self.max_frames} latent frames "
                             f"({4 * (self.max_frames - 1) + 1} video frames), or use a windowed model (longlive)")


def preset_section(name: str) -> dict:
    """The ``sampler`` config section recorded for preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown causal preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    sampler = dict(sampling.DEFAULTS["fewstep"], name="fewstep", **p["sampler"])
    causal = dataclasses.asdict(CausalConfig(**p["causal"]))
    return {**sampler, "preset": name, "causal": causal}


DEFAULT_LATENT_FRAMES = 21  # Self-Forcing's and CausVid's trained length: 81 video frames


def default_frames(section: dict | None) -> int | None:
    """Default video frame count for a causal folder's ``sampler`` section (None: not causal)."""
    c = causal_config(section)
    if c is None:
        return None
    latents = DEFAULT_LATENT_FRAMES if c.max_frames is None else min(c.max_frames, DEFAULT_LATENT_FRAMES)
    return 4 * (latents // c.frames_per_block * c.frames_per_block - 1) + 1


def causal_config(section: dict | None, where: str | None = None) -> CausalConfig | None:
    """The causal settings of a model folder's ``sampler`` section, or None for a bidirectional model.
    With ``where`` (the config file), bad values are a ``ModelFolderError`` naming it."""
    if not section or not section.get("causal"):
        return None
    if where is not None:
        from .utils import config_from_dict

        return config_from_dict(CausalConfig, section["causal"], f"{where}: sampler.causal")
    fields = {f.name for f in dataclasses.fields(CausalConfig)}
    return CausalConfig(**{k: v for k, v in section["causal"].items() if k in fields})


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


class CacheFull(ValueError):
    pass


class KVCache:
    """Self-attention K/V of every layer, ``[B, heads_layer, capacity, head_dim]`` each (heads per layer, so
    pruned models fit), in the DiT's matmul dtype. Index bookkeeping follows [SF]
    ``CausalWanSelfAttention.forward`` (kv-cache branch). ``begin(start_frame)`` before each forward."""

    def __init__(self, num_layers: int, frame_tokens: int, capacity_frames: int, sink_frames: int = 0,
                 windowed: bool = False):
        self.frame_tokens = frame_tokens
        self.capacity = capacity_frames * frame_tokens
        self.sink = sink_frames * frame_tokens
        self.windowed = windowed
        self.k: list[mx.array | None] = [None] * num_layers
        self.v: list[mx.array | None] = [None] * num_layers
        self.global_end = [0] * num_layers
        self.local_end = [0] * num_layers
        self.current_start = 0
        self.layers = [self._layer(i) for i in range(num_layers)]

    def begin(self, start_frame: int) -> None:
        self.current_start = start_frame * self.frame_tokens

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v if a is not None)

    def _layer(self, i: int) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
        return lambda k, v: self.update(i, k, v)

    def update(self, i: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store layer ``i``'s new roped keys and values ``[B, H, L, D]``; return the K/V to attend to."""
        b, h, n, d = k.shape
        cap = self.capacity
        if self.k[i] is None:
            self.k[i] = mx.zeros((b, h, cap, d), dtype=k.dtype)
            self.v[i] = mx.zeros((b, h, cap, d), dtype=v.dtype)
        K, V = self.k[i], self.v[i]
        g, local = self.global_end[i], self.local_end[i]
        current_end = self.current_start + n
        if self.windowed and current_end > g and n + local > cap:
            evict = n + local - cap  # drop the oldest frames after the sink, shift the rest left
            rolled = local - evict - self.sink
            if rolled > 0:
                s = self.sink
                K[:, :, s:s + rolled] = K[:, :, s + evict:s + evict + rolled]
                V[:, :, s:s + rolled] = V[:, :, s + evict:s + evict + rolled]
            local_end = local + current_end - g - evict
        else:
            local_end = local + current_end - g
        local_start = local_end - n
        if local_end > cap or local_start < 0:
            raise CacheFull(f"the KV cache holds {cap // self.frame_tokens} frames; a block ending at frame "
                            f"{current_end // self.frame_tokens} does not fit")
        K[:, :, local_start:local_end] = k
        V[:, :, local_start:local_end] = v
        mx.eval(K, V)
        self.global_end[i], self.local_end[i] = current_end, local_end
        return K[:, :, :local_end], V[:, :, :local_end]


def cache_bytes(dit_config, latent_shape, causal: CausalConfig, itemsize: int) -> int:
    """Bytes of the full KV cache for ``latent_shape [B, F, H, W, C]`` (part of the memory plan)."""
    b, f, h, w, _ = latent_shape
    pt, ph, pw = dit_config.patch_size
    tokens = causal.cache_frames(f // pt) * (h // ph) * (w // pw)
    return sum(2 * b * heads * tokens * dit_config.head_dim * itemsize for heads in dit_config.self_attn_heads)


# --------------------------------------------------------------------------------------------------
# Block loop
# --------------------------------------------------------------------------------------------------

Renoise = Callable[[tuple, int, int], mx.array]  # (shape, block, step) -> noise mixed in before `step`


def _renoise_draws(key, renoise, blocks: int, steps: int) -> Renoise:
    if renoise is not None:
        if callable(renoise):
            return renoise
        draws = renoise
        return lambda shape, block, step: draws[block][step - 1]
    if key is None:
        raise ValueError("the causal sampler re-noises between steps: pass key (a seed) or renoise")
    if isinstance(key, (int, np.integer)):
        key = mx.random.split(mx.random.key(int(key)), 3)[2]  # independent of latent_noise(seed)
    keys = mx.random.split(key, max(2, blocks * steps))
    return lambda shape, block, step: mx.random.normal(shape, dtype=mx.float32, key=keys[block * steps + step])


def causal_blocks(dit, text, noise: mx.array, sampler_cfg: sampling.SamplerConfig, causal: CausalConfig, *,
                  key: int | mx.array | None = None, renoise: Renoise | Sequence | None = None,
                  on_step: Callable[[int, int, int, float], None] | None = None,
                  stats: dict | None = None, cache: KVCache | None = None) -> Iterator[mx.array]:
    """Generate block by block; yields each block's clean latents ``[B, frames_per_block, H, W, C]`` (fp32).

    ``text``: ``dit.prepare_text(context)`` (cross-attention K/V, computed once per prompt). ``noise``: the
    initial noise of the whole video ``[B, F, H, W, C]``. Re-noising draws come from ``key`` or are
    injected with ``renoise(shape, block, step)`` / ``renoise[block][step - 1]`` (parity tests).
    ``on_step(block, step, steps, t)`` is called after each denoising step; ``stats["kv_cache_bytes"]``
    is kept up to date when a dict is given. ``cache``: a fresh :class:`KVCache` to use (tests inspect it).
    """
    if sampler_cfg.name != "fewstep":
        raise ValueError(f"causal models sample with the few-step schedule, not {sampler_cfg.name!r}")
    if sampler_cfg.uses_cfg:
        raise ValueError("causal models run one conditional forward per step (no classifier-free guidance)")
    b, f, h, w, _ = noise.shape
    causal.check_frames(f)
    n_blocks, fpb = f // causal.frames_per_block, causal.frames_per_block
    configs = [sampler_cfg]
    if causal.first_block_steps:
        configs.insert(0, dataclasses.replace(sampler_cfg, denoising_step_list=list(causal.first_block_steps),
                                              steps=None))
    max_steps = max(c.steps for c in configs)
    draw = _renoise_draws(key, renoise, n_blocks, max_steps)
    pt, ph, pw = dit.config.patch_size
    if cache is None:
        cache = KVCache(len(dit.blocks), (h // ph) * (w // pw), causal.cache_frames(f), causal.sink_frames,
                        causal.windowed)
    for blk in range(n_blocks):
        start = blk * fpb
        cache.begin(start)

        def velocity(x, t, start=start):  # every frame of the block at the step's timestep
            return dit(x, [[float(t)] * fpb] * b, text=text, kv_cache=cache.layers, start_frame=start)

        # one block = the few-step sampler on its slice of the noise (fresh noise per re-noising step)
        x = sampling.sample(configs[0] if blk == 0 else configs[-1], velocity, noise[:, start:start + fpb],
                            renoise=lambda shape, step, blk=blk: draw(shape, blk, step),
                            progress=None if on_step is None else lambda i, n, t, blk=blk: on_step(blk, i, n, float(t)))
        if stats is not None:
            stats["kv_cache_bytes"] = cache.nbytes
        yield x
        if blk < n_blocks - 1:  # clean K/V for later blocks; the cache writes are evaluated inside update()
            dit(x, [[float(causal.context_noise)] * fpb] * b, text=text, kv_cache=cache.layers, start_frame=start)


def causal_sample(dit, text, noise, sampler_cfg, causal, **kwargs) -> mx.array:
    """All blocks at once: the clean latents ``[B, F, H, W, C]``."""
    return mx.concatenate(list(causal_blocks(dit, text, noise, sampler_cfg, causal, **kwargs)), axis=1)


# --------------------------------------------------------------------------------------------------
# Pipeline: memory plan and streaming generation (called by ``pipeline.generate`` for causal folders)
# --------------------------------------------------------------------------------------------------


def causal_peak_bytes(config, latent_shape, weight_bytes: int, attention_budget: int, causal: CausalConfig,
                      itemsize: int = 4) -> int:
    """Predicted peak of block-by-block generation: one block's forward (``pipeline.dit_peak_bytes`` on the
    block's shape), the whole KV cache, and the block's attention over it (scores chunk plus one layer's
    contiguous K^T/V copies). It depends on the video's length only through the cache, which is fixed
    with a window."""
    from .ops import attention_peak_bytes
    from .pipeline import dit_peak_bytes

    b, f, h, w, c = latent_shape
    pt, ph, pw = config.patch_size
    frame_tokens = (h // ph) * (w // pw)
    q_tokens = causal.frames_per_block * frame_tokens
    kv_tokens = causal.cache_frames(f // pt) * frame_tokens
    heads = max(config.self_attn_heads)
    block = dit_peak_bytes(config, (b, causal.frames_per_block, h, w, c), weight_bytes, attention_budget)
    scores = attention_peak_bytes(b, heads, q_tokens, kv_tokens, attention_budget)
    layer_copy = 2 * b * heads * kv_tokens * config.head_dim * itemsize
    return int(block + cache_bytes(config, latent_shape, causal, itemsize) + scores + layer_copy)


def generate_to_video(models, request, sampler_cfg: sampling.SamplerConfig, causal: CausalConfig, context: mx.array,
                      plan, output: Path | None, extra_outputs: Sequence[Path], keep: bool, events,
                      progress: bool, pending: list, decoder: str = "taehv") -> tuple[mx.array, int, dict]:
    """Generate block by block and, with an ``output``, stream each finished block through the TAEHV
    decoder into the writers while later blocks are generated. Returns (latents, frames written, info
    with ``time_to_first_frame_s``, ``seconds_per_block``, ``kv_cache_bytes``)."""
    from .pipeline import _bar, decode_to_video
    from .video import check_finite

    dit = models.load_dit()  # with any --lora merged
    dit.attention_budget = plan.attention_budget_bytes
    text = dit.prepare_text(context[:1])
    mx.eval(text)
    shape = request.latent_shape()
    noise = sampling.latent_noise(shape, request.seed)
    n_blocks = shape[1] // causal.frames_per_block
    steps = len(sampling.schedule(sampler_cfg).timesteps)
    bar = _bar(progress, n_blocks, "generate", "block")
    start = time.perf_counter()
    info: dict = {"blocks": n_blocks, "frames_per_block": causal.frames_per_block, "seconds_per_block": [],
                  "settings": dataclasses.asdict(causal)}
    kept: list[mx.array] = []

    def on_step(block, i, n, t):
        events({"event": "step", "block": block + 1, "blocks": n_blocks, "step": i + 1, "steps": n, "t": t})

    def blocks():
        last = time.perf_counter()
        for i, x in enumerate(causal_blocks(dit, text, noise, sampler_cfg, causal, key=request.seed,
                                            on_step=on_step, stats=info)):
            check_finite(x, f"generate (block {i + 1})")
            now = time.perf_counter()
            info["seconds_per_block"].append(round(now - last, 4))
            last = now
            kept.append(x)
            bar.update(1)
            events({"event": "block", "block": i + 1, "blocks": n_blocks, "latent_frames": x.shape[1],
                    "seconds": round(now - start, 4), "kv_cache_bytes": info.get("kv_cache_bytes")})
            yield x

    def on_frames(n):
        if "time_to_first_frame_s" not in info:
            info["time_to_first_frame_s"] = round(time.perf_counter() - start, 4)
            events({"event": "first_frame", "seconds": info["time_to_first_frame_s"]})
        events({"event": "frames", "written": n, "total": request.frames})

    written = 0
    try:
        if output is None:
            for _ in blocks():
                pass
        else:
            written = decode_to_video(models, blocks(), output, request.fps, plan.decoder_tile, keep,
                                      list(extra_outputs), on_frames, pending, decoder)
    finally:
        bar.close()
        if not keep:
            models.release("dit")
    info["steps_per_block"] = steps
    return mx.concatenate(kept, axis=1), written, info
