"""Distribution-matching distillation of the Stage II student into a 4-step generator (DMD2-style, as the
Lightning Video paper describes it): ``mlx-video recipe distill``.

- Generator: starts from ``<out>/student``; samples with the few-step list ``[1000, 750, 500, 250]`` warped
  through the shift-5 table (t = 1000, 937.5, 833.3, 625), an x0 prediction per step and fresh re-noising,
  no CFG: exactly ``sampling.sample`` with the ``fewstep`` sampler that the output folder selects.
- Backward simulation: for each generator update a step ``k`` of the list is drawn; the generator's own
  input at ``t_k`` is made by running its first ``k`` steps from noise (no gradients), as at inference.
- Real score: the frozen teacher with classifier-free guidance (the teacher folder's guidance scale).
- Fake score: a critic initialised from the teacher, trained with flow matching on the generator's samples
  (``critic_updates`` updates per generator update, fresh noise and timesteps each).
- Generator loss: DMD, ``0.5 |x0 - sg(x0 - g)|^2`` with ``g = (x0_fake - x0_real) / mean|x0 - x0_real|``
  (per sample), both scores evaluated at ``x_t = (1 - s) x0 + s eps``, ``s`` from the shifted schedule in
  [0.02, 0.98]. AdamW betas (0, 0.999), small learning rates, no weight decay.

The output is the model folder ``<out>/distilled`` (its ``sampler`` section: fewstep, guidance 1) for
``mlx-video generate``; the critic is saved in ``<out>/distilled/train/distill/critic.safetensors`` and never
ships. Trainer behaviour as every stage: seed, progress bar, ``log.json`` and ``loss.png``, atomic
checkpoints every ``--checkpoint-every`` steps (generator, critic and both optimizers), ``--resume``.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .. import sampling
from ..models import wan_dit
from ..utils import CONFIG_NAME, config_from_dict, config_section, config_to_dict, read_config
from . import nets, train, world
from .stages import NUM_TRAIN_TIMESTEPS, Sizes, caption_table, shifted_sigmas
from .student import STUDENT, teacher_folder, write_student
from .train import RecipeError, Stage

DISTILLED = "distilled"
CRITIC_NAME = "critic.safetensors"
STEP_LIST = [1000, 750, 500, 250]
SHIFT = 5.0
T_RANGE = (0.02, 0.98)
FEWSTEP_SAMPLER = {"name": "fewstep", "denoising_step_list": STEP_LIST, "warp": True, "shift": SHIFT, "guidance": 1.0,
                   # `generate` takes its size from here when no flag gives it: the world's 64x64, 17 frames
                   "defaults": {"height": world.RESOLUTION, "width": world.RESOLUTION, "frames": world.FRAMES}}
GENERATOR_LR = 1e-4
CRITIC_LR = 1e-4
CRITIC_UPDATES = 3
BETAS = (0.0, 0.999)


def fewstep_schedule() -> tuple[list[float], np.ndarray]:
    """The timesteps and sigmas the distilled folder samples with (``sampling.schedule`` of its section)."""
    sched = sampling.schedule(sampling.sampler_config(FEWSTEP_SAMPLER))
    return [float(t) for t in sched.timesteps], sched.sigmas


class Pair(nn.Module):
    """Generator and critic in one module: one checkpoint file holds both."""

    def __init__(self, generator: wan_dit.WanDiT, critic: wan_dit.WanDiT):
        super().__init__()
        self.generator = generator
        self.critic = critic


class PairOptimizer:
    """Two AdamW optimizers behind the one-optimizer interface ``train``'s checkpoints use."""

    def __init__(self, generator: optim.Optimizer, critic: optim.Optimizer):
        self.generator, self.critic = generator, critic

    @property
    def state(self) -> dict:
        return {"generator": self.generator.state, "critic": self.critic.state}

    @state.setter
    def state(self, value: dict) -> None:
        self.generator.state, self.critic.state = value["generator"], value["critic"]

    def init(self, parameters: dict) -> None:
        self.generator.init(parameters["generator"])
        self.critic.init(parameters["critic"])


def _features(t, freq_dim: int) -> mx.array:
    return wan_dit.sinusoidal_embedding(np.asarray(t, np.float64), freq_dim)


