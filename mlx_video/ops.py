"""Numerical building blocks shared by the models: attention with bounded memory, fast fp32 GELU.

CPU notes (MLX's CPU backend): ``mx.fast.scaled_dot_product_attention`` is not fused there and builds
the whole score matrix, and elementwise transcendentals run single-threaded and unvectorised (exp on
17.5M floats: ~0.25 s vs ~0.025 s for NumPy). So on the CPU:
- attention is query-chunked with a chunk size derived from a memory bound, and each chunk's softmax
  runs in NumPy, in place on the evaluated MLX score buffer (zero-copy), split over the cores;
- the FFN's tanh GELU runs the same way on the freshly computed hidden activations.
Elsewhere (GPUs) everything stays in MLX: fused SDPA and a compiled GELU.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .utils import gpu_available

# Default bound on the attention-score working set (scores + softmax temporaries) per call.
DEFAULT_ATTENTION_BUDGET = 512 * 1024**2


def _score_temporaries() -> int:
    """Score-sized buffers alive at once in the chunked path: the CPU softmax works in place on the scores;
    MLX's softmax holds scores, exponentials and probabilities."""
    return 1 if mx.default_device() == mx.cpu else 3


def fused_attention_available() -> bool:
    """True where ``mx.fast.scaled_dot_product_attention`` runs a fused kernel (Metal/CUDA GPUs)."""
    return mx.default_device() == mx.gpu and gpu_available()


def attention_chunk_size(batch: int, heads: int, kv_len: int, budget_bytes: int = DEFAULT_ATTENTION_BUDGET,
                         itemsize: int = 4) -> int:
    """Query rows per chunk so that the score working set stays within ``budget_bytes``."""
    per_row = batch * heads * kv_len * itemsize * _score_temporaries()
    return max(1, int(budget_bytes // max(per_row, 1)))


# Per-thread scratch of the native flash attention: a 128 x 512 score block and a 128-row accumulator
# (head_dim <= 256), fp32 (native/src/kernels.cpp kQueryBlock, kKeyBlock).
_NATIVE_ATTENTION_SCRATCH = (128 * 512 + 128 * 256) * 4


def native_attention_used(dtype: mx.Dtype = mx.float32, fused: bool | None = None, native: bool | None = None) -> bool:
    """Whether :func:`attention` takes the native flash-attention kernel for these arguments."""
    if native is False or fused is not None or dtype != mx.float32:
        return False
    if native is None and os.environ.get("MLX_VIDEO_NATIVE_ATTENTION", "1").strip().lower() in {"0", "off", "no"}:
        return False  # the query-chunked path (several times the memory), e.g. to compare
    from . import native as native_kernels

    return native_kernels.enabled() and not fused_attention_available()


def attention_peak_bytes(batch: int, heads: int, q_len: int, kv_len: int,
                         budget_bytes: int = DEFAULT_ATTENTION_BUDGET, itemsize: int = 4,
                         native: bool | None = None) -> int:
    """Predicted score working set of :func:`attention` (for memory planning): ~0 where SDPA is fused,
    a few blocks per thread for the native kernel, else the query-chunked score buffers."""
    if fused_attention_available():
        return 0
    if native_attention_used(mx.float32 if itemsize == 4 else mx.float16, native=native):
        from . import native as native_kernels

        return native_kernels.kernels().num_threads() * _NATIVE_ATTENTION_SCRATCH
    chunk = min(q_len, attention_chunk_size(batch, heads, kv_len, budget_bytes, itemsize))
    return batch * heads * chunk * kv_len * itemsize * _score_temporaries()


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
              budget_bytes: int = DEFAULT_ATTENTION_BUDGET, fused: bool | None = None,
              native: bool | None = None) -> mx.array:
    """Softmax attention over ``[B, H, L, D]`` inputs, no mask.

    Fused SDPA where the backend has it; on the CPU in fp32 the native flash-attention kernel
    (:mod:`mlx_video.native`: no score matrix at all) unless ``native=False`` or ``fused`` is given;
    elsewhere queries are processed in chunks whose score matrix fits ``budget_bytes``, with the softmax
    in fp32. Chunks are evaluated one by one so that the bound holds for the whole call, not just per
    graph node.
    """
    if native_attention_used(q.dtype, fused, native) and k.dtype == v.dtype == mx.float32:
        from . import native as native_kernels

        return _eager(native_kernels.kernels().flash_attention, q, k, v, scale)
    if fused is None:
        fused = fused_attention_available()
    if fused:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    b, h, lq, _ = q.shape
    chunk = attention_chunk_size(b, h, k.shape[2], budget_bytes)
    # Contiguous once, here: MLX would otherwise re-copy a transposed matmul operand for every chunk.
    kt = mx.contiguous(k.swapaxes(-1, -2))
    q, v = mx.contiguous(q * scale), mx.contiguous(v)
    mx.eval(q, kt, v)
    attend = _attend_numpy_softmax if q.dtype == mx.float32 and mx.default_device() == mx.cpu else _attend
    if chunk >= lq:
        return attend(q, kt, v)
    outs = []
    for start in range(0, lq, chunk):
        o = attend(q[:, :, start:start + chunk], kt, v)
        mx.eval(o)
        outs.append(o)
    return mx.concatenate(outs, axis=2)


def _attend(q, kt, v):
    scores = (q @ kt).astype(mx.float32)
    probs = mx.softmax(scores, axis=-1).astype(v.dtype)
    return probs @ v


def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="mlx-video-cpu")


