"""`mlx-video generate` end to end on a small converted model folder, denoise-loop parity with a PyTorch
loop driving diffusers, fail-closed behaviour and flag validation."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_video import pipeline, sampling
from mlx_video.cli import main
from mlx_video.models import wan_dit
from mlx_video.video import read_video, video_info
from tests.dit_reference import float64_timestep_embedding, rel_error
from tests.model_factory import build_model_folder, build_sources

SMALL = ["--height", "64", "--width", "96", "--frames", "9"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def model(sources, tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"), sources)


def generate(model, out, *extra, prompt="a red fox running through snow"):
    return main(["generate", "--model", str(model), "--prompt", prompt, *SMALL, "--output", str(out), "--quiet",
                 "--no-prompt-cache", *extra])


def test_generate_writes_mp4_sidecar_and_is_deterministic(model, tmp_path):
    assert generate(model, tmp_path / "a.mp4", "--seed", "7") == 0
    info = video_info(tmp_path / "a.mp4")
    assert (info.frames, info.width, info.height) == (9, 96, 64)
    assert abs(info.fps - 16) < 1e-6
    meta = json.loads((tmp_path / "a.mp4.json").read_text())
    assert meta["seed"] == 7 and meta["sampler"]["name"] == "fewstep"
    np.testing.assert_allclose(meta["timesteps"], [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)
    for stage in ("encode", "denoise", "decode"):
        assert meta["stages"][stage]["seconds"] > 0 and meta["stages"][stage]["peak_memory_bytes"] > 0
    assert generate(model, tmp_path / "b.mp4", "--seed", "7") == 0
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))
    assert generate(model, tmp_path / "c.mp4", "--seed", "8") == 0
    assert not np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "c.mp4"))


def test_config_from_metadata_replays_exactly(model, tmp_path):
    assert generate(model, tmp_path / "a.mp4", "--seed", "3", "--sampler", "euler", "--steps", "3", "--guidance", "2",
                    "--negative-prompt", "blurry") == 0
    meta = json.loads((tmp_path / "a.mp4.json").read_text())
    assert meta["sampler"]["name"] == "euler" and meta["sampler"]["guidance"] == 2.0 and len(meta["timesteps"]) == 3
    assert main(["generate", "--config-from-metadata", str(tmp_path / "a.mp4.json"), "--output",
                 str(tmp_path / "b.mp4"), "--quiet", "--no-prompt-cache"]) == 0
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))
    replay = json.loads((tmp_path / "b.mp4.json").read_text())
    for key in ("prompt", "negative_prompt", "seed", "height", "width", "frames", "sampler", "timesteps"):
        assert replay[key] == meta[key]


def test_json_events_and_random_seed(model, tmp_path, capsys):
    assert main(["generate", "--model", str(model), "--prompt", "waves", *SMALL, "--output", str(tmp_path / "e.mp4"),
                 "--json-events", "--seed", "-1", "--no-prompt-cache"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "complete" and kinds.count("step") == 4
    assert [e["stage"] for e in events if e["event"] == "stage_end"] == ["encode", "denoise", "decode"]
    seed = int(captured.err.split("seed: ")[1].split()[0])
    assert json.loads((tmp_path / "e.mp4.json").read_text())["seed"] == seed == events[0]["seed"]


def test_prompt_cache_skips_the_encoder(model, tmp_path, monkeypatch):
    from mlx_video.models import umt5

    cache = tmp_path / "cache"
    calls = []
    original = umt5.UMT5Encoder.encode_tokens
    monkeypatch.setattr(umt5.UMT5Encoder, "encode_tokens", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = ["generate", "--model", str(model), "--prompt", "a red fox running through snow", *SMALL, "--quiet",
            "--prompt-cache", str(cache)]
    assert main(args + ["--output", str(tmp_path / "a.mp4")]) == 0  # fills the cache
    assert calls == [1] and len(list(cache.iterdir())) == 1
    assert main(args + ["--output", str(tmp_path / "b.mp4")]) == 0
    assert calls == [1]  # the encoder did not run again
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))


def test_python_api_keeps_models_between_generations(model):
    models = pipeline.Models(model)
    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5, seed=1)
    a = pipeline.generate(model, req, None, models=models, keep_models=True)
    assert models.dit is not None and models.text_encoder is not None
    b = pipeline.generate(model, req, None, models=models, keep_models=True)
    assert np.array_equal(np.array(a.latents), np.array(b.latents))
    assert a.latents.shape == (1, 2, 4, 6, 16)
    c = pipeline.generate(model, req, None)  # fresh load, models freed after each stage
    np.testing.assert_array_equal(np.array(a.latents), np.array(c.latents))


# ------------------------------------------------------------------------------------ denoise-loop parity


def _torch_velocity(dit, context):
    ctx = torch.cat([context, torch.zeros(1, 512 - context.shape[1], context.shape[2], dtype=context.dtype)], 1)

    def v(x_nthwc: np.ndarray, t: float) -> np.ndarray:
        x = torch.from_numpy(x_nthwc).permute(0, 4, 1, 2, 3).double()
        with torch.no_grad():
            out = dit(x, torch.tensor([t], dtype=torch.float64), ctx, return_dict=False)[0]
        return out.permute(0, 2, 3, 4, 1).numpy()

    return v


def test_fewstep_loop_matches_pytorch_loop_over_diffusers(sources, model, monkeypatch):
    """Self-Forcing few-step math in plain PyTorch/NumPy driving diffusers (float64) vs MLX fp32."""
    import diffusers.models.embeddings as emb

    monkeypatch.setattr(emb, "get_timestep_embedding", float64_timestep_embedding)
    dit_ref = sources["dit"].double()
    rng = np.random.default_rng(0)
    shape = (1, 2, 4, 6, 16)
    noise = rng.standard_normal(shape).astype(np.float32)
    renoise = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    context = rng.standard_normal((1, 5, 64)).astype(np.float32)
    # reference loop (models.md §5.3): warped t, x0 = x - sigma v, x <- (1 - s') x0 + s' eps
    sigma_table = np.asarray(sampling.shift_sigmas(np.linspace(1.0, 0.0, 1001)[:-1], 5.0))
    ts = [1000.0 * sigma_table[i] for i in (0, 250, 500, 750)]
    v_ref = _torch_velocity(dit_ref, torch.from_numpy(context).double())
    x = noise.astype(np.float64)
    for k, t in enumerate(ts):
        sigma = t / 1000.0
        x0 = x - sigma * v_ref(x, t)
        if k + 1 < len(ts):
            s = ts[k + 1] / 1000.0
            x = (1 - s) * x0 + s * renoise[k]
    dit = wan_dit.load(model)
    text = dit.prepare_text(mx.array(context))
    out = sampling.sample(sampling.sampler_config(None), lambda x, t: dit(x, [t], text=text), mx.array(noise),
                          renoise=[mx.array(r) for r in renoise])
    assert rel_error(np.array(out), x0) <= 1e-4
    sources["dit"].float()


def test_unipc_cfg_loop_matches_pytorch_loop(sources, model, monkeypatch):
    """UniPC with classifier-free guidance: MLX DiT vs diffusers, both driven by the same scheduler math."""
    import diffusers.models.embeddings as emb
    from diffusers import UniPCMultistepScheduler

    monkeypatch.setattr(emb, "get_timestep_embedding", float64_timestep_embedding)
    dit_ref = sources["dit"].double()
    rng = np.random.default_rng(1)
    shape = (1, 1, 4, 6, 16)
    noise = rng.standard_normal(shape).astype(np.float32)
    cond, uncond = (rng.standard_normal((1, n, 64)).astype(np.float32) for n in (6, 3))
    g, steps, shift = 3.0, 5, 5.0
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=shift, solver_order=2, solver_type="bh2", lower_order_final=True,
                                    final_sigmas_type="zero", predict_x0=True)
    sched.set_timesteps(sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1])  # Wan's grid (diffusers shifts it)
    vc = _torch_velocity(dit_ref, torch.from_numpy(cond).double())
    vu = _torch_velocity(dit_ref, torch.from_numpy(uncond).double())
    ts = [int(t) for t in sched.timesteps]
    x = torch.from_numpy(noise).double()
    for t in sched.timesteps:
        xn = x.numpy()
        u = vu(xn, float(int(t)))
        v = u + g * (vc(xn, float(int(t))) - u)
        x = sched.step(torch.from_numpy(v), t, x).prev_sample
    cfg = sampling.sampler_config(None, name="unipc", steps=steps, shift=shift, guidance=g)
    assert sampling.sampler_timesteps("unipc", steps, shift) == ts
    dit = wan_dit.load(model)
    tc, tu = dit.prepare_text(mx.array(cond)), dit.prepare_text(mx.array(uncond))
    out = sampling.sample(cfg, lambda x, t: dit(x, [t], text=tc), mx.array(noise),
                          uncond_velocity=lambda x, t: dit(x, [t], text=tu))
    assert rel_error(np.array(out), x.numpy()) <= 1e-4
    sources["dit"].float()


# ------------------------------------------------------------------------------------------- fail closed


def _poison(model, tmp_path, name, key, value):
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    weights = dict(mx.load(str(bad / name)))
    weights[key] = mx.full(weights[key].shape, value, dtype=weights[key].dtype)
    mx.save_safetensors(str(bad / name), weights)
    return bad


def test_nan_latents_leave_no_mp4_and_a_failure_report(model, tmp_path, capsys):
    bad = _poison(model, tmp_path, "dit.safetensors", "head.linear.bias", float("nan"))
    out = tmp_path / "nan.mp4"
    assert generate(bad, out) == 1
    assert "generation failed in denoise" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "nan.mp4.json").exists()
    report = json.loads((tmp_path / "nan.mp4.failure.json").read_text())
    assert "finite" in report["reason"] or "NaN" in report["reason"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".nan")] == []


def test_black_video_is_refused(model, tmp_path):
    weights = mx.load(str(model / "decoder.safetensors"))
    last = max((k for k in weights if k.startswith("decoder.") and k.endswith(".bias")),
               key=lambda k: int(k.split(".")[1]))
    bad = _poison(model, tmp_path, "decoder.safetensors", last, -100.0)
    out = tmp_path / "black.mp4"
    assert generate(bad, out) == 1
    assert not out.exists()
    report = json.loads((tmp_path / "black.mp4.failure.json").read_text())
    assert "black" in report["reason"] or "constant" in report["reason"]


# -------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("flags, message", [
    (["--height", "50"], "height must be a positive multiple of 16"),
    (["--width", "100"], "width must be a positive multiple of 16"),
    (["--frames", "10"], "frames must be of the form 4k+1"),
    (["--steps", "0"], "--steps must be positive"),
    (["--sampler", "ddim"], "invalid choice"),
    (["--memory-limit", "lots"], "cannot read 'lots' as a memory size"),
    (["--shift", "-1"], "--shift must be a finite number > 0"),
    (["--denoising-step-list", "250", "500"], "strictly decreasing"),
])
def test_invalid_flags_exit_2(model, tmp_path, capsys, flags, message):
    assert _exit_code(["generate", "--model", str(model), "--prompt", "x", "--output", str(tmp_path / "o.mp4"),
                       *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_missing_model_and_unwritable_output_exit_2(model, tmp_path, capsys):
    cases = [
        (["--model", str(model), "--prompt", "  "], "prompt is empty"),
        (["--model", str(tmp_path / "nope"), "--prompt", "x"], "does not exist"),
        (["--model", str(tmp_path), "--prompt", "x"], "not an mlx-video model folder"),
        (["--model", str(model), "--prompt", "x", "--output", str(tmp_path / "missing" / "o.mp4")], "does not exist"),
        (["--model", str(model), "--prompt-file", str(tmp_path / "none.txt")], "cannot read --prompt-file"),
        # no --model is not an error: the built-in model (tests/test_recipe_student.py)
    ]
    for argv, message in cases:
        assert _exit_code(["generate", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def _exit_code(argv) -> int:
    """Usage errors: argparse's own checks exit via SystemExit(2); the checks after parsing return 2."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_sampler_defaults_come_from_the_model_folder(model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    assert main(["convert", "--mlx-path", str(folder), "--sampler", "euler"]) == 0
    assert generate(folder, tmp_path / "a.mp4", "--steps", "2", "--negative-prompt", "blur") == 0
    meta = json.loads((tmp_path / "a.mp4.json").read_text())["sampler"]
    assert (meta["name"], meta["steps"], meta["guidance"], meta["shift"]) == ("euler", 2, 5.0, 5.0)
    assert generate(folder, tmp_path / "b.mp4", "--sampler", "fewstep") == 0
    assert json.loads((tmp_path / "b.mp4.json").read_text())["sampler"]["name"] == "fewstep"


