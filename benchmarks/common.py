"""Shared benchmark plumbing: shapes, timing and memory probes, the reference runtime, machine facts, and the
matmul-rate stage. Each stage lives in its own module (``dit.py``, ``text.py``, ``decoder.py``, ``pipeline.py``);
``derive.py`` turns measured stages into the derived sections; ``cli.py`` is the command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx_video  # fast BLAS before MLX

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "mlx-video-bench/1"
GB = 1024**3

# Video shapes (height, width, frames). "tiny" is for --quick; the others are real settings.
SHAPES = {
    "tiny": (32, 48, 5),
    "small": (160, 288, 17),
    "device": (352, 624, 49),  # the paper's on-device setting (iPhone 16 Pro Max: 73 s)
    "paper": (480, 832, 81),  # the paper's full setting
}
DIT_MODELS = ("lightning", "wan2.1-1.3b")
DEVICE_TARGET_BYTES = int(3.5 * GB)
DEFAULT_TIMESTEP = 937.5  # the first warped few-step timestep


# --------------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_reset() -> int | None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so that the next RSS growth is not hidden by reuse."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class Probe:
    """Peak memory of a block of work: MLX's peak counter (reset on entry) and the process's peak RSS growth."""

    def __init__(self, torch_side=None):
        self.torch_side = torch_side

    def __enter__(self):
        import mlx.core as mx

        gc.collect()
        mx.synchronize()
        mx.clear_cache()
        _malloc_trim()
        mx.reset_peak_memory()
        if self.torch_side is not None:
            self.torch_side.reset_peak()
        self.rss0 = _rss_reset()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        import mlx.core as mx

        mx.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0
        self.mlx_peak = int(mx.get_peak_memory())
        peak = _status_bytes("VmHWM")
        self.rss_peak = peak
        self.rss_growth = None if peak is None or self.rss0 is None else max(0, peak - self.rss0)
        self.torch_peak = self.torch_side.peak() if self.torch_side is not None else None
        return False

    def as_dict(self, mlx: bool = True) -> dict:
        d = {"rss_peak_bytes": self.rss_peak, "rss_growth_bytes": self.rss_growth, "rss_before_bytes": self.rss0}
        if mlx:
            d["mlx_peak_bytes"] = self.mlx_peak
        if self.torch_peak is not None:
            d["torch_device_peak_bytes"] = self.torch_peak
        return d


def time_stats(samples: list[float]) -> dict:
    s = sorted(samples)
    med = statistics.median(s)
    return {"median_s": med, "min_s": s[0], "max_s": s[-1],
            "spread": (s[-1] - s[0]) / med if med > 0 else 0.0,
            "stdev_s": statistics.stdev(s) if len(s) > 1 else 0.0, "repeats": len(s),
            "samples_s": [round(x, 6) for x in samples]}


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _mlx_op_table(acc: dict[str, float], total: float, other_label: str) -> dict:
    """Per-op MLX times (each op timed on its own), largest first, plus the unattributed rest."""
    other = max(0.0, total - sum(acc.values()))
    ops_ = sorted(acc.items(), key=lambda kv: -kv[1]) + [(other_label, other)]
    return {"total_s": total, "method": "each op evaluated and timed on its own (inputs evaluated first)",
            "ops": [{"op": k, "seconds": v, "fraction": v / total} for k, v in ops_]}


def _record_timings(entry: dict, samples: dict, flops: float, scale: float) -> None:
    """Timing block, achieved FLOP/s and full-model scaling per side; the paired MLX/reference ratio."""
    for side, s in samples.items():
        d = entry.setdefault(side, {})
        d["time"] = _timing_block(s, os.cpu_count() or 1)
        d["achieved_flops_per_s"] = flops / d["time"]["median_s"]
        _scaled(d, scale)
    if "reference" in samples:
        entry["ratio"] = _paired_ratio(samples["mlx"]["wall"], samples["reference"]["wall"])
    entry["load_avg_end"] = _load()


def run_interleaved(fns: dict, repeats: int) -> dict:
    """Run each callable ``repeats`` times, alternating which goes first; returns per-name samples and CPU use."""
    names = list(fns)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            wall, cpu = _timed(fns[n])
            out[n]["wall"].append(wall)
            out[n]["cpu"].append(cpu)
    return out


def _timing_block(samples: dict, cores: int) -> dict:
    t = time_stats(samples["wall"])
    t["cpu_utilisation"] = round(sum(samples["cpu"]) / max(1e-9, sum(samples["wall"])) / cores, 3)
    return t


def _paired_ratio(a: list[float], b: list[float]) -> dict:
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "of_medians": statistics.median(a) / statistics.median(b)}


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _rel_error(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class TorchSide:
    """Where and in what dtype the reference runs (CPU fp32 here; CUDA on a GPU machine)."""

    def __init__(self, device: str, dtype: str):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return int(self.torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None

    def tensor(self, array, dtype=None):
        import numpy as np

        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype or self.dtype)


def _reference_modules():
    """Import the PyTorch references that live in ``tests/`` (run from a checkout)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import tests.dit_reference  # noqa: F401
        import tests.taehv_reference  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the PyTorch references live in {ROOT / 'tests'}; run from a source checkout "
                           f"or pass --no-reference ({exc})") from None


