"""DiT parity with diffusers ``WanTransformer3DModel``, key layouts, and pruned shapes.

Tolerances (fp32 MLX vs float64 reference): max abs error / max abs output <= 1e-5.
The reference runs in float64 with Wan's float64 sinusoid (diffusers' own sinusoid is float32: at
t = 937.5 its phase error alone moves outputs by ~3e-5 relative, so against stock fp32 diffusers the
bound is 1e-4).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters.common import ConversionError
from converters.wan_dit import convert_dit
from mlx_video.models import wan_dit
from mlx_video.utils import MLX_VIDEO_FORMAT
from tests.dit_reference import diffusers_to_wan_keys, make_diffusers_dit, rel_error, run_diffusers

RNG = np.random.default_rng(0)
LATENTS = RNG.standard_normal((1, 16, 3, 6, 10)).astype(np.float32)  # 3 frames, non-square 3x5 token grid
CONTEXT = RNG.standard_normal((1, 7, 32)).astype(np.float32)  # 7 real tokens; the model pads to 512


def to_mlx_latents(x):
    return mx.array(np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1)))


def from_mlx_latents(y):
    return np.array(y).transpose(0, 4, 1, 2, 3)


def convert_to_folder(src, out, **kw):
    out.mkdir()
    section = convert_dit(src, out, **kw)
    (out / "config.json").write_text(json.dumps({"format": MLX_VIDEO_FORMAT, "dit": section}))
    return wan_dit.load(out)


@pytest.fixture(scope="module")
def diffusers_model():
    return make_diffusers_dit()


@pytest.fixture(scope="module")
def diffusers_dir(diffusers_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers")
    diffusers_model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def wan_file(diffusers_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("wan")
    state = diffusers_to_wan_keys({k: v.contiguous() for k, v in diffusers_model.state_dict().items()})
    save_file(state, str(d / "diffusion_pytorch_model.safetensors"))
    # Wan ships a config.json beside the weights; head_dim comes from dim // num_heads
    (d / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 64, "num_heads": 2, "eps": 1e-6}))
    return d / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("t", [937.5, 999.0, 0.0])
def test_parity_with_diffusers_from_diffusers_keys(diffusers_model, diffusers_dir, tmp_path, monkeypatch, t):
    model = convert_to_folder(diffusers_dir, tmp_path / "m")
    ref = run_diffusers(diffusers_model, LATENTS, t, CONTEXT, monkeypatch=monkeypatch)
    out = from_mlx_latents(model(to_mlx_latents(LATENTS), [t], context=mx.array(CONTEXT)))
    assert out.shape == ref.shape
    assert rel_error(out, ref) <= 1e-5


def test_parity_with_stock_fp32_diffusers(diffusers_model, diffusers_dir, tmp_path, monkeypatch):
    model = convert_to_folder(diffusers_dir, tmp_path / "m")
    ref = run_diffusers(diffusers_model, LATENTS, 937.5, CONTEXT, float64_sinusoid=False)
    out = from_mlx_latents(model(to_mlx_latents(LATENTS), [937.5], context=mx.array(CONTEXT)))
    assert rel_error(out, ref) <= 1e-4


def test_wan_keys_give_the_same_model(diffusers_model, wan_file, diffusers_dir, tmp_path, monkeypatch):
    from_wan = convert_to_folder(wan_file, tmp_path / "wan")
    assert json.loads((tmp_path / "wan" / "config.json").read_text())["dit"]["source_layout"] == "wan"
    ref = run_diffusers(diffusers_model, LATENTS, 937.5, CONTEXT, monkeypatch=monkeypatch)
    out = from_mlx_latents(from_wan(to_mlx_latents(LATENTS), [937.5], context=mx.array(CONTEXT)))
    assert rel_error(out, ref) <= 1e-5


def test_prepared_text_and_padding_do_not_change_outputs(diffusers_dir, tmp_path):
    model = convert_to_folder(diffusers_dir, tmp_path / "m")
    x = to_mlx_latents(LATENTS)
    a = model(x, [500.0], context=mx.array(CONTEXT))
    padded = np.concatenate([CONTEXT, np.zeros((1, 505, 32), np.float32)], 1)
    b = model(x, [500.0], text=model.prepare_text(mx.array(padded)))
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_sinusoid_matches_reference_values():
    e = np.array(wan_dit.sinusoidal_embedding([999.0], 256))[0]
    np.testing.assert_allclose(e[:4], [0.99965, 0.96378, -0.39899, 0.70482], atol=5e-5)
    np.testing.assert_allclose(e[128:132], [-0.02646, -0.26669, -0.91695, 0.70939], atol=5e-5)


def test_rope_split_is_22_21_21_at_head_dim_128():
    assert wan_dit.WanDiTConfig().rope_split() == (22, 21, 21)
    cos, _ = wan_dit.rope_tables((2, 3, 4), 128)
    assert cos.shape == (24, 1, 64)
    c = np.array(cos)[:, 0]
    # token (f=1, h=0, w=0) rotates only the 22 time pairs; (0, 1, 0) only the 21 height pairs
    assert np.allclose(c[12, 22:], 1) and not np.allclose(c[12, :22], 1)
    assert np.allclose(c[4, :22], 1) and np.allclose(c[4, 43:], 1) and not np.allclose(c[4, 22:43], 1)


def _pruned_wan_state(wide: dict, keep_heads: dict, keep_ffn: dict, head_dim: int) -> dict:
    """Physically slice heads (rows of q/k/v/norms, columns of o) and FFN channels from Wan-key tensors."""
    out = dict(wide)
    for layer, heads in keep_heads.items():
        rows = np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        for kind in ("self_attn", "cross_attn"):
            p = f"blocks.{layer}.{kind}."
            for n in ("q", "k", "v"):
                out[p + n + ".weight"] = wide[p + n + ".weight"][rows].contiguous()
                out[p + n + ".bias"] = wide[p + n + ".bias"][rows].contiguous()
            for n in ("norm_q", "norm_k"):
                out[p + n + ".weight"] = wide[p + n + ".weight"][rows].contiguous()
            out[p + "o.weight"] = wide[p + "o.weight"][:, rows].contiguous()
    for layer, channels in keep_ffn.items():
        p = f"blocks.{layer}.ffn."
        out[p + "0.weight"] = wide[p + "0.weight"][channels].contiguous()
        out[p + "0.bias"] = wide[p + "0.bias"][channels].contiguous()
        out[p + "2.weight"] = wide[p + "2.weight"][:, channels].contiguous()
    return out


def _zeroed_wan_state(wide: dict, keep_heads: dict, keep_ffn: dict, head_dim: int, heads: int, ffn: int) -> dict:
    out = {k: v.clone() for k, v in wide.items()}
    for layer, kept in keep_heads.items():
        for h in sorted(set(range(heads)) - set(kept)):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            for kind in ("self_attn", "cross_attn"):
                p = f"blocks.{layer}.{kind}."
                for n in ("q", "k", "v"):
                    out[p + n + ".weight"][rows] = 0
                    out[p + n + ".bias"][rows] = 0
                out[p + "o.weight"][:, rows] = 0
    for layer, kept in keep_ffn.items():
        drop = sorted(set(range(ffn)) - set(kept))
        out[f"blocks.{layer}.ffn.0.weight"][drop] = 0
        out[f"blocks.{layer}.ffn.0.bias"][drop] = 0
    return out


def test_masked_pruned_model_equals_zeroed_wide_model(tmp_path):
    heads, head_dim, ffn = 3, 32, 128
    wide_model = make_diffusers_dit(heads=heads, head_dim=head_dim, ffn=ffn, seed=1)
    wide = diffusers_to_wan_keys(dict(wide_model.state_dict()))
    keep_heads = {0: [0, 2], 1: [1]}  # uneven pruning: 2 heads in layer 0, 1 head in layer 1
    keep_ffn = {0: list(range(0, 128, 2)), 1: list(range(40))}
    (tmp_path / "pruned").mkdir()
    save_file(_pruned_wan_state(wide, keep_heads, keep_ffn, head_dim), str(tmp_path / "pruned" / "p.safetensors"))
    (tmp_path / "zeroed").mkdir()
    save_file(_zeroed_wan_state(wide, keep_heads, keep_ffn, head_dim, heads, ffn),
              str(tmp_path / "zeroed" / "z.safetensors"))

    pruned = convert_to_folder(tmp_path / "pruned" / "p.safetensors", tmp_path / "mp", head_dim=32, qk_norm="masked")
    zeroed = convert_to_folder(tmp_path / "zeroed" / "z.safetensors", tmp_path / "mz", head_dim=32)
    cfg = pruned.config
    assert cfg.self_attn_heads == [2, 1] and cfg.cross_attn_heads == [2, 1] and cfg.ffn_dim == [64, 40]
    assert cfg.qk_norm == "masked" and cfg.qk_norm_width == 96
    assert convert_dit(tmp_path / "pruned" / "p.safetensors", tmp_path, head_dim=32, qk_norm="masked",
                       qk_norm_width=128)["qk_norm_width"] == 128  # re-pruning a pruned model: given explicitly

    x = to_mlx_latents(LATENTS)
    a = np.array(pruned(x, [937.5], context=mx.array(CONTEXT)))
    b = np.array(zeroed(x, [937.5], context=mx.array(CONTEXT)))
    assert rel_error(a, b) <= 1e-5
    # with "kept" semantics the pruned model is a different function (the RMS denominator changes)
    kept = convert_to_folder(tmp_path / "pruned" / "p.safetensors", tmp_path / "mk", head_dim=32)
    assert rel_error(np.array(kept(x, [937.5], context=mx.array(CONTEXT))), b) > 1e-3


def test_paper_shapes_10_of_12_heads_and_ffn_4480_load_and_run(tmp_path):
    """One block at the real width: 10 heads x 128 inside 1536, FFN 4480, config inferred from shapes."""
    dim, inner, ffn, text_dim = 1536, 1280, 4480, 64
    rng = np.random.default_rng(0)

    def r(*shape):
        return torch.from_numpy((rng.standard_normal(shape) * 0.02).astype(np.float32))

    state = {"patch_embedding.weight": r(dim, 16, 1, 2, 2), "patch_embedding.bias": r(dim),
             "text_embedding.0.weight": r(dim, text_dim), "text_embedding.0.bias": r(dim),
             "text_embedding.2.weight": r(dim, dim), "text_embedding.2.bias": r(dim),
             "time_embedding.0.weight": r(dim, 256), "time_embedding.0.bias": r(dim),
             "time_embedding.2.weight": r(dim, dim), "time_embedding.2.bias": r(dim),
             "time_projection.1.weight": r(6 * dim, dim), "time_projection.1.bias": r(6 * dim),
             "head.modulation": r(1, 2, dim), "head.head.weight": r(64, dim), "head.head.bias": r(64),
             "blocks.0.modulation": r(1, 6, dim), "blocks.0.norm3.weight": r(dim), "blocks.0.norm3.bias": r(dim),
             "blocks.0.ffn.0.weight": r(ffn, dim), "blocks.0.ffn.0.bias": r(ffn),
             "blocks.0.ffn.2.weight": r(dim, ffn), "blocks.0.ffn.2.bias": r(dim)}
    for kind in ("self_attn", "cross_attn"):
        for n in "qkv":
            state[f"blocks.0.{kind}.{n}.weight"], state[f"blocks.0.{kind}.{n}.bias"] = r(inner, dim), r(inner)
        state[f"blocks.0.{kind}.o.weight"], state[f"blocks.0.{kind}.o.bias"] = r(dim, inner), r(dim)
        state[f"blocks.0.{kind}.norm_q.weight"], state[f"blocks.0.{kind}.norm_k.weight"] = r(inner), r(inner)
    save_file(state, str(tmp_path / "pruned.safetensors"))
    model = convert_to_folder(tmp_path / "pruned.safetensors", tmp_path / "m")
    c = model.config
    assert (c.dim, c.head_dim, c.self_attn_heads, c.cross_attn_heads, c.ffn_dim) == (1536, 128, [10], [10], [4480])
    assert c.text_dim == text_dim and c.rope_split() == (22, 21, 21)
    x = mx.array(rng.standard_normal((1, 2, 4, 6, 16)).astype(np.float32))
    context = rng.standard_normal((1, 3, text_dim)).astype(np.float32)
    out = np.array(model(x, [625.0], context=mx.array(context)))
    assert out.shape == (1, 2, 4, 6, 16) and np.isfinite(out).all() and out.std() > 1e-3
    # every part of the block reaches the output: another prompt, another timestep, another latent frame
    other_context = rng.standard_normal(context.shape).astype(np.float32)  # (token order alone is invisible)
    other_text = np.array(model(x, [625.0], context=mx.array(other_context)))
    other_t = np.array(model(x, [250.0], context=mx.array(context)))
    assert rel_error(other_text, out) > 1e-4 and rel_error(other_t, out) > 1e-4
    x2 = np.array(x)
    x2[:, 1] = -x2[:, 1]
    other_frame = np.array(model(mx.array(x2), [625.0], context=mx.array(context)))
    assert rel_error(other_frame[:, 0], out[:, 0]) > 1e-5  # self-attention mixes frames


def test_attention_chunking_is_exact(monkeypatch):
    from mlx_video import ops
    from mlx_video.ops import attention

    q, k, v = (mx.random.normal((1, 2, 300, 16), key=mx.random.key(i)) for i in range(3))
    full = attention(q, k, v, 0.25, budget_bytes=1 << 30, fused=False)
    rows = []  # query rows per chunk actually computed
    for name in ("_attend", "_attend_numpy_softmax"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda q_, kt, v_, f=original: rows.append(q_.shape[2]) or f(q_, kt, v_))
    budget = 2 * 300 * 4 * 3 * 7
    chunked = attention(q, k, v, 0.25, budget_bytes=budget, fused=False)  # several query chunks
    per_row = 2 * 300 * 4 * ops._score_temporaries()
    assert sum(rows) == 300 and len(rows) == -(-300 // (budget // per_row)) > 1
    assert max(rows) * per_row <= budget
    sdpa = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert np.abs(np.array(full) - np.array(chunked)).max() < 1e-6
    assert np.abs(np.array(full) - np.array(sdpa)).max() < 1e-5


def test_gelu_tanh_matches_torch():
    from mlx_video.ops import gelu_tanh

    x = np.linspace(-12, 12, 200001).astype(np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
    out = np.array(gelu_tanh(mx.array(x)))
    assert np.abs(out - ref).max() <= 2e-6 * max(1.0, 1)
    assert np.all(np.abs(out - ref) <= 1e-6 + 2e-7 * np.abs(ref))


def test_half_precision_path_stays_close_to_fp32(diffusers_dir, tmp_path):
    """bf16 matmuls with fp32 norms/modulation/residual/RoPE: close to fp32, and finite."""
    (tmp_path / "m").mkdir()
    section = convert_dit(diffusers_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"format": MLX_VIDEO_FORMAT, "dit": section}))
    fp32 = wan_dit.load(tmp_path / "m", dtype=mx.float32)
    bf16 = wan_dit.load(tmp_path / "m", dtype=mx.bfloat16)
    assert bf16.blocks[0].ffn.fc1.weight.dtype == mx.bfloat16
    assert bf16.blocks[0].modulation.dtype == mx.float32 and bf16.head.linear.weight.dtype == mx.float32
    x = to_mlx_latents(LATENTS)
    a = np.array(fp32(x, [937.5], context=mx.array(CONTEXT)))
    b = np.array(bf16(x, [937.5], context=mx.array(CONTEXT)))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert rel_error(b, a) < 5e-2


def test_config_validation():
    with pytest.raises(ValueError, match="entries for 2 layers"):
        wan_dit.WanDiTConfig(num_layers=2, ffn_dim=[1, 2, 3])
    with pytest.raises(ValueError, match="qk_norm"):
        wan_dit.WanDiTConfig(qk_norm="sometimes")
    cfg = wan_dit.lightning_video()
    assert cfg.self_attn_heads == [10] * 30 and cfg.ffn_dim == [4480] * 30


def test_wrong_latent_shapes_are_clear_errors(diffusers_dir, tmp_path):
    model = convert_to_folder(diffusers_dir, tmp_path / "m")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(mx.zeros((1, 1, 5, 6, 16)), [1.0], context=mx.zeros((1, 2, 32)))
    with pytest.raises(ValueError, match="channels"):
        model(mx.zeros((1, 1, 4, 6, 8)), [1.0], context=mx.zeros((1, 2, 32)))
    with pytest.raises(ValueError, match="at most 512"):
        model(mx.zeros((1, 1, 4, 6, 16)), [1.0], context=mx.zeros((1, 600, 32)))


def test_unknown_layout_error_names_what_it_looked_for(tmp_path):
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConversionError, match="unknown DiT checkpoint layout"):
        convert_dit(tmp_path / "x.safetensors", tmp_path)


def test_modulated_layer_norm_matches_mlx_layer_norm():
    from mlx_video.ops import modulated_layer_norm

    x = mx.random.normal((2, 333, 96), key=mx.random.key(0)) * 3 + 1
    scale, shift = mx.random.normal((2, 1, 96), key=mx.random.key(1)), mx.random.normal((2, 1, 96), key=mx.random.key(2))
    ref = mx.fast.layer_norm(x, None, None, 1e-6) * (1 + scale) + shift
    assert np.abs(np.array(modulated_layer_norm(x, 1 + scale, shift, 1e-6)) - np.array(ref)).max() < 1e-5
    w, b = mx.random.normal((96,), key=mx.random.key(3)), mx.random.normal((96,), key=mx.random.key(4))
    ref = mx.fast.layer_norm(x, w, b, 1e-6)
    assert np.abs(np.array(modulated_layer_norm(x, w, b, 1e-6)) - np.array(ref)).max() < 1e-5
