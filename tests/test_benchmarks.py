"""The benchmark suite (issue #6): FLOP counts against hand counts and PyTorch's FLOP counter, and a quick-mode
run of ``mlx-video bench`` (tiny models, one repeat) whose JSON must hold every figure, with the reference
comparison done. No timing is asserted: figures are the report's business, not the tests'.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import flops as F
from mlx_video.models import taehv, umt5, wan_dit

# --------------------------------------------------------------------------------------------------
# FLOP counts
# --------------------------------------------------------------------------------------------------

SMALL_DIT = dict(dim=12, num_layers=1, self_attn_heads=1, cross_attn_heads=1, ffn_dim=16, head_dim=6, freq_dim=4,
                 text_dim=6, text_len=5)


def test_dit_flops_hand_count():
    c = wan_dit.WanDiTConfig(**SMALL_DIT)  # pruned-style: 1 head x 6 inside a 12-wide model
    got = F.dit_step_flops(c, (1, 2, 4, 4, 16))  # patch (1, 2, 2): 2 x 2 x 2 = 8 tokens
    # 2 FLOPs per multiply-add; tokens n = 8, d = 12, inner = 6, text slots 5, FFN 16, patch 16*4 = 64 inputs
    hand = {
        "patch_embedding": 2 * 8 * 64 * 12,
        "time_embedding": 2 * (4 * 12 + 12 * 12 + 12 * 72),
        "self_attn_qkv": 3 * 2 * 8 * 12 * 6,
        "self_attn_scores": 2 * 8 * 6 * 8,
        "self_attn_values": 2 * 8 * 8 * 6,
        "self_attn_out": 2 * 8 * 6 * 12,
        "cross_attn_q": 2 * 8 * 12 * 6,
        "cross_attn_kv": 2 * 2 * 5 * 12 * 6,
        "cross_attn_scores": 2 * 8 * 6 * 5,
        "cross_attn_values": 2 * 8 * 5 * 6,
        "cross_attn_out": 2 * 8 * 6 * 12,
        "ffn": 2 * 2 * 8 * 12 * 16,
        "head": 2 * 8 * 12 * 64,
        "text_embedding": 2 * 5 * (6 * 12 + 12 * 12),
    }
    assert got["breakdown"] == hand
    assert got["total"] == 45840 == sum(hand.values())
    cached = F.dit_step_flops(c, (1, 2, 4, 4, 16), include_text=False)  # the runtime's per-step work
    assert got["total"] - cached["total"] == hand["cross_attn_kv"] + hand["text_embedding"]


def test_dit_flops_match_torch_flop_counter_on_diffusers():
    """Independent count: PyTorch's FlopCounterMode on the diffusers reference (pruned heads included)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.dit import dit_config, make_reference_dit

    c = dit_config("tiny")
    ref = make_reference_dit(c)
    shape = (1, 2, 4, 6, 16)
    x = torch.randn(1, 16, 2, 4, 6)
    ctx = torch.randn(1, c.text_len, c.text_dim)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the counter has no formula for the CPU flash-attention kernel: use the math path (plain matmuls)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ref(x, torch.tensor([500.0]), ctx, return_dict=False)
    assert F.dit_step_flops(c, shape)["total"] == counter.get_total_flops()


def test_real_model_sizes():
    assert F.dit_parameter_count(wan_dit.lightning_video()) == 911_536_960  # the paper's 0.91B pruned DiT
    assert F.dit_parameter_count(wan_dit.wan2_1_1_3b()) == 1_418_996_800
    assert F.taehv_decoder_parameter_count(taehv.taew2_1()) == 9_844_611
    from mlx.utils import tree_flatten

    c = umt5.UMT5Config(vocab_size=100, num_layers=2)
    model = umt5.UMT5Encoder(c)  # parameters are never evaluated: no memory
    assert F.umt5_parameter_count(c) == sum(int(np.prod(v.shape)) for _, v in tree_flatten(model.parameters()))


def test_umt5_flops_hand_count_and_torch_counter():
    c = umt5.UMT5Config(vocab_size=16, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=1)
    got = F.umt5_flops(c, tokens=3)
    hand = {"attn_qkv": 3 * 2 * 3 * 8 * 8, "attn_scores": 2 * 2 * 3 * 4 * 3, "attn_values": 2 * 2 * 3 * 3 * 4,
            "attn_out": 2 * 3 * 8 * 8, "ffn": 2 * 2 * 3 * 8 * 16 + 2 * 3 * 16 * 8}
    assert got["breakdown"] == hand and got["total"] == 4128
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import UMT5Config, UMT5EncoderModel

    hf = UMT5EncoderModel(UMT5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hf(input_ids=torch.tensor([[3, 4, 1]]))
    assert got["total"] == counter.get_total_flops()


def test_taehv_flops_hand_count_and_torch_counter():
    c = taehv.TAEHVConfig(decoder_channels=[4, 4, 4, 4], depth=1, encoder_channels=4)
    got = F.taehv_decode_flops(c, (1, 1, 1, 1, 16))
    mem = 2 * (9 * 8 * 4) + 2 * 2 * (9 * 4 * 4)  # one MemBlock on one pixel-frame: conv(2c->c) + 2 conv(c->c)
    hand = {
        "conv_in": 2 * 9 * 16 * 4,
        # stage 0 at 1x1 (1 frame), stage 1 at 2x2 (1 frame), stage 2 at 4x4 (2 frames: TGrow x2 at the end of
        # stage 1); the output stage at 8x8 with 4 frames
        "memblocks": mem * (1 + 4 + 2 * 16),
        "tgrow": 2 * 4 * 4 * 4 + 2 * 16 * 4 * 8 + 2 * (2 * 64) * 4 * 8,
        "stage_convs": 2 * 4 * 9 * 4 * 4 + 2 * (2 * 16) * 9 * 4 * 4 + 2 * (4 * 64) * 9 * 4 * 4,
        "conv_out": 2 * (4 * 64) * 9 * 4 * 3,
    }
    assert got["breakdown"] == hand
    from torch.utils.flop_counter import FlopCounterMode

    from tests.taehv_reference import TAEHVReference

    ref = TAEHVReference(decoder_channels=(4, 4, 4, 4), depth=1, encoder_channels=4).eval()
    z = torch.randn(1, 3, 16, 2, 3)  # NTCHW
    with FlopCounterMode(display=False) as counter:
        ref.decode_video(z)
    assert F.taehv_decode_flops(c, (1, 3, 2, 3, 16))["total"] == counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# Quick-mode run through the CLI
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from mlx_video.cli import main

    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out), "--label", "ci"]) == 0
    return out, json.loads((out / "bench.json").read_text())


