"""FLOP counts from configs and shapes (no model is built, nothing is run).

Convention: 2 FLOPs per multiply-accumulate of every matmul and convolution (the dense work BLAS does),
biases included only through their matmul; elementwise work (softmax, norms, GELU, RoPE, residuals,
INT4 dequantization) is not counted. These are *model* FLOPs, the same figure for every runtime, so
achieved FLOP/s ratios equal time ratios: work a runtime skips (text K/V cached per prompt, a 1x1 conv
moved ahead of an upsample, a sub-pixel conv in place of upsample + conv) shows up as a shorter time, not
as fewer FLOPs.

Each function returns ``{"total": int, "breakdown": {part: int}}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mm(m: int, k: int, n: int) -> int:
    """FLOPs of an ``[m, k] @ [k, n]`` matmul."""
    return 2 * int(m) * int(k) * int(n)


def _result(parts: dict[str, int]) -> dict:
    return {"total": int(sum(parts.values())), "breakdown": {k: int(v) for k, v in parts.items()}}


# --------------------------------------------------------------------------------------------------
# Wan DiT
# --------------------------------------------------------------------------------------------------


def dit_tokens(config, latent_shape: Sequence[int]) -> int:
    """Tokens per sample of a latent ``[B, F, H, W, C]`` after patchifying."""
    _, f, h, w = (int(v) for v in latent_shape[:4])
    pt, ph, pw = config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def dit_step_flops(config, latent_shape: Sequence[int], include_text: bool = True, batch: int | None = None) -> dict:
    """One DiT forward (one denoising step, one CFG branch) on ``latent_shape`` ``[B, F, H, W, C]``.

    ``include_text``: count the text embedding and every block's cross-attention K/V projections (a
    plain forward from T5 context, as diffusers does each step). The runtime computes them once per
    prompt (``prepare_text``), so its per-step work is ``include_text=False``. Cross-attention always
    attends to all ``text_len`` slots (Wan pads the prompt to 512 and attends to the padding).
    """
    c = config
    b = int(batch if batch is not None else latent_shape[0])
    n = b * dit_tokens(c, latent_shape)  # token rows across the batch
    per_sample = dit_tokens(c, latent_shape)
    d, hd, lt = c.dim, c.head_dim, c.text_len
    parts = {
        "patch_embedding": mm(n, c.in_channels * c.patch_elements, d),
        "time_embedding": mm(b, c.freq_dim, d) + mm(b, d, d) + mm(b, d, 6 * d),
        "self_attn_qkv": 0, "self_attn_scores": 0, "self_attn_values": 0, "self_attn_out": 0,
        "cross_attn_q": 0, "cross_attn_kv": 0, "cross_attn_scores": 0, "cross_attn_values": 0, "cross_attn_out": 0,
        "ffn": 0,
        "head": mm(n, d, c.out_channels * c.patch_elements),
        "text_embedding": (mm(b * lt, c.text_dim, d) + mm(b * lt, d, d)) if include_text else 0,
    }
    for i in range(c.num_layers):
        hs, hc, f = c.self_attn_heads[i], c.cross_attn_heads[i], c.ffn_dim[i]
        inner_s, inner_c = hs * hd, hc * hd
        parts["self_attn_qkv"] += 3 * mm(n, d, inner_s)
        parts["self_attn_scores"] += b * hs * mm(per_sample, hd, per_sample)
        parts["self_attn_values"] += b * hs * mm(per_sample, per_sample, hd)
        parts["self_attn_out"] += mm(n, inner_s, d)
        parts["cross_attn_q"] += mm(n, d, inner_c)
        if include_text:
            parts["cross_attn_kv"] += 2 * mm(b * lt, d, inner_c)
        parts["cross_attn_scores"] += b * hc * mm(per_sample, hd, lt)
        parts["cross_attn_values"] += b * hc * mm(per_sample, lt, hd)
        parts["cross_attn_out"] += mm(n, inner_c, d)
        parts["ffn"] += mm(n, d, f) + mm(n, f, d)
    return _result(parts)


def dit_parameter_count(config) -> int:
    """Parameters of a WanDiT with this config (from the shapes; no arrays are materialised)."""
    from mlx.utils import tree_flatten

    from mlx_video.models.wan_dit import WanDiT

    return int(sum(math.prod(v.shape) for _, v in tree_flatten(WanDiT(config).parameters())))


def dit_weight_bytes(config, itemsize: int) -> int:
    """Resident weight bytes with matmul weights at ``itemsize`` and Wan's fp32-kept parameters in fp32."""
    from mlx.utils import tree_flatten

    from mlx_video.models.wan_dit import FP32_PARAMETERS, WanDiT

    total = 0
    for name, v in tree_flatten(WanDiT(config).parameters()):
        total += math.prod(v.shape) * (4 if any(s in name for s in FP32_PARAMETERS) else itemsize)
    return int(total)


