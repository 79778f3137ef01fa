"""``mlx_video.ops``: the memory figures the planner relies on, path selection, and the CPU row kernels on
any core count (issue 19, written against survivors of the mutation run of ``ops.py``).

References are plain float64 formulas or explicit arithmetic written here, never the code under test.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_video import native, ops
from tests.dit_reference import softmax_attention_f64


# ---------------------------------------------------------------------------------- memory figures


def test_attention_peak_bytes_in_each_regime(monkeypatch):
    """Bugs caught: a non-zero figure for fused SDPA, the native scratch divided instead of multiplied per
    thread, the itemsize dropped or tested the wrong way round, the chunked figure divided by the
    temporaries."""
    t = ops._score_temporaries()
    # chunked path (native off): exactly the rows of one chunk, or all rows when fewer
    per_row = 2 * 3 * 70 * 4 * t
    assert ops.attention_peak_bytes(2, 3, 1000, 70, per_row * 9, native=False) == 9 * per_row
    assert ops.attention_peak_bytes(2, 3, 5, 70, per_row * 9, native=False) == 5 * per_row
    # half precision rows are half the size: twice the rows fit, at half the bytes each
    half_row = 2 * 3 * 70 * 2 * t
    assert ops.attention_peak_bytes(2, 3, 1000, 70, per_row * 9, itemsize=2) == 18 * half_row
    if native.enabled():
        # fp32 with the native kernel: a fixed scratch per thread, whatever the sizes and budget
        scratch = native.kernels().num_threads() * ops._NATIVE_ATTENTION_SCRATCH
        assert ops.attention_peak_bytes(2, 3, 1000, 70, per_row * 9) == scratch
        assert ops.attention_peak_bytes(1, 40, 10**5, 10**5, 1) == scratch > 100_000
        # half precision never takes the native kernel: the chunked figure
        assert ops.attention_peak_bytes(2, 3, 1000, 70, per_row * 9, itemsize=2, native=True) == 18 * half_row
    monkeypatch.setattr(ops, "fused_attention_available", lambda: True)
    assert ops.attention_peak_bytes(2, 3, 1000, 70, per_row * 9, native=False) == 0


def test_native_attention_is_used_only_where_promised(monkeypatch):
    """Bugs caught: the MLX_VIDEO_NATIVE_ATTENTION switch ignored or inverted, half precision or an explicit
    ``fused`` sent to the fp32 native kernel."""
    monkeypatch.setattr(native, "enabled", lambda: True)
    monkeypatch.setattr(ops, "fused_attention_available", lambda: False)
    monkeypatch.delenv("MLX_VIDEO_NATIVE_ATTENTION", raising=False)
    assert ops.native_attention_used() and ops.native_attention_used(mx.float32, native=True)
    assert not ops.native_attention_used(mx.float16) and not ops.native_attention_used(mx.bfloat16)
    assert not ops.native_attention_used(fused=False) and not ops.native_attention_used(fused=True)
    assert not ops.native_attention_used(native=False)
    for off in ("0", "off", " NO "):
        monkeypatch.setenv("MLX_VIDEO_NATIVE_ATTENTION", off)
        assert not ops.native_attention_used()
        assert ops.native_attention_used(native=True)  # an explicit request wins over the switch
    monkeypatch.setenv("MLX_VIDEO_NATIVE_ATTENTION", "1")
    assert ops.native_attention_used()
    monkeypatch.setattr(ops, "fused_attention_available", lambda: True)  # a GPU: fused SDPA, not the CPU kernel
    monkeypatch.setattr(native, "enabled", lambda: False)
    assert not ops.native_attention_used()


# --------------------------------------------------------------------------------- CPU row kernels


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_row_blocks_cover_every_row_once_in_order_on_any_core_count(monkeypatch, workers):
    """Bugs caught: row bounds with one block too many (an empty block the kernels cannot reduce), blocks
    paired with the wrong end (overlapping or missing rows), on machines with more cores than this one."""
    monkeypatch.setattr(ops, "_POOL", ThreadPoolExecutor(max_workers=workers))
    for rows in (1, 2, 3, 7, 100):
        a = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        blocks = ops._rows_parallel(lambda x: x[:, 0].copy(), a)
        assert len(blocks) == min(workers, rows) and all(len(b) > 0 for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks), a[:, 0])
    # and the CPU softmax attention is exact with a single query row and more threads than rows
    q, k, v = (mx.random.normal((1, 1, n, 8), key=mx.random.key(i)) for i, n in enumerate((1, 40, 40)))
    out = np.array(ops.attention(q, k, v, 0.5, budget_bytes=1 << 30, fused=False, native=False))
    assert np.abs(out - softmax_attention_f64(q, k, v, 0.5)).max() < 1e-5


def test_exp_shifted_rows_normalises_each_row_by_its_own_max():
    """Bugs caught: blocks iterated over columns, the max added instead of subtracted or taken over the
    whole block: rows of very different scale then overflow or underflow to 0/0."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((70, 50)) * np.where(np.arange(70) % 2, 300.0, 0.01)[:, None]
    work = rows.astype(np.float32).copy()
    sums = ops._exp_shifted_rows(work)
    shifted = np.exp(rows - rows.max(-1, keepdims=True))
    np.testing.assert_allclose(work, shifted, rtol=2e-4, atol=1e-30)
    np.testing.assert_allclose(sums[:, 0], shifted.sum(-1), rtol=1e-5)
    assert sums.shape == (70, 1)