# --------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------


def machine_info(label: str | None) -> dict:
    info = {"label": label, "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_start": _load()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            import subprocess

            info["cpu_model"] = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                               text=True, check=False).stdout.strip()
    with contextlib.suppress(Exception):
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    if "memory_bytes" not in info:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return info


def versions() -> dict:
    import mlx.core as mx
    import numpy as np

    out = {"mlx_video": mlx_video.__version__, "mlx": mx.__version__, "numpy": np.__version__}
    from importlib.metadata import version

    for name in ("torch", "diffusers", "transformers"):  # installed versions, without importing them (seconds)
        with contextlib.suppress(Exception):
            out[name] = version(name)
    return out


def backend_info(args, torch_side) -> dict:
    import mlx.core as mx

    from mlx_video.blas import STATE

    info = {"mlx_device": str(mx.default_device()), "dtype": args.dtype, "blas": dict(STATE),
            "reference": None if torch_side is None else {"device": str(torch_side.device), "dtype": args.dtype}}
    if torch_side is not None:
        t = torch_side.torch
        info["reference"]["threads"] = t.get_num_threads()
        with contextlib.suppress(Exception):
            info["reference"]["sdpa_backend_cpu_flash"] = bool(t.backends.cpu.get_cpu_capability())
            info["reference"]["cpu_capability"] = t.backends.cpu.get_cpu_capability()
    return info


# --------------------------------------------------------------------------------------------------
# Matmul rate
# --------------------------------------------------------------------------------------------------


def bench_matmul(n: int, repeats: int, torch_side, mlx_dtype) -> dict:
    """fp32 (or the run's dtype) ``n x n`` matmul rate of MLX and of PyTorch (both MKL on Linux x86)."""
    import mlx.core as mx

    a = mx.random.normal((n, n)).astype(mlx_dtype)
    b = mx.random.normal((n, n)).astype(mlx_dtype)
    mx.eval(a, b)
    fns = {"mlx": lambda: mx.eval(a @ b)}
    if torch_side is not None:
        ta = torch_side.torch.randn(n, n, device=torch_side.device, dtype=torch_side.dtype)
        tb = torch_side.torch.randn(n, n, device=torch_side.device, dtype=torch_side.dtype)

        def torch_mm():
            ta @ tb
            torch_side.sync()

        fns["torch"] = torch_mm
    for f in fns.values():
        f()  # warm-up
    samples = run_interleaved(fns, repeats)
    flops = 2 * n**3
    out = {"n": n, "flops": flops}
    for name, s in samples.items():
        med = statistics.median(s["wall"])
        out[name] = {"median_flops_per_s": flops / med, "best_flops_per_s": flops / min(s["wall"]),
                     "samples_s": [round(x, 6) for x in s["wall"]]}
    out["peak_flops_per_s"] = max(v["median_flops_per_s"] for k, v in out.items() if isinstance(v, dict))
    return out



# --------------------------------------------------------------------------------------------------
# Shapes and budgets (the pipeline's own rules)
# --------------------------------------------------------------------------------------------------


def _model_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return int(sum(v.nbytes for _, v in tree_flatten(model.parameters())))


def latent_shape(shape_name: str):
    from mlx_video.pipeline import GenerationRequest

    h, w, f = SHAPES[shape_name]
    return GenerationRequest(prompt="benchmark", height=h, width=w, frames=f).latent_shape()


def request_for(shape_name: str, **kw):
    from mlx_video.pipeline import GenerationRequest

    h, w, f = SHAPES[shape_name]
    return GenerationRequest(prompt="benchmark", height=h, width=w, frames=f, **kw)


def attention_budget(limit: int | None = None, low_memory: bool = False) -> int:
    """The pipeline's first attention budget for a memory limit (the device-setting prediction uses it)."""
    from mlx_video.pipeline import default_attention_budget, default_memory_limit

    return default_attention_budget(limit or default_memory_limit(), low_memory)


def _scaled(entry: dict, scale: float) -> None:
    """Add full-model estimates to a runtime's figures (time x FLOP ratio)."""
    entry["full_model_time_s"] = entry["time"]["median_s"] * scale


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence what native code writes to fd 2 meanwhile (the PyTorch profiler's C++ start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
