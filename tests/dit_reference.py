"""Reference-side helpers for DiT tests: small random diffusers models and Wan-key state dicts.

The diffusers -> original-Wan key mapping here is written independently of ``converters/wan_dit.py``,
from the rename table in ``shared/reference/models.md`` §1.7 (applied like diffusers' own script).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# diffusers name fragment -> original Wan fragment (reverse of TRANSFORMER_KEYS_RENAME_DICT, norm swap included)
DIFFUSERS_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("scale_shift_table", "modulation"),
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn1.norm_q", "self_attn.norm_q"), ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"), ("attn2.norm_q", "cross_attn.norm_q"), ("attn2.norm_k", "cross_attn.norm_k"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),
    ("proj_out", "head.head"),
]


def diffusers_to_wan_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for a, b in DIFFUSERS_TO_WAN:
            new = new.replace(a, b)
        if new == "modulation":  # top-level scale_shift_table is the head's
            new = "head.modulation"
        out[new] = value
    return out


def make_diffusers_dit(heads=2, head_dim=32, ffn=128, layers=2, text_dim=32, seed=0, std=0.2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).eval()
    with torch.no_grad():  # every parameter random, norms and modulation tables included
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model


def float64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                               scale=1, max_period=10000):
    """Wan's float64 sinusoid (diffusers computes it in float32) with diffusers' signature."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = timesteps[:, None].double() * torch.exp(exponent)[None] * scale
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


def run_diffusers(model, latents_ncfhw: np.ndarray, t: float, context: np.ndarray, float64_sinusoid=True,
                  monkeypatch=None) -> np.ndarray:
    """Reference forward in float64 (and Wan's float64 sinusoid), context zero-padded to 512."""
    import diffusers.models.embeddings as emb

    if float64_sinusoid:
        monkeypatch.setattr(emb, "get_timestep_embedding", float64_timestep_embedding)
    m = model.double() if float64_sinusoid else model.float()
    ctx = torch.from_numpy(context).to(next(m.parameters()).dtype)
    ctx = torch.cat([ctx, torch.zeros(ctx.shape[0], 512 - ctx.shape[1], ctx.shape[2], dtype=ctx.dtype)], 1)
    x = torch.from_numpy(latents_ncfhw).to(ctx.dtype)
    with torch.no_grad():
        out = m(x, torch.tensor([t], dtype=torch.float64 if float64_sinusoid else torch.float32), ctx,
                return_dict=False)[0]
    model.float()
    return out.double().numpy()


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def softmax_attention_f64(q, k, v, scale):
    """Plain softmax attention in float64 NumPy over ``[..., L, D]`` inputs (MLX or NumPy arrays): the
    independent reference of the attention kernels' parity tests."""
    q, k, v = (np.array(t, np.float64) for t in (q, k, v))
    s = q @ np.swapaxes(k, -1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v