# -------------------------------------------------------------------------------- norms and GELU


def test_layer_norm_computes_in_float32_from_half_precision_inputs():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 5, 64)) * 4 + 2).astype(np.float32)
    w, b = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    xb = mx.array(x).astype(mx.bfloat16)
    out = ops.layer_norm(xb, mx.array(w), mx.array(b), 1e-6)
    assert out.dtype == mx.float32
    xd = np.array(xb.astype(mx.float32), np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6) * w + b
    assert np.abs(np.array(out) - ref).max() < 1e-4


@pytest.mark.parametrize("native_on", [True, False])
def test_modulated_layer_norm_of_every_modulation_shape(monkeypatch, native_on):
    """``[D]`` affine and ``[B, 1, D]`` / ``[1, 1, D]`` adaLN modulation, 3D and 2D inputs, half precision
    inputs: LayerNorm(x) * mul + add in fp32 (float64 reference)."""
    if native_on and not native.enabled():
        pytest.skip("native kernels not built here")
    if not native_on:
        monkeypatch.setattr(native, "enabled", lambda: False)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 40, 48)) * 3 - 1).astype(np.float32)
    xd = x.astype(np.float64)
    norm = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)
    for shape in ((48,), (2, 1, 48), (1, 1, 48)):
        mul, add = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        out = ops.modulated_layer_norm(mx.array(x), mx.array(mul), mx.array(add), 1e-6)
        assert out.dtype == mx.float32 and out.shape == x.shape
        assert np.abs(np.array(out) - (norm * mul + add)).max() < 1e-4, shape
    mul, add = (rng.standard_normal(48).astype(np.float32) for _ in range(2))
    flat = ops.modulated_layer_norm(mx.array(x[0]), mx.array(mul), mx.array(add), 1e-6)  # 2D: the MLX path
    assert np.abs(np.array(flat) - (norm[0] * mul + add)).max() < 1e-4
    half = ops.modulated_layer_norm(mx.array(x).astype(mx.float16), mx.array(mul).astype(mx.float16),
                                    mx.array(add).astype(mx.float16), 1e-6)
    assert half.dtype == mx.float32 and np.abs(np.array(half) - (norm * mul + add)).max() < 2e-2


def _gelu64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("native_on", [True, False])
def test_gelu_fresh_on_contiguous_transposed_and_half_inputs(monkeypatch, native_on):
    """The in-place CPU GELU: a fresh buffer is overwritten, a transposed one (not row-contiguous) gets a new
    buffer with the right values, half precision keeps its dtype."""
    if native_on and not native.enabled():
        pytest.skip("native kernels not built here")
    if not native_on:
        monkeypatch.setattr(native, "enabled", lambda: False)
    g = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32) * 4
    out = ops.gelu_tanh_fresh(mx.array(g) * 1.0)
    assert np.abs(np.array(out) - _gelu64(g)).max() < 1e-5
    t = mx.array(g).T
    assert np.abs(np.array(ops.gelu_tanh_fresh(t)) - _gelu64(g.T)).max() < 1e-5
    np.testing.assert_array_equal(np.array(mx.array(g).T), g.T)  # the source of the view is untouched
    h = ops.gelu_tanh_fresh(mx.array(g).astype(mx.bfloat16))
    assert h.dtype == mx.bfloat16
    gb = np.array(mx.array(g).astype(mx.bfloat16).astype(mx.float32))
    assert np.abs(np.array(h.astype(mx.float32)) - _gelu64(gb)).max() < 0.05 * np.abs(_gelu64(gb)).max()


