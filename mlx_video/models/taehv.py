"""TAEHV (``taew2_1``): the tiny video autoencoder that decodes Wan 2.1 latents, exact MLX port.

Reference: ``shared/reference/models.md`` §4 ([TAE] ``taehv.py``). Parameters keep the checkpoint's
positional names (``decoder.{i}...``, ``encoder.{i}...``); convolution weights are channels-last
``[O, kh, kw, I]`` (``converters/taehv.py`` transposes them).

Layouts: latents ``[B, T, H, W, 16]`` in the Wan-normalized space the DiT emits (no mean/std applied);
frames ``[B, 4T - 3, 8H, 8W, 3]`` RGB in [0, 1]. Latent 0 gives frame 0 and latent i frames 4i-3..4i
(the first ``t_upscale - 1`` raw decoder frames are dropped, as in [TAE] ``decode_video``).

Three decode modes, all computing the same function:
- :func:`decode` (parallel): every frame at once, each MemBlock's ``past`` is its input shifted by one
  frame. Fastest for short clips; memory grows with the number of frames.
- :func:`decode_stream` / :class:`DecoderStream` (streaming): one latent frame at a time, carrying each
  MemBlock's previous input (its "memory"). The decoder is cut into segments at its upsamples (each
  TGrow moved in front of its upsample, which is exact); segments run depth first on one frame at a
  time and are evaluated convolution by convolution, and frames are yielded as soon as they exist.
  Peak memory does not depend on the number of frames: weights + MemBlock memory (~21 KB per latent
  pixel in fp32 for taew2_1: 128 MiB at 480x832) + one segment's working set.
- tiled streaming (``tile=``): each segment runs on overlapping spatial tiles whose halo equals the
  segment's receptive radius (at most ``1 + 3*depth`` 3x3 convs), and the tile cores are stitched
  together, so tiling is *exact* -- there is no blending and no approximation; tiled and untiled
  frames agree to fp32 rounding (bitwise equal in the tests). Tiles bound the working set; the MemBlock
  memory itself stays full-frame (it is the state of the stream), so memory still scales with the
  frame area, with a much smaller constant. :func:`decoder_peak_bytes` predicts the peak (measured
  within +2..+25%, conservative) and :func:`choose_tile` picks per-segment tiles for a budget.

Kernels (exact rewrites, results differ from PyTorch only by fp32 summation order, < 1e-6 here): 1x1
convs are matmuls; 3x3 convs are 3 GEMMs over a 3-pixel row-window buffer accumulated in place
(``addmm``), 3x less memory than MLX's im2col and faster at 64-128 channels; a 3x3 conv after a x2
nearest upsample is 4 sub-pixel 2x2 convs on the low-resolution input (2.25x fewer FLOPs, no upsampled
copy); the 64 -> 3 RGB conv is one matmul to 27 channels plus shifted sums; MemBlock's
``conv(cat[x, past])`` is ``conv(x) + conv(past)`` in one accumulator (no concatenation, and no work
for the zero past of the first frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn

from .. import native as native_kernels
from ..ops import native_conv3x3, native_upconv3x3
from .segmented import depth_first, stream_chunks

WEIGHTS_NAME = "decoder.safetensors"


@dataclass
class TAEHVConfig:
    latent_channels: int = 16
    image_channels: int = 3
    patch_size: int = 1  # pixel (un)shuffle at the ends; 1 for taew2_1
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 64])
    encoder_channels: int = 64
    depth: int = 3  # MemBlocks per stage
    decoder_time_upscale: list[bool] = field(default_factory=lambda: [False, True, True])
    decoder_space_upscale: list[bool] = field(default_factory=lambda: [True, True, True])
    encoder_time_downscale: list[bool] = field(default_factory=lambda: [True, True, False])
    has_encoder: bool = True
    model_type: str = "taehv"
    # Ranges checked when a config is read (utils.config_values), per list item; not a dataclass field.
    LIMITS = {"latent_channels": (1, 4096), "image_channels": (1, 64), "patch_size": (1, 64),
              "decoder_channels": (1, 16384), "encoder_channels": (1, 16384), "depth": (1, 64)}

    def __post_init__(self):
        self.decoder_channels = [int(c) for c in self.decoder_channels]
        self.decoder_time_upscale = [bool(v) for v in self.decoder_time_upscale]
        self.decoder_space_upscale = [bool(v) for v in self.decoder_space_upscale]
        self.encoder_time_downscale = [bool(v) for v in self.encoder_time_downscale]
        if len(self.decoder_channels) != 4:
            raise ValueError(f"decoder_channels needs 4 widths, got {self.decoder_channels}")
        for name in ("decoder_time_upscale", "decoder_space_upscale", "encoder_time_downscale"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 entries (one per stage), got {getattr(self, name)}")
        for name in ("latent_channels", "image_channels", "patch_size", "encoder_channels", "depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be positive, got {self.decoder_channels}")

    @property
    def t_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def frames_to_trim(self) -> int:
        return self.t_upscale - 1

    @property
    def t_downscale(self) -> int:
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def space_upscale(self) -> int:
        """Output pixels per latent pixel along H and W (8 for taew2_1)."""
        return 2 ** sum(self.decoder_space_upscale) * self.patch_size

    def num_frames(self, latent_frames: int) -> int:
        """Decoded frames for ``latent_frames`` latents: 4T - 3 (21 -> 81, 13 -> 49)."""
        return max(0, self.t_upscale * latent_frames - self.frames_to_trim)


def taew2_1() -> TAEHVConfig:
    return TAEHVConfig()


# --------------------------------------------------------------------------------------------------
# Layers. Activations inside a layer are [N, H, W, C]; the executor below handles the time axis.
# --------------------------------------------------------------------------------------------------


class Conv(nn.Module):
    """PyTorch ``Conv2d(n_in, n_out, k, padding=k//2)``, channels-last weight ``[O, k, k, I]``."""

    def __init__(self, n_in: int, n_out: int, kernel: int = 3, stride: int = 1, bias: bool = True):
        super().__init__()
        scale = 1.0 / math.sqrt(n_in * kernel * kernel)
        self.weight = mx.random.uniform(-scale, scale, (n_out, kernel, kernel, n_in))
        if bias:
            self.bias = mx.zeros((n_out,))
        self.kernel, self.stride = kernel, stride

    def __call__(self, x: mx.array) -> mx.array:
        return conv_forward(self, x)


class Clamp(nn.Module):
    """Soft clamp of the input latents to (-3, 3)."""

    def __call__(self, x):
        return mx.tanh(x / 3) * 3


class ReLU(nn.Module):
    def __call__(self, x):
        return nn.relu(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (a ``factor`` x ``factor`` repeat); factor 1 is the identity."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def __call__(self, x):
        return upsample_nearest(x, self.factor)


class MemBlock(nn.Module):
    """``relu(conv(cat[x, past]) + skip(x))``; ``past`` is this block's input at the previous frame."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = [Conv(2 * n_in, n_out), ReLU(), Conv(n_out, n_out), ReLU(), Conv(n_out, n_out)]
        if n_in != n_out:
            self.skip = Conv(n_in, n_out, kernel=1, bias=False)

    def __call__(self, x: mx.array, past: mx.array | None) -> mx.array:
        return memblock_forward(self, x, past)


# --------------------------------------------------------------------------------------------------
# Kernels. Exact rewrites of the PyTorch ops that are faster and leaner on MLX (results differ only by
# fp32 summation order). ``sync`` evaluates after each convolution so that only one convolution's
# temporaries are alive at a time (the streaming path's memory bound relies on it).
# --------------------------------------------------------------------------------------------------


def _sync(x: mx.array, sync: bool) -> mx.array:
    if sync:
        mx.eval(x)
    return x


def upsample_nearest(x: mx.array, f: int) -> mx.array:
    if f == 1:
        return x
    n, h, w, c = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (n, h, f, w, f, c)).reshape(n, h * f, w * f, c)


def conv_forward(layer: Conv, x: mx.array, sync: bool = False) -> mx.array:
    """``x [N, H, W, I]`` -> ``[N, H', W', O]``: 1x1 as a matmul; 3x3 stride 1 by row windows (or by taps
    when it has few output channels); anything else with ``mx.conv2d``."""
    w = layer.weight
    o, k, _, c = w.shape
    if k == 1:
        y = x @ w.reshape(o, c).T
    elif k == 3 and layer.stride == 1 and 4 * o <= c:
        y = _conv_by_taps(x, w)
    elif k == 3 and layer.stride == 1:
        bias = layer.bias if "bias" in layer else None
        if (y := native_conv3x3([x], w, bias)) is not None:  # bias added in the kernel
            return _sync(y, sync)
        y = conv3x3([(x, w)], sync)
    else:
        y = mx.conv2d(x, w, stride=layer.stride, padding=k // 2)
    if "bias" in layer:
        y = y + layer.bias
    return _sync(y, sync)


def _row_windows(x: mx.array, k: int) -> tuple[mx.array, int, int]:
    """Zero-pad ``x [N, H, W, C]`` (1 row on top, 2 below, 1 column each side), stack the images and
    flatten their pixels, and return ``[pixels, k*C]`` whose row p holds k consecutive pixels starting at
    flat pixel p, the padded row length W+2, and the number of output rows. A 3x3 conv is then 3 plain
    2-D GEMMs over row offsets 0, W+2 and 2(W+2) of this one buffer (3x the input, where im2col needs
    9x), accumulated in place by BLAS (``addmm``); the junk rows and columns are dropped at the end."""
    n, h, wd, c = x.shape
    w2 = wd + 2
    xp = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)])
    total = n * (h + 3) * w2
    rows = (n - 1) * (h + 3) * w2 + h * w2  # up to the last output pixel of the last image
    return mx.contiguous(mx.as_strided(xp, (total - (k - 1), k * c), (c, 1))), w2, rows


def _unflatten_rows(y: mx.array, n: int, h: int, wd: int, w2: int) -> mx.array:
    """GEMM output rows (flat padded pixels) -> ``[N, H, W, O]``."""
    o = y.shape[-1]
    if n == 1:
        return y.reshape(1, h, w2, o)[:, :, :wd]
    y = mx.pad(y, [(0, 3 * w2), (0, 0)])
    return y.reshape(n, h + 3, w2, o)[:, :h, :wd]


def conv3x3(terms: list[tuple[mx.array, mx.array]], sync: bool = False) -> mx.array:
    """``sum_i conv3x3(x_i, w_i)`` (padding 1, no bias) for ``x_i [N, H, W, C_i]``, ``w_i [O, 3, 3, C_i]``."""
    y = None
    for x, w in terms:
        n, h, wd, c = x.shape
        a, w2, m = _row_windows(x, 3)
        wt = w.transpose(1, 2, 3, 0).reshape(3, 3 * c, w.shape[0])
        for i in range(3):
            rows = a[i * w2:i * w2 + m]
            y = rows @ wt[i] if y is None else mx.addmm(y, rows, wt[i])
        if sync:
            mx.eval(y)
        del a
    return _unflatten_rows(y, n, h, wd, w2)


def _conv_by_taps(x: mx.array, w: mx.array) -> mx.array:
    """A k x k conv with few output channels (the 64 -> 3 RGB conv): one matmul to k*k*O channels, then
    the k*k shifted O-channel slices are summed (an im2col conv would run a 3-column GEMM on a 9x-input
    buffer: ~9x slower and ~10x the memory here)."""
    n, h, wd, c = x.shape
    o, k = w.shape[0], w.shape[1]
    p = k // 2
    z = (x.reshape(-1, c) @ w.transpose(3, 1, 2, 0).reshape(c, k * k * o)).reshape(n, h, wd, k * k * o)
    z = mx.pad(z, [(0, 0), (p, p), (p, p), (0, 0)])
    y = None
    for i in range(k):
        for j in range(k):
            tap = z[:, i:i + h, j:j + wd, (i * k + j) * o:(i * k + j + 1) * o]
            y = tap if y is None else y + tap
    return y


def _fold_taps(w: mx.array, axis: int, phase: int) -> mx.array:
    """3 taps along ``axis`` of a kernel applied after a x2 nearest upsample -> the 2 low-res taps of output
    phase ``phase``: phase 0 sees low-res (i-1, i) with (w0, w1 + w2); phase 1 sees (i, i+1) with (w0 + w1, w2)."""
    t0, t1, t2 = (mx.take(w, mx.array([j]), axis=axis) for j in range(3))
    return mx.concatenate([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], axis=axis)


def upconv_forward(layer: Conv, x: mx.array, sync: bool = False) -> mx.array:
    """``conv3x3(upsample_nearest(x, 2))`` without materialising the upsampled input: output phase (a, b)
    is a 2x2 conv of ``x`` (2.25x fewer FLOPs), as 2 GEMMs over one 2-pixel row-window buffer (2x the
    low-resolution input), written in place into the interleaved output."""
    w = layer.weight
    bias = layer.bias if "bias" in layer else None
    if (y := native_upconv3x3(x, w, bias)) is not None:
        return _sync(y, sync)
    o = w.shape[0]
    n, h, wd, c = x.shape
    win, w2, m = _row_windows(x, 2)
    out = mx.zeros((n, h, 2, wd, 2, o), dtype=x.dtype)
    for a in range(2):
        wa = _fold_taps(w, 1, a)
        for b in range(2):
            wt = _fold_taps(wa, 2, b).transpose(1, 2, 3, 0).reshape(2, 2 * c, o)
            y = None
            for di in range(2):
                off = (a + di) * w2 + b
                rows = win[off:off + m]
                y = rows @ wt[di] if y is None else mx.addmm(y, rows, wt[di])
            y = _unflatten_rows(y, n, h, wd, w2)
            out[:, :, a, :, b] = y + layer.bias if "bias" in layer else y
            if sync:
                mx.eval(out)
    return out.reshape(n, 2 * h, 2 * wd, o)


def memblock_forward(block: MemBlock, x: mx.array, past: mx.array | None, sync: bool = False) -> mx.array:
    """``past=None`` means zeros (the first frame). ``conv(cat[x, past])`` is computed as
    ``conv_x(x) + conv_p(past)`` accumulated in one buffer: no concatenation, and no work for a zero past."""
    c = x.shape[-1]
    c0 = block.conv[0]
    terms = [(x, c0.weight[..., :c])] + ([] if past is None else [(past, c0.weight[..., c:])])
    h = native_conv3x3([x] if past is None else [x, past], c0.weight, c0.bias, relu=True)
    h = _sync(h, sync) if h is not None else nn.relu(conv3x3(terms, sync) + c0.bias)
    c2 = block.conv[2]
    h2 = native_conv3x3([h], c2.weight, c2.bias, relu=True) if c2.weight.shape[1] == 3 else None
    h = _sync(h2, sync) if h2 is not None else nn.relu(conv_forward(c2, h, sync))
    h = conv_forward(block.conv[4], h, sync)
    skip = conv_forward(block.skip, x) if "skip" in block else x
    return _sync(nn.relu(h + skip), sync)


class TPool(nn.Module):
    """Stack ``stride`` consecutive frames along channels (frame-major), then a 1x1 conv to ``n_f``."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = Conv(n_f * stride, n_f, kernel=1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:  # [B, T, H, W, C] -> [B, T/stride, H, W, C]
        b, t, h, w, c = x.shape
        s = self.stride
        if s > 1:
            x = x.reshape(b, t // s, s, h, w, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, t // s, h, w, s * c)
        return self.conv(x)


class TGrow(nn.Module):
    """A 1x1 conv to ``stride * n_f`` channels; channel block k becomes output frame k."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = Conv(n_f, n_f * stride, kernel=1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:  # [B, T, H, W, C] -> [B, T*stride, H, W, C]
        b, t, h, w, c = x.shape
        y = self.conv(x)
        if self.stride == 1:
            return y
        s = self.stride
        return y.reshape(b, t, h, w, s, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, t * s, h, w, c)


class TAEHV(nn.Module):
    """``encoder`` and ``decoder`` are lists indexed exactly like the PyTorch ``nn.Sequential``s."""

    def __init__(self, config: TAEHVConfig):
        super().__init__()
        self.config = config
        c = config
        io = c.image_channels * c.patch_size**2
        n_f = c.decoder_channels
        dec: list[nn.Module] = [Clamp(), Conv(c.latent_channels, n_f[0]), ReLU()]
        for k in range(3):
            dec += [MemBlock(n_f[k], n_f[k]) for _ in range(c.depth)]
            dec += [Upsample(2 if c.decoder_space_upscale[k] else 1),
                    TGrow(n_f[k], 2 if c.decoder_time_upscale[k] else 1), Conv(n_f[k], n_f[k + 1], bias=False)]
        dec += [ReLU(), Conv(n_f[3], io)]
        self.decoder = dec
        if c.has_encoder:
            e = c.encoder_channels
            enc: list[nn.Module] = [Conv(io, e), ReLU()]
            for down in c.encoder_time_downscale:
                enc += [TPool(e, 2 if down else 1), Conv(e, e, stride=2, bias=False)]
                enc += [MemBlock(e, e) for _ in range(c.depth)]
            enc.append(Conv(e, c.latent_channels))
            self.encoder = enc

    def decode(self, latents: mx.array, tile=None) -> mx.array:  # noqa: D102 - see decode()
        return decode(self, latents, tile)

    def encode(self, frames: mx.array) -> mx.array:
        return encode(self, frames)


# --------------------------------------------------------------------------------------------------
# Executor: layers over [B, T, H, W, C] with MemBlock memory, and the decoder's segments
# --------------------------------------------------------------------------------------------------


def plan(layers: list[tuple[int, nn.Module]]) -> list[tuple[int, str, nn.Module]]:
    """``(index, layer)`` pairs -> ``(index, op, layer)`` ops, with two exact rewrites: a TGrow (1x1 conv)
    after a nearest Upsample moves in front of it (4x fewer pixels), and a x2 Upsample followed by a 3x3
    conv becomes one ``upconv`` (sub-pixel conv, see :func:`upconv_forward`)."""
    layers = _tgrow_first(layers)
    ops, k = [], 0
    while k < len(layers):
        i, layer = layers[k]
        nxt = layers[k + 1][1] if k + 1 < len(layers) else None
        if isinstance(layer, Upsample):
            if layer.factor == 2 and isinstance(nxt, Conv) and nxt.kernel == 3 and nxt.stride == 1:
                ops.append((layers[k + 1][0], "upconv", nxt))
                k += 2
                continue
            if layer.factor != 1:
                ops.append((i, "up", layer))
        elif isinstance(layer, MemBlock):
            ops.append((i, "mem", layer))
        elif isinstance(layer, (TGrow, TPool)):
            ops.append((i, "time", layer))
        elif isinstance(layer, Conv):
            ops.append((i, "conv", layer))
        else:
            ops.append((i, "act", layer))
        k += 1
    return ops


def _tgrow_first(layers: list[tuple[int, nn.Module]]) -> list[tuple[int, nn.Module]]:
    layers = list(layers)
    for k in range(len(layers) - 1):
        if isinstance(layers[k][1], Upsample) and isinstance(layers[k + 1][1], TGrow):
            layers[k], layers[k + 1] = layers[k + 1], layers[k]
    return layers


def run_ops(ops: list[tuple[int, str, nn.Module]], x: mx.array, memory: dict,
            sync: bool = False) -> tuple[mx.array, dict]:
    """Apply ops to ``x [B, T, H, W, C]``, all T frames at once.

    ``memory[i]`` is MemBlock i's input at the frame before ``x[:, 0]`` (``None``/absent: zeros, the
    start of a video); entries are removed from ``memory`` as they are used (freeing them early).
    Returns the output and each MemBlock's input at the last frame (the memory for the next call), so
    calling this frame by frame or on all frames gives the same result.
    """
    new_memory = {}
    for i, op, layer in ops:
        b, t = x.shape[:2]
        if op == "time":
            x = layer(x)
            continue
        flat = x.reshape(b * t, *x.shape[2:])
        if op == "mem":
            prev = memory.pop(i, None)
            new_memory[i] = x[:, -1]
            if t == 1:
                past = prev
            else:
                first = mx.zeros_like(x[:, :1]) if prev is None else prev[:, None]
                past = mx.concatenate([first, x[:, :-1]], axis=1).reshape(flat.shape)
            y = memblock_forward(layer, flat, past, sync)
        elif op == "conv":
            y = conv_forward(layer, flat, sync)
        elif op == "upconv":
            y = upconv_forward(layer, flat, sync)
        else:
            y = layer(flat)
        x = y.reshape(b, t, *y.shape[1:])
    return x, new_memory


@dataclass
class Segment:
    """A run of decoder ops between upsamples, with what tiling needs to know about it."""

    ops: list[tuple[int, str, nn.Module]]
    scale: int  # output pixels per input pixel (the segment's upsample factor)
    halo: int  # input pixels of context a tile needs on each side for an exact core
    frames: int  # output frames per input frame (the TGrow stride at the segment's end)
    mem_scale: dict[int, int]  # MemBlock index -> its resolution relative to the segment input


def decoder_segments(model: TAEHV) -> list[Segment]:
    """Cut the decoder before every Upsample, after moving each TGrow in front of its Upsample (so a
    segment ends with its TGrow at low resolution and the next one can take its frames one at a time)."""
    groups: list[list[tuple[int, nn.Module]]] = [[]]
    for i, layer in _tgrow_first(list(enumerate(model.decoder))):
        if isinstance(layer, Upsample) and groups[-1]:
            groups.append([])
        groups[-1].append((i, layer))
    segments = []
    for layers in groups:
        scale, frames, mem_scale = 1, 1, {}
        for i, layer in layers:
            if isinstance(layer, Upsample):
                scale *= layer.factor
            elif isinstance(layer, TGrow):
                frames *= layer.stride
            elif isinstance(layer, MemBlock):
                mem_scale[i] = scale
        radius = 0  # receptive radius, walked backwards from the output, in pixels at the current resolution
        for _, layer in reversed(layers):
            if isinstance(layer, Conv) and layer.kernel > 1:
                radius += layer.kernel // 2
            elif isinstance(layer, MemBlock):
                radius += sum(cv.kernel // 2 for cv in layer.conv if isinstance(cv, Conv))
            elif isinstance(layer, Upsample):
                radius = -(-radius // layer.factor)
        segments.append(Segment(plan(layers), scale, radius, frames, mem_scale))
    return segments


def _check_latents(config: TAEHVConfig, latents: mx.array) -> None:
    if not isinstance(latents, mx.array):
        raise TypeError(f"latents must be an mx.array, got {type(latents).__name__}")
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, T, H, W, {config.latent_channels}] (channels-last), got shape "
                         f"{tuple(latents.shape)}")
    if latents.shape[-1] != config.latent_channels:
        channels_first = latents.shape[2] == config.latent_channels
        hint = " (channels-first? the runtime layout is [B, T, H, W, C])" if channels_first else ""
        raise ValueError(f"latents have {latents.shape[-1]} channels, the decoder expects "
                         f"{config.latent_channels}{hint}; shape {tuple(latents.shape)}")
    if min(latents.shape) < 1:
        raise ValueError(f"latents have an empty dimension: {tuple(latents.shape)}")
    if not mx.issubdtype(latents.dtype, mx.floating):
        raise ValueError(f"latents must be floating point, got {latents.dtype}")


def tile_steps(tile, segments: list[Segment]) -> list[int | None]:
    """Normalise ``tile`` to one step per segment, in pixels of the segment's *input* (None: whole frame).

    ``tile`` is None (no tiling), an int (the same tile edge, in pixels at each segment's output
    resolution, for every segment) or a sequence with one such edge or None per segment (what
    :func:`choose_tile` returns).
    """
    def bad():
        return ValueError(f"tile must be None, a positive int (tile edge in pixels at each segment's output "
                          f"resolution) or a sequence of {len(segments)} such ints/None (one per decoder "
                          f"segment), got {tile!r}")

    if tile is None:
        return [None] * len(segments)
    if isinstance(tile, int) and not isinstance(tile, bool):
        tiles = [int(tile)] * len(segments)
    elif isinstance(tile, (list, tuple)) and len(tile) == len(segments):
        tiles = list(tile)
    else:
        raise bad()
    steps = []
    for t, seg in zip(tiles, segments):
        if t is None:
            steps.append(None)
        elif isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise bad()
        else:
            steps.append(max(1, t // seg.scale))
    return steps


def tile_grid(h: int, w: int, step: int | None) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` tile cores covering ``h x w`` with edges at most ``step``, split evenly."""
    if step is None or (step >= h and step >= w):
        return [(0, h, 0, w)]
    ny, nx = -(-h // step), -(-w // step)
    ys = [round(k * h / ny) for k in range(ny + 1)]
    xs = [round(k * w / nx) for k in range(nx + 1)]
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(ny) for j in range(nx)]


def _finish(config: TAEHVConfig, x: mx.array) -> mx.array:
    """Raw decoder output -> RGB in [0, 1] (pixel shuffle when patch_size > 1)."""
    x = mx.clip(x, 0.0, 1.0)
    p = config.patch_size
    if p > 1:
        b, t, h, w, c = x.shape
        x = x.reshape(b, t, h, w, c // (p * p), p, p).transpose(0, 1, 2, 5, 3, 6, 4).reshape(b, t, h * p, w * p, -1)
    return x


def _weights_dtype(model: TAEHV) -> mx.Dtype:
    return model.decoder[1].weight.dtype


def decode(model: TAEHV, latents: mx.array, tile: int | tuple | None = None) -> mx.array:
    """Latents ``[B, T, H, W, C]`` -> frames ``[B, 4T-3, 8H, 8W, 3]`` in [0, 1].

    ``tile=None``: parallel over all frames (one lazy graph; memory grows with T). With a tile, the tiled
    streaming path runs and its frames are concatenated (same result).
    """
    config = model.config
    _check_latents(config, latents)
    if tile is not None:
        return mx.concatenate(list(decode_stream(model, latents, tile=tile, per_latent=True)), axis=1)
    x, _ = run_ops(plan(list(enumerate(model.decoder))), latents.astype(_weights_dtype(model)), {})
    return _finish(config, x)[:, config.frames_to_trim:]


class DecoderStream:
    """Streaming decoder state: feed latent frames in order, get the frames they complete.

    ``push(latents)`` accepts any number of new latent frames (e.g. one causal DiT block) and returns the
    newly finished frames ``[B, n, 8H, 8W, 3]`` (n = 1 for latent 0, 4 for each later latent), evaluated.
    Every segment runs one frame at a time (and, with ``tile``, one spatial tile at a time) and is
    evaluated convolution by convolution, so peak memory depends on neither the number of frames nor
    the chunk size. Kept between frames: each MemBlock's previous input (full frame), ~21 KB per latent
    pixel in fp32 for taew2_1.
    """

    def __init__(self, model: TAEHV, tile: int | tuple | None = None):
        self.model, self.config = model, model.config
        self.segments = decoder_segments(model)
        self.steps = tile_steps(tile, self.segments)
        self.memory: dict[int, mx.array] = {}
        self.raw_frames = 0
        self.shape: tuple | None = None

    def reset(self) -> None:
        self.memory, self.raw_frames, self.shape = {}, 0, None

    def push(self, latents: mx.array) -> mx.array:
        _check_latents(self.config, latents)
        outs = [self.step(latents[:, t:t + 1]) for t in range(latents.shape[1])]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def step(self, latent: mx.array) -> mx.array:
        """Decode one latent frame ``[B, 1, H, W, C]``; returns its (trimmed) frames, evaluated."""
        c, b, h, w = self.config, latent.shape[0], latent.shape[2], latent.shape[3]
        s = c.space_upscale
        n = c.t_upscale - max(0, min(c.t_upscale, c.frames_to_trim - self.raw_frames))
        out = mx.zeros((b, n, h * s, w * s, c.image_channels), dtype=_weights_dtype(self.model))
        k = 0
        for group in self.frames(latent):  # written in place: one latent's frames are held once
            out[:, k:k + group.shape[1]] = group
            k += group.shape[1]
            del group
            mx.eval(out)
        return out

    def frames(self, latent: mx.array) -> Iterator[mx.array]:
        """Decode one latent frame, yielding its finished frames ``[B, n, 8H, 8W, 3]`` (evaluated) as soon
        as each group exists."""
        _check_latents(self.config, latent)
        b, t, h, w, _ = latent.shape
        if t != 1:
            raise ValueError(f"step() takes one latent frame [B, 1, H, W, C], got {tuple(latent.shape)}; use push()")
        if self.shape is None:
            self.shape = (b, h, w)
        elif self.shape != (b, h, w):
            raise ValueError(f"latent batch/size changed mid-stream: {self.shape} then {(b, h, w)}; call reset()")
        for raw in depth_first(self._segment, len(self.segments), latent.astype(_weights_dtype(self.model))):
            self.raw_frames += raw.shape[1]
            keep = min(raw.shape[1], self.raw_frames - self.config.frames_to_trim)
            if keep > 0:
                x = _finish(self.config, raw[:, raw.shape[1] - keep:])
                mx.eval(x)
                yield x

    def _segment(self, k: int, x: mx.array) -> mx.array:
        """Segment k on one frame ``x [B, 1, h, w, C]``, carrying its MemBlocks' memory; tile by tile."""
        seg = self.segments[k]
        b, _, h, w, _ = x.shape
        s, halo = seg.scale, seg.halo
        tiles = tile_grid(h, w, self.steps[k])
        if len(tiles) == 1:
            old = {i: self.memory.pop(i, None) for i in seg.mem_scale}  # run_ops drops each once used
            y, new = run_ops(seg.ops, x, old, sync=True)
            mx.eval(y, *new.values())
            self.memory.update(new)
            return y
        old = {i: self.memory.get(i) for i in seg.mem_scale}
        y_full, new_full = None, {}
        for y0, y1, x0, x1 in tiles:
            cy0, cy1, cx0, cx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
            crop = {i: None if m is None else m[:, cy0 * seg.mem_scale[i]:cy1 * seg.mem_scale[i],
                                                 cx0 * seg.mem_scale[i]:cx1 * seg.mem_scale[i]]
                    for i, m in old.items()}
            y, new = run_ops(seg.ops, x[:, :, cy0:cy1, cx0:cx1], crop, sync=True)
            if y_full is None:
                y_full = mx.zeros((b, y.shape[1], h * s, w * s, y.shape[-1]), dtype=y.dtype)
                new_full = {i: mx.zeros((b, h * seg.mem_scale[i], w * seg.mem_scale[i], m.shape[-1]), dtype=m.dtype)
                            for i, m in new.items()}
            y_full[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = y[:, :, (y0 - cy0) * s:(y1 - cy0) * s,
                                                           (x0 - cx0) * s:(x1 - cx0) * s]
            for i, m in new.items():
                r = seg.mem_scale[i]
                new_full[i][:, y0 * r:y1 * r, x0 * r:x1 * r] = m[:, (y0 - cy0) * r:(y1 - cy0) * r,
                                                                 (x0 - cx0) * r:(x1 - cx0) * r]
            del y, new, crop
            mx.eval(y_full, *new_full.values())
        del old
        self.memory.update(new_full)
        return y_full


def decode_stream(model: TAEHV, latents: mx.array | Iterable[mx.array], tile: int | tuple | None = None,
                  per_latent: bool = False) -> Iterator[mx.array]:
    """Yield decoded frames in order as soon as each is ready: ``[B, 8H, 8W, 3]`` each, or with
    ``per_latent=True`` one ``[B, n, 8H, 8W, 3]`` group per latent frame (n = 1, then 4).

    ``latents``: an array ``[B, T, H, W, C]`` or an iterable of such chunks (e.g. DiT blocks as they are
    generated). ``tile``: None (whole frames), a tile edge in pixels at each segment's output resolution,
    or one such edge/None per segment (what :func:`choose_tile` returns for a memory budget). Tiling is
    exact. Peak memory is independent of T (:func:`decoder_peak_bytes`).
    """
    yield from stream_chunks(DecoderStream(model, tile), latents, lambda c: _check_latents(model.config, c), per_latent)


# --------------------------------------------------------------------------------------------------
# Encoder (parallel; for round trips and tests)
# --------------------------------------------------------------------------------------------------


def encode(model: TAEHV, frames: mx.array) -> mx.array:
    """Frames ``[B, F, H, W, 3]`` in [0, 1] -> latents ``[B, ceil(F/4), H/8, W/8, C]``.

    Frames are padded at the end by repeating the last one up to a multiple of ``t_downscale``.
    """
    c = model.config
    if not c.has_encoder:
        raise ValueError("this TAEHV has no encoder: load it with load(folder, encoder=True) (a folder converted "
                         "from a decoder-only checkpoint has none)")
    if not isinstance(frames, mx.array) or frames.ndim != 5 or frames.shape[-1] != c.image_channels:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"frames must be [B, F, H, W, {c.image_channels}] (channels-last RGB in [0, 1]), got {shape}")
    b, f, h, w, ch = frames.shape
    mult = 8 * c.patch_size
    if f < 1 or h % mult or w % mult or h == 0 or w == 0:
        raise ValueError(f"frame height and width must be positive multiples of {mult} (and F >= 1), got "
                         f"F={f}, H={h}, W={w}")
    x = frames.astype(model.encoder[0].weight.dtype)
    p = c.patch_size
    if p > 1:
        x = x.reshape(b, f, h // p, p, w // p, p, ch).transpose(0, 1, 2, 4, 6, 3, 5).reshape(b, f, h // p, w // p, -1)
    if f % c.t_downscale:
        pad = c.t_downscale - f % c.t_downscale
        x = mx.concatenate([x, mx.repeat(x[:, -1:], pad, axis=1)], axis=1)
    y, _ = run_ops(plan(list(enumerate(model.encoder))), x, {})
    return y


# --------------------------------------------------------------------------------------------------
# Memory planning: a dry run of the streaming path over shapes, op by op (mirrors the kernels above)
# --------------------------------------------------------------------------------------------------


def _conv_extra(layer: Conv, n: int, h: int, w: int, c: int) -> tuple[int, int]:
    """(peak temporary elements, output elements) of :func:`conv_forward` on ``[n, h, w, c]``."""
    o, k = layer.weight.shape[0], layer.kernel
    if k == 1:
        return 2 * n * h * w * o, n * h * w * o
    if k == 3 and layer.stride == 1 and 4 * o <= c:  # by taps: the 9*O matmul output, padded, running sum
        z = 9 * o
        return n * h * w * z + n * (h + 2) * (w + 2) * z + 2 * n * h * w * o, n * h * w * o
    if k == 3 and layer.stride == 1 and 4 * o > c and native_kernels.enabled():  # the output only (per-thread
        return n * h * w * o, n * h * w * o  # row blocks, <= 1.5 MiB each, come from malloc, not MLX)
    if k == 3 and layer.stride == 1:  # row windows: padded input, 3x windows, GEMM output, sliced + bias
        xp = n * (h + 3) * (w + 2) * c
        return 4 * xp + n * h * (w + 2) * o + n * h * w * o, n * h * w * o
    ho, wo = -(-h // layer.stride), -(-w // layer.stride)
    padded = n * (h + 2 * (k // 2)) * (w + 2 * (k // 2)) * c
    return padded + n * ho * wo * k * k * c + 2 * n * ho * wo * o, n * ho * wo * o


def _ops_peak(ops, n: int, h: int, w: int, c: int, keep_all: bool) -> tuple[int, int, tuple]:
    """Peak elements beyond the input while ``ops`` run with ``sync=True`` on ``n`` frames ``[h, w, c]``:
    returns (peak, elements of MemBlock inputs kept as new memory, output (n, h, w, c)). Each MemBlock's
    input is kept as the next frame's memory: all of them (``keep_all``, a tile's crops), or only the
    current one (whole frames, where each block's old memory is released as the new one appears)."""
    peak, kept = 0, 0
    for _, op, layer in ops:
        size = n * h * w * c
        if op == "mem":
            kept = kept + size if keep_all else size  # (includes this block's input)
            conv0, out = _conv_extra(layer.conv[0], n, h, w, c)  # one term at a time, same buffers
            c2 = layer.conv[2]
            extra2, _ = _conv_extra(c2, n, h, w, c2.weight.shape[-1])
            wcopy = layer.conv[0].weight.size // 2  # one term's weights, rearranged for the GEMMs
            if native_kernels.enabled():  # both terms in one fused call, no weight copies; conv2's ReLU fused
                peak = max(peak, kept + max(conv0, out + extra2))
            else:
                peak = max(peak, kept + wcopy + max(conv0, out + extra2 + out))
            c = layer.conv[4].weight.shape[0]
        elif op == "conv":
            extra, out = _conv_extra(layer, n, h, w, c)
            peak = max(peak, kept + size + extra + layer.weight.size)
            h, w = -(-h // layer.stride), -(-w // layer.stride)
            c = layer.weight.shape[0]
        elif op == "upconv" and native_kernels.enabled():  # output only (folded weights are malloc'd)
            o = layer.weight.shape[0]
            peak = max(peak, kept + size + 4 * n * h * w * o)
            h, w, c = 2 * h, 2 * w, o
        elif op == "upconv":
            o = layer.weight.shape[0]
            xp = n * (h + 3) * (w + 2) * c
            phase = n * h * (w + 2) * o + n * h * w * o
            folded = 3 * layer.weight.size  # the 3x3 kernel folded into 2x2 phase kernels (and their copies)
            peak = max(peak, kept + size + 3 * xp + 4 * n * h * w * o + phase + folded)
            h, w, c = 2 * h, 2 * w, o
        elif op == "time":
            s = layer.stride if isinstance(layer, TGrow) else 1
            o = layer.conv.weight.shape[0]
            peak = max(peak, kept + size + 2 * n * h * w * o)
            if isinstance(layer, TGrow):
                n *= s
            else:
                n //= layer.stride
            c = layer.conv.weight.shape[0] // s
        elif op == "up":
            f = layer.factor
            peak = max(peak, kept + size * (1 + f * f))
            h, w = h * f, w * f
        else:  # activations: MLX reuses the input buffer (run_ops drops its last reference first)
            peak = max(peak, kept + size + (0 if native_kernels.enabled() else size))
    return peak, kept, (n, h, w, c)


def decoder_peak_bytes(config: TAEHVConfig, latent_shape: tuple, tile=None, itemsize: int = 4) -> int:
    """Predicted peak memory (bytes, as ``mx.get_peak_memory`` counts it, model weights included) of
    :func:`decode_stream` on latents of shape ``(B, T, H, W, ...)``: decoder weights + every MemBlock's
    memory + the largest segment's working set (with ``tile``, one tile's). T does not enter.
    ``itemsize``: 4 for fp32 compute (the CPU default), 2 for fp16/bf16.
    """
    model = _shape_model(config)
    segs = decoder_segments(model)
    steps = tile_steps(tile, segs)
    base, seg_peaks = _peak_parts(model, segs, latent_shape, steps)
    return int((base + max(seg_peaks)) * itemsize) + _SLACK


def _peak_parts(model: TAEHV, segs: list[Segment], latent_shape: tuple, steps: list) -> tuple[int, list[int]]:
    """(elements alive throughout: weights, all MemBlock memory, one latent's output frames; [working set
    of each segment]).

    Mirrors :class:`DecoderStream`: segments run depth first on one frame at a time, so while segment k
    runs, one output group (TGrow stride frames) of every earlier segment is alive.
    """
    b, h, w = int(latent_shape[0]), int(latent_shape[2]), int(latent_shape[3])
    c = model.config
    weights = sum(v.size for k, v in _flat_params(model) if k.startswith("decoder."))
    # one latent's finished RGB frames (``step``/``per_latent`` collect them)
    frames = b * c.t_upscale * (h * c.space_upscale) * (w * c.space_upscale) * c.image_channels
    state, res = 0, 1
    for seg in segs:
        state += sum(b * h * w * (res * r) ** 2 * _mem_channels(model, i) for i, r in seg.mem_scale.items())
        res *= seg.scale
    peaks = []
    upstream = b * h * w * model.config.latent_channels  # the latent frame
    hh, ww, c = h, w, model.config.latent_channels
    for seg, step in zip(segs, steps):
        grid = tile_grid(hh, ww, step)
        tiled = len(grid) > 1
        th, tw = max(y1 - y0 for y0, y1, _, _ in grid), max(x1 - x0 for _, _, x0, x1 in grid)
        ch, cw = min(hh, th + 2 * seg.halo), min(ww, tw + 2 * seg.halo)
        work, _, (n1, oh, ow, c_out) = _ops_peak(seg.ops, b, ch, cw, c, keep_all=tiled)
        group = n1 * hh * ww * seg.scale**2 * c_out  # this segment's output for one input frame (n1 counts B)
        if tiled:
            seg_state = sum(b * hh * ww * r * r * _mem_channels(model, i) for i, r in seg.mem_scale.items())
            extra = b * ch * cw * c + n1 * oh * ow * c_out + seg_state  # input crop, tile output, new memory
        else:
            extra = 0
        peaks.append(upstream + group + extra + work)
        upstream += group
        hh, ww, c = hh * seg.scale, ww * seg.scale, c_out
    return weights + state + frames, peaks


def choose_tile(config: TAEHVConfig, latent_shape: tuple, budget_bytes: int, itemsize: int = 4):
    """Tiles for :func:`decode_stream` that fit ``budget_bytes`` (as predicted by
    :func:`decoder_peak_bytes`) with the least halo recomputation: ``None`` when whole frames fit, else
    one tile edge (pixels at the segment's output resolution) or None per decoder segment, each the
    largest that fits. ``MemoryError`` when no tiling fits (the MemBlock memory alone is ~21 KB per latent
    pixel in fp32 for taew2_1, ~134 MB at 480x832, and is not tiled away).
    """
    model = _shape_model(config)
    segs = decoder_segments(model)
    budget = (budget_bytes - _SLACK) / itemsize
    base, whole = _peak_parts(model, segs, latent_shape, [None] * len(segs))
    if base + max(whole) <= budget:
        return None
    h, w = int(latent_shape[2]), int(latent_shape[3])
    tiles = []
    for k, seg in enumerate(segs):
        res = _seg_res(segs, k)
        hh, ww = h * res, w * res
        if base + whole[k] <= budget:
            tiles.append(None)
            continue
        chosen = None
        for n in range(2, max(hh, ww) + 1):  # tiles per axis, fewest first
            step = -(-max(hh, ww) // n)
            steps = [None] * len(segs)
            steps[k] = step
            if base + _peak_parts(model, segs, latent_shape, steps)[1][k] <= budget:
                chosen = step * seg.scale
                break
            if step <= 4:
                break
        if chosen is None:
            raise MemoryError(f"TAEHV streaming decode of latents {tuple(latent_shape)} does not fit "
                              f"{budget_bytes / 2**20:.0f} MiB: the weights and MemBlock memory alone take "
                              f"{base * itemsize / 2**20:.0f} MiB and segment {k} needs more even with tiny tiles")
        tiles.append(chosen)
    return tuple(tiles)


def _seg_res(segs: list[Segment], k: int) -> int:
    """Resolution of segment k's input relative to the latents."""
    r = 1
    for seg in segs[:k]:
        r *= seg.scale
    return r


_SLACK = 2**20  # allocator rounding and small arrays the dry run does not list

_SHAPE_MODELS: dict = {}


def _shape_model(config: TAEHVConfig) -> TAEHV:
    """A model used only for its structure (its random parameters are never evaluated: no memory)."""
    key = repr(config)
    if key not in _SHAPE_MODELS:
        _SHAPE_MODELS[key] = TAEHV(config)
    return _SHAPE_MODELS[key]


def _flat_params(model: TAEHV):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def _mem_channels(model: TAEHV, index: int) -> int:
    return model.decoder[index].conv[0].weight.shape[-1] // 2


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load(folder, dtype: mx.Dtype | None = None, encoder: bool = False) -> TAEHV:
    """Load the decoder of a model folder (and the encoder too with ``encoder=True``).

    ``dtype``: compute dtype (default: fp32 on the CPU, where half precision has no fast kernels; bf16 on
    GPUs). Weights are stored fp16 by default and cast here.
    """
    import dataclasses

    from ..safetensors_io import load_safetensors
    from ..utils import (ModelFolderError, cast_floating, config_from_dict, config_section, default_compute_dtype,
                         load_weights_strict, model_file)

    folder = Path(folder)
    section = config_section(folder, "decoder")
    config = config_from_dict(TAEHVConfig, section)
    if encoder and not config.has_encoder:
        raise ModelFolderError(f"{folder}: the decoder was converted from a checkpoint without encoder weights")
    path = model_file(folder, section, "weights_file", WEIGHTS_NAME)
    weights = load_safetensors(path)
    if not encoder:
        config = dataclasses.replace(config, has_encoder=False)
        weights = {k: v for k, v in weights.items() if not k.startswith("encoder.")}
    model = TAEHV(config)
    load_weights_strict(model, cast_floating(weights, dtype or default_compute_dtype()), str(path))
    mx.eval(model.parameters())
    return model
