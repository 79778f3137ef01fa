"""Converting causal-family checkpoints: Self-Forcing-style .pt dicts with FSDP names, LongLive's PEFT LoRA
merged at conversion, and the recorded preset."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_video.cli import main
from tests.dit_reference import diffusers_to_wan_keys, make_diffusers_dit


@pytest.fixture(scope="module")
def wan_state():
    model = make_diffusers_dit(seed=5)
    return diffusers_to_wan_keys({k: v.contiguous() for k, v in model.state_dict().items()})


def fsdp_name(key: str) -> str:  # FSDP-wrapped names as EMA_FSDP records them (checkpoints.md §0)
    return "model._fsdp_wrapped_module." + key.replace("blocks.", "blocks._fsdp_wrapped_module.", 1)


def load_dit(folder):
    return mx.load(str(folder / "dit.safetensors"))


def test_self_forcing_dict_with_fsdp_names_converts_to_the_same_weights(wan_state, tmp_path):
    pt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {fsdp_name(k): v for k, v in wan_state.items()},
                "generator": {"model." + k: v * 0 for k, v in wan_state.items()},
                "critic": {"model." + k: v for k, v in wan_state.items()}}, pt)
    plain = tmp_path / "plain.pt"
    torch.save(wan_state, plain)
    assert main(["convert", "--head-dim", "32", "--dit", str(pt), "--mlx-path", str(tmp_path / "a"),
                 "--sampler", "self-forcing"]) == 0
    assert main(["convert", "--head-dim", "32", "--dit", str(plain), "--mlx-path", str(tmp_path / "b")]) == 0
    a, b = load_dit(tmp_path / "a"), load_dit(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:  # generator_ema was chosen (the zeroed 'generator' would differ)
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["sampler"]["preset"] == "self-forcing"


@pytest.mark.parametrize("preset, entry", [("self-forcing", "generator_ema"), ("causvid-ar", "generator"),
                                           ("causal-forcing", "generator"), ("causal-forcing-framewise", "generator_ema")])
def test_each_causal_preset_reads_its_familys_checkpoint_entry(wan_state, tmp_path, preset, entry):
    """A file holding both generators: each family's upstream inference reads one of them (checkpoints.md)."""
    other = "generator" if entry == "generator_ema" else "generator_ema"
    pt = tmp_path / "both.pt"
    torch.save({entry: {"model." + k: v for k, v in wan_state.items()},
                other: {"model." + k: v * 0 + 1 for k, v in wan_state.items()}}, pt)
    assert main(["convert", "--head-dim", "32", "--dit", str(pt), "--mlx-path", str(tmp_path / "m"),
                 "--preset", preset]) == 0
    got = load_dit(tmp_path / "m")
    key = "blocks.0.self_attn.q.weight"
    np.testing.assert_array_equal(np.array(got[key]), wan_state[key].numpy())  # not the all-ones decoy
    only = tmp_path / "only.pt"  # a file with just the other entry still converts (the preference is soft)
    torch.save({other: {"model." + k: v for k, v in wan_state.items()}}, only)
    assert main(["convert", "--head-dim", "32", "--dit", str(only), "--mlx-path", str(tmp_path / "n"),
                 "--preset", preset]) == 0


def test_longlive_lora_is_merged(wan_state, tmp_path):
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in wan_state.items()}}, base)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for module, (out_f, in_f) in {"blocks.0.self_attn.q": (64, 64), "blocks.1.ffn.0": (128, 64),
                                  "blocks.1.cross_attn.o": (64, 64)}.items():
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    critic = {k: v * 100 for k, v in lora.items()}
    torch.save({"generator_lora": lora, "critic_lora": critic}, tmp_path / "lora.pt")
    assert main(["convert", "--head-dim", "32", "--dit", str(base), "--lora", str(tmp_path / "lora.pt"),
                 "--mlx-path", str(tmp_path / "m"), "--sampler", "longlive"]) == 0
    assert main(["convert", "--head-dim", "32", "--dit", str(base), "--mlx-path", str(tmp_path / "plain")]) == 0
    merged, plain = load_dit(tmp_path / "m"), load_dit(tmp_path / "plain")
    targets = {"blocks.0.self_attn.q": "blocks.0.self_attn.q.weight", "blocks.1.ffn.0": "blocks.1.ffn.fc1.weight",
               "blocks.1.cross_attn.o": "blocks.1.cross_attn.o.weight"}
    for module, target in targets.items():
        delta = (lora[f"base_model.model.{module}.lora_B.weight"] @ lora[f"base_model.model.{module}.lora_A.weight"])
        np.testing.assert_allclose(np.array(merged[target]), np.array(plain[target]) + delta.numpy(), rtol=1e-5,
                                   atol=1e-5)
    for k in merged:
        if k not in targets.values():
            np.testing.assert_array_equal(np.array(merged[k]), np.array(plain[k]))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dit"]["lora_merged"] == "lora.pt" and config["sampler"]["causal"]["sink_frames"] == 3


