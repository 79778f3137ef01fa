"""Independent PyTorch reference for causal (block-by-block, KV-cached) Wan generation.

Written from ``shared/reference/checkpoints.md`` §0-§1 and §3.3 ([SF] ``pipeline/causal_inference.py``,
``wan/modules/causal_model.py``) around diffusers' ``WanTransformer3DModel`` (its blocks, embeddings and
head run unchanged; only the self-attention processor is swapped), in float64 with Wan's float64 sinusoid:

- :func:`full_masked_forward`: one full-sequence forward with per-frame timesteps and an explicit
  block-causal (optionally windowed) self-attention mask.
- :func:`causal_loop`: the Self-Forcing inference loop with a manual KV cache (keys after RoPE at the
  block's absolute frame offset, [SF]'s global/local index rules, sink-preserving eviction), the
  few-step schedule and sigma lookup re-derived here, and injected re-noising draws.
Nothing here imports ``mlx_video``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from tests.dit_reference import float64_timestep_embedding


# --------------------------------------------------------------------------------------------------
# Schedule ([SF] utils/scheduler.py FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True))
# --------------------------------------------------------------------------------------------------

def fewstep_schedule(step_list, shift: float, warp: bool):
    """(timesteps fed to the DiT, sigma of each) as float32 values, per checkpoints.md §0 / models.md §5.3."""
    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    table_t = sigmas * 1000
    steps = [s for s in step_list if s != 0]
    if warp:
        ext = torch.cat([table_t, torch.zeros(1)])
        t = ext[1000 - torch.tensor(steps, dtype=torch.long)]
    else:
        t = torch.tensor(steps, dtype=torch.float32)
    idx = torch.argmin((table_t[None, :].double() - t[:, None].double()).abs(), dim=1)
    return [float(v) for v in t], [float(sigmas[i]) for i in idx]


# --------------------------------------------------------------------------------------------------
# Masks and RoPE
# --------------------------------------------------------------------------------------------------

def block_causal_mask(frames: int, frame_tokens: int, frames_per_block: int, window: int = -1,
                      sink: int = 0) -> torch.Tensor:
    """Bool ``[L, L]`` (True = attend): a query in block b sees frames before the end e of its block; with a
    window of ``window`` frames, once e > window only the sink frames plus the latest ``window - sink``."""
    f = torch.arange(frames)
    end = (f // frames_per_block + 1) * frames_per_block  # end frame of each query frame's block
    q_end, kv = end[:, None], f[None, :]
    allowed = kv < q_end
    if window > 0:
        recent = kv >= q_end - (window - sink)
        allowed = allowed & ((q_end <= window) | (kv < sink) | recent)
    return allowed.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)


def rotary(rope, frames: int, h: int, w: int, start_frame: int = 0):
    """diffusers ``WanRotaryPosEmbed`` tables with the time index starting at ``start_frame``."""
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t, hh, ww = table.split(split, dim=1)
        parts = [t[start_frame:start_frame + frames].view(frames, 1, 1, -1).expand(frames, h, w, -1),
                 hh[:h].view(1, h, 1, -1).expand(frames, h, w, -1),
                 ww[:w].view(1, 1, w, -1).expand(frames, h, w, -1)]
        out.append(torch.cat(parts, dim=-1).reshape(1, frames * h * w, 1, -1))
    return out


def apply_rotary(x, cos, sin):
    """Interleaved pairs (2i, 2i+1), diffusers' ``apply_rotary_emb``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


# --------------------------------------------------------------------------------------------------
# Processors swapped into attn1
# --------------------------------------------------------------------------------------------------

class MaskedSelfAttention:
    def __init__(self, mask):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.mask, self.inner = mask, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, None, self.mask, rotary_emb)


class CachedSelfAttention:
    """[SF] ``CausalWanSelfAttention`` kv-cache branch, one layer; ``state`` holds the block position."""

    def __init__(self, state: dict):
        self.state = state
        self.k = self.v = None
        self.global_end = self.local_end = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = rotary(st["rope"], st["frames"], st["h"], st["w"], st["start_frame"])
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        frame_tokens = st["h"] * st["w"]
        cap, sink = st["cache_frames"] * frame_tokens, st["sink"] * frame_tokens
        if self.k is None:
            self.k = torch.zeros(k.shape[0], cap, *k.shape[2:], dtype=k.dtype)
            self.v = torch.zeros_like(self.k)
        n = k.shape[1]
        current_start = st["start_frame"] * frame_tokens
        current_end = current_start + n
        if st["window"] > 0 and current_end > self.global_end and n + self.local_end > cap:
            evict = n + self.local_end - cap
            rolled = self.local_end - evict - sink
            self.k[:, sink:sink + rolled] = self.k[:, sink + evict:sink + evict + rolled].clone()
            self.v[:, sink:sink + rolled] = self.v[:, sink + evict:sink + evict + rolled].clone()
            local_end = self.local_end + current_end - self.global_end - evict
        else:
            local_end = self.local_end + current_end - self.global_end
        local_start = local_end - n
        self.k[:, local_start:local_end] = k
        self.v[:, local_start:local_end] = v
        lo = max(0, local_end - cap)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[:, lo:local_end].transpose(1, 2),
                                             self.v[:, lo:local_end].transpose(1, 2))
        self.global_end, self.local_end = current_end, local_end
        out = out.transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def float64_model(model, processors=None):
    """The model in float64 with Wan's float64 sinusoid and (optionally) swapped attn1 processors."""
    import diffusers.models.embeddings as emb

    saved_fn = emb.get_timestep_embedding
    saved = [blk.attn1.processor for blk in model.blocks]
    emb.get_timestep_embedding = float64_timestep_embedding
    model.double()
    try:
        if processors is not None:
            for blk, p in zip(model.blocks, processors):
                blk.attn1.processor = p
        with torch.no_grad():
            yield model
    finally:
        for blk, p in zip(model.blocks, saved):
            blk.attn1.processor = p
        model.float()
        emb.get_timestep_embedding = saved_fn


