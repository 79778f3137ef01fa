"""The DiT converter against the original-Wan key list of ``shared/reference/models.md`` §1.7, written out
here key by key (not derived from the converter's rule tables nor from ``tests/dit_reference.py``).

The semantic check is independent too: the same Wan-keyed tensors go through diffusers' own single-file
converter (``convert_wan_transformer_to_diffusers``) into ``WanTransformer3DModel``, and the two forwards
(MLX fp32 vs diffusers float64) agree to 1e-5 relative.
"""

from __future__ import annotations

import json

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters.wan_dit import convert_dit
from mlx_video.models import wan_dit
from mlx_video.utils import MLX_VIDEO_FORMAT
from tests.dit_reference import rel_error, run_diffusers


def wan_keys(dim: int, text_dim: int, ffn: int, layers: int, out_channels: int = 16) -> dict[str, tuple]:
    """§1.7's table, original Wan format, with the 1.3B sizes as parameters (1536 -> dim, 4096 -> text_dim,
    8960 -> ffn, 9216 -> 6 dim, 64 -> 4 out_channels)."""
    keys = {
        "patch_embedding.weight": (dim, 16, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, 256), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.modulation": (1, 2, dim),
        "head.head.weight": (4 * out_channels, dim), "head.head.bias": (4 * out_channels,),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        keys[b + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                keys[f"{b}{attn}.{p}.weight"], keys[f"{b}{attn}.{p}.bias"] = (dim, dim), (dim,)
            keys[f"{b}{attn}.norm_q.weight"] = keys[f"{b}{attn}.norm_k.weight"] = (dim,)
        keys[b + "norm3.weight"] = keys[b + "norm3.bias"] = (dim,)  # the cross-attention pre-norm
        keys[b + "ffn.0.weight"], keys[b + "ffn.0.bias"] = (ffn, dim), (ffn,)
        keys[b + "ffn.2.weight"], keys[b + "ffn.2.bias"] = (dim, ffn), (dim,)
    return keys


def test_the_written_out_list_is_the_825_tensors_of_wan_1_3b():
    keys = wan_keys(1536, 4096, 8960, 30)
    assert len(keys) == 825
    assert keys["time_projection.1.weight"] == (9216, 1536) and keys["head.head.weight"] == (64, 1536)
    assert sum(np.prod(s) for s in keys.values()) == pytest.approx(1.4188e9, rel=1e-3)  # Wan2.1 1.3B: 1.42B


DIM, HEADS, TEXT_DIM, FFN, LAYERS = 64, 2, 32, 128, 2


@pytest.fixture(scope="module")
def wan_state():
    torch.manual_seed(3)
    return {k: torch.randn(s) * 0.2 for k, s in wan_keys(DIM, TEXT_DIM, FFN, LAYERS).items()}


def _diffusers_from_wan(state: dict):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=DIM // HEADS, in_channels=16,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=FFN, num_layers=LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).eval()
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in state.items()})
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(".rope." in k or k.startswith("rope.") for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_converter_reads_the_wan_key_list_and_matches_diffusers(wan_state, tmp_path, monkeypatch, prefix):
    src = tmp_path / "src"
    src.mkdir()
    save_file({prefix + k: v.contiguous() for k, v in wan_state.items()}, str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": DIM, "num_heads": HEADS}))
    out = tmp_path / "m"
    out.mkdir()
    section = convert_dit(src / "diffusion_pytorch_model.safetensors", out)
    assert section["source_layout"] == "wan"
    (out / "config.json").write_text(json.dumps({"format": MLX_VIDEO_FORMAT, "dit": section}))
    model = wan_dit.load(out)
    c = model.config
    assert (c.dim, c.num_layers, c.self_attn_heads, c.ffn_dim, c.text_dim) == (DIM, LAYERS, [HEADS] * LAYERS,
                                                                               [FFN] * LAYERS, TEXT_DIM)

    rng = np.random.default_rng(5)
    latents = rng.standard_normal((1, 16, 2, 4, 6)).astype(np.float32)
    context = rng.standard_normal((1, 5, TEXT_DIM)).astype(np.float32)
    ref = run_diffusers(_diffusers_from_wan(wan_state), latents, 937.5, context, monkeypatch=monkeypatch)
    x = mx.array(np.ascontiguousarray(latents.transpose(0, 2, 3, 4, 1)))
    got = np.array(model(x, [937.5], context=mx.array(context))).transpose(0, 4, 1, 2, 3)
    assert rel_error(got, ref) <= 1e-5


def test_the_cross_attention_norm_is_norm3_not_norm2(wan_state, tmp_path, monkeypatch):
    """Wan's affine cross-attention norm is ``norm3`` (diffusers calls it norm2): a Wan file naming it
    ``norm2`` is not a Wan checkpoint and must not convert silently."""
    from converters.common import ConversionError

    bad = {k.replace(".norm3.", ".norm2."): v.contiguous() for k, v in wan_state.items()}
    save_file(bad, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match="norm2"):
        convert_dit(tmp_path / "w.safetensors", tmp_path, head_dim=DIM // HEADS)