def test_bad_lora_is_an_error_and_writes_nothing(wan_state, tmp_path, capsys):
    base = tmp_path / "base.pt"
    torch.save(wan_state, base)
    torch.save({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)}, tmp_path / "half.pt")
    torch.save({"blocks.0.norm3.lora_A.weight": torch.zeros(4, 64)}, tmp_path / "odd.pt")
    for bad, message in (("half.pt", "not its partner"), ("odd.pt", "not LoRA factors")):
        out = tmp_path / f"out-{bad}"
        assert main(["convert", "--head-dim", "32", "--dit", str(base), "--lora", str(tmp_path / bad),
                     "--mlx-path", str(out)]) == 1
        assert message in capsys.readouterr().err and not out.exists()
    assert main(["convert", "--sampler", "longlive", "--lora", str(tmp_path / "half.pt"),
                 "--mlx-path", str(tmp_path / "x")]) == 2
    assert "--lora is merged into the DiT" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# A causal preset that contradicts the checkpoint: exit 2, nothing written (or the folder unchanged)
# --------------------------------------------------------------------------------------------------

def i2v_like(state):
    """Wan state with a 36-channel patch embedding (an image-to-video-shaped DiT: 16 noise + 20 condition)."""
    s = dict(state)
    s["patch_embedding.weight"] = torch.randn(64, 36, 1, 2, 2)
    return s


def two_frame_patch(state):
    """Wan state whose patch embedding packs 2 latent frames per token frame (patch [2, 2, 2])."""
    s = dict(state)
    s["patch_embedding.weight"] = torch.randn(64, 16, 2, 2, 2)
    s["head.head.weight"], s["head.head.bias"] = torch.randn(16 * 8, 64), torch.randn(16 * 8)
    return s


def rcm_like(state):
    """rCM layout: `net.` keys and a Linear patch embedding [dim, 64] (checkpoints.md §4.2)."""
    s = {"net." + k: v for k, v in state.items()}
    s["net.patch_embedding.weight"] = state["patch_embedding.weight"].reshape(64, 64)
    return s


@pytest.mark.parametrize("make,flag,match", [
    (i2v_like, ["--sampler", "self-forcing"], "36 input channels for 16 output channels"),
    (two_frame_patch, ["--preset", "causvid-ar"], "packs 2 latent frames into one token frame"),
    (rcm_like, ["--preset", "longlive", "--lora", "x.pt"], "an rCM checkpoint"),
])
def test_causal_preset_contradicting_the_checkpoint_writes_nothing(wan_state, tmp_path, capsys, make, flag, match):
    pt = tmp_path / "ckpt.pt"
    torch.save(make(wan_state), pt)
    torch.save({}, tmp_path / "x.pt")
    out = tmp_path / "out"
    code = main(["convert", "--head-dim", "32", "--dit", str(pt), "--mlx-path", str(out), *flag])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "contradicts" in err, err
    assert not out.exists()
    # the same checkpoint converts fine without the causal preset (the contradiction, not the file, is refused)
    assert main(["convert", "--head-dim", "32", "--dit", str(pt), "--mlx-path", str(out)]) == 0


def test_causal_preset_on_a_folder_whose_dit_contradicts_it_leaves_the_folder_unchanged(wan_state, tmp_path, capsys):
    pt = tmp_path / "i2v.pt"
    torch.save(i2v_like(wan_state), pt)
    folder = tmp_path / "m"
    assert main(["convert", "--head-dim", "32", "--dit", str(pt), "--mlx-path", str(folder)]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["convert", "--sampler", "self-forcing", "--mlx-path", str(folder)]) == 2
    assert "36 input channels" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # a hand-edited config.json that records the preset anyway is refused by generate before any work
    from mlx_video import causal, pipeline
    from mlx_video.utils import UsageError

    config = json.loads((folder / "config.json").read_text())
    config["sampler"] = causal.preset_section("self-forcing")
    (folder / "config.json").write_text(json.dumps(config))
    request = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=9)
    with pytest.raises(UsageError, match="cannot run as self-forcing: it takes 36 input channels"):
        pipeline.generate(folder, request, tmp_path / "v.mp4")
    assert not (tmp_path / "v.mp4").exists() and not list(tmp_path.glob("v.mp4*"))


def test_longlive_without_its_lora_is_refused(wan_state, tmp_path, capsys):
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in wan_state.items()}}, base)
    out = tmp_path / "m"
    code = main(["convert", "--head-dim", "32", "--dit", str(base), "--preset", "longlive", "--mlx-path", str(out)])
    assert code == 2
    assert "runs only with its LoRA merged" in capsys.readouterr().err and not out.exists()
