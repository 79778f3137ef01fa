"""`mlx-video prune`: what the saliency report and the pruned folder promise, and bad inputs (issue 19).

Written against survivors of the mutation run of ``mlx_video/prune.py`` (``benchmarks/mutation.py``): each test
pins behaviour a user relies on (the report describes the run that was done, the folder keeps the source's
settings, seeded runs repeat, malformed sizes are refused before any work).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_video import prune as P
from mlx_video.models import wan_dit
from mlx_video.models.wan_dit import WanDiTConfig
from mlx_video.utils import parameter_count
from tests.test_prune import FAST, LATENT, prune_cli, small  # noqa: F401  (small: the shared source fixture)


def _report(folder):
    return json.loads((folder / P.REPORT_NAME).read_text())


def test_taylor_report_and_folder_describe_the_run(small, tmp_path):  # noqa: F811
    """Bugs caught: report fields renamed or dropped (saliency formula, parameters after, the cross-head width
    defaulting to --heads, calibration inputs), CLI timesteps kept as strings, the source's dtype label lost."""
    src, weights, config = small
    labelled = tmp_path / "src-bf16"
    shutil.copytree(src, labelled)
    cfg = json.loads((labelled / "config.json").read_text())
    cfg["dit"]["dtype"] = "bfloat16"  # a label only: the weights stay fp32 (prune keeps the source's label)
    (labelled / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert prune_cli(labelled, out, "--heads", "3", "--ffn-dim", "100", "--timesteps", "1000", "500", *FAST) == 0
    report = _report(out)
    assert report["method"] == "taylor" and report["saliency"].startswith("I_i = ||X w_i + b_i||^2")
    assert report["widths"] == {"heads": 3, "cross_heads": 3, "ffn_dim": 100, "head_dim": config.head_dim}
    pruned = wan_dit.load(out)
    assert report["parameters"] == {"before": sum(v.size for v in weights.values()),
                                    "after": parameter_count(pruned)}
    assert report["parameters"]["after"] < report["parameters"]["before"]
    calib = report["calibration"]
    assert calib["timesteps"] == [1000.0, 500.0] and all(type(t) is float for t in calib["timesteps"])
    assert calib["inputs"] == "trajectory" and calib["samples"] == 2 and calib["latent_shape"] == list(LATENT)
    section = json.loads((out / "config.json").read_text())["dit"]
    assert section["dtype"] == "bfloat16" and section["parameters"] == report["parameters"]["after"]
    assert section["pruned"]["method"] == "taylor" and section["pruned"]["report"] == P.REPORT_NAME


@pytest.mark.parametrize("method,formula", [("magnitude", "||w_i||^2 per row"), ("random", "seeded uniform random")])
def test_weight_only_methods_say_how_they_ranked(small, tmp_path, method, formula):  # noqa: F811
    src, _, _ = small
    out = tmp_path / "out"
    assert prune_cli(src, out, "--heads", "2", "--cross-heads", "4", "--method", method) == 0
    report = _report(out)
    assert report["method"] == method and report["saliency"].startswith(formula)
    assert report["widths"]["cross_heads"] == 4 and report["calibration"] == {"method": method, "seed": 0}


@pytest.mark.parametrize("shape", [(0, 4, 4), (4, 4), (1, 4, 4, 4)])
def test_malformed_latent_shapes_are_refused_before_any_work(small, tmp_path, shape):  # noqa: F811
    """Bug caught: the latent-shape check combining its conditions with ``and`` (a zero size, or two or four
    sizes, would pass through to calibration)."""
    src, _, _ = small
    with pytest.raises(ValueError, match="--latent-shape .* must be 3 positive sizes"):
        P.prune(src, tmp_path / "out", heads=2, synthetic_text=True, latent_shape=shape, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_zero_cross_head_count_names_its_flag(small, tmp_path, capsys):  # noqa: F811
    src, _, _ = small
    assert prune_cli(src, tmp_path / "out", "--heads", "2", "--cross-heads", "0", *FAST) == 2
    assert "--cross-heads must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synthetic_calibration_text_is_seeded_with_prompt_like_lengths():
    """Bug caught: synthetic text drawn from an unseeded generator (a seeded prune would not repeat)."""
    cfg = WanDiTConfig(dim=64, num_layers=1, self_attn_heads=4, cross_attn_heads=4, ffn_dim=128, head_dim=16,
                       text_dim=32)
    a, b, c = (P.synthetic_text(40, cfg, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b))
    assert any(x.shape != y.shape or not np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, c))
    lengths = [x.shape[1] for x in a]
    assert all(x.shape[0] == 1 and x.shape[2] == cfg.text_dim for x in a)
    assert min(lengths) >= 4 and max(lengths) <= 64 and len(set(lengths)) > 10
    # with 40 draws of U{4..64} the shortest length is 4 in a third of the seeds: check the lower end over seeds
    shortest = min(x.shape[1] for seed in range(12) for x in P.synthetic_text(40, cfg, seed))
    assert shortest == 4
    short = dataclasses.replace(cfg, text_len=3)  # fewer tokens than the usual minimum
    assert {x.shape[1] for x in P.synthetic_text(20, short, 0)} <= {3}


def test_torch_out_safetensors_records_the_qk_norm_it_was_pruned_with(small, tmp_path):  # noqa: F811
    """Bug caught: the state dict written without its metadata (the qk-norm semantics of the pruned heads)."""
    src, _, config = small
    torch_file = tmp_path / "pruned.safetensors"
    assert prune_cli(src, tmp_path / "out", "--heads", "3", "--qk-norm", "masked", "--torch-out", str(torch_file),
                     *FAST) == 0
    tensors, meta = mx.load(str(torch_file), return_metadata=True)
    assert meta["format"] == "pt" and meta["qk_norm"] == "masked"
    assert meta["qk_norm_width"] == str(config.dim) and meta["head_dim"] == str(config.head_dim)
    assert tensors["blocks.0.self_attn.q.weight"].shape == (3 * config.head_dim, config.dim)


def test_an_unknown_saliency_method_lists_the_known_ones():
    """Bug caught: the refusal without the list of methods."""
    from mlx_video import prune
    from mlx_video.models.wan_dit import WanDiTConfig

    with pytest.raises(ValueError, match=r"unknown method 'fisher'; choose one of taylor, magnitude, random"):
        prune.score_layers(WanDiTConfig(num_layers=1), {}, "fisher")
