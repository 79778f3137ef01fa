"""Causal (KV-cached, block-by-block) DiT and sampler vs an independent PyTorch reference.

Tolerances (fp32 MLX vs the float64 reference in ``tests/causal_reference.py``, max abs error / max abs
reference): one pass over the blocks through the KV cache vs one full-sequence forward with the
block-causal mask <= 1e-5; the whole sampling loop with the same injected noise <= 1e-4.
"""

from __future__ import annotations

import gc
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
    print(f"causal loop {preset} {frames} {window}: rel error {rel_error(from_mlx(out), expected):.1e}")
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


WINDOWED = {  # a window + sink (LongLive's cache rules) and Rolling Forcing's fixed cache, at small sizes
    "longlive": (causal.CausalConfig(frames_per_block=3, local_attn_frames=6, sink_frames=3, max_frames=None,
                                     family="longlive"), "self-forcing", 2 * 2 * 2 * (6 * 16) * 32 * 4),
    "rolling-forcing": (causal.CausalConfig(frames_per_block=3, max_frames=None, family="rolling-forcing",
                                            window_blocks=5), "rolling-forcing", 2 * 2 * 2 * (24 * 16) * 32 * 4),
}


@pytest.mark.parametrize("name", list(WINDOWED))
def test_windowed_memory_does_not_grow_with_length(mlx_model, name):
    """MLX peak working set (peak minus what was live before) for 21 vs 42 latent frames, within 5%: with a
    window the KV cache has a fixed size (the first run is a warm-up for one-time allocations)."""
    ccfg, preset, cache_bytes = WINDOWED[name]
    cfg = sampling.sampler_config(causal.preset_section(preset))
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    peaks = []
    for frames in (15, 21, 42):
        noise = mx.zeros((1, frames, 8, 8, 16))
        mx.eval(noise)
        gc.collect()  # arrays of earlier tests freed mid-run would lower the peak below `base` + working set
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        stats = {}
        for x in causal.causal_blocks(mlx_model, text, noise, cfg, ccfg, key=0, stats=stats):
            mx.eval(x)
        peaks.append(mx.get_peak_memory() - base)
        print(f"causal {name} peak working set", frames, "latent frames:", peaks[-1], "bytes")
        # fixed size: 2 layers x (K, V) x 2 heads x (cache frames x 16 tokens) x head_dim 32 x fp32
        assert stats["kv_cache_bytes"] == cache_bytes == causal.cache_bytes(mlx_model.config, noise.shape, ccfg, 4)
    assert abs(peaks[2] - peaks[1]) <= 0.05 * peaks[1], peaks


def test_memory_plan_cache_sizes_at_the_paper_shape():
    """Self-Forcing's cache at 480x832 (21 frames of 1560 tokens, 30 layers x 12 heads x 128, bf16): 6.04 GB, as
    checkpoints.md §1 states (~6.0 GB); LongLive's 12-frame window and Rolling Forcing's 24 frames likewise, for
    any length."""
    cfg = wan_dit.wan2_1_1_3b()
    per_frame = 30 * 2 * 1560 * 12 * 128 * 2
    sf, ll, rf = (causal.causal_config(causal.preset_section(n))
                  for n in ("self-forcing", "longlive", "rolling-forcing"))
    assert causal.cache_bytes(cfg, (1, 21, 60, 104, 16), sf, 2) == 21 * per_frame == 6_038_323_200
    for frames in (21, 84, 240):
        assert causal.cache_bytes(cfg, (1, frames, 60, 104, 16), ll, 2) == 12 * per_frame
        assert causal.cache_bytes(cfg, (1, frames, 60, 104, 16), rf, 2) == 24 * per_frame
    lightning = wan_dit.lightning_video()  # 10 of 12 heads: the cache shrinks with the heads
    assert causal.cache_bytes(lightning, (1, 21, 60, 104, 16), sf, 2) == 21 * per_frame * 10 // 12
    # the planned peak of a windowed run does not depend on the length; Rolling Forcing's query is its window
    assert causal.causal_peak_bytes(cfg, (1, 84, 60, 104, 16), 0, 1 << 28, ll, 2) == \
        causal.causal_peak_bytes(cfg, (1, 240, 60, 104, 16), 0, 1 << 28, ll, 2)
    assert rf.query_frames == 15 and ll.query_frames == 3 and rf.attention_frames(126) == 21


# --------------------------------------------------------------------------------------------------
# LongLive prompt switching with KV re-caching, and Rolling Forcing, vs the PyTorch reference (<= 1e-4)
# --------------------------------------------------------------------------------------------------

CONTEXTS = [RNG.standard_normal((1, 7, 32)).astype(np.float32) for _ in range(2)]  # the later prompts


