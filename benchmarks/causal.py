"""Causal (block-by-block, KV-cached) generation: peak memory vs video length, time per block, cache bytes.

    python -m benchmarks.causal --model lightning --layers 2 --height 352 --width 624 --frames 21 42 \
        --window 12 --sink 3 --steps 1

Random weights (memory and time do not depend on their values). ``--layers`` < 30 keeps CPU runs short:
the KV cache and the weights scale with the layer count, the per-block working set does not. Peak memory
is MLX's peak counter minus what was live before the run (weights, prompt K/V, the noise), and the
planner's prediction (``causal.causal_peak_bytes``) is printed beside it. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mlx_video  # noqa: F401 - fast BLAS before MLX
import mlx.core as mx

from benchmarks.dit import dit_config
from mlx_video import causal, sampling
from mlx_video.models import wan_dit
from mlx_video.utils import parameter_count


def run(args) -> dict:
    cfg = dit_config(args.model, args.layers)
    dit = wan_dit.WanDiT(cfg)
    mx.eval(dit.parameters())
    text = dit.prepare_text(mx.random.normal((1, 512, cfg.text_dim)) * 0.1)
    mx.eval(text)
    window = dict(local_attn_frames=args.window, sink_frames=args.sink, max_frames=None) if args.window > 0 else {}
    ccfg = causal.CausalConfig(frames_per_block=args.frames_per_block, **window)
    steps = [1000, 750, 500, 250][:args.steps]
    scfg = sampling.sampler_config({"name": "fewstep", "denoising_step_list": steps})
    itemsize = 4 if mx.default_device() == mx.cpu else 2
    results = {"model": args.model, "layers": cfg.num_layers, "height": args.height, "width": args.width,
               "window": args.window, "sink": args.sink, "steps": len(steps), "device": str(mx.default_device()),
               "runs": []}
    for frames in args.frames:
        shape = (1, frames, args.height // 8, args.width // 8, 16)
        noise = mx.random.normal(shape)
        mx.eval(noise)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        stats, times = {}, []
        start = last = time.perf_counter()
        first = None
        for _ in causal.causal_blocks(dit, text, noise, scfg, ccfg, key=0, stats=stats):
            now = time.perf_counter()
            first = first or now - start
            times.append(now - last)
            last = now
        run_ = {"latent_frames": frames, "peak_working_set_bytes": int(mx.get_peak_memory() - base),
                "kv_cache_bytes": stats["kv_cache_bytes"], "first_block_s": round(first, 3),
                "seconds_per_block": round(sum(times) / len(times), 3), "blocks": len(times),
                "predicted_peak_bytes": causal.causal_peak_bytes(cfg, shape, 0, dit.attention_budget, ccfg, itemsize)
                - sum(2 * 512 * n * cfg.head_dim * 4 for n in cfg.cross_attn_heads)}
        results["runs"].append(run_)
        print(json.dumps(run_), file=sys.stderr, flush=True)
        del noise
    results["weights_bytes"] = parameter_count(dit) * 4
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lightning", choices=["lightning", "wan2.1-1.3b", "tiny"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--height", type=int, default=352)
    p.add_argument("--width", type=int, default=624)
    p.add_argument("--frames", type=int, nargs="+", default=[21, 42], help="latent frame counts to compare")
    p.add_argument("--frames-per-block", type=int, default=3)
    p.add_argument("--window", type=int, default=12, help="cache window in latent frames (-1: none)")
    p.add_argument("--sink", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, choices=[1, 2, 3, 4])
    print(json.dumps(run(p.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
