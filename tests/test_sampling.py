"""Sampler schedules and updates against models.md §5, diffusers' UniPC and hand-written loops."""

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_video import sampling as S

# models.md §5.2 (reproduced there with Wan's fm_solvers_unipc.py)
WAN_50 = {
    5.0: [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890, 882,
          873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584, 555, 522,
          487, 448, 405, 356, 302, 241, 172, 92],
    3.0: [999, 992, 985, 978, 971, 963, 956, 948, 939, 931, 922, 913, 904, 894, 884, 874, 864, 853, 841, 829, 817,
          805, 792, 778, 764, 749, 734, 718, 701, 684, 666, 647, 627, 606, 585, 562, 538, 512, 486, 458, 428, 396,
          363, 327, 290, 249, 206, 160, 111, 57],
    8.0: [999, 997, 994, 991, 989, 986, 983, 979, 976, 973, 969, 965, 961, 957, 953, 948, 944, 939, 934, 928, 922,
          916, 910, 903, 896, 888, 880, 871, 862, 852, 841, 830, 817, 804, 789, 773, 756, 737, 716, 692, 666, 636,
          603, 565, 521, 470, 409, 337, 249, 140],
}

A, B, C = 0.8, 0.3, 0.1  # fake velocity v = A x + B sin(x) + C t/1000 (t-dependence checks the fed timesteps)


def fake_velocity(x, t):
    return A * x + B * mx.sin(x) + C * (t / 1000.0)


def fake_velocity_np(x, t):
    return A * x + B * np.sin(x) + C * (t / 1000.0)


def start_noise(shape=(1, 3, 4, 6, 16), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- schedules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [3.0, 5.0, 8.0])
def test_wan_unipc_tables_50_steps(shift):
    ts = S.sampler_timesteps("unipc", steps=50, shift=shift)
    assert ts == WAN_50[shift]
    assert all(isinstance(t, int) for t in ts)  # Wan feeds truncated integer timesteps


def test_wan_unipc_grid_details():
    assert S.sampler_timesteps("unipc", steps=4, shift=5.0) == [999, 937, 833, 624]
    ts, sigmas = S.wan_unipc_sigmas(50, 5.0)
    assert sigmas[0] == pytest.approx(0.99980, abs=5e-6) and sigmas[-2] == pytest.approx(0.09251, abs=5e-6)
    assert sigmas[-1] == 0.0 and len(sigmas) == 51
    assert np.all(sigmas == sigmas.astype(np.float32))  # Wan keeps a float32 sigma tensor
    assert S.sampler_timesteps("euler", steps=50, shift=5.0) == WAN_50[5.0]


def test_fewstep_warp_self_forcing_and_causvid():
    assert S.sampler_timesteps("fewstep") == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-4)
    sched = S.schedule(S.sampler_config())
    assert sched.sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625, 0.0], abs=1e-6)
    # CausVid warp config (trailing 0 dropped), shift 8
    ts = S.sampler_timesteps("fewstep", shift=8.0, denoising_step_list=[1000, 750, 500, 250, 0])
    assert ts == pytest.approx([1000.0, 960.0, 888.889, 727.273], abs=1e-3)


def test_fewstep_causvid_no_warp_nearest_sigma():
    cfg = S.sampler_config(name="fewstep", shift=8.0, warp=False, denoising_step_list=[1000, 757, 522, 0])
    sched = S.schedule(cfg)
    assert sched.timesteps == [1000.0, 757.0, 522.0]
    assert sched.sigmas[:3] == pytest.approx([1.0, 0.756757, 0.521739], abs=1e-6)
    assert S.table_sigma(757, 8.0) == pytest.approx(0.756757, abs=1e-6)


def test_flow_match_table_bit_exact_vs_torch():
    torch = pytest.importorskip("torch")
    for shift in (5.0, 8.0):
        ref = torch.linspace(1.0, 0.0, 1001)[:-1]  # Self-Forcing FlowMatchScheduler, float32
        ref = shift * ref / (1 + (shift - 1) * ref)
        sigmas, timesteps = S.flow_match_table(shift)
        assert np.array_equal(sigmas, ref.numpy())
        assert np.array_equal(timesteps, (ref * 1000).numpy())