def test_hub_repo_ids_resolve_from_the_local_cache_offline(model, tmp_path, monkeypatch, capsys):
    """A repo id is read from the Hugging Face cache without network; a missing one says what to run."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-video" / "snapshots" / "0123abcd"
    shutil.copytree(model, snapshot)
    (cache / "models--someone--tiny-video" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-video" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert main(["generate", "--model", "someone/tiny-video", "--prompt", "fox", *SMALL, "--quiet",
                 "--no-prompt-cache", "--output", str(tmp_path / "a.mp4")]) == 0
    assert video_info(tmp_path / "a.mp4").frames == 9
    assert _exit_code(["generate", "--model", "someone/not-downloaded", "--prompt", "fox", "--output",
                       str(tmp_path / "b.mp4")]) == 2
    assert "hf download someone/not-downloaded" in capsys.readouterr().err


def test_dit_peak_memory_prediction_is_within_15_percent():
    """The memory planner's DiT prediction against MLX's peak counter for one forward pass."""
    from mlx_video.utils import parameter_count

    cfg = wan_dit.WanDiTConfig(dim=512, num_layers=1, self_attn_heads=6, cross_attn_heads=6, ffn_dim=1024,
                               head_dim=64, text_dim=64)
    dit = wan_dit.WanDiT(cfg)
    mx.eval(dit.parameters())
    shape = (1, 5, 40, 64, 16)  # 3200 tokens
    dit.attention_budget = 64 * 1024**2
    latents = mx.random.normal(shape)
    text = dit.prepare_text(mx.random.normal((1, 512, 64)))
    mx.eval(latents, text)
    mx.reset_peak_memory()
    mx.eval(dit(latents, [937.5], text=text))
    measured = mx.get_peak_memory()
    predicted = pipeline.dit_peak_bytes(cfg, shape, parameter_count(dit) * 4, dit.attention_budget)
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_memory_limit_and_low_memory_shape_the_plan(model, tmp_path):
    assert generate(model, tmp_path / "a.mp4", "--memory-limit", "1GB", "--low-memory", "--seed", "5") == 0
    plan = json.loads((tmp_path / "a.mp4.json").read_text())["memory_plan"]
    assert plan["limit_bytes"] == 1024**3 and plan["attention_budget_bytes"] == 1024**3 // 16
    assert set(plan["predicted"]) == {"encode", "denoise", "decode"}
    assert generate(model, tmp_path / "b.mp4", "--seed", "5") == 0  # the plan changes memory use, not results
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))
    big = pipeline.GenerationRequest(prompt="x", height=480, width=832, frames=81)
    tight = pipeline.plan_memory(model, big, 256 * 1024**2, low_memory=True)
    roomy = pipeline.plan_memory(model, big, 16 * 1024**3, low_memory=False)
    assert roomy.decoder_tile is None and tight.attention_budget_bytes < roomy.attention_budget_bytes
