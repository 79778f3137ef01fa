"""Causal (KV-cached, block-by-block) DiT and sampler vs an independent PyTorch reference.

Tolerances (fp32 MLX vs the float64 reference in ``tests/causal_reference.py``, max abs error / max abs
reference): one pass over the blocks through the KV cache vs one full-sequence forward with the
block-causal mask <= 1e-5; the whole sampling loop with the same injected noise <= 1e-4.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlx_video import causal, sampling
from mlx_video.models import wan_dit
from tests import causal_reference as ref
from tests.dit_reference import diffusers_to_wan_keys, make_diffusers_dit, rel_error
from tests.test_wan_dit import convert_to_folder as convert
from tests.test_wan_dit import from_mlx_latents as from_mlx
from tests.test_wan_dit import to_mlx_latents

RNG = np.random.default_rng(0)
CONTEXT = RNG.standard_normal((1, 5, 32)).astype(np.float32)
H, W = 4, 6  # latent pixels: a non-square 2x3 token grid per frame


def to_mlx(x):
    return to_mlx_latents(np.asarray(x, np.float32))


@pytest.fixture(scope="module")
def torch_model():
    return make_diffusers_dit()


@pytest.fixture(scope="module")
def mlx_model(torch_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("dit")
    torch_model.save_pretrained(d)
    return convert(d, tmp_path_factory.mktemp("m") / "m")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A diffusers model whose layer 1 keeps 1 of 2 heads (self and cross): heads differ per layer."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    model = make_diffusers_dit(seed=3)
    blk = model.blocks[1]
    torch.manual_seed(4)
    blk.attn1 = WanAttention(dim=64, heads=1, dim_head=32, eps=1e-6, processor=WanAttnProcessor())
    blk.attn2 = WanAttention(dim=64, heads=1, dim_head=32, eps=1e-6, cross_attention_dim_head=32,
                             processor=WanAttnProcessor())
    with torch.no_grad():
        for p in list(blk.attn1.parameters()) + list(blk.attn2.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp("pruned")
    state = diffusers_to_wan_keys({k: v.contiguous() for k, v in model.state_dict().items()})
    save_file(state, str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps({"attention_head_dim": 32}))
    mlx = convert(d / "diffusion_pytorch_model.safetensors", tmp_path_factory.mktemp("pm") / "m")
    assert mlx.config.self_attn_heads == [2, 1] and mlx.config.cross_attn_heads == [2, 1]
    return model, mlx


def mlx_cached_pass(model, latents, t_frames, fpb, window=-1, sink=0):
    """Each block forwarded once through the MLX KV cache."""
    f = latents.shape[2]
    cache = causal.KVCache(len(model.blocks), (H // 2) * (W // 2), window if window > 0 else f, sink, window > 0)
    text = model.prepare_text(mx.array(CONTEXT))
    outs = []
    for s in range(0, f, fpb):
        cache.begin(s)
        outs.append(model(to_mlx(latents[:, :, s:s + fpb]), t_frames[:, s:s + fpb].tolist(), text=text,
                          kv_cache=cache.layers, start_frame=s))
    return from_mlx(mx.concatenate(outs, axis=1)), cache


CASES = [  # frames, frames per block, window, sink (windowed cases evict: see test_window_actually_evicts)
    (9, 3, -1, 0), (4, 1, -1, 0), (8, 2, 5, 1), (9, 3, 6, 3), (7, 1, 3, 1),
]


@pytest.mark.parametrize("frames,fpb,window,sink", CASES)
def test_kv_cache_equals_block_causal_mask(torch_model, mlx_model, frames, fpb, window, sink):
    latents = RNG.standard_normal((1, 16, frames, H, W))
    t_frames = RNG.uniform(0, 1000, (1, frames))  # a different timestep per frame
    expected = ref.full_masked_forward(torch_model, latents, t_frames, CONTEXT, fpb, window, sink)
    # the reference's own cache agrees with its mask (checks the reference, not the port)
    assert rel_error(ref.cached_block_forwards(torch_model, latents, t_frames, CONTEXT, fpb, window, sink),
                     expected) <= 1e-12
    out, _ = mlx_cached_pass(mlx_model, latents, t_frames, fpb, window, sink)
    assert rel_error(out, expected) <= 1e-5


def test_window_actually_evicts(torch_model):
    """The windowed mask differs from the unwindowed one (so the windowed cases test eviction)."""
    latents, t = RNG.standard_normal((1, 16, 8, H, W)), np.full((1, 8), 500.0)
    a = ref.full_masked_forward(torch_model, latents, t, CONTEXT, 2, 5, 1)
    b = ref.full_masked_forward(torch_model, latents, t, CONTEXT, 2)
    assert rel_error(a[:, :, :4], b[:, :, :4]) <= 1e-12 and rel_error(a[:, :, 6:], b[:, :, 6:]) > 1e-3


def test_pruned_model_kv_cache_equals_mask(pruned):
    torch_model, mlx = pruned
    latents, t = RNG.standard_normal((1, 16, 6, H, W)), RNG.uniform(0, 1000, (1, 6))
    expected = ref.full_masked_forward(torch_model, latents, t, CONTEXT, 3)
    out, cache = mlx_cached_pass(mlx, latents, t, 3)
    assert rel_error(out, expected) <= 1e-5
    assert [k.shape[1] for k in cache.k] == [2, 1]  # heads per layer in the cache layout


def reference_noise(frames, fpb, steps, seed=1):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((1, 16, frames, H, W)).astype(np.float32)
    renoise = [[rng.standard_normal((1, 16, fpb, H, W)).astype(np.float32) for _ in range(steps - 1)]
               for _ in range(frames // fpb)]
    return noise, renoise


@pytest.mark.parametrize("preset,frames,window", [("self-forcing", 6, None), ("causvid-ar", 6, None),
                                                  ("causal-forcing-framewise", 3, None), ("self-forcing", 9, (6, 3)),
                                                  ("causal-forcing-framewise-2step", 3, None)])
def test_causal_loop_matches_reference(torch_model, mlx_model, preset, frames, window):
    section = causal.preset_section(preset)
    cfg = sampling.sampler_config(section)
    ccfg = causal.causal_config(section)
    if window:
        ccfg = causal.CausalConfig(frames_per_block=3, local_attn_frames=window[0], sink_frames=window[1])
    fpb = ccfg.frames_per_block
    noise, renoise = reference_noise(frames, fpb, max(cfg.steps, len(ccfg.first_block_steps or [])))
    expected = ref.causal_loop(torch_model, noise, CONTEXT, section["denoising_step_list"], section["shift"],
                               section["warp"], renoise, fpb, window=window[0] if window else -1,
                               sink=window[1] if window else 0, first_step_list=ccfg.first_block_steps)
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    injected = [[to_mlx(e) for e in blk] for blk in renoise]
    out = causal.causal_sample(mlx_model, text, to_mlx(noise), cfg, ccfg, renoise=injected)
    assert rel_error(from_mlx(out), expected) <= 1e-4


def test_presets_give_the_documented_timesteps():
    sf = sampling.schedule(sampling.sampler_config(causal.preset_section("self-forcing")))
    np.testing.assert_allclose(sf.timesteps, [1000, 937.5, 833.3333, 625.0], atol=1e-3)
    cv = sampling.schedule(sampling.sampler_config(causal.preset_section("causvid-ar")))
    assert cv.timesteps == [1000.0, 757.0, 522.0]
    np.testing.assert_allclose(cv.sigmas[:3], [1.0, 0.7567567, 0.5217391], atol=1e-6)
    assert causal.preset_section("longlive")["causal"]["local_attn_frames"] == 12


def test_repeated_steps_overwrite_the_same_slots(mlx_model):
    """Block 0 run twice (another input, then the real one) leaves the cache as one run with the real input."""
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    a, b = to_mlx(RNG.standard_normal((1, 16, 3, H, W))), to_mlx(RNG.standard_normal((1, 16, 3, H, W)))

    def run(inputs):
        cache = causal.KVCache(2, 6, 6)
        for x in inputs:
            cache.begin(0)
            mlx_model(x, [[900.0] * 3], text=text, kv_cache=cache.layers)
        return cache

    twice, once = run([a, b]), run([b])
    assert twice.global_end == once.global_end == [18, 18] and twice.local_end == [18, 18]
    for k2, k1 in zip(twice.k + twice.v, once.k + once.v):
        np.testing.assert_array_equal(np.array(k2), np.array(k1))
    assert not np.allclose(np.array(run([a]).k[0][:, :, :18]), np.array(once.k[0][:, :, :18]))


def test_clean_pass_writes_clean_kv(mlx_model):
    """After block 0 the cache holds the K/V of its clean output at t = context_noise, not the last step's."""
    section = causal.preset_section("self-forcing")
    cfg, ccfg = sampling.sampler_config(section), causal.causal_config(section)
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    noise = to_mlx(RNG.standard_normal((1, 16, 6, H, W)))
    cache = causal.KVCache(2, 6, 21)
    blocks = list(causal.causal_blocks(mlx_model, text, noise, cfg, ccfg, key=0, cache=cache))
    clean = causal.KVCache(2, 6, 21)
    clean.begin(0)
    mlx_model(blocks[0], [[0.0] * 3], text=text, kv_cache=clean.layers)
    for got, want in zip(cache.k + cache.v, clean.k + clean.v):
        np.testing.assert_allclose(np.array(got[:, :, :18]), np.array(want[:, :, :18]), rtol=0, atol=1e-6)
    noisy = causal.KVCache(2, 6, 21)
    noisy.begin(0)
    mlx_model(blocks[0], [[625.0] * 3], text=text, kv_cache=noisy.layers)
    assert not np.allclose(np.array(noisy.k[0][:, :, :18]), np.array(cache.k[0][:, :, :18]), atol=1e-3)