def test_config_defaults_section_and_overrides():
    few = S.sampler_config()
    assert (few.name, few.steps, few.shift, few.guidance, few.warp) == ("fewstep", 4, 5.0, 1.0, True)
    assert few.denoising_step_list == [1000, 750, 500, 250] and not few.uses_cfg
    uni = S.sampler_config(name="unipc")
    assert (uni.steps, uni.shift, uni.guidance) == (50, 5.0, 5.0) and uni.uses_cfg
    eul = S.sampler_config(name="euler")
    assert (eul.steps, eul.shift, eul.guidance) == (50, 5.0, 5.0)
    section = {"name": "fewstep", "shift": 8.0, "denoising_step_list": [1000, 757, 522, 0], "warp": False, "x": 1}
    cfg = S.sampler_config(section, shift=None, guidance=None)  # None overrides = CLI flag not given
    assert (cfg.shift, cfg.warp, cfg.denoising_step_list, cfg.steps) == (8.0, False, [1000, 757, 522], 3)
    assert S.sampler_config(section, shift=6.0).shift == 6.0
    switched = S.sampler_config(section, name="unipc", steps=20)  # section belongs to fewstep: ignored
    assert (switched.shift, switched.guidance, switched.steps) == (5.0, 5.0, 20)
    assert S.sampler_config(steps=2).denoising_step_list == [1000, 500]
    with pytest.raises(ValueError, match="unknown sampler"):
        S.sampler_config(name="ddim")
    with pytest.raises(ValueError, match="decreasing"):
        S.sampler_config(denoising_step_list=[250, 500])
    with pytest.raises(ValueError, match="unknown sampler option"):
        S.sampler_config(stepz=3)


# -- UniPC parity --------------------------------------------------------------------------------------

