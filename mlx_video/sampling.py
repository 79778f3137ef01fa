"""Flow-matching samplers: few-step distilled (Self-Forcing / CausVid), Wan's UniPC (bh2) and Euler.

Reference: ``shared/reference/models.md`` §5. Conventions (all sources):

- ``x_t = (1 - sigma) x0 + sigma noise``; the model predicts the velocity ``v ~ noise - x0``, so
  ``x0 = x_t - sigma v``; the DiT gets ``t = 1000 sigma``; shift ``sigma' = s sigma / (1 + (s - 1) sigma)``.
- ``fewstep``: the default for distilled models. A denoising step list (default ``[1000, 750, 500, 250]``),
  optionally warped through Self-Forcing's 1000-entry shifted table (shift 5 gives t = 1000, 937.5, 833.33,
  625: fractional, as the reference feeds them), an x0 prediction per step and re-noising with fresh noise
  to the next step's sigma. The last x0 is the output. No CFG by default (guidance 1).
- ``unipc``: a line-by-line port of Wan's ``FlowUniPCMultistepScheduler`` (bh2, order 2, predict_x0,
  lower_order_final, final sigma 0) on Wan's grid (sigma_max 0.999, **integer** timesteps fed to the DiT).
- ``euler``: ``x_next = x + v (sigma_next - sigma)`` on the same grid as ``unipc``.

Design: the sampler knows nothing about the model. It takes ``velocity(x, t) -> v`` for the prompt and,
for classifier-free guidance, a second callable ``uncond_velocity(x, t) -> v`` for the negative prompt;
``v = v_u + g (v_c - v_u)``. With ``guidance <= 1`` the unconditional callable is never called. ``x`` is
the fp32 latent ``[B, F, H, W, C]``; ``t`` is an ``int`` (unipc, euler) or a ``float`` (fewstep, may be
fractional). The scheduler's scalar math runs in float64 on the host (numpy); tensor updates are fp32 MLX.

Randomness: the initial noise is an argument (``latent_noise(shape, seed)`` draws it); the few-step
re-noising draws come from ``key`` (an int seed or an ``mx.random`` key), one split per step, so a seed
reproduces a run exactly. ``renoise`` injects them instead (parity tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

SAMPLERS = ("fewstep", "unipc", "euler")
NUM_TRAIN_TIMESTEPS = 1000

Velocity = Callable[[mx.array, "int | float"], mx.array]
Progress = Callable[[int, int, "int | float"], None]

# Per-sampler defaults (the model folder's config.json ``sampler`` section and CLI flags override them).
DEFAULTS = {
    "fewstep": dict(steps=None, shift=5.0, guidance=1.0, denoising_step_list=[1000, 750, 500, 250], warp=True),
    "unipc": dict(steps=50, shift=5.0, guidance=5.0),
    "euler": dict(steps=50, shift=5.0, guidance=5.0),
}


@dataclass
class SamplerConfig:
    name: str = "fewstep"
    steps: int | None = None  # unipc/euler: number of steps; fewstep: None = len(denoising_step_list)
    shift: float = 5.0
    guidance: float = 1.0  # <= 1: no classifier-free guidance (one forward per step)
    denoising_step_list: list[float] = field(default_factory=lambda: [1000, 750, 500, 250])  # fewstep only
    warp: bool = True  # fewstep only: warp the list through the shifted table (Self-Forcing)
    # fewstep only, for checkpoints whose schedule is not a table lookup (converters/presets.py):
    sigmas: list[float] | None = None  # explicit sigma per step (rCM's TrigFlow); the DiT gets t = 1000 sigma
    timestep_dtype: str = "float32"  # "bfloat16": round the DiT's timesteps to bf16, as rCM feeds them
    noise_scale: float = 1.0  # the initial latent is noise_scale * noise (rCM: its first sigma)
    stochastic: bool = True  # False: deterministic Euler between steps, x + (sigma' - sigma) v (LightX2V)
    # Ranges checked when read from a file (utils.config_values); not a dataclass field.
    LIMITS = {"steps": (1, 1000), "shift": (1e-3, 1e3), "guidance": (0.0, 100.0),
              "denoising_step_list": (0, NUM_TRAIN_TIMESTEPS), "sigmas": (0.0, 1.0), "noise_scale": (1e-3, 10.0)}

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if self.shift <= 0:
            raise ValueError(f"sampler shift must be > 0, got {self.shift}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        steps = list(self.denoising_step_list)
        if steps and steps[-1] == 0:  # CausVid lists end in 0: asserted and dropped by the reference
            steps = steps[:-1]
        if not steps or any(not 0 < s <= NUM_TRAIN_TIMESTEPS for s in steps) or any(
                a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising_step_list must be strictly decreasing values in (0, 1000] (a trailing 0 "
                             f"is allowed), got {list(self.denoising_step_list)}")
        if self.name == "fewstep" and self.steps is not None and self.steps != len(steps):
            # An explicit step count replaces the list by an evenly spaced one, cast to integers before warping
            # as Self-Forcing/CausVid lists are (3 steps: 1000, 666, 333; truncation, like torch's .long()).
            if self.steps < 1:
                raise ValueError(f"steps must be >= 1, got {self.steps}")
            steps = [NUM_TRAIN_TIMESTEPS * (self.steps - k) // self.steps for k in range(self.steps)]
        self.denoising_step_list = steps
        if self.timestep_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"timestep_dtype must be 'float32' or 'bfloat16', got {self.timestep_dtype!r}")
        if self.sigmas is not None:
            if not self.sigmas or any(not 0 < s <= 1 for s in self.sigmas) or any(
                    a <= b for a, b in zip(self.sigmas, self.sigmas[1:])):
                raise ValueError(f"sigmas must be strictly decreasing values in (0, 1], got {self.sigmas}")
            self.sigmas = [float(s) for s in self.sigmas]
            steps = self.denoising_step_list = [NUM_TRAIN_TIMESTEPS * s for s in self.sigmas]
        if self.name == "fewstep":
            self.steps = len(steps)
        elif self.steps is None or self.steps < 1:
            raise ValueError(f"{self.name} needs steps >= 1, got {self.steps}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0


def sampler_config(section: dict | None = None, where: str | None = None, **overrides) -> SamplerConfig:
    """Build a config: per-sampler defaults <- the model folder's ``sampler`` section <- CLI overrides.

    ``None`` overrides are ignored (pass argparse values straight through). When an override switches to
    a different sampler than the section names, the section is ignored: its values (e.g. guidance 1 for a
    distilled model) belong to the sampler it describes. Unknown section keys are ignored. With ``where``
    (the file the section came from), the section's values are type- and range-checked and any failure is
    a ``ModelFolderError`` naming ``where`` and the field.
    """
    if where is not None:
        from .utils import ModelFolderError, config_values

        config_values(SamplerConfig, section if section is not None else {}, where)
        try:
            return sampler_config(section, **overrides)
        except ValueError as exc:
            raise ModelFolderError(f"{where}: {exc}") from None
    section = dict(section or {})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SamplerConfig)}
    if unknown:
        raise ValueError(f"unknown sampler option(s): {', '.join(sorted(unknown))}")
    name = overrides.get("name", section.get("name", "fewstep"))
    if name not in DEFAULTS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    values = dict(DEFAULTS[name], name=name)
    if section.get("name", "fewstep") == name:
        values.update({k: v for k, v in section.items() if k in {f.name for f in dataclasses.fields(SamplerConfig)}})
    if {"steps", "denoising_step_list"} & set(overrides) and "sigmas" not in overrides:
        values["sigmas"] = None  # an explicit step choice replaces a preset's sigma list (rCM), never silently loses
    values.update(overrides)
    return SamplerConfig(**values)


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------

def shift_sigmas(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, bit for bit (fused multiply-add, two halves)."""
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(steps - 1))
    idx = np.arange(steps)
    lo = (np.float64(a) + np.float64(step) * idx).astype(np.float32)
    hi = (np.float64(b) - np.float64(step) * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, lo, hi)


