"""The recipe's world, scorer and training forwards (fast: no training here)."""

import subprocess
import sys

import mlx_video  # noqa: F401  (BLAS before MLX)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_video.recipe import nets, score, world


def test_world_is_deterministic_and_uses_the_fixed_vocabulary():
    a_clips, a_caps, a_scenes = world.batch(seed=3, step=5, size=4)
    b_clips, b_caps, _ = world.batch(seed=3, step=5, size=4)
    c_clips, _, _ = world.batch(seed=3, step=6, size=4)
    assert np.array_equal(a_clips, b_clips) and a_caps == b_caps
    assert not np.array_equal(a_clips, c_clips)
    assert a_clips.shape == (4, 17, 64, 64, 3) and a_clips.dtype == np.float32
    assert 0.0 <= a_clips.min() and a_clips.max() <= 1.0
    for s in a_scenes:
        assert s.shape in world.SHAPES and s.colour in world.COLOURS and s.background in world.BACKGROUNDS
        assert s.motion in world.MOTIONS and s.size in world.SIZES
    assert world.COLOURS["red"] == (220, 40, 40) and world.BACKGROUNDS["gray"] == (128, 128, 128)
    prompts = world.eval_prompts()
    attrs = [world.parse_caption(p) for p in prompts]
    combos = {(a["colour"], a["shape"], a["motion"]) for a in attrs}
    assert len(combos) == len(world.COLOURS) * len(world.SHAPES) * len(world.MOTIONS) == len(prompts)
    assert prompts[0] == "a red circle moving left on a black background"


def test_motion_crosses_at_least_40_percent_and_shapes_stay_inside():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = world.sample_scene(rng)
        travel = np.hypot(s.end[0] - s.start[0], s.end[1] - s.start[1])
        assert travel == 0 if s.motion == "still" else travel >= 0.4
        r = world.SIZE_RADIUS[s.size]
        for x, y in (s.start, s.end):
            assert r < x < 1 - r and r < y < 1 - r


def test_captions_canonical_and_paraphrased():
    s = world.Scene("circle", "red", "black", "right", "medium", (0.3, 0.5), (0.8, 0.5))
    assert world.canonical_caption(s) == "a red circle moving right on a black background"
    still = world.Scene("square", "blue", "gray", "still", "small", (0.5, 0.5), (0.5, 0.5))
    assert world.canonical_caption(still) == "a small blue square standing still on a gray background"
    assert world.parse_caption(world.canonical_caption(still))["size"] == "small"
    rng = np.random.default_rng(1)
    caps = {world.caption(s, rng) for _ in range(200)}
    assert "a red circle moves to the right" in caps and "red circle, moving right, black background" in caps
    assert set(caps) <= set(world.all_captions())
    with pytest.raises(ValueError, match="not a canonical"):
        world.parse_caption("a purple circle moving left on a black background")


def test_scorer_is_near_perfect_on_ground_truth():
    rows = []
    for i, p in enumerate(world.eval_prompts()):
        a = world.parse_caption(p)
        for size in ("small", "large"):
            scene = world.sample_scene(np.random.default_rng([i, len(size)]), shape=a["shape"], colour=a["colour"],
                                       background=a["background"], motion=a["motion"], size=size)
            predicted = score.analyse(world.render_clip(scene))
            assert predicted["background"] == a["background"]
            rows.append(score.score(predicted, a))
    acc = score.summarise(rows)
    assert acc["colour"] == 1.0 and acc["motion"] == 1.0 and acc["shape"] >= 0.98 and acc["all"] >= 0.98


