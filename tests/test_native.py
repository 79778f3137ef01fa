"""The native CPU kernels (native/, mlx_video._native) against float64 references and the MLX/NumPy path.

Tolerances: fp32 kernels vs a float64 NumPy reference, relative to the largest reference magnitude:
<= 2e-6 (attention: online softmax, exp by polynomial; norms: fp32 output rounding), and attention's relative
L2 error no more than 1.5x that of the fp32 MLX/NumPy path it replaces.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx

from mlx_video import native, ops
from tests.dit_reference import softmax_attention_f64

needs_native = pytest.mark.skipif(not native.enabled(), reason=native.describe())
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _rel_max(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@needs_native
@pytest.mark.parametrize("b,h,lq,lk,d", [
    (1, 1, 1, 1, 8),        # one token, one head
    (2, 3, 1, 700, 16),     # one query row against more than one key block
    (1, 2, 129, 513, 128),  # one past the query block (128) and the key block (512)
    (1, 10, 300, 77, 128),  # cross-attention shape: few keys
    (3, 1, 257, 1025, 24),  # odd head_dim, several blocks both ways
])
def test_flash_attention_matches_float64_and_the_mlx_path(b, h, lq, lk, d):
    rng = np.random.default_rng(lq * 7 + lk)
    q, k, v = (mx.array(rng.standard_normal((b, h, n, d)).astype(np.float32) * 2) for n in (lq, lk, lk))
    scale = d ** -0.5
    out = ops.attention(q, k, v, scale)
    assert ops.native_attention_used() and out.dtype == mx.float32 and out.shape == (b, h, lq, d)
    ref = softmax_attention_f64(q, k, v, scale)
    assert _rel_max(out, ref) <= 2e-6
    # as exact as the MLX/NumPy path it replaces (both fp32; neither is the float64 truth)
    assert _rel_l2(out, ref) <= max(1.5 * _rel_l2(ops.attention(q, k, v, scale, native=False), ref), 5e-7)


@needs_native
def test_flash_attention_reads_strided_and_broadcast_operands():
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((2, 150, 4, 32)).astype(np.float32))  # [B, L, H, D] as the DiT holds it
    q = k = v = x.transpose(0, 2, 1, 3)  # [B, H, L, D] views, rows strided by H * D
    ctx = mx.broadcast_to(mx.array(rng.standard_normal((1, 4, 9, 32)).astype(np.float32)), (2, 4, 9, 32))
    ref_self = softmax_attention_f64(np.array(q), np.array(k), np.array(v), 0.2)
    assert _rel_max(ops.attention(q, k, v, 0.2), ref_self) <= 2e-6
    ref_cross = softmax_attention_f64(np.array(q), np.array(ctx), np.array(ctx), 0.2)
    assert _rel_max(ops.attention(q, ctx, ctx, 0.2), ref_cross) <= 2e-6
    # a transposed last axis forces the kernel's contiguous copy
    kt = mx.array(rng.standard_normal((2, 4, 32, 60)).astype(np.float32)).swapaxes(-1, -2)
    assert _rel_max(ops.attention(q, kt, kt, 0.2), softmax_attention_f64(q, kt, kt, 0.2)) <= 2e-6


@needs_native
def test_flash_attention_propagates_nan_so_fail_closed_checks_fire():
    q = mx.ones((1, 1, 4, 8))
    k = mx.array(np.where(np.arange(32).reshape(1, 1, 4, 8) == 5, np.nan, 1.0).astype(np.float32))
    out = np.array(ops.attention(q, k, mx.ones((1, 1, 4, 8)), 0.5))
    assert np.isnan(out).all()


@needs_native
def test_flash_attention_keeps_no_score_matrix():
    """At 4096 tokens x 4 heads the score matrix alone is 256 MiB; the kernel's peak stays near its I/O."""
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, 4, 4096, 64)).astype(np.float32)) for _ in range(3))
    mx.eval(q, k, v)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(ops.attention(q, k, v, 0.125))
    extra = mx.get_peak_memory() - base
    assert extra <= 2 * q.nbytes, extra  # the output (4 MiB) and nothing score-sized
    assert ops.attention_peak_bytes(1, 4, 4096, 4096) < 8 * 1024**2


