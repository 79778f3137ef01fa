"""Numerical building blocks shared by the models: attention with bounded memory, fast fp32 GELU.

CPU notes (MLX's CPU backend): ``mx.fast.scaled_dot_product_attention`` is not fused there and builds
the whole score matrix, and transcendentals (exp/tanh) are slow. So attention is query-chunked on the
CPU with a chunk size derived from a memory bound, and the tanh GELU uses a rational tanh built from
mul/add/div only, fused by ``mx.compile``.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .utils import gpu_available

# Default bound on the attention-score working set (scores + softmax temporaries) per call.
DEFAULT_ATTENTION_BUDGET = 512 * 1024**2
_SCORE_TEMPORARIES = 3  # scores, exp and probabilities alive at once in the chunked path


def fused_attention_available() -> bool:
    """True where ``mx.fast.scaled_dot_product_attention`` runs a fused kernel (Metal/CUDA GPUs)."""
    return mx.default_device() == mx.gpu and gpu_available()


def attention_chunk_size(batch: int, heads: int, kv_len: int, budget_bytes: int = DEFAULT_ATTENTION_BUDGET,
                         itemsize: int = 4) -> int:
    """Query rows per chunk so that the score working set stays within ``budget_bytes``."""
    per_row = batch * heads * kv_len * itemsize * _SCORE_TEMPORARIES
    return max(1, int(budget_bytes // max(per_row, 1)))


def attention_peak_bytes(batch: int, heads: int, q_len: int, kv_len: int,
                         budget_bytes: int = DEFAULT_ATTENTION_BUDGET, itemsize: int = 4) -> int:
    """Predicted score working set of :func:`attention` (for memory planning)."""
    chunk = min(q_len, attention_chunk_size(batch, heads, kv_len, budget_bytes, itemsize))
    return batch * heads * chunk * kv_len * itemsize * _SCORE_TEMPORARIES


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
              budget_bytes: int = DEFAULT_ATTENTION_BUDGET, fused: bool | None = None) -> mx.array:
    """Softmax attention over ``[B, H, L, D]`` inputs, no mask.

    Fused SDPA where the backend has it; elsewhere queries are processed in chunks whose score matrix
    fits ``budget_bytes``, with the softmax in fp32. Chunks are evaluated one by one so that the bound
    holds for the whole call, not just per graph node.
    """
    if fused is None:
        fused = fused_attention_available()
    if fused:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    b, h, lq, _ = q.shape
    chunk = attention_chunk_size(b, h, k.shape[2], budget_bytes)
    kt = k.swapaxes(-1, -2)
    q = q * scale
    if chunk >= lq:
        return _attend(q, kt, v)
    outs = []
    for start in range(0, lq, chunk):
        o = _attend(q[:, :, start:start + chunk], kt, v)
        mx.eval(o)
        outs.append(o)
    return mx.concatenate(outs, axis=2)


def _attend(q, kt, v):
    scores = (q @ kt).astype(mx.float32)
    probs = mx.softmax(scores, axis=-1).astype(v.dtype)
    return probs @ v


# Rational approximation of tanh on [-7.9, 7.9] (Eigen's ``generic_fast_tanh_float``): max error ~1 ulp
# in fp32, and only mul/add/div, which the MLX CPU backend vectorises (exp/tanh it does not).
_TANH_ALPHA = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
               -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_BETA = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805


def _rational_tanh(x: mx.array) -> mx.array:
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    p = _TANH_ALPHA[6]
    for a in reversed(_TANH_ALPHA[:6]):
        p = p * x2 + a
    p = p * x
    q = _TANH_BETA[3]
    for b in reversed(_TANH_BETA[:3]):
        q = q * x2 + b
    return p / q


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_fp32(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _rational_tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))))


_gelu_tanh_compiled = mx.compile(_gelu_tanh_fp32, shapeless=True)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (PyTorch ``approximate='tanh'``), computed in fp32."""
    if x.dtype != mx.float32:
        return _gelu_tanh_compiled(x.astype(mx.float32)).astype(x.dtype)
    return _gelu_tanh_compiled(x)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """LayerNorm with fp32 statistics (Wan's ``WanLayerNorm`` computes in float32)."""
    return mx.fast.layer_norm(x.astype(mx.float32), weight, bias, eps)