def dmd_loss(generator, critic, teacher, guidance: float, x_k, tf_k, sigma_k, ctx, ctx_uncond, eps, sigma, tf):
    """The generator's DMD loss at its input ``x_k`` (step ``k``); returns ``(loss, x0)``."""
    x0 = x_k - sigma_k * nets.dit_forward(generator, x_k, tf_k, ctx)
    xt = mx.stop_gradient((1 - sigma) * x0 + sigma * eps)
    both = nets.dit_forward(teacher, mx.concatenate([xt, xt]), mx.concatenate([tf, tf]),
                            mx.concatenate([ctx, ctx_uncond]))
    v_cond, v_uncond = mx.split(both, 2)
    x0_real = xt - sigma * (v_uncond + guidance * (v_cond - v_uncond))
    x0_fake = xt - sigma * nets.dit_forward(critic, xt, tf, ctx)
    normaliser = mx.mean(mx.abs(mx.stop_gradient(x0) - x0_real), axis=(1, 2, 3, 4), keepdims=True)
    grad = mx.stop_gradient((x0_fake - x0_real) / mx.maximum(normaliser, 1e-6))
    return 0.5 * mx.mean((x0 - mx.stop_gradient(x0 - grad)) ** 2), mx.stop_gradient(x0)


def critic_loss(critic, x0, eps, sigma, tf, ctx):
    """Flow matching of the critic on the generator's samples."""
    xt = (1 - sigma) * x0 + sigma * eps
    return mx.mean((nets.dit_forward(critic, xt, tf, ctx) - (eps - x0)) ** 2)


def prompt_table(teacher: Path) -> tuple[np.ndarray, dict[str, int]]:
    """Text embeddings of every clip caption of the world (the generator needs prompts only, no data)."""
    rng = np.random.default_rng([0, 13])
    scenes = [world.sample_scene(rng, shape=s, colour=c, motion=m, background=b, size=z)
              for s in world.SHAPES for c in world.COLOURS for m in world.MOTIONS for b in world.BACKGROUNDS
              for z in world.SIZES]
    return caption_table(teacher, scenes)


