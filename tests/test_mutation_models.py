"""Model maths the native CPU kernels normally stand in for (issue 19: survivors of the mutation run of
``models/wan_dit.py``): the MLX/NumPy paths run on GPUs and where the native build is missing, so they are checked
here with the native kernels off, against float64 formulas written here."""

from __future__ import annotations

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.utils
import numpy as np

from mlx_video import native
from mlx_video.models import wan_dit


def test_rope_mlx_path_rotates_adjacent_pairs(monkeypatch):
    monkeypatch.setattr(native, "enabled", lambda: False)
    rng = np.random.default_rng(0)
    b, l, h, d = 2, 5, 3, 8
    x = rng.standard_normal((b, l, h, d)).astype(np.float32)
    angles = rng.uniform(-3, 3, (l, d // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    out = wan_dit.apply_rope(mx.array(x).astype(mx.bfloat16), mx.array(cos)[None, :, None], mx.array(sin)[None, :, None])
    assert out.dtype == mx.float32 and out.shape == (b, l, h, d)
    xb = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32), np.float64)
    re, im = xb[..., 0::2], xb[..., 1::2]
    c, s = cos[None, :, None].astype(np.float64), sin[None, :, None].astype(np.float64)
    ref = np.stack([re * c - im * s, re * s + im * c], -1).reshape(b, l, h, d)
    assert np.abs(np.array(out) - ref).max() < 1e-5


def test_ffn_token_chunks_keep_the_hidden_activation_within_the_budget(monkeypatch):
    """Bug caught: the FFN chunk sized from the model width instead of the hidden width (chunks several times
    the budget); chunked and whole results equal (float64 reference)."""
    rng = np.random.default_rng(1)
    dim, hidden, tokens = 16, 96, 50
    ffn = wan_dit.FeedForward(dim, hidden)
    ffn.fc1.weight, ffn.fc1.bias = (mx.array(rng.standard_normal(s).astype(np.float32) * 0.3) for s in ((hidden, dim), (hidden,)))
    ffn.fc2.weight, ffn.fc2.bias = (mx.array(rng.standard_normal(s).astype(np.float32) * 0.3) for s in ((dim, hidden), (dim,)))
    rows = []
    original = wan_dit.linear
    monkeypatch.setattr(wan_dit, "linear", lambda layer, x: (rows.append(x.shape[1]) if layer is ffn.fc1 else None)
                        or original(layer, x))
    x = rng.standard_normal((1, tokens, dim)).astype(np.float32)
    budget = hidden * 4 * 2 * 7  # the [tokens, hidden] fp32 activation and its GELU: 7 tokens fit
    out = np.array(ffn(mx.array(x), budget=budget))
    assert rows == [7] * 7 + [1]
    w1, b1, w2, b2 = (np.array(a, np.float64) for a in (ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias))
    hpre = x.astype(np.float64) @ w1.T + b1
    g = 0.5 * hpre * (1 + np.tanh(np.sqrt(2 / np.pi) * (hpre + 0.044715 * hpre**3)))
    assert np.abs(out - (g @ w2.T + b2)).max() < 1e-4


def test_per_frame_timesteps_that_agree_equal_one_timestep_and_each_frame_gets_its_own():
    """Per-frame timesteps (the causal presets): all frames at one t equal the scalar-t call; changing one
    frame's t changes that frame's velocity most. Bug caught: the per-frame modulation reshaped without its
    six rows."""
    mx.random.seed(3)
    model = wan_dit.WanDiT(wan_dit.WanDiTConfig(dim=32, num_layers=2, self_attn_heads=2, cross_attn_heads=2,
                                                ffn_dim=48, head_dim=16, text_dim=24, text_len=8, freq_dim=32))
    model.update(mlx.utils.tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.parameters()))
    frames = 3
    x = mx.random.normal((1, frames, 4, 6, model.config.in_channels))
    ctx = mx.random.normal((1, 5, model.config.text_dim))
    one = np.array(model(x, [700.0], context=ctx))
    same = np.array(model(x, [[700.0] * frames], context=ctx))
    assert np.abs(same - one).max() < 1e-5 * np.abs(one).max()
    mixed = np.array(model(x, [[700.0, 700.0, 100.0]], context=ctx))
    change = np.abs(mixed - one).reshape(frames, -1).mean(axis=1)
    assert change[2] > 0 and change[2] == change.max()


def test_taehv_mlx_upconv_equals_upsample_then_conv_in_float64(monkeypatch):
    """The MLX sub-pixel upconv (GPUs, and the CPU without the native build) against nearest x2 upsampling then
    a 3x3 convolution, both written here in float64. Bug caught: a phase's folded kernel lost."""
    from mlx_video.models import taehv

    monkeypatch.setattr(native, "enabled", lambda: False)
    rng = np.random.default_rng(5)
    layer = taehv.Conv(3, 4)
    layer.weight = mx.array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    layer.bias = mx.array(rng.standard_normal(4).astype(np.float32))
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    out = np.array(taehv.upconv_forward(layer, mx.array(x)))
    up = np.repeat(np.repeat(x.astype(np.float64), 2, axis=1), 2, axis=2)
    pad = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = np.array(layer.weight, np.float64)
    ref = np.zeros((2, 10, 12, 4)) + np.array(layer.bias, np.float64)
    for i in range(3):
        for j in range(3):
            ref += pad[:, i:i + 10, j:j + 12] @ w[:, i, j].T
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4