def test_scorer_ignores_a_faint_background_ripple():
    """A decoder's faint background ripple (here +-0.06 per pixel) must not count as shape area: with the
    plain linear coverage it added the area of a second shape and turned circles into squares."""
    rows, rippled_ratio, clean_ratio = [], [], []
    for i, p in enumerate(world.eval_prompts()):
        a = world.parse_caption(p)
        rng = np.random.default_rng([i, 5])
        clip = world.render_clip(world.sample_scene(rng, shape=a["shape"], colour=a["colour"],
                                                    background=a["background"], motion=a["motion"]))
        ripple = rng.uniform(-0.06, 0.06, size=clip.shape[1:3] + (1,)).astype(np.float32)
        predicted = score.analyse(np.clip(clip + ripple, 0, 1))
        rows.append(score.score(predicted, a))
        rippled_ratio.append(predicted["fill_ratio"])
        clean_ratio.append(score.analyse(clip)["fill_ratio"])
    acc = score.summarise(rows)
    assert acc["shape"] >= 0.95 and acc["motion"] >= 0.95 and acc["colour"] == 1.0, acc
    assert np.median(np.abs(np.array(rippled_ratio) - clean_ratio)) < 0.05


def test_scorer_is_near_chance_on_noise():
    rng = np.random.default_rng(0)
    rows = [score.score(score.analyse(rng.uniform(size=(17, 64, 64, 3))), world.parse_caption(p))
            for p in world.eval_prompts()]
    acc, chance = score.summarise(rows), score.chance_levels()
    for k in ("colour", "shape", "motion"):
        assert acc[k] <= chance[k] + 0.15, (k, acc[k])
    assert acc["all"] <= 0.05


def test_scorer_handles_empty_frames():
    predicted = score.analyse(np.full((17, 64, 64, 3), 0.5, np.float32))
    assert predicted["colour"] is None and not score.score(predicted, world.parse_caption(world.eval_prompts()[0]))["all"]


def _perturbed(model, scale=0.2, seed=0):
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p + scale * mx.random.normal(p.shape), model.parameters()))
    return model


def test_dit_training_forward_equals_runtime():
    from mlx_video.models import wan_dit

    cfg = wan_dit.WanDiTConfig(dim=64, num_layers=2, self_attn_heads=2, cross_attn_heads=2, ffn_dim=96, head_dim=32,
                               text_dim=32, text_len=16)
    dit = _perturbed(wan_dit.WanDiT(cfg))
    x, ctx, t = mx.random.normal((2, 3, 4, 4, 16)), mx.random.normal((2, 16, 32)), [937.5, 120.0]
    ref = dit(x, t, context=ctx)
    out = nets.dit_forward(dit, x, wan_dit.sinusoidal_embedding(t, cfg.freq_dim), ctx)
    assert float(mx.abs(ref - out).max()) < 1e-4 * max(1.0, float(mx.abs(ref).max()))


def test_umt5_training_forward_equals_runtime():
    from mlx_video.models import umt5

    cfg = umt5.UMT5Config(vocab_size=50, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=12)
    enc = _perturbed(umt5.UMT5Encoder(cfg))
    ids = mx.array([[5, 7, 9, 1, 0, 0], [3, 4, 1, 0, 0, 0]])
    lengths = [4, 3]
    ref = enc(ids, lengths)
    valid = mx.arange(6)[None] < mx.array(lengths)[:, None]
    out = nets.umt5_forward(enc, ids, valid)
    assert float(mx.abs(ref - out).max()) < 1e-4 * max(1.0, float(mx.abs(ref).max()))


def test_taehv_training_forward_equals_runtime():
    from mlx_video.models import taehv

    model = taehv.TAEHV(taehv.TAEHVConfig(decoder_channels=[16, 16, 8, 8], encoder_channels=8, depth=1))
    mx.random.seed(1)
    model.update(tree_map(lambda p: p * 3.0, model.parameters()))  # O(1) activations
    frames = mx.random.uniform(shape=(1, 5, 32, 32, 3))
    z_ref, z = taehv.encode(model, frames), nets.taehv_encode(model, frames)
    assert z.shape == z_ref.shape == (1, 2, 4, 4, 16)
    assert float(mx.abs(z - z_ref).max()) < 1e-4 * max(1.0, float(mx.abs(z_ref).max()))
    lat = 3 * z_ref / max(1e-6, float(mx.abs(z_ref).max()))
    d_ref, d = taehv.decode(model, lat), nets.taehv_decode(model, lat)
    assert d.shape == d_ref.shape == (1, 5, 32, 32, 3) and float(d_ref.std()) > 1e-3
    assert float(mx.abs(d - d_ref).max()) < 1e-3  # fp32 summation order through 3x-amplified layers


