"""The optional native CPU kernels (``native/``, built by ``pip install -e .`` on Linux).

``mlx_video._native`` holds MLX primitives whose ``eval_cpu`` is threaded C++: flash attention (blocks of
Q K^T through the loaded BLAS, online softmax, no score matrix), the adaLN modulated LayerNorm, tanh-GELU
and Wan's RoPE, all fp32. :mod:`mlx_video.ops` routes CPU fp32 work here when :func:`enabled` is true,
and keeps the MLX/NumPy path otherwise (GPUs, half precision, a missing or stale build, or
``MLX_VIDEO_NATIVE=0``).
"""

from __future__ import annotations

import os

import mlx.core as mx

_STATE: dict = {}


def _load() -> dict:
    if _STATE:
        return _STATE
    if os.environ.get("MLX_VIDEO_NATIVE", "1").strip().lower() in {"0", "off", "no", "false"}:
        _STATE.update(module=None, reason="disabled by MLX_VIDEO_NATIVE")
        return _STATE
    try:
        from . import _native
    except ImportError as exc:
        _STATE.update(module=None, reason=f"not built ({exc.__class__.__name__}: {exc}); "
                                          "reinstall with `pip install -e .` where a C++ compiler is available")
        return _STATE
    if _native.mlx_version != mx.__version__:
        _STATE.update(module=None, reason=f"built for MLX {_native.mlx_version} but MLX {mx.__version__} is "
                                          "installed; rebuild with `pip install -e .`")
    elif not _native.blas_available():
        _STATE.update(module=None, reason="no cblas_sgemm in this process (no BLAS loaded)")
    else:
        try:  # arrays cross from Python into the extension only if both share MLX's nanobind domain
            ok = abs(_native.gelu_tanh(mx.array([1.0])).item() - 0.8411920070648193) < 1e-6
        except TypeError as exc:
            ok, why = False, str(exc).splitlines()[0]
        else:
            why = "self-check gave a wrong value"
        _STATE.update(module=_native if ok else None,
                      reason=f"{_native.num_threads()} threads" if ok else f"unusable ({why})")
    return _STATE


def enabled() -> bool:
    """True when the native kernels are loaded and the default device is the CPU."""
    return _load()["module"] is not None and mx.default_device() == mx.cpu


def kernels():
    """The extension module (only call when :func:`enabled`)."""
    return _load()["module"]


def describe() -> str:
    """One line saying which CPU path is in use and why."""
    state = _load()
    if state["module"] is not None:
        return f"CPU kernels: native (mlx_video._native, {state['reason']})"
    return f"CPU kernels: MLX/NumPy path (native kernels {state['reason']})"
