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


def project_qkv(attn, hidden_states):
    """diffusers ``WanAttention``'s normalised q, k and v, split into heads ``[B, L, H, D]`` (before RoPE)."""
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    return q, k, attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))


class CachedSelfAttention:
    """[SF] ``CausalWanSelfAttention`` kv-cache branch, one layer; ``state`` holds the block position."""

    def __init__(self, state: dict):
        self.state = state
        self.k = self.v = None
        self.global_end = self.local_end = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        q, k, v = project_qkv(attn, hidden_states)
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
        write = local_start
        # [LL] v1.0 CausalWanSelfAttention: is_recompute = current_end <= global_end and current_start > 0 writes
        # from max(local_start, sink_tokens) (global_sink true); SF has no such rule
        if st.get("longlive") and current_end <= self.global_end and current_start > 0:
            write = max(local_start, sink)
        self.k[:, write:local_end] = k[:, write - local_start:]
        self.v[:, write:local_end] = v[:, write - local_start:]
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


@contextmanager
def model_in(model, processors, dtype=torch.float64):
    """float64 (parity: :func:`float64_model`), or the model as it is with swapped processors (benchmarks:
    float32, diffusers' own sinusoid)."""
    if dtype == torch.float64:
        with float64_model(model, processors) as m:
            yield m
        return
    saved = [blk.attn1.processor for blk in model.blocks]
    try:
        for blk, p in zip(model.blocks, processors):
            blk.attn1.processor = p
        with torch.no_grad():
            yield model
    finally:
        for blk, p in zip(model.blocks, saved):
            blk.attn1.processor = p


def _pad_context(context: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    ctx = torch.from_numpy(np.asarray(context, np.float64)).to(dtype)
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
                max_frames: int = 21, first_step_list=None, switch_frames=(), contexts=(),
                longlive: bool = False, dtype=torch.float64, on_block=None) -> np.ndarray:
    """[SF] ``CausalInferencePipeline.inference`` (T2V): ``renoise[block][step - 1]`` NCFHW arrays;
    ``first_step_list``: [CF]'s ``denoising_step_list_first_chunk`` for block 0.

    ``switch_frames``/``contexts``: [LL] ``InteractiveCausalInferencePipeline.inference`` (v1.0,
    checkpoints.md §3.3): ``switch_frame_indices`` in latent frames and the prompt of each later segment. When a
    block starts at or after the next switch frame: one forward at ``context_noise`` over the last
    ``min(window, current_start)`` clean output frames (all of them without a window) with the new prompt at
    their own start, through the cache (no mask), then the new prompt for every later forward.
    ``dtype``/``on_block(block)``: for benchmarks (float32; a callback after each finished block)."""
    b, _, f, h, w = noise.shape
    assert f % frames_per_block == 0 and len(switch_frames) == len(contexts)
    later = fewstep_schedule(step_list, shift, warp)
    first = fewstep_schedule(first_step_list, shift, warp) if first_step_list else later
    state = dict(rope=model.rope, frames=frames_per_block, h=h // 2, w=w // 2, start_frame=0, sink=sink,
                 window=window, cache_frames=window if window > 0 else max_frames, longlive=longlive)
    tokens = state["h"] * state["w"]
    output = []
    segment = 0
    with model_in(model, [CachedSelfAttention(state) for _ in model.blocks], dtype) as m:
        ctx = _pad_context(context, dtype)
        for blk, s in enumerate(range(0, f, frames_per_block)):
            if segment < len(switch_frames) and s >= switch_frames[segment]:
                ctx = _pad_context(contexts[segment], dtype)
                segment += 1
                if s > 0:  # _recache_after_switch
                    n = s if window <= 0 else min(window, s)
                    state["start_frame"], state["frames"] = s - n, n
                    m(torch.cat(output, dim=2)[:, :, -n:], torch.full((b, n * tokens), context_noise,
                                                                      dtype=dtype), ctx, return_dict=False)
                    state["frames"] = frames_per_block
            state["start_frame"] = s
            x = torch.from_numpy(np.asarray(noise[:, :, s:s + frames_per_block], np.float64)).to(dtype)
            timesteps, sigmas = first if blk == 0 else later
            for i, t in enumerate(timesteps):
                v = m(x, torch.full((b, frames_per_block * tokens), t, dtype=dtype), ctx, return_dict=False)[0]
                x0 = x - sigmas[i] * v
                if i < len(timesteps) - 1:
                    eps = torch.from_numpy(np.asarray(renoise[blk][i], np.float64)).to(dtype)
                    x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
                else:
                    x = x0
            output.append(x)
            if on_block is not None:
                on_block(blk)
            if s + frames_per_block < f:  # (upstream also refreshes after the last block: it changes nothing)
                m(x, torch.full((b, frames_per_block * tokens), context_noise, dtype=dtype), ctx,
                  return_dict=False)
    return torch.cat(output, dim=2).double().numpy()


