"""Measure the Lightning Video recipe's claims at toy scale and write ``recipe/results/student/``.

    python -m mlx_video.recipe.student_report --teacher T --work W --part main        # the shipped pipeline
    python -m mlx_video.recipe.student_report --teacher T --work W --part ablations   # baselines (parallel)
    python -m mlx_video.recipe.student_report --teacher T --work W --part report --out mlx_video/recipe/results/student

``main``: Taylor prune -> Stage I (with layer alignment) -> Stage II -> DMD distillation (``W/main``: the same
functions as ``mlx-video recipe prune|stage1|stage2|distill``), then scores the teacher (UniPC + CFG), the
Stage II student (same sampler), the distilled generator (4 steps, no CFG) and, as the no-distillation
baseline, the Stage II student sampled with the same 4-step sampler. ``ablations``: magnitude and random
initialisation, Stage I without layer alignment, Stage II alone (as many steps as Stage I + II), each scored
after training. Every Stage I run records the flow-matching loss of a fixed validation batch before training
and every ``--eval-every`` steps. Each experiment's result is cached in ``W/results/<name>.json``, so a part
can be rerun after an interruption. Scores: ``mlx-video eval``'s prompts (105) and seeds 0..N-1 everywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from . import score, world
from .stages import SIZES

ATTRS = ("colour", "shape", "motion", "all")
TARGETS = {"colour": 0.90, "motion": 0.85, "shape": 0.75}


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _save(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def score_folder(folder: Path, seeds: int, overrides: dict | None = None, batch: int = 35) -> dict:
    """``mlx-video eval`` on ``folder`` (fixed 105 prompts, seeds 0..seeds-1), plus DiT evaluations per video
    and an unbatched wall time per video (one prompt at a time, as `generate` runs)."""
    from .evaluate import Generator, evaluate

    gen = Generator(folder, overrides or {})
    prompts = world.eval_prompts()
    result, first = evaluate(prompts, seeds, lambda p, s, pr: gen.videos(p, s, batch, pr), batch, progress=False)
    sampler = gen.sampler
    evals = sampler.steps * (2 if sampler.uses_cfg else 1)
    t0 = time.perf_counter()
    single = 5
    for i in range(single):
        gen.videos([prompts[i * 17]], 0, 1)
    rows = result.pop("rows")
    return {"folder": str(folder), "sampler": dict(vars(sampler)), "accuracy": result["accuracy"],
            "per_attribute_value": result["per_attribute_value"], "consistency": result["consistency"],
            "dit_evals_per_video": evals, "seconds_per_video_batched": result["seconds_per_video"],
            "seconds_per_video_single": round((time.perf_counter() - t0) / single, 4), "load": load_average(),
            "rows": [{k: r[k] for k in ("prompt", "seed", "colour", "shape", "motion", "all")} for r in rows]}


def _stage1(name, work, teacher, data, sizes, init, steps, eval_every, align_layers=True, seed=0, stop_after=None):
    from . import student as S

    folder = work / name / S.STUDENT
    if (folder / "train" / "stage1" / "log.json").exists() and _load(work / "results" / f"{name}.json"):
        return
    shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.perf_counter()
    report = S.prune_student(teacher, folder, init, seed, progress=False)
    prune_s = time.perf_counter() - t0
    summary = S.train_student_stage("stage1", folder, teacher, steps, seed, False, sizes, progress=False,
                                    align_layers=align_layers, data=data, eval_every=eval_every, stop_after=stop_after)
    _save(work / "results" / f"{name}.json", {"init": init, "align_layers": align_layers, "prune_seconds": prune_s,
                                              "finished": summary["finished"], "stopped_after": stop_after,
                                              "parameters": report["parameters"], "widths": report["widths"],
                                              "stage1": _brief(summary), "load": load_average()})


def _brief(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("steps", "wall_seconds", "steps_per_second", "loss_first", "loss_last",
                                        "validation", "critic_loss_first", "critic_loss_last", "prepare_seconds")}


NO_SCORE = False  # --no-score: training curves only (a weak teacher scores at chance; saves the eval time)


def _scored(work: Path, name: str, folder: Path, seeds: int, overrides: dict | None = None) -> dict | None:
    path = work / "results" / f"score-{name}.json"
    cached = _load(path)
    if cached or NO_SCORE:
        return cached
    result = score_folder(folder, seeds, overrides)
    _save(path, result)
    print(f"{name}: " + "  ".join(f"{k} {result['accuracy'][k] * 100:.1f}%" for k in ATTRS), flush=True)
    return result


def part_main(args, teacher: Path, work: Path, sizes) -> None:
    from . import distill as D
    from . import student as S

    data = S.training_data(teacher, args.seed, sizes, False, work / "pool.npz")
    _stage1("main", work, teacher, data, sizes, "taylor", args.stage1_steps, args.eval_every, seed=args.seed)
    folder = work / "main" / S.STUDENT
    if not _load(work / "results" / "main-stage2.json"):
        shutil.rmtree(folder / "train" / "stage2", ignore_errors=True)
        _scored(work, "stage1-taylor", folder, args.seeds)
        summary = S.train_student_stage("stage2", folder, teacher, args.stage2_steps, args.seed, False, sizes,
                                        progress=False, data=data, eval_every=args.eval_every)
        _save(work / "results" / "main-stage2.json", {"stage2": _brief(summary), "load": load_average()})
    _scored(work, "teacher", teacher, args.seeds)
    _scored(work, "student", folder, args.seeds)
    _scored(work, "student-4step", folder, args.seeds, {k: v for k, v in D.FEWSTEP_SAMPLER.items() if k != "defaults"})
    if args.skip_distill:
        return
    if not _load(work / "results" / "main-distill.json"):
        shutil.rmtree(work / "main" / D.DISTILLED, ignore_errors=True)
        summary = D.train_distill(work / "main", args.distill_steps, args.seed, False, sizes, teacher=teacher,
                                  progress=False, checkpoint_every=50, batch=args.distill_batch)
        _save(work / "results" / "main-distill.json", {"distill": _brief(summary), "load": load_average()})
    _scored(work, "distilled", work / "main" / D.DISTILLED, args.seeds)


def part_scores(args, teacher: Path, work: Path, sizes) -> None:
    """Score the main pipeline's models as they appear (a second process beside ``--part main --no-score``)."""
    from . import distill as D
    from . import student as S

    fewstep = {k: v for k, v in D.FEWSTEP_SAMPLER.items() if k != "defaults"}
    folder = work / "main" / S.STUDENT
    jobs = [("teacher", teacher, None, None), ("student", folder, None, "main-stage2"),
            ("student-4step", folder, fewstep, "main-stage2"), ("distilled", work / "main" / D.DISTILLED, None,
                                                                 "main-distill")]
    deadline = time.time() + args.wait
    while jobs and time.time() < deadline:
        ready = [j for j in jobs if j[3] is None or _load(work / "results" / f"{j[3]}.json")]
        if not ready:
            time.sleep(20)
            continue
        name, f, overrides, _ = ready[0]
        _scored(work, name, f, args.seeds, overrides)
        jobs.remove(ready[0])