def diffusers_unipc(noise: np.ndarray, steps: int, shift: float, dtype):
    """Drive diffusers' UniPC (bh2) on Wan's sigma grid with the fake velocity."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2,
        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", predict_x0=True, num_train_timesteps=1000)
    # Wan's grid: diffusers applies flow_shift to passed sigmas, so pass Wan's unshifted linspace(0.999, 0).
    sigma_max = float(np.float32(1 - 1 / 1000))
    sched.set_timesteps(sigmas=np.linspace(sigma_max, 0.0, steps + 1)[:-1])
    sched.set_begin_index(0)
    ts, sigmas = S.wan_unipc_sigmas(steps, shift)
    assert sched.timesteps.tolist() == ts and np.array_equal(sched.sigmas.numpy().astype(np.float64), sigmas)
    sched.sigmas = sched.sigmas.to(dtype)
    x = torch.from_numpy(noise).to(dtype)
    for t in sched.timesteps:
        v = A * x + B * torch.sin(x) + C * (float(t) / 1000)
        x = sched.step(v, t, x).prev_sample
    return x.double().numpy()


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (10, 8.0), (2, 3.0)])
def test_unipc_matches_diffusers(steps, shift):
    torch = pytest.importorskip("torch")
    noise = start_noise()
    out = np.array(S.sample(S.sampler_config(name="unipc", steps=steps, shift=shift, guidance=1.0),
                            fake_velocity, mx.array(noise)))
    for dtype in (torch.float32, torch.float64):
        ref = diffusers_unipc(noise, steps, shift, dtype)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel < 2e-6, (dtype, rel)  # measured ~3e-7 (fp32) / ~6e-7 (fp64 reference)
    # and the result is not trivially the start: the solver moved
    assert np.abs(out - noise).mean() > 0.1


def test_unipc_single_step_is_x0():
    noise = start_noise()
    out = np.array(S.sample(S.sampler_config(name="unipc", steps=1, guidance=1.0), fake_velocity, mx.array(noise)))
    (t,), sigmas = S.wan_unipc_sigmas(1, 5.0)
    np.testing.assert_allclose(out, noise - sigmas[0] * fake_velocity_np(noise, t), rtol=1e-6, atol=1e-6)


# -- Euler ---------------------------------------------------------------------------------------------

def test_euler_matches_hand_loop():
    noise = start_noise()
    cfg = S.sampler_config(name="euler", steps=8, shift=5.0, guidance=1.0)
    out = np.array(S.sample(cfg, fake_velocity, mx.array(noise)))
    ts, sigmas = S.wan_unipc_sigmas(8, 5.0)
    x = noise.astype(np.float64)
    for i, t in enumerate(ts):
        x = x + fake_velocity_np(x, t) * (sigmas[i + 1] - sigmas[i])
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


# -- few-step ------------------------------------------------------------------------------------------

def self_forcing_loop(noise, eps, shift, step_list, warp):
    """models.md §5.3, written out in numpy: warp, nearest-sigma lookup, x0, re-noise with fresh noise."""
    sig = np.linspace(1.0, 0.0, 1001)[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    tab = sig * 1000
    steps = [s for s in step_list if s != 0]
    ts = [np.concatenate([tab, [0.0]])[1000 - s] for s in steps] if warp else [float(s) for s in steps]
    sigma = lambda t: sig[np.argmin(np.abs(tab - t))]  # noqa: E731
    x = noise.astype(np.float64)
    for k, t in enumerate(ts):
        x0 = x - sigma(t) * fake_velocity_np(x, t)
        if k < len(ts) - 1:
            s_next = sigma(ts[k + 1])
            x = (1 - s_next) * x0 + s_next * eps[k]
        else:
            x = x0
    return x, ts


@pytest.mark.parametrize("shift,step_list,warp", [(5.0, [1000, 750, 500, 250], True),
                                                  (8.0, [1000, 757, 522, 0], False)])
def test_fewstep_matches_self_forcing_loop(shift, step_list, warp):
    noise = start_noise(seed=1)
    eps = [start_noise(seed=10 + k) for k in range(3)]
    seen = []
    cfg = S.sampler_config(name="fewstep", shift=shift, denoising_step_list=step_list, warp=warp)
    out = np.array(S.sample(cfg, lambda x, t: seen.append(t) or fake_velocity(x, t), mx.array(noise),
                            renoise=[mx.array(e) for e in eps]))
    ref, ts = self_forcing_loop(noise, eps, shift, step_list, warp)
    assert seen == pytest.approx(ts, abs=1e-3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # the injected noise matters: other draws give another result
    out2 = np.array(S.sample(cfg, fake_velocity, mx.array(noise), renoise=lambda shape, step: mx.zeros(shape)))
    assert np.abs(out2 - out).max() > 1e-2


def test_fewstep_needs_noise_source():
    with pytest.raises(ValueError, match="re-noises"):
        S.sample(S.sampler_config(), fake_velocity, mx.zeros((1, 1, 2, 2, 4)))


# -- CFG -----------------------------------------------------------------------------------------------

def test_guidance_le_1_skips_uncond():
    calls = {"c": 0, "u": 0}

    def cond(x, t):
        calls["c"] += 1
        return fake_velocity(x, t)

    def uncond(x, t):
        calls["u"] += 1
        return x

    for name in ("unipc", "euler"):
        S.sample(S.sampler_config(name=name, steps=5, guidance=1.0), cond, mx.zeros((1, 1, 2, 2, 4)),
                 uncond_velocity=uncond)
    S.sample(S.sampler_config(), cond, mx.zeros((1, 1, 2, 2, 4)), uncond_velocity=uncond, key=0)
    assert calls == {"c": 14, "u": 0}
    S.sample(S.sampler_config(name="euler", steps=3, guidance=2.0), cond, mx.zeros((1, 1, 2, 2, 4)),
             uncond_velocity=uncond)
    assert calls == {"c": 17, "u": 3}
    with pytest.raises(ValueError, match="uncond_velocity"):
        S.sample(S.sampler_config(name="unipc"), cond, mx.zeros((1, 1, 2, 2, 4)))


def test_guidance_combination():
    g = 4.5
    noise = start_noise()
    cfg = S.sampler_config(name="euler", steps=3, shift=5.0, guidance=g)
    out = np.array(S.sample(cfg, fake_velocity, mx.array(noise), uncond_velocity=lambda x, t: 0.5 * mx.cos(x)))
    ts, sigmas = S.wan_unipc_sigmas(3, 5.0)
    x = noise.astype(np.float64)
    for i, t in enumerate(ts):
        v_c, v_u = fake_velocity_np(x, t), 0.5 * np.cos(x)
        x = x + (v_u + g * (v_c - v_u)) * (sigmas[i + 1] - sigmas[i])
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


# -- determinism, progress -----------------------------------------------------------------------------

def test_seed_determinism():
    shape = (1, 2, 4, 4, 16)
    cfg = S.sampler_config()

    def run(seed):
        return np.array(S.sample(cfg, fake_velocity, S.latent_noise(shape, seed), key=seed))

    a, b, c = run(7), run(7), run(8)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2
    # initial noise and re-noise draws are independent streams
    assert not np.allclose(np.array(S.latent_noise(shape, 7)), np.array(S.latent_noise(shape, 8)))


def test_progress_callback():
    events = []
    S.sample(S.sampler_config(), fake_velocity, mx.zeros((1, 1, 2, 2, 4)), key=0,
             progress=lambda i, n, t: events.append((i, n, t)))
    assert [(i, n) for i, n, _ in events] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [t for *_, t in events] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-4)


def test_output_dtype_fp32_from_bf16_velocity():
    out = S.sample(S.sampler_config(name="euler", steps=2, guidance=1.0),
                   lambda x, t: fake_velocity(x, t).astype(mx.bfloat16), mx.ones((1, 1, 2, 2, 4)))
    assert out.dtype == mx.float32