# --------------------------------------------------------------------------------------------------
# Rolling Forcing ([RF] TencentARC/RollingForcing a1477d0, checkpoints.md §3.2)
# --------------------------------------------------------------------------------------------------

class RollingCachedSelfAttention(CachedSelfAttention):
    """[RF] ``CausalWanSelfAttention`` kv branch, one layer: only the forward's first block is cached (slot end
    ``current_start + block``), block 0 stored un-roped and kept as a one-block sink on eviction. Same cache
    state as the Self-Forcing layer; its own ``__call__``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        q, k, v = project_qkv(attn, hidden_states)
        frame_tokens, fpb = st["h"] * st["w"], st["fpb"]
        block = fpb * frame_tokens
        start_frame = st["start_frame"]
        cos, sin = rotary(st["rope"], st["frames"], st["h"], st["w"], start_frame)
        rq, rk = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        def rope_block(keys, at):
            c, s = rotary(st["rope"], fpb, st["h"], st["w"], at)
            return apply_rotary(keys, c, s)

        cap, max_att, sink = st["cache_frames"] * frame_tokens, st["attention_frames"] * frame_tokens, block
        if self.k is None:
            self.k = torch.zeros(k.shape[0], cap, *k.shape[2:], dtype=k.dtype)
            self.v = torch.zeros_like(self.k)
        cache_end = start_frame * frame_tokens + block
        new = cache_end - self.global_end
        if new > 0 and new + self.local_end > cap:
            evicted = new + self.local_end - cap
            rolled = self.local_end - evicted - sink
            self.k[:, sink:sink + rolled] = self.k[:, sink + evicted:sink + evicted + rolled].clone()
            self.v[:, sink:sink + rolled] = self.v[:, sink + evicted:sink + evicted + rolled].clone()
            local_end = self.local_end + cache_end - self.global_end - evicted
            local_start = local_end - block
            self.k[:, local_start:local_end] = rk[:, :block]
        else:
            local_end = self.local_end + cache_end - self.global_end
            local_start = local_end - block
            self.k[:, local_start:local_end] = (k if local_start == 0 else rk)[:, :block]  # block 0 un-roped
        self.v[:, local_start:local_end] = v[:, :block]
        if new > 0:
            self.global_end, self.local_end = cache_end, local_end
        if local_start == 0:
            keys, values = rk, v
        elif st["updating"]:
            lo = max(0, local_end - max_att)
            keys, values = self.k[:, lo:local_end].clone(), self.v[:, lo:local_end]
            if lo == 0:
                keys[:, :block] = rope_block(keys[:, :block], 0)
        else:
            working_max = max_att - rq.shape[1] - block
            lo = max(block, local_start - working_max)
            working_k, working_v = self.k[:, lo:local_start], self.v[:, lo:local_start]
            anchor = rope_block(self.k[:, :block], start_frame - working_k.shape[1] // frame_tokens - fpb)
            keys = torch.cat([anchor, working_k, rk], dim=1)
            values = torch.cat([self.v[:, :block], working_v, v], dim=1)
        out = F.scaled_dot_product_attention(rq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def rolling_loop(model, noise: np.ndarray, context: np.ndarray, step_list, shift: float, warp: bool, renoise,
                 frames_per_block: int = 3, context_noise: float = 0.0, cache_frames: int = 24,
                 attention_frames: int = 21, dtype=torch.float64, on_block=None) -> np.ndarray:
    """[RF] ``CausalInferencePipeline.inference_rolling_forcing`` (T2V): ``renoise[block][level]`` NCFHW arrays,
    the fresh noise that takes block ``block`` from level ``level`` to ``level + 1`` (0 = the noisiest)."""
    b, _, f, h, w = noise.shape
    fpb = frames_per_block
    nb = f // fpb
    timesteps, sigmas = fewstep_schedule(step_list, shift, warp)
    steps = len(timesteps)
    # shared_timestep: oldest block at the last (least noisy) step, newest at the first
    shared = torch.tensor([t for t in reversed(timesteps) for _ in range(fpb)], dtype=torch.float64)[None]
    level_of = {round(t, 4): i for i, t in enumerate(timesteps)}
    state = dict(rope=model.rope, frames=fpb, fpb=fpb, h=h // 2, w=w // 2, start_frame=0, updating=False,
                 cache_frames=cache_frames, attention_frames=attention_frames)
    tokens = state["h"] * state["w"]
    noise_t = torch.from_numpy(np.asarray(noise, np.float64)).to(dtype)
    noisy_cache = torch.zeros_like(noise_t)
    output = torch.zeros_like(noise_t)
    with model_in(model, [RollingCachedSelfAttention(state) for _ in model.blocks], dtype) as m:
        ctx = _pad_context(context, dtype)
        for win in range(nb + steps - 1):
            start_block, end_block = max(0, win - steps + 1), min(nb - 1, win)
            s, e = start_block * fpb, (end_block + 1) * fpb
            n = e - s
            if n == steps * fpb or s == 0:
                x = torch.cat([noisy_cache[:, :, s:e - fpb], noise_t[:, :, e - fpb:e]], dim=2)
            else:
                x = noisy_cache[:, :, s:e]
            if n == steps * fpb:
                t = shared
            elif s == 0:
                t = shared[:, -n:]
            elif e == f:
                t = shared[:, :n]
            else:
                raise AssertionError("window neither full, first nor last")
            state.update(start_frame=s, frames=n, updating=False)
            v = m(x, t.repeat_interleave(tokens, dim=1).to(dtype), ctx, return_dict=False)[0]
            sig = torch.tensor([sigmas[level_of[round(float(tt), 4)]] for tt in t[0]], dtype=dtype)
            x0 = x - sig[None, None, :, None, None] * v  # per-frame sigma lookup of the wrapper
            output[:, :, s:e] = x0
            for blk in range(start_block, end_block + 1):
                j = blk - start_block
                level = level_of[round(float(t[0, j * fpb:(j + 1) * fpb].mean()), 4)]
                if level == steps - 1:
                    continue
                eps = torch.from_numpy(np.asarray(renoise[blk][level], np.float64)).to(dtype)
                x0_blk = x0[:, :, j * fpb:(j + 1) * fpb]
                noisy_cache[:, :, blk * fpb:(blk + 1) * fpb] = (1 - sigmas[level + 1]) * x0_blk + sigmas[level + 1] * eps
            if on_block is not None and (n == steps * fpb or s > 0):
                on_block(start_block)  # the window's first block is final
            if win < nb + steps - 2:  # clean refresh of the window's first block (after the last: changes nothing)
                state.update(frames=fpb, updating=True)
                m(x0[:, :, :fpb], torch.full((b, fpb * tokens), context_noise, dtype=dtype), ctx,
                  return_dict=False)
    return output.double().numpy()
