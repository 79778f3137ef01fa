"""Write the recipe report: ``python -m mlx_video.recipe.report --model DIR --out mlx_video/recipe/results``.

Scores the scorer (rendered clips and noise), the teacher with its 50-step UniPC + CFG sampler, and
optionally a guidance and a step sweep; copies the per-stage loss curves; writes ``results.json``,
``README.md``, ``sweep.png`` and ``strip.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from . import score, world
from .evaluate import Generator, evaluate, frame_strip, ground_truth_videos


def _accuracy_row(acc: dict) -> str:
    return " | ".join(f"{acc[k] * 100:.1f}%" for k in ("colour", "shape", "motion", "all"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--guidance", type=float, nargs="*", default=[1.0, 3.0, 5.0, 8.0])
    p.add_argument("--steps", type=int, nargs="*", default=[10, 25])
    p.add_argument("--sweep-seeds", type=int, default=1)
    args = p.parse_args(argv)
    folder, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = world.eval_prompts()
    config = json.loads((folder / "config.json").read_text())
    results = {"model": str(folder), "prompts": len(prompts)}

    def gt(p, seed, progress):
        return ground_truth_videos(p, seed)

    results["scorer_ground_truth"], _ = evaluate(prompts, 3, gt, 35, progress=False)
    rng = np.random.default_rng(0)
    results["scorer_noise"], _ = evaluate(prompts, 1, lambda p, s, _: [rng.uniform(size=(17, 64, 64, 3)) for _ in p],
                                          35, progress=False)
    training = {}
    for stage in ("autoencoder", "text", "teacher"):
        log = folder / "train" / stage / "log.json"
        if log.exists():
            data = json.loads(log.read_text())
            training[stage] = {k: data.get(k) for k in ("steps", "wall_seconds", "steps_per_second", "loss_first",
                                                        "loss_last", "hparams")}
            if (folder / "train" / stage / "loss.png").exists():
                shutil.copyfile(folder / "train" / stage / "loss.png", out / f"loss_{stage}.png")
    training["teacher_prepare_seconds"] = config["dit"].get("recipe", {}).get("prepare_seconds")
    results["training"] = training
    gen = Generator(folder, {})
    results["autoencoder"] = gen.autoencoder(32)
    ae = gen.taehv.load(folder, encoder=True)

    def round_trip(p, seed, progress):  # the ceiling of any DiT on this autoencoder
        clips = ground_truth_videos(p, seed)
        out = []
        for s in range(0, len(clips), 7):
            y = gen.taehv.decode(ae, gen.taehv.encode(ae, gen.mx.array(np.stack(clips[s:s + 7]))))
            out += list(np.array(y))
        return out

    results["scorer_autoencoder_round_trip"], _ = evaluate(prompts, 1, round_trip, 35, progress=False)
    t0 = time.perf_counter()
    main_eval, first = evaluate(prompts, args.seeds, lambda p, s, pr: gen.videos(p, s, 35, pr), 35)
    main_eval["sampler"] = dict(vars(gen.sampler))
    results["teacher"] = main_eval
    pick = list(range(0, len(prompts), 13))[:8]
    frame_strip([first[i] for i in pick], [prompts[i] for i in pick], out / "strip.png", rows=len(pick))
    sweep = {"guidance": {}, "steps": {}}
    for g in args.guidance:
        if g == gen.sampler.guidance:
            continue
        sweep_gen = Generator(folder, {"guidance": g})
        sweep["guidance"][str(g)] = evaluate(prompts, args.sweep_seeds, lambda p, s, pr: sweep_gen.videos(p, s, 35, pr),
                                             35)[0]["accuracy"]
    for n in args.steps:
        sweep_gen = Generator(folder, {"steps": n})
        sweep["steps"][str(n)] = evaluate(prompts, args.sweep_seeds, lambda p, s, pr: sweep_gen.videos(p, s, 35, pr),
                                          35)[0]["accuracy"]
    results["sweep"] = sweep
    results["eval_seconds"] = round(time.perf_counter() - t0, 1)
    for r in (results["scorer_ground_truth"], results["scorer_noise"], results["scorer_autoencoder_round_trip"]):
        r.pop("rows", None)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot_sweep(sweep, main_eval["accuracy"], gen.sampler, out / "sweep.png")
    (out / "README.md").write_text(_markdown(results, config, gen.sampler))
    print(json.dumps({"teacher": main_eval["accuracy"], "sweep": sweep}, indent=1))
    return 0


def _plot_sweep(sweep: dict, base: dict, sampler, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for ax, key, value, label in ((axes[0], "guidance", sampler.guidance, "CFG guidance (50 steps)"),
                                  (axes[1], "steps", sampler.steps, f"UniPC steps (guidance {sampler.guidance:g})")):
        pts = {float(k): v for k, v in sweep[key].items()} | {float(value): base}
        xs = sorted(pts)
        for attr in ("colour", "shape", "motion", "all"):
            ax.plot(xs, [pts[x][attr] * 100 for x in xs], marker="o", label=attr)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(r: dict, config: dict, sampler) -> str:
    t = r["teacher"]
    acc = t["accuracy"]
    lines = [
        "# Recipe results: shapes world, autoencoder, text encoder and teacher DiT (toy scale)",
        "",
        "Produced by `python -m mlx_video.recipe.report` on the model written by `mlx-video recipe all` "
        "(seed 0) on a shared 2-core x86 CPU (MLX, fp32). Score from `mlx-video eval`: "
        f"{r['prompts']} canonical prompts (every colour x shape x motion), seeds 0..{t['accuracy']['videos'] // r['prompts'] - 1}.",
        "",
        f"## Teacher, {sampler.steps}-step UniPC + CFG {sampler.guidance:g} (shift {sampler.shift:g})",
        "",
        "| | colour | shape | motion | all correct |",
        "|---|---|---|---|---|",
        f"| teacher ({acc['videos']} videos) | {_accuracy_row(acc)} |",
        f"| scorer on rendered clips | {_accuracy_row(r['scorer_ground_truth']['accuracy'])} |",
        f"| scorer on noise | {_accuracy_row(r['scorer_noise']['accuracy'])} |",
        f"| autoencoder round trip of rendered clips (ceiling for any DiT on it) | "
        f"{_accuracy_row(r['scorer_autoencoder_round_trip']['accuracy'])} |",
        f"| chance | {_accuracy_row(score.chance_levels() | {'all': score.chance_levels()['all']})} |",
        "",
        "Targets: colour >= 95%, motion >= 90%, shape >= 80%.",
        "",
        f"Frame-to-frame consistency of the teacher's videos: background flicker "
        f"{t['consistency']['background_flicker']:.4f} (mean |change| of background pixels, 0-1 scale), "
        f"median relative spread of the shape's area over a clip {t['consistency']['area_spread']:.3f}.",
        f"Generation: {t['seconds_per_video']:.2f} s per video (batched 35 prompts, CFG: 2 DiT passes per step).",
        "",
        "Accuracy by expected value:",
        "",
    ]
    for attr, by in t["per_attribute_value"].items():
        lines.append(f"- {attr}: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in by.items()))
    lines += ["", "## Guidance and steps (seed 0)", "", "| setting | colour | shape | motion | all |", "|---|---|---|---|---|"]
    for key in ("guidance", "steps"):
        for k, v in r["sweep"][key].items():
            lines.append(f"| {key} {k} | {_accuracy_row(v)} |")
    lines += ["", "![sweep](sweep.png)", "", "## Autoencoder", ""]
    ae = r.get("autoencoder") or {}
    if ae:
        lines.append(f"Held-out round-trip PSNR {ae['psnr_db']:.2f} dB (min {ae['psnr_db_min']:.2f}) over {ae['clips']} "
                     f"clips of 17 frames at 64x64; latent mean {ae['latent_mean']:.3f}, std {ae['latent_std']:.3f}.")
    lines += ["", "## Training (one run, seed 0)", "", "| stage | steps | wall time | steps/s | loss first -> last |",
              "|---|---|---|---|---|"]
    for stage, v in r["training"].items():
        if isinstance(v, dict):
            lines.append(f"| {stage} | {v['steps']} | {v['wall_seconds'] / 60:.1f} min | {v['steps_per_second']} | "
                         f"{v['loss_first']:.4f} -> {v['loss_last']:.4f} |")
    if r["training"].get("teacher_prepare_seconds"):
        lines.append(f"\nThe teacher stage also spent {r['training']['teacher_prepare_seconds']:.0f} s encoding its "
                     "latent pool and caption table before training.")
    lines += ["", "Loss curves: " + ", ".join(f"![{s}](loss_{s}.png)" for s in ("autoencoder", "text", "teacher")), "",
              "## Frames", "", "![strip](strip.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