_POOL = _new_pool()


def _pool_after_fork() -> None:
    # A forked child (multiprocessing's default start method on Linux) inherits the pool without its worker
    # threads: once the parent has used it, map() in the child waits forever. The child gets a fresh pool.
    global _POOL
    _POOL = _new_pool()


os.register_at_fork(after_in_child=_pool_after_fork)


def _rows_parallel(fn, *arrays: np.ndarray) -> list:
    """Apply ``fn`` to matching contiguous row blocks of 2D arrays on all cores (NumPy releases the GIL)."""
    rows = arrays[0].shape[0]
    n = min(_POOL._max_workers, rows)
    bounds = np.linspace(0, rows, n + 1).astype(int)
    return list(_POOL.map(lambda ab: fn(*(a[ab[0]:ab[1]] for a in arrays)), zip(bounds[:-1], bounds[1:])))


def _owned_numpy_view(a: mx.array) -> np.ndarray | None:
    """Writable NumPy view of an evaluated, freshly computed MLX array (None if not contiguous)."""
    mx.eval(a)
    view = np.asarray(a)
    return view if view.flags.c_contiguous and view.flags.writeable else None


_CACHE_ROWS = 32  # rows per pass: max/subtract/exp/sum then run on a block that stays in cache


def _exp_shifted_rows(rows: np.ndarray) -> np.ndarray:
    sums = np.empty((rows.shape[0], 1), dtype=rows.dtype)
    for a in range(0, rows.shape[0], _CACHE_ROWS):
        block = rows[a:a + _CACHE_ROWS]
        block -= block.max(axis=-1, keepdims=True)
        np.exp(block, out=block)
        block.sum(axis=-1, keepdims=True, out=sums[a:a + _CACHE_ROWS])
    return sums


def _attend_numpy_softmax(q, kt, v):
    scores = q @ kt  # fresh fp32 buffer owned here: the softmax overwrites it in place
    view = _owned_numpy_view(scores)
    if view is None:
        return _attend(q, kt, v)
    rows = view.reshape(-1, view.shape[-1])
    sums = np.concatenate(_rows_parallel(_exp_shifted_rows, rows)).reshape(*view.shape[:-1], 1)
    # normalise after P@V: [rows, D] divides instead of [rows, Lk]
    return (scores @ v) / mx.array(sums)


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


def _gelu_tanh_rows(a: np.ndarray) -> None:
    t = a * a
    t *= 0.044715
    t += 1.0
    t *= a
    t *= _SQRT_2_OVER_PI
    np.tanh(t, out=t)
    t += 1.0
    t *= 0.5
    a *= t


def _eager(kernel, *args):
    """Evaluate a native kernel's inputs, then its output, at once: as eager as the NumPy passes they replace,
    so that a block's graph never holds several residual-sized intermediates at a time (lazily, one DiT
    block at 7,800 tokens peaked ~15% higher)."""
    mx.eval(*(a for a in args if isinstance(a, mx.array)))
    out = kernel(*args)
    mx.eval(out)
    return out


def _native_cpu_fp32(*arrays: mx.array):
    """The native kernels module when all ``arrays`` are fp32 and the native CPU path is on, else None."""
    from . import native as native_kernels

    if native_kernels.enabled() and all(a.dtype == mx.float32 for a in arrays):
        return native_kernels.kernels()
    return None


def gelu_tanh_fresh(x: mx.array) -> mx.array:
    """``gelu_tanh`` for an array the caller has just computed and owns: on the CPU it is overwritten in
    place on all cores (native kernel, else NumPy; ~5x faster than MLX's single-threaded elementwise
    kernels)."""
    if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return gelu_tanh(x)
    if (kernels := _native_cpu_fp32(x)) is not None:
        mx.eval(x)
        try:
            kernels.gelu_tanh_inplace(x)  # the NumPy path's in-place trick, threaded in C++
            return x
        except ValueError:  # not row-contiguous: a new buffer
            return _eager(kernels.gelu_tanh, x)
    view = _owned_numpy_view(x)
    if view is None:
        return gelu_tanh(x)
    _rows_parallel(_gelu_tanh_rows, view.reshape(-1, view.shape[-1]))
    return x


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """LayerNorm with fp32 statistics (Wan's ``WanLayerNorm`` computes in float32)."""
    return mx.fast.layer_norm(x.astype(mx.float32), weight, bias, eps)


