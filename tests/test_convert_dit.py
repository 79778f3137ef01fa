"""`mlx-video convert --dit` on every supported layout, strictness, bad inputs and atomic output."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlx_video.cli import main
from mlx_video.models import wan_dit
from tests.dit_reference import diffusers_to_wan_keys, make_diffusers_dit


@pytest.fixture(scope="module")
def wan_state():
    model = make_diffusers_dit(layers=1, seed=3)
    return diffusers_to_wan_keys({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def reference_output(wan_state, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    save_file(wan_state, str(d / "w.safetensors"))
    assert main(["convert", "--dit", str(d / "w.safetensors"), "--mlx-path", str(d / "out"), "--head-dim", "32"]) == 0
    return forward(d / "out")


def forward(folder):
    model = wan_dit.load(folder)
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 4, 4, 16)).astype(np.float32))
    return np.array(model(x, [937.5], context=mx.ones((1, 3, 32))))


def convert(src, out, *extra):
    return main(["convert", "--dit", str(src), "--mlx-path", str(out), "--head-dim", "32", *extra])


def test_comfyui_prefixed_single_file(wan_state, reference_output, tmp_path):
    save_file({"model.diffusion_model." + k: v for k, v in wan_state.items()}, str(tmp_path / "comfy.safetensors"))
    assert convert(tmp_path / "comfy.safetensors", tmp_path / "out") == 0
    np.testing.assert_array_equal(forward(tmp_path / "out"), reference_output)


def test_self_forcing_pt_prefers_generator_ema(wan_state, reference_output, tmp_path):
    other = {"model." + k: torch.zeros_like(v) for k, v in wan_state.items()}
    torch.save({"generator": other, "generator_ema": {"model." + k: v for k, v in wan_state.items()}},
               tmp_path / "sf.pt")
    assert convert(tmp_path / "sf.pt", tmp_path / "out") == 0
    np.testing.assert_array_equal(forward(tmp_path / "out"), reference_output)
    assert convert(tmp_path / "sf.pt", tmp_path / "out2", "--select", "generator") == 0
    assert not np.array_equal(forward(tmp_path / "out2"), reference_output)


def test_sharded_safetensors_with_index(wan_state, reference_output, tmp_path):
    keys = sorted(wan_state)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: wan_state[k] for k in names}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert convert(tmp_path, tmp_path / "out") == 0
    np.testing.assert_array_equal(forward(tmp_path / "out"), reference_output)


def test_pth_and_bf16_source(wan_state, tmp_path):
    torch.save({k: v.bfloat16() for k, v in wan_state.items()}, tmp_path / "w.pth")
    assert convert(tmp_path / "w.pth", tmp_path / "out", "--dtype", "bfloat16") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["dit"]
    assert cfg["dtype"] == "bfloat16"
    w = mx.load(str(tmp_path / "out" / "dit.safetensors"))
    assert w["blocks.0.ffn.fc1.weight"].dtype == mx.bfloat16
    assert w["blocks.0.modulation"].dtype == mx.float32  # precision-critical tensors stay fp32
    np.testing.assert_array_equal(np.array(w["blocks.0.ffn.fc1.weight"].astype(mx.float32)),
                                  wan_state["blocks.0.ffn.0.weight"].bfloat16().float().numpy())


def test_info_reports_config_and_bytes(wan_state, tmp_path, capsys):
    save_file(wan_state, str(tmp_path / "w.safetensors"))
    assert convert(tmp_path / "w.safetensors", tmp_path / "out") == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dit = report["components"]["dit"]
    n_params = sum(v.numel() for v in wan_state.values())
    assert dit["config"]["parameters"] == n_params
    assert dit["elements_by_dtype"] == {"F32": n_params} and dit["bytes_by_dtype"] == {"F32": 4 * n_params}


# ---------------------------------------------------------------------------------------------- bad inputs


def _expect_failure(capsys, src, out, fragment, *extra):
    code = convert(src, out, *extra)
    err = capsys.readouterr().err
    assert code != 0
    assert fragment in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left behind"


def test_truncated_safetensors(wan_state, tmp_path, capsys):
    save_file(wan_state, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) - 1000])
    _expect_failure(capsys, tmp_path / "w.safetensors", tmp_path / "out", "truncated safetensors")


def test_missing_key(wan_state, tmp_path, capsys):
    save_file({k: v for k, v in wan_state.items() if k != "blocks.0.cross_attn.o.bias"}, str(tmp_path / "w.safetensors"))
    _expect_failure(capsys, tmp_path / "w.safetensors", tmp_path / "out", "missing tensors (1)")


def test_unexpected_key(wan_state, tmp_path, capsys):
    save_file({**wan_state, "blocks.0.extra.weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    _expect_failure(capsys, tmp_path / "w.safetensors", tmp_path / "out", "blocks.0.extra.weight")


def test_wrong_shape(wan_state, tmp_path, capsys):
    save_file({**wan_state, "blocks.0.norm3.weight": torch.zeros(63)}, str(tmp_path / "w.safetensors"))
    _expect_failure(capsys, tmp_path / "w.safetensors", tmp_path / "out", "wrong shapes")


def test_unknown_layout(tmp_path, capsys):
    save_file({"encoder.0.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    _expect_failure(capsys, tmp_path / "w.safetensors", tmp_path / "out", "unknown DiT checkpoint layout")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_executed(wan_state, tmp_path, capsys):
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    torch.save({"weights": wan_state["head.head.bias"], "payload": exploit}, tmp_path / "evil.pth")
    _expect_failure(capsys, tmp_path / "evil.pth", tmp_path / "out", "refusing to load")
    assert not exploit.marker.exists()


def test_existing_non_model_folder_is_not_overwritten(wan_state, tmp_path, capsys):
    save_file(wan_state, str(tmp_path / "w.safetensors"))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert convert(tmp_path / "w.safetensors", tmp_path / "precious") != 0
    assert "not an mlx-video model folder" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_failed_update_leaves_existing_model_folder_untouched(wan_state, tmp_path, capsys):
    save_file(wan_state, str(tmp_path / "w.safetensors"))
    assert convert(tmp_path / "w.safetensors", tmp_path / "out") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    save_file({k: v for k, v in wan_state.items() if "norm3" not in k}, str(tmp_path / "bad.safetensors"))
    assert convert(tmp_path / "bad.safetensors", tmp_path / "out") != 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "out", "w.safetensors"]


def test_convert_without_components_is_an_error(tmp_path, capsys):
    assert main(["convert", "--mlx-path", str(tmp_path / "out")]) != 0
    assert "nothing to convert" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
