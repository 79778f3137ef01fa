"""``mlx-video recipe``: train a small text-to-video model on the synthetic shapes world, stage by stage.

Each stage adds one component to the model folder --out (created if needed):
  autoencoder  TAEHV encoder+decoder (16 latent channels, 8x spatial, 4x temporal)
  text         sentencepiece tokenizer + small UMT5 encoder (masked-token pre-training)
  teacher      Wan DiT trained with flow matching on the autoencoder latents (needs the two above)
  prune        student: the teacher's DiT Taylor-pruned (heads x5/6, FFN halved) into <out>/student
  stage1       student Stage I: flow matching + output and layer alignment to the teacher
  stage2       student Stage II: flow matching only
  distill      4-step generator by distribution matching (DMD) into <out>/distilled (the model to ship)
  all          every stage in order

Training is seeded (--seed), shows a progress bar with the loss, writes <out>/train/<stage>/log.json and
loss.png, and checkpoints atomically every --checkpoint-every steps; --resume continues a killed run
from its last checkpoint (same flags). The folder works with `mlx-video generate --height 64 --width 64
--frames 17`, `info` and `prune`, and is scored by `mlx-video eval` (`export-swift` refuses it: the Swift
port has no UniPC and no CFG, which the teacher samples with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_STEPS = {"autoencoder": 900, "text": 300, "teacher": 2000, "prune": 1, "stage1": 300, "stage2": 200,
                 "distill": 300}
STAGES = ("autoencoder", "text", "teacher")
STUDENT_STAGES = ("prune", "stage1", "stage2", "distill")  # recipe/student.py, recipe/distill.py


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("recipe", help="train a small model on the synthetic shapes world",
                              description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=(*STAGES, *STUDENT_STAGES, "all"), help="which stage to train")
    p.add_argument("--teacher", default=None, help="student stages: the teacher model folder (default: --out)")
    p.add_argument("--init", choices=("taylor", "magnitude", "random"), default="taylor",
                   help="prune: how heads and FFN channels are ranked (default taylor; the others are baselines)")
    p.add_argument("--out", required=True, help="model folder to write (created if needed)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (defaults: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data and noise (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the stage from its last checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per stage)")
    p.add_argument("--size", choices=("default", "smoke"), default="default",
                   help="model and data sizes: default, or smoke (tiny, for tests)")
    p.add_argument("--dit-patch", type=int, choices=(1, 2), default=None,
                   help="teacher: the DiT's spatial patch (default 2, Wan's; 1: 4x the tokens, for sub-token motion)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N as if interrupted (the checkpoint at N stays; resume later)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from .stages import SIZES, train_autoencoder, train_teacher, train_text
    from .train import RecipeError

    from .distill import train_distill
    from .student import recipe_prune, recipe_stage1, recipe_stage2

    fns = {"autoencoder": train_autoencoder, "text": train_text, "teacher": train_teacher, "prune": recipe_prune,
           "stage1": recipe_stage1, "stage2": recipe_stage2, "distill": train_distill}
    stages = (*STAGES, *STUDENT_STAGES) if args.stage == "all" else (args.stage,)
    try:
        if args.steps is not None and args.steps < 1:
            raise RecipeError(f"--steps must be >= 1, got {args.steps}")
        if args.checkpoint_every < 1:
            raise RecipeError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        if args.stop_after is not None and args.stop_after < 1:
            raise RecipeError(f"--stop-after must be >= 1, got {args.stop_after}")
        if args.lr is not None and not args.lr > 0:
            raise RecipeError(f"--lr must be positive, got {args.lr}")
        if args.stage == "all" and args.steps is not None:
            raise RecipeError("--steps applies to one stage; run the stages one by one to change their lengths")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise RecipeError(f"--out {out} exists and is not a folder")
        for name in stages:
            kwargs = dict(checkpoint_every=args.checkpoint_every, progress=not args.quiet, stop_after=args.stop_after)
            if args.lr is not None:
                kwargs["lr"] = args.lr
            if name in STUDENT_STAGES:
                kwargs.update(teacher=args.teacher, init=args.init)
            sizes = SIZES[args.size]
            if args.dit_patch is not None:
                sizes = dataclasses.replace(sizes, dit_patch=args.dit_patch)
            summary = fns[name](out, args.steps or DEFAULT_STEPS[name], args.seed, args.resume, sizes, **kwargs)
            brief = {k: summary.get(k) for k in ("stage", "step", "steps", "wall_seconds", "steps_per_second",
                                                 "loss_first", "loss_last", "finished", "heldout")}
            print(json.dumps(brief), file=sys.stderr)
            if not summary.get("finished", True):
                print(f"stopped after step {summary['step']}; continue with --resume", file=sys.stderr)
                return 0
    except RecipeError as exc:
        print(f"mlx-video recipe: error: {exc}", file=sys.stderr)
        return 2  # also when called directly, not through cli.run_command
    print(f"wrote {out}", file=sys.stderr)
    return 0
