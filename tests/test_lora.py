"""LoRA: diffusers/PEFT and kohya/ComfyUI files; runtime == merged == W + scale * B @ A (PyTorch, float64);
LoRAs for the unpruned model on a pruned folder == pruning the merged model; bad files are clear errors."""

from __future__ import annotations

import json

import mlx_video  # noqa: F401  (MKL before MLX)
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import save_file

from mlx_video.cli import main
from mlx_video.lora import LoraError, LoraSpec
from mlx_video.pipeline import Models
from tests.dit_reference import diffusers_to_wan_keys, make_diffusers_dit

RANK = 4
# Wan module names (the PyTorch reference's keys) and how each file format spells them
MODULES = ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.1.cross_attn.k", "blocks.1.cross_attn.o",
           "blocks.0.ffn.0", "blocks.1.ffn.2", "text_embedding.0", "time_embedding.2", "time_projection.1",
           "head.head"]
DIFFUSERS = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
             "blocks.1.cross_attn.k": "blocks.1.attn2.to_k", "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
             "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj", "blocks.1.ffn.2": "blocks.1.ffn.net.2",
             "text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    dit = make_diffusers_dit(heads=2, head_dim=32, ffn=128, layers=2, text_dim=32, seed=7, std=0.05)
    wan = {k: v.contiguous() for k, v in diffusers_to_wan_keys(dit.state_dict()).items()}
    save_file(wan, str(d / "base.safetensors"))
    assert main(["convert", "--head-dim", "32", "--dit", str(d / "base.safetensors"), "--mlx-path",
                 str(d / "plain")]) == 0
    return {"dir": d, "wan": wan}


def factors(wan: dict, modules=MODULES, seed=0, rank=RANK) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        rows, cols = wan[m + ".weight"].shape
        out[m] = (torch.randn(rank, cols, generator=g) * 0.1, torch.randn(rows, rank, generator=g) * 0.1)
    return out


def write_format(path, kind: str, f: dict, alpha: float | None):
    """A LoRA file in one of the public formats, from {wan module: (A [r, in], B [out, r])}."""
    tensors = {}
    for m, (a, b) in f.items():
        if kind == "peft":  # diffusers' pipeline.save_lora_weights / PEFT: transformer.<diffusers name>
            tensors[f"transformer.{DIFFUSERS[m]}.lora_A.weight"] = a
            tensors[f"transformer.{DIFFUSERS[m]}.lora_B.weight"] = b
        elif kind == "kohya":  # lora_unet_ + underscored names, per-module alpha
            name = "lora_unet_" + m.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        elif kind == "comfy":  # ComfyUI: diffusion_model.<Wan name>
            tensors[f"diffusion_model.{m}.lora_down.weight"], tensors[f"diffusion_model.{m}.lora_up.weight"] = a, b
            tensors[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    if kind == "peft":
        (path.parent / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))


def reference_folder(base, tmp_path, loras: list[tuple[dict, float]]):
    """W + sum(scale * B @ A) computed in PyTorch float64, converted without any LoRA code."""
    merged = {k: v.double() for k, v in base["wan"].items()}
    for f, scale in loras:
        for m, (a, b) in f.items():
            merged[m + ".weight"] += scale * (b.double() @ a.double())
    save_file({k: v.float().contiguous() for k, v in merged.items()}, str(tmp_path / "ref.safetensors"))
    assert main(["convert", "--head-dim", "32", "--dit", str(tmp_path / "ref.safetensors"), "--mlx-path",
                 str(tmp_path / "ref")]) == 0
    return {k: np.array(v) for k, v in mx.load(str(tmp_path / "ref" / "dit.safetensors")).items()}


def model_weights(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def assert_same(got: dict, ref: dict, atol=2e-6):
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("kind", ["peft", "kohya", "comfy"])
def test_runtime_equals_merged_equals_torch_reference(base, tmp_path, kind, capsys):
    f1, f2 = factors(base["wan"], seed=1), factors(base["wan"], MODULES[:4], seed=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_format(tmp_path / "a" / "one.safetensors", kind, f1, alpha=8.0)  # alpha / r = 2
    write_format(tmp_path / "b" / "two.safetensors", kind, f2, alpha=2.0)  # alpha / r = 0.5
    ref = reference_folder(base, tmp_path, [(f1, 0.7 * 2.0), (f2, -1.5 * 0.5)])
    specs = [f"{tmp_path / 'a' / 'one.safetensors'}:0.7", f"{tmp_path / 'b' / 'two.safetensors'}:-1.5"]
    argv = ["convert", "--head-dim", "32", "--dit", str(base["dir"] / "base.safetensors"), "--mlx-path",
            str(tmp_path / "merged")]
    for s in specs:
        argv += ["--lora", s]
    assert main(argv) == 0
    merged = {k: np.array(v) for k, v in mx.load(str(tmp_path / "merged" / "dit.safetensors")).items()}
    assert_same(merged, ref)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dit"]["loras"] == [{"file": "one.safetensors", "scale": 0.7}, {"file": "two.safetensors",
                                                                                 "scale": -1.5}]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "merged")]) == 0
    assert "LoRAs merged: one.safetensors:0.7, two.safetensors:-1.5" in capsys.readouterr().out
    from mlx_video.lora import parse_spec

    plain_before = (base["dir"] / "plain" / "dit.safetensors").read_bytes()
    runtime = Models(base["dir"] / "plain", mx.float32, [parse_spec(s) for s in specs]).load_dit()
    assert_same(model_weights(runtime), ref)
    assert (base["dir"] / "plain" / "dit.safetensors").read_bytes() == plain_before  # folder untouched


