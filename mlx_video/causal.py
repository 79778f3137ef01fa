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
``-2step``/``-1step`` Causal-Forcing++ variants: 4 steps for frame 0, then 2 or 1), ``longlive`` (its
12-frame window with a 3-frame sink; ``convert --lora`` merges its PEFT adapter, which LongLive requires) and
``rolling-forcing`` (:func:`rolling_blocks`: a window of 5 blocks at staggered noise levels denoised jointly,
its own 24-frame cache with block 0 as the sink). A preset that contradicts the DiT (:func:`dit_conflicts`) is
refused by ``convert`` and ``generate``.

Prompt switching (LongLive's interactive prompts, ``generate --prompt-schedule``): ``causal_blocks(switches=)``
changes the prompt at a block boundary after re-caching the window's K/V under the new prompt
(:func:`recache`), with LongLive v1.0's rules.

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
    # Rolling Forcing: 5 warped steps at shift 5 (1000, 952.38, 882.35, 769.23, 555.56), one window of 5 blocks
    # with staggered noise levels, 24-frame cache with block 0 as its sink ([RF] configs/rolling_forcing_dmd.yaml)
    "rolling-forcing": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 800, 600, 400, 200], warp=True),
                            causal=dict(frames_per_block=3, max_frames=None, family="rolling-forcing",
                                        window_blocks=5)),
    "longlive": dict(sampler=dict(shift=5.0, denoising_step_list=[1000, 750, 500, 250], warp=True),
                     causal=dict(frames_per_block=3, local_attn_frames=12, sink_frames=3, max_frames=None,
                                 family="longlive")),
}


