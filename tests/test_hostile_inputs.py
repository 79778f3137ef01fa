"""Hostile and broken inputs on every command that reads a file (issue 11: paths that escape, validation gaps).

Each case runs the real CLI (``mlx_video.cli.main``) and asserts: the exit status (1 runtime, 2 usage), no
traceback, a message naming the file and the field, nothing left in the output location, and the user's
inputs byte-identical afterwards. Checkpoints are built here at toy sizes: tiny Wan DiT / UMT5 state dicts
with random values, crafted safetensors headers, index files pointing outside their folder, FIFOs, devices.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_video.cli import main
from tests.test_umt5 import train_tiny_spm

TEXT_DIM = 32


def wan_state(heads: int = 2, head_dim: int = 32, ffn: int = 128, layers: int = 1, seed: int = 0) -> dict:
    """Original-Wan-layout DiT tensors (shapes as in ``models.md`` §1.7), random float32."""
    rng = np.random.default_rng(seed)
    d = heads * head_dim
    shapes = {"patch_embedding.weight": (d, 16, 1, 2, 2), "patch_embedding.bias": (d,),
              "text_embedding.0.weight": (d, TEXT_DIM), "text_embedding.0.bias": (d,),
              "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
              "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
              "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
              "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
              "head.modulation": (1, 2, d), "head.head.weight": (64, d), "head.head.bias": (64,)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({b + "modulation": (1, 6, d), b + "norm3.weight": (d,), b + "norm3.bias": (d,),
                       b + "ffn.0.weight": (ffn, d), b + "ffn.0.bias": (ffn,), b + "ffn.2.weight": (d, ffn),
                       b + "ffn.2.bias": (d,)})
        for kind in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes.update({f"{b}{kind}.{p}.weight": (d, d), f"{b}{kind}.{p}.bias": (d,)})
            shapes.update({f"{b}{kind}.norm_q.weight": (d,), f"{b}{kind}.norm_k.weight": (d,)})
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}


def umt5_state(vocab: int, dim: int = 32, heads: int = 4, ffn: int = 64, layers: int = 1) -> dict:
    """Wan ``T5Encoder`` keys (``models.md`` §2.3), random float32."""
    rng = np.random.default_rng(1)
    shapes = {"token_embedding.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm2.weight": (dim,),
                       b + "pos_embedding.embedding.weight": (32, heads), b + "ffn.gate.0.weight": (ffn, dim),
                       b + "ffn.fc1.weight": (ffn, dim), b + "ffn.fc2.weight": (dim, ffn)})
        shapes.update({f"{b}attn.{p}.weight": (dim, dim) for p in "qkvo"})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (a dict, or raw bytes) and data section."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@contextmanager
def deadline(seconds: int = 30):
    """Fail (instead of hanging the suite) if a FIFO or device makes a reader block."""
    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(paths) -> dict:
    out = {}
    for p in map(Path, paths):
        if p.is_file() and not p.is_symlink():
            out[p] = p.read_bytes()
        elif p.is_dir():
            out.update(snapshot(sorted(p.iterdir())))
    return out


def run(capsys, argv, out: Path | None = None, inputs=(), code: int = 1, fragments=()) -> str:
    """Run the CLI, check the exit status, the message, the absence of debris and of changed inputs."""
    inputs = [Path(p) for p in inputs]
    before = snapshot(inputs)
    out_before = snapshot([out]) if out is not None and out.exists() else None
    with deadline():
        status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == code, f"exit {status}, expected {code}: {err}"
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in err, f"{fragment!r} not in: {err}"
    if out is not None:
        if out_before is None:
            assert not out.exists(), f"{out} was created"
        else:
            assert snapshot([out]) == out_before, f"{out} changed"
        debris = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not debris, f"left behind: {debris}"
    assert snapshot(inputs) == before, "an input file was changed"
    return err


def convert_dit(capsys, src, tmp_path, *extra, code=1, fragments=()):
    out = tmp_path / "out"
    return run(capsys, ["convert", "--dit", src, "--mlx-path", out, *extra], out, [src], code, fragments)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dit")
    save_file(wan_state(), str(d / "w.safetensors"))
    return d / "w.safetensors"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_tiny_spm(tmp_path_factory.mktemp("tok") / "spiece.model")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "model"
    assert main(["demo", "--mlx-path", str(folder)]) == 0
    return folder


@pytest.fixture
def model(demo, tmp_path) -> Path:
    """A fresh copy of a complete model folder to damage."""
    folder = tmp_path / "model"
    shutil.copytree(demo, folder)
    return folder


def edit_config(folder: Path, change) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------------------------- paths that escape


def _sharded(tmp_path: Path, shard_name: str) -> Path:
    src = tmp_path / "ckpt"
    src.mkdir()
    state = wan_state()
    save_file(state, str(src / "diffusion_pytorch_model-00001-of-00001.safetensors"))
    weight_map = {k: "diffusion_pytorch_model-00001-of-00001.safetensors" for k in state}
    weight_map["head.head.bias"] = shard_name
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd"])
def test_index_shard_outside_the_checkpoint_folder(tmp_path, capsys, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"x": np.zeros(2, np.float32)}, str(outside / "x.safetensors"))
    src = _sharded(tmp_path, shard)
    convert_dit(capsys, src, tmp_path, fragments=["index.json", "weight_map['head.head.bias']", "outside", shard])


def test_index_shard_symlink_leaving_the_folder(tmp_path, capsys):
    secret = tmp_path / "secret.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(secret))
    src = _sharded(tmp_path, "link.safetensors")
    (src / "link.safetensors").symlink_to(secret)
    convert_dit(capsys, src, tmp_path, fragments=["weight_map['head.head.bias']", "resolves to", "outside"])


def test_model_config_file_names_outside_the_folder(model, capsys):
    path = edit_config(model, lambda c: c["text_encoder"].update(tokenizer_file="../../../etc/passwd"))
    run(capsys, ["info", model], fragments=[path, "text_encoder.tokenizer_file", "points outside"])
    path = edit_config(model, lambda c: c["text_encoder"].update(tokenizer_file="spiece.model",
                                                                 weights_file="/etc/passwd"))
    run(capsys, ["info", model], fragments=[path, "text_encoder.weights_file", "outside"])


# ------------------------------------------------------------------- inputs must be regular files


def test_fifo_as_checkpoint_is_refused_without_blocking(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.safetensors")
    convert_dit(capsys, tmp_path / "pipe.safetensors", tmp_path, fragments=["pipe.safetensors", "FIFO"])


def test_dev_zero_as_checkpoint(tmp_path, capsys):
    convert_dit(capsys, "/dev/zero", tmp_path, fragments=["/dev/zero", "character device", "not a regular file"])


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_device_or_fifo_as_tokenizer(tmp_path, capsys, kind):
    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "spiece.model"
        os.mkfifo(path)
    out = tmp_path / "out"
    run(capsys, ["convert", "--tokenizer", path, "--mlx-path", out], out,
        fragments=[path, "character device" if kind == "dev_zero" else "FIFO"])


def test_oversized_tokenizer_is_refused_before_reading(tmp_path, capsys):
    big = tmp_path / "spiece.model"
    with open(big, "wb") as f:  # sparse: 65 MB on paper, nothing on disk
        f.truncate(65 * 1024**2)
    out = tmp_path / "out"
    run(capsys, ["convert", "--tokenizer", big, "--mlx-path", out], out, fragments=[big, "bytes, more than"])


def test_fifo_in_place_of_model_files(model, capsys):
    (model / "dit.safetensors").unlink()
    os.mkfifo(model / "dit.safetensors")
    run(capsys, ["info", model], fragments=[model / "dit.safetensors", "FIFO"])
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    run(capsys, ["info", model], fragments=[model / "config.json", "FIFO"])


# ------------------------------------------------------------------------ malformed safetensors headers

HEADER_CASES = {
    "list_header": ([], "a JSON object is required"),
    "entry_not_object": ({"w": [1, 2]}, "'w': expected an object"),
    "missing_offsets": ({"w": {"dtype": "F32", "shape": [1]}}, "'w': missing 'data_offsets'"),
    "string_offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, "data_offsets must be"),
    "string_shape": ({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "shape must be a list"),
    "unknown_dtype": ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype 'F99'"),
    "size_mismatch": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    "bad_metadata": ({"__metadata__": {"k": 1}}, "__metadata__ must map strings to strings"),
    "deep_nesting": (b"[" * 50_000 + b"]" * 50_000, "nested"),
    "binary": (b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_safetensors_header(tmp_path, capsys, case):
    header, fragment = HEADER_CASES[case]
    path = raw_safetensors(tmp_path / f"{case}.safetensors", header, bytes(16))
    convert_dit(capsys, path, tmp_path, fragments=[path, fragment])


def test_header_length_beyond_the_file(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    convert_dit(capsys, path, tmp_path, fragments=[path, "corrupt or truncated safetensors header"])


def test_broken_weights_in_a_model_folder(model, capsys):
    raw_safetensors(model / "decoder.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                    "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                    bytes(16))
    run(capsys, ["info", model], fragments=[model / "decoder.safetensors", "overlap"])


# ------------------------------------------------------------------------------- JSON and config files


def test_garbage_index_names_the_file(tmp_path, capsys):
    src = _sharded(tmp_path, "diffusion_pytorch_model-00001-of-00001.safetensors")
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    index.write_bytes(b"\xff\xd8\xff\xe0 binary")
    convert_dit(capsys, src, tmp_path, fragments=[index, "not valid UTF-8 JSON"])
    index.write_text("[" * 100 + "]" * 100)
    convert_dit(capsys, src, tmp_path, fragments=[index, "nested"])
    index.write_text(json.dumps({"weight_map": ["a", "b"]}))
    convert_dit(capsys, src, tmp_path, fragments=[index, "'weight_map'"])
    index.write_text('{"weight_map": {}, "metadata": {"total_size": ' + "9" * 5000 + "}}")
    convert_dit(capsys, src, tmp_path, fragments=[index, "not valid JSON", "digits"])
    index.write_text(json.dumps({"weight_map": {"head.head.bias": 7}}))
    convert_dit(capsys, src, tmp_path, fragments=[index, "weight_map['head.head.bias']", "expected a file name"])


def test_garbage_config_beside_the_checkpoint(dit_file, tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    shutil.copy(dit_file, src)
    (tmp_path / "config.json").write_bytes(b"\x00\xff not json")
    convert_dit(capsys, src, tmp_path, fragments=[tmp_path / "config.json", "not valid UTF-8 JSON"])
    (tmp_path / "config.json").write_text("{\"dim\": ")
    convert_dit(capsys, src, tmp_path, fragments=[tmp_path / "config.json", "not valid JSON", "line 1"])


@pytest.mark.parametrize("side, fragment", [({"attention_head_dim": 0}, "'attention_head_dim' must be a positive"),
                                            ({"num_heads": 0, "dim": 64}, "'num_heads' must be a positive"),
                                            ({"attention_head_dim": 32, "text_len": 1e9}, "'text_len'")])
def test_bad_values_in_the_side_config(dit_file, tmp_path, capsys, side, fragment):
    src = tmp_path / "w.safetensors"
    shutil.copy(dit_file, src)
    (tmp_path / "config.json").write_text(json.dumps(side))
    convert_dit(capsys, src, tmp_path, fragments=[tmp_path / "config.json", fragment])


@pytest.mark.parametrize("section, change, fragment", [
    ("dit", {"text_len": 1e9}, "'text_len' must be an integer"),
    ("dit", {"text_len": 10**9}, "'text_len' must be in"),
    ("dit", {"head_dim": 0}, "'head_dim' must be in"),
    ("dit", {"num_layers": -2}, "'num_layers' must be in"),
    ("dit", {"self_attn_heads": "many"}, "'self_attn_heads'"),
    ("text_encoder", {"num_heads": 0}, "'num_heads' must be in"),
    ("text_encoder", {"quantization": {"bits": "four"}}, "quantization must be"),
    ("decoder", {"decoder_channels": [1, 2, -3, 4]}, "'decoder_channels' must be a list whose item 2"),
    ("sampler", {"guidance": float("nan")}, "'guidance' must be finite"),
])
def test_bad_values_in_a_model_config(model, capsys, section, change, fragment):
    path = edit_config(model, lambda c: c[section].update(change))
    run(capsys, ["info", model], fragments=[path, section, fragment])


def test_model_config_garbage_or_deep(model, capsys):
    (model / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    run(capsys, ["info", model], fragments=[model / "config.json", "not valid UTF-8 JSON"])
    (model / "config.json").write_text("[" * 10_000 + "]" * 10_000)
    run(capsys, ["info", model], fragments=[model / "config.json", "nested"])


def test_generate_refuses_a_bad_config_before_any_work(model, tmp_path, capsys):
    path = edit_config(model, lambda c: c["dit"].update(text_len=1e9))
    out = tmp_path / "video.mp4"
    run(capsys, ["generate", "--model", model, "--prompt", "a fox", "--output", out, "--no-prompt-cache"], out,
        [model], fragments=[path, "'text_len'"])


# ------------------------------------------------------------------------------------ converter checks


@pytest.mark.parametrize("dtype", [np.int8, np.bool_])
def test_integer_or_bool_dit_weights(tmp_path, capsys, dtype):
    state = wan_state()
    state["blocks.0.ffn.0.weight"] = (state["blocks.0.ffn.0.weight"] > 0).astype(dtype)
    save_file(state, str(tmp_path / "w.safetensors"))
    convert_dit(capsys, tmp_path / "w.safetensors", tmp_path, "--head-dim", "32",
                fragments=["w.safetensors", "blocks.0.ffn.fc1.weight", "dtype", "expected floating point"])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_dit_weights(tmp_path, capsys, value):
    state = wan_state()
    state["blocks.0.self_attn.v.weight"][3, 5] = value
    save_file(state, str(tmp_path / "w.safetensors"))
    convert_dit(capsys, tmp_path / "w.safetensors", tmp_path, "--head-dim", "32",
                fragments=["w.safetensors", "non-finite", "blocks.0.self_attn.v.weight"])


def test_non_finite_text_encoder_weights(tokenizer, tmp_path, capsys):
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    state = umt5_state(vocab)
    state["blocks.0.attn.k.weight"][0, 0] = np.nan
    save_file(state, str(tmp_path / "enc.safetensors"))
    out = tmp_path / "out"
    run(capsys, ["convert", "--text-encoder", tmp_path / "enc.safetensors", "--tokenizer", tokenizer,
                 "--mlx-path", out], out, [tmp_path / "enc.safetensors", tokenizer],
        fragments=["enc.safetensors", "non-finite", "blocks.0.attn.k.weight"])


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_garbage_versus_payload(tmp_path, capsys):
    import pickle

    import torch

    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": payload}, tmp_path / "evil.pth")
    err = convert_dit(capsys, tmp_path / "evil.pth", tmp_path, fragments=["evil.pth", "refusing to load",
                                                                           "contains code", "system"])
    with open(tmp_path / "legacy.pth", "wb") as f:  # a bare pickle, not torch's format: torch says only "operand"
        pickle.dump({"x": payload}, f)
    convert_dit(capsys, tmp_path / "legacy.pth", tmp_path, fragments=["legacy.pth", "refusing to load", "system"])
    assert not payload.marker.exists()
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n" * 20)
    for name in ("garbage.pth", "empty.pth", "text.pth"):
        err = convert_dit(capsys, tmp_path / name, tmp_path, fragments=[name, "not a PyTorch checkpoint"])
        assert "refusing" not in err and "code" not in err


@pytest.mark.parametrize("flags, fragment", [(["--head-dim", "0"], "--head-dim must be"),
                                             (["--head-dim", "33"], "--head-dim must be"),
                                             (["--qk-norm", "masked", "--qk-norm-width", "-4"], "--qk-norm-width")])
def test_width_flags_out_of_range_are_usage_errors(dit_file, tmp_path, capsys, flags, fragment):
    convert_dit(capsys, dit_file, tmp_path, *flags, code=2, fragments=[fragment, f"got {flags[-1]}"])


def test_assumed_head_dim_is_said_and_recorded(tmp_path, capsys):
    save_file(wan_state(heads=4, head_dim=32), str(tmp_path / "w.safetensors"))  # 128 wide: fits 1 x 128 too
    out = tmp_path / "out"
    assert main(["convert", "--dit", str(tmp_path / "w.safetensors"), "--mlx-path", str(out)]) == 0
    err = capsys.readouterr().err
    assert "ASSUMING head_dim 128" in err and "--head-dim" in err
    section = json.loads((out / "config.json").read_text())["dit"]
    assert section["head_dim"] == 128 and section["head_dim_source"].startswith("assumed 128")
    assert main(["convert", "--dit", str(tmp_path / "w.safetensors"), "--mlx-path", str(tmp_path / "o2"),
                 "--head-dim", "32"]) == 0
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["dit"]["head_dim_source"] == "--head-dim"


def test_shapes_contradicting_the_assumed_head_dim(dit_file, tmp_path, capsys):
    convert_dit(capsys, dit_file, tmp_path, fragments=["w.safetensors", "not a multiple of Wan's head_dim 128",
                                                       "--head-dim"])


def test_qk_norm_width_inconsistent_with_q(tmp_path, capsys):
    state = wan_state()
    state["blocks.0.self_attn.norm_q.weight"] = np.ones(32, np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    convert_dit(capsys, tmp_path / "w.safetensors", tmp_path, "--head-dim", "32",
                fragments=["w.safetensors", "blocks.0.self_attn.norm_q has width"])


# ------------------------------------------------------------------------------- generate's own inputs


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "binary_metadata"])
def test_generate_prompt_file_and_metadata_sidecar(model, tmp_path, capsys, kind):
    out = tmp_path / "video.mp4"
    if kind == "dev_zero":
        argv, fragments = ["--prompt-file", "/dev/zero"], ["/dev/zero", "character device"]
    elif kind == "fifo":
        os.mkfifo(tmp_path / "prompts.txt")
        argv, fragments = ["--prompt-file", tmp_path / "prompts.txt"], [tmp_path / "prompts.txt", "FIFO"]
    else:
        (tmp_path / "video.json").write_bytes(b"\xff\xfe{}")
        argv, fragments = ["--config-from-metadata", tmp_path / "video.json"], ["video.json", "not valid UTF-8 JSON"]
    run(capsys, ["generate", "--model", model, "--output", out, *argv], out, [model], code=2, fragments=fragments)


def test_prompt_cache_entry_that_is_a_fifo_is_a_miss(tmp_path):
    import mlx.core as mx

    from mlx_video.text_cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", "encoder")
    key = cache.key("a fox")
    cache.folder.mkdir()
    os.mkfifo(cache.path(key))
    with deadline():
        assert cache.get(key, 2, 4) is None
    assert not cache.path(key).exists()  # the planted entry is removed (the name only; nothing is read)
    cache.put(key, mx.ones((2, 4)))
    assert cache.get(key, 2, 4) is not None


def test_hugging_face_cache_symlinks_into_blobs_are_allowed(tmp_path, capsys):
    """The hub cache links snapshot files into ../../blobs: that is inside the repo, not an escape."""
    repo = tmp_path / "models--org--wan"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    state = wan_state()
    save_file(state, str(blobs / "b1"))
    (snap / "diffusion_pytorch_model.safetensors").symlink_to("../../blobs/b1")
    (blobs / "b2").write_text(json.dumps({"weight_map": {k: "diffusion_pytorch_model.safetensors" for k in state}}))
    (snap / "diffusion_pytorch_model.safetensors.index.json").symlink_to("../../blobs/b2")
    (snap / "config.json").write_text(json.dumps({"attention_head_dim": 32}))
    assert main(["convert", "--dit", str(snap), "--mlx-path", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dit"]["head_dim"] == 32


def test_integer_weights_in_decoder_and_text_encoder(tokenizer, tmp_path, capsys):
    import sentencepiece as spm
    import torch

    from tests.model_factory import TAEHV_SMALL
    from tests.taehv_reference import TAEHVReference, randomize_

    tae = {k: v.contiguous().numpy() for k, v in randomize_(TAEHVReference(**TAEHV_SMALL), seed=0).state_dict().items()}
    tae["decoder.1.bias"] = tae["decoder.1.bias"].astype(np.int8)
    save_file(tae, str(tmp_path / "taew.safetensors"))
    out = tmp_path / "out"
    run(capsys, ["convert", "--decoder", tmp_path / "taew.safetensors", "--mlx-path", out], out,
        [tmp_path / "taew.safetensors"], fragments=["taew.safetensors", "'decoder.1.bias' has dtype int8"])
    state = umt5_state(spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size())
    torch.save({k: torch.from_numpy(v) if "attn.v" not in k else torch.from_numpy(v).to(torch.int8)
                for k, v in state.items()}, tmp_path / "enc.pth")
    run(capsys, ["convert", "--text-encoder", tmp_path / "enc.pth", "--tokenizer", tokenizer, "--mlx-path", out],
        out, [tmp_path / "enc.pth"], fragments=["enc.pth", "'blocks.0.attn.v.weight' has dtype int8"])
