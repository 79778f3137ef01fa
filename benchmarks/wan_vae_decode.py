"""Figures for the Wan2.1 VAE decoder (issue #17): decode time and peak memory, MLX vs diffusers
``AutoencoderKLWan`` on the same machine, and the Wan VAE vs TAEHV.

Random full-size Wan2.1 VAE weights (diffusers' init, seeded), converted with the real converter; the same
latents for every mode. Each measurement runs in a fresh process, so its peak is its own:

- ``mlx-stream``: :func:`mlx_video.models.wan_vae.decode_stream`, whole frames (the pipeline's default);
- ``mlx-tiled``: the same with :func:`choose_tile` for ``--tile-budget`` x the untiled prediction;
- ``torch``: diffusers ``AutoencoderKLWan.decode`` (one latent at a time through its feature cache, fp32);
- ``taehv``: the MLX TAEHV decoder (random ``taew2_1`` weights) on the same latents, for the speed ratio.

Peak memory: ``mx.get_peak_memory()`` for MLX (weights included) and, for every mode, the growth of the
process's peak RSS during the decode (``VmHWM`` reset through ``/proc/self/clear_refs``). MLX and diffusers
outputs are compared on every frame. Prints JSON::

    python -m benchmarks.wan_vae_decode --sizes 2x30x52          # 5 frames at 240x416 (minutes on 2 cores)
    python -m benchmarks.wan_vae_decode --sizes 5x60x104         # 17 frames at 480x832 (a quiet machine)
    python -m benchmarks.wan_vae_decode --smoke                  # tiny, seconds
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("mlx-stream", "mlx-tiled", "torch", "taehv")


def _rss_reset() -> int:
    from benchmarks.common import _rss_reset as reset

    return reset() or 0


def _hwm() -> int:
    from benchmarks.common import _status_bytes

    from mlx_video.utils import max_rss_bytes

    value = _status_bytes("VmHWM")
    return value if value is not None else max_rss_bytes()


def child(args) -> dict:
    work = Path(args.work)
    z = np.load(work / f"latents-{args.size}.npy")  # [B, T, H, W, 16], DiT space
    out: dict = {"mode": args.mode, "size": args.size, "frames": 4 * z.shape[1] - 3}
    frames = []
    if args.mode in ("mlx-stream", "mlx-tiled", "taehv"):
        import mlx_video  # noqa: F401  (fast BLAS before MLX)
        import mlx.core as mx

        from mlx_video.models import taehv, wan_vae

        module = taehv if args.mode == "taehv" else wan_vae
        model = module.load(work / "model", mx.float32)
        latents = mx.array(z)
        tile = None
        predicted = module.decoder_peak_bytes(model.config, z.shape)
        if args.mode == "mlx-tiled":
            try:
                tile = module.choose_tile(model.config, z.shape, int(args.tile_budget * predicted))
            except MemoryError as exc:
                return {**out, "skipped": f"no tiling fits {args.tile_budget} x the untiled prediction: {exc}"}
            predicted = module.decoder_peak_bytes(model.config, z.shape, tile)
            out["tile"] = tile
        out["predicted_peak_mib"] = round(predicted / 2**20, 1)
        list(module.decode_stream(model, latents[:, :1]))  # warm-up (one latent)
        mx.clear_cache()
        mx.reset_peak_memory()
        rss0 = _rss_reset()
        t0 = time.perf_counter()
        for frame in module.decode_stream(model, latents, tile=tile):
            frames.append(np.array(frame[0]))
        out["time_s"] = round(time.perf_counter() - t0, 3)
        out["mlx_peak_mib"] = round(mx.get_peak_memory() / 2**20, 1)
    else:
        import torch
        from diffusers import AutoencoderKLWan

        torch.set_num_threads(os.cpu_count() or 1)
        vae = AutoencoderKLWan.from_pretrained(work / "vae").eval()
        mean = np.array(vae.config.latents_mean, np.float32)
        std = np.array(vae.config.latents_std, np.float32)
        x = torch.from_numpy(z * std + mean).permute(0, 4, 1, 2, 3).contiguous()
        with torch.no_grad():
            vae.decode(x[:, :, :1])  # warm-up (one latent)
        rss0 = _rss_reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            video = vae.decode(x).sample  # [B, 3, F, H, W] in [-1, 1]
        out["time_s"] = round(time.perf_counter() - t0, 3)
        frames = list((video[0].permute(1, 2, 3, 0).numpy() * 0.5 + 0.5).clip(0, 1))
    out["rss_growth_mib"] = round((_hwm() - rss0) / 2**20, 1)
    out["s_per_frame"] = round(out["time_s"] / out["frames"], 4)
    np.save(work / f"{args.mode}-{args.size}.npy", np.stack(frames))
    return out


def parent(args) -> dict:
    import mlx_video  # noqa: F401  (fast BLAS before MLX)
    import mlx.core as mx
    import torch
    from diffusers import AutoencoderKLWan

    sys.path.insert(0, str(ROOT))
    from converters.common import update_config
    from converters.taehv import convert_decoder
    from converters.wan_vae import convert_vae
    from tests.taehv_reference import TAEHVReference, randomize_

    sizes = ["2x4x6"] if args.smoke else args.sizes.split(",")
    modes = args.modes.split(",") if args.modes else MODES
    with tempfile.TemporaryDirectory(prefix="wan-vae-bench-") as tmp:
        work = Path(tmp)
        torch.manual_seed(args.seed)
        AutoencoderKLWan().eval().save_pretrained(work / "vae")
        (work / "model").mkdir()
        update_config(work / "model", None, "vae", convert_vae(work / "vae", work / "model", mx.float32))
        torch.save(randomize_(TAEHVReference(), seed=args.seed).state_dict(), work / "taew2_1.pth")
        update_config(work / "model", work / "model", "decoder",
                      convert_decoder(work / "taew2_1.pth", work / "model", mx.float32))
        rng = np.random.default_rng(args.seed)
        results, diffs = [], {}
        for size in sizes:
            t, h, w = (int(v) for v in size.split("x"))
            np.save(work / f"latents-{size}.npy", rng.standard_normal((1, t, h, w, 16)).astype(np.float32))
            for mode in modes:
                cmd = [sys.executable, "-m", "benchmarks.wan_vae_decode", "--child", "--work", str(work),
                       "--mode", mode, "--size", size, "--tile-budget", str(args.tile_budget)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    results.append({"mode": mode, "size": size, "exit_status": proc.returncode,  # < 0: a signal
                                    "error": proc.stderr.strip().splitlines()[-3:]})
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                if "skipped" in res:
                    results.append(res)
                    continue
                res["output"] = f"{res['frames']} frames at {8 * h}x{8 * w}"
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
            got = {m: np.load(work / f"{m}-{size}.npy") for m in modes if (work / f"{m}-{size}.npy").exists()}
            if "torch" in got:
                diffs[size] = {m: float(np.abs(got[m] - got["torch"]).max()) for m in got
                               if m not in ("torch", "taehv")}
    by = {(r["mode"], r["size"]): r for r in results if "time_s" in r}
    ratios = {s: {k: round(by[a, s]["time_s"] / by[b, s]["time_s"], 2) for k, a, b in
                  (("torch/mlx", "torch", "mlx-stream"), ("wan-vae/taehv", "mlx-stream", "taehv"))
                  if (a, s) in by and (b, s) in by} for s in sizes}
    return {
        "benchmark": "wan_vae_decode", "weights": "random Wan2.1 VAE (diffusers init, seeded) and taew2_1, fp32",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"mlx": mx.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "results": results, "time_ratios": ratios, "max_abs_diff_vs_diffusers_on_0_1_frames": diffs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2x30x52", help="comma-separated TxHxW latent sizes (e.g. 5x60x104)")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--smoke", action="store_true", help="a tiny size, every mode")
    p.add_argument("--tile-budget", type=float, default=0.95,
                   help="mlx-tiled: memory budget as a fraction of the untiled streaming prediction")
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