def part_ablations(args, teacher: Path, work: Path, sizes) -> None:
    from . import student as S

    data = S.training_data(teacher, args.seed, sizes, False, work / "pool.npz")
    stop = args.ablation_stop  # the main run's schedule, cut short: comparable curves for less time, no score
    for init in ("magnitude", "random"):
        _stage1(f"init-{init}", work, teacher, data, sizes, init, args.stage1_steps, args.eval_every, seed=args.seed,
                stop_after=stop)
        if (_load(work / "results" / f"init-{init}.json") or {}).get("finished"):
            _scored(work, f"stage1-{init}", work / f"init-{init}" / S.STUDENT, args.seeds)
    _stage1("no-layer-align", work, teacher, data, sizes, "taylor", args.stage1_steps, args.eval_every,
            align_layers=False, seed=args.seed, stop_after=stop)
    if (_load(work / "results" / "no-layer-align.json") or {}).get("finished"):
        _scored(work, "stage1-no-layer-align", work / "no-layer-align" / S.STUDENT, args.seeds)
    if stop:
        return
    name = "stage2-only"
    folder = work / name / S.STUDENT
    if not _load(work / "results" / f"{name}.json"):
        shutil.rmtree(work / name, ignore_errors=True)
        S.prune_student(teacher, folder, "taylor", args.seed, progress=False)
        summary = S.train_student_stage("stage2", folder, teacher, args.stage1_steps + args.stage2_steps, args.seed,
                                        False, sizes, progress=False, data=data, eval_every=args.eval_every)
        _save(work / "results" / f"{name}.json", {"stage2": _brief(summary), "load": load_average()})
    _scored(work, name, folder, args.seeds)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _row(acc: dict) -> str:
    return " | ".join(f"{acc[k] * 100:.1f}%" for k in ATTRS)