def _norm_rows(src: np.ndarray, dst: np.ndarray, mul: np.ndarray, add: np.ndarray, eps: float) -> None:
    for a in range(0, src.shape[0], _CACHE_ROWS):
        s, d = src[a:a + _CACHE_ROWS], dst[a:a + _CACHE_ROWS]
        np.subtract(s, s.mean(axis=-1, keepdims=True), out=d)
        rstd = 1.0 / np.sqrt(np.einsum("ij,ij->i", d, d)[:, None] / d.shape[-1] + eps)
        d *= rstd
        d *= mul
        d += add


def _per_batch_rows(a: mx.array, x: mx.array) -> bool:
    """``a`` is ``[D]`` or ``[1 | B, 1, D]`` for ``x [B, L, D]`` (the native kernel's broadcasting)."""
    d = x.shape[-1]
    return a.shape == (d,) or (a.ndim == 3 and a.shape[1:] == (1, d) and a.shape[0] in (1, x.shape[0]))


def modulated_layer_norm(x: mx.array, mul: mx.array, add: mx.array, eps: float) -> mx.array:
    """``LayerNorm(x) * mul + add`` with fp32 statistics; ``mul``/``add`` are ``[B, 1, D]`` (adaLN: 1 + scale,
    shift) or ``[D]`` (affine weight, bias). On the CPU one NumPy pass per row block on all cores replaces
    MLX's single-threaded norm and two broadcast ops (~0.55 s -> ~0.1 s per block at 11k tokens)."""
    x = x.astype(mx.float32)
    mul, add = mul.astype(mx.float32), add.astype(mx.float32)
    if mx.default_device() != mx.cpu or x.ndim != 3:
        return mx.fast.layer_norm(x, None, None, eps) * mul + add
    if (kernels := _native_cpu_fp32(x)) is not None and _per_batch_rows(mul, x) and _per_batch_rows(add, x):
        return _eager(kernels.modulated_layer_norm, x, mul, add, eps)
    b, _, d = x.shape
    mul, add = mx.broadcast_to(mul, (b, 1, d)), mx.broadcast_to(add, (b, 1, d))
    mx.eval(x, mul, add)
    src, m, a = np.asarray(x), np.array(mul), np.array(add)
    out = np.empty(src.shape, np.float32)
    for i in range(b):
        _rows_parallel(lambda s, d: _norm_rows(s, d, m[i], a[i], eps), src[i], out[i])
    return mx.array(out)


def native_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array | None:
    """Wan's interleaved-pair RoPE on ``x [B, L, H, D]`` with ``cos``/``sin`` holding ``[L, D/2]`` values, by
    the native kernel (one threaded pass instead of MLX's single-threaded split/multiply/stack), or None
    where that path is off or the shapes are not the kernel's."""
    b, l, h, d = x.shape
    if (kernels := _native_cpu_fp32(cos, sin)) is None or cos.size != l * (d // 2) or sin.size != cos.size:
        return None
    return kernels.rope(x, cos, sin)


def native_conv3x3(xs: list[mx.array], w: mx.array, bias: mx.array | None = None,
                   relu: bool = False) -> mx.array | None:
    """``conv3x3(concatenate(xs, -1), w) + bias`` (then ReLU) for ``x_i [N, H, W, C_i]``, ``w [O, 3, 3, C]``
    (inputs with fewer channels than ``w`` in total: the rest are zeros), padding 1, by the native kernel
    (threaded row blocks, no concatenation, no im2col buffer, bias and ReLU fused), or None where that
    path is off. Its per-thread row blocks (<= ~1.5 MiB each) come from malloc, not MLX's allocator, so
    ``mx.get_peak_memory`` (and the decoder's memory predictor) leave them out."""
    arrays = [*xs, w] + ([] if bias is None else [bias])
    if (kernels := _native_cpu_fp32(*arrays)) is None:
        return None
    return kernels.conv3x3(xs, w, bias, relu)


def native_upconv3x3(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array | None:
    """``conv3x3(upsample_nearest(x, 2), w) + bias`` (TAEHV's upconv) by the native kernel (phases folded in
    C++, the four 2x2 convs in one threaded pass, written interleaved), or None where that path is off."""
    if (kernels := _native_cpu_fp32(x, w)) is None:
        return None
    return kernels.upconv3x3(x, w, bias)