@needs_native
@pytest.mark.parametrize("shape,mod", [((2, 37, 96), (2, 1, 96)), ((1, 1, 8), (8,)), ((3, 129, 1536), (1, 1, 1536))])
def test_modulated_layer_norm_matches_float64(shape, mod):
    rng = np.random.default_rng(shape[1])
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    mul, add = (rng.standard_normal(mod).astype(np.float32) for _ in range(2))
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * mul + add
    out = ops.modulated_layer_norm(mx.array(x), mx.array(mul), mx.array(add), 1e-6)
    assert _rel_max(out, ref) <= 2e-6


@needs_native
def test_gelu_tanh_matches_torch_float64():
    torch = pytest.importorskip("torch")  # third-party reference
    x = (np.random.default_rng(1).standard_normal(100_003) * 5).astype(np.float32)
    x[:3] = [0.0, 40.0, -40.0]
    ref = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64), approximate="tanh").numpy()
    out = np.array(ops.gelu_tanh_fresh(mx.array(x) * 1.0))
    assert np.abs(out - ref).max() <= 2e-6 * np.abs(ref).max()


@needs_native
def test_rope_matches_the_mlx_path():
    from mlx_video.models import wan_dit

    cos, sin = wan_dit.rope_tables((3, 5, 7), 128)
    x = mx.array(np.random.default_rng(2).standard_normal((2, 105, 3, 128)).astype(np.float32))
    fast = wan_dit.apply_rope(x, cos, sin)
    x64 = np.array(x, np.float64).reshape(2, 105, 3, 64, 2)
    c, s = np.array(cos, np.float64), np.array(sin, np.float64)
    ref = np.stack([x64[..., 0] * c - x64[..., 1] * s, x64[..., 0] * s + x64[..., 1] * c], -1).reshape(2, 105, 3, 128)
    assert _rel_max(fast, ref) <= 1e-6


@needs_native
def test_dit_forward_is_the_same_on_both_paths(monkeypatch):
    """The whole DiT (attention, adaLN, GELU, RoPE) through the native kernels and through the MLX path."""
    from mlx_video.models import wan_dit

    config = wan_dit.WanDiTConfig(dim=64, ffn_dim=128, self_attn_heads=2, cross_attn_heads=2, head_dim=32,
                                  num_layers=2, text_dim=32, freq_dim=32, in_channels=4, out_channels=4, text_len=6)
    mx.random.seed(0)
    model = wan_dit.WanDiT(config)
    latents = mx.random.normal((1, 3, 6, 10, 4))
    context = mx.random.normal((1, 6, 32))
    fast = model(latents, mx.array([900.0]), context)
    monkeypatch.setitem(native._STATE, "module", None)
    assert not native.enabled() and not ops.native_attention_used()
    slow = model(latents, mx.array([900.0]), context)
    assert _rel_l2(fast, slow) <= 1e-6 and _rel_max(fast, slow) <= 1e-5


@needs_native
def test_a_stale_build_falls_back_with_a_reason(monkeypatch):
    from mlx_video import _native

    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(mx, "__version__", "0.0.1")
    assert not native.enabled() and not ops.native_attention_used()
    assert f"built for MLX {_native.mlx_version}" in native.describe() and "pip install -e ." in native.describe()
    q = mx.ones((1, 1, 3, 8))
    assert np.allclose(np.array(ops.attention(q, q, q, 0.5)), 1.0)  # the MLX path still answers


@needs_native
def test_disabled_by_environment_in_a_fresh_process():
    import subprocess
    import sys

    code = "import mlx_video.native as n; print(n.enabled()); print(n.describe())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "MLX_VIDEO_NATIVE": "0"})
    assert out.returncode == 0 and out.stdout.splitlines() == [
        "False", "CPU kernels: MLX/NumPy path (native kernels disabled by MLX_VIDEO_NATIVE)"]


def _conv64(x, w, b=None):
    """NHWC conv2d(padding 1) in float64 through PyTorch (w [O, 3, 3, C])."""
    torch = pytest.importorskip("torch")  # third-party reference
    xt = torch.tensor(np.asarray(x, np.float64)).permute(0, 3, 1, 2)
    wt = torch.tensor(np.asarray(w, np.float64)).permute(0, 3, 1, 2)
    bt = None if b is None else torch.tensor(np.asarray(b, np.float64))
    return torch.nn.functional.conv2d(xt, wt, bt, padding=1).permute(0, 2, 3, 1).numpy()