@dataclass
class CausalConfig:
    frames_per_block: int = 3
    context_noise: float = 0.0  # timestep of the clean-K/V pass after each block
    local_attn_frames: int = -1  # -1: no window (attend to every earlier frame); else the cache size in frames
    sink_frames: int = 0  # with a window: the first frames, never evicted
    max_frames: int | None = 21  # without a window: the cache capacity in latent frames (None: the video's length)
    first_block_steps: list[float] | None = None  # optional denoising step list for block 0 (Causal-Forcing++)
    # Whose cache rules and loop: "self-forcing" (SF, CausVid, Causal-Forcing), "longlive" (SF's plus its
    # sink protection when cached frames are recomputed, checkpoints.md §3.3) or "rolling-forcing" (§3.2).
    family: str = "self-forcing"
    # Rolling Forcing ([RF] pipeline/rolling_forcing_inference.py, wan/modules/causal_model.py): blocks per
    # denoising window (= the number of steps), the KV cache (24 frames) and the most keys one query sees (21).
    window_blocks: int | None = None
    rolling_cache_frames: int = 24
    rolling_attention_frames: int = 21

    FAMILIES = ("self-forcing", "longlive", "rolling-forcing")
    MAX_ROPE_FRAMES = 1024  # upstream's RoPE table: absolute positions past it fail there ([SF] rope_params(1024))

    def __post_init__(self):
        if self.family not in self.FAMILIES:
            raise ValueError(f"family must be one of {', '.join(self.FAMILIES)}, not {self.family!r}")
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
        if self.family == "rolling-forcing":
            w, n = self.window_blocks, self.frames_per_block
            if w is None or w < 1:
                raise ValueError(f"rolling-forcing needs window_blocks >= 1 (one block per denoising step), got {w}")
            if self.windowed or self.sink_frames or self.max_frames is not None:
                raise ValueError("rolling-forcing has its own cache (rolling_cache_frames, a one-block sink); "
                                 "local_attn_frames, sink_frames and max_frames do not apply")
            # the first denoising window after block 0 needs block 0, the window and the block written with it
            if not self.rolling_attention_frames >= (w + 1) * n or self.rolling_cache_frames < 2 * n:
                raise ValueError(f"rolling_attention_frames ({self.rolling_attention_frames}) must hold a window of "
                                 f"{w} blocks plus the sink block, and rolling_cache_frames "
                                 f"({self.rolling_cache_frames}) two blocks of {n}")

    @property
    def windowed(self) -> bool:
        return self.local_attn_frames > 0

    @property
    def query_frames(self) -> int:
        """Latent frames one denoising forward takes: a block, or Rolling Forcing's window of blocks."""
        return self.frames_per_block * (self.window_blocks if self.family == "rolling-forcing" else 1)

    def attention_frames(self, total_frames: int) -> int:
        """The most latent frames of keys one forward attends to."""
        if self.family == "rolling-forcing":
            return self.rolling_attention_frames
        return self.cache_frames(total_frames)

    def cache_frames(self, total_frames: int) -> int:
        """Cache capacity in latent frames for a video of ``total_frames`` latent frames."""
        if self.family == "rolling-forcing":
            return self.rolling_cache_frames
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
        if self.family == "rolling-forcing" and total_frames < self.window_blocks * n:
            raise UsageError(f"{total_frames} latent frames are fewer than Rolling Forcing's window of "
                             f"{self.window_blocks} blocks of {n}; generate at least {self.window_blocks * n} latent "
                             f"frames ({4 * (self.window_blocks * n - 1) + 1} video frames)")
        if total_frames > self.MAX_ROPE_FRAMES:
            most = self.MAX_ROPE_FRAMES // n * n
            raise UsageError(f"{total_frames} latent frames exceed the {self.MAX_ROPE_FRAMES} absolute RoPE positions "
                             f"these models were built with (upstream fails past them); generate at most {most} "
                             f"latent frames ({4 * (most - 1) + 1} video frames)")
        if not self.windowed and self.max_frames is not None and total_frames > self.max_frames:
            raise UsageError(f"{total_frames} latent frames exceed this model's KV cache of {self.max_frames} frames "
                             f"(its trained length, {4 * (self.max_frames - 1) + 1} video frames) and it has no "
                             f"attention window; generate at most {self.max_frames} latent frames "
                             f"({4 * (self.max_frames - 1) + 1} video frames), or use a windowed model (longlive)")

    def switch_blocks(self, video_frames: Sequence[int], total_video_frames: int) -> list[int]:
        """The blocks at which the prompts of a schedule take over: ``video_frames[i]`` is the first video frame
        of prompt ``i + 1``. As LongLive's ``switch_frame_indices`` (in latent frames), a switch takes effect
        at the first block that starts at or after it ([LL] ``interactive_causal_inference.py``). Clear errors
        for switches that would never happen, go backwards, or fall into the same block."""
        from .utils import UsageError

        if self.family == "rolling-forcing" and len(video_frames):
            raise UsageError("prompt schedules are LongLive's (KV re-caching between blocks); Rolling Forcing denoises "
                             "overlapping windows of blocks and has no switch point")
        n = self.frames_per_block
        latents = (total_video_frames - 1) // 4 + 1
        blocks, previous = [], 0
        for v in video_frames:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 < v < total_video_frames:
                raise UsageError(f"prompt schedule: frame {v!r} is out of range: a switch must fall inside the video, "
                                 f"at a video frame from 1 to {total_video_frames - 1} (frame 0 is the first prompt's)")
            if v <= previous:
                raise UsageError(f"prompt schedule: frame {v} does not come after frame {previous}; list the switches "
                                 f"in increasing order")
            block = -(-((v + 3) // 4) // n)  # the latent frame holding video frame v, rounded up to a block start
            if block >= latents // n:
                raise UsageError(f"prompt schedule: the switch at video frame {v} would take effect at latent frame "
                                 f"{block * n}, after the video's last block (latent frames {latents - n}-"
                                 f"{latents - 1}); switch at video frame {4 * (latents - n) - 3} at the latest")
            if blocks and block == blocks[-1]:
                raise UsageError(f"prompt schedule: the switches at video frames {previous} and {v} fall into the same "
                                 f"block of {n} latent frames (prompts change between blocks); move them at least "
                                 f"{4 * n} video frames apart")
            blocks.append(block)
            previous = v
        return blocks


def dit_conflicts(dit: dict, preset: str | None = None) -> list[str]:
    """Why a DiT (its ``config.json`` ``dit`` section, or the same fields read from a checkpoint's shapes)
    cannot be the causal model a preset names. Every causal family here is a Wan2.1 text-to-video DiT, stock
    weights, one latent frame per token frame (checkpoints.md §0: no new parameters; causality is runtime)."""
    name = f"the {preset} preset" if preset else "a causal (block-by-block) sampler"
    problems = []
    patch = list(dit.get("patch_size") or [1, 2, 2])
    if patch[0] != 1:
        problems.append(f"its patch size {patch} packs {patch[0]} latent frames into one token frame, but {name} "
                        f"caches and denoises whole latent frames (Wan2.1's patch size is [1, 2, 2])")
    c_in, c_out = dit.get("in_channels", 16), dit.get("out_channels", 16)
    if c_in != c_out:
        problems.append(f"it takes {c_in} input channels for {c_out} output channels (an image-to-video or otherwise "
                        f"conditioned DiT), but {name} is for Wan2.1 text-to-video ({c_out} in, {c_out} out)")
    if dit.get("source_layout") == "rcm":
        problems.append("it is an rCM checkpoint (TrigFlow, bidirectional; checkpoints.md §4.2), not a causal one: "
                        "use --preset rcm")
    return problems


def check_dit(dit: dict, preset: str | None, where: str) -> None:
    """:func:`dit_conflicts` as one clear ``UsageError`` naming ``where`` (before any work)."""
    from .utils import UsageError

    problems = dit_conflicts(dit, preset)
    if problems:
        raise UsageError(f"{where}: this DiT cannot run as {preset or 'a causal model'}: " + "; ".join(problems))


def parse_prompt_schedule(text: str, where: str = "prompt schedule") -> list[tuple[int, str]]:
    """A prompt schedule file: one ``FRAME PROMPT`` (or ``FRAME: PROMPT``) per line, FRAME the first video frame
    of that prompt, the first line at frame 0; blank lines and lines starting with ``#`` are skipped. Range
    and order against the video are checked by :meth:`CausalConfig.switch_blocks`."""
    from .utils import UsageError

    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition(" ")
        head = head.rstrip(":")
        if ":" in head:  # "40:prompt" without a space
            head, rest = head.split(":", 1)[0], line.split(":", 1)[1]
        if not head.isdigit() or not rest.strip():
            raise UsageError(f"{where}, line {number}: expected 'FRAME PROMPT' (a video frame number, then the "
                             f"prompt), got {line!r:.80}")
        entries.append((int(head), rest.strip().lstrip(":").strip()))
    if not entries:
        raise UsageError(f"{where}: no prompts")
    if entries[0][0] != 0:
        raise UsageError(f"{where}: the first prompt must start at frame 0, not {entries[0][0]}")
    return entries


def block_first_video_frame(block: int, frames_per_block: int) -> int:
    """The first video frame a block's latents decode to (latent 0 is frame 0, latent k frames 4k-3..4k)."""
    latent = block * frames_per_block
    return 0 if latent == 0 else 4 * latent - 3


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


def _layer_buffers(cache, i: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """Layer ``i``'s preallocated ``[B, H, capacity, D]`` K/V buffers, made on first use with the keys' dtype."""
    if cache.k[i] is None:
        b, h, _, d = k.shape
        cache.k[i] = mx.zeros((b, h, cache.capacity, d), dtype=k.dtype)
        cache.v[i] = mx.zeros((b, h, cache.capacity, d), dtype=v.dtype)
    return cache.k[i], cache.v[i]


def _evict_after_sink(K: mx.array, V: mx.array, local: int, evict: int, sink: int) -> None:
    """Drop the ``evict`` oldest tokens after the first ``sink`` ones, shifting the rest of the ``local`` stored
    tokens left in place ([SF]'s window rule, shared by LongLive's and Rolling Forcing's caches)."""
    rolled = local - evict - sink
    if rolled > 0:
        K[:, :, sink:sink + rolled] = K[:, :, sink + evict:sink + evict + rolled]
        V[:, :, sink:sink + rolled] = V[:, :, sink + evict:sink + evict + rolled]


class KVCache:
    """Self-attention K/V of every layer, ``[B, heads_layer, capacity, head_dim]`` each (heads per layer, so
    pruned models fit), in the DiT's matmul dtype. Index bookkeeping follows [SF]
    ``CausalWanSelfAttention.forward`` (kv-cache branch). ``begin(start_frame)`` before each forward."""

    def __init__(self, num_layers: int, frame_tokens: int, capacity_frames: int, sink_frames: int = 0,
                 windowed: bool = False, protect_sink: bool = False):
        self.frame_tokens = frame_tokens
        # LongLive v1.0: a forward that recomputes cached frames (current_end <= global_end, current_start > 0)
        # writes from max(local_start, sink) on, so a prompt switch's re-cache keeps the sink (checkpoints.md §3.3)
        self.protect_sink = protect_sink
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
        n = k.shape[2]
        cap = self.capacity
        K, V = _layer_buffers(self, i, k, v)
        g, local = self.global_end[i], self.local_end[i]
        current_end = self.current_start + n
        if self.windowed and current_end > g and n + local > cap:
            evict = n + local - cap
            _evict_after_sink(K, V, local, evict, self.sink)
            local_end = local + current_end - g - evict
        else:
            local_end = local + current_end - g
        local_start = local_end - n
        if local_end > cap or local_start < 0:
            raise CacheFull(f"the KV cache holds {cap // self.frame_tokens} frames; a block ending at frame "
                            f"{current_end // self.frame_tokens} does not fit")
        write = local_start
        if self.protect_sink and current_end <= g and self.current_start > 0:
            write = max(local_start, self.sink)
        if write < local_end:
            K[:, :, write:local_end] = k[:, :, write - local_start:]
            V[:, :, write:local_end] = v[:, :, write - local_start:]
        mx.eval(K, V)
        self.global_end[i], self.local_end[i] = current_end, local_end
        return K[:, :, :local_end], V[:, :, :local_end]


class _RollingLayer:
    wants_unroped = True  # wan_dit.Attention passes the keys before RoPE too

    def __init__(self, cache: "RollingKVCache", i: int):
        self.cache, self.i = cache, i

    def __call__(self, k, v, unroped):
        return self.cache.update(self.i, k, v, unroped)


class RollingKVCache:
    """Rolling Forcing's clean cache ([RF] ``wan/modules/causal_model.py``, ``CausalWanSelfAttention`` kv branch;
    checkpoints.md §3.2). Per layer ``[B, heads_layer, capacity, head_dim]``. Only the **first block** of each
    forward is written, at the slot ending ``cache_start + block`` ([SF]'s global/local index rules, eviction
    after a one-block sink). Block 0 is stored **before RoPE**; every other block roped at its absolute frames.
    Keys attended:

    - while the forward starts at block 0: the forward's own keys only;
    - refresh (``updating``, one clean block at ``context_noise``): slots ``[max(0, end - max_attention), end)``,
      block 0 roped at frame 0 when included;
    - denoising: block 0 re-roped to sit just before the working cache (``start - working_frames - block``),
      then the working cache (stored blocks after block 0 and before this forward's first block, at most
      ``max_attention - L_query - block`` tokens), then the forward's own keys.
    """

    def __init__(self, num_layers: int, grid_hw: tuple[int, int], frames_per_block: int, capacity_frames: int,
                 attention_frames: int, head_dim: int, rope_theta: float = 10000.0):
        self.grid_hw, self.fpb = grid_hw, frames_per_block
        self.frame_tokens = grid_hw[0] * grid_hw[1]
        self.block = frames_per_block * self.frame_tokens
        self.capacity = capacity_frames * self.frame_tokens
        self.max_attention = attention_frames * self.frame_tokens
        self.sink = self.block  # [RF] keeps block 0 (``sink_size`` 1 block) when it evicts
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self.k: list[mx.array | None] = [None] * num_layers
        self.v: list[mx.array | None] = [None] * num_layers
        self.global_end = [0] * num_layers
        self.local_end = [0] * num_layers
        self.current_start = 0
        self.updating = False
        self.layers = [_RollingLayer(self, i) for i in range(num_layers)]

    def begin(self, start_frame: int, updating: bool = False) -> None:
        self.current_start, self.updating = start_frame * self.frame_tokens, updating

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v if a is not None)

    def _rope(self, keys: mx.array, start_frame: int) -> mx.array:
        """RoPE for one block of keys ``[B, H, block, D]`` at time positions ``start_frame...``."""
        from .models.wan_dit import apply_rope, rope_tables

        cos, sin = rope_tables.__wrapped__((self.fpb, *self.grid_hw), self.head_dim, self.rope_theta, start_frame)
        return apply_rope(keys.transpose(0, 2, 1, 3), cos, sin).astype(keys.dtype).transpose(0, 2, 1, 3)

    def update(self, i: int, k: mx.array, v: mx.array, unroped: mx.array) -> tuple[mx.array, mx.array]:
        n = k.shape[2]
        blk, cap = self.block, self.capacity
        if n < blk:
            raise ValueError(f"a rolling forward holds whole blocks of {blk} tokens, got {n}")
        K, V = _layer_buffers(self, i, k, v)
        g, local = self.global_end[i], self.local_end[i]
        cache_end = self.current_start + blk  # only the first block is cached
        new = cache_end - g
        if new > 0 and new + local > cap:
            evict = new + local - cap
            _evict_after_sink(K, V, local, evict, self.sink)
            local_end = local + cache_end - g - evict
            local_start = local_end - blk
            K[:, :, local_start:local_end] = k[:, :, :blk]
        else:
            local_end = local + cache_end - g
            local_start = local_end - blk
            if local_start < 0 or local_end > cap:
                raise CacheFull(f"rolling cache: a block ending at frame {cache_end // self.frame_tokens} does not fit")
            K[:, :, local_start:local_end] = (unroped if local_start == 0 else k)[:, :, :blk]
        V[:, :, local_start:local_end] = v[:, :, :blk]
        mx.eval(K, V)
        if new > 0:  # a refresh of the block just written moves nothing
            self.global_end[i], self.local_end[i] = cache_end, local_end
        if local_start == 0:
            return k, v
        if self.updating:
            lo = max(0, local_end - self.max_attention)
            keys, values = K[:, :, lo:local_end], V[:, :, lo:local_end]
            if lo == 0:
                keys = mx.concatenate([self._rope(keys[:, :, :blk], 0), keys[:, :, blk:]], axis=2)
            return keys, values
        end = local_start
        lo = min(end, max(blk, local_start - (self.max_attention - n - blk)))
        working_frames = (end - lo) // self.frame_tokens
        # [RF] ropes block 0 at current_start_frame - working_frames - 3: its 3 is the block's frame count
        anchor = self._rope(K[:, :, :blk], self.current_start // self.frame_tokens - working_frames - self.fpb)
        return (mx.concatenate([anchor, K[:, :, lo:end], k], axis=2),
                mx.concatenate([V[:, :, :blk], V[:, :, lo:end], v], axis=2))


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
                  stats: dict | None = None, cache: KVCache | None = None,
                  switches: dict | None = None) -> Iterator[mx.array]:
    """Generate block by block; yields each block's clean latents ``[B, frames_per_block, H, W, C]`` (fp32).

    ``text``: ``dit.prepare_text(context)`` (cross-attention K/V, computed once per prompt). ``noise``: the
    initial noise of the whole video ``[B, F, H, W, C]``. Re-noising draws come from ``key`` or are
    injected with ``renoise(shape, block, step)`` / ``renoise[block][step - 1]`` (parity tests).
    ``on_step(block, step, steps, t)`` is called after each denoising step; ``stats["kv_cache_bytes"]``
    is kept up to date when a dict is given. ``cache``: a fresh :class:`KVCache` to use (tests inspect it).
    ``switches``: ``{block: prepare_text(new prompt)}``, LongLive's prompt switching (:func:`recache`).
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
    if causal.family == "rolling-forcing":
        yield from rolling_blocks(dit, text, noise, sampler_cfg, causal, key=key, renoise=renoise, on_step=on_step,
                                  stats=stats, cache=cache)
        return
    if cache is None:
        cache = KVCache(len(dit.blocks), (h // ph) * (w // pw), causal.cache_frames(f), causal.sink_frames,
                        causal.windowed, protect_sink=causal.family == "longlive")
    switches = switches or {}
    if any(not 0 < s < n_blocks for s in switches):
        raise ValueError(f"prompt switches at blocks {sorted(switches)}: blocks run from 1 to {n_blocks - 1}")
    # clean latents a re-cache may need: the window's frames (or every frame, without a window)
    recent: list[mx.array] = []
    for blk in range(n_blocks):
        start = blk * fpb
        if blk in switches:
            text = switches[blk]
            recache(dit, cache, mx.concatenate(recent, axis=1), start, text, causal)
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
        if switches:
            recent.append(x)
            keep = causal.local_attn_frames if causal.windowed else f
            while sum(r.shape[1] for r in recent) - recent[0].shape[1] >= keep:
                recent.pop(0)
        if blk < n_blocks - 1:  # clean K/V for later blocks; the cache writes are evaluated inside update()
            cache.begin(start)
            dit(x, [[float(causal.context_noise)] * fpb] * b, text=text, kv_cache=cache.layers, start_frame=start)


def recache(dit, cache: KVCache, clean: mx.array, start: int, text, causal: CausalConfig) -> None:
    """LongLive's prompt switch before the block at latent frame ``start`` ([LL] ``interactive_causal_inference.py``
    ``_recache_after_switch``, v1.0; checkpoints.md §3.3): one forward at ``context_noise`` over the last
    ``min(window, start)`` clean frames (all of them without a window) with the **new** prompt's cross-attention,
    at their own positions, so their cached K/V are recomputed under the new prompt. v1.0's cached self-attention
    takes no mask (the recomputed frames see each other and the sink); its recompute rule keeps the sink's K/V
    when the recomputed frames do not start at frame 0 (:class:`KVCache` ``protect_sink``). The cross-attention
    cache is simply the new prompt's (``text``). (Later LongLive revisions pass a block-causal mask to this
    forward and always protect the sink; that variant is not implemented.)"""
    n = min(causal.local_attn_frames, start) if causal.windowed else start
    frames = clean[:, -n:]
    if frames.shape[1] != n:
        raise ValueError(f"re-cache needs the last {n} clean latent frames, got {frames.shape[1]}")
    cache.begin(start - n)
    dit(frames, [[float(causal.context_noise)] * n] * frames.shape[0], text=text, kv_cache=cache.layers,
        start_frame=start - n)


def rolling_blocks(dit, text, noise: mx.array, sampler_cfg: sampling.SamplerConfig, causal: CausalConfig, *,
                   key=None, renoise: Renoise | Sequence | None = None, on_step=None, stats: dict | None = None,
                   cache: RollingKVCache | None = None) -> Iterator[mx.array]:
    """Rolling Forcing's joint denoising ([RF] ``pipeline/rolling_forcing_inference.py``
    ``inference_rolling_forcing``; checkpoints.md §3.2). With W = ``window_blocks`` = the number of steps, window
    w = 0 ... nb + W - 2 covers blocks ``[max(0, w - W + 1), min(nb - 1, w)]``; block b sits at step ``w - b``
    (the newest at the first, noisiest timestep, the oldest at the last). One forward per window on the blocks'
    noisy latents (fresh initial noise for block w itself), per-frame timesteps, per-frame x0; every block not
    at its last step is re-noised to its next step's sigma with fresh noise (``renoise[block][step - 1]``, as
    :func:`causal_blocks`), and the oldest block, at its last step, is finished: it is yielded. Then the window's
    first block's x0 is run once at ``context_noise`` to refresh its clean K/V (``updating_cache=True``; skipped
    after the last window, where it changes nothing)."""
    b, f, h, w, _ = noise.shape
    causal.check_frames(f)
    fpb, n_blocks = causal.frames_per_block, f // causal.frames_per_block
    sched = sampling.schedule(sampler_cfg)
    steps = len(sched.timesteps)
    if steps != causal.window_blocks:
        raise ValueError(f"Rolling Forcing's window holds one block per denoising step: {causal.window_blocks} "
                         f"blocks, but the schedule has {steps} steps")
    draw = _renoise_draws(key, renoise, n_blocks, steps)
    pt, ph, pw = dit.config.patch_size
    if cache is None:
        cache = RollingKVCache(len(dit.blocks), (h // ph, w // pw), fpb, causal.rolling_cache_frames,
                               causal.rolling_attention_frames, dit.config.head_dim, dit.config.rope_theta)
    noisy: dict[int, mx.array] = {}
    for win in range(n_blocks + steps - 1):
        first, last = max(0, win - steps + 1), min(n_blocks - 1, win)
        blocks = list(range(first, last + 1))
        x = mx.concatenate([noise[:, blk * fpb:(blk + 1) * fpb] if blk == win else noisy.pop(blk) for blk in blocks],
                           axis=1)
        t_frames = [float(sched.timesteps[win - blk]) for blk in blocks for _ in range(fpb)]
        cache.begin(first * fpb)
        v = dit(x, [t_frames] * b, text=text, kv_cache=cache.layers, start_frame=first * fpb)
        sigma = mx.array(np.repeat([sched.sigmas[win - blk] for blk in blocks], fpb).astype(np.float32))
        x0 = x - sigma[None, :, None, None, None] * v
        mx.eval(x0)
        for j, blk in enumerate(blocks):
            step = win - blk
            if step < steps - 1:
                eps = draw((b, fpb, h, w, x.shape[-1]), blk, step + 1)
                eps = eps.astype(mx.float32) if isinstance(eps, mx.array) else mx.array(np.asarray(eps, np.float32))
                s_next = float(sched.sigmas[step + 1])
                noisy[blk] = (1.0 - s_next) * x0[:, j * fpb:(j + 1) * fpb] + s_next * eps
                mx.eval(noisy[blk])
        if on_step is not None:
            on_step(win, 0, 1, float(sched.timesteps[0]))
        if stats is not None:
            stats["kv_cache_bytes"] = cache.nbytes
        if win - first == steps - 1:  # the oldest block has had its last step
            yield x0[:, :fpb]
        if win < n_blocks + steps - 2:
            cache.begin(first * fpb, updating=True)
            dit(x0[:, :fpb], [[float(causal.context_noise)] * fpb] * b, text=text, kv_cache=cache.layers,
                start_frame=first * fpb)


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
    q_tokens = causal.query_frames * frame_tokens
    kv_tokens = causal.attention_frames(f // pt) * frame_tokens
    heads = max(config.self_attn_heads)
    block = dit_peak_bytes(config, (b, causal.query_frames, h, w, c), weight_bytes, attention_budget)
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
    # prompt schedule (LongLive): context rows 1.. are the later prompts, each taking over at its block
    switch_at = causal.switch_blocks([f for f, _ in request.prompt_schedule], request.frames)
    switches = {blk: dit.prepare_text(context[i + 1:i + 2]) for i, blk in enumerate(switch_at)}
    mx.eval(list(switches.values()))
    bar = _bar(progress, n_blocks, "generate", "block")
    start = time.perf_counter()
    info: dict = {"blocks": n_blocks, "frames_per_block": causal.frames_per_block, "seconds_per_block": [],
                  "settings": dataclasses.asdict(causal)}
    if switch_at:
        info["prompt_switches"] = [
            {"block": blk + 1, "latent_frame": blk * causal.frames_per_block,
             "video_frame": block_first_video_frame(blk, causal.frames_per_block), "requested_video_frame": f,
             "prompt": prompt} for blk, (f, prompt) in zip(switch_at, request.prompt_schedule)]
    kept: list[mx.array] = []
    rolling = causal.family == "rolling-forcing"
    switch_events = {s["block"] - 1: s for s in info.get("prompt_switches", [])}

    def on_step(block, i, n, t):
        if rolling:  # one forward per window of blocks (block = the window's index)
            events({"event": "window", "window": block + 1, "windows": n_blocks + steps - 1, "t_newest": t})
            return
        if i == 0 and block in switch_events:
            events({"event": "prompt_switch", **switch_events[block]})
        events({"event": "step", "block": block + 1, "blocks": n_blocks, "step": i + 1, "steps": n, "t": t})

    def blocks():
        last = time.perf_counter()
        for i, x in enumerate(causal_blocks(dit, text, noise, sampler_cfg, causal, key=request.seed,
                                            on_step=on_step, stats=info, switches=switches)):
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
