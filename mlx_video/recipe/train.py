"""The trainer every recipe stage uses: seeded, resumable, logged.

- Batch ``k`` (data and all training noise) depends only on ``(seed, k)``, so a resumed run sees exactly
  the batches an uninterrupted one does.
- Every ``checkpoint_every`` steps the parameters, the AdamW state and the loss log are written
  atomically to ``<out>/train/<stage>/checkpoint/`` (a new folder renamed over the old one), so a killed
  run loses at most that many steps; ``--resume`` continues from it.
- A tqdm bar shows the loss; ``log.json`` (per-step loss, steps/s, wall time) and ``loss.png`` are
  written next to the checkpoint at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .. import fsio
from ..utils import UsageError

STATE_NAME = "state.json"


class RecipeError(UsageError):
    """A usage problem (bad flag, wrong resume folder): reported in one line, exit status 2."""


@dataclass
class Stage:
    name: str  # "autoencoder", "text", "teacher"
    out: Path  # the model folder
    steps: int
    seed: int
    hparams: dict  # everything that defines the run; a resume must match it
    checkpoint_every: int = 100
    resume: bool = False
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8  # AdamW's epsilon (Stage II of the student uses 1e-15)
    lr_floor: float = 0.1  # the cosine decay ends at lr * lr_floor (Stage II: 0.5, "decaying to half")
    clip_norm: float = 1.0
    progress: bool = True
    stop_after: int | None = None  # stop (as if killed) after this step: tests and `--stop-after`
    log: list = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.out / "train" / self.name

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"


def make_optimizer(stage: Stage) -> optim.AdamW:
    """AdamW with linear warm-up and cosine decay to ``lr_floor`` (10% by default; the schedule reads the
    optimizer's own step)."""
    warmup = max(1, min(stage.warmup, stage.steps // 4))
    decay = optim.cosine_decay(stage.lr, max(1, stage.steps - warmup), stage.lr * stage.lr_floor)
    schedule = optim.join_schedules([optim.linear_schedule(stage.lr * 0.01, stage.lr, warmup), decay], [warmup])
    return optim.AdamW(learning_rate=schedule, betas=list(stage.betas), eps=stage.eps, weight_decay=stage.weight_decay)


def check_stage(stage: Stage) -> None:
    """Refuse bad settings and wrong resume folders before any work (``RecipeError``)."""
    if stage.steps < 1:
        raise RecipeError(f"--steps must be >= 1, got {stage.steps}")
    if stage.checkpoint_every < 1:
        raise RecipeError(f"--checkpoint-every must be >= 1, got {stage.checkpoint_every}")
    state_file = stage.checkpoint / STATE_NAME
    if stage.resume:
        if not state_file.exists():
            raise RecipeError(f"--resume: {stage.out} has no {stage.name} checkpoint ({state_file} is missing); "
                              f"run without --resume to start, or give the --out folder of the run to continue")
        state = json.loads(state_file.read_text())
        saved = state.get("hparams", {})
        saved = {**saved, "steps": state.get("steps")}
        wanted = {**stage.hparams, "steps": stage.steps}  # the learning-rate schedule depends on it
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if diff or state.get("seed") != stage.seed:
            what = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:4]) or \
                f"seed {state.get('seed')} -> {stage.seed}"
            raise RecipeError(f"--resume: the {stage.name} checkpoint in {stage.out} was made with other settings "
                              f"({what}); resume with the same flags, or start a new --out folder")
    elif state_file.exists():
        step = json.loads(state_file.read_text()).get("step")
        raise RecipeError(f"{stage.out} already holds a {stage.name} run (checkpoint at step {step}); pass --resume to "
                          f"continue it, or choose a new --out folder")


def _save_checkpoint(stage: Stage, model: nn.Module, optimizer, step: int, extra: dict) -> None:
    def problem(p: Path):
        return None if (p / STATE_NAME).exists() else "is not a recipe checkpoint"

    stage.folder.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_folder(stage.checkpoint, problem, "recipe checkpoint") as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
        opt = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        state = {"stage": stage.name, "step": step, "steps": stage.steps, "seed": stage.seed, "hparams": stage.hparams,
                 "log": stage.log, **extra}
        (tmp / STATE_NAME).write_text(json.dumps(state) + "\n")


def _load_checkpoint(stage: Stage, model: nn.Module, optimizer) -> tuple[int, dict]:
    state = json.loads((stage.checkpoint / STATE_NAME).read_text())
    model.load_weights(list(mx.load(str(stage.checkpoint / "model.safetensors")).items()), strict=True)
    optimizer.init(model.trainable_parameters())
    flat = mx.load(str(stage.checkpoint / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(flat.items()))
    mx.eval(model.parameters(), optimizer.state)
    stage.log = state.get("log", [])
    return int(state["step"]), state


def write_log(stage: Stage, summary: dict) -> None:
    """``log.json`` (summary + per-step losses) and ``loss.png`` in the stage folder."""
    stage.folder.mkdir(parents=True, exist_ok=True)
    fsio.write_file(stage.folder / "log.json", json.dumps({**summary, "log": stage.log}, indent=1) + "\n", "json")
    plot_losses(stage.log, stage.folder / "loss.png", f"{stage.name} loss")


def plot_losses(log: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dev extra; the JSON log has everything
        return
    if not log:
        return
    steps = np.array([r["step"] for r in log])
    losses = np.array([r["loss"] for r in log])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    k = max(1, len(losses) // 30)
    if len(losses) > k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def run(stage: Stage, model: nn.Module, loss_fn: Callable, batch_fn: Callable[[int], tuple],
        compile: bool = True) -> dict:
    """Train ``model`` to ``stage.steps`` (resuming if asked). ``loss_fn(model, *batch)`` returns a scalar;
    ``batch_fn(step)`` returns the step's inputs (mx arrays, a function of ``(seed, step)`` only).

    Returns the summary (also in ``log.json``); ``summary["finished"]`` is False when ``stop_after`` hit.
    """
    check_stage(stage)
    optimizer = make_optimizer(stage)
    start = 0
    if stage.resume:
        start, _ = _load_checkpoint(stage, model, optimizer)
    else:
        stage.log = []
    state = [model.state, optimizer.state]

    def step_fn(*batch):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, *batch)
        grads, _ = optim.clip_grad_norm(grads, stage.clip_norm)  # one bad batch cannot blow the weights up
        optimizer.update(model, grads)
        return loss

    if compile:
        step_fn = partial(mx.compile, inputs=state, outputs=state)(step_fn)
    bar = None
    if stage.progress:
        from tqdm import tqdm

        bar = tqdm(total=stage.steps, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    previous = sum(r.get("seconds", 0.0) for r in stage.log[-1:])  # wall time of earlier sessions
    step = start
    finished = True
    try:
        while step < stage.steps:
            batch = batch_fn(step)
            loss = step_fn(*batch)
            mx.eval(loss, state)
            step += 1
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"{stage.name}: the loss became {value} at step {step}")
            stage.log.append({"step": step, "loss": value, "seconds": round(previous + time.perf_counter() - t0, 3)})
            if bar:
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
            if step % stage.checkpoint_every == 0 or step == stage.steps:
                _save_checkpoint(stage, model, optimizer, step, {})
                write_log(stage, _summary(stage, start, step, t0))
            if stage.stop_after is not None and step >= stage.stop_after and step < stage.steps:
                finished = False
                break
    finally:
        if bar:
            bar.close()
    summary = _summary(stage, start, step, t0) | {"finished": finished}
    write_log(stage, summary)
    return summary


def _summary(stage: Stage, start: int, step: int, t0: float) -> dict:
    seconds = time.perf_counter() - t0
    first = [r["loss"] for r in stage.log[:max(1, len(stage.log) // 20)]]
    last = [r["loss"] for r in stage.log[-max(1, len(stage.log) // 20):]]
    return {"stage": stage.name, "step": step, "steps": stage.steps, "seed": stage.seed, "hparams": stage.hparams,
            "session_steps": step - start, "session_seconds": round(seconds, 2),
            "steps_per_second": round((step - start) / seconds, 3) if seconds > 0 else None,
            "wall_seconds": stage.log[-1]["seconds"] if stage.log else 0.0,
            "loss_first": float(np.mean(first)) if first else None, "loss_last": float(np.mean(last)) if last else None}
