"""`mlx-video prune`: saliency, selection, slicing, qk-norm semantics, outputs, converter round trip, CLI errors."""

from __future__ import annotations

import json
import sys
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from converters.common import update_config
from mlx_video.utils import save_weights
from mlx_video import prune as P
from mlx_video.cli import main
from mlx_video.models import wan_dit
from mlx_video.models.wan_dit import WEIGHTS_NAME, WanDiT, WanDiTConfig
from mlx_video.utils import config_to_dict, parameter_count

SMALL = dict(dim=64, num_layers=2, self_attn_heads=4, cross_attn_heads=4, ffn_dim=128, head_dim=16, text_dim=32)
LATENT = (1, 4, 4)
FAST = ["--synthetic-text", "--samples", "2", "--latent-shape", *map(str, LATENT)]


def random_weights(config: WanDiTConfig, seed: int = 0, std: float = 0.2) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tree_flatten(WanDiT(config).parameters()):
        w = rng.standard_normal(v.shape).astype(np.float32) * std
        if k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            w += 1.0
        out[k] = mx.array(w)
    return out


def write_folder(path, weights: dict, config: WanDiTConfig, extra: dict | None = None):
    path.mkdir(parents=True)
    save_weights(path / WEIGHTS_NAME, weights)
    model = WanDiT(config)
    section = {**config_to_dict(config), "weights_file": WEIGHTS_NAME, "dtype": "float32",
               "parameters": parameter_count(model)}
    update_config(path, None, "dit", section)
    for name, value in (extra or {}).items():
        update_config(path, path, name, value)
    return path


def build(weights: dict, config: WanDiTConfig) -> WanDiT:
    model = WanDiT(config)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def forward(model: WanDiT, seed: int = 5, t: float = 937.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, 2, 4, 4, 16)).astype(np.float32))
    ctx = mx.array(rng.standard_normal((1, 7, model.config.text_dim)).astype(np.float32))
    return np.array(model(x, [t], context=ctx))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    config = WanDiTConfig(**SMALL)
    weights = random_weights(config)
    folder = write_folder(tmp_path_factory.mktemp("src") / "model", weights, config)
    return folder, weights, config


def prune_cli(src, out, *extra) -> int:
    return main(["prune", "--model", str(src), "--mlx-path", str(out), *extra])


# --------------------------------------------------------------------------------------------------
# Saliency
# --------------------------------------------------------------------------------------------------


def test_saliency_equals_brute_force_on_a_small_layer():
    rng = np.random.default_rng(0)
    layer = nn.Linear(12, 7)
    layer.load_weights([("weight", mx.array(rng.standard_normal((7, 12)).astype(np.float32))),
                        ("bias", mx.array(rng.standard_normal(7).astype(np.float32)))])
    energy = P.RowEnergy(7)
    rec = P._Recorder(layer, energy)
    xs = [rng.standard_normal((2, 9, 12)).astype(np.float32), rng.standard_normal((1, 5, 12)).astype(np.float32)]
    for x in xs:
        np.testing.assert_array_equal(np.array(rec(mx.array(x))), np.array(layer(mx.array(x))))
    X = np.concatenate([x.reshape(-1, 12) for x in xs]).astype(np.float64)
    W, b = np.array(layer.weight, np.float64), np.array(layer.bias, np.float64)
    brute = np.array([np.sum((X @ W[i] + b[i]) ** 2) for i in range(7)])  # ||X w_i + b_i||^2
    assert energy.tokens == 23
    np.testing.assert_allclose(np.array(energy.sum), brute, rtol=1e-5)
    np.testing.assert_allclose(energy.mean(), brute / 23, rtol=1e-5)


