"""Lightning Video's student at toy scale: pruning initialisation, Stage I and Stage II (the paper's recipe).

``--out`` is the recipe folder (the teacher from ``mlx-video recipe teacher``, or ``--teacher DIR``); the
student is the model folder ``<out>/student``, rewritten by each stage:

- ``prune``: the teacher's DiT with its attention heads cut to 5/6 (12 -> 10 in the paper; rounded, and at
  least one head cut, for a toy head count: 4 -> 3) and its FFN halved, ranked by the Taylor saliency of
  ``mlx_video.prune`` calibrated on world prompts over the 4-step schedule (``--init magnitude|random``: the
  baselines). Same depth and model width; the other components are copied from the teacher.
- ``stage1``: flow matching + output alignment (MSE to the teacher's prediction on the same noisy input) +
  intermediate-layer alignment (MSE of the residual stream after every block, averaged over blocks), all
  weights 1.0; AdamW betas 0.9/0.999.
- ``stage2``: flow matching only; the learning rate decays (cosine) to half; betas 0.9/0.95, eps 1e-15.

Training data are the teacher's: its autoencoder's latents of the same seeded pool of world clips and images,
captions (and paraphrases) with 10% dropped, so the student samples with the teacher's UniPC + CFG sampler.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import fsio
from ..models import taehv, umt5, wan_dit
from ..utils import CONFIG_NAME, config_from_dict, config_section, config_to_dict, read_config
from . import nets, world
from .stages import (CAPTION_DROPOUT, NUM_TRAIN_TIMESTEPS, TRAIN_SHIFT, Sizes, caption_table, latent_pool,
                     shifted_sigmas)
from .train import RecipeError, Stage, check_stage, run

STUDENT = "student"
INITS = ("taylor", "magnitude", "random")
HEAD_RATIO = 5 / 6  # 12 -> 10 heads
FFN_RATIO = 0.5
CALIBRATION_PROMPTS = 48
SALIENCY_NAME = "saliency.json"


def student_widths(config: wan_dit.WanDiTConfig) -> tuple[int, int, int]:
    """(self heads, cross heads, FFN channels) per layer of the student: 5/6 of the heads rounded to the
    nearest count, but at least one cut where there is more than one (4 heads -> 3, 12 -> 10), FFN halved."""
    def cut(h: int) -> int:
        return 1 if h <= 1 else max(1, min(h - 1, round(h * HEAD_RATIO)))

    return (cut(min(config.self_attn_heads)), cut(min(config.cross_attn_heads)),
            max(1, int(min(config.ffn_dim) * FFN_RATIO)))


def teacher_folder(out: Path, teacher: str | Path | None) -> Path:
    """The teacher model folder (``--teacher``, default the recipe folder itself), checked to be complete."""
    folder = Path(teacher) if teacher else Path(out)
    config = read_config(folder) if (folder / CONFIG_NAME).exists() else {}
    missing = [s for s in ("dit", "decoder", "text_encoder") if s not in config]
    if missing:
        raise RecipeError(f"{folder} has no {', '.join(missing)}: the student stages need a trained teacher "
                          f"(`mlx-video recipe all --out {folder}`, or --teacher DIR)")
    if not config["decoder"].get("has_encoder"):
        raise RecipeError(f"{folder}: the autoencoder has no encoder weights; the student trains on its latents")
    return folder


def calibration_prompts(seed: int, n: int = CALIBRATION_PROMPTS) -> list[str]:
    """World captions (canonical and paraphrased) of seeded random scenes: what the student will be asked."""
    rng = np.random.default_rng([seed, 11])
    return [world.caption(world.sample_scene(rng), rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Pruning initialisation
# --------------------------------------------------------------------------------------------------


def prune_student(teacher: Path, student: Path, init: str = "taylor", seed: int = 0, progress: bool = True) -> dict:
    """Write ``student``: the teacher folder with a pruned DiT (``init`` ranks heads/channels). Returns the
    saliency report (also ``<student>/saliency.json``)."""
    from .. import prune as P

    if init not in INITS:
        raise RecipeError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    t0 = time.perf_counter()
    section = config_section(teacher, "dit")
    config = config_from_dict(wan_dit.WanDiTConfig, section)
    heads, cross_heads, ffn = student_widths(config)
    energies, calib = None, {"method": init, "seed": seed}
    latent_shape = ((world.FRAMES - 1) // 4 + 1, world.RESOLUTION // 8, world.RESOLUTION // 8)
    if init == "taylor":
        prompts = calibration_prompts(seed)
        texts = P.encode_with_folder(teacher, prompts)
        dit = wan_dit.load(teacher)
        energies = P.calibrate(dit, texts, P.DEFAULT_TIMESTEPS, None, latent_shape, seed, "trajectory")
        calib.update(prompts=len(prompts), timesteps=list(P.DEFAULT_TIMESTEPS), latent_shape=list(latent_shape),
                     inputs="trajectory", example_prompts=prompts[:3])
        del dit
    weights = mx.load(str(teacher / section.get("weights_file", wan_dit.WEIGHTS_NAME)))
    before = sum(v.size for v in weights.values())
    scores = P.score_layers(config, weights, init, energies, seed)
    plan = P.plan_pruning(config, scores, heads, cross_heads, ffn)
    new_config = P.pruned_config(config, plan, "kept")
    new = P.prune_weights(weights, config, plan)
    mx.eval(new)
    after = sum(v.size for v in new.values())
    report = {"method": init, "source": str(teacher), "calibration": calib,
              "widths": {"heads": heads, "cross_heads": cross_heads, "ffn_dim": ffn, "head_dim": config.head_dim},
              "parameters": {"before": int(before), "after": int(after)}, "layers": P._layer_report(config, scores, plan),
              "seconds": round(time.perf_counter() - t0, 2)}
    write_student(teacher, student, new, new_config, {"pruned": {"method": init, "report": SALIENCY_NAME,
                                                                 "parameters_before": int(before)}}, report)
    return report


def write_student(teacher: Path, student: Path, dit_weights: dict, dit_cfg: wan_dit.WanDiTConfig, dit_extra: dict,
                  report: dict | None = None, sampler: dict | None = None) -> None:
    """A complete model folder at ``student`` (replaced atomically): the teacher's decoder, text encoder,
    tokenizer, world and sampler sections, and the given DiT."""
    source = read_config(teacher)
    config = {k: source[k] for k in ("format", "decoder", "text_encoder", "world", "sampler") if k in source}
    if sampler is not None:
        config["sampler"] = sampler
    config["dit"] = {**config_to_dict(dit_cfg), "weights_file": wan_dit.WEIGHTS_NAME, "dtype": "float32",
                     "parameters": int(sum(v.size for v in dit_weights.values())),
                     "source_layout": "mlx-video recipe student", **dit_extra}
    files = {source["decoder"].get("weights_file", taehv.WEIGHTS_NAME),
             source["text_encoder"].get("weights_file", umt5.WEIGHTS_NAME),
             source["text_encoder"].get("tokenizer_file", umt5.TOKENIZER_NAME)}
    student.parent.mkdir(parents=True, exist_ok=True)

    keep_train = student / "train"
    with fsio.atomic_folder(student, fsio.model_folder_problem, "model folder") as tmp:
        for name in sorted(files):
            fsio.link_or_copy(teacher / name, tmp / name)
        if keep_train.is_dir():  # the stages' checkpoints and logs stay with the folder
            shutil.copytree(keep_train, tmp / "train", symlinks=True)
        mx.save_safetensors(str(tmp / wan_dit.WEIGHTS_NAME), dit_weights, metadata={"format": "mlx"})
        if report is not None:
            (tmp / SALIENCY_NAME).write_text(json.dumps(report) + "\n")
        elif (student / SALIENCY_NAME).exists():
            shutil.copyfile(student / SALIENCY_NAME, tmp / SALIENCY_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Training data and forwards
# --------------------------------------------------------------------------------------------------


def training_data(teacher: Path, seed: int, sizes: Sizes, progress: bool, cache: Path | None = None) -> dict:
    """The teacher's latent pool (same seed: the same clips it trained on) and the caption embedding table.

    ``cache``: an ``.npz`` file to reuse (several students trained on one teacher share the encoding work)."""
    import pickle

    t0 = time.perf_counter()
    import hashlib

    config = read_config(teacher)
    files = [config["decoder"].get("weights_file", taehv.WEIGHTS_NAME),
             config["text_encoder"].get("weights_file", umt5.WEIGHTS_NAME),
             config["text_encoder"].get("tokenizer_file", umt5.TOKENIZER_NAME)]
    # what the pool depends on: the autoencoder, text encoder and tokenizer bytes, the seed and the pool sizes
    key = [hashlib.sha256((Path(teacher) / f).read_bytes()).hexdigest() for f in files] + [
        seed, sizes.pool_clips, sizes.pool_images]
    if cache is not None and Path(cache).exists():
        saved = np.load(cache, allow_pickle=False)
        if json.loads(str(saved["key"])) == key:
            scenes = pickle.loads(saved["scenes"].tobytes())
            pool = {"clips": (saved["clips"], scenes["clips"]), "images": (saved["images"], scenes["images"])}
            index = json.loads(str(saved["index"]))
            return {"pool": pool, "table": saved["table"], "index": index,
                    "seconds": round(time.perf_counter() - t0, 2), "cached": True}
    pool = latent_pool(teacher, seed, sizes.pool_clips, sizes.pool_images, progress)
    table, index = caption_table(teacher, pool["clips"][1] + pool["images"][1])
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_name(f".{Path(cache).name}.{time.time_ns()}.npz")
        scenes = np.frombuffer(pickle.dumps({k: v[1] for k, v in pool.items()}), np.uint8)
        np.savez(tmp, key=json.dumps(key), clips=pool["clips"][0], images=pool["images"][0], scenes=scenes,
                 table=table, index=json.dumps(index))
        tmp.replace(cache)
    return {"pool": pool, "table": table, "index": index, "seconds": round(time.perf_counter() - t0, 2)}


def fm_batch(data: dict, seed: int, step: int, batch: int, image_fraction: float, freq_dim: int, stream: int,
             dropout: float = CAPTION_DROPOUT) -> tuple:
    """A flow-matching batch as the teacher stage draws them: ``(x_t, time features, context, target)``."""
    rng = np.random.default_rng([seed, step, stream])
    kind = "images" if rng.uniform() < image_fraction else "clips"
    latents, scenes = data["pool"][kind]
    idx = rng.integers(len(scenes), size=batch)
    x0 = latents[idx]
    caps = [world.caption(scenes[i], rng, image=kind == "images") for i in idx]
    rows = [data["index"][""] if rng.uniform() < dropout else data["index"][c] for c in caps]
    sigma = shifted_sigmas(rng.uniform(size=len(idx)))
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = sigma.reshape(-1, 1, 1, 1, 1).astype(np.float32)
    xt = (1 - s) * x0 + s * eps
    tf = wan_dit.sinusoidal_embedding(sigma * NUM_TRAIN_TIMESTEPS, freq_dim)
    return mx.array(xt), tf, mx.array(data["table"][rows]), mx.array(eps - x0)


def validation_batch(data: dict, seed: int, freq_dim: int, n: int = 64) -> tuple:
    """A fixed held-out-noise batch (clips only, sigmas evenly over the shifted schedule, no caption dropout)
    for comparable flow-matching losses across runs."""
    rng = np.random.default_rng([seed, 12345])
    latents, scenes = data["pool"]["clips"]
    idx = rng.choice(len(scenes), size=min(n, len(scenes)), replace=len(scenes) < n)
    x0 = latents[idx]
    rows = [data["index"][world.canonical_caption(scenes[i])] for i in idx]
    sigma = shifted_sigmas((np.arange(len(idx)) + 0.5) / len(idx))
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = sigma.reshape(-1, 1, 1, 1, 1).astype(np.float32)
    tf = wan_dit.sinusoidal_embedding(sigma * NUM_TRAIN_TIMESTEPS, freq_dim)
    return mx.array((1 - s) * x0 + s * eps), tf, mx.array(data["table"][rows]), mx.array(eps - x0)


def fm_loss(dit: wan_dit.WanDiT, batch: tuple, chunk: int = 32) -> float:
    """Mean flow-matching MSE of ``dit`` on a batch (evaluated in chunks, no gradients)."""
    xt, tf, ctx, target = batch
    total = 0.0
    for s in range(0, xt.shape[0], chunk):
        v = nets.dit_forward(dit, xt[s:s + chunk], tf[s:s + chunk], ctx[s:s + chunk])
        total += float(mx.sum((v - target[s:s + chunk]) ** 2))
    return total / target.size


def dit_forward_hidden(dit: wan_dit.WanDiT, latents: mx.array, time_features: mx.array,
                       context: mx.array) -> tuple[mx.array, list[mx.array]]:
    """``nets.dit_forward`` and the residual stream ``[B, L, dim]`` after every block."""
    hidden: list[mx.array] = []
    return nets.dit_forward(dit, latents, time_features, context, hidden=hidden), hidden


def stage1_loss(student: wan_dit.WanDiT, teacher: wan_dit.WanDiT, xt, tf, ctx, target, align_output: bool = True,
                align_layers: bool = True) -> tuple[mx.array, dict]:
    """Stage I: FM + output alignment + layer alignment (weights 1.0). Returns the total and its parts."""
    v, hs = dit_forward_hidden(student, xt, tf, ctx)
    parts = {"fm": mx.mean((v - target) ** 2)}
    if align_output or align_layers:
        vt, ht = dit_forward_hidden(teacher, xt, tf, ctx)
        if align_output:
            parts["output"] = mx.mean((v - mx.stop_gradient(vt)) ** 2)
        if align_layers:
            parts["layers"] = sum(mx.mean((a - mx.stop_gradient(b)) ** 2) for a, b in zip(hs, ht)) / len(hs)
    return sum(parts.values()), parts


# --------------------------------------------------------------------------------------------------
# Stages I and II
# --------------------------------------------------------------------------------------------------

STAGE1 = dict(lr=5e-4, betas=(0.9, 0.999), eps=1e-8, lr_floor=0.1, warmup=20)
STAGE2 = dict(lr=2e-4, betas=(0.9, 0.95), eps=1e-15, lr_floor=0.5, warmup=10)


def train_student_stage(name: str, student: Path, teacher: Path, steps: int, seed: int, resume: bool, sizes: Sizes,
                        checkpoint_every: int = 100, lr: float | None = None, progress: bool = True,
                        stop_after: int | None = None, align_output: bool = True, align_layers: bool = True,
                        data: dict | None = None, eval_every: int | None = None) -> dict:
    """Train the student folder's DiT in place: ``name`` is ``stage1`` (FM + alignment) or ``stage2`` (FM).

    ``eval_every``: also measure the flow-matching loss on a fixed validation batch before training and every
    that many steps (``summary["validation"]``: the init-comparison curves); it checkpoints at those steps.
    ``data``: a precomputed :func:`training_data` (the report trains several students on one pool).
    """
    if name not in ("stage1", "stage2"):
        raise ValueError(name)
    if not (student / CONFIG_NAME).exists() or "dit" not in read_config(student):
        raise RecipeError(f"{student} holds no student yet: run `mlx-video recipe prune` first")
    settings = dict(STAGE1 if name == "stage1" else STAGE2)
    if lr is not None:
        settings["lr"] = lr
    if name == "stage2":
        align_output = align_layers = False
    section = config_section(student, "dit")
    cfg = config_from_dict(wan_dit.WanDiTConfig, section)
    hparams = {"config": config_to_dict(cfg), "batch": sizes.dit_batch, "pool": [sizes.pool_clips, sizes.pool_images],
               "shift": TRAIN_SHIFT, "caption_dropout": CAPTION_DROPOUT, "align_output": align_output,
               "align_layers": align_layers, "teacher": str(teacher), **{k: list(v) if isinstance(v, tuple) else v
                                                                         for k, v in settings.items()}}
    if eval_every:
        checkpoint_every = math.gcd(checkpoint_every, eval_every)
    stage = Stage(name, student, steps, seed, hparams, checkpoint_every, resume, lr=settings["lr"],
                  warmup=settings["warmup"], betas=settings["betas"], eps=settings["eps"],
                  lr_floor=settings["lr_floor"], progress=progress, stop_after=stop_after)
    check_stage(stage)
    data = data or training_data(teacher, seed, sizes, progress)
    model = wan_dit.load(student)
    teacher_dit = wan_dit.load(teacher) if name == "stage1" and (align_output or align_layers) else None
    if teacher_dit is not None:
        teacher_dit.freeze()
    stream = 4 if name == "stage1" else 5

    def batch_fn(step):
        return fm_batch(data, seed, step, sizes.dit_batch, sizes.image_fraction, cfg.freq_dim, stream)

    if name == "stage1":
        def loss_fn(model, xt, tf, ctx, target):
            return stage1_loss(model, teacher_dit, xt, tf, ctx, target, align_output, align_layers)[0]
    else:
        def loss_fn(model, xt, tf, ctx, target):
            return mx.mean((nets.dit_forward(model, xt, tf, ctx) - target) ** 2)

    validation = []
    if eval_every:
        val = validation_batch(data, seed, cfg.freq_dim)
        if not resume:
            validation.append({"step": 0, "fm": fm_loss(model, val)})
        done, summary = 0, None
        for target in list(range(eval_every, steps, eval_every)) + [steps]:
            if stop_after is not None and done >= stop_after:
                break
            stage.stop_after = target if target < steps else stop_after
            summary = run(stage, model, loss_fn, batch_fn)
            stage.resume = True
            done = summary["step"]
            validation.append({"step": done, "fm": fm_loss(model, val)})
            if not summary["finished"] and done < target:
                break
        summary["finished"] = done >= steps
        summary["validation"] = validation
    else:
        summary = run(stage, model, loss_fn, batch_fn)
    summary["prepare_seconds"] = data["seconds"]
    if not summary["finished"]:
        return summary
    from mlx.utils import tree_flatten

    recipe = dict(section.get("recipe", {}))
    recipe[name] = {k: summary.get(k) for k in ("steps", "seed", "wall_seconds", "loss_first", "loss_last")}
    recipe[name].update(align_output=align_output, align_layers=align_layers)
    extra = {k: v for k, v in section.items() if k in ("pruned",)}
    write_student(student, student, dict(tree_flatten(model.parameters())), cfg, {**extra, "recipe": recipe})
    return summary


# --------------------------------------------------------------------------------------------------
# `mlx-video recipe prune|stage1|stage2` (same signature as the teacher stages)
# --------------------------------------------------------------------------------------------------


def recipe_prune(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, teacher=None, init: str = "taylor",
                 progress: bool = True, **_) -> dict:
    teacher = teacher_folder(out, teacher)
    student = Path(out) / STUDENT
    if (student / CONFIG_NAME).exists() and resume:
        return {"stage": "prune", "finished": True, "skipped": f"{student} exists (--resume)"}
    if (student / CONFIG_NAME).exists():
        raise RecipeError(f"{student} already holds a student; choose a new --out folder, or --resume to keep it")
    t0 = time.perf_counter()
    report = prune_student(teacher, student, init, seed, progress)
    return {"stage": "prune", "finished": True, "wall_seconds": round(time.perf_counter() - t0, 2),
            "parameters": report["parameters"], "widths": report["widths"], "method": init}


def recipe_stage1(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, teacher=None, **kwargs) -> dict:
    kwargs.pop("init", None)
    return train_student_stage("stage1", Path(out) / STUDENT, teacher_folder(out, teacher), steps, seed, resume, sizes,
                               **kwargs)


def recipe_stage2(out: Path, steps: int, seed: int, resume: bool, sizes: Sizes, teacher=None, **kwargs) -> dict:
    kwargs.pop("init", None)
    return train_student_stage("stage2", Path(out) / STUDENT, teacher_folder(out, teacher), steps, seed, resume, sizes,
                               **kwargs)