def test_taehv_errors_name_the_field_and_the_shape():
    """Bugs caught: the config error without the field's name, the encoder's shape error without the shape."""
    import pytest

    from mlx_video.models import taehv

    with pytest.raises(ValueError, match=r"depth must be >= 1, got 0"):
        taehv.TAEHVConfig(depth=0)
    model = taehv.TAEHV(taehv.TAEHVConfig(decoder_channels=(8, 8, 8, 8), encoder_channels=8, has_encoder=True))
    with pytest.raises(ValueError, match=r"got \(1, 8, 8, 3\)"):
        taehv.encode(model, mx.zeros((1, 8, 8, 3)))


def test_taehv_planner_counts_a_lone_upsample_as_its_input_and_output():
    """An x2 upsample that no 3x3 conv follows (so it cannot fold into an upconv) holds its input and the 4x
    output at once; the planner says so and passes the grown size on. Bug caught: the figure dropped."""
    from mlx_video.models import taehv

    n, h, w, c = 1, 4, 6, 3
    peak, kept, shape = taehv._ops_peak([(0, "up", taehv.Upsample(2))], n, h, w, c, keep_all=False)
    assert (peak, kept, shape) == (n * h * w * c * (1 + 4), 0, (n, 2 * h, 2 * w, c))


def _umt5_folder(tmp_path, rename: dict | None = None, section_extra: dict | None = None, drop: str | None = None):
    import json

    from mlx.utils import tree_flatten

    from mlx_video.models import umt5
    from mlx_video.utils import config_to_dict

    cfg = umt5.UMT5Config(vocab_size=40, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=1, text_len=8)
    weights = dict(tree_flatten(umt5.UMT5Encoder(cfg).parameters()))
    for old, new in (rename or {}).items():
        weights[new] = weights.pop(old)
    weights.pop(drop, None)
    mx.save_safetensors(str(tmp_path / "text_encoder.safetensors"), weights)
    section = {**config_to_dict(cfg), "weights_file": "text_encoder.safetensors", "dtype": "float32",
               **(section_extra or {})}
    (tmp_path / "config.json").write_text(json.dumps({"format": "mlx-video/1", "text_encoder": section}))
    return tmp_path


def test_umt5_load_keeps_the_recorded_fingerprint_and_names_the_file_and_keys(tmp_path):
    """Bugs caught: the fingerprint recorded at conversion ignored (the prompt cache then keyed on file stats),
    the weights-mismatch error without the file's path, an empty part added to that error."""
    import pytest

    from mlx_video.models import umt5
    from mlx_video.utils import ModelFolderError

    for name in ("recorded", "unrecorded", "bad", "short"):
        (tmp_path / name).mkdir()
    recorded = _umt5_folder(tmp_path / "recorded", section_extra={"fingerprint": "sha256:recorded"})
    assert umt5.load(recorded).fingerprint == "sha256:recorded"
    assert umt5.load(_umt5_folder(tmp_path / "unrecorded")).fingerprint.startswith("stat:")  # the file's stats
    bad = _umt5_folder(tmp_path / "bad", rename={"norm.weight": "final_norm.weight"})
    with pytest.raises(ModelFolderError) as info:
        umt5.load(bad)
    assert str(info.value) == (f"{bad / 'text_encoder.safetensors'}: weights do not match the config "
                               f"(missing: ['norm.weight']; unexpected: ['final_norm.weight'])")
    short = _umt5_folder(tmp_path / "short", drop="norm.weight")
    with pytest.raises(ModelFolderError) as info:
        umt5.load(short)
    assert str(info.value).endswith("weights do not match the config (missing: ['norm.weight'])")


def test_umt5_attention_chunks_are_sized_from_the_key_length(monkeypatch):
    """Bug caught: the chunk computed from the head width instead of the number of keys."""
    from mlx_video.models import umt5

    seen = []
    original = umt5.attention_chunk_size
    monkeypatch.setattr(umt5, "attention_chunk_size", lambda b, h, kv, budget: seen.append(kv) or original(b, h, kv, budget))
    rt = umt5.default_runtime(None)
    q = k = v = mx.zeros((1, 2, 11, 4))
    umt5._chunked_attention(q, k, v, lambda s, e: mx.zeros((2, e - s, 11)), None, rt)
    assert seen == [11]


def test_umt5_peak_counts_a_resident_quantized_embedding():
    """A resident INT4 embedding table adds its packed weights and its scales and biases (fp16) to the
    predicted peak. Bug caught: subtracted instead."""
    from mlx_video.models import umt5
    from mlx_video.utils import config_to_dict

    cfg = config_to_dict(umt5.UMT5Config(vocab_size=512, dim=64, dim_attn=64, dim_ffn=96, num_heads=2, num_layers=1,
                                         text_len=8, quantization={"bits": 4, "group_size": 32, "embedding": True}))
    lazy = umt5.text_encoder_peak_bytes(cfg, 8, lazy_embedding=True)
    resident = umt5.text_encoder_peak_bytes(cfg, 8, lazy_embedding=False)
    assert resident - lazy == 512 * 64 * 4 // 8 + 2 * 512 * (64 // 32) * 2


def test_wan_vae_segments_upsample_exactly_to_the_spatial_scale_and_refusals_state_the_budget():
    """Decoder segments end in a x2 upsample or none (x1), together the VAE's spatial scale; a decode that fits
    no tiling is refused with its budget in MiB. Bugs caught: a segment without an upsample counted x2, the
    budget printed in the wrong unit."""
    import math

    import pytest

    from mlx_video.models import wan_vae
    from tests.test_wan_vae import reduced_config

    config = reduced_config(has_encoder=False)
    segs = wan_vae.decoder_segments(wan_vae.WanVAE(config))
    assert {s.scale for s in segs} <= {1, 2} and math.prod(s.scale for s in segs) == config.space_scale
    with pytest.raises(MemoryError, match=r"does not fit 3 MiB: whole frames need \d+ MiB"):
        wan_vae.choose_tile(config, (1, 3, 64, 64, config.z_dim), 3 * 2**20)