@needs_native
@pytest.mark.parametrize("n,h,w,c,o", [(1, 1, 1, 3, 5), (2, 13, 17, 8, 5), (1, 70, 33, 16, 24)])
def test_conv3x3_of_a_channel_concatenation_matches_float64(n, h, w, c, o):
    rng = np.random.default_rng(h * w)
    x, past = (rng.standard_normal((n, h, w, c)).astype(np.float32) for _ in range(2))
    weight, bias = rng.standard_normal((o, 3, 3, 2 * c)).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    ref = np.maximum(_conv64(np.concatenate([x, past], -1), weight, bias), 0)
    out = ops.native_conv3x3([mx.array(x), mx.array(past)], mx.array(weight), mx.array(bias), relu=True)
    assert out.shape == (n, h, w, o) and _rel_max(out, ref) <= 2e-6
    # MemBlock's first frame: the missing trailing channels are zeros
    first = ops.native_conv3x3([mx.array(x)], mx.array(weight), mx.array(bias))
    assert _rel_max(first, _conv64(np.concatenate([x, np.zeros_like(past)], -1), weight, bias)) <= 2e-6


@needs_native
def test_conv3x3_reads_a_tile_crop_in_place():
    rng = np.random.default_rng(5)
    frame = rng.standard_normal((1, 40, 50, 8)).astype(np.float32)
    weight = rng.standard_normal((6, 3, 3, 8)).astype(np.float32)
    crop = mx.array(frame)[:, 7:31, 11:44]  # strided rows, as tiled decoding passes them
    ref = _conv64(frame[:, 7:31, 11:44], weight)
    assert _rel_max(ops.native_conv3x3([crop], mx.array(weight)), ref) <= 2e-6
    permuted = mx.array(frame.transpose(0, 2, 1, 3).copy()).transpose(0, 2, 1, 3)  # pixels not adjacent: copied
    assert _rel_max(ops.native_conv3x3([permuted], mx.array(weight)), _conv64(frame, weight)) <= 2e-6


@needs_native
def test_upconv_matches_upsample_then_conv_in_float64(monkeypatch):
    from mlx_video.models import taehv

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 9, 14, 8)).astype(np.float32)
    layer = taehv.Conv(8, 12)
    layer.weight = mx.array(rng.standard_normal((12, 3, 3, 8)).astype(np.float32))
    layer.bias = mx.array(rng.standard_normal(12).astype(np.float32))
    up = torch.nn.functional.interpolate(torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2), scale_factor=2.0)
    ref = _conv64(up.permute(0, 2, 3, 1).numpy(), np.array(layer.weight), np.array(layer.bias))
    fast = taehv.upconv_forward(layer, mx.array(x))
    assert fast.shape == (2, 18, 28, 12) and _rel_max(fast, ref) <= 2e-6
    monkeypatch.setitem(native._STATE, "module", None)
    assert _rel_max(taehv.upconv_forward(layer, mx.array(x)), ref) <= 2e-6  # the MLX path agrees


def test_install_without_a_compiler_keeps_a_working_package(tmp_path):
    """setup.py's kernel build fails soft: no compiler -> one clear line, exit 0, no library, MLX path."""
    import shutil
    import subprocess

    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "native", tmp_path / "native")
    shutil.copytree(ROOT / "mlx_video", tmp_path / "mlx_video", ignore=shutil.ignore_patterns("_native*", "__pycache__"))
    env = {**__import__("os").environ, "CXX": "/bin/false", "CC": "/bin/false"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", str(tmp_path / "bt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mlx-video: native CPU kernels not built" in out.stderr and "the MLX path will be used" in out.stderr
    assert not list((tmp_path / "mlx_video").glob("_native*"))


def test_a_missing_build_runs_the_mlx_path_and_says_so(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setitem(sys.modules, "mlx_video._native", None)  # as when no library was built
    monkeypatch.delattr(mlx_video, "_native", raising=False)
    assert not native.enabled() and not ops.native_attention_used()
    assert native.describe().startswith("CPU kernels: MLX/NumPy path (native kernels not built")
    assert "pip install -e ." in native.describe()
    q = mx.ones((1, 1, 3, 8))
    assert np.allclose(np.array(ops.attention(q, q, q, 0.5)), 1.0)

