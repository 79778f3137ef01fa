"""Differentiable forwards of the runtime models, for training.

The runtime forwards are tuned for inference on the CPU (NumPy in-place kernels, ``mx.eval`` between
phases to bound memory), which gradients cannot pass through. These compute the same functions in plain
MLX over the *same* modules and parameters; ``tests/test_recipe_world.py`` checks each against its
runtime forward.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..models import taehv, umt5, wan_dit


def gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Interleaved-pair RoPE over ``x [B, L, H, D]`` with the runtime's tables (``wan_dit.rope_tables``)."""
    b, l, h, d = x.shape
    x = x.reshape(b, l, h, d // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    return mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(b, l, h, d)


def _layer_norm(x, eps):
    return mx.fast.layer_norm(x, None, None, eps)


def _attention(attn: wan_dit.Attention, x: mx.array, rope=None, kv=None) -> mx.array:
    b, l, _ = x.shape
    q = attn.norm_q(attn.q(x)).reshape(b, l, attn.heads, attn.head_dim)
    if kv is None:
        k = attn.norm_k(attn.k(x)).reshape(b, l, attn.heads, attn.head_dim)
        v = attn.v(x).reshape(b, l, attn.heads, attn.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    else:
        k, v = kv
    out = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=1.0 / math.sqrt(attn.head_dim))
    return attn.o(out.transpose(0, 2, 1, 3).reshape(b, l, -1))


def _cross_kv(attn: wan_dit.Attention, text: mx.array):
    b, l, _ = text.shape
    k = attn.norm_k(attn.k(text)).reshape(b, l, attn.heads, attn.head_dim).transpose(0, 2, 1, 3)
    v = attn.v(text).reshape(b, l, attn.heads, attn.head_dim).transpose(0, 2, 1, 3)
    return k, v


def dit_forward(dit: wan_dit.WanDiT, latents: mx.array, time_features: mx.array, context: mx.array,
                hidden: list | None = None) -> mx.array:
    """``WanDiT.__call__`` in plain MLX (fp32). ``time_features = wan_dit.sinusoidal_embedding(t, freq_dim)``
    (computed on the host in float64, as the runtime does); ``context [B, text_len, text_dim]``. A ``hidden``
    list receives the residual stream ``[B, L, dim]`` after every block (the layer-alignment targets)."""
    c = dit.config
    tokens, grid = dit.patchify(latents)
    x = dit.patch_embedding(tokens)
    te = dit.time_embedding
    e = te.linear_2(nn.silu(te.linear_1(time_features)))
    e0 = dit.time_projection(nn.silu(e)).reshape(e.shape[0], 6, c.dim)
    tx = dit.text_embedding
    text = tx.linear_2(gelu_tanh(tx.linear_1(context)))
    rope = wan_dit.rope_tables(grid, c.head_dim, c.rope_theta)
    for blk in dit.blocks:
        mod = blk.modulation + e0
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (mod[:, i:i + 1] for i in range(6))
        y = _attention(blk.self_attn, _layer_norm(x, c.eps) * (1 + scale_msa) + shift_msa, rope=rope)
        x = x + y * gate_msa
        n3 = mx.fast.layer_norm(x, blk.norm3.weight, blk.norm3.bias, c.eps)
        x = x + _attention(blk.cross_attn, n3, kv=_cross_kv(blk.cross_attn, text))
        h = _layer_norm(x, c.eps) * (1 + scale_ffn) + shift_ffn
        x = x + blk.ffn.fc2(gelu_tanh(blk.ffn.fc1(h))) * gate_ffn
        if hidden is not None:
            hidden.append(x)
    hm = dit.head.modulation + e[:, None, :]
    out = dit.head.linear(_layer_norm(x, c.eps) * (1 + hm[:, 1:2]) + hm[:, 0:1])
    return dit.unpatchify(out, grid)


def umt5_forward(encoder: umt5.UMT5Encoder, ids: mx.array, valid: mx.array) -> mx.array:
    """``UMT5Encoder.__call__`` without the per-block evaluation: ``ids [B, L]``, ``valid [B, L]`` bool.
    Rows past each prompt's length are zeroed, as the runtime does."""
    x = encoder.token_embedding(ids)
    mask = mx.where(valid[:, None, None, :], 0.0, -1e9)
    l = ids.shape[1]
    for blk in encoder.blocks:
        a = blk.attn
        h = blk.norm1(x)
        q, k, v = (t.reshape(*ids.shape, a.heads, a.head_dim).transpose(0, 2, 1, 3) for t in (a.q(h), a.k(h), a.v(h)))
        bias = blk.position_bias(l, l)[None] + mask
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)  # T5: no 1/sqrt(d)
        x = x + a.o(out.transpose(0, 2, 1, 3).reshape(*ids.shape, -1))
        h = blk.norm2(x)
        x = x + blk.ffn.fc2(gelu_tanh(blk.ffn.gate(h)) * blk.ffn.fc1(h))
    x = encoder.norm(x)
    return mx.where(valid[..., None], x, 0.0)


