"""Model-folder stage (``--model DIR``): your own converted folder, end to end through ``pipeline.generate``.

The models are loaded once by an untimed warm-up run (loading is not what repeats measure), then each of
``--repeats`` runs is timed per stage (encode, denoise, decode) with the pipeline's own clock and MLX peak
counter, next to the planner's prediction for that stage. The prompt cache is off, so every run encodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import SHAPES, _load, time_stats

PROMPT = "a red fox running through fresh snow, morning light"


def bench_model_folder(args, folder: Path, shapes: list[str], work: Path, results: dict) -> None:
    from mlx_video import pipeline

    models = pipeline.Models(folder, args.dtype)
    for shape_name in shapes:
        h, w, f = SHAPES[shape_name]
        request = pipeline.GenerationRequest(prompt=PROMPT, height=h, width=w, frames=f, seed=args.seed)
        output = work / f"model-{shape_name}.mp4"
        print(f"[bench] model {folder.name} {shape_name} ({h}x{w}x{f})", file=sys.stderr, flush=True)

        def once():
            return pipeline.generate(folder, request, output, models=models, keep_models=True, prompt_cache=None)

        warm = once()  # loads the models (kept resident), untimed
        runs = [once() for _ in range(args.shape_repeats.get(shape_name, args.repeats))]
        per_stage = {name: [r.stages[name] for r in runs] for name in warm.stages}
        total = [sum(s.seconds for s in r.stages.values()) for r in runs]
        method = (f"pipeline.generate on {folder} (sampler from its config.json, {len(warm.metadata['timesteps'])} "
                  "steps), models loaded once by an untimed warm-up run; prompt cache off")
        for name, stats in per_stage.items():
            results["stages"].append({
                "stage": f"model:{name}", "model": folder.name, "shape": shape_name, "video": [h, w, f],
                "method": method,
                "mlx": {"time": time_stats([s.seconds for s in stats]),
                        "full_model_time_s": time_stats([s.seconds for s in stats])["median_s"],
                        "memory": {"mlx_peak_bytes": max(s.peak_memory_bytes for s in stats),
                                   "rss_peak_bytes": max(s.rss_bytes for s in stats)},
                        **({"predicted_peak_bytes": stats[0].predicted_peak_bytes}
                           if stats[0].predicted_peak_bytes else {})},
                "load_avg_end": _load()})
        results["stages"].append({
            "stage": "model:end_to_end", "model": folder.name, "shape": shape_name, "video": [h, w, f],
            "method": method, "warmup_s_with_loading": sum(s.seconds for s in warm.stages.values()),
            "mlx": {"time": time_stats(total), "full_model_time_s": time_stats(total)["median_s"],
                    "memory": {"mlx_peak_bytes": max(r.metadata["peak_memory_bytes"] for r in runs)}}})
    models.release("text_encoder", "dit", "decoder")
