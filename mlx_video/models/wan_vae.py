"""The Wan2.1 VAE (``Wan2.1_VAE.pth`` / diffusers ``AutoencoderKLWan``) in MLX: the quality decoder.

Reference: ``shared/reference/models.md`` §3 ([WAN] ``wan/modules/vae.py``, [DIFF]
``autoencoder_kl_wan.py``). Parameters use diffusers' names (``decoder.up_blocks.0.resnets.1.conv1``...);
convolution weights are channels-last ``[O, kt, kh, kw, I]`` (3-D) / ``[O, kh, kw, I]`` (2-D) and RMS-norm
``gamma`` is flat ``[C]`` (``converters/wan_vae.py`` maps both checkpoint layouts).

Layouts: latents ``[B, T, H, W, 16]`` in the normalized space the DiT works in (``z*std + mean`` is applied
here); frames ``[B, 4T-3, 8H, 8W, 3]`` RGB in [0, 1] (the VAE's [-1, 1] output, clamped, then x0.5+0.5).

The decoder is causal in time: every 3x3x3 convolution sees its input's two previous frames (the feature
cache), and each temporal upsample passes the first frame through and doubles every later one. So the
decoder runs one latent frame at a time exactly as diffusers does; :class:`DecoderStream` goes further and
cuts the decoder after each up block (segments), running segments depth first on one frame at a time, so
only one full-resolution frame of activations exists at once. Peak memory: weights (73.3M decoder
parameters) + the feature cache (two frames of every causal conv's input: ~590 KB per latent pixel in fp32,
3.5 GB at 480x832, most of it the 96-channel full-resolution stage) + one segment's working set; it does
not grow with the number of frames (:func:`decoder_peak_bytes` predicts it).

Spatial tiling (``tile=``) decodes tile by tile over the whole video, each tile with its own feature caches,
so the caches and working set scale with the tile's area: it cuts the floor that whole frames have (a whole
frame's caches: 3.5 GB at 480x832 in fp32). What it adds is the decoded video itself (fp32; every frame is
final only after the last tile, so the frames come out at the end) and the work of the overlaps. Two kinds:

- exact tiles (``tile=<core edge>``, what the memory plan picks first): the decoder up to the mid-block
  attention (the only op that sees the whole frame, at latent resolution) runs on whole frames once and its
  output is kept for every latent frame; the rest runs per tile on the core plus a halo of its receptive
  radius (15 latent pixels) and keeps the core. The decoder is a causal 3-D CNN (its caches hold past
  inputs, not state), so this equals whole frames up to fp32 rounding (0 to 4e-7 in the tests). The halos
  cost work: the plan allows up to ``MAX_TILE_WORK`` x.
- diffusers' blended tiles (``tile=(tile_h, tile_w, stride_h, stride_w)``): ``tiled_decode`` exactly (within
  1.5e-6 of it), the attention per tile and the overlaps blended linearly. Inexact (tiles see zero padding
  and only their own attention: 0.37 from untiled on random weights at 48-pixel tiles), but cheaper at tight
  budgets. The plan never picks them (what it picks must stay within 1/255 of untiled output); a caller
  asks for them by passing the 4-tuple, or ``choose_tile(..., allow_blended=True)``.

Kernels are TAEHV's exact rewrites (row-window 3x3 GEMMs, sub-pixel conv for upsample + conv, by-taps
conv for the RGB head): a 3x3x3 causal conv is the sum of three 2-D 3x3 convs over the shifted frames,
accumulated in one buffer. fp32 on the CPU; on GPUs bf16/fp16 convs with RMS norms in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn

from ..ops import native_conv3x3
from .segmented import depth_first, stream_chunks
from .taehv import _conv_by_taps, conv3x3, upconv_forward

WEIGHTS_NAME = "vae.safetensors"
CACHE_T = 2  # frames of each causal conv's input kept for the next call

WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@dataclass
class WanVAEConfig:
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])  # (sic: diffusers' name)
    latents_mean: list[float] = field(default_factory=lambda: list(WAN21_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(WAN21_STD))
    in_channels: int = 3
    out_channels: int = 3
    has_encoder: bool = True
    model_type: str = "wan-vae"

    def __post_init__(self):
        self.dim_mult = [int(m) for m in self.dim_mult]
        self.temperal_downsample = [bool(v) for v in self.temperal_downsample]
        self.latents_mean = [float(v) for v in self.latents_mean]
        self.latents_std = [float(v) for v in self.latents_std]
        if self.decoder_base_dim is None:
            self.decoder_base_dim = self.base_dim
        if len(self.dim_mult) < 2 or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult needs >= 2 positive multipliers, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries, "
                             f"got {self.temperal_downsample}")
        for name in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        dims = self.decoder_widths
        if min(dims[1:-1], default=2) < 2:  # each upsample's conv halves the width of the block after it
            raise ValueError(f"decoder_base_dim x dim_mult must be >= 2 below the top level (each upsample halves "
                             f"it), got widths {dims}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if min(abs(s) for s in self.latents_std) == 0:
            raise ValueError("latents_std has a zero entry")

    @property
    def decoder_widths(self) -> list[int]:
        """The decoder's widths: the mid block's, then each up block's output, top level last."""
        return [self.decoder_base_dim * m for m in [self.dim_mult[-1]] + self.dim_mult[::-1]]

    @property
    def temperal_upsample(self) -> list[bool]:
        return self.temperal_downsample[::-1]

    @property
    def t_scale(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def space_scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def num_frames(self, latent_frames: int) -> int:
        """Decoded frames for ``latent_frames`` latents: 1 + 4(T - 1) (21 -> 81)."""
        return 0 if latent_frames < 1 else 1 + self.t_scale * (latent_frames - 1)


# --------------------------------------------------------------------------------------------------
# Layers (parameter holders; the executor below runs them over [B, T, H, W, C])
# --------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """``WanCausalConv3d``: weight ``[O, kt, kh, kw, I]``; time padding ``kt - 1`` frames in front (the
    cache), spatial padding ``kh // 2``; ``stride`` only along time (the encoder's temporal downsample)."""

    def __init__(self, n_in: int, n_out: int, kernel=(3, 3, 3), stride: int = 1):
        super().__init__()
        kt, kh, kw = kernel
        scale = 1.0 / math.sqrt(n_in * kt * kh * kw)
        self.weight = mx.random.uniform(-scale, scale, (n_out, kt, kh, kw, n_in))
        self.bias = mx.zeros((n_out,))
        self.stride = stride


