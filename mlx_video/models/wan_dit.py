"""Wan2.1 text-to-video diffusion transformer (DiT), exact MLX port, pruned shapes included.

Reference: ``shared/reference/models.md`` §1 ([WAN] ``wan/modules/model.py``). Layout conventions here:
latents are channels-last ``[B, F, H, W, C]`` (Wan uses ``[C, F, H, W]``); parameter names follow the
original Wan keys where MLX allows (``converters/wan_dit.py`` holds the mapping).

Precision policy (what prevents black frames in half precision): matmul weights in the compute dtype
(fp32 on the CPU, bf16/fp16 on GPUs); time embedding, modulation, LayerNorm/RMSNorm statistics, RoPE,
the residual stream and the head stay fp32, as in Wan's reference under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..ops import DEFAULT_ATTENTION_BUDGET, attention, gelu_tanh, gelu_tanh_fresh, modulated_layer_norm, native_rope
from ..utils import Rule

# Parameters that stay fp32 whatever the weight dtype (small, and precision-critical).
FP32_PARAMETERS = ("time_embedding.", "modulation", "norm", "head.linear")


@dataclass
class WanDiTConfig:
    dim: int = 1536
    num_layers: int = 30
    # Per-layer widths, so that unevenly pruned checkpoints load. An int means "the same in every layer".
    self_attn_heads: list[int] | int = 12
    cross_attn_heads: list[int] | int = 12
    ffn_dim: list[int] | int = 8960
    head_dim: int = 128  # kept explicit: pruned models have heads * head_dim != dim
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    out_channels: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    eps: float = 1e-6
    # q/k RMSNorm after head pruning: "kept" normalises over the kept channels (a model trained pruned);
    # "masked" reproduces a model whose pruned heads were zeroed in a width-`qk_norm_width` norm.
    qk_norm: str = "kept"
    qk_norm_width: int | None = None
    rope_theta: float = 10000.0
    model_type: str = "wan2.1-t2v"
    # Ranges checked when a config is read (utils.config_values), per list item; not a dataclass field.
    LIMITS = {"dim": (1, 65536), "num_layers": (1, 1024), "self_attn_heads": (1, 1024), "cross_attn_heads": (1, 1024),
              "ffn_dim": (1, 1 << 20), "head_dim": (6, 1024), "freq_dim": (2, 65536), "text_dim": (1, 65536),
              "text_len": (1, 8192), "in_channels": (1, 4096), "out_channels": (1, 4096), "patch_size": (1, 64),
              "eps": (1e-30, 1.0), "qk_norm_width": (1, 1 << 20), "rope_theta": (1.0, 1e12)}

    def __post_init__(self):
        for name in ("self_attn_heads", "cross_attn_heads", "ffn_dim"):
            value = getattr(self, name)
            value = [int(value)] * self.num_layers if isinstance(value, (int, np.integer)) else [int(v) for v in value]
            if len(value) != self.num_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.num_layers} layers")
            setattr(self, name, value)
        self.patch_size = [int(p) for p in self.patch_size]
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size needs 3 entries (t, h, w), got {self.patch_size}")
        if self.qk_norm not in ("kept", "masked"):
            raise ValueError(f"qk_norm must be 'kept' or 'masked', not {self.qk_norm!r}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {self.head_dim}")
        widest = max(self.self_attn_heads + self.cross_attn_heads, default=0) * self.head_dim
        if self.qk_norm == "masked" and self.qk_norm_width is not None and self.qk_norm_width < widest:
            raise ValueError(f"qk_norm_width {self.qk_norm_width} is narrower than the {widest} q/k channels it masks")

    @property
    def patch_elements(self) -> int:
        return int(np.prod(self.patch_size))

    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs per axis (t, h, w): 22/21/21 at head_dim 128 ([WAN] ``d - 4*(d//6)``)."""
        d = self.head_dim
        return (d - 4 * (d // 6)) // 2, (d // 6), (d // 6)


def wan2_1_1_3b() -> WanDiTConfig:
    return WanDiTConfig()


def lightning_video() -> WanDiTConfig:
    """The paper's pruned model: 10 of 12 heads (x128 inside a 1536-wide model), FFN 8960 -> 4480."""
    return WanDiTConfig(self_attn_heads=10, cross_attn_heads=10, ffn_dim=4480)


# --------------------------------------------------------------------------------------------------
# Embeddings computed on the host in float64 (no float64 on GPUs; these are tiny)
# --------------------------------------------------------------------------------------------------


def sinusoidal_embedding(timesteps, dim: int) -> mx.array:
    """[WAN] ``sinusoid_embedding_1d``: cos first, exponent -i/half, float64, returned as fp32 ``[B, dim]``."""
    t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
    half = dim // 2
    freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    args = t[:, None] * freqs[None]
    return mx.array(np.concatenate([np.cos(args), np.sin(args)], axis=1).astype(np.float32))


@lru_cache(maxsize=16)
def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                start_frame: int = 0) -> tuple[mx.array, mx.array]:
    """cos/sin ``[L, 1, head_dim/2]`` for tokens in row-major (f, h, w) order, interleaved-pair RoPE.

    Each axis has its own frequencies ``1/theta^(2j/D_axis)`` ([WAN] ``rope_params``), float64 on the host.
    ``start_frame`` offsets the time positions (causal blocks: [SF] ``causal_rope_apply(start_frame=...)``).
    """
    d = head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    angles = []
    for axis, (size, axis_dim) in enumerate(zip(grid, dims)):
        omega = 1.0 / np.power(theta, np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)
        pos = np.arange(size, dtype=np.float64) + (start_frame if axis == 0 else 0)
        a = pos[:, None] * omega[None]  # [size, axis_dim/2]
        shape = [1, 1, 1, a.shape[1]]
        shape[axis] = size
        angles.append(np.broadcast_to(a.reshape(shape), (*grid, a.shape[1])))
    theta_all = np.concatenate(angles, axis=-1).reshape(-1, 1, d // 2)
    return mx.array(np.cos(theta_all).astype(np.float32)), mx.array(np.sin(theta_all).astype(np.float32))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent pairs (2i, 2i+1) = (real, imag) of ``x [B, L, H, D]`` (GPT-J layout), in fp32."""
    if (fast := native_rope(x, cos, sin)) is not None:
        return fast
    b, l, h, d = x.shape
    x = x.astype(mx.float32).reshape(b, l, h, d // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(b, l, h, d)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """Apply a (possibly quantized) Linear in its own dtype."""
    dtype = layer.scales.dtype if hasattr(layer, "scales") else layer.weight.dtype
    return layer(x.astype(dtype))


class QKNorm(nn.Module):
    """Wan's RMSNorm over all heads jointly (before the head split), statistics in fp32."""

    def __init__(self, width: int, eps: float, full_width: int | None):
        super().__init__()
        self.weight = mx.ones((width,))
        # "masked" semantics: mean over `full_width` channels of which only `width` are non-zero.
        # rms_norm(x, w*sqrt(f/k), eps*f/k) == w*x*rsqrt(sum(x^2)/f + eps) exactly.
        ratio = (full_width / width) if full_width else 1.0
        self._scale, self._eps = math.sqrt(ratio), eps * ratio

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(mx.float32)
        if self._scale != 1.0:
            w = w * self._scale
        return mx.fast.rms_norm(x.astype(mx.float32), w, self._eps)


class Attention(nn.Module):
    """Self- or cross-attention with q/k RMSNorm across heads; ``heads * head_dim`` may differ from ``dim``."""

    def __init__(self, dim: int, heads: int, config: WanDiTConfig):
        super().__init__()
        inner = heads * config.head_dim
        self.heads, self.head_dim = heads, config.head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)
        full = (config.qk_norm_width or dim) if config.qk_norm == "masked" else None
        self.norm_q = QKNorm(inner, config.eps, full)
        self.norm_k = QKNorm(inner, config.eps, full)

    def _split(self, x: mx.array) -> mx.array:
        b, l, _ = x.shape
        return x.reshape(b, l, self.heads, self.head_dim)

    def key_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """Cross-attention K/V ``[B, H, L, D]``: computed once per prompt, reused for every step."""
        dtype = self.v.weight.dtype if not hasattr(self.v, "scales") else self.v.scales.dtype
        k = self._split(self.norm_k(linear(self.k, context))).astype(dtype).transpose(0, 2, 1, 3)
        v = self._split(linear(self.v, context)).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x, rope=None, kv=None, budget: int = DEFAULT_ATTENTION_BUDGET, cache=None) -> mx.array:
        """``cache(k, v) -> (k, v)``: causal self-attention stores this block's roped keys and values and
        returns the keys/values to attend to (``mlx_video/causal.py``)."""
        dtype = self.v.weight.dtype if not hasattr(self.v, "scales") else self.v.scales.dtype
        q = self._split(self.norm_q(linear(self.q, x)))
        if kv is None:  # self-attention
            k = self._split(self.norm_k(linear(self.k, x)))
            v = self._split(linear(self.v, x))
            # Rolling Forcing caches block 0's keys before RoPE (re-roped where it is attended)
            unroped = k.astype(dtype).transpose(0, 2, 1, 3) if getattr(cache, "wants_unroped", False) else None
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            k, v = k.astype(dtype).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            mx.eval(q, k, v, *([unroped] if unroped is not None else []))  # the projections' temporaries go now
            if cache is not None:
                k, v = cache(k, v) if unroped is None else cache(k, v, unroped)
        else:
            k, v = kv
        q = q.astype(dtype).transpose(0, 2, 1, 3)
        out = attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim), budget_bytes=budget)
        b, _, l, _ = out.shape
        return linear(self.o, out.transpose(0, 2, 1, 3).reshape(b, l, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array, budget: int = DEFAULT_ATTENTION_BUDGET) -> mx.array:
        # Token-chunked so the [L, hidden] activation stays within the memory budget at long sequences.
        hidden = self.fc1.weight.shape[0]
        chunk = max(1, budget // (hidden * 4 * 2))
        if x.shape[1] <= chunk:
            return linear(self.fc2, gelu_tanh_fresh(linear(self.fc1, x)))
        outs = []
        for s in range(0, x.shape[1], chunk):
            o = linear(self.fc2, gelu_tanh_fresh(linear(self.fc1, x[:, s:s + chunk])))
            mx.eval(o)
            outs.append(o)
        return mx.concatenate(outs, axis=1)


class LayerNormAffine(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = mx.ones((dim,)), mx.zeros((dim,)), eps

    def __call__(self, x):
        return modulated_layer_norm(x, self.weight, self.bias, self.eps)


class Block(nn.Module):
    def __init__(self, config: WanDiTConfig, layer: int):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.modulation = mx.zeros((1, 6, dim))
        self.self_attn = Attention(dim, config.self_attn_heads[layer], config)
        self.norm3 = LayerNormAffine(dim, config.eps)  # cross-attention pre-norm (diffusers calls it norm2)
        self.cross_attn = Attention(dim, config.cross_attn_heads[layer], config)
        self.ffn = FeedForward(dim, config.ffn_dim[layer])

    def __call__(self, x, e0, rope, cross_kv, budget: int = DEFAULT_ATTENTION_BUDGET, cache=None):
        """``e0``: ``[B, 6, dim]``, or ``[B, F, 6, dim]`` for per-frame timesteps (causal models: each frame's
        tokens get their frame's modulation, [SF] ``CausalWanAttentionBlock``)."""
        e = self.modulation.astype(mx.float32) + e0  # fp32
        e = e[:, None] if e.ndim == 3 else e
        b, f, _, d = e.shape
        e = e.reshape(b * f, 6, d)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (e[:, i:i + 1] for i in range(6))

        def frames(t):  # [B, L, dim] -> [B*F, L/F, dim], so that [B*F, 1, dim] modulation broadcasts per frame
            return t.reshape(b * f, -1, t.shape[-1])

        y = self.self_attn(modulated_layer_norm(frames(x), 1 + scale_msa, shift_msa, self.eps).reshape(x.shape),
                           rope=rope, budget=budget, cache=cache)
        x = x + (frames(y.astype(mx.float32)) * gate_msa).reshape(x.shape)
        x = x + self.cross_attn(self.norm3(x), kv=cross_kv, budget=budget).astype(mx.float32)
        y = self.ffn(modulated_layer_norm(frames(x), 1 + scale_ffn, shift_ffn, self.eps).reshape(x.shape), budget=budget)
        return x + (frames(y.astype(mx.float32)) * gate_ffn).reshape(x.shape)


class MLP2(nn.Module):
    """Linear -> activation -> Linear (Wan's text and time embedders)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.linear_2 = nn.Linear(d_hidden, d_out)


class Head(nn.Module):
    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.modulation = mx.zeros((1, 2, config.dim))
        self.linear = nn.Linear(config.dim, config.out_channels * config.patch_elements)
        self.eps = config.eps

    def __call__(self, x, e):
        """``e``: ``[B, dim]``, or ``[B, F, dim]`` per frame ([SF] ``CausalHead``)."""
        e = e[:, None] if e.ndim == 2 else e
        b, f, d = e.shape
        mod = self.modulation.astype(mx.float32) + e.reshape(b * f, 1, d)  # raw time embedding, no SiLU
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        y = modulated_layer_norm(x.reshape(b * f, -1, x.shape[-1]), 1 + scale, shift, self.eps).reshape(x.shape)
        return self.linear(y.astype(self.linear.weight.dtype)).astype(mx.float32)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.config = config
        c = config
        # kernel == stride, so the Conv3d patch embedding is a Linear over (kt, kh, kw, c)-ordered patches.
        self.patch_embedding = nn.Linear(c.in_channels * c.patch_elements, c.dim)
        self.text_embedding = MLP2(c.text_dim, c.dim, c.dim)
        self.time_embedding = MLP2(c.freq_dim, c.dim, c.dim)
        self.time_projection = nn.Linear(c.dim, 6 * c.dim)
        self.blocks = [Block(c, i) for i in range(c.num_layers)]
        self.head = Head(c)
        self.attention_budget = DEFAULT_ATTENTION_BUDGET  # bytes of attention scores per call (memory plan)

    # -- conditioning --------------------------------------------------------------------------------
    def embed_text(self, context: mx.array) -> mx.array:
        """T5 embeddings ``[B, L<=text_len, text_dim]`` -> ``[B, text_len, dim]``; padding rows are embedded
        zeros (Wan attends to all ``text_len`` slots, no mask)."""
        b, l, _ = context.shape
        if l > self.config.text_len:
            raise ValueError(f"context has {l} tokens; the model takes at most {self.config.text_len}")
        if l < self.config.text_len:
            context = mx.concatenate([context, mx.zeros((b, self.config.text_len - l, context.shape[2]), context.dtype)], 1)
        t = self.text_embedding
        return linear(t.linear_2, gelu_tanh(linear(t.linear_1, context)))

    def prepare_text(self, context: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Per-block cross-attention K/V for a prompt; pass to ``__call__`` to skip recomputing them."""
        text = self.embed_text(context)
        return [blk.cross_attn.key_values(text) for blk in self.blocks]

    def embed_time(self, timesteps) -> tuple[mx.array, mx.array]:
        """Returns ``e [B, dim]`` (for the head) and ``e0 [B, 6, dim]`` (block modulation), fp32."""
        t = self.time_embedding
        s = sinusoidal_embedding(timesteps, self.config.freq_dim)
        e = t.linear_2(nn.silu(t.linear_1(s.astype(t.linear_1.weight.dtype)))).astype(mx.float32)
        e0 = self.time_projection(nn.silu(e).astype(self.time_projection.weight.dtype)).astype(mx.float32)
        return e, e0.reshape(e.shape[0], 6, self.config.dim)

    # -- patches -------------------------------------------------------------------------------------
    def patchify(self, x: mx.array) -> tuple[mx.array, tuple[int, int, int]]:
        b, f, h, w, c = x.shape
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(f, h, w)} is not divisible by the patch size {tuple(self.config.patch_size)}")
        if c != self.config.in_channels:
            raise ValueError(f"latents have {c} channels; the model expects {self.config.in_channels}")
        grid = (f // pt, h // ph, w // pw)
        x = x.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, grid[0] * grid[1] * grid[2], pt * ph * pw * c), grid

    def unpatchify(self, x: mx.array, grid: tuple[int, int, int]) -> mx.array:
        """Head channel o = ((p*ph + q)*pw + r)*C + c (channel innermost, [WAN] ``unpatchify``)."""
        b = x.shape[0]
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(b, *grid, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, grid[0] * pt, grid[1] * ph, grid[2] * pw, c)

    # -- forward ---------------------------------------------------------------------------------------
    def __call__(self, latents: mx.array, timesteps, context=None, text=None, kv_cache=None,
                 start_frame: int = 0) -> mx.array:
        """Velocity prediction for ``latents [B, F, H, W, C]`` at ``timesteps`` (``[B]``, may be fractional).

        Give either raw T5 ``context [B, L, text_dim]`` or ``text = prepare_text(context)``.
        Causal use (``mlx_video/causal.py``): ``timesteps [B, F]`` per latent frame, ``kv_cache`` a sequence
        of per-layer self-attention caches, ``start_frame`` the block's first frame (RoPE time offset).
        """
        if text is None:
            if context is None:
                raise ValueError("pass context (T5 embeddings) or text (from prepare_text)")
            text = self.prepare_text(context)
        tokens, grid = self.patchify(latents.astype(mx.float32))
        x = linear(self.patch_embedding, tokens).astype(mx.float32)
        t = np.asarray(timesteps, dtype=np.float64)
        e, e0 = self.embed_time(t.reshape(-1))
        if t.ndim == 2:  # per-frame timesteps
            if t.shape[1] != grid[0]:
                raise ValueError(f"{t.shape[1]} per-frame timesteps for {grid[0]} latent frames")
            e, e0 = e.reshape(t.shape[0], t.shape[1], -1), e0.reshape(t.shape[0], t.shape[1], 6, -1)
        if e.shape[0] != x.shape[0]:
            e, e0 = mx.broadcast_to(e, (x.shape[0], *e.shape[1:])), mx.broadcast_to(e0, (x.shape[0], *e0.shape[1:]))
        # Causal blocks (start_frame > 0) are not kept in the table cache: one entry per block would pile up.
        tables = rope_tables if not start_frame else rope_tables.__wrapped__
        rope = tables(grid, self.config.head_dim, self.config.rope_theta, int(start_frame))
        caches = kv_cache if kv_cache is not None else [None] * len(self.blocks)
        for block, kv, cache in zip(self.blocks, text, caches):
            x = block(x, e0, rope, kv, self.attention_budget, cache)
        return self.unpatchify(self.head(x, e), grid)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

# The original Wan checkpoint names -> this module's (the converters apply it; ``prune`` inverts it).
def conv3d_to_patch_linear(w: mx.array) -> mx.array:
    """Conv3d [O, C, kt, kh, kw] (kernel == stride) -> Linear [O, kt*kh*kw*C] over channels-last patches."""
    return w.transpose(0, 2, 3, 4, 1).reshape(w.shape[0], -1)


_P = conv3d_to_patch_linear

WAN_RULES = [
    Rule(r"patch_embedding\.weight", "patch_embedding.weight", _P),
    Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
    Rule(r"text_embedding\.0\.(weight|bias)", r"text_embedding.linear_1.\1"),
    Rule(r"text_embedding\.2\.(weight|bias)", r"text_embedding.linear_2.\1"),
    Rule(r"time_embedding\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    Rule(r"time_embedding\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
    Rule(r"time_projection\.1\.(weight|bias)", r"time_projection.\1"),
    Rule(r"blocks\.(\d+)\.modulation", r"blocks.\1.modulation"),
    Rule(r"blocks\.(\d+)\.(self_attn|cross_attn)\.([qkvo])\.(weight|bias)", r"blocks.\1.\2.\3.\4"),
    Rule(r"blocks\.(\d+)\.(self_attn|cross_attn)\.(norm_[qk])\.weight", r"blocks.\1.\2.\3.weight"),
    Rule(r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm3.\2"),
    Rule(r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"blocks.\1.ffn.fc1.\2"),
    Rule(r"blocks\.(\d+)\.ffn\.2\.(weight|bias)", r"blocks.\1.ffn.fc2.\2"),
    Rule(r"head\.modulation", "head.modulation"),
    Rule(r"head\.head\.(weight|bias)", r"head.linear.\1"),
]

WEIGHTS_NAME = "dit.safetensors"


def load(folder, dtype: mx.Dtype | None = None) -> WanDiT:
    """Load the DiT of a model folder. ``dtype`` is the matmul dtype (default: fp32 on CPU, bf16 on GPU)."""
    from pathlib import Path

    from ..safetensors_io import load_safetensors
    from ..utils import (cast_floating, config_from_dict, config_section, default_compute_dtype, load_weights_strict,
                         model_file)

    folder = Path(folder)
    section = config_section(folder, "dit")
    config = config_from_dict(WanDiTConfig, section)
    model = WanDiT(config)
    path = model_file(folder, section, "weights_file", WEIGHTS_NAME)
    weights = load_safetensors(path)
    weights = cast_floating(weights, dtype or default_compute_dtype(), keep_fp32=FP32_PARAMETERS)
    load_weights_strict(model, weights, f"{path}")
    mx.eval(model.parameters())
    return model
