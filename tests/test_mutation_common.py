"""``converters/common.py``: checkpoint opening, key maps, the strict-check message, configs (issue 19, written
against survivors of the mutation run of ``converters/common.py``). Tiny files written here; no model is built.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import common
from converters.common import ConversionError, Rule, apply_key_map, check_strict, open_checkpoint
from mlx_video.utils import MLX_VIDEO_FORMAT, save_weights


def _tensors(n: int = 3, prefix: str = "") -> dict:
    return {f"{prefix}w{i}": torch.arange(4 * (i + 1), dtype=torch.float32).reshape(i + 1, 4) for i in range(n)}


def test_safetensors_files_folders_and_shards_open_lazily_with_their_shapes(tmp_path):
    save_file(_tensors(2), str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(5, 2)}, str(tmp_path / "b.safetensors"))
    one = open_checkpoint(tmp_path / "a.safetensors")
    assert sorted(one) == ["w0", "w1"] and len(one) == 2 and one.shape("w1") == (2, 4)
    assert one.source == str(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(np.array(one["w1"]), np.arange(8).reshape(2, 4))
    folder = open_checkpoint(tmp_path)  # every *.safetensors of the folder
    assert sorted(folder) == ["w0", "w1", "x"] and folder.shape("x") == (5, 2)
    assert folder.source == f"{tmp_path / 'a.safetensors'}, {tmp_path / 'b.safetensors'}"
    only_b = open_checkpoint(tmp_path, pattern="b*.safetensors")
    assert sorted(only_b) == ["x"]
    save_file({"w0": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor 'w0' appears in more than one file"):
        open_checkpoint(tmp_path)


def test_a_folder_with_one_pth_opens_it_and_unknown_files_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save(_tensors(1), tmp_path / "m" / "model.pth")
    ckpt = open_checkpoint(tmp_path / "m")
    assert list(ckpt) == ["w0"] and ckpt.source == str(tmp_path / "m" / "model.pth")
    torch.save(_tensors(1), tmp_path / "m" / "other.pt")  # two candidates: no guessing
    with pytest.raises(ConversionError, match=r"no checkpoint files \(\*\.safetensors, \*\.pth\) found"):
        open_checkpoint(tmp_path / "m")
    (tmp_path / "x.npz").write_bytes(b"PK")
    with pytest.raises(ConversionError, match=r"unknown checkpoint format '.npz' \(expected .safetensors, .pth, .pt\)"):
        open_checkpoint(tmp_path / "x.npz")
    with pytest.raises(ConversionError, match="no such file or directory"):
        open_checkpoint(tmp_path / "missing.safetensors")


def test_torch_checkpoints_prefer_the_ema_generator_and_honour_select(tmp_path):
    path = tmp_path / "sf.pt"
    torch.save({"generator": {"w": torch.zeros(2)}, "generator_ema": {"w": torch.ones(2)}, "step": 3}, path)
    np.testing.assert_array_equal(np.array(open_checkpoint(path)["w"]), [1, 1])
    np.testing.assert_array_equal(np.array(open_checkpoint(path, select="generator")["w"]), [0, 0])
    with pytest.raises(ConversionError, match=r"no entry 'teacher' \(top-level keys: \['generator', 'generator_ema', "
                                              r"'step'\]\)"):
        open_checkpoint(path, select="teacher")
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"blocks": {"0": {"w": torch.ones(3)}}, "head": torch.zeros(1, dtype=torch.bfloat16)}}, nested)
    ckpt = open_checkpoint(nested)  # a wrapper around a nested dict: flattened with dots
    assert sorted(ckpt) == ["blocks.0.w", "head"] and ckpt["head"].dtype == mx.bfloat16
    mixed = tmp_path / "mixed.pth"  # top-level tensors next to a 'model' entry: the file itself is the state
    torch.save({"model": {"w": torch.ones(1)}, "bias": torch.zeros(1)}, mixed)
    assert sorted(open_checkpoint(mixed)) == ["bias", "model.w"]
    empty = tmp_path / "empty.pth"
    torch.save({"step": 1}, empty)
    with pytest.raises(ConversionError, match="no tensors found in the PyTorch checkpoint"):
        open_checkpoint(empty)


def test_prefixes_are_stripped_only_where_the_marker_is(tmp_path):
    save_file({"model.diffusion_model.blocks.0.w": torch.ones(1), "model.diffusion_model.head": torch.ones(2),
               "extra": torch.ones(3)}, str(tmp_path / "c.safetensors"))
    ckpt = open_checkpoint(tmp_path / "c.safetensors")
    stripped = common.strip_common_prefix(ckpt, ["diffusion_model.", "model.diffusion_model."], "head")
    assert sorted(stripped) == ["blocks.0.w", "extra", "head"] and stripped.shape("head") == (2,)
    np.testing.assert_array_equal(np.array(stripped["extra"]), [1, 1, 1])
    same = common.strip_common_prefix(ckpt, ["model.diffusion_model."], "not-there")
    assert same is ckpt


def test_key_maps_use_the_first_matching_rule_and_refuse_collisions(tmp_path):
    save_file({"a.0.w": torch.ones(1), "a.1.w": torch.ones(1), "b.w": torch.ones(1), "junk": torch.ones(1)},
              str(tmp_path / "c.safetensors"))
    ckpt = open_checkpoint(tmp_path / "c.safetensors")
    double = lambda x: x * 2  # noqa: E731
    mapped, unmatched = apply_key_map(ckpt, [Rule(r"a\.(\d+)\.w", r"blocks.\1.weight", double),
                                             Rule(r"a\.0\.w", "never"), Rule(r"b\.w", "head.weight")])
    assert mapped == {"blocks.0.weight": ("a.0.w", double), "blocks.1.weight": ("a.1.w", double),
                      "head.weight": ("b.w", None)}
    assert unmatched == ["junk"]
    with pytest.raises(ConversionError, match=r"two source tensors map to 'x': 'a.0.w' and 'a.1.w'"):
        apply_key_map(ckpt, [Rule(r"a\.\d+\.w", "x")])


def test_the_strict_check_lists_every_problem_once(tmp_path):
    expected = {f"k{i:02d}": (2, 3) for i in range(30)}
    mapped = {f"k{i:02d}": (2, 3) for i in range(2, 30)} | {"k05": (3, 2), "extra": (1,)}
    with pytest.raises(ConversionError) as info:
        check_strict(mapped, expected, ["stray.weight"], "Wan DiT")
    text = str(info.value)
    assert text.startswith("Wan DiT: checkpoint does not match the model\n  missing tensors (2):\n    k00\n    k01")
    assert "\n  unexpected tensors (2):\n    extra\n    stray.weight" in text
    assert text.endswith("\n  wrong shapes (1):\n    k05: checkpoint (3, 2) vs model (2, 3)")
    many = {f"m{i:02d}": (1,) for i in range(27)}
    with pytest.raises(ConversionError) as info:
        check_strict({}, many, [], "x")
    lines = str(info.value).splitlines()
    assert lines[1] == "  missing tensors (27):" and lines[2:27] == [f"    m{i:02d}" for i in range(25)]
    assert lines[27] == "    ... and 2 more" and len(lines) == 28
    check_strict(dict(expected), expected, [], "fine")  # a match raises nothing


def test_weights_must_be_finite_floats_and_the_message_names_them():
    ok = {"a": mx.ones(3), "b": mx.zeros(2, dtype=mx.bfloat16)}
    common.finite_floating(ok, "src")
    with pytest.raises(ConversionError, match=r"^src: tensor 'i' has dtype int32; expected floating point weights"):
        common.finite_floating({**ok, "i": mx.ones(2, dtype=mx.int32)}, "src")
    bad = {f"t{i}": mx.array([1.0, np.nan if i % 2 else np.inf]) for i in range(7)}
    with pytest.raises(ConversionError) as info:
        common.finite_floating({**ok, **bad}, "src", " (after the transform)")
    assert str(info.value) == "src: non-finite values (NaN/Inf) in ['t0', 't1', 't2', 't3', 't4'] (after the transform)"


def test_side_and_model_configs(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert common.side_config_path(ckpt) == ckpt / "config.json"
    assert common.side_config_path(ckpt / "w.safetensors") == ckpt / "config.json"
    assert common.side_config(ckpt / "w.safetensors") == {}
    (ckpt / "config.json").write_text(json.dumps({"dim": 64}))
    assert common.side_config(ckpt) == {"dim": 64} == common.side_config(ckpt / "w.safetensors")
    (ckpt / "config.json").write_text("[1, 2")
    with pytest.raises(ConversionError, match="config.json beside the checkpoint"):
        common.side_config(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    assert common.update_config(out, None, "dit", {"a": 1}) == {"format": MLX_VIDEO_FORMAT, "dit": {"a": 1}}
    new = tmp_path / "new"
    new.mkdir()
    config = common.update_config(new, out, "decoder", {"b": 2})  # the previous folder's sections are kept
    assert config == {"format": MLX_VIDEO_FORMAT, "dit": {"a": 1}, "decoder": {"b": 2}}
    assert json.loads((new / "config.json").read_text()) == config
    assert common.update_config(new, new, "dit", {"a": 3})["dit"] == {"a": 3}


def test_saved_weights_carry_the_mlx_format_and_bf16_reads_as_float32(tmp_path):
    save_weights(tmp_path / "w.safetensors", {"w": mx.ones(2)}, {"note": "x"})
    _, meta = mx.load(str(tmp_path / "w.safetensors"), return_metadata=True)
    assert meta == {"format": "mlx", "note": "x"}
    b = common.to_numpy(mx.array([1.5, -2.0]).astype(mx.bfloat16))
    assert b.dtype == np.float32 and list(b) == [1.5, -2.0]
    assert common.to_numpy(mx.array([1, 2], dtype=mx.int32)).dtype == np.int32


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_pickle_payloads_are_named_through_memoized_module_names(tmp_path):
    """Bug caught (a real one): memo slots counted only for strings, so the second global of a module
    (whose name a protocol-4 pickle fetches from the memo) was reported under the wrong module."""
    import os
    import pickle

    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps({"a": _Call(os.system, "true"), "b": _Call(os.getcwd), "c": _Call(os.system, "x")},
                                  protocol=4))
    assert common.pickle_code_references(path) == [f"{os.name}.system", f"{os.name}.getcwd"]
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2), "b": torch.zeros(1)}, plain)
    assert common.pickle_code_references(plain) == []  # torch rebuild functions and storages only
    with pytest.raises(ConversionError, match=rf"refusing to load: the pickle contains code \({os.name}.system, "
                                              rf"{os.name}.getcwd\)"):
        open_checkpoint(path.rename(tmp_path / "payload.pt"))


def test_a_corrupt_pickle_is_named_with_torch_s_reason_without_its_boilerplate(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x80\x02" + bytes(range(200, 256)) * 4)
    with pytest.raises(ConversionError) as info:
        open_checkpoint(path)
    text = str(info.value)
    assert text.startswith(f"{path}: not a PyTorch checkpoint, or a corrupt or truncated one (")
    detail = text.split(" (", 1)[1]
    assert "Weights only load failed" not in detail and "Please file an issue" not in detail
    assert detail.split(":")[0] in ("UnpicklingError", "RuntimeError", "EOFError", "ValueError") and len(detail) > 30
    err = common._pickle_error(path, RuntimeError("Weights only load failed\nPlease file an issue"))
    assert str(err).endswith("(RuntimeError: RuntimeError)")  # nothing but boilerplate: the type names it


def test_a_preset_s_preferred_entries_come_first_and_a_plain_generator_is_a_wrapper(tmp_path):
    """A tuple ``select`` (a preset's preferred entries, e.g. CausVid's plain ``generator``) is tried before the
    default order; ``generator`` alone (next to a critic) is unwrapped like ``generator_ema``."""
    both = tmp_path / "both.pt"
    torch.save({"generator": {"w": torch.zeros(2)}, "generator_ema": {"w": torch.ones(2)}}, both)
    np.testing.assert_array_equal(np.array(open_checkpoint(both, select=("generator",))["w"]), [0, 0])
    np.testing.assert_array_equal(np.array(open_checkpoint(both, select=("absent",))["w"]), [1, 1])
    plain = tmp_path / "causvid.pt"
    torch.save({"generator": {"w": torch.full((2,), 2.0)}, "critic": {"w": torch.zeros(2)}, "step": 7}, plain)
    ckpt = open_checkpoint(plain)
    assert sorted(ckpt) == ["w"]
    np.testing.assert_array_equal(np.array(ckpt["w"]), [2, 2])


def test_every_line_of_a_corrupt_pickle_s_reason_is_kept_apart(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a pickle")
    err = common._pickle_error(path, RuntimeError("Weights only load failed\ninvalid load key, 'n'.\n\ntruncated"))
    assert str(err).endswith("(RuntimeError: invalid load key, 'n'. truncated)")


def _ops(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts) + b"."


def _short_unicode(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


def test_payload_globals_of_any_case_and_through_long_memo_slots_are_named(tmp_path):
    """A hand-made pickle can store the module and function names under 4-byte memo slots (LONG_BINPUT,
    fetched with LONG_BINGET in the other order than they were pushed), and a module may start upper-case:
    both are still named exactly."""
    hidden = tmp_path / "hidden.pkl"
    hidden.write_bytes(_ops(_short_unicode("system"), b"r" + (300).to_bytes(4, "little"), b"0",  # POP
                            _short_unicode("os"), b"r" + (301).to_bytes(4, "little"), b"0",
                            b"j" + (301).to_bytes(4, "little"), b"j" + (300).to_bytes(4, "little"), b"\x93"))
    assert common.pickle_code_references(hidden) == ["os.system"]
    upper = tmp_path / "upper.pkl"
    upper.write_bytes(_ops(b"cEvil\nrun\n"))
    assert common.pickle_code_references(upper) == ["Evil.run"]
