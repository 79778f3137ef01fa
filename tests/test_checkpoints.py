"""Public Wan2.1-1.3B checkpoint families: snapshots found by content (both layouts, the real file names of
checkpoints.md §5), repo ids from the HF cache, presets (samplers as data), rCM/FSDP layouts, TurboWan refused."""

from __future__ import annotations

import json
import shutil

import mlx_video  # noqa: F401  (MKL before MLX)
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlx_video.cli import main
from mlx_video.sampling import sample, sampler_config, schedule
from tests.dit_reference import diffusers_to_wan_keys, make_diffusers_dit
from tests.test_umt5 import train_tiny_spm, wan_state_dict

TEXT_DIM = 32
TOKENIZER_FILES = ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Tiny random models written as both public layouts of Wan2.1-T2V-1.3B."""
    from transformers import UMT5Config, UMT5EncoderModel
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("snapshots")
    tok = train_tiny_spm(d / "spiece.model")
    vocab = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size() + 7
    torch.manual_seed(0)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=vocab, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                     d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2)).eval()
    dit = make_diffusers_dit(heads=2, head_dim=32, ffn=128, layers=2, text_dim=TEXT_DIM, seed=3, std=0.05)
    wan = {k: v.contiguous() for k, v in diffusers_to_wan_keys(dit.state_dict()).items()}

    orig = d / "Wan2.1-T2V-1.3B"  # §5.1
    (orig / "google" / "umt5-xxl").mkdir(parents=True)
    (orig / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 64,
                                                  "num_heads": 2, "num_layers": 2, "ffn_dim": 128, "text_len": 512}))
    save_file(wan, str(orig / "diffusion_pytorch_model.safetensors"))
    torch.save({k: v.to(torch.bfloat16) for k, v in wan_state_dict(t5.state_dict()).items()},
               orig / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copy(tok, orig / "google" / "umt5-xxl" / "spiece.model")
    for name in TOKENIZER_FILES:
        (orig / "google" / "umt5-xxl" / name).write_text("{}")
    (orig / "LICENSE.txt").write_text("Apache-2.0")

    diff = d / "Wan2.1-T2V-1.3B-Diffusers"  # §5.2: sharded transformer/ and text_encoder/
    diff.mkdir()
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers",
                                                       "WanTransformer3DModel"]}))
    dit.save_pretrained(diff / "transformer", max_shard_size="200KB")
    t5.save_pretrained(diff / "text_encoder", max_shard_size="20KB")
    (diff / "tokenizer").mkdir()
    shutil.copy(tok, diff / "tokenizer" / "spiece.model")
    (diff / "scheduler").mkdir()
    (diff / "scheduler" / "scheduler_config.json").write_text("{}")
    return {"dir": d, "orig": orig, "diff": diff, "wan": wan}


def _generate_args(model, *extra):
    import argparse

    from mlx_video.generate import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--model", str(model), "--prompt", "x", "--output", str(model.parent / "v.mp4"), *extra])


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


def dit_tensors(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "dit.safetensors")).items()}


def test_both_snapshot_layouts_give_the_same_model_folder(snapshots, tmp_path):
    assert list((snapshots["diff"] / "transformer").glob("diffusion_pytorch_model-0000*-of-*.safetensors"))
    assert list((snapshots["diff"] / "text_encoder").glob("model-0000*-of-*.safetensors"))
    for name in ("orig", "diff"):
        assert main(["convert", "--hf-path", str(snapshots[name]), "--mlx-path", str(tmp_path / name)]) == 0
    a, b = dit_tensors(tmp_path / "orig"), dit_tensors(tmp_path / "diff")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ta = mx.load(str(tmp_path / "orig" / "text_encoder.safetensors"))
    tb = mx.load(str(tmp_path / "diff" / "text_encoder.safetensors"))
    # the Wan .pth is bf16, the diffusers encoder fp32: same tensors up to bf16 rounding
    for k in ta:
        np.testing.assert_allclose(np.array(ta[k].astype(mx.float32)), np.array(tb[k].astype(mx.float32)),
                                   rtol=1e-2, atol=1e-2, err_msg=k)
    for name in ("orig", "diff"):
        config = config_of(tmp_path / name)
        assert config["dit"]["source_layout"] == ("wan" if name == "orig" else "diffusers")
        assert (config["sampler"]["preset"], config["sampler"]["name"], config["sampler"]["steps"],
                config["sampler"]["guidance"], config["sampler"]["shift"]) == ("wan2.1", "unipc", 50, 5.0, 5.0)
        assert (tmp_path / name / "spiece.model").exists()


def test_repo_id_resolves_from_the_cache_offline_and_missing_ones_say_how(snapshots, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    repo = cache / "models--Wan-AI--Wan2.1-T2V-1.3B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    shutil.copytree(snapshots["orig"], repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["convert", "--hf-path", "Wan-AI/Wan2.1-T2V-1.3B", "--mlx-path", str(tmp_path / "m")]) == 0
    assert config_of(tmp_path / "m")["sampler"]["preset"] == "wan2.1"
    capsys.readouterr()
    assert main(["convert", "--hf-path", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--mlx-path", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err and "Traceback" not in err
    assert not (tmp_path / "n").exists()


def test_mistakes_are_caught_before_anything_is_converted(snapshots, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["--hf-path", str(snapshots["orig"]), "--preset", "fastwan"], 2, "diffusers-layout DiT"),
        (["--hf-path", str(snapshots["orig"]), "--preset", "turbowan"], 2, "sparse-linear attention"),
        (["--hf-path", str(snapshots["orig"]), "--preset", "nope"], 2, "choose one of"),
        (["--hf-path", str(snapshots["orig"]), "--preset", "rcm", "--sampler", "unipc"], 2, "drop --sampler"),
        (["--hf-path", str(snapshots["dir"])], 2, "not a Wan2.1 snapshot"),
    ]
    for argv, code, message in cases:
        assert main(["convert", *argv, "--mlx-path", str(out)]) == code, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()
    # a wrong text encoder file is found before the DiT is converted (exit 1: a file problem, not a flag)
    assert main(["convert", "--hf-path", str(snapshots["orig"]), "--text-encoder",
                 str(snapshots["orig"] / "diffusion_pytorch_model.safetensors"), "--mlx-path", str(out)]) == 1
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.safetensors" in err and "Traceback" not in err and not out.exists()
    partial = tmp_path / "partial"
    shutil.copytree(snapshots["orig"], partial)
    (partial / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    assert main(["convert", "--hf-path", str(partial), "--mlx-path", str(out)]) == 2
    err = capsys.readouterr().err
    assert "UMT5 text encoder" in err and "hf download Wan-AI/Wan2.1-T2V-1.3B" in err and not out.exists()


def test_fastwan_snapshot_records_its_sampler_and_size(snapshots, tmp_path, monkeypatch):
    fast = tmp_path / "FastWan2.1-T2V-1.3B-Diffusers"
    shutil.copytree(snapshots["diff"], fast)
    (fast / "model_index.json").write_text(json.dumps({"_class_name": "WanDMDPipeline"}))
    assert main(["convert", "--hf-path", str(fast), "--mlx-path", str(tmp_path / "m")]) == 0
    s = config_of(tmp_path / "m")["sampler"]
    assert (s["preset"], s["name"], s["denoising_step_list"], s["warp"], s["shift"], s["guidance"]) == \
        ("fastwan", "fewstep", [1000, 757, 522], False, 8.0, 1.0)
    assert s["defaults"] == {"height": 448, "width": 832, "frames": 61}
    # integer steps, no warp: sigma lookup in the shift-8 table (checkpoints.md §0)
    np.testing.assert_allclose(schedule(sampler_config(s)).sigmas[:3], [1.0, 0.7567567, 0.5217391], atol=1e-6)
    # generate takes the family's size when no flag is given (the run itself is replaced: only the request matters)
    import mlx_video.generate as G

    seen = []
    monkeypatch.setattr(G, "generate", lambda folder, request, output, **kw: seen.append(request) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        G.run(_generate_args(tmp_path / "m"))
    assert (seen[0].height, seen[0].width, seen[0].frames) == (448, 832, 61)


def test_dit_from_a_distilled_checkpoint_with_the_base_encoder(snapshots, tmp_path):
    """--hf-path BASE --dit CHECKPOINT --preset: CausVid-style .pt with FSDP names anywhere in the key."""
    pt = tmp_path / "model.pt"
    names = {k: "model." + k.replace("blocks.", "_fsdp_wrapped_module.blocks.", 1)
             .replace("self_attn.", "self_attn._fsdp_wrapped_module.") for k in snapshots["wan"]}
    torch.save({"generator": {names[k]: v * 2 for k, v in snapshots["wan"].items()}}, pt)
    assert main(["convert", "--hf-path", str(snapshots["orig"]), "--dit", str(pt), "--preset", "causvid-bidirectional",
                 "--mlx-path", str(tmp_path / "m")]) == 0  # head width 32 from the base's config.json
    config = config_of(tmp_path / "m")
    assert (config["sampler"]["preset"], config["sampler"]["denoising_step_list"]) == \
        ("causvid-bidirectional", [1000, 757, 522])
    assert "text_encoder" in config
    got = dit_tensors(tmp_path / "m")
    np.testing.assert_array_equal(got["blocks.1.self_attn.q.weight"],
                                  2 * snapshots["wan"]["blocks.1.self_attn.q.weight"].numpy())


def test_rcm_layout_and_sampler(snapshots, tmp_path, capsys):
    """`net.` keys, Linear patch embedding [dim, 64] over (c kt kh kw): the same model as the Conv3d layout."""
    wan = snapshots["wan"]
    rcm = {"net." + k: v for k, v in wan.items()}
    rcm["net.patch_embedding.weight"] = wan["patch_embedding.weight"].reshape(64, -1).contiguous()
    assert rcm["net.patch_embedding.weight"].shape == (64, 64)
    save_file(rcm, str(tmp_path / "rcm.safetensors"))
    save_file(wan, str(tmp_path / "plain.safetensors"))
    assert main(["convert", "--head-dim", "32", "--dit", str(tmp_path / "rcm.safetensors"), "--preset", "rcm",
                 "--mlx-path", str(tmp_path / "a")]) == 0
    assert main(["convert", "--head-dim", "32", "--dit", str(tmp_path / "plain.safetensors"),
                 "--mlx-path", str(tmp_path / "b")]) == 0
    a, b = dit_tensors(tmp_path / "a"), dit_tensors(tmp_path / "b")
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    section = config_of(tmp_path / "a")["sampler"]
    cfg = sampler_config(section, where="config.json")
    sched = schedule(cfg)
    assert sched.timesteps == [988.0, 932.0, 852.0, 608.0]  # bf16(1000 s), as rCM feeds the DiT (§4.2)
    np.testing.assert_allclose(sched.sigmas, [0.987654, 0.933781, 0.852895, 0.608979, 0.0], atol=1e-6)
    assert cfg.noise_scale == pytest.approx(80 / 81)
    # independent fp64 rCM loop (checkpoints.md §4.2): x = s0 eps; x <- (1 - s')(x - s v) + s' eps_new
    rng = np.random.default_rng(0)
    shape = (1, 2, 2, 2, 4)
    noise, draws = rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(3)]
    velocity = lambda x, t: 0.3 * x + 0.001 * t  # noqa: E731
    x = section["sigmas"][0] * noise
    s = section["sigmas"] + [0.0]
    for i, t in enumerate(sched.timesteps):
        x0 = x - s[i] * velocity(x, t)
        x = (1 - s[i + 1]) * x0 + s[i + 1] * draws[i] if i < 3 else x0
    got = sample(cfg, lambda x, t: velocity(x, t), mx.array(noise, dtype=mx.float32),
                 renoise=[mx.array(r, dtype=mx.float32) for r in draws])
    np.testing.assert_allclose(np.array(got), x, rtol=1e-5, atol=1e-5)
    # the plain conversion of rcm weights with a wrong preset is refused before converting
    capsys.readouterr()
    assert main(["convert", "--head-dim", "32", "--dit", str(tmp_path / "plain.safetensors"), "--preset", "rcm",
                 "--mlx-path", str(tmp_path / "c")]) == 2
    assert "rcm-layout" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_lightx2v_is_deterministic_euler(tmp_path):
    from converters.presets import preset_section

    section = preset_section("lightx2v-distill")
    cfg = sampler_config(section)
    sched = schedule(cfg)
    np.testing.assert_allclose(sched.timesteps, [1000, 937.5, 833.3333, 625.0], rtol=1e-6)
    noise = np.random.default_rng(1).standard_normal((1, 2, 2, 2, 4))
    velocity = lambda x, t: 0.2 * x - 0.0005 * t  # noqa: E731
    x, s = noise.copy(), list(sched.sigmas)
    for i, t in enumerate(sched.timesteps):  # x <- x + (s' - s) v; the last step x - s v (§4.3)
        x = x + (s[i + 1] - s[i]) * velocity(x, t)
    got = sample(cfg, velocity, mx.array(noise, dtype=mx.float32))  # no key: nothing random to draw
    np.testing.assert_allclose(np.array(got), x, rtol=1e-5, atol=1e-5)


def test_turbowan_checkpoint_is_refused_not_loaded_partially(snapshots, tmp_path, capsys):
    turbo = dict(snapshots["wan"])
    turbo["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"] = torch.zeros(128, 128)
    save_file(turbo, str(tmp_path / "TurboWan2.1-T2V-1.3B-480P.safetensors"))
    assert main(["convert", "--head-dim", "32", "--dit", str(tmp_path / "TurboWan2.1-T2V-1.3B-480P.safetensors"),
                 "--mlx-path", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "TurboWan" in err and "SLA" in err and "Traceback" not in err and not (tmp_path / "m").exists()


def test_causal_presets_are_reused_and_info_shows_the_preset(snapshots, tmp_path, capsys):
    from mlx_video.causal import preset_section as causal_section

    save_file(snapshots["wan"], str(tmp_path / "sf.safetensors"))
    assert main(["convert", "--head-dim", "32", "--dit", str(tmp_path / "sf.safetensors"), "--preset",
                 "self-forcing", "--mlx-path", str(tmp_path / "m")]) == 0
    assert config_of(tmp_path / "m")["sampler"] == causal_section("self-forcing")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "preset: self-forcing; sampler: fewstep (4 steps, guidance 1.0); LoRAs merged: none" in out


def test_swift_export_refuses_samplers_it_does_not_implement():
    from converters.presets import preset_section
    from swift_bridge.export import ExportError, _sampler

    for name in ("rcm", "lightx2v-distill"):
        with pytest.raises(ExportError, match="Swift port does not implement"):
            _sampler(preset_section(name), None)
    assert _sampler(preset_section("fastwan"), None).denoising_step_list == [1000, 757, 522]


def test_an_explicit_step_choice_replaces_a_preset_sigma_list():
    from converters.presets import preset_section

    cfg = sampler_config(preset_section("rcm"), denoising_step_list=[1000, 500], warp=False)
    assert cfg.sigmas is None and cfg.denoising_step_list == [1000, 500]