def flow_match_table(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Self-Forcing / CausVid ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` after
    ``set_timesteps(1000, training=True)``: (sigmas, timesteps), 1000 float32 entries each, bit-exact."""
    s = np.float32(shift)
    sigmas = _torch_linspace_f32(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    sigmas = (s * sigmas) / (np.float32(1) + (s - np.float32(1)) * sigmas)
    return sigmas, sigmas * np.float32(NUM_TRAIN_TIMESTEPS)


def table_sigma(t: float, shift: float) -> float:
    """Nearest-entry sigma lookup of a timestep in the few-step table (``argmin |timesteps - t|``)."""
    sigmas, timesteps = flow_match_table(shift)
    return float(sigmas[int(np.argmin(np.abs(timesteps.astype(np.float64) - float(t))))])


def wan_unipc_sigmas(steps: int, shift: float) -> tuple[list[int], np.ndarray]:
    """Wan's ``FlowUniPCMultistepScheduler.set_timesteps(steps, shift)``: integer timesteps and the
    float32 sigma grid (``steps + 1`` entries, last 0), returned as float64."""
    alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1].copy()
    train_sigmas = (1.0 - alphas).astype(np.float32)  # torch.from_numpy(...).to(float32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])  # 0.999..., 0.0
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift_sigmas(sigmas, shift)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncation, as Wan
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    return [int(t) for t in timesteps], sigmas


@dataclass
class Schedule:
    timesteps: list  # what the DiT gets, one per step (int for unipc/euler, float for fewstep)
    sigmas: np.ndarray  # float64, len(timesteps) + 1; the last is 0 (the output is clean data)


def schedule(config: SamplerConfig) -> Schedule:
    if config.name == "fewstep" and config.sigmas is not None:
        timesteps = [_timestep(NUM_TRAIN_TIMESTEPS * s, config.timestep_dtype) for s in config.sigmas]
        return Schedule(timesteps, np.array(list(config.sigmas) + [0.0], dtype=np.float64))
    if config.name == "fewstep":
        table_sigmas, table_t = flow_match_table(config.shift)
        steps = np.asarray(config.denoising_step_list, dtype=np.float64)
        if config.warp:
            ext_t = np.concatenate([table_t, np.zeros(1, np.float32)])
            idx = NUM_TRAIN_TIMESTEPS - steps
            if np.any(idx != np.round(idx)):
                raise ValueError(f"warped denoising steps must be integers, got {config.denoising_step_list}")
            timesteps = [float(t) for t in ext_t[idx.astype(np.int64)]]
        else:
            timesteps = [float(t) for t in steps]
        lookup = [int(np.argmin(np.abs(table_t.astype(np.float64) - t))) for t in timesteps]
        timesteps = [_timestep(t, config.timestep_dtype) for t in timesteps]
        sigmas = np.array([float(table_sigmas[k]) for k in lookup] + [0.0], dtype=np.float64)
        return Schedule(timesteps, sigmas)
    timesteps, sigmas = wan_unipc_sigmas(config.steps, config.shift)
    return Schedule(timesteps, sigmas)


def _timestep(t: float, dtype: str) -> float:
    """``t`` as the DiT receives it: float32, or rounded to bfloat16 (round to nearest even, as torch)."""
    return float(mx.array(t, dtype=mx.float32).astype(mx.bfloat16).astype(mx.float32).item()) \
        if dtype == "bfloat16" else float(t)


def sampler_timesteps(name: str = "fewstep", steps: int | None = None, shift: float | None = None,
                      denoising_step_list: Sequence[float] | None = None, warp: bool | None = None) -> list[float]:
    """The timesteps the DiT receives, one per step (``None`` arguments take the sampler's defaults)."""
    config = sampler_config(name=name, steps=steps, shift=shift, warp=warp,
                            denoising_step_list=None if denoising_step_list is None else list(denoising_step_list))
    return schedule(config).timesteps


# --------------------------------------------------------------------------------------------------
# UniPC (bh2) scalar coefficients, float64. Port of [WAN] fm_solvers_unipc.py / [DIFF] UniPC with
# flow sigmas: alpha = 1 - sigma, lambda = log(alpha) - log(sigma).
# --------------------------------------------------------------------------------------------------

def _lambda(sigma: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.log(np.float64(1.0 - sigma)) - np.log(np.float64(sigma)))


def _expm1(x: float) -> float:
    return float(np.expm1(np.float64(x)))


def _unic_rhos(hh: float, b_h: float, rks: list[float]) -> np.ndarray:
    """rhos_c = solve(R, b) with R[i] = rks**i, b[i] = h_phi_{i+1} * (i+1)! / B_h (order = len(rks))."""
    order = len(rks)
    if order == 1:
        return np.array([0.5])
    h_phi_k = _expm1(hh) / hh - 1
    factorial_i = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return np.linalg.solve(np.array(R), np.array(b))


def _bh2_step(sigma_t: float, sigma_s0: float) -> tuple[float, float, float, float, float]:
    """Shared UniP/UniC quantities for a step from sigma_s0 to sigma_t: alpha_t, lambda_s0, h, h_phi_1, B(h)."""
    lambda_t, lambda_s0 = _lambda(sigma_t), _lambda(sigma_s0)
    h = lambda_t - lambda_s0
    h_phi_1 = _expm1(-h)
    return 1.0 - sigma_t, lambda_s0, h, h_phi_1, h_phi_1  # bh2: B(h) = expm1(-h)


def _unipc_predictor(x, models: list, sigmas: np.ndarray, i: int, order: int):
    """UniP-bh2 step from sigma_i to sigma_{i+1}; ``models`` = converted outputs, newest last."""
    sigma_t, sigma_s0 = sigmas[i + 1], sigmas[i]
    alpha_t, lambda_s0, h, h_phi_1, b_h = _bh2_step(sigma_t, sigma_s0)
    m0 = models[-1]
    x_t_ = float(sigma_t / sigma_s0) * x - float(alpha_t * h_phi_1) * m0
    if order == 1:
        return x_t_
    if order != 2:
        raise ValueError("UniPC here is order <= 2")
    rk = (_lambda(sigmas[i - 1]) - lambda_s0) / h
    d1 = (models[-2] - m0) * float(1.0 / rk)
    pred_res = 0.5 * d1  # order 2: rhos_p = 0.5
    return x_t_ - float(alpha_t * b_h) * pred_res


def _unipc_corrector(model_t, last_sample, models: list, sigmas: np.ndarray, i: int, order: int):
    """UniC-bh2: correct the sample at sigma_i (predicted from ``last_sample`` at sigma_{i-1}) with the new
    converted output ``model_t``; ``models`` = outputs before this step, newest last."""
    sigma_t, sigma_s0 = sigmas[i], sigmas[i - 1]
    alpha_t, lambda_s0, h, h_phi_1, b_h = _bh2_step(sigma_t, sigma_s0)
    m0 = models[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_lambda(sigmas[i - (k + 1)]) - lambda_s0) / h
        rks.append(rk)
        d1s.append((models[-(k + 1)] - m0) * float(1.0 / rk))
    rks.append(1.0)
    rhos_c = _unic_rhos(-h, b_h, rks)
    x_t_ = float(sigma_t / sigma_s0) * last_sample - float(alpha_t * h_phi_1) * m0
    corr = float(rhos_c[-1]) * (model_t - m0)
    for rho, d1 in zip(rhos_c[:-1], d1s):
        corr = corr + float(rho) * d1
    return x_t_ - float(alpha_t * b_h) * corr


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------

def latent_noise(shape: Sequence[int], seed: int) -> mx.array:
    """The initial fp32 noise for ``seed`` (the re-noising draws of ``sample(key=seed)`` are independent)."""
    return mx.random.normal(tuple(shape), dtype=mx.float32, key=_seed_keys(seed)[0])


def _seed_keys(seed: int) -> mx.array:
    return mx.random.split(mx.random.key(int(seed)), 2)


def _renoise_fn(key, renoise, n: int):
    if renoise is not None:
        if callable(renoise):
            return renoise
        draws = list(renoise)
        if len(draws) < n - 1:
            raise ValueError(f"renoise holds {len(draws)} arrays; {n - 1} steps re-noise")
        return lambda shape, step: draws[step - 1]
    if key is None:
        return None
    if isinstance(key, (int, np.integer)):
        key = _seed_keys(int(key))[1]
    keys = mx.random.split(key, max(n, 2))
    return lambda shape, step: mx.random.normal(shape, dtype=mx.float32, key=keys[step])


def sample(config: SamplerConfig | str, velocity: Velocity, noise: mx.array, *,
           uncond_velocity: Velocity | None = None, key: int | mx.array | None = None,
           renoise: Callable[[tuple, int], mx.array] | Sequence[mx.array] | None = None,
           progress: Progress | None = None) -> mx.array:
    """Run a sampler from ``noise`` (x at the first sigma, ``[B, F, H, W, C]``) to clean latents (fp32).

    - ``velocity(x, t)``: the prompt branch. ``uncond_velocity(x, t)``: the negative prompt, required when
      ``config.guidance > 1`` and never called otherwise.
    - ``key``: int seed or ``mx.random`` key for the few-step re-noising draws (required by fewstep with
      more than one step unless ``renoise`` is given). ``renoise(shape, step)`` or a list of arrays
      (``list[step - 1]``) supplies the noise mixed in before step ``step`` (1 <= step < n).
    - ``progress(i, n, t)``: called after step ``i`` (0-based) of ``n`` finished (the latents are evaluated).
    """
    if isinstance(config, str):
        config = sampler_config(name=config)
    if config.uses_cfg and uncond_velocity is None:
        raise ValueError(f"guidance {config.guidance} > 1 needs uncond_velocity (the negative prompt branch); "
                         f"pass guidance <= 1 to sample without classifier-free guidance")
    sched = schedule(config)
    n = len(sched.timesteps)
    x = noise.astype(mx.float32)
    if config.noise_scale != 1.0:
        x = config.noise_scale * x

    def guided(x, t):
        v = velocity(x, t).astype(mx.float32)
        if config.uses_cfg:
            v_u = uncond_velocity(x, t).astype(mx.float32)
            v = v_u + config.guidance * (v - v_u)
        return v

    if config.name == "fewstep":
        draw = _renoise_fn(key, renoise, n)
        if draw is None and n > 1 and config.stochastic:
            raise ValueError("the few-step sampler re-noises between steps: pass key (a seed) or renoise")
        return _fewstep(x, guided, sched, draw, progress, config.stochastic)
    if config.name == "euler":
        return _euler(x, guided, sched, progress)
    return _unipc(x, guided, sched, progress)


def _fewstep(x, guided, sched: Schedule, draw, progress, stochastic: bool = True):
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        v = guided(x, t)
        x0 = x - float(sigma) * v
        if i < n - 1 and not stochastic:
            x = x + float(sched.sigmas[i + 1] - sigma) * v
        elif i < n - 1:
            eps = draw(tuple(x.shape), i + 1)
            eps = eps.astype(mx.float32) if isinstance(eps, mx.array) else mx.array(np.asarray(eps, np.float32))
            sigma_next = float(sched.sigmas[i + 1])
            x = (1.0 - sigma_next) * x0 + sigma_next * eps
        else:
            x = x0
        mx.eval(x)
        if progress is not None:
            progress(i, n, t)
    return x


def _euler(x, guided, sched: Schedule, progress):
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        x = x + float(sched.sigmas[i + 1] - sched.sigmas[i]) * guided(x, t)
        mx.eval(x)
        if progress is not None:
            progress(i, n, t)
    return x


def _unipc(x, guided, sched: Schedule, progress, solver_order: int = 2):
    """[WAN] ``FlowUniPCMultistepScheduler.step`` (bh2, predict_x0, lower_order_final), one call per step."""
    sigmas = sched.sigmas
    n = len(sched.timesteps)
    models: list = []  # converted model outputs (x0 predictions), newest last, at most solver_order
    last_sample = None
    this_order = 1
    lower_order_nums = 0
    for i, t in enumerate(sched.timesteps):
        m = x - float(sigmas[i]) * guided(x, t)  # convert_model_output: x0 = x - sigma v
        if i > 0 and last_sample is not None:
            x = _unipc_corrector(m, last_sample, models, sigmas, i, this_order)
        models = (models + [m])[-solver_order:]
        this_order = min(solver_order, n - i)  # lower_order_final
        this_order = min(this_order, lower_order_nums + 1)  # warm-up
        last_sample = x
        x = _unipc_predictor(x, models, sigmas, i, this_order)
        lower_order_nums = min(lower_order_nums + 1, solver_order)
        mx.eval(x, m, last_sample)
        if progress is not None:
            progress(i, n, t)
    return x
