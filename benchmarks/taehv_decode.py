"""Figures for the TAEHV decoder (issue #4): decode time and peak memory, MLX vs the PyTorch reference.

Random full-size ``taew2_1`` weights (``tests/taehv_reference.py``, fp32), converted with the real
converter; the same latents for every run. Sizes (the paper's): 13 latents -> 49 frames at 352x624 and
21 latents -> 81 frames at 480x832. Each measurement runs in a fresh process so that its peak is its own:

- ``mlx-stream``: :func:`mlx_video.models.taehv.decode_stream`, whole frames (the pipeline's mode);
- ``mlx-tiled``: the same with :func:`choose_tile` for ``--tile-budget`` x the untiled prediction (or
  ``--tile``; the smoke run uses 16-pixel tiles);
- ``mlx-parallel``: :func:`decode`, all frames in one graph (memory grows with T; off by default);
- ``torch-stream``: the reference decoding one latent at a time with its MemBlock memory carried
  (bounded memory; what PyTorch users run for long videos); ``torch-parallel``: all frames at once.

Peak memory: MLX's ``mx.get_peak_memory()`` (all MLX buffers, weights included) and, for every run, the
growth of the process's peak RSS during the decode (``VmHWM`` reset through ``/proc/self/clear_refs``).
MLX and PyTorch outputs are compared on three frames. Prints JSON::

    python -m benchmarks.taehv_decode                  # full size (minutes; run on a quiet machine)
    python -m benchmarks.taehv_decode --smoke          # tiny sizes, every mode, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_video.utils import max_rss_bytes

import numpy as np

SIZES = {"13x44x78": "13 latents -> 49 frames at 352x624", "21x60x104": "21 latents -> 81 frames at 480x832"}
DEFAULT_MODES = ("mlx-stream", "mlx-tiled", "torch-stream")
ALL_MODES = ("mlx-stream", "mlx-tiled", "mlx-parallel", "torch-stream", "torch-parallel")


def _rss_reset() -> int:
    from benchmarks.common import _rss_reset as reset

    return reset() or 0


def _status(field: str) -> int:
    from benchmarks.common import _status_bytes

    value = _status_bytes(field)
    return value if value is not None else max_rss_bytes()


def _samples(t_latent: int) -> list[int]:
    n = 4 * t_latent - 3
    return sorted({0, n // 2, n - 1})


def child(args) -> dict:
    """One measurement; writes sample frames to ``--work/<mode>-<size>.npz`` and returns the figures."""
    work = Path(args.work)
    z = np.load(work / f"latents-{args.size}.npy")  # [B, T, H, W, 16]
    t_lat = z.shape[1]
    keep = _samples(t_lat)
    samples = {}
    out: dict = {"mode": args.mode, "size": args.size}
    if args.mode.startswith("mlx"):
        import mlx_video  # noqa: F401  (fast BLAS before MLX)
        import mlx.core as mx

        from mlx_video.models import taehv

        model = taehv.load(work / "model", mx.float32)
        latents = mx.array(z)
        tile = None
        predicted = taehv.decoder_peak_bytes(model.config, z.shape)
        if args.mode == "mlx-tiled":
            tile = args.tile or taehv.choose_tile(model.config, z.shape, int(args.tile_budget * predicted))
            predicted = taehv.decoder_peak_bytes(model.config, z.shape, tile)
            out["tile"] = tile
        if args.mode != "mlx-parallel":
            out["predicted_peak_mib"] = round(predicted / 2**20, 1)
        list(taehv.decode_stream(model, latents[:, :1]))  # warm-up (one latent)
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        rss0 = _rss_reset()
        t0 = time.perf_counter()
        if args.mode == "mlx-parallel":
            frames = taehv.decode(model, latents)
            mx.eval(frames)
            for k in keep:
                samples[str(k)] = np.array(frames[0, k])
            first = None
        else:
            first = None
            for k, frame in enumerate(taehv.decode_stream(model, latents, tile=tile)):
                if first is None:
                    first = time.perf_counter() - t0
                if k in keep:
                    samples[str(k)] = np.array(frame[0])
        out["time_s"] = round(time.perf_counter() - t0, 3)
        out["mlx_peak_mib"] = round(mx.get_peak_memory() / 2**20, 1)
        if first is not None:
            out["first_frame_s"] = round(first, 3)
    else:
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.taehv_reference import TAEHVReference

        torch.set_num_threads(os.cpu_count() or 1)
        ref = TAEHVReference().eval()
        ref.load_state_dict(torch.load(work / "taew2_1.pth", weights_only=True))
        latents = torch.from_numpy(z).permute(0, 1, 4, 2, 3).contiguous()  # NTCHW
        ref.decode_video(latents[:, :1])  # warm-up
        rss0 = _rss_reset()
        t0 = time.perf_counter()
        first = None
        if args.mode == "torch-parallel":
            frames = ref.decode_video(latents)
            for k in keep:
                samples[str(k)] = frames[0, k].permute(1, 2, 0).numpy()
        else:
            k = 0
            for chunk in ref.decode_chunks(latents, 1):
                if first is None:
                    first = time.perf_counter() - t0
                for f in range(chunk.shape[1]):
                    if k in keep:
                        samples[str(k)] = chunk[0, f].permute(1, 2, 0).numpy().copy()
                    k += 1
        out["time_s"] = round(time.perf_counter() - t0, 3)
        if first is not None:
            out["first_frame_s"] = round(first, 3)
    out["rss_growth_mib"] = round((_status("VmHWM") - rss0) / 2**20, 1)
    out["frames"] = 4 * t_lat - 3
    out["s_per_frame"] = round(out["time_s"] / out["frames"], 4)
    np.savez(work / f"{args.mode}-{args.size}.npz", **samples)
    return out


def parent(args) -> dict:
    import mlx_video  # noqa: F401  (fast BLAS before MLX)
    import mlx.core as mx
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from converters.common import update_config
    from converters.taehv import convert_decoder
    from tests.taehv_reference import TAEHVReference, randomize_

    sizes = ["2x6x8", "3x5x7"] if args.smoke else args.sizes.split(",")
    modes = ALL_MODES if args.smoke and not args.modes else (args.modes.split(",") if args.modes else DEFAULT_MODES)
    with tempfile.TemporaryDirectory(prefix="taehv-bench-") as tmp:
        work = Path(tmp)
        ref = randomize_(TAEHVReference(), seed=args.seed)
        torch.save(ref.state_dict(), work / "taew2_1.pth")
        (work / "model").mkdir()
        section = convert_decoder(work / "taew2_1.pth", work / "model", mx.float32)
        update_config(work / "model", None, "decoder", section)
        rng = np.random.default_rng(args.seed)
        results, diffs = [], {}
        for size in sizes:
            t, h, w = (int(v) for v in size.split("x"))
            np.save(work / f"latents-{size}.npy", rng.standard_normal((1, t, h, w, 16)).astype(np.float32))
            for mode in modes:
                cmd = [sys.executable, "-m", "benchmarks.taehv_decode", "--child", "--work", str(work),
                       "--mode", mode, "--size", size, "--tile-budget", str(args.tile_budget)]
                if args.tile or args.smoke:
                    cmd += ["--tile", str(args.tile or 16)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                if proc.returncode != 0:
                    results.append({"mode": mode, "size": size, "error": proc.stderr.strip().splitlines()[-1:]})
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["latents"] = [t, h, w]
                res["output"] = f"{res['frames']} frames at {8 * h}x{8 * w}"
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
            got = {m: np.load(work / f"{m}-{size}.npz") for m in modes if (work / f"{m}-{size}.npz").exists()}
            base = next((m for m in ("torch-stream", "torch-parallel") if m in got), None)
            if base:
                diffs[size] = {m: float(max(np.abs(got[m][k] - got[base][k]).max() for k in got[base].files))
                               for m in got if m != base}
    return {
        "benchmark": "taehv_decode", "weights": "random taew2_1 (tests/taehv_reference.randomize_), fp32",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"mlx": mx.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "sizes": {s: SIZES.get(s, "smoke") for s in sizes},
        "results": results,
        "max_abs_diff_vs_torch": diffs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated TxHxW latent sizes")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(ALL_MODES)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (all modes unless --modes)")
    p.add_argument("--tile-budget", type=float, default=0.75,
                   help="mlx-tiled: memory budget as a fraction of the untiled streaming prediction")
    p.add_argument("--tile", type=int, default=None, help="mlx-tiled: this tile edge (pixels) instead of a budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    print(json.dumps(parent(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