class Conv2d(nn.Module):
    """Per-frame ``nn.Conv2d``, weight ``[O, kh, kw, I]``."""

    def __init__(self, n_in: int, n_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        scale = 1.0 / math.sqrt(n_in * kernel * kernel)
        self.weight = mx.random.uniform(-scale, scale, (n_out, kernel, kernel, n_in))
        self.bias = mx.zeros((n_out,))
        self.kernel, self.stride = kernel, stride


class RMSNorm(nn.Module):
    """``WanRMS_norm``: ``x / max(||x||, 1e-12) * sqrt(C) * gamma`` over channels (== rms_norm(x) * gamma)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))


class ResidualBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.norm1 = RMSNorm(n_in)
        self.conv1 = CausalConv3d(n_in, n_out)
        self.norm2 = RMSNorm(n_out)
        self.conv2 = CausalConv3d(n_out, n_out)
        if n_in != n_out:
            self.conv_shortcut = CausalConv3d(n_in, n_out, kernel=(1, 1, 1))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (1x1 conv q/k/v and projection)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = Conv2d(dim, 3 * dim, kernel=1)
        self.proj = Conv2d(dim, dim, kernel=1)


class _Nothing(nn.Module):
    """Parameterless placeholder keeping diffusers' ``resample.1`` index (``resample.0`` is the upsample/pad)."""


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = [_Nothing(), Conv2d(dim, out_dim or dim // 2)]
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, 2 * dim, kernel=(3, 1, 1))
        else:
            self.resample = [_Nothing(), Conv2d(dim, dim, stride=2)]
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, kernel=(3, 1, 1), stride=2)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attentions = [AttentionBlock(dim)]


class UpBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, num_res_blocks: int, mode: str | None):
        super().__init__()
        self.resnets = [ResidualBlock(n_in if j == 0 else n_out, n_out) for j in range(num_res_blocks + 1)]
        if mode is not None:
            self.upsamplers = [Resample(n_out, mode)]


class Decoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = c.decoder_widths
        self.conv_in = CausalConv3d(c.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        ups = []
        n = len(c.dim_mult)
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                n_in //= 2  # the previous upsample's conv halves the width (Wan 2.1)
            mode = None if i == n - 1 else ("upsample3d" if c.temperal_upsample[i] else "upsample2d")
            ups.append(UpBlock(n_in, n_out, c.num_res_blocks, mode))
        self.up_blocks = ups
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], c.out_channels)


class Encoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.base_dim * u for u in [1] + c.dim_mult]
        self.conv_in = CausalConv3d(c.in_channels, dims[0])
        blocks: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(c.num_res_blocks):
                blocks.append(ResidualBlock(n_in, n_out))
                n_in = n_out
            if i != len(c.dim_mult) - 1:
                blocks.append(Resample(n_out, "downsample3d" if c.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = blocks
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim)


class WanVAE(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        z = config.z_dim
        if config.has_encoder:
            self.encoder = Encoder(config)
            self.quant_conv = CausalConv3d(2 * z, 2 * z, kernel=(1, 1, 1))
        self.post_quant_conv = CausalConv3d(z, z, kernel=(1, 1, 1))
        self.decoder = Decoder(config)

    def decode(self, latents: mx.array, tile=None) -> mx.array:  # noqa: D102 - see decode()
        return decode(self, latents, tile)

    def encode(self, frames: mx.array) -> mx.array:
        return encode(self, frames)


# --------------------------------------------------------------------------------------------------
# Kernels over [B, T, H, W, C]. ``state`` maps a conv's key to its cache (its last CACHE_T input frames).
# Every op evaluates its result, so only one op's temporaries are alive at a time (the memory bound).
# --------------------------------------------------------------------------------------------------


def _frames(x: mx.array) -> mx.array:
    b, t = x.shape[:2]
    return x.reshape(b * t, *x.shape[2:])


def rms_norm_silu(norm: RMSNorm, x: mx.array, silu: bool = True) -> mx.array:
    """RMS norm in fp32 (the statistic and gamma), cast back to the compute dtype, then SiLU. On the CPU in
    fp32 one threaded NumPy pass per row block (MLX's CPU elementwise kernels are single-threaded)."""
    if x.dtype == mx.float32 and mx.default_device() == mx.cpu and x.size >= 2**16:
        return _rms_norm_silu_cpu(norm.gamma.astype(mx.float32), x, silu)
    y = mx.fast.rms_norm(x.astype(mx.float32), norm.gamma.astype(mx.float32), 1e-24).astype(x.dtype)
    return nn.silu(y) if silu else y


def _rms_norm_silu_cpu(gamma: mx.array, x: mx.array, silu: bool) -> mx.array:
    import numpy as np

    from ..ops import _rows_parallel

    out = mx.zeros(x.shape, mx.float32)
    x = mx.contiguous(x)
    mx.eval(out, x, gamma)
    src, dst, g = np.asarray(x), np.asarray(out), np.asarray(gamma)
    c = src.shape[-1]

    def rows(s, d):
        for a in range(0, s.shape[0], 256):  # cache-sized blocks
            sb, db = s[a:a + 256], d[a:a + 256]
            r = 1.0 / np.sqrt(np.einsum("ij,ij->i", sb, sb) / c + 1e-24)
            np.multiply(sb, r[:, None], out=db)
            db *= g
            if silu:
                with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0: silu(x) = x / inf = -0, as it should
                    e = np.exp(-db)
                e += 1.0
                db /= e

    _rows_parallel(rows, src.reshape(-1, c), dst.reshape(-1, c))
    return out


def _spatial_terms(terms: list[tuple[mx.array, mx.array]], bias: mx.array | None = None) -> mx.array:
    """``sum_i conv2d(x_i, w_i) + bias`` (stride 1, 'same' zero padding) for ``x_i [N, H, W, C]``."""
    o, k, _, c = terms[0][1].shape
    if k == 3:  # the threaded native CPU kernel (fp32): one pass over all terms, no im2col buffer
        w = terms[0][1] if len(terms) == 1 else mx.concatenate([w for _, w in terms], axis=-1)
        try:
            y = native_conv3x3([x for x, _ in terms], w, bias)
        except TypeError:  # another native signature: the MLX path below
            y = None
        if y is not None:
            return y
    if k == 1:
        y = None
        for x, w in terms:
            z = x @ w.reshape(o, c).T
            y = z if y is None else y + z
    elif 4 * o <= c:  # few output channels (the RGB head): by taps
        y = None
        for x, w in terms:
            z = _conv_by_taps(x, w)
            y = z if y is None else y + z
    else:
        y = conv3x3(terms, sync=True)
    return y if bias is None else y + bias


def causal_conv(layer: CausalConv3d, x: mx.array, state: dict, key: str) -> mx.array:
    """``WanCausalConv3d`` on ``x [B, T, H, W, C]`` with the feature cache ``state[key]`` (a tuple of the
    previous ``CACHE_T`` input frames ``[B, 1, H, W, C]``, oldest first; absent at the start of the video:
    zero frames); updates the cache. Equal to running it on the whole video at once. The cache holds
    references to input frames (no copies), and a tap that sees only zero frames does no work."""
    b, t, h, w, _ = x.shape
    weight = layer.weight
    kt = weight.shape[1]
    if kt == 1:
        y = _spatial_terms([(_frames(x), weight[:, 0])], layer.bias)
        return y.reshape(b, t, *y.shape[1:])
    prev = state.pop(key, ())
    history = list(prev) + [x[:, i:i + 1] for i in range(t)]
    state[key] = tuple(history[-CACHE_T:])
    pad = (kt - 1) - len(prev)  # zero frames in front of ``history``
    terms = []
    for j in range(kt):
        start = j - pad  # index in ``history`` of the frame tap j sees for output frame 0
        if start + t <= 0:
            continue  # this tap sees only zero frames
        if t == 1:
            frames = history[start]
        else:
            zeros = [mx.zeros((b, -start, h, w, x.shape[-1]), x.dtype)] if start < 0 else []
            frames = mx.concatenate(zeros + history[max(0, start):start + t], axis=1)
        terms.append((_frames(frames), weight[:, j]))
    y = _spatial_terms(terms, layer.bias)
    mx.eval(y)
    return y.reshape(b, t, *y.shape[1:])


def residual_block(block: ResidualBlock, x: mx.array, state: dict, key: str) -> mx.array:
    skip = causal_conv(block.conv_shortcut, x, state, key + ".s") if "conv_shortcut" in block else x
    h = rms_norm_silu(block.norm1, x)
    h = causal_conv(block.conv1, h, state, key + ".1")
    h = rms_norm_silu(block.norm2, h)
    h = causal_conv(block.conv2, h, state, key + ".2")
    y = h + skip
    mx.eval(y)
    return y


def attention_block(block: AttentionBlock, x: mx.array, budget_bytes: int | None = None) -> mx.array:
    """Single-head attention over each frame's pixels, scale 1/sqrt(C)."""
    from ..ops import DEFAULT_ATTENTION_BUDGET, attention

    b, t, h, w, c = x.shape
    n = b * t
    y = rms_norm_silu(block.norm, _frames(x), silu=False).reshape(n, h * w, c)
    qkv = y @ block.to_qkv.weight.reshape(3 * c, c).T + block.to_qkv.bias
    q, k, v = (qkv[:, None, :, i * c:(i + 1) * c] for i in range(3))
    o = attention(q, k, v, scale=c ** -0.5, budget_bytes=budget_bytes or DEFAULT_ATTENTION_BUDGET)
    o = o[:, 0] @ block.proj.weight.reshape(c, c).T + block.proj.bias
    out = x + o.reshape(b, t, h, w, c)
    mx.eval(out)
    return out


def _interleave_pairs(y: mx.array) -> mx.array:
    """``[B, T, H, W, 2C]`` -> ``[B, 2T, H, W, C]``: channel block k becomes frame 2t + k."""
    b, t, h, w, c2 = y.shape
    c = c2 // 2
    return y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)


def upsample(res: Resample, x: mx.array, state: dict, key: str) -> mx.array:
    """``upsample3d``: the first frame of the video passes through, every later frame becomes two (a causal
    (3,1,1) conv over frames 1.. to 2C channels); then per frame nearest x2 + 3x3 conv (sub-pixel form)."""
    if res.mode == "upsample3d":
        started = state.get(key + ".started", False)
        state[key + ".started"] = True
        if not started:
            first, rest = x[:, :1], x[:, 1:]
        else:
            first, rest = None, x
        parts = [] if first is None else [first]
        if rest.shape[1]:
            parts.append(_interleave_pairs(causal_conv(res.time_conv, rest, state, key)))
        x = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    b, t = x.shape[:2]
    y = upconv_forward(res.resample[1], _frames(x), sync=True)
    return y.reshape(b, t, *y.shape[1:])


def downsample(res: Resample, x: mx.array, state: dict, key: str) -> mx.array:
    """Zero pad right/bottom by 1, 3x3 conv stride 2; ``downsample3d`` then a stride-2 (3,1,1) time conv over
    [the previous call's last frame, x] (the first call passes its frames through)."""
    b, t = x.shape[:2]
    conv = res.resample[1]
    f = mx.pad(_frames(x), [(0, 0), (0, 1), (0, 1), (0, 0)])
    y = mx.conv2d(f, conv.weight, stride=conv.stride) + conv.bias
    x = y.reshape(b, t, *y.shape[1:])
    mx.eval(x)
    if res.mode != "downsample3d":
        return x
    prev = state.get(key)
    state[key] = x[:, -1:]
    if prev is None:
        return x
    full = mx.concatenate([prev, x], axis=1)
    tc = res.time_conv
    step = tc.stride
    n_out = (full.shape[1] - 3) // step + 1
    o, c = tc.weight.shape[0], tc.weight.shape[-1]
    y = None
    for j in range(3):
        frames = full[:, j:j + step * (n_out - 1) + 1:step]
        z = frames.reshape(-1, c) @ tc.weight[:, j].reshape(o, c).T
        y = z if y is None else y + z
    y = (y + tc.bias).reshape(b, n_out, *x.shape[2:4], o)
    mx.eval(y, state[key])
    return y


# --------------------------------------------------------------------------------------------------
# Decoder segments and the streaming executor
# --------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """Decoder ops from one up block's start to the next: ``ops`` are ``(kind, module, key)``."""

    ops: list
    scale: int  # spatial upsampling at the segment's end
    frames: int  # output frames per input frame (2 after a temporal upsample, once started)


def decoder_segments(model: WanVAE) -> list[Segment]:
    dec = model.decoder
    segs: list[Segment] = []
    ops: list = [("conv", dec.conv_in, "conv_in"), ("res", dec.mid_block.resnets[0], "mid.0"),
                 ("attn", dec.mid_block.attentions[0], "mid.a"), ("res", dec.mid_block.resnets[1], "mid.1")]
    for i, block in enumerate(dec.up_blocks):
        ops += [("res", r, f"up{i}.{j}") for j, r in enumerate(block.resnets)]
        last = i == len(dec.up_blocks) - 1
        if last:
            ops += [("head", dec, "head")]
        if "upsamplers" in block or last:
            up = block.upsamplers[0] if "upsamplers" in block else None
            if up is not None:
                ops.append(("up", up, f"up{i}.u"))
            segs.append(Segment(ops, 2 if up is not None else 1,
                                2 if up is not None and up.mode == "upsample3d" else 1))
            ops = []
    return segs


def run_ops(ops: list, x: mx.array, state: dict, attention_budget: int | None = None) -> mx.array:
    for kind, m, key in ops:
        if kind == "res":
            x = residual_block(m, x, state, key)
        elif kind == "conv":
            x = causal_conv(m, x, state, key)
        elif kind == "attn":
            x = attention_block(m, x, attention_budget)
        elif kind == "up":
            x = upsample(m, x, state, key)
        elif kind == "head":
            x = causal_conv(m.conv_out, rms_norm_silu(m.norm_out, x), state, key)
        else:
            raise AssertionError(kind)
    return x


def _check_latents(config: WanVAEConfig, latents) -> None:
    if not isinstance(latents, mx.array):
        raise TypeError(f"latents must be an mx.array, got {type(latents).__name__}")
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, T, H, W, {config.z_dim}] (channels-last), got shape "
                         f"{tuple(latents.shape)}")
    if latents.shape[-1] != config.z_dim:
        hint = " (channels-first? the runtime layout is [B, T, H, W, C])" if latents.shape[2] == config.z_dim else ""
        raise ValueError(f"latents have {latents.shape[-1]} channels, the Wan VAE expects {config.z_dim}{hint}; "
                         f"shape {tuple(latents.shape)}")
    if min(latents.shape) < 1:
        raise ValueError(f"latents have an empty dimension: {tuple(latents.shape)}")
    if not mx.issubdtype(latents.dtype, mx.floating):
        raise ValueError(f"latents must be floating point, got {latents.dtype}")


