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
