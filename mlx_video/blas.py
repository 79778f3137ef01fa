"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links a bundled reference BLAS (measured on a 2-core x86 box: ~2.6-6 GFLOP/s for
an fp32 1024^3 matmul). MLX resolves ``cblas_sgemm`` and friends through the dynamic linker, so a real
BLAS loaded with ``RTLD_GLOBAL`` *before* the first ``import mlx`` takes over (~190-330 GFLOP/s here).
The results are the same matmuls computed by a faster library (float rounding may differ in the last
ulps, as between any two BLAS builds).

Search order: ``$MLX_VIDEO_BLAS`` (a path, or ``none`` to disable; a path that does not exist or
cannot be loaded is named in the warning), MKL from the ``mkl`` pip package
(a dependency of mlx-video on Linux x86_64), then system OpenBLAS/BLIS (Debian ``libopenblas0-pthread``).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

STATE = {"library": None, "kind": "reference", "reason": "not attempted"}

_SYSTEM_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
]


def _mkl_candidates() -> list[str]:
    prefixes = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    found = []
    for prefix in prefixes:
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    return found


def _kind(path: str) -> str:
    name = os.path.basename(path)
    return "mkl" if "mkl" in name else "openblas" if "openblas" in name else "blis" if "blis" in name else "custom"


def ensure_fast_blas() -> dict:
    """Load the first optimized BLAS found, globally, unless MLX is already imported. Idempotent."""
    if STATE["reason"] != "not attempted":
        return STATE
    if not sys.platform.startswith("linux"):
        STATE.update(kind="platform", reason="MLX uses the platform BLAS (Accelerate on macOS)")
        return STATE
    requested = os.environ.get("MLX_VIDEO_BLAS", "").strip()
    if requested.lower() in {"none", "0", "off", "reference"}:
        STATE.update(reason="disabled by MLX_VIDEO_BLAS")
        return STATE
    if "mlx.core" in sys.modules:
        STATE.update(reason="mlx was imported before mlx_video; import mlx_video first to get a fast BLAS")
        warnings.warn("mlx-video: " + STATE["reason"], RuntimeWarning, stacklevel=3)
        return STATE
    candidates = [requested] if requested else _mkl_candidates() + _SYSTEM_CANDIDATES
    errors = []
    if requested and not os.path.isfile(requested):
        why = "is not a file" if os.path.exists(requested) else "does not exist"
        errors.append(f"MLX_VIDEO_BLAS={requested}: that path {why}")
    for path in candidates:
        if not os.path.exists(path):
            continue
        if "mkl" in os.path.basename(path):
            # GNU OpenMP threading: the same runtime PyTorch uses, so both can live in one process.
            os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        STATE.update(library=path, kind=_kind(path), reason="loaded")
        return STATE
    STATE.update(reason="no optimized BLAS found" + (f" ({'; '.join(errors)})" if errors else ""))
    warnings.warn(
        "mlx-video: " + (f"{'; '.join(errors)}: " if errors else "") + "no optimized BLAS found, so MLX uses its "
        "bundled reference BLAS and CPU matmuls run ~50-100x slower. Install one with `pip install mkl` (x86_64) "
        "or `apt-get install libopenblas0-pthread`, or point MLX_VIDEO_BLAS at a BLAS shared library.",
        RuntimeWarning,
        stacklevel=3,
    )
    return STATE