def _timing_ok(t: dict, repeats: int = 1):
    for k in ("median_s", "min_s", "max_s", "spread", "samples_s", "cpu_utilisation"):
        assert k in t, k
    assert t["repeats"] >= repeats and t["min_s"] <= t["median_s"] <= t["max_s"] and t["median_s"] > 0


def test_quick_json_has_every_field(quick_run):
    _, r = quick_run
    assert r["schema"] == "mlx-video-bench/1" and r["mode"] == "quick"
    m = r["machine"]
    for k in ("label", "platform", "cpus", "memory_bytes", "load_avg_start", "load_avg_end"):
        assert k in m, k
    assert m["label"] == "ci"
    assert r["backend"]["dtype"] == "float32" and r["backend"]["blas"]["kind"]
    for k in ("mlx", "mlx_video", "numpy", "torch", "diffusers", "transformers"):
        assert r["versions"].get(k), k
    assert r["matmul"]["peak_flops_per_s"] > 0 and "drift_start_to_end" in r["matmul"]
    stages = {s["stage"]: s for s in r["stages"]}
    assert set(stages) == {"text_encoding", "dit_step", "denoise_4_steps", "decode", "end_to_end"}
    for name in ("text_encoding", "dit_step", "denoise_4_steps", "decode"):
        s = stages[name]
        _timing_ok(s["mlx"]["time"])
        assert s["mlx"]["achieved_flops_per_s"] > 0 and s["mlx"]["full_model_time_s"] > 0
        assert s["flops"]["full_model"] > 0 and s["method"]
        mem = s["mlx"]["memory"]
        assert mem["mlx_peak_bytes"] > 0 and mem["rss_peak_bytes"] > 0 and mem["rss_growth_bytes"] is not None
        assert s["mlx"]["predicted_peak_bytes"] > 0
    assert stages["dit_step"]["mlx"]["mfu"] > 0
    assert stages["end_to_end"]["mlx"]["full_model_time_s"] > 0
    mp = r["memory_plan"]
    assert {c["stage"] for c in mp["checks"]} >= {"text_encoding", "dit_step", "decode"}
    dev = mp["device_setting"]
    assert dev["video"] == [352, 624, 49] and dev["peak_bytes"] > 0 and isinstance(dev["met"], bool)
    assert len(dev["predicted_stage_peaks_bytes"]) == 4
    targets = {t["target"] for t in r["targets"]}
    # (the 15% predictor target is not applied to the tiny CI models; their checks are still in memory_plan)
    assert {"DiT step ratio <= 1.0", "DiT step >= 0.6 of the matmul rate", "TAEHV decode ratio <= 1.0",
            "predicted device-setting peak < 3.5 GB"} <= targets
    for c in mp["checks"]:
        assert c["predicted_bytes"] > 0 and c["measured_mlx_peak_bytes"] > 0 and "error" in c
    prof = r["profile"]
    assert prof["mlx"]["ops"] and prof["reference"]["ops"]


def test_quick_reference_comparison_ran(quick_run):
    _, r = quick_run
    stages = {s["stage"]: s for s in r["stages"]}
    for name in ("text_encoding", "dit_step", "denoise_4_steps", "decode"):
        s = stages[name]
        _timing_ok(s["reference"]["time"])
        assert s["ratio"]["median"] > 0, name
    # the two runtimes computed the same function on the benchmark inputs
    assert stages["dit_step"]["parity_rel_error"] < 1e-4
    assert stages["text_encoding"]["parity_rel_error"] < 1e-4
    assert stages["decode"]["parity_max_abs_diff"] < 1e-4
    assert r["matmul"]["torch"]["median_flops_per_s"] > 0


def test_quick_outputs_and_report(quick_run, tmp_path):
    out, _ = quick_run
    md = (out / "bench.md").read_text()
    assert "# mlx-video benchmark: ci" in md and "| stage | model | shape |" in md and "## Targets" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from benchmarks import report

    assert report.main([str(out / "bench.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.md").read_text() == md


def test_bench_cli_rejects_bad_shape(capsys):
    from mlx_video.cli import main

    assert main(["bench", "--shapes", "huge", "--no-reference"]) == 2  # a usage error, found before any work
    assert "--shapes: unknown value 'huge'" in capsys.readouterr().err