@pytest.mark.parametrize("frames,window,switch_latents,family", [
    (12, (6, 3), [2, 7], "longlive"),  # block 1: re-cache from frame 0 (sink rewritten); block 3: sink kept
    (12, (6, 3), [6], "longlive"),  # a full window re-cached (frames 0-5, starting at frame 0)
    (9, None, [4], "self-forcing"),  # no window: every earlier frame re-cached
])
def test_prompt_switch_recache_matches_reference(torch_model, mlx_model, frames, window, switch_latents, family):
    section = causal.preset_section("self-forcing")
    cfg = sampling.sampler_config(section)
    win = dict(local_attn_frames=window[0], sink_frames=window[1], max_frames=None) if window else {}
    ccfg = causal.CausalConfig(frames_per_block=3, family=family, **win)
    noise, renoise = reference_noise(frames, 3, cfg.steps, seed=5)
    contexts = CONTEXTS[:len(switch_latents)]
    expected = ref.causal_loop(torch_model, noise, CONTEXT, section["denoising_step_list"], section["shift"],
                               section["warp"], renoise, 3, window=window[0] if window else -1,
                               sink=window[1] if window else 0, switch_frames=switch_latents, contexts=contexts,
                               longlive=family == "longlive")
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    blocks = [-(-s // 3) for s in switch_latents]  # the first block starting at or after each switch
    switches = {blk: mlx_model.prepare_text(mx.array(c)) for blk, c in zip(blocks, contexts)}
    injected = [[to_mlx(e) for e in blk] for blk in renoise]
    out = causal.causal_sample(mlx_model, text, to_mlx(noise), cfg, ccfg, renoise=injected, switches=switches)
    print(f"prompt switch {family} {frames} {window} {switch_latents}: rel error "
          f"{rel_error(from_mlx(out), expected):.1e}")
    assert rel_error(from_mlx(out), expected) <= 1e-4
    # the switch changes the video from its first block on, and only from there
    plain = ref.causal_loop(torch_model, noise, CONTEXT, section["denoising_step_list"], section["shift"],
                            section["warp"], renoise, 3, window=window[0] if window else -1,
                            sink=window[1] if window else 0, longlive=family == "longlive")
    first = blocks[0] * 3
    assert rel_error(expected[:, :, :first], plain[:, :, :first]) <= 1e-12
    assert rel_error(expected[:, :, first:], plain[:, :, first:]) > 1e-3


def test_recache_rewrites_the_window_and_keeps_the_sink(mlx_model):
    """A switch before block 3 (window 6, sink 3): the re-cache recomputes frames 3-8 under the new prompt and
    writes frames 6-8 (slots 3-5); LongLive's recompute rule leaves the sink's K/V exactly as they were."""
    cfg = sampling.sampler_config(causal.preset_section("self-forcing"))
    ccfg = causal.CausalConfig(frames_per_block=3, local_attn_frames=6, sink_frames=3, max_frames=None,
                               family="longlive")
    text, new = (mlx_model.prepare_text(mx.array(c)) for c in (CONTEXT, CONTEXTS[0]))
    noise = to_mlx(RNG.standard_normal((1, 16, 9, H, W)))
    cache = causal.KVCache(2, 6, 6, 3, True, protect_sink=True)
    clean = causal.causal_sample(mlx_model, text, noise, cfg, ccfg, key=1, cache=cache)
    cache.begin(6)  # block 2's clean pass (skipped after a video's last block): frames 0-2 (sink) and 6-8
    mlx_model(clean[:, 6:], [[0.0] * 3], text=text, kv_cache=cache.layers, start_frame=6)
    before = [(np.array(k), np.array(v)) for k, v in zip(cache.k, cache.v)]
    causal.recache(mlx_model, cache, clean, 9, new, ccfg)
    assert cache.global_end == [54, 54] and cache.local_end == [36, 36]  # indices unchanged
    for layer, (k0, v0) in enumerate(before):
        np.testing.assert_array_equal(np.array(cache.k[layer])[:, :, :18], k0[:, :, :18])
        np.testing.assert_array_equal(np.array(cache.v[layer])[:, :, :18], v0[:, :, :18])
    # layer 0's K/V come before any cross-attention (same clean input, same t): unchanged; layer 1's see the prompt
    np.testing.assert_allclose(np.array(cache.k[0])[:, :, 18:36], before[0][0][:, :, 18:36], atol=1e-5)
    assert not np.allclose(np.array(cache.k[1])[:, :, 18:36], before[1][0][:, :, 18:36], atol=1e-3)


def test_prompt_schedule_errors():
    c = causal.CausalConfig(frames_per_block=3, local_attn_frames=12, sink_frames=3, max_frames=None, family="longlive")
    assert c.switch_blocks([40, 61], 97) == [4, 6]  # video 40 -> latent 10 -> block 4 (latent 12); 61 -> 16 -> 6
    assert causal.block_first_video_frame(4, 3) == 45
    for frames, match in (([0], "out of range"), ([97], "out of range"), ([41, 40], "does not come after"),
                          ([90], "after the video's last block"), ([37, 41], "fall into the same block"),
                          ([True], "out of range")):
        with pytest.raises(ValueError, match=match):
            c.switch_blocks(frames, 97)
    rf = causal.causal_config(causal.preset_section("rolling-forcing"))
    with pytest.raises(ValueError, match="Rolling Forcing denoises overlapping windows"):
        rf.switch_blocks([40], 97)


@pytest.mark.parametrize("frames,fpb,steps,cache_frames,attention_frames", [
    (30, 3, None, 24, 21),  # the preset: 5 steps, 10 blocks: the cache evicts at blocks 8 and 9
    (9, 1, [1000, 750, 500], 6, 5),  # frame-wise, 3 steps: refreshes that drop block 0, a 1-frame working cache
])
def test_rolling_forcing_matches_reference(torch_model, mlx_model, frames, fpb, steps, cache_frames, attention_frames):
    section = causal.preset_section("rolling-forcing")
    if steps:
        section = dict(section, denoising_step_list=steps)
    cfg = sampling.sampler_config(section)
    ccfg = causal.CausalConfig(frames_per_block=fpb, max_frames=None, family="rolling-forcing",
                               window_blocks=cfg.steps, rolling_cache_frames=cache_frames,
                               rolling_attention_frames=attention_frames)
    noise, renoise = reference_noise(frames, fpb, cfg.steps, seed=9)
    expected = ref.rolling_loop(torch_model, noise, CONTEXT, section["denoising_step_list"], section["shift"],
                                section["warp"], renoise, fpb, cache_frames=cache_frames,
                                attention_frames=attention_frames)
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    injected = [[to_mlx(e) for e in blk] for blk in renoise]
    blocks = list(causal.causal_blocks(mlx_model, text, to_mlx(noise), cfg, ccfg, renoise=injected))
    assert len(blocks) == frames // fpb
    err = rel_error(from_mlx(mx.concatenate(blocks, axis=1)), expected)
    print(f"rolling forcing {frames} frames, {fpb}/block, {cfg.steps} steps: rel error {err:.1e}")
    assert err <= 1e-4


def test_rolling_forcing_preset_and_bad_lengths(mlx_model):
    section = causal.preset_section("rolling-forcing")
    np.testing.assert_allclose(sampling.schedule(sampling.sampler_config(section)).timesteps,
                               [1000, 952.381, 882.353, 769.231, 555.556], atol=1e-3)
    ccfg = causal.causal_config(section)
    assert ccfg.family == "rolling-forcing" and ccfg.window_blocks == 5 and ccfg.cache_frames(126) == 24
    text = mlx_model.prepare_text(mx.array(CONTEXT))
    cfg = sampling.sampler_config(section)
    with pytest.raises(ValueError, match="fewer than Rolling Forcing's window of 5 blocks"):
        next(causal.causal_blocks(mlx_model, text, mx.zeros((1, 12, H, W, 16)), cfg, ccfg, key=0))
    with pytest.raises(ValueError, match="1024 absolute RoPE positions"):
        ccfg.check_frames(1026)


def test_bench_causal_stage_quick(tmp_path):
    """`mlx-video bench --stages causal` (tiny): each preset timed beside the PyTorch causal loop on the same
    weights and draws (same output to fp32 rounding), time to first block, fps, KV cache, and the plan table."""
    from mlx_video.cli import main as cli

    out = tmp_path / "bench"
    assert cli(["bench", "--quick", "--stages", "causal", "--out", str(out), "--label", "ci"]) == 0
    results = json.loads((out / "bench.json").read_text())
    rows = [s for s in results["stages"] if s["stage"] == "causal"]
    assert [s["preset"] for s in rows] == ["self-forcing", "longlive", "rolling-forcing"]
    for s in rows:
        assert s["parity_rel_error"] <= 1e-4
        for side in ("mlx", "reference"):
            assert 0 < s[side]["time_to_first_block_s"] <= s[side]["full_model_time_s"] * 1.5
            assert s[side]["video_fps"] > 0
        assert s["mlx"]["kv_cache_bytes"] > 0 and s["mlx"]["memory"]["mlx_peak_bytes"] > s["mlx"]["kv_cache_bytes"]
    plan = {(p["preset"], p["latent_frames"]): p for p in results["causal_plan"]}
    assert "refused" in plan[("self-forcing", 84)]
    assert plan[("longlive", 21)]["kv_cache_bytes"] == plan[("longlive", 84)]["kv_cache_bytes"]
    assert "## Causal (block-by-block) generation" in (out / "bench.md").read_text()