def test_taehv_training_decode_passes_gradients_through_the_clip():
    """Out-of-range pixels still get a gradient (straight-through clip); the forward stays clipped."""
    from mlx_video.models import taehv

    model = taehv.TAEHV(taehv.TAEHVConfig(decoder_channels=[8, 8, 8, 8], encoder_channels=8, depth=1))
    lat = mx.random.normal((1, 1, 2, 2, 16), key=mx.random.key(0))
    bias = model.decoder[-1].bias

    def loss(b):
        model.decoder[-1].bias = b
        return mx.sum(nets.taehv_decode(model, lat))

    assert float(mx.max(nets.taehv_decode(model, lat))) <= 1.0
    g = mx.grad(loss)(bias + 5.0)  # every pixel far above 1: a plain clip gives a zero gradient here
    assert float(mx.min(g)) > 0


def test_colour_identity_init_carries_the_colour_through_the_untrained_autoencoder():
    from mlx_video.models import taehv
    from mlx_video.recipe import stages

    mx.random.seed(0)
    model = taehv.TAEHV(stages.autoencoder_config(stages.SIZES["smoke"]))
    stages.he_init(model)
    stages.colour_identity_init(model)
    scene = world.Scene("square", "red", "gray", "still", "large", (0.5, 0.5), (0.5, 0.5))
    clip = world.render_clip(scene, 8)
    z = np.array(taehv.encode(model, mx.array(clip[None])))[0]
    # latent channels 0-2: each 4-frame group's colour at pixel (8i, 8j), exactly (independent numpy reference)
    expected = clip.reshape(2, 4, 64, 64, 3).mean(axis=1)[:, ::8, ::8]
    np.testing.assert_allclose(z[..., :3], expected, atol=1e-5)
    frames = np.array(taehv.decode(model, mx.array(z[None])))[0]
    centre = frames[:, 24:40, 24:40].reshape(-1, 3).mean(0)
    assert score._nearest(centre, world.COLOURS) == "red"
    assert stages.psnr(frames, clip[:frames.shape[0]]) > 18.0


def test_runtime_never_imports_the_recipe():
    code = ("import sys, mlx_video, mlx_video.pipeline, mlx_video.generate, mlx_video.cli, mlx_video.info, "
            "mlx_video.prune, mlx_video.demo, mlx_video.sampling\n"
            "from mlx_video.models import taehv, umt5, wan_dit\n"
            "bad = [m for m in sys.modules if m.startswith('mlx_video.recipe')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # and the CLI registers the recipe commands without importing them until they run
    from mlx_video import cli

    assert cli.COMMANDS["recipe"][0] == "mlx_video.recipe.cli" and cli.COMMANDS["eval"][0] == "mlx_video.recipe.evaluate"
    assert all(not n.startswith("mlx_video.recipe") for n, _ in tree_flatten({}))  # noqa: keeps tree_flatten used


def test_caption_attributes_state_what_the_caption_says_of_its_scene():
    """The text encoder's attribute targets: every caption form of a scene states its colour and shape, its
    motion unless it is an image caption, and background and size only where the words are there."""
    rng = np.random.default_rng(2)
    seen = {name: set() for name in world.CAPTION_ATTRIBUTES}
    for _ in range(60):
        scene = world.sample_scene(rng)
        for text in world.scene_captions(scene):
            said = world.caption_attributes(text)
            assert said["colour"] == scene.colour and said["shape"] == scene.shape, text
            image = text.startswith(("an image", "a picture")) or text.endswith("photo")
            assert said["motion"] == ("unsaid" if image else scene.motion), text
            assert said["background"] in (scene.background, "unsaid") and (said["background"] == "unsaid") == (
                f"{scene.background} background" not in text), text
            assert said["size"] == (scene.size if f"{scene.size} " in text and scene.size != "medium" else "unsaid")
            for name, value in said.items():
                assert value in world.CAPTION_ATTRIBUTES[name]
                seen[name].add(value)
    assert all(len(v) == len(world.CAPTION_ATTRIBUTES[k]) for k, v in seen.items()), seen