def test_lora_for_the_unpruned_model_on_a_pruned_folder(base, tmp_path):
    f = factors(base["wan"], ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v",
                              "blocks.0.self_attn.o", "blocks.1.cross_attn.v", "blocks.1.cross_attn.o",
                              "blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.2", "time_projection.1"], seed=3)
    (tmp_path / "l").mkdir()
    write_format(tmp_path / "l" / "full.safetensors", "comfy", f, alpha=RANK)
    lora = tmp_path / "l" / "full.safetensors"
    assert main(["convert", "--head-dim", "32", "--dit", str(base["dir"] / "base.safetensors"), "--lora", str(lora),
                 "--mlx-path", str(tmp_path / "merged")]) == 0
    prune = ["--method", "random", "--heads", "1", "--ffn-dim", "48", "--seed", "4"]  # plan independent of weights
    assert main(["prune", "--model", str(base["dir"] / "plain"), "--mlx-path", str(tmp_path / "pruned"), *prune]) == 0
    assert main(["prune", "--model", str(tmp_path / "merged"), "--mlx-path", str(tmp_path / "ref"), *prune]) == 0
    report = json.loads((tmp_path / "pruned" / "saliency.json").read_text())
    assert report["layers"][0]["ffn"]["kept"] == json.loads((tmp_path / "ref" / "saliency.json").read_text()
                                                           )["layers"][0]["ffn"]["kept"]
    runtime = Models(tmp_path / "pruned", mx.float32, [LoraSpec(lora)]).load_dit()
    ref = {k: np.array(v) for k, v in mx.load(str(tmp_path / "ref" / "dit.safetensors")).items()}
    assert runtime.config.ffn_dim == [48, 48] and runtime.config.self_attn_heads == [1, 1]
    assert_same(model_weights(runtime), ref)


def test_bad_lora_files_are_clear_errors_and_change_nothing(base, tmp_path, capsys):
    wan = base["wan"]
    good = factors(wan, ["blocks.0.self_attn.q"], seed=5)
    a, b = good["blocks.0.self_attn.q"]
    cases = {
        "unmatched.safetensors": ({"diffusion_model.blocks.0.norm3.lora_down.weight": a,
                                   "diffusion_model.blocks.0.norm3.lora_up.weight": b}, "blocks.0.norm3"),
        "no_such_block.safetensors": ({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": a,
                                       "diffusion_model.blocks.9.self_attn.q.lora_up.weight": b},
                                      "blocks.9.self_attn.q"),
        "shape.safetensors": ({"diffusion_model.blocks.0.ffn.2.lora_down.weight": a,  # in 64, but ffn.2 takes 128
                               "diffusion_model.blocks.0.ffn.2.lora_up.weight": b}, "diffusion_model.blocks.0.ffn.2"),
        "half.safetensors": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a}, "not its partner"),
        "rank.safetensors": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a,
                              "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b[:, :2]}, "do not multiply"),
    }
    # a good adapter first: nothing of it may be applied when the second file fails
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a.contiguous(),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b.contiguous()},
              str(tmp_path / "good.safetensors"))
    plain = base["dir"] / "plain"
    for name, (tensors, message) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
        out = tmp_path / f"out-{name}"
        assert main(["convert", "--head-dim", "32", "--dit", str(base["dir"] / "base.safetensors"), "--lora",
                     str(tmp_path / "good.safetensors"), "--lora", str(tmp_path / name), "--mlx-path", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
        assert not out.exists()
        model = Models(plain, mx.float32, [LoraSpec(tmp_path / "good.safetensors"), LoraSpec(tmp_path / name)])
        with pytest.raises(LoraError, match=message.replace(".", r"\.")):
            model.load_dit()
        assert model.dit is None
        # generate refuses it before any work (the folder has no text encoder: it is never reached)
        assert main(["generate", "--model", str(plain), "--prompt", "x", "--lora", str(tmp_path / name),
                     "--output", str(tmp_path / "v.mp4")]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "v.mp4").exists()
    assert main(["generate", "--model", str(plain), "--prompt", "x", "--lora", str(tmp_path / "missing.pt:0.5")]) == 2
    assert "no such file" in capsys.readouterr().err