def _compute_dtype(model: WanVAE) -> mx.Dtype:
    return model.decoder.conv_in.weight.dtype


def _denormalize(model: WanVAE, latents: mx.array) -> mx.array:
    """DiT-space latents -> the VAE's z (``z*std + mean``), then ``post_quant_conv`` (fp32)."""
    c = model.config
    z = latents.astype(mx.float32) * mx.array(c.latents_std) + mx.array(c.latents_mean)
    w = model.post_quant_conv.weight.astype(mx.float32)
    z = z @ w.reshape(c.z_dim, c.z_dim).T + model.post_quant_conv.bias.astype(mx.float32)
    return z.astype(_compute_dtype(model))


def _to_unit(x: mx.array) -> mx.array:
    return mx.clip(x.astype(mx.float32), -1.0, 1.0) * 0.5 + 0.5


class DecoderStream:
    """Streaming decoder (whole frames): feed latent frames in order, get the frames they complete.

    ``step(latent [B, 1, H, W, C])`` returns that latent's frames ``[B, n, 8H, 8W, 3]`` in [0, 1] (n = 1 for
    the first latent, 4 after); ``frames(latent)`` yields them one ``[B, 1, 8H, 8W, 3]`` at a time as they
    finish; ``push(latents)`` takes any number of latent frames. Memory is independent of the length.
    (Spatial tiles decode tile by tile over the whole video: :func:`decode_tiled`, not a stream.)
    """

    def __init__(self, model: WanVAE, attention_budget: int | None = None):
        self.model, self.config = model, model.config
        self.segments = decoder_segments(model)
        self.attention_budget = attention_budget
        self.state: dict = {}
        self.shape: tuple | None = None

    def reset(self) -> None:
        self.state, self.shape = {}, None

    def push(self, latents: mx.array) -> mx.array:
        _check_latents(self.config, latents)
        outs = [self.step(latents[:, t:t + 1]) for t in range(latents.shape[1])]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def step(self, latent: mx.array) -> mx.array:
        groups = list(self.frames(latent))
        out = groups[0] if len(groups) == 1 else mx.concatenate(groups, axis=1)
        mx.eval(out)
        return out

    def frames(self, latent: mx.array) -> Iterator[mx.array]:
        for raw in self.raw_frames(latent):
            y = _to_unit(raw)
            mx.eval(y)
            yield y

    def raw_frames(self, latent: mx.array) -> Iterator[mx.array]:
        """The decoder's own output frames ``[B, 1, 8H, 8W, 3]`` (compute dtype, [-1, 1] before clamping)."""
        _check_latents(self.config, latent)
        b, t, h, w, _ = latent.shape
        if t != 1:
            raise ValueError(f"frames()/step() take one latent frame [B, 1, H, W, C], got {tuple(latent.shape)}; "
                             f"use push()")
        if self.shape is None:
            self.shape = (b, h, w)
        elif self.shape != (b, h, w):
            raise ValueError(f"latent batch/size changed mid-stream: {self.shape} then {(b, h, w)}; call reset()")
        yield from depth_first(self._segment, len(self.segments), _denormalize(self.model, latent))

    def _segment(self, k: int, x: mx.array) -> mx.array:
        return run_ops(self.segments[k].ops, x, self.state, self.attention_budget)


def decode_stream(model: WanVAE, latents: mx.array | Iterable[mx.array], tile=None, per_latent: bool = False,
                  attention_budget: int | None = None) -> Iterator[mx.array]:
    """Yield decoded frames ``[B, 8H, 8W, 3]`` in order as soon as each is ready (``per_latent=True``: one
    ``[B, n, 8H, 8W, 3]`` group per latent frame). ``latents``: ``[B, T, H, W, C]`` or an iterable of such
    chunks (e.g. DiT blocks as they are generated). ``tile`` (see :func:`tiling`): diffusers' tiled decode, which
    finishes every frame only after the last tile, so the frames then all come at the end."""
    def check(chunk):
        _check_latents(model.config, chunk)

    spec = tiling(tile, model.config)
    if spec is None:
        yield from stream_chunks(DecoderStream(model, attention_budget), latents, check, per_latent)
        return
    chunks = [latents] if isinstance(latents, mx.array) else list(latents)
    for chunk in chunks:
        check(chunk)
    whole = chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=1)
    video = decode_tiled(model, whole, spec, attention_budget)
    if per_latent:
        bounds = [0] + [model.config.num_frames(t + 1) for t in range(whole.shape[1])]
        for a, b in zip(bounds[:-1], bounds[1:]):
            yield video[:, a:b]
    else:
        for k in range(video.shape[1]):
            yield video[:, k]


def decode(model: WanVAE, latents: mx.array, tile=None, parallel: bool = False) -> mx.array:
    """Latents ``[B, T, H, W, 16]`` (DiT space) -> frames ``[B, 4T-3, 8H, 8W, 3]`` in [0, 1].

    Default: the streaming path (bounded memory), concatenated. ``tile``: :func:`decode_tiled`.
    ``parallel=True``: every layer runs on all frames at once (one pass, memory grows with T; the same
    function: the causal cache is exact).
    """
    _check_latents(model.config, latents)
    if tile is not None:
        if parallel:
            raise ValueError("tile= and parallel=True do not combine (tiles decode one latent frame at a time)")
        return decode_tiled(model, latents, tile)
    if not parallel:
        return mx.concatenate(list(decode_stream(model, latents, per_latent=True)), axis=1)
    state: dict = {}
    x = _denormalize(model, latents)
    for seg in decoder_segments(model):
        x = run_ops(seg.ops, x, state)
    return _to_unit(x)


# --------------------------------------------------------------------------------------------------
# Spatial tiling: diffusers' AutoencoderKLWan.tiled_decode
# --------------------------------------------------------------------------------------------------

