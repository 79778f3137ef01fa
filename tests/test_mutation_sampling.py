"""``mlx_video.sampling``: the config precedence, the deterministic few-step variant and its checks (issue 19,
written against survivors of a sampled mutation run of ``sampling.py``). References are explicit arithmetic here."""

from __future__ import annotations

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_video import sampling


def test_a_folder_section_of_another_sampler_keeps_its_settings():
    """A folder whose section names UniPC gets its steps and guidance, not UniPC's defaults. Bug caught: the
    section's name looked up under the wrong key (every non-few-step section then ignored)."""
    cfg = sampling.sampler_config({"name": "unipc", "steps": 7, "guidance": 3.5, "shift": 2.0})
    assert (cfg.name, cfg.steps, cfg.guidance, cfg.shift) == ("unipc", 7, 3.5, 2.0)
    other = sampling.sampler_config({"name": "unipc", "steps": 7}, name="euler")  # switching drops the section
    assert (other.name, other.steps) == ("euler", sampling.DEFAULTS["euler"]["steps"])


def test_an_explicit_step_choice_replaces_a_presets_sigma_list():
    """Bug caught: a preset's sigma list kept (silently winning) when the user asks for other steps."""
    section = {"name": "fewstep", "sigmas": [1.0, 0.5], "denoising_step_list": [1000, 500]}
    assert sampling.sampler_config(section).sigmas == [1.0, 0.5]
    assert sampling.sampler_config(section, denoising_step_list=[1000, 750, 500, 250]).sigmas is None
    assert sampling.sampler_config(section, denoising_step_list=[1000], sigmas=[0.9]).sigmas == [0.9]


def test_the_deterministic_few_step_sampler_is_euler_between_its_steps():
    """``stochastic=False`` (LightX2V): x <- x + (sigma' - sigma) v between steps, and the last step's x0. Bug
    caught: the update dropped."""
    cfg = sampling.sampler_config(None, denoising_step_list=[1000, 750, 500], stochastic=False)
    sched = sampling.schedule(cfg)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)

    def velocity(a, t):
        return 0.3 * a + 0.01 * float(t)

    out = np.array(sampling.sample(cfg, lambda a, t: velocity(a, t), mx.array(x)))
    ref = x.astype(np.float64)
    for i, t in enumerate(sched.timesteps):
        v = 0.3 * ref + 0.01 * float(t)
        ref = ref + (sched.sigmas[i + 1] - sched.sigmas[i]) * v if i < len(sched.timesteps) - 1 else ref - sched.sigmas[i] * v
    assert np.abs(out - ref).max() < 1e-4


def test_sampler_checks_refuse_bad_values_with_the_value():
    """Bugs caught: the guidance error without its value, bfloat16 timesteps refused."""
    with pytest.raises(ValueError, match="guidance must be >= 0, got -1"):
        sampling.SamplerConfig(name="unipc", guidance=-1.0)
    assert sampling.SamplerConfig(timestep_dtype="bfloat16").timestep_dtype == "bfloat16"
    with pytest.raises(ValueError, match="timestep_dtype"):
        sampling.SamplerConfig(timestep_dtype="float16")
    with pytest.raises(ValueError, match="warped denoising steps must be integers"):
        sampling.schedule(sampling.sampler_config(None, denoising_step_list=[1000, 750.5]))