# --------------------------------------------------------------------------------------------------
# TAEHV (plain mx.conv2d: the runtime's fused convolution kernels have no gradients)
# --------------------------------------------------------------------------------------------------


def _conv(layer: taehv.Conv, x: mx.array) -> mx.array:
    y = mx.conv2d(x, layer.weight, stride=layer.stride, padding=layer.kernel // 2)
    return y + layer.bias if "bias" in layer else y


def _memblock(block: taehv.MemBlock, x: mx.array, past: mx.array) -> mx.array:
    h = nn.relu(_conv(block.conv[0], mx.concatenate([x, past], axis=-1)))
    h = nn.relu(_conv(block.conv[2], h))
    h = _conv(block.conv[4], h)
    return nn.relu(h + (_conv(block.skip, x) if "skip" in block else x))


def _taehv_layers(layers, x: mx.array) -> mx.array:
    """Apply TAEHV layers to ``[B, T, H, W, C]`` all frames at once (MemBlock past = previous frame, zeros first)."""
    for layer in layers:
        b, t = x.shape[:2]
        if isinstance(layer, taehv.TPool):
            s = layer.stride
            if s > 1:
                _, _, h, w, c = x.shape
                x = x.reshape(b, t // s, s, h, w, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, t // s, h, w, s * c)
            x = _conv(layer.conv, x.reshape(-1, *x.shape[2:])).reshape(b, x.shape[1], *x.shape[2:4], -1)
            continue
        if isinstance(layer, taehv.TGrow):
            _, _, h, w, c = x.shape
            y = _conv(layer.conv, x.reshape(-1, h, w, c))
            s = layer.stride
            x = y.reshape(b, t, h, w, s, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, t * s, h, w, c)
            continue
        flat = x.reshape(b * t, *x.shape[2:])
        if isinstance(layer, taehv.MemBlock):
            past = mx.concatenate([mx.zeros_like(x[:, :1]), x[:, :-1]], axis=1).reshape(flat.shape)
            y = _memblock(layer, flat, past)
        elif isinstance(layer, taehv.Conv):
            y = _conv(layer, flat)
        elif isinstance(layer, taehv.Upsample):
            y = taehv.upsample_nearest(flat, layer.factor)
        else:  # Clamp, ReLU: plain MLX already
            y = layer(flat)
        x = y.reshape(b, t, *y.shape[1:])
    return x


def taehv_encode(model: taehv.TAEHV, frames: mx.array) -> mx.array:
    """``taehv.encode`` (patch size 1): frames ``[B, F, H, W, 3]`` -> latents ``[B, ceil(F/4), H/8, W/8, C]``."""
    f = frames.shape[1]
    pad = -f % model.config.t_downscale
    if pad:
        frames = mx.concatenate([frames, mx.repeat(frames[:, -1:], pad, axis=1)], axis=1)
    return _taehv_layers(model.encoder, frames)


def taehv_decode(model: taehv.TAEHV, latents: mx.array) -> mx.array:
    """``taehv.decode`` (patch size 1): latents -> frames ``[B, 4T-3, 8H, 8W, 3]`` in [0, 1].

    The clip to [0, 1] is straight-through: the forward equals the runtime's, but gradients pass pixels
    that are out of range (a plain clip gives them none, and a decoder whose outputs all leave the range
    early in training never recovers: the loss sits still)."""
    x = _taehv_layers(model.decoder, latents)
    x = x + mx.stop_gradient(mx.clip(x, 0.0, 1.0) - x)
    return x[:, model.config.frames_to_trim:]