MIN_TILE_LATENTS = 4  # the smallest blended tile the plan tries (32 pixels): smaller tiles blend more seams
MAX_TILE_WORK = 4.0  # exact tiles decode their halos too: the plan allows up to 4x the whole-frame work


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles in latent pixels. ``blend=False`` (exact): cores of at most ``height x width``, each decoded
    with a halo of the decoder's receptive radius and cropped back to its core. ``blend=True`` (diffusers'):
    tiles of ``height x width`` every ``stride_h`` / ``stride_w``, the overlaps blended linearly."""

    height: int
    width: int
    stride_h: int = 0
    stride_w: int = 0
    blend: bool = False


def tiling(tile, config: WanVAEConfig) -> Tiling | None:
    """``tile``: None (whole frames); an int, the exact tiles' core edge in output pixels; or diffusers' four
    ``enable_tiling`` settings ``(tile_h, tile_w, stride_h, stride_w)`` in output pixels (blended tiles; its
    default is ``(256, 256, 192, 192)``). Every figure a positive multiple of the spatial scale (8)."""
    if tile is None or isinstance(tile, Tiling):
        return tile
    s = config.space_scale
    if isinstance(tile, int) and not isinstance(tile, bool):
        values = (tile,)
    elif isinstance(tile, (list, tuple)) and len(tile) == 4:
        values = tuple(tile)
    else:
        values = None
    if values is None or any(isinstance(v, bool) or not isinstance(v, int) or v < s or v % s for v in values):
        raise ValueError(f"tile must be None, an exact tile's core edge in output pixels, or diffusers' (tile_h, "
                         f"tile_w, stride_h, stride_w) in output pixels, each a positive multiple of {s}; got {tile!r}")
    if len(values) == 1:
        return Tiling(values[0] // s, values[0] // s)
    th, tw, sh, sw = (v // s for v in values)
    if sh > th or sw > tw:
        raise ValueError(f"tile strides must not exceed the tile size (tiles must overlap or touch); got {tile!r}")
    return Tiling(th, tw, sh, sw, blend=True)


def _tile_grid(h: int, w: int, spec: Tiling) -> list[tuple[int, int, int, int]]:
    """Exact tiles' cores ``(y0, y1, x0, x1)`` covering ``h x w``, split evenly, edges at most the tile's."""
    ny, nx = -(-h // min(h, spec.height)), -(-w // min(w, spec.width))
    ys = [round(k * h / ny) for k in range(ny + 1)]
    xs = [round(k * w / nx) for k in range(nx + 1)]
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(ny) for j in range(nx)]


def _split_at_attention(model: WanVAE) -> tuple[list, list[Segment]]:
    """The decoder's ops up to the mid-block attention (the only op that sees the whole frame), and the
    segments after it (purely local: convs, RMS norms, upsamples)."""
    segs = decoder_segments(model)
    ops = segs[0].ops
    k = next(i for i, (kind, _, _) in enumerate(ops) if kind == "attn") + 1
    return ops[:k], [Segment(ops[k:], segs[0].scale, segs[0].frames)] + segs[1:]


def receptive_radius(segments: list[Segment]) -> int:
    """Latent pixels of context an output pixel of ``segments`` needs on each side: every 3x3 conv adds one
    pixel at its own resolution (the real decoder after the attention: 14.25, so 15)."""
    r, res = 0.0, 1
    for seg in segments:
        for kind, _, _ in seg.ops:
            if kind == "res":
                r += 2 / res  # conv1, conv2 (the shortcut is 1x1)
            elif kind in ("conv", "head"):
                r += 1 / res
            elif kind == "up":
                res *= 2
                r += 1 / res  # the 3x3 conv after the nearest x2
            else:
                raise AssertionError(kind)
    return math.ceil(r - 1e-9)


def _exact_crops(h: int, w: int, spec: Tiling, halo: int) -> list[tuple[tuple, tuple]]:
    """``(core, crop)`` boxes ``(y0, y1, x0, x1)`` of the exact tiles: the crop is the core plus ``halo``."""
    return [((y0, y1, x0, x1), (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)))
            for y0, y1, x0, x1 in _tile_grid(h, w, spec)]


def _decode_exact(model: WanVAE, latents: mx.array, spec: Tiling, attention_budget: int | None,
                  halo: int | None = None) -> mx.array:
    """Exact tiles. Pass 1 runs the decoder up to the mid-block attention on whole frames (latent resolution,
    small caches) and keeps its output for every latent frame; pass 2 runs the rest tile by tile over the
    whole video, each tile on its core plus a halo of the rest's receptive radius with its own feature caches
    (the decoder is a causal 3-D CNN: the caches hold past inputs, not state, so a tile's core sees exactly
    what it would in the whole frame), and keeps the core. Equal to whole frames up to fp32 rounding."""
    c = model.config
    b, t, h, w, _ = latents.shape
    s = c.space_scale
    prefix, rest = _split_at_attention(model)
    halo = receptive_radius(rest) if halo is None else halo
    state: dict = {}
    context = None
    for i in range(t):
        y = run_ops(prefix, _denormalize(model, latents[:, i:i + 1]), state, attention_budget)
        if context is None:
            context = mx.zeros((b, t, *y.shape[2:]), y.dtype)
        context[:, i:i + 1] = y
        del y
        mx.eval(context)
    del state
    out = mx.zeros((b, c.num_frames(t), h * s, w * s, c.out_channels), mx.float32)
    for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in _exact_crops(h, w, spec, halo):
        state, k = {}, 0
        core = (slice(None), slice(None), slice((y0 - cy0) * s, (y1 - cy0) * s), slice((x0 - cx0) * s, (x1 - cx0) * s))

        def segment(j, x, state=state):
            return run_ops(rest[j].ops, x, state, attention_budget)

        for i in range(t):
            for raw in depth_first(segment, len(rest), context[:, i:i + 1, cy0:cy1, cx0:cx1]):
                n = raw.shape[1]
                out[:, k:k + n, y0 * s:y1 * s, x0 * s:x1 * s] = _to_unit(raw[core])
                k += n
                del raw
                mx.eval(out)
        del state
    return out


def _blend(prev: mx.array, cur: mx.array, extent: int, axis: int) -> mx.array:
    """diffusers' ``blend_v`` (axis 2) / ``blend_h`` (axis 3) on ``[B, F, H, W, C]``, in place: the first ``e``
    rows of ``cur`` become ``prev[-e + y] * (1 - y/e) + cur[y] * (y/e)``; ``prev`` holds at least the last ``e``
    rows of the neighbouring tile (``e = min(extent, both lengths)``). Only those rows are computed and written
    back, so blending a tile costs its strip, not two copies of the tile."""
    import numpy as np

    e = min(extent, prev.shape[axis], cur.shape[axis])
    if e <= 0:
        return cur
    ramp = np.arange(e, dtype=np.float64) / e
    shape = [1] * cur.ndim
    shape[axis] = e
    keep = mx.array((1 - ramp).astype(np.float32)).reshape(shape)
    take = mx.array(ramp.astype(np.float32)).reshape(shape)
    n = prev.shape[axis]
    head = (slice(None),) * axis + (slice(0, e),)
    cur[head] = mx.take(prev, mx.arange(n - e, n), axis=axis) * keep + cur[head] * take
    mx.eval(cur)
    return cur


def _tail(x: mx.array, n: int, axis: int) -> mx.array:
    """The last ``n`` entries along ``axis``, copied (a view would keep the whole tile alive)."""
    n = min(n, x.shape[axis])
    y = mx.take(x, mx.arange(x.shape[axis] - n, x.shape[axis]), axis=axis)
    mx.eval(y)
    return y


def _decode_raw(model: WanVAE, latents: mx.array, attention_budget: int | None) -> mx.array:
    """Whole-frame streaming decode of ``latents``, unclamped, into one fp32 ``[B, F, 8H, 8W, 3]`` buffer."""
    c = model.config
    b, t, h, w, _ = latents.shape
    s = c.space_scale
    out = mx.zeros((b, c.num_frames(t), h * s, w * s, c.out_channels), mx.float32)
    stream, k = DecoderStream(model, attention_budget), 0
    for i in range(t):
        for raw in stream.raw_frames(latents[:, i:i + 1]):
            out[:, k:k + raw.shape[1]] = raw.astype(mx.float32)
            k += raw.shape[1]
            del raw
            mx.eval(out)
    return out


def _decode_blended(model: WanVAE, latents: mx.array, spec: Tiling, attention_budget: int | None) -> mx.array:
    """diffusers' ``AutoencoderKLWan.tiled_decode``: tiles start every stride (the last ones may be smaller),
    each decoded over all frames (the attention too sees only its tile), then blended with the tile above and
    the tile to the left (as diffusers has already blended them) and cropped to the stride. Only the strips a
    later tile blends with are kept beside the output video."""
    c = model.config
    b, t, h, w, _ = latents.shape
    s = c.space_scale
    blend_h, blend_w = (spec.height - spec.stride_h) * s, (spec.width - spec.stride_w) * s
    out = mx.zeros((b, c.num_frames(t), h * s, w * s, c.out_channels), mx.float32)
    above: dict[int, mx.array] = {}  # column start -> the bottom strip of the blended tile above
    for i in range(0, h, spec.stride_h):
        row: dict[int, mx.array] = {}
        left = None  # the right strip of the blended tile to the left
        for j in range(0, w, spec.stride_w):
            cur = _decode_raw(model, latents[:, :, i:i + spec.height, j:j + spec.width], attention_budget)
            if i > 0:
                cur = _blend(above[j], cur, blend_h, axis=2)
            if j > 0:
                cur = _blend(left, cur, blend_w, axis=3)
            ph, pw = min(spec.stride_h * s, cur.shape[2]), min(spec.stride_w * s, cur.shape[3])
            out[:, :, i * s:i * s + ph, j * s:j * s + pw] = _to_unit(cur[:, :, :ph, :pw])
            mx.eval(out)  # in place: out is held only here
            row[j] = _tail(cur, blend_h, 2) if blend_h else cur[:, :, :0]
            left = _tail(cur, blend_w, 3) if blend_w else cur[:, :, :, :0]
            del cur
        above = row
    return out


def decode_tiled(model: WanVAE, latents: mx.array, tile, attention_budget: int | None = None) -> mx.array:
    """Latents ``[B, T, H, W, 16]`` -> frames ``[B, 4T-3, 8H, 8W, 3]`` in [0, 1], tile by tile over the whole
    video (:func:`tiling`): exact tiles (an int) or diffusers' blended tiles (a 4-tuple). Frames that fit one
    tile decode whole (as diffusers does)."""
    c = model.config
    _check_latents(c, latents)
    spec = tiling(tile, c)
    h, w = latents.shape[2:4]
    if spec is None or (h <= spec.height and w <= spec.width):
        return decode(model, latents)
    if spec.blend:
        return _decode_blended(model, latents, spec, attention_budget)
    return _decode_exact(model, latents, spec, attention_budget)


# --------------------------------------------------------------------------------------------------
# Encoder (chunks of 1, then 4 frames through the causal cache, as Wan and diffusers do)
# --------------------------------------------------------------------------------------------------


def encode(model: WanVAE, frames: mx.array) -> mx.array:
    """Frames ``[B, F, H, W, 3]`` in [0, 1] (F = 4k + 1; H, W multiples of 8) -> normalized latents
    ``[B, 1 + (F-1)/4, H/8, W/8, 16]`` (the posterior mean, ``(mu - mean) / std``: the DiT's space)."""
    c = model.config
    if not c.has_encoder:
        raise ValueError("this Wan VAE was loaded without its encoder: load(folder, encoder=True)")
    if not isinstance(frames, mx.array) or frames.ndim != 5 or frames.shape[-1] != c.in_channels:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"frames must be [B, F, H, W, {c.in_channels}] (channels-last RGB in [0, 1]), got {shape}")
    b, f, h, w, _ = frames.shape
    s = c.space_scale
    if f < 1 or (f - 1) % c.t_scale or h % s or w % s or h == 0 or w == 0:
        raise ValueError(f"frames must be F = {c.t_scale}k+1 with H and W positive multiples of {s}; got F={f}, "
                         f"H={h}, W={w}")
    enc = model.encoder
    x = frames.astype(_compute_dtype(model)) * 2 - 1
    state: dict = {}
    outs = []
    chunks = [(0, 1)] + [(1 + c.t_scale * i, 1 + c.t_scale * (i + 1)) for i in range((f - 1) // c.t_scale)]
    for start, end in chunks:
        y = causal_conv(enc.conv_in, x[:, start:end], state, "conv_in")
        for i, block in enumerate(enc.down_blocks):
            if isinstance(block, ResidualBlock):
                y = residual_block(block, y, state, f"down{i}")
            else:
                y = downsample(block, y, state, f"down{i}")
        y = residual_block(enc.mid_block.resnets[0], y, state, "mid.0")
        y = attention_block(enc.mid_block.attentions[0], y)
        y = residual_block(enc.mid_block.resnets[1], y, state, "mid.1")
        y = causal_conv(enc.conv_out, rms_norm_silu(enc.norm_out, y), state, "head")
        outs.append(y)
    moments = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    z = c.z_dim
    qw = model.quant_conv.weight.astype(mx.float32)
    mu = (moments.astype(mx.float32) @ qw.reshape(2 * z, 2 * z)[:z].T) + model.quant_conv.bias[:z].astype(mx.float32)
    return (mu - mx.array(c.latents_mean)) / mx.array(c.latents_std)


# --------------------------------------------------------------------------------------------------
# Memory planning
# --------------------------------------------------------------------------------------------------


def _cache_elements(segments: list[Segment], b: int, h: int, w: int) -> list[int]:
    """Per segment: elements of its feature caches (CACHE_T frames of each 3-tap causal conv's input at the
    segment's input resolution ``h x w``, which grows by each segment's scale)."""
    out = []
    for seg in segments:
        n = 0
        for kind, m, _ in seg.ops:
            convs = {"res": lambda m: [m.conv1, m.conv2], "conv": lambda m: [m], "head": lambda m: [m.conv_out],
                     "up": lambda m: [m.time_conv] if "time_conv" in m else [], "attn": lambda m: []}[kind](m)
            n += sum(CACHE_T * b * h * w * cv.weight.shape[-1] for cv in convs)
        out.append(n)
        h, w = h * seg.scale, w * seg.scale
    return out


def _segment_work(model: WanVAE, seg: Segment, n: int, h: int, w: int) -> int:
    """Peak working elements of one segment on ``n`` frames of ``h x w`` (a tile crop): the widest op's
    input, output and kernel temporaries. A residual block holds its input, the skip, the normalized copy
    and a 3x3 conv's row-window buffer (3x its input) + GEMM output; an up conv its sub-pixel buffers."""
    peak = 0
    for kind, m, _ in seg.ops:
        if kind == "res":
            ci, co = m.conv1.weight.shape[-1], m.conv1.weight.shape[0]
            terms = 2  # a cached conv concatenates [cache, x] and slices its taps: ~2 extra inputs
            peak = max(peak, n * h * w * (2 * ci + co + (3 + terms) * max(ci, co) + 2 * co))
        elif kind == "attn":
            from ..ops import attention_peak_bytes

            c = m.norm.gamma.shape[0]
            peak = max(peak, n * h * w * 7 * c + attention_peak_bytes(n, 1, h * w, h * w) // 4)
        elif kind == "up":
            c = m.resample[1].weight.shape[-1]
            o = m.resample[1].weight.shape[0]
            t = 2 * n if "time_conv" in m else n
            peak = max(peak, n * h * w * 4 * c + t * h * w * (3 * c + 4 * o + 4 * 4 * o))
        elif kind in ("conv", "head"):
            cv = m if kind == "conv" else m.conv_out
            c, o = cv.weight.shape[-1], cv.weight.shape[0]
            extra = 9 * o * 2 if 4 * o <= c else 5 * c + o
            peak = max(peak, n * h * w * (3 * c + extra + o))
    return peak


def _weights(model: WanVAE) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for k, v in tree_flatten(model.parameters()) if not k.startswith(("encoder.", "quant_conv")))


def _stream_elements(model: WanVAE, segments: list[Segment], b: int, h: int, w: int) -> int:
    """Peak elements, weights excluded, of streaming ``segments`` over ``b x h x w`` inputs one frame at a time:
    every feature cache, one latent's output frames and the largest segment's working set."""
    c = model.config
    frames = b * c.t_scale * (h * c.space_scale) * (w * c.space_scale) * (c.out_channels + 3)  # one latent's output
    work, hh, ww = 0, h, w
    for seg in segments:
        work = max(work, _segment_work(model, seg, b, hh, ww))
        hh, ww = hh * seg.scale, ww * seg.scale
    return sum(_cache_elements(segments, b, h, w)) + frames + work


_SLACK = 6 * 2**20  # fixed costs the per-op model leaves out (measured up to 3.5 MB beyond it on an 8 x 8-latent tile)
_SHAPE_MODELS: dict = {}


def _shape_model(config: WanVAEConfig) -> WanVAE:
    """A model used only for its structure (its lazy random parameters are never evaluated)."""
    import dataclasses

    key = repr(config)
    if key not in _SHAPE_MODELS:
        _SHAPE_MODELS[key] = WanVAE(dataclasses.replace(config, has_encoder=False))
    return _SHAPE_MODELS[key]


def decoder_peak_bytes(config: WanVAEConfig, latent_shape: tuple, tile=None, itemsize: int = 4) -> int:
    """Predicted peak bytes (``mx.get_peak_memory``, weights included) of :func:`decode_stream` on latents
    ``(B, T, H, W, ...)``. Whole frames: weights + all feature caches + the largest segment's working set; T
    does not enter. With ``tile`` (:func:`tiling`) the caches and working set are one tile's (they scale with
    its area), plus the fp32 output video (tiles finish the frames together; it grows with T) and, exact
    tiles: the attention's output for every latent frame; blended tiles: the tile's own decoded video, the
    crop written out of it and the strips kept for blending. ``itemsize``: 4 for fp32 (the CPU), 2 for fp16/bf16."""
    model = _shape_model(config)
    b, t, h, w = (int(v) for v in latent_shape[:4])
    spec = tiling(tile, config)
    weights = _weights(model) * itemsize
    if spec is None or (h <= spec.height and w <= spec.width):
        return weights + _stream_elements(model, decoder_segments(model), b, h, w) * itemsize + _SLACK
    s, out_c = config.space_scale, config.out_channels
    per_pixel = b * config.num_frames(max(t, 1)) * out_c * 4  # fp32 bytes per output pixel of the video
    video = h * w * s * s * per_pixel
    if not spec.blend:
        prefix, rest = _split_at_attention(model)
        halo = receptive_radius(rest)
        context = b * max(t, 1) * h * w * prefix[-1][1].norm.gamma.shape[0] * itemsize
        first = _stream_elements(model, [Segment(prefix, 1, 1)], b, h, w) * itemsize  # pass 1, whole frames
        crops = [(y1 - y0, x1 - x0) for _, (y0, y1, x0, x1) in _exact_crops(h, w, spec, halo)]
        ch, cw = max(crops, key=lambda hw: hw[0] * hw[1])
        second = _stream_elements(model, rest, b, ch, cw) * itemsize + video  # pass 2, the largest crop
        return weights + context + max(first, second) + _SLACK
    th, tw = min(h, spec.height), min(w, spec.width)
    one_tile = th * tw * s * s * per_pixel
    strips = ((spec.height - spec.stride_h) * w + th * (spec.width - spec.stride_w)) * s * s * per_pixel
    # decoding a tile: its decoder state + its video buffer; blending (in place, strip by strip): the tile and
    # the clamped crop written into the output
    decoding = _stream_elements(model, decoder_segments(model), b, th, tw) * itemsize + one_tile
    return int(weights + video + strips + max(decoding, 2 * one_tile)) + _SLACK


def tile_work(config: WanVAEConfig, latent_shape: tuple, tile) -> float:
    """Decoder work of a tiling relative to whole frames (pixels decoded / frame pixels): exact tiles decode
    their halos again, blended tiles their overlaps."""
    h, w = int(latent_shape[2]), int(latent_shape[3])
    spec = tiling(tile, config)
    if spec is None or (h <= spec.height and w <= spec.width):
        return 1.0
    if spec.blend:
        area = sum((min(h, i + spec.height) - i) * (min(w, j + spec.width) - j)
                   for i in range(0, h, spec.stride_h) for j in range(0, w, spec.stride_w))
    else:
        halo = receptive_radius(_split_at_attention(_shape_model(config))[1])
        area = sum((y1 - y0) * (x1 - x0) for _, (y0, y1, x0, x1) in _exact_crops(h, w, spec, halo))
    return area / (h * w)


def _blended_tile(edge: int, scale: int) -> tuple[int, int, int, int]:
    """diffusers' tiling settings for square tiles of ``edge`` latent pixels overlapping by a quarter."""
    return (edge * scale, edge * scale, (edge - edge // 4) * scale, (edge - edge // 4) * scale)


def choose_tile(config: WanVAEConfig, latent_shape: tuple, budget_bytes: int, itemsize: int = 4,
                allow_blended: bool = False):
    """The tiling for :func:`decode_stream` within ``budget_bytes`` (as :func:`decoder_peak_bytes` predicts):
    None when whole frames fit; else exact tiles (an int core edge, output pixels), the largest that fits
    with at most ``MAX_TILE_WORK`` x the whole-frame work. Exact tiles equal whole frames, so what the plan
    picks is always within 1/255 of untiled output. Only with ``allow_blended`` (an explicit choice: it is
    inexact) diffusers' blended tiles (a 4-tuple; overlap a quarter of the tile) are tried next, the largest
    that fits, down to ``MIN_TILE_LATENTS``. ``MemoryError`` when none fits, with the figures of each."""
    whole = decoder_peak_bytes(config, latent_shape, None, itemsize)
    if whole <= budget_bytes:
        return None
    h, w = int(latent_shape[2]), int(latent_shape[3])
    s = config.space_scale
    smallest_exact = None  # the exact tile with the least memory within MAX_TILE_WORK
    for edge in range(max(h, w) - 1, 0, -1):
        if tile_work(config, latent_shape, edge * s) > MAX_TILE_WORK:
            break
        smallest_exact = edge * s
        if decoder_peak_bytes(config, latent_shape, edge * s, itemsize) <= budget_bytes:
            return edge * s
    smallest = _blended_tile(MIN_TILE_LATENTS, s)
    if allow_blended:
        for edge in range(max(h, w) - 1, MIN_TILE_LATENTS - 1, -1):
            blended = _blended_tile(edge, s)
            if decoder_peak_bytes(config, latent_shape, blended, itemsize) <= budget_bytes:
                return blended
    video = int(latent_shape[0]) * config.num_frames(int(latent_shape[1])) * h * w * s * s * config.out_channels * 4
    exact = ("" if smallest_exact is None else
             f", exact tiles within {MAX_TILE_WORK:g}x the work at least "
             f"{decoder_peak_bytes(config, latent_shape, smallest_exact, itemsize) / 2**20:.0f} MiB "
             f"({smallest_exact}-pixel tiles)")
    blended_peak = decoder_peak_bytes(config, latent_shape, smallest, itemsize) / 2**20
    hint = (f" and even {MIN_TILE_LATENTS * s}-pixel blended tiles {blended_peak:.0f} MiB" if allow_blended else
            f"; diffusers' blended tiles (inexact) would need {blended_peak:.0f} MiB at {MIN_TILE_LATENTS * s} "
            f"pixels: pass tile={smallest} to decode_stream, or decode with TAEHV (--decoder taehv)")
    raise MemoryError(f"Wan VAE decode of latents {tuple(latent_shape)} does not fit {budget_bytes / 2**20:.0f} MiB: "
                      f"whole frames need {whole / 2**20:.0f} MiB{exact}{hint} (the decoded video alone is "
                      f"{video / 2**20:.0f} MiB)")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

SECTION = "vae"


def load(folder, dtype: mx.Dtype | None = None, encoder: bool = False) -> WanVAE:
    """Load the Wan VAE of a model folder (its ``vae`` section); the encoder too with ``encoder=True``.

    ``dtype``: compute dtype (default fp32 on the CPU, bf16 on GPUs); RMS-norm gammas stay fp32.
    """
    import dataclasses

    from ..utils import (ModelFolderError, cast_floating, config_from_dict, config_section, default_compute_dtype,
                         load_weights_strict)

    folder = Path(folder)
    section = config_section(folder, SECTION)
    config = config_from_dict(WanVAEConfig, section)
    if encoder and not config.has_encoder:
        raise ModelFolderError(f"{folder}: the Wan VAE was converted from a checkpoint without encoder weights")
    path = folder / section.get("weights_file", WEIGHTS_NAME)
    if not path.exists():
        raise ModelFolderError(f"{path} is missing (the vae section of {folder / 'config.json'} names it)")
    weights = mx.load(str(path))
    if not encoder:
        config = dataclasses.replace(config, has_encoder=False)
        weights = {k: v for k, v in weights.items() if not k.startswith(("encoder.", "quant_conv."))}
    model = WanVAE(config)
    load_weights_strict(model, cast_floating(weights, dtype or default_compute_dtype(), keep_fp32=("gamma",)),
                        str(path))
    mx.eval(model.parameters())
    return model


def plan_decode(section: dict | None, latent_shape: tuple, limit_bytes: int, low_memory: bool = False,
                notes: list | None = None) -> tuple:
    """(tile, predicted peak bytes) for the pipeline's memory plan from a folder's ``vae`` section: whole frames
    when they fit the limit (the decoder runs after the DiT is released, and tiles cost time: overlapping
    crops are decoded twice), else the largest tiles that fit; in low-memory mode an eighth of the limit
    first. ``MemoryError`` when nothing fits. ``(None, None)`` without a section."""
    from ..utils import config_from_dict, on_gpu

    if not section:
        return None, None
    config = config_from_dict(WanVAEConfig, section)
    itemsize = 2 if on_gpu() else 4
    budget = max(64 * 2**20, limit_bytes // 8) if low_memory else limit_bytes
    try:
        tile = choose_tile(config, latent_shape, min(budget, limit_bytes), itemsize)
    except MemoryError:
        if budget >= limit_bytes:
            raise
        tile = choose_tile(config, latent_shape, limit_bytes, itemsize)  # may raise: the plan refuses the job
        if notes is not None:
            notes.append("Wan VAE decode given the whole limit (its low-memory share does not fit)")
    if tile is not None and notes is not None:
        notes.append(f"Wan VAE decoded in exact tiles of at most {tile} pixels (whole frames do not fit)")
    return tile, decoder_peak_bytes(config, latent_shape, tile, itemsize)