def _pad_context(context: np.ndarray) -> torch.Tensor:
    ctx = torch.from_numpy(np.asarray(context, np.float64))
    return torch.cat([ctx, torch.zeros(ctx.shape[0], 512 - ctx.shape[1], ctx.shape[2], dtype=ctx.dtype)], 1)


def _per_token_t(t_frames, frame_tokens: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(t_frames, np.float64)).repeat_interleave(frame_tokens, dim=1)


# --------------------------------------------------------------------------------------------------
# Entry points (latents NCFHW numpy, float64 results)
# --------------------------------------------------------------------------------------------------

def full_masked_forward(model, latents: np.ndarray, t_frames, context: np.ndarray, frames_per_block: int,
                        window: int = -1, sink: int = 0) -> np.ndarray:
    b, _, f, h, w = latents.shape
    tokens = (h // 2) * (w // 2)
    mask = block_causal_mask(f, tokens, frames_per_block, window, sink)
    with float64_model(model, [MaskedSelfAttention(mask) for _ in model.blocks]) as m:
        out = m(torch.from_numpy(np.asarray(latents, np.float64)), _per_token_t(t_frames, tokens),
                _pad_context(context), return_dict=False)[0]
    return out.numpy()


def cached_block_forwards(model, latents: np.ndarray, t_frames, context: np.ndarray, frames_per_block: int,
                          window: int = -1, sink: int = 0) -> np.ndarray:
    """Each block forwarded once, in order, through the manual cache (the KV-cache counterpart of
    :func:`full_masked_forward`)."""
    b, _, f, h, w = latents.shape
    state = dict(rope=model.rope, frames=frames_per_block, h=h // 2, w=w // 2, start_frame=0, sink=sink,
                 window=window, cache_frames=window if window > 0 else f)
    outs = []
    with float64_model(model, [CachedSelfAttention(state) for _ in model.blocks]) as m:
        ctx = _pad_context(context)
        t_frames = np.asarray(t_frames, np.float64)
        for s in range(0, f, frames_per_block):
            state["start_frame"] = s
            x = torch.from_numpy(np.asarray(latents[:, :, s:s + frames_per_block], np.float64))
            t = _per_token_t(t_frames[:, s:s + frames_per_block], state["h"] * state["w"])
            outs.append(m(x, t, ctx, return_dict=False)[0])
    return torch.cat(outs, dim=2).numpy()


def causal_loop(model, noise: np.ndarray, context: np.ndarray, step_list, shift: float, warp: bool,
                renoise, frames_per_block: int = 3, context_noise: float = 0.0, window: int = -1, sink: int = 0,
                max_frames: int = 21, first_step_list=None) -> np.ndarray:
    """[SF] ``CausalInferencePipeline.inference`` (T2V): ``renoise[block][step - 1]`` NCFHW arrays;
    ``first_step_list``: [CF]'s ``denoising_step_list_first_chunk`` for block 0."""
    b, _, f, h, w = noise.shape
    assert f % frames_per_block == 0
    later = fewstep_schedule(step_list, shift, warp)
    first = fewstep_schedule(first_step_list, shift, warp) if first_step_list else later
    state = dict(rope=model.rope, frames=frames_per_block, h=h // 2, w=w // 2, start_frame=0, sink=sink,
                 window=window, cache_frames=window if window > 0 else max_frames)
    tokens = state["h"] * state["w"]
    output = []
    with float64_model(model, [CachedSelfAttention(state) for _ in model.blocks]) as m:
        ctx = _pad_context(context)
        for blk, s in enumerate(range(0, f, frames_per_block)):
            state["start_frame"] = s
            x = torch.from_numpy(np.asarray(noise[:, :, s:s + frames_per_block], np.float64))
            timesteps, sigmas = first if blk == 0 else later
            for i, t in enumerate(timesteps):
                v = m(x, torch.full((b, frames_per_block * tokens), t, dtype=torch.float64), ctx, return_dict=False)[0]
                x0 = x - sigmas[i] * v
                if i < len(timesteps) - 1:
                    eps = torch.from_numpy(np.asarray(renoise[blk][i], np.float64))
                    x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
                else:
                    x = x0
            output.append(x)
            m(x, torch.full((b, frames_per_block * tokens), context_noise, dtype=torch.float64), ctx,
              return_dict=False)
    return torch.cat(output, dim=2).numpy()
