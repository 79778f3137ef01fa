"""The fast-BLAS loader: active after a plain install on Linux, much faster, same results, clear fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from mlx_video import blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate on macOS")

TIMER = textwrap.dedent("""
    import time, sys
    import mlx_video, mlx.core as mx
    a = mx.random.normal((1024, 1024), key=mx.random.key(0)); b = mx.random.normal((1024, 1024), key=mx.random.key(1))
    mx.eval(a @ b)
    best = 1e9
    for _ in range(REPEATS):
        t = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - t)
    print(best)
""")


def _best_matmul_seconds(env: dict, repeats: int) -> float:
    out = subprocess.run([sys.executable, "-c", TIMER.replace("REPEATS", str(repeats))], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@linux_only
def test_fast_blas_is_loaded_by_the_install():
    assert blas.STATE["reason"] == "loaded", blas.STATE
    assert blas.STATE["kind"] in {"mkl", "openblas", "blis"}


@linux_only
def test_fast_blas_is_at_least_20x_the_reference_blas():
    reference = _best_matmul_seconds({"MLX_VIDEO_BLAS": "none"}, repeats=2)
    fast = _best_matmul_seconds({}, repeats=10)
    assert reference / fast >= 20, f"reference {reference:.3f}s vs fast {fast:.4f}s"


def test_results_are_unchanged():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((257, 300)).astype(np.float32), rng.standard_normal((300, 129)).astype(np.float32)
    out = np.array(mx.array(a) @ mx.array(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(out - exact).max() / np.abs(exact).max() < 1e-5


@linux_only
def test_missing_blas_falls_back_with_one_clear_warning():
    code = "import warnings; warnings.simplefilter('always'); import mlx_video, mlx.core as mx; print(mx.sum(mx.ones(3)).item())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLX_VIDEO_BLAS": "/nonexistent/libblas.so"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3.0"
    assert out.stderr.count("no optimized BLAS found") == 1
    assert "pip install mkl" in out.stderr


@linux_only
def test_importing_mlx_first_is_reported():
    code = "import warnings; warnings.simplefilter('always'); import mlx.core; import mlx_video"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "import mlx_video first" in out.stderr