def test_native_wrappers_answer_none_where_the_native_path_is_off(monkeypatch):
    """The native conv / upconv / RoPE wrappers return None (the caller's MLX path) off the fp32 CPU path or
    for shapes the kernel does not take; where the kernels are on they match float64 references."""
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((1, 6, 5, 4)).astype(np.float32))
    w = mx.array(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
    b = mx.array(rng.standard_normal(3).astype(np.float32))
    assert ops.native_conv3x3([x.astype(mx.float16)], w) is None
    assert ops.native_upconv3x3(x, w.astype(mx.float16)) is None
    rope_x = mx.array(rng.standard_normal((1, 6, 2, 8)).astype(np.float32))
    cos, sin = (mx.array(rng.standard_normal((6, 4)).astype(np.float32)) for _ in range(2))
    assert ops.native_rope(rope_x, cos[:5], sin[:5]) is None  # not [L, D/2]
    if native.enabled():
        xn, wn, bn = (np.array(a, np.float64) for a in (x, w, b))
        pad = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)))
        ref = np.zeros((1, 6, 5, 3))
        for dy in range(3):
            for dx in range(3):
                ref += pad[:, dy:dy + 6, dx:dx + 5] @ wn[:, dy, dx].T
        conv = ops.native_conv3x3([x[..., :1], x[..., 1:]], w, b, relu=True)  # two inputs: concatenated
        assert np.abs(np.array(conv) - np.maximum(ref + bn, 0)).max() < 1e-4
        assert np.abs(np.array(ops.native_conv3x3([x], w)) - ref).max() < 1e-4  # no bias, no ReLU
        up = np.repeat(np.repeat(xn, 2, 1), 2, 2)
        pad = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
        ref_up = sum(pad[:, dy:dy + 12, dx:dx + 10] @ wn[:, dy, dx].T for dy in range(3) for dx in range(3)) + bn
        assert np.abs(np.array(ops.native_upconv3x3(x, w, b)) - ref_up).max() < 1e-4
        xr, c, s = (np.array(a, np.float64) for a in (rope_x, cos, sin))
        even, odd = xr[..., 0::2], xr[..., 1::2]
        ref_rope = np.stack([even * c[None, :, None] - odd * s[None, :, None],
                             even * s[None, :, None] + odd * c[None, :, None]], -1).reshape(xr.shape)
        assert np.abs(np.array(ops.native_rope(rope_x, cos, sin)) - ref_rope).max() < 1e-5
    monkeypatch.setattr(native, "enabled", lambda: False)
    assert ops.native_conv3x3([x], w, b) is None and ops.native_upconv3x3(x, w, b) is None
    assert ops.native_rope(rope_x, cos, sin) is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_the_cpu_row_kernels_work_in_a_forked_child():
    """Bug caught (a real one): after the parent had used the CPU thread pool, a forked child (multiprocessing's
    default on Linux) inherited the pool without its threads, and the NumPy row kernels waited forever."""
    a = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    for _ in range(20):  # every worker thread of the parent's pool started and idle
        ops._rows_parallel(lambda x: x.sum(), a)
    pid = os.fork()
    if pid == 0:  # the child: a hang ends by SIGALRM, a wrong answer by exit 1
        signal.alarm(30)
        try:
            ok = float(sum(ops._rows_parallel(lambda x: x.sum(), a))) == float(a.sum())
        except BaseException:  # noqa: BLE001
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_the_cpu_chunk_counts_one_score_buffer_and_other_devices_three(monkeypatch):
    """The CPU softmax works in place on the scores (one buffer per query row); MLX's softmax elsewhere holds
    scores, exponentials and probabilities (three). Bug caught: the CPU sized like the GPU (chunks 3x too
    small, three times the passes)."""
    per_row = 2 * 4 * 100 * 4  # batch x heads x keys x fp32
    assert mx.default_device() == mx.cpu
    assert ops.attention_chunk_size(2, 4, 100, budget_bytes=per_row * 30) == 30
    monkeypatch.setattr(ops.mx, "default_device", lambda: mx.gpu)
    assert ops.attention_chunk_size(2, 4, 100, budget_bytes=per_row * 30) == 10


def test_the_native_norm_takes_per_batch_and_per_channel_modulation():
    """``[D]`` and ``[1 | B, 1, D]`` modulation go to the native kernel; anything else does not. Bug caught:
    ``[B, 1, D]`` refused (every adaLN norm then ran on the slower NumPy path)."""
    x = mx.zeros((3, 5, 8))
    for ok in ((8,), (1, 1, 8), (3, 1, 8)):
        assert ops._per_batch_rows(mx.zeros(ok), x), ok
    for bad in ((2, 1, 8), (3, 5, 8), (1, 8), (3, 1, 1, 8), (9,)):
        assert not ops._per_batch_rows(mx.zeros(bad), x), bad


def test_native_conv_refuses_a_half_precision_bias(monkeypatch):
    """Every operand of the native 3x3 convolution must be fp32, the bias too (the kernel reads it as
    floats). Bug caught: the bias left out of the dtype check."""
    monkeypatch.setattr(native, "enabled", lambda: True)
    monkeypatch.setattr(native, "kernels", lambda: type("K", (), {"conv3x3": staticmethod(lambda *a: "native")}))
    x, w = mx.zeros((1, 4, 4, 2)), mx.zeros((3, 3, 3, 2))
    assert ops.native_conv3x3([x], w, mx.zeros((3,))) == "native"
    assert ops.native_conv3x3([x], w, None) == "native"
    assert ops.native_conv3x3([x], w, mx.zeros((3,), mx.float16)) is None
    assert ops.native_conv3x3([x.astype(mx.float16)], w, mx.zeros((3,))) is None