def test_rope_time_offset():
    cos, sin = wan_dit.rope_tables((3, 2, 3), 32, 10000.0, 4)
    full_cos, full_sin = wan_dit.rope_tables((7, 2, 3), 32)
    np.testing.assert_array_equal(np.array(cos), np.array(full_cos)[4 * 6:])
    np.testing.assert_array_equal(np.array(sin), np.array(full_sin)[4 * 6:])


def test_same_seed_same_video_and_fresh_noise_per_step(mlx_model):
    section = causal.preset_section("self-forcing")
    cfg, ccfg = sampling.sampler_config(section), causal.causal_config(section)
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    noise = sampling.latent_noise((1, 3, H, W, 16), 0)
    a = causal.causal_sample(mlx_model, text, noise, cfg, ccfg, key=7)
    b = causal.causal_sample(mlx_model, text, noise, cfg, ccfg, key=7)
    c = causal.causal_sample(mlx_model, text, noise, cfg, ccfg, key=8)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert not np.allclose(np.array(a), np.array(c))


def test_bad_frame_counts_are_clear_errors(mlx_model):
    section = causal.preset_section("self-forcing")
    cfg, ccfg = sampling.sampler_config(section), causal.causal_config(section)
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    with pytest.raises(ValueError, match="do not split into blocks of 3"):
        next(causal.causal_blocks(mlx_model, text, mx.zeros((1, 4, H, W, 16)), cfg, ccfg, key=0))
    with pytest.raises(ValueError, match="exceed this model's KV cache of 21 frames"):
        next(causal.causal_blocks(mlx_model, text, mx.zeros((1, 24, H, W, 16)), cfg, ccfg, key=0))
    with pytest.raises(ValueError, match="must hold the sink"):
        causal.CausalConfig(frames_per_block=3, local_attn_frames=4, sink_frames=3)
    with pytest.raises(ValueError, match="unknown causal preset"):
        causal.preset_section("rolling-forcing-typo")
    with pytest.raises(ValueError, match="re-noises"):
        next(causal.causal_blocks(mlx_model, text, mx.zeros((1, 3, H, W, 16)), cfg, ccfg))


def test_windowed_memory_does_not_grow_with_length(mlx_model):
    """MLX peak working set (peak minus what was live before) for 21 vs 42 latent frames, window 6 + sink 3."""
    ccfg = causal.CausalConfig(frames_per_block=3, local_attn_frames=6, sink_frames=3, max_frames=None)
    cfg = sampling.sampler_config(causal.preset_section("self-forcing"))
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    peaks = []
    for frames in (6, 21, 42):  # the first run is a warm-up (one-time allocations)
        noise = mx.zeros((1, frames, 8, 8, 16))
        mx.eval(noise)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        stats = {}
        for _ in causal.causal_blocks(mlx_model, text, noise, cfg, ccfg, key=0, stats=stats):
            pass
        peaks.append(mx.get_peak_memory() - base)
        print("causal windowed peak working set", frames, "latent frames:", peaks[-1], "bytes")
        # fixed size: 2 layers x (K, V) x 2 heads x (6 frames x 16 tokens) x head_dim 32 x fp32
        assert stats["kv_cache_bytes"] == 2 * 2 * 2 * (6 * 16) * 32 * 4
    assert abs(peaks[2] - peaks[1]) <= 0.05 * peaks[1], peaks