class _Capture(nn.Module):
    """Records the inputs a Linear sees inside the DiT (for a brute-force reference)."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer
        object.__setattr__(self, "seen", [])

    @property
    def weight(self):
        return self.inner.weight

    def __call__(self, x):
        self.seen.append(np.array(x, np.float64).reshape(-1, x.shape[-1]))
        return self.inner(x)


def test_calibration_saliency_equals_brute_force_inside_the_model(small):
    _, weights, config = small
    model = build(weights, config)
    names = ["blocks.0.self_attn.q", "blocks.1.cross_attn.q", "blocks.1.cross_attn.k", "blocks.1.cross_attn.v",
             "blocks.0.ffn.fc1"]
    captures = {}
    for name in names:
        parent, leaf = P._resolve(model, name)
        captures[name] = _Capture(getattr(parent, leaf))
        setattr(parent, leaf, captures[name])
    texts = P.synthetic_text(2, config, seed=1)
    energies = P.calibrate(model, texts, timesteps=[1000.0, 625.0], samples=3, latent_shape=LATENT, seed=2)
    assert isinstance(model.blocks[0].self_attn.k, nn.Linear)  # recorders removed again
    per_token = {}
    for name in names:
        X = np.concatenate(captures[name].seen)
        W = np.array(weights[f"{name}.weight"], np.float64)
        b = np.array(weights[f"{name}.bias"], np.float64)
        brute = np.sum((X @ W.T + b) ** 2, axis=0)
        assert energies[name].tokens == X.shape[0]
        np.testing.assert_allclose(np.array(energies[name].sum), brute, rtol=2e-4)
        per_token[name] = brute / X.shape[0]
    # head score = sum over its q, k, v rows of the per-token saliency (q sees video, k/v text tokens)
    scores = P.score_layers(config, weights, "taylor", energies)
    expected = sum(per_token[f"blocks.1.cross_attn.{p}"].reshape(4, 16).sum(1) for p in "qkv")
    np.testing.assert_allclose(scores[1]["cross_attn"]["scores"], expected, rtol=2e-4)
    np.testing.assert_allclose(scores[0]["ffn"]["scores"], per_token["blocks.0.ffn.fc1"], rtol=2e-4)
    # 3 samples x 2 timesteps x 4 video tokens; cross-attention k/v: 3 prompts x 512 text slots
    assert energies["blocks.0.self_attn.q"].tokens == 3 * 2 * 4
    assert energies["blocks.1.cross_attn.k"].tokens == 3 * config.text_len


def test_zeroed_heads_and_channels_are_pruned_first(small, tmp_path):
    _, weights, config = small
    w = dict(weights)
    zero = {(0, "self_attn"): 1, (1, "cross_attn"): 2, (1, "self_attn"): 3}
    for (layer, kind), head in zero.items():
        rows = P.head_channels([head], config.head_dim)
        for p in P.PROJECTIONS:
            for what in ("weight", "bias"):
                a = np.array(w[f"blocks.{layer}.{kind}.{p}.{what}"])
                a[rows] = 0
                w[f"blocks.{layer}.{kind}.{p}.{what}"] = mx.array(a)
    dead_channels = [5, 17, 100]
    for what in ("weight", "bias"):
        a = np.array(w[f"blocks.0.ffn.fc1.{what}"])
        a[dead_channels] = 0
        w[f"blocks.0.ffn.fc1.{what}"] = mx.array(a)
    model = build(w, config)
    energies = P.calibrate(model, P.synthetic_text(2, config), samples=2, latent_shape=LATENT)
    for method in ("taylor", "magnitude"):
        scores = P.score_layers(config, w, method, energies)
        plan = P.plan_pruning(config, scores, heads=3, ffn_dim=125)
        for (layer, kind), head in zero.items():
            assert scores[layer][kind]["scores"][head] == 0.0
            assert head not in plan[layer][kind], (method, layer, kind)
            assert len(plan[layer][kind]) == 3
        assert not set(dead_channels) & set(plan[0]["ffn"].tolist())
        assert plan[0]["ffn"].tolist() == sorted(set(range(128)) - set(dead_channels))
    # The same through the CLI: the report names the kept heads.
    src = write_folder(tmp_path / "src", w, config)
    assert prune_cli(src, tmp_path / "out", "--heads", "3", "--ffn-dim", "125", *FAST) == 0
    report = json.loads((tmp_path / "out" / P.REPORT_NAME).read_text())
    assert report["layers"][0]["self_attn"]["kept"] == [0, 2, 3]
    assert report["layers"][1]["cross_attn"]["kept"] == [0, 1, 3]
    assert report["layers"][1]["self_attn"]["kept"] == [0, 1, 2]


def test_random_and_magnitude_selection_differ_and_are_seeded(small):
    _, weights, config = small
    plans = {}
    for method, seed in (("random", 0), ("random", 1), ("magnitude", 0)):
        scores = P.score_layers(config, weights, method, seed=seed)
        plans[method, seed] = P.plan_pruning(config, scores, heads=2, ffn_dim=64)
    again = P.plan_pruning(config, P.score_layers(config, weights, "random", seed=0), heads=2, ffn_dim=64)
    assert all(np.array_equal(a["ffn"], b["ffn"]) for a, b in zip(again, plans["random", 0]))
    assert not all(np.array_equal(a["ffn"], b["ffn"]) for a, b in zip(plans["random", 0], plans["random", 1]))
    norms = np.sum(np.array(weights["blocks.0.ffn.fc1.weight"]) ** 2, axis=1)
    np.testing.assert_array_equal(plans["magnitude", 0][0]["ffn"], np.sort(np.argsort(-norms)[:64]))


def test_magnitude_needs_no_calibration_text_and_dtype_is_applied(small, tmp_path):
    src, weights, config = small
    assert prune_cli(src, tmp_path / "out", "--method", "magnitude", "--heads", "3", "--ffn-dim", "64",
                     "--dtype", "bfloat16") == 0
    out = mx.load(str(tmp_path / "out" / WEIGHTS_NAME))
    assert out["blocks.0.ffn.fc1.weight"].dtype == mx.bfloat16 and out["blocks.0.modulation"].dtype == mx.float32
    report = json.loads((tmp_path / "out" / P.REPORT_NAME).read_text())
    norms = np.sum(np.array(weights["blocks.1.ffn.fc1.weight"], np.float64) ** 2, axis=1)
    assert report["method"] == "magnitude" and "text" not in report["calibration"]
    assert report["layers"][1]["ffn"]["kept"] == np.sort(np.argsort(-norms)[:64]).tolist()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dit"]["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------------
# Pruned models
# --------------------------------------------------------------------------------------------------


def test_keep_everything_reproduces_the_model_exactly(small, tmp_path):
    src, weights, config = small
    assert prune_cli(src, tmp_path / "out", "--heads", "4", "--ffn-dim", "128", *FAST) == 0
    out = mx.load(str(tmp_path / "out" / WEIGHTS_NAME))
    assert set(out) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(np.array(out[k]), np.array(v), err_msg=k)
    pruned = wan_dit.load(tmp_path / "out")
    assert config_to_dict(pruned.config) == config_to_dict(config)
    np.testing.assert_array_equal(forward(pruned), forward(build(weights, config)))


def test_pruned_folder_loads_with_the_right_config_and_slices(small, tmp_path):
    _, weights, config = small
    src = write_folder(tmp_path / "src", weights, config, {"decoder": {"weights_file": "decoder.safetensors"}})
    (src / "decoder.safetensors").write_bytes(b"not really")  # another component, carried over as it is
    assert prune_cli(src, tmp_path / "out", "--heads", "3", "--cross-heads", "2", "--ffn-dim", "48", *FAST) == 0
    folder = tmp_path / "out"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dit"]["self_attn_heads"] == [3, 3] and cfg["dit"]["cross_attn_heads"] == [2, 2]
    assert cfg["dit"]["ffn_dim"] == [48, 48] and cfg["dit"]["head_dim"] == 16 and cfg["dit"]["qk_norm"] == "kept"
    assert cfg["decoder"] == {"weights_file": "decoder.safetensors"}
    assert (folder / "decoder.safetensors").read_bytes() == b"not really"
    model = wan_dit.load(folder)
    assert model.blocks[1].cross_attn.q.weight.shape == (32, 64) and model.blocks[1].cross_attn.o.weight.shape == (64, 32)
    assert model.blocks[0].self_attn.norm_q.weight.shape == (48,) and model.blocks[0].ffn.fc2.weight.shape == (64, 48)
    assert cfg["dit"]["parameters"] == parameter_count(model) < parameter_count(build(weights, config))
    assert np.all(np.isfinite(forward(model)))
    # Slices follow the report's kept indices: q/k/v rows + norms, o columns; fc1 rows, fc2 columns.
    report = json.loads((folder / P.REPORT_NAME).read_text())
    out = mx.load(str(folder / WEIGHTS_NAME))
    for layer in range(2):
        for kind in P.ATTENTION_KINDS:
            entry = report["layers"][layer][kind]
            assert len(entry["scores"]) == 4 and len(entry["q_scores"]) == 4
            rows = P.head_channels(entry["kept"], 16)
            pre = f"blocks.{layer}.{kind}"
            for name in ("q.weight", "k.bias", "v.weight", "norm_q.weight", "norm_k.weight"):
                np.testing.assert_array_equal(np.array(out[f"{pre}.{name}"]), np.array(weights[f"{pre}.{name}"])[rows])
            np.testing.assert_array_equal(np.array(out[f"{pre}.o.weight"]), np.array(weights[f"{pre}.o.weight"])[:, rows])
            np.testing.assert_array_equal(np.array(out[f"{pre}.o.bias"]), np.array(weights[f"{pre}.o.bias"]))
        kept = report["layers"][layer]["ffn"]["kept"]
        assert len(report["layers"][layer]["ffn"]["scores"]) == 128
        np.testing.assert_array_equal(np.array(out[f"blocks.{layer}.ffn.fc2.weight"]),
                                      np.array(weights[f"blocks.{layer}.ffn.fc2.weight"])[:, kept])
    assert report["calibration"]["samples"] == 2 and report["memory"]["peak_rss_bytes"] > 0


def zeroed_copy(weights: dict, config: WanDiTConfig, plan: list[dict]) -> dict:
    """The unpruned model with every pruned head (q/k/v rows, o columns) and FFN channel zeroed."""
    w = {k: np.array(v) for k, v in weights.items()}
    for i, p in enumerate(plan):
        for kind, n in (("self_attn", config.self_attn_heads[i]), ("cross_attn", config.cross_attn_heads[i])):
            rows = P.head_channels(np.setdiff1d(np.arange(n), p[kind]), config.head_dim)
            for proj in P.PROJECTIONS:
                w[f"blocks.{i}.{kind}.{proj}.weight"][rows] = 0
                w[f"blocks.{i}.{kind}.{proj}.bias"][rows] = 0
            w[f"blocks.{i}.{kind}.o.weight"][:, rows] = 0
        dead = np.setdiff1d(np.arange(config.ffn_dim[i]), p["ffn"])
        w[f"blocks.{i}.ffn.fc1.weight"][dead] = 0
        w[f"blocks.{i}.ffn.fc1.bias"][dead] = 0
        w[f"blocks.{i}.ffn.fc2.weight"][:, dead] = 0
    return {k: mx.array(v) for k, v in w.items()}


def test_masked_semantics_equal_the_zeroed_unpruned_model(small):
    _, weights, config = small
    model = build(weights, config)
    energies = P.calibrate(model, P.synthetic_text(2, config), samples=2, latent_shape=LATENT)
    plan = P.plan_pruning(config, P.score_layers(config, weights, "taylor", energies), heads=3, cross_heads=2,
                          ffn_dim=40)
    zeroed = forward(build(zeroed_copy(weights, config, plan), config))
    masked = P.prune_model(model, plan, "masked")
    assert masked.config.qk_norm == "masked" and masked.config.qk_norm_width == 64
    np.testing.assert_allclose(forward(masked), zeroed, atol=1e-5 * np.abs(zeroed).max(), rtol=0)
    kept = forward(P.prune_model(model, plan, "kept"))  # the denominator trap: not the zeroed model
    assert np.abs(kept - zeroed).max() > 1e-3 * np.abs(zeroed).max()


@pytest.mark.parametrize("qk_norm,suffix", [("kept", ".pt"), ("masked", ".safetensors")])
def test_torch_out_round_trips_through_the_converter(small, tmp_path, qk_norm, suffix):
    src, weights, config = small
    (tmp_path / "sd").mkdir()
    torch_file = tmp_path / "sd" / f"pruned{suffix}"
    assert prune_cli(src, tmp_path / "out", "--heads", "3", "--ffn-dim", "80", "--qk-norm", qk_norm,
                     "--torch-out", str(torch_file), *FAST) == 0
    if suffix == ".pt":
        import torch

        state = torch.load(torch_file, weights_only=True)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    else:
        shapes = {k: tuple(v.shape) for k, v in mx.load(str(torch_file)).items()}
    # original Wan names and PyTorch layouts (models.md §1.7/§1.8)
    assert shapes["patch_embedding.weight"] == (64, 16, 1, 2, 2)
    assert shapes["blocks.0.self_attn.q.weight"] == (48, 64) and shapes["blocks.1.cross_attn.o.weight"] == (64, 48)
    assert shapes["blocks.0.self_attn.norm_k.weight"] == (48,) and shapes["blocks.1.ffn.0.weight"] == (80, 64)
    assert shapes["blocks.1.ffn.2.weight"] == (64, 80) and shapes["head.head.weight"] == (64, 64)
    assert "blocks.0.norm3.bias" in shapes and "text_embedding.2.weight" in shapes and len(shapes) == len(weights)
    assert main(["convert", "--dit", str(torch_file), "--mlx-path", str(tmp_path / "conv"), "--head-dim", "16",
                 "--qk-norm", qk_norm]) == 0
    section = json.loads((tmp_path / "conv" / "config.json").read_text())["dit"]
    assert section["source_layout"] == "wan" and section["self_attn_heads"] == [3, 3] and section["ffn_dim"] == [80, 80]
    converted, pruned = wan_dit.load(tmp_path / "conv"), wan_dit.load(tmp_path / "out")
    assert pruned.config.qk_norm == qk_norm
    np.testing.assert_array_equal(forward(converted), forward(pruned))


def test_calibration_embeddings_file_and_folder_text_encoder(small, tmp_path, monkeypatch):
    src, weights, config = small
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((2, 9, config.text_dim)).astype(np.float32)
    mx.save_safetensors(str(tmp_path / "emb.safetensors"), {"embeddings": mx.array(emb)})
    assert prune_cli(src, tmp_path / "a", "--heads", "2", "--ffn-dim", "64", "--samples", "2", "--latent-shape",
                     *map(str, LATENT), "--calibration-embeddings", str(tmp_path / "emb.safetensors")) == 0
    # (a) the folder's text encoder, imported lazily (a stand-in module here: the real one is separate work)
    seen = []
    def encode_prompts(encoder, tokenizer, prompts, cache_dir=None):
        assert (encoder, tokenizer) == ("encoder", "tokenizer")
        seen.extend(prompts)
        return mx.array(emb[len(seen) - len(prompts):len(seen)])

    fake_umt5 = types.SimpleNamespace(load=lambda folder, **kwargs: "encoder", encode_prompts=encode_prompts)
    fake_tok = types.SimpleNamespace(load_tokenizer=lambda folder: "tokenizer")
    import mlx_video.models

    monkeypatch.setitem(sys.modules, "mlx_video.models.umt5", fake_umt5)
    monkeypatch.setattr(mlx_video.models, "umt5", fake_umt5, raising=False)
    monkeypatch.setitem(sys.modules, "mlx_video.tokenizer", fake_tok)
    with_te = tmp_path / "with_te"
    with_te.mkdir()
    for f in src.iterdir():
        (with_te / f.name).write_bytes(f.read_bytes())
    update_config(with_te, with_te, "text_encoder", {"weights_file": "text_encoder.safetensors"})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\n\n  a city at night  \n")
    assert prune_cli(with_te, tmp_path / "b", "--heads", "2", "--ffn-dim", "64", "--latent-shape",
                     *map(str, LATENT), "--calibration", str(prompts)) == 0
    assert seen == ["a red fox in the snow", "a city at night"]
    ra = json.loads((tmp_path / "a" / P.REPORT_NAME).read_text())
    rb = json.loads((tmp_path / "b" / P.REPORT_NAME).read_text())
    assert ra["calibration"]["text"].startswith("embeddings:") and rb["calibration"]["text"].startswith("prompts:")
    assert ra["layers"] == rb["layers"]  # same embeddings, same noise: same saliency


def test_calibration_with_the_real_text_encoder_of_the_folder(small, tmp_path):
    """End to end with a tiny random UMT5 + sentencepiece tokenizer in the model folder (lazy import)."""
    import io

    import sentencepiece as spm  # a runtime dependency: an import error must fail, not skip

    from mlx_video.models import umt5

    _, weights, config = small
    folder = write_folder(tmp_path / "src", weights, config)
    model_bytes = io.BytesIO()
    corpus = ["a red fox runs through the snow", "a city street at night with neon lights", "waves on a beach"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 20), model_writer=model_bytes, vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model_bytes.getvalue())
    te_config = umt5.UMT5Config(vocab_size=48, dim=config.text_dim, dim_attn=32, dim_ffn=64, num_heads=2,
                                num_layers=1)
    encoder = umt5.UMT5Encoder(te_config)
    mx.eval(encoder.parameters())
    save_weights(folder / "text_encoder.safetensors", dict(tree_flatten(encoder.parameters())))
    update_config(folder, folder, "text_encoder", {**config_to_dict(te_config), "weights_file": "text_encoder.safetensors",
                                                   "tokenizer_file": "spiece.model", "dtype": "float32"})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(corpus) + "\n")
    assert prune_cli(folder, tmp_path / "out", "--heads", "3", "--ffn-dim", "64", "--latent-shape", *map(str, LATENT),
                     "--calibration", str(prompts)) == 0
    report = json.loads((tmp_path / "out" / P.REPORT_NAME).read_text())
    assert report["calibration"]["texts"] == 3 and report["calibration"]["tokens"]["text"] == 3 * config.text_len
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["text_encoder"]["weights_file"] == "text_encoder.safetensors"  # carried over
    assert (tmp_path / "out" / "spiece.model").read_bytes() == model_bytes.getvalue()
    assert wan_dit.load(tmp_path / "out").config.self_attn_heads == [3, 3]


# --------------------------------------------------------------------------------------------------
# Ablation (planted structure: Taylor must beat weight magnitude and random)
# --------------------------------------------------------------------------------------------------


def test_ablation_taylor_preserves_most_on_planted_structure():
    from benchmarks.prune_full import ablation

    cfg = dict(dim=96, num_layers=2, self_attn_heads=6, cross_attn_heads=6, ffn_dim=192, head_dim=16, text_dim=32,
               text_len=32)
    run = ablation("anisotropic", cfg, heads=4, ffn=96, calib_texts=2, eval_texts=2, timesteps=[1000.0, 625.0],
                   latent_shape=(1, 4, 4), random_repeats=2, qk_norms=("masked",))
    r = run["results"]
    assert r["taylor/masked"]["error"] < r["magnitude/masked"]["error"]
    assert r["taylor/masked"]["error"] < r["random/masked"]["error"]
    assert r["taylor/masked"]["planted_removed"] > 0.8 > r["magnitude/masked"]["planted_removed"]


# --------------------------------------------------------------------------------------------------
# CLI errors: clear, non-zero, and no output folder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing-model", "heads", "cross-heads", "ffn-big", "ffn-zero", "empty-prompts",
                                  "no-text", "no-text-encoder", "bad-latent", "torch-suffix"])
def test_cli_bad_inputs(small, tmp_path, capsys, case):
    src, _, _ = small
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    args, expect = {
        "missing-model": ([str(tmp_path / "nope"), "--heads", "2", *FAST], "does not exist"),
        "heads": ([str(src), "--heads", "5", *FAST], "--heads 5 exceeds the 4 self-attention heads"),
        "cross-heads": ([str(src), "--heads", "2", "--cross-heads", "9", *FAST], "--cross-heads 9 exceeds"),
        "ffn-big": ([str(src), "--ffn-dim", "129", *FAST], "--ffn-dim 129 exceeds the 128 FFN channels"),
        "ffn-zero": ([str(src), "--ffn-dim", "0", *FAST], "--ffn-dim must be >= 1"),
        "empty-prompts": ([str(src), "--heads", "2", "--calibration", str(empty)], "is empty"),
        "no-text": ([str(src), "--heads", "2"], "needs calibration text"),
        "no-text-encoder": ([str(src), "--heads", "2", "--calibration", str(prompts)], "has no text_encoder"),
        "bad-latent": ([str(src), "--heads", "2", "--synthetic-text", "--latent-shape", "1", "3", "4"],
                       "divisible by the patch size"),
        "torch-suffix": ([str(src), "--heads", "2", *FAST, "--torch-out", str(tmp_path / "x.npz")], "--torch-out"),
    }[case]
    rc = main(["prune", "--model", *args, "--mlx-path", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert expect in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder left


def test_cli_refuses_an_existing_output(small, tmp_path, capsys):
    src, _, _ = small
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert prune_cli(src, tmp_path / "out", "--heads", "2", *FAST) != 0
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