def _curve(result: dict | None, stage: str = "stage1") -> list:
    return (result or {}).get(stage, {}).get("validation") or []


def part_report(args, teacher: Path, work: Path, out: Path, sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import distill as D
    from . import student as S
    from .evaluate import Generator, frame_strip

    out.mkdir(parents=True, exist_ok=True)
    R = {p.stem: _load(p) for p in sorted((work / "results").glob("*.json"))}
    teacher_cfg = json.loads((teacher / "config.json").read_text())
    results = {"teacher": str(teacher), "targets": TARGETS, "seeds": args.seeds, "prompts": len(world.eval_prompts()),
               "experiments": R, "chance": score.chance_levels(), "load_at_report": load_average()}
    # validation FM loss of the teacher itself: the floor a student can reach
    if (work / "main" / S.STUDENT).exists():
        from ..models import wan_dit

        data = S.training_data(teacher, args.seed, sizes, False, work / "pool.npz")
        cfg = wan_dit.load(teacher).config
        results["teacher_validation_fm"] = S.fm_loss(wan_dit.load(teacher), S.validation_batch(data, args.seed,
                                                                                              cfg.freq_dim))
    scores = {k[len("score-"):]: v for k, v in R.items() if k.startswith("score-") and v}
    # the same prompts and seeds for every model: the seeds all of them were scored with
    from .evaluate import _breakdown

    seeds = min((1 + max(r["seed"] for r in v["rows"]) for v in scores.values() if v.get("rows")), default=0)
    results["scored_seeds"] = seeds
    for v in scores.values():
        rows = [r for r in v.pop("rows", []) if r["seed"] < seeds]
        if rows and len(rows) != v["accuracy"]["videos"]:
            v["accuracy_all_seeds"] = v["accuracy"]
            v["accuracy"], v["per_attribute_value"] = score.summarise(rows), _breakdown(rows)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    # plots: init curves, layer alignment, gating
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for ax, runs, title in (
            (axes[0], [("Taylor", R.get("main")), ("magnitude", R.get("init-magnitude")), ("random", R.get("init-random"))],
             "initialisation: Stage I validation FM loss"),
            (axes[1], [("with layer alignment", R.get("main")), ("without", R.get("no-layer-align"))],
             "Stage I: layer alignment"),
            (axes[2], [], "Stage I+II vs Stage II alone")):
        for label, r in runs:
            c = _curve(r)
            if c:
                ax.plot([p["step"] for p in c], [p["fm"] for p in c], marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("steps")
        ax.set_ylabel("validation FM loss")
        ax.set_yscale("log")
    c1, c2 = _curve(R.get("main")), _curve(R.get("main-stage2"), "stage2")
    if c1 and c2:
        n1 = c1[-1]["step"]
        axes[2].plot([p["step"] for p in c1] + [n1 + p["step"] for p in c2[1:]], [p["fm"] for p in c1 + c2[1:]],
                     marker="o", ms=3, label="Stage I then II")
    c = _curve(R.get("stage2-only"), "stage2")
    if c:
        axes[2].plot([p["step"] for p in c], [p["fm"] for p in c], marker="o", ms=3, label="Stage II alone")
    for ax in axes:
        if results.get("teacher_validation_fm"):
            ax.axhline(results["teacher_validation_fm"], color="k", ls="--", lw=0.8, label="teacher")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)

    order = [("teacher", "teacher, 50-step UniPC + CFG"), ("student", "Stage II student, same sampler"),
             ("distilled", "distilled student, 4 steps, no CFG"),
             ("student-4step", "Stage II student, 4-step sampler, no CFG (no distillation)")]
    present = [(k, label) for k, label in order if k in scores]
    if present:
        fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
        w = 0.8 / len(present)
        for i, (k, label) in enumerate(present):
            ax.bar(np.arange(4) + i * w, [scores[k]["accuracy"][a] * 100 for a in ATTRS], w, label=label)
        ax.set_xticks(np.arange(4) + 0.4 - w / 2, ATTRS)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "scores.png")
        plt.close(fig)
    distilled = work / "main" / D.DISTILLED
    if (distilled / "config.json").exists():
        prompts = world.eval_prompts()
        pick = [prompts[i] for i in range(0, len(prompts), 13)][:8]
        gen = Generator(distilled, {})
        frame_strip(gen.videos(pick, 0, len(pick)), pick, out / "strip.png", rows=len(pick))
        log = distilled / "train" / "distill" / "loss.png"
        if log.exists():
            shutil.copyfile(log, out / "loss_distill.png")
    for stage in ("stage1", "stage2"):
        log = work / "main" / S.STUDENT / "train" / stage / "loss.png"
        if log.exists():
            shutil.copyfile(log, out / f"loss_{stage}.png")
    notes = out / "notes.md"  # hand-written reading of the figures (which claims held), kept across reruns
    (out / "README.md").write_text(_markdown(results, scores, R, teacher_cfg)
                                   + ("\n" + notes.read_text() if notes.exists() else ""))
    print((out / "README.md").read_text())


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def _markdown(results: dict, scores: dict, R: dict, teacher_cfg: dict) -> str:
    L = ["# Lightning Video recipe at toy scale: pruned student, two-stage training, DMD to 4 steps", "",
         "Produced by `python -m mlx_video.recipe.student_report` (parts `main`, `ablations`, `report`) on the teacher "
         f"`{results['teacher']}`, seed 0, on a shared 2-core x86 CPU (MLX, fp32, one MKL thread per process, "
         "`nice -n 19`, other engineers' jobs running: the load average is recorded with every figure in "
         "`results.json`). Scores from `mlx-video eval`'s scorer: the 105 canonical prompts (every colour x shape x "
         f"motion), seeds 0..{results.get('scored_seeds', results['seeds']) - 1}, the same prompts and seeds for every "
         "model.", ""]
    d = teacher_cfg.get("dit", {})
    main = R.get("main") or {}
    if main:
        w = main["widths"]
        L += [f"Teacher DiT: {d.get('num_layers')} layers, width {d.get('dim')}, {d.get('self_attn_heads')} heads of "
              f"{d.get('head_dim')}, FFN {d.get('ffn_dim')}. Student: {w['heads']} heads per layer (5/6 of the "
              f"teacher's, rounded, at least one cut), FFN {w['ffn_dim']} (halved); parameters "
              f"{main['parameters']['before']:,} -> {main['parameters']['after']:,} "
              f"({main['parameters']['after'] / main['parameters']['before'] * 100:.0f}%).", ""]
    L += ["## Teacher vs Stage II student vs distilled 4-step student", "",
          "| model | colour | shape | motion | all | DiT evals / video | s / video (batched 35) | s / video (one prompt) |",
          "|---|---|---|---|---|---|---|---|"]
    names = {"teacher": "teacher, 50-step UniPC + CFG", "student": "Stage II student, 50-step UniPC + CFG",
             "distilled": "**distilled student, 4-step, no CFG**",
             "distilled-40": "distilled student after only 40 DMD steps (same run settings)",
             "student-4step": "Stage II student, same 4-step sampler (no distillation)"}
    for k, label in names.items():
        if k in scores:
            s = scores[k]
            L.append(f"| {label} | {_row(s['accuracy'])} | {s['dit_evals_per_video']} | "
                     f"{s['seconds_per_video_batched']:.3f} | {s['seconds_per_video_single']:.3f} |")
    L += ["", f"Chance: colour {results['chance']['colour'] * 100:.1f}%, shape {results['chance']['shape'] * 100:.1f}%, "
              f"motion {results['chance']['motion'] * 100:.1f}%. Targets for the distilled student: colour >= 90%, "
              "motion >= 85%, shape >= 75%.", ""]
    if "distilled" in scores:
        acc = scores["distilled"]["accuracy"]
        met = [f"{a} {acc[a] * 100:.1f}% {'>=' if acc[a] >= t else '<'} {t * 100:.0f}% "
               f"({'met' if acc[a] >= t else 'NOT met'})" for a, t in TARGETS.items()]
        L += ["Distilled student against the targets: " + "; ".join(met) + ".", ""]
        for k in ("teacher", "distilled"):
            if k in scores:
                L.append(f"Accuracy by expected value, {k}: " + "; ".join(
                    f"{attr}: " + ", ".join(f"{v} {a * 100:.0f}%" for v, a in by.items())
                    for attr, by in scores[k]["per_attribute_value"].items()) + ".")
        L += ["", "![scores](scores.png)", ""]
    L += ["## Initialisation (Taylor vs magnitude vs random), layer alignment, stage gating", "",
          "Validation FM loss: flow-matching MSE on a fixed batch of 64 pool clips (fixed noise, sigmas spread over "
          "the shift-5 schedule, canonical captions)"
          + (f"; the teacher itself scores {results['teacher_validation_fm']:.4f} on it." if
             results.get("teacher_validation_fm") else "."), "",
          ]
    runs = [R.get(k) for k in ("main", "init-magnitude", "init-random", "no-layer-align") if R.get(k)]
    common = min((r["stage1"]["validation"][-1]["step"] for r in runs if r["stage1"].get("validation")), default=None)
    if common:
        L += [f"The column 'at step {common}' compares every run at the same point of the same learning-rate "
              "schedule (ablation runs may stop there to save time; a run that stopped early has no score).", ""]
    L += ["| run | validation FM before training | " + (f"at step {common} | " if common else "")
          + "after Stage I (steps) | Stage I wall time | score after: colour | shape | motion | all |",
          "|---|---|---|---|---|---|---|---|" + ("---|" if common else "")]
    for key, label, sk in (("main", "Taylor init, Stage I with layer alignment", "stage1-taylor"),
                           ("init-magnitude", "magnitude init, Stage I", "stage1-magnitude"),
                           ("init-random", "random init, Stage I", "stage1-random"),
                           ("no-layer-align", "Taylor init, Stage I without layer alignment", "stage1-no-layer-align")):
        r = R.get(key)
        if not r:
            continue
        c = r["stage1"].get("validation") or []
        acc = scores.get(sk, {}).get("accuracy")
        at = next((p["fm"] for p in c if p["step"] == common), None) if common else None
        L.append(f"| {label} | {_fmt(c[0]['fm'] if c else None)} | " + (f"{_fmt(at)} | " if common else "")
                 + f"{_fmt(c[-1]['fm'] if c else None)} "
                 f"({c[-1]['step'] if c else '-'}) | {r['stage1']['wall_seconds'] / 60:.1f} min | "
                 + (_row(acc) if acc else "- | - | - | -") + " |")
    s2, s2o = R.get("main-stage2"), R.get("stage2-only")
    if s2 or s2o:
        L += ["", "| schedule | steps | validation FM at the end | colour | shape | motion | all |", "|---|---|---|---|---|---|---|"]
        if s2:
            c = s2["stage2"].get("validation") or []
            n = (R.get("main") or {}).get("stage1", {}).get("steps", 0) + s2["stage2"]["steps"]
            L.append(f"| Stage I then Stage II | {n} | {_fmt(c[-1]['fm'] if c else None)} | "
                     + (_row(scores['student']['accuracy']) if 'student' in scores else "- | - | - | -") + " |")
        if s2o:
            c = s2o["stage2"].get("validation") or []
            L.append(f"| Stage II alone (from the Taylor init) | {s2o['stage2']['steps']} | "
                     f"{_fmt(c[-1]['fm'] if c else None)} | "
                     + (_row(scores['stage2-only']['accuracy']) if 'stage2-only' in scores else "- | - | - | -") + " |")
    L += ["", "![curves](curves.png)", "", "## Training (seed 0)", "", "| stage | steps | wall time | steps/s | loss first -> last |",
          "|---|---|---|---|---|"]
    for key, stage in (("main", "stage1"), ("main-stage2", "stage2"), ("main-distill", "distill")):
        r = (R.get(key) or {}).get(stage)
        if r:
            extra = (f" (critic {r['critic_loss_first']:.4f} -> {r['critic_loss_last']:.4f})"
                     if r.get("critic_loss_first") is not None else "")
            L.append(f"| {stage} | {r['steps']} | {r['wall_seconds'] / 60:.1f} min | {r['steps_per_second']} | "
                     f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}{extra} |")
    L += ["", "Loss curves: ![stage1](loss_stage1.png) ![stage2](loss_stage2.png) ![distill](loss_distill.png)", "",
          "## The distilled student's frames (4 steps, seed 0)", "", "![strip](strip.png)", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--part", choices=("main", "ablations", "scores", "report"), required=True)
    p.add_argument("--wait", type=float, default=7200, help="scores: give up after this many seconds")
    p.add_argument("--batch", type=int, default=None, help="Stage I/II batch (default: the size's)")
    p.add_argument("--pool-clips", type=int, default=None, help="latent pool clips (images: 1/8 of it; default: "
                   "the size's, the teacher's own pool)")
    p.add_argument("--distill-batch", type=int, default=None, help="DMD generator batch (default: half the above)")
    p.add_argument("--out", default="mlx_video/recipe/results/student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--size", choices=tuple(SIZES), default="default")
    p.add_argument("--stage1-steps", type=int, default=200)
    p.add_argument("--stage2-steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--no-score", action="store_true", help="train and record curves, score nothing")
    p.add_argument("--ablation-stop", type=int, default=None, help="ablations: stop the Stage I runs after this "
                   "step (same schedule as the main run) and skip Stage II alone")
    p.add_argument("--skip-distill", action="store_true", help="main: stop after Stage II")
    args = p.parse_args(argv)
    global NO_SCORE
    NO_SCORE = args.no_score
    teacher, work = Path(args.teacher), Path(args.work)
    sizes = SIZES[args.size]
    if args.batch:
        import dataclasses

        sizes = dataclasses.replace(sizes, dit_batch=args.batch)
    if args.pool_clips:
        import dataclasses

        sizes = dataclasses.replace(sizes, pool_clips=args.pool_clips, pool_images=max(1, args.pool_clips // 8))
    if args.part == "scores":
        part_scores(args, teacher, work, sizes)
    elif args.part == "main":
        part_main(args, teacher, work, sizes)
    elif args.part == "ablations":
        part_ablations(args, teacher, work, sizes)
    else:
        part_report(args, teacher, work, Path(args.out), sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