# --------------------------------------------------------------------------------------------------
# UMT5 encoder
# --------------------------------------------------------------------------------------------------


def umt5_flops(config, tokens: int, batch: int = 1, layers: int | None = None) -> dict:
    """Encoding ``batch`` prompts of ``tokens`` tokens (the runtime runs at the real prompt length).

    ``layers``: count only the first ``layers`` blocks (for layer-subset timings)."""
    c = config
    n = batch * tokens
    layers = c.num_layers if layers is None else layers
    parts = {
        "attn_qkv": layers * 3 * mm(n, c.dim, c.dim_attn),
        "attn_scores": layers * batch * c.num_heads * mm(tokens, c.head_dim, tokens),
        "attn_values": layers * batch * c.num_heads * mm(tokens, tokens, c.head_dim),
        "attn_out": layers * mm(n, c.dim_attn, c.dim),
        "ffn": layers * (2 * mm(n, c.dim, c.dim_ffn) + mm(n, c.dim_ffn, c.dim)),
    }
    return _result(parts)


def umt5_parameter_count(config) -> int:
    """Parameters of the encoder (token embedding included)."""
    c = config
    block = 3 * c.dim * c.dim_attn + c.dim_attn * c.dim + 3 * c.dim * c.dim_ffn + 2 * c.dim + c.num_buckets * c.num_heads
    return int(c.vocab_size * c.dim + c.num_layers * block + c.dim)


# --------------------------------------------------------------------------------------------------
# TAEHV decoder
# --------------------------------------------------------------------------------------------------


def taehv_decode_flops(config, latent_shape: Sequence[int]) -> dict:
    """Decoding latents ``[B, T, H, W, C]`` with the TAEHV decoder as the reference architecture is written
    (nearest upsample, then the TGrow 1x1 conv at the upsampled resolution). All ``t_upscale * T`` raw
    frames are computed (the first ``t_upscale - 1`` are dropped afterwards)."""
    c = config
    b, t, h, w = (int(v) for v in latent_shape[:4])
    n_f = c.decoder_channels
    parts = {"conv_in": 0, "memblocks": 0, "tgrow": 0, "stage_convs": 0, "conv_out": 0}
    frames, hh, ww = b * t, h, w
    px = frames * hh * ww
    parts["conv_in"] += mm(px, 9 * c.latent_channels, n_f[0])
    for k in range(3):
        ch = n_f[k]
        px = frames * hh * ww
        # MemBlock: conv3x3(2c->c), conv3x3(c->c), conv3x3(c->c); identity skip (n_in == n_out)
        parts["memblocks"] += c.depth * (mm(px, 9 * 2 * ch, ch) + 2 * mm(px, 9 * ch, ch))
        if c.decoder_space_upscale[k]:
            hh, ww = hh * 2, ww * 2
        stride = 2 if c.decoder_time_upscale[k] else 1
        px = frames * hh * ww
        parts["tgrow"] += mm(px, ch, ch * stride)
        frames *= stride
        px = frames * hh * ww
        parts["stage_convs"] += mm(px, 9 * ch, n_f[k + 1])
    io = c.image_channels * c.patch_size**2
    parts["conv_out"] += mm(frames * hh * ww, 9 * n_f[3], io)
    return _result(parts)


def taehv_decoder_parameter_count(config) -> int:
    c = config
    n_f = c.decoder_channels
    total = 9 * c.latent_channels * n_f[0] + n_f[0]
    for k in range(3):
        ch = n_f[k]
        total += c.depth * (9 * 2 * ch * ch + ch + 2 * (9 * ch * ch + ch))
        stride = 2 if c.decoder_time_upscale[k] else 1
        total += ch * ch * stride + 9 * ch * n_f[k + 1]
    io = c.image_channels * c.patch_size**2
    return int(total + 9 * n_f[3] * io + io)
