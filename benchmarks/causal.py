"""Causal (block-by-block, KV-cached) generation: peak memory vs video length, time per block, cache bytes.

``mlx-video bench --stages causal`` (:func:`bench_causal`): each causal preset (self-forcing, longlive,
rolling-forcing) side by side with the PyTorch causal loop of ``tests/causal_reference.py`` (diffusers blocks,
manual KV cache, float32 here) on the same weights, noise and re-noising draws: time to first block, time per
block, video frames per second, MLX peak memory with the KV cache, the planned peak and cache bytes at full
depth, and the two outputs' relative difference. Plus the memory plan's KV-cache table (no compute) at the
device and paper shapes, 21 and 84 latent frames, with and without a window.

Standalone (memory vs length only):

    python -m benchmarks.causal --model lightning --layers 2 --height 352 --width 624 --frames 21 42 \
        --window 12 --sink 3 --steps 1

Random weights (memory and time do not depend on their values). ``--layers`` < 30 keeps CPU runs short:
the KV cache and the weights scale with the layer count, the per-block working set does not. Peak memory
is MLX's peak counter minus what was live before the run (weights, prompt K/V, the noise), and the
planner's prediction (``causal.causal_peak_bytes``) is printed beside it. JSON on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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


# --------------------------------------------------------------------------------------------------
# `mlx-video bench --stages causal`
# --------------------------------------------------------------------------------------------------

# preset -> latent frames generated per shape class (the fewest that show the mechanism: two blocks, and
# Rolling Forcing's one full window); longer runs only add blocks of the same cost (windowed) or more keys
BENCH_PRESETS = {"self-forcing": 6, "longlive": 6, "rolling-forcing": 15}
PLAN_FRAMES = (21, 84)


def _preset(name: str):
    section = causal.preset_section(name)
    return sampling.sampler_config(section), causal.causal_config(section), section


def plan_table(models=("lightning", "wan2.1-1.3b"), shapes=("device", "paper"), itemsize: int = 2) -> list[dict]:
    """The memory plan's KV cache and predicted generate-stage peak at full depth (bf16 weights and cache, as on
    a GPU; no compute): per preset, shape and length. Self-Forcing/CausVid (no window) refuse more than 21."""
    from benchmarks.common import latent_shape

    rows = []
    for model in models:
        cfg = dit_config(model)
        for shape in shapes:
            for name in BENCH_PRESETS:
                _, ccfg, _ = _preset(name)
                for frames in PLAN_FRAMES:
                    lshape = (*latent_shape(shape)[:1], frames, *latent_shape(shape)[2:])
                    try:
                        ccfg.check_frames(frames)
                    except ValueError as exc:
                        rows.append({"model": model, "shape": shape, "preset": name, "latent_frames": frames,
                                     "refused": str(exc).split(";")[0]})
                        continue
                    rows.append({"model": model, "shape": shape, "preset": name, "latent_frames": frames,
                                 "window": ccfg.family != "self-forcing",
                                 "kv_cache_bytes": causal.cache_bytes(cfg, lshape, ccfg, itemsize),
                                 "predicted_peak_bytes_without_weights":
                                     causal.causal_peak_bytes(cfg, lshape, 0, 1 << 30, ccfg, itemsize)})
    return rows


def bench_causal(args, quick: bool, shapes: list[str], torch_side, mlx_dtype, work, results: dict) -> None:
    """One entry per (model, shape, preset) in ``results["stages"]`` (stage ``causal``), and the plan table in
    ``results["causal_plan"]``. Depth: ``--dit-layers`` of 30 blocks, times scaled by the block ratio (the
    per-block work is the same in every layer)."""
    import torch

    models = ["tiny"] if quick else args.models_list
    threads = torch.get_num_threads()
    if quick:  # tiny CI models: on a loaded 2-core machine PyTorch's second thread spins more than it works
        torch.set_num_threads(1)
    try:
        for model_name in models:
            _bench_model(args, model_name, quick, shapes, torch_side, mlx_dtype, work, results)
    finally:
        torch.set_num_threads(threads)
    results["causal_plan"] = plan_table(("tiny",) if quick else tuple(models),
                                        ("tiny",) if quick else ("device", "paper"))


def _bench_model(args, model_name, quick, shapes, torch_side, mlx_dtype, work, results) -> None:
    import gc

    import numpy as np

    from benchmarks.common import (SHAPES, Probe, _load, _rel_error, _timing_block, _paired_ratio, latent_shape,
                                   run_interleaved)
    from benchmarks.dit import _to_side, make_reference_dit, mlx_dit_from_reference
    from tests import causal_reference as ref

    full_cfg = dit_config(model_name)
    cfg = dit_config(model_name, None if quick else args.dit_layers)
    ref_model = make_reference_dit(cfg, seed=args.seed)
    mlx_model, _ = mlx_dit_from_reference(ref_model, cfg, work, mlx_dtype)
    ref_model = _to_side(ref_model, torch_side) if torch_side is not None else None
    rng = np.random.default_rng(args.seed)
    ctx_np = (rng.standard_normal((1, 64, cfg.text_dim)) * 0.5).astype(np.float32)
    text = mlx_model.prepare_text(mx.array(ctx_np))
    mx.eval(text)
    scale = full_cfg.num_layers / cfg.num_layers
    for shape_name in (["tiny"] if quick else shapes):
        base = latent_shape(shape_name)
        for name, frames in BENCH_PRESETS.items():
            scfg, ccfg, section = _preset(name)
            fpb, steps = ccfg.frames_per_block, scfg.steps
            lshape = (base[0], frames, *base[2:])
            noise_np = rng.standard_normal((1, 16, frames, base[2], base[3])).astype(np.float32)
            draws = [[rng.standard_normal((1, 16, fpb, base[2], base[3])).astype(np.float32)
                      for _ in range(steps - 1)] for _ in range(frames // fpb)]
            noise = mx.array(noise_np.transpose(0, 2, 3, 4, 1))
            injected = [[mx.array(d.transpose(0, 2, 3, 4, 1)) for d in blk] for blk in draws]
            mx.eval(noise, injected)
            marks: dict = {}

            def mlx_run(marks=marks, noise=noise, injected=injected, scfg=scfg, ccfg=ccfg):
                out, stats, start = [], {}, time.perf_counter()
                marks["mlx_blocks"] = []
                for x in causal.causal_blocks(mlx_model, text, noise, scfg, ccfg, renoise=injected, stats=stats):
                    mx.eval(x)
                    marks["mlx_blocks"].append(time.perf_counter() - start)
                    out.append(x)
                marks["kv_cache_bytes"] = stats.get("kv_cache_bytes")
                return mx.concatenate(out, axis=1)

            def ref_run(marks=marks, noise_np=noise_np, draws=draws, section=section, ccfg=ccfg):
                start = time.perf_counter()
                marks["ref_blocks"] = []
                on_block = lambda _b: marks["ref_blocks"].append(time.perf_counter() - start)  # noqa: E731
                common = dict(dtype=torch_side.dtype, on_block=on_block)
                if ccfg.family == "rolling-forcing":
                    return ref.rolling_loop(ref_model, noise_np, ctx_np, section["denoising_step_list"],
                                            section["shift"], section["warp"], draws, fpb,
                                            cache_frames=ccfg.rolling_cache_frames,
                                            attention_frames=ccfg.rolling_attention_frames, **common)
                window = ccfg.local_attn_frames if ccfg.windowed else -1
                return ref.causal_loop(ref_model, noise_np, ctx_np, section["denoising_step_list"],
                                       section["shift"], section["warp"], draws, fpb, window=window,
                                       sink=ccfg.sink_frames, longlive=ccfg.family == "longlive", **common)

            print(f"[bench] causal {name} {model_name} {shape_name} latents={lshape}", file=sys.stderr, flush=True)
            entry = {"stage": "causal", "model": model_name, "shape": shape_name, "preset": name,
                     "video": [*SHAPES[shape_name][:2], 4 * (frames - 1) + 1], "latent": list(lshape),
                     "latent_frames": frames, "frames_per_block": fpb, "steps": steps,
                     "layers_timed": cfg.num_layers, "layers_total": full_cfg.num_layers,
                     "method": f"timed on {cfg.num_layers} of {full_cfg.num_layers} DiT blocks, times scaled "
                               f"x{scale:g} (the KV cache and the per-block work scale with depth)"
                     if scale != 1 else "measured at full depth",
                     "settings": dataclasses.asdict(ccfg)}
            with Probe() as pm:
                out_mlx = np.array(mlx_run())
            entry["mlx"] = {"memory": pm.as_dict(), "kv_cache_bytes": marks["kv_cache_bytes"],
                            "predicted_peak_bytes": causal.causal_peak_bytes(
                                cfg, lshape, parameter_count(mlx_model) * 4, mlx_model.attention_budget, ccfg,
                                4 if mlx_dtype == mx.float32 else 2),
                            "full_depth_kv_cache_bytes": causal.cache_bytes(
                                full_cfg, lshape, ccfg, 4 if mlx_dtype == mx.float32 else 2)}
            sides = {"mlx": mlx_run}
            if ref_model is not None:
                with Probe(torch_side) as pr:
                    out_ref = ref_run()
                entry["reference"] = {"name": "PyTorch causal loop (tests/causal_reference.py, diffusers blocks, "
                                              "manual KV cache)", "memory": pr.as_dict(mlx=False)}
                entry["parity_rel_error"] = _rel_error(out_mlx.transpose(0, 4, 1, 2, 3), out_ref)
                sides["reference"] = ref_run
            samples = run_interleaved(sides, args.shape_repeats.get(shape_name, args.repeats)
                                      if isinstance(args.shape_repeats, dict) else args.repeats)
            video_frames = 4 * (frames - 1) + 1
            for side, key in (("mlx", "mlx_blocks"), ("reference", "ref_blocks")):
                if side not in samples:
                    continue
                d = entry[side]
                d["time"] = _timing_block(samples[side], os.cpu_count() or 1)
                blocks = np.array(marks[key]) * scale  # the last timed run's block marks
                per_block = np.diff(np.concatenate([[0.0], blocks]))
                d.update(full_model_time_s=d["time"]["median_s"] * scale,
                         time_to_first_block_s=float(blocks[0]),
                         seconds_per_block=[round(float(x), 4) for x in per_block],
                         steady_seconds_per_block=float(np.median(per_block[1:])) if len(per_block) > 1 else None,
                         video_fps=video_frames / (d["time"]["median_s"] * scale),
                         steady_video_fps=(4 * fpb / float(np.median(per_block[1:]))) if len(per_block) > 1
                         else None)
            if "reference" in samples:
                entry["ratio"] = _paired_ratio(samples["mlx"]["wall"], samples["reference"]["wall"])
            entry["load_avg_end"] = _load()
            results["stages"].append(entry)
            gc.collect()
            mx.clear_cache()


def markdown_lines(results: dict) -> list[str]:
    """The causal section of ``bench.md``."""
    from benchmarks.report import _b, _s

    rows = [s for s in results.get("stages", []) if s.get("stage") == "causal"]
    out = []
    if rows:
        out += ["## Causal (block-by-block) generation", "",
                "Times at full depth (scaled from the timed blocks, see Methods); time to first block = the first "
                "block's latents (its TAEHV decode adds ~1 decoder frame step); video fps = video frames / total "
                "generation time; steady = per block after the first. MLX peak: MLX's counter during the run, with "
                "the KV cache (timed depth); KV cache full depth: the memory plan's figure.", "",
                "| preset | model | shape | latent frames | MLX first block | MLX per block (steady) | MLX video fps | "
                "PyTorch first block | PyTorch per block | PyTorch video fps | ratio MLX/ref | MLX peak (timed depth) "
                "| KV cache (timed / full depth) | rel. diff |", "|" + "---|" * 14]
        for s in rows:
            m, r = s.get("mlx", {}), s.get("reference", {})
            ratio = s.get("ratio", {}).get("median")
            out.append("| " + " | ".join([
                s["preset"], s["model"], f"{s['shape']} ({s['video'][0]}x{s['video'][1]})", str(s["latent_frames"]),
                _s(m.get("time_to_first_block_s")), _s(m.get("steady_seconds_per_block")),
                f"{m['video_fps']:.3g}" if m.get("video_fps") else "–",
                _s(r.get("time_to_first_block_s")), _s(r.get("steady_seconds_per_block")),
                f"{r['video_fps']:.3g}" if r.get("video_fps") else "–",
                f"{ratio:.2f}" if ratio else "–", _b(m.get("memory", {}).get("mlx_peak_bytes")),
                f"{_b(m.get('kv_cache_bytes'))} / {_b(m.get('full_depth_kv_cache_bytes'))}",
                f"{s['parity_rel_error']:.1e}" if "parity_rel_error" in s else "–"]) + " |")
        out.append("")
    plan = results.get("causal_plan") or []
    if plan:
        out += ["KV cache in the memory plan (full depth, bf16; no compute):", "",
                "| model | shape | preset | latent frames | KV cache | planned peak without weights |",
                "|---|---|---|---|---|---|"]
        for p in plan:
            out.append(f"| {p['model']} | {p['shape']} | {p['preset']} | {p['latent_frames']} | "
                       + (f"refused: {p['refused']} | – |" if "refused" in p else
                          f"{_b(p['kv_cache_bytes'])} | {_b(p['predicted_peak_bytes_without_weights'])} |"))
        out.append("")
    return out