def train_distill(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, teacher=None,
                  checkpoint_every: int = 100, lr: float | None = None, progress: bool = True,
                  stop_after: int | None = None, critic_lr: float | None = None, critic_updates: int = CRITIC_UPDATES,
                  guidance: float | None = None, batch: int | None = None, student: Path | None = None,
                  distilled: Path | None = None, table=None, **_) -> dict:
    """Distil ``<out>/student`` (or ``student``) into ``<out>/distilled`` (or ``distilled``)."""
    out = Path(out)
    teacher = teacher_folder(out, teacher)
    student = Path(student) if student else out / STUDENT
    distilled = Path(distilled) if distilled else out / DISTILLED
    if not (student / CONFIG_NAME).exists() or "stage" not in str(read_config(student)["dit"].get("recipe", {})):
        raise RecipeError(f"{student} holds no trained student: run `mlx-video recipe prune`, `stage1` and `stage2` "
                          f"with --out {out} first")
    if critic_updates < 1:
        raise RecipeError(f"critic updates per generator update must be >= 1, got {critic_updates}")
    gen_lr = GENERATOR_LR if lr is None else lr
    critic_lr = CRITIC_LR if critic_lr is None else critic_lr
    guidance = float(read_config(teacher).get("sampler", {}).get("guidance", 5.0)) if guidance is None else guidance
    batch = batch or max(1, sizes.dit_batch // 2)
    section = config_section(student, "dit")
    cfg = config_from_dict(wan_dit.WanDiTConfig, section)
    teacher_cfg = config_from_dict(wan_dit.WanDiTConfig, config_section(teacher, "dit"))
    hparams = {"config": config_to_dict(cfg), "teacher_config": config_to_dict(teacher_cfg), "batch": batch,
               "generator_lr": gen_lr, "critic_lr": critic_lr, "critic_updates": critic_updates, "guidance": guidance,
               "betas": list(BETAS), "step_list": STEP_LIST, "shift": SHIFT, "t_range": list(T_RANGE),
               "teacher": str(teacher), "student": str(student)}
    stage = Stage("distill", distilled, steps, seed, hparams, checkpoint_every, resume, lr=gen_lr, betas=BETAS,
                  progress=progress, stop_after=stop_after)
    train.check_stage(stage)
    t0 = time.perf_counter()
    if table is None:
        table = prompt_table(teacher)
    emb, index = table
    captions = [c for c in index if c]
    prep_seconds = time.perf_counter() - t0
    if not resume:  # a valid model folder from the start: the checkpoints live inside it
        write_student(student, distilled, dict(tree_flatten(wan_dit.load(student).parameters())), cfg,
                      {"recipe": section.get("recipe", {})}, sampler=FEWSTEP_SAMPLER)

    teacher_dit = wan_dit.load(teacher)
    teacher_dit.freeze()
    pair = Pair(wan_dit.load(student), wan_dit.load(teacher))
    # Bias-corrected, as PyTorch's Adam that DMD2 uses: without it beta2 = 0.999 makes the first steps ~30x lr.
    g_opt = optim.AdamW(learning_rate=gen_lr, betas=list(BETAS), weight_decay=0.0, bias_correction=True)
    c_opt = optim.AdamW(learning_rate=critic_lr, betas=list(BETAS), weight_decay=0.0, bias_correction=True)
    opt = PairOptimizer(g_opt, c_opt)
    start = 0
    if resume:
        start, _ = train._load_checkpoint(stage, pair, opt)
    else:
        stage.log = []
    gen, critic = pair.generator, pair.critic
    timesteps, sigmas = fewstep_schedule()
    shape = (batch, (world.FRAMES - 1) // 4 + 1, world.RESOLUTION // 8, world.RESOLUTION // 8, cfg.in_channels)
    fd = cfg.freq_dim
    uncond = mx.array(np.repeat(emb[index[""]][None], batch, axis=0))

    g_state, c_state = [gen.state, g_opt.state, critic.state], [critic.state, c_opt.state]

    @partial(mx.compile, inputs=g_state, outputs=g_state)
    def generator_step(x_k, tf_k, sigma_k, ctx, eps, sigma, tf):
        def fn(g):
            return dmd_loss(g, critic, teacher_dit, guidance, x_k, tf_k, sigma_k, ctx, uncond, eps, sigma, tf)

        (loss, x0), grads = nn.value_and_grad(gen, fn)(gen)
        grads, _ = optim.clip_grad_norm(grads, stage.clip_norm)
        g_opt.update(gen, grads)
        return loss, x0

    @partial(mx.compile, inputs=c_state, outputs=c_state)
    def critic_step(x0, eps, sigma, tf, ctx):
        loss, grads = nn.value_and_grad(critic, critic_loss)(critic, x0, eps, sigma, tf, ctx)
        grads, _ = optim.clip_grad_norm(grads, stage.clip_norm)
        c_opt.update(critic, grads)
        return loss

    @partial(mx.compile, inputs=[gen.state])  # the generator's current weights, not the ones of the first trace
    def simulate(x, tf_j, sigma_j, ctx, eps, sigma_next):
        x0 = x - sigma_j * nets.dit_forward(gen, x, tf_j, ctx)
        return (1 - sigma_next) * x0 + sigma_next * eps

    def draws(step):
        rng = np.random.default_rng([seed, step, 6])
        caps = [captions[i] for i in rng.integers(len(captions), size=batch)]
        k = int(rng.integers(len(timesteps)))
        normal = lambda: mx.array(rng.standard_normal(shape).astype(np.float32))
        noise, sim = normal(), [normal() for _ in range(k)]
        s_dmd = shifted_sigmas(rng.uniform(*T_RANGE, size=batch), SHIFT)
        dmd = (normal(), s_dmd)
        crit = [(normal(), shifted_sigmas(rng.uniform(*T_RANGE, size=batch), SHIFT)) for _ in range(critic_updates)]
        return mx.array(emb[[index[c] for c in caps]]), k, noise, sim, dmd, crit

    def col(s):
        return mx.array(np.asarray(s, np.float32).reshape(-1, 1, 1, 1, 1))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
    t_run = time.perf_counter()
    previous = sum(r.get("seconds", 0.0) for r in stage.log[-1:])
    step, finished = start, True
    try:
        while step < steps:
            ctx, k, x, sim, (eps, s_dmd), crit = draws(step)
            for j in range(k):  # backward simulation: the generator's own first k steps, no gradients
                x = simulate(x, _features(np.full(batch, timesteps[j]), fd), col(np.full(batch, sigmas[j])), ctx,
                             sim[j], col(np.full(batch, sigmas[j + 1])))
                mx.eval(x)
            loss, x0 = generator_step(x, _features(np.full(batch, timesteps[k]), fd), col(np.full(batch, sigmas[k])),
                                      ctx, eps, col(s_dmd), _features(s_dmd * NUM_TRAIN_TIMESTEPS, fd))
            mx.eval(loss, x0, g_state)
            c_losses = []
            for c_eps, c_sigma in crit:
                c_loss = critic_step(x0, c_eps, col(c_sigma), _features(c_sigma * NUM_TRAIN_TIMESTEPS, fd), ctx)
                mx.eval(c_loss, c_state)
                c_losses.append(float(c_loss))
            step += 1
            value, c_value = float(loss), float(np.mean(c_losses))
            if not (math.isfinite(value) and math.isfinite(c_value)):
                raise FloatingPointError(f"distill: the loss became {value} (critic {c_value}) at step {step}")
            stage.log.append({"step": step, "loss": value, "critic_loss": c_value, "k": k,
                              "seconds": round(previous + time.perf_counter() - t_run, 3)})
            if bar:
                bar.set_postfix(dmd=f"{value:.4f}", critic=f"{c_value:.4f}")
                bar.update(1)
            if step % checkpoint_every == 0 or step == steps:
                train._save_checkpoint(stage, pair, opt, step, {})
                train.write_log(stage, train._summary(stage, start, step, t_run))
            if stop_after is not None and step >= stop_after and step < steps:
                finished = False
                break
    finally:
        if bar:
            bar.close()
    summary = train._summary(stage, start, step, t_run) | {"finished": finished, "prepare_seconds": round(prep_seconds, 2)}
    critic_log = [r["critic_loss"] for r in stage.log]
    if critic_log:
        n = max(1, len(critic_log) // 20)
        summary.update(critic_loss_first=float(np.mean(critic_log[:n])), critic_loss_last=float(np.mean(critic_log[-n:])))
    train.write_log(stage, summary)
    _plot(stage)
    if not finished:
        return summary
    stage.folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(stage.folder / CRITIC_NAME), dict(tree_flatten(critic.parameters())),
                        metadata={"format": "mlx", "note": "DMD fake-score critic (teacher-shaped); not a model"})
    recipe = dict(section.get("recipe", {}))
    recipe["distill"] = {k: summary.get(k) for k in ("steps", "seed", "wall_seconds", "loss_first", "loss_last",
                                                     "critic_loss_first", "critic_loss_last")}
    recipe["distill"].update(guidance=guidance, critic_updates=critic_updates, generator_lr=gen_lr,
                             critic_lr=critic_lr, batch=batch)
    write_student(distilled, distilled, dict(tree_flatten(gen.parameters())), cfg,
                  {"recipe": recipe, "distilled": {"method": "DMD2-style distribution matching", "teacher": str(teacher),
                                                   "student": str(student), "critic": f"train/distill/{CRITIC_NAME}"}},
                  sampler=FEWSTEP_SAMPLER)
    return summary


def _plot(stage: Stage) -> None:
    """The generator's DMD loss and the critic's flow-matching loss, one panel each (``loss.png``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not stage.log:
        return
    steps = np.array([r["step"] for r in stage.log])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for ax, key, title in zip(axes, ("loss", "critic_loss"), ("generator DMD loss", "critic flow-matching loss")):
        y = np.array([r[key] for r in stage.log])
        ax.plot(steps, y, lw=0.6, alpha=0.4)
        k = max(1, len(y) // 30)
        if len(y) > k:
            ax.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_xlabel("generator step")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = stage.folder / ".loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(stage.folder / "loss.png")
