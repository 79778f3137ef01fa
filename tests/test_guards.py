"""Guards that plausible one-line bugs used to slip past (issue 19): fail-closed checks, memory planning,
pipeline wiring, output pixels, atomic replacement and INT4 settings.

Each test names the bug it catches. Reference values are computed here independently (a manual CFG loop,
decoding the latents directly, exact chunk arithmetic), never read back from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_video import ops, pipeline, sampling, video
from mlx_video.models import taehv, umt5, wan_dit
from mlx_video.utils import config_from_dict
from mlx_video.video import GenerationFailed, VideoWriter, check_finite, read_video, write_video
from tests.dit_reference import softmax_attention_f64
from tests.model_factory import build_model_folder

MB = 1024**2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The small converted model folder of ``tests/model_factory.py`` (DiT, INT4 UMT5, TAEHV).

    ``MLX_VIDEO_TEST_MODEL`` names a folder to build it in once and reuse across runs (mutation runs set it;
    the runtime under test then only loads the folder)."""
    # built once per session (the test_mutation_* modules import this fixture too)
    cached = Path(os.environ.get("MLX_VIDEO_TEST_MODEL") or tmp_path_factory.getbasetemp() / "guards-model")
    folder = cached / "model"
    if not (folder / "config.json").exists():
        shutil.rmtree(cached, ignore_errors=True)
        build_model_folder(cached)
    return folder


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize("as_mlx", [True, False])
def test_a_single_nan_or_inf_fails_the_finite_check(as_mlx):
    """Bug caught: a check that fires only when *every* value is non-finite (``all`` for ``any``)."""
    wrap = mx.array if as_mlx else np.asarray
    x = np.ones((2, 3, 4, 5), np.float32)
    check_finite(wrap(x), "denoise")  # all finite: no error
    x[1, 2, 3, 4] = np.nan
    with pytest.raises(GenerationFailed) as info:
        check_finite(wrap(x), "denoise")
    assert info.value.stage == "denoise"
    assert info.value.details["nan"] == 1 and info.value.details["inf"] == 0
    assert info.value.details["size"] == x.size and info.value.details["shape"] == list(x.shape)
    x[1, 2, 3, 4] = 1.0
    x[0, 0, 0, 0], x[0, 1, 0, 0] = np.inf, -np.inf
    with pytest.raises(GenerationFailed) as info:
        check_finite(wrap(x), "decode")
    assert info.value.details["nan"] == 0 and info.value.details["inf"] == 2
    check_finite(wrap(np.arange(6)), "decode")  # integers are never non-finite


def test_one_black_frame_does_not_fail_the_video_but_an_all_black_one_does(tmp_path):
    """Bug caught: the black-video check looking at the darkest frame instead of all frames."""
    rng = np.random.default_rng(0)
    frames = rng.uniform(0.2, 0.8, (5, 16, 24, 3)).astype(np.float32)
    frames[2] = 0.0  # a fade-through-black frame is a valid video
    out = write_video(tmp_path / "fade", frames)
    np.testing.assert_array_equal(read_video(out), np.round(frames * 255).astype(np.uint8))
    stats = video.FrameStats()
    stats.update(frames)
    assert stats.problem() is None
    dark = np.full((5, 16, 24, 3), 0.5 / 255, np.float32)
    dark[3, 0, 0] = 0.9 / 255  # not constant, but every frame mean is below the black threshold
    with pytest.raises(GenerationFailed, match="black"):
        write_video(tmp_path / "dark.gif", dark)
    assert not (tmp_path / "dark.gif").exists()
    # Thresholds at their boundaries: a frame mean of exactly the threshold is not black.
    edge = np.zeros((1, 8, 8, 3), np.float32)
    edge[0, :4] = 2 * video.BLACK_THRESHOLD  # mean == BLACK_THRESHOLD, range 2/255 > constant threshold
    s = video.FrameStats()
    s.update(edge)
    assert s.problem() is None
    s = video.FrameStats()
    s.update(np.full((3, 8, 8, 3), 0.5, np.float32))
    assert s.problem() == "video is a constant color"
    assert video.FrameStats().problem() == "no frames were written"


# ---------------------------------------------------------------------------------------- memory plan


def test_attention_chunk_size_counts_every_factor_of_the_score_buffer():
    """Bugs caught: chunk rows computed without the head count / batch / key length / dtype size."""
    per_row = lambda b, h, k, item=4: b * h * k * item * ops._score_temporaries()  # noqa: E731
    for b, h, k, item in [(1, 4, 50, 4), (2, 3, 70, 4), (1, 12, 333, 2)]:
        budget = per_row(b, h, k, item) * 7 + per_row(b, h, k, item) // 2
        chunk = ops.attention_chunk_size(b, h, k, budget, itemsize=item)
        assert chunk == 7, (b, h, k, item, chunk)
        assert chunk * per_row(b, h, k, item) <= budget < (chunk + 1) * per_row(b, h, k, item)
    # Four times the heads: a quarter of the rows.
    assert ops.attention_chunk_size(1, 1, 50, per_row(1, 4, 50) * 7) == 28
    assert ops.attention_chunk_size(1, 64, 512, 1) == 1  # never zero rows
    # The predicted working set is that of one chunk, never more than the budget once chunking happens.
    budget = per_row(1, 4, 50) * 7
    peak = lambda lq: ops.attention_peak_bytes(1, 4, lq, 50, budget, native=False)  # noqa: E731 (chunked path)
    assert peak(30) == 7 * per_row(1, 4, 50) <= budget
    assert peak(5) == 5 * per_row(1, 4, 50)  # fewer rows than a chunk


def test_attention_really_runs_in_chunks_within_the_budget(monkeypatch):
    """Bug caught: chunking that never happens (one big score matrix) or chunks larger than the budget."""
    b, h, lq, lk, d = 1, 4, 30, 50, 8
    q, k, v = (mx.random.normal((b, h, n, d), key=mx.random.key(i)) for i, n in enumerate((lq, lk, lk)))
    budget = b * h * lk * 4 * ops._score_temporaries() * 7  # room for 7 query rows
    calls = []
    for name in ("_attend", "_attend_numpy_softmax"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda q_, kt, v_, f=original: calls.append(q_.shape) or f(q_, kt, v_))
    chunked = ops.attention(q, k, v, 0.3, budget_bytes=budget, fused=False)
    assert [c[2] for c in calls] == [7, 7, 7, 7, 2]
    assert all(math.prod(c[:3]) * lk * 4 * ops._score_temporaries() <= budget for c in calls)
    calls.clear()
    whole = ops.attention(q, k, v, 0.3, budget_bytes=1 << 30, fused=False)
    assert [c[2] for c in calls] == [lq]
    # both equal plain softmax attention computed here in float64
    qn, kn, vn = (np.array(a, np.float64) for a in (q, k, v))
    s = qn @ kn.swapaxes(-1, -2) * 0.3
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ vn
    assert np.abs(np.array(chunked) - ref).max() < 1e-5
    assert np.abs(np.array(whole) - ref).max() < 1e-5


def test_dit_uses_its_attention_budget_everywhere(monkeypatch):
    """Bug caught: blocks that call attention with the default budget instead of the planned one."""
    cfg = wan_dit.WanDiTConfig(dim=64, num_layers=2, self_attn_heads=2, cross_attn_heads=2, ffn_dim=96,
                               head_dim=32, text_dim=16)
    dit = wan_dit.WanDiT(cfg)
    dit.attention_budget = 3 * MB + 5
    seen = []
    original = wan_dit.attention
    monkeypatch.setattr(wan_dit, "attention", lambda *a, budget_bytes, **k: seen.append(budget_bytes) or
                        original(*a, budget_bytes=budget_bytes, **k))
    mx.eval(dit(mx.random.normal((1, 1, 4, 6, 16)), [500.0], context=mx.random.normal((1, 3, 16))))
    assert len(seen) == 2 * cfg.num_layers and set(seen) == {3 * MB + 5}


def test_plan_budget_fractions(model):
    """Bugs caught: the attention or decoder share of the limit changed (e.g. fourfold), floors and caps."""
    req = pipeline.GenerationRequest(prompt="x", height=64, width=96, frames=5)
    budget = lambda limit, low: pipeline.plan_memory(model, req, limit, low).attention_budget_bytes  # noqa: E731
    assert budget(1024 * MB, False) == 128 * MB  # limit / 8
    assert budget(1024 * MB, True) == 64 * MB  # limit / 16 in low-memory mode
    assert budget(128 * MB, True) == 16 * MB  # floor
    assert budget(64 * 1024 * MB, False) == 2048 * MB  # cap
    # The decoder gets a quarter of the limit (an eighth with --low-memory), at least 64 MB; at the size
    # found here the small decoder needs tiles in 64 MB but not in 128 MB, so the tile shows the share used.
    big, tiled = _tiling_request(model)
    assert pipeline.plan_memory(model, big, 512 * MB, False).decoder_tile is None  # 128 MB for the decoder
    assert pipeline.plan_memory(model, big, 512 * MB, True).decoder_tile == tiled  # 64 MB
    assert pipeline.plan_memory(model, big, 256 * MB, False).decoder_tile == tiled  # 64 MB (the floor)
    assert pipeline.plan_memory(model, big, 128 * MB, False).decoder_tile == tiled  # 64 MB (the floor)


def _tiling_request(model) -> tuple[pipeline.GenerationRequest, tuple]:
    """The smallest one-frame request whose decode needs tiles within 64 MB but not within 128 MB (the
    decoder's memory model is analytic: this scan costs milliseconds)."""
    cfg = config_from_dict(taehv.TAEHVConfig, json.loads((model / "config.json").read_text())["decoder"])
    for h in range(32, 129, 2):
        req = pipeline.GenerationRequest(prompt="a red fox running through snow", height=8 * h,
                                         width=16 * round(h * 0.875), frames=1, seed=11)
        try:
            tiled = taehv.choose_tile(cfg, req.latent_shape(), 64 * MB)
        except MemoryError:
            continue
        if tiled is not None and taehv.choose_tile(cfg, req.latent_shape(), 128 * MB) is None:
            return req, tiled
    raise AssertionError("no request size needs decoder tiles in 64 MB but not in 128 MB")


@pytest.fixture(scope="module")
def tiled_run(model, tmp_path_factory):
    """One frame generated under a limit that makes the plan tile the decoder (PNG output: lossless), with
    the tiles the decoder was called with and the attention budgets the DiT used."""
    out = tmp_path_factory.mktemp("tiled") / "frames"
    tiles, budgets = [], []
    original_stream, original_attention = taehv.decode_stream, wan_dit.attention
    taehv.decode_stream = lambda m, z, tile=None, **k: tiles.append(tile) or original_stream(m, z, tile=tile, **k)
    wan_dit.attention = lambda *a, budget_bytes, **k: budgets.append(budget_bytes) or original_attention(
        *a, budget_bytes=budget_bytes, **k)
    try:
        req, _ = _tiling_request(model)
        result = pipeline.generate(model, req, out, memory_limit="256MB")
    finally:
        taehv.decode_stream, wan_dit.attention = original_stream, original_attention
    return dict(result=result, tiles=tiles, budgets=set(budgets), frames=read_video(out))


def test_planned_decoder_tile_is_used_and_tiled_video_equals_untiled(model, tiled_run):
    """Bugs caught: the pipeline ignoring the planned tile (or the planned attention budget); inexact tiling.
    The untiled reference decodes the run's latents here on whole frames."""
    plan = tiled_run["result"].metadata["memory_plan"]
    assert plan["decoder_tile"] is not None
    assert [None if t is None else list(t) for t in tiled_run["tiles"]] == [list(plan["decoder_tile"])]
    assert tiled_run["budgets"] == {plan["attention_budget_bytes"]} == {32 * MB}  # 256 MB / 8, in every block
    frames = tiled_run["frames"]
    req = tiled_run["result"].metadata
    assert frames.shape == (1, req["height"], req["width"], 3) and frames.std() > 5
    whole = np.concatenate([np.array(f) for f in taehv.decode_stream(taehv.load(model), tiled_run["result"].latents)])
    np.testing.assert_array_equal(frames, np.round(np.clip(whole, 0, 1) * 255).astype(np.uint8))


def test_measured_peaks_stay_within_the_plan(tiled_run):
    """Bug caught: a plan that promises less memory than a stage really takes (MLX's peak counter)."""
    stages = tiled_run["result"].stages
    assert set(stages) == {"encode", "denoise", "decode"}
    over = {}
    for stage, s in stages.items():
        assert s.predicted_peak_bytes and s.peak_memory_bytes > 0, stage
        if s.peak_memory_bytes > s.predicted_peak_bytes:
            over[stage] = (s.peak_memory_bytes, s.predicted_peak_bytes)
    assert not over, over


# -------------------------------------------------------------------------------------------- wiring


def test_negative_prompt_is_the_unconditional_branch(model):
    """Bug caught: prompt and negative prompt swapped under guidance. Checked against a CFG loop written
    here: v = v_neg + g (v_prompt - v_neg), Euler steps, each prompt encoded on its own."""
    from mlx_video.tokenizer import load_tokenizer

    prompt, negative, g = "a red fox running through snow", "blurry, low quality", 3.0
    req = pipeline.GenerationRequest(prompt=prompt, negative_prompt=negative, height=32, width=48, frames=5, seed=4,
                                     sampler={"name": "euler", "steps": 2, "guidance": g})
    latents = np.array(pipeline.generate(model, req, None).latents)

    enc, tok = umt5.load(model), load_tokenizer(model)
    dit = wan_dit.load(model)
    text = {p: dit.prepare_text(umt5.encode_prompts(enc, tok, [p])) for p in (prompt, negative)}
    sched = sampling.schedule(sampling.sampler_config(name="euler", steps=2, guidance=g))

    def manual(cond, uncond):
        x = sampling.latent_noise(req.latent_shape(), req.seed)
        for i, t in enumerate(sched.timesteps):
            vc, vu = dit(x, [float(t)], text=text[cond]), dit(x, [float(t)], text=text[uncond])
            x = x + float(sched.sigmas[i + 1] - sched.sigmas[i]) * (vu + g * (vc - vu))
        return np.array(x)

    assert rel_error(latents, manual(prompt, negative)) < 1e-5
    assert rel_error(latents, manual(negative, prompt)) > 1e-3  # a swap moves the result 100x the tolerance

    # Without guidance the negative prompt is never encoded.
    seen = []
    original = umt5.encode_prompts
    umt5.encode_prompts = lambda e, t, prompts, **k: seen.append(list(prompts)) or original(e, t, prompts, **k)
    try:
        pipeline.generate(model, pipeline.GenerationRequest(prompt=prompt, negative_prompt=negative, height=32,
                                                            width=48, frames=5, sampler={"name": "euler", "steps": 1,
                                                                                         "guidance": 1.0}), None)
    finally:
        umt5.encode_prompts = original
    assert seen == [[prompt]]


def test_prompt_file_gives_each_prompt_its_own_seed_and_output(model, tmp_path, monkeypatch):
    """Bug caught: every prompt of a --prompt-file generated with the same seed (or into one file)."""
    import mlx_video.generate as gen
    from mlx_video.cli import main

    calls = []

    def spy(folder, request, output, **kwargs):
        calls.append((request.prompt, request.seed, Path(output).name))
        return pipeline.GenerationResult(Path(output), request.seed, None, {}, {})

    monkeypatch.setattr(gen, "generate", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na fox\nwaves at dusk\n")  # a repeated prompt still gets its own seed
    assert main(["generate", "--model", str(model), "--prompt-file", str(prompts), "--seed", "40", "--output",
                 str(tmp_path / "v.mp4"), "--quiet", "--height", "32", "--width", "48", "--frames", "5"]) == 0
    assert [c[0] for c in calls] == ["a fox", "a fox", "waves at dusk"]
    assert [c[1] for c in calls] == [40, 41, 42]
    assert len({c[2] for c in calls}) == 3


def test_every_output_format_holds_the_decoded_frames(model, tmp_path):
    """Bugs caught: --gif writing nothing (or other frames), PNG/MP4 not matching what was decoded. The
    reference frames are decoded here from the run's latents with the whole-clip decoder."""
    from mlx_video.cli import main

    out, frames_dir = tmp_path / "v.mp4", tmp_path / "frames"
    assert main(["generate", "--model", str(model), "--prompt", "a red fox running through snow", "--height", "64",
                 "--width", "96", "--frames", "9", "--seed", "2", "--output", str(out), "--gif", "--save-frames",
                 str(frames_dir), "--quiet", "--no-prompt-cache"]) == 0
    req = pipeline.GenerationRequest(prompt="a red fox running through snow", height=64, width=96, frames=9, seed=2)
    latents = pipeline.generate(model, req, None).latents
    decoded = np.array(taehv.decode(taehv.load(model), latents))[0]
    expected = np.round(np.clip(decoded, 0, 1) * 255).astype(np.uint8)
    assert expected.shape == (9, 64, 96, 3) and expected.std() > 5  # a real, non-flat video

    png = read_video(frames_dir)
    assert png.shape == expected.shape
    assert np.abs(png.astype(int) - expected).max() <= 1  # lossless; +-1 from fp32 rounding paths
    # the folder's manifest names exactly the frames on disk, frame_00000.png first
    manifest = json.loads((frames_dir / ".mlx-video-frames").read_text())
    assert manifest["files"] == [f"frame_{k:05d}.png" for k in range(9)] and manifest["frames"] == 9
    assert sorted(p.name for p in frames_dir.glob("*.png")) == manifest["files"]
    # Bounds from this model's frames (measured: GIF mean 0.47, p99 3; MP4 mean 2.07, p99 8). Neighbouring
    # frames of this clip differ by 2.4..8 on average, so a frame-order bug must be caught by the argmin below,
    # not by the mean bounds alone.
    gif = read_video(out.with_suffix(".gif"))
    assert gif.shape == expected.shape
    gif_err = np.abs(gif.astype(int) - expected)
    assert gif_err.mean() < 1.5 and np.percentile(gif_err, 99) < 10, (gif_err.mean(), np.percentile(gif_err, 99))
    mp4 = read_video(out)
    assert mp4.shape == expected.shape
    mp4_err = np.abs(mp4.astype(int) - expected)
    assert mp4_err.mean() < 3.5 and np.percentile(mp4_err, 99) < 20, (mp4_err.mean(), np.percentile(mp4_err, 99))
    # each written frame is closest to its own decoded frame among all nine (not reversed, shuffled or repeated)
    for name, got in (("gif", gif), ("mp4", mp4)):
        errors = np.abs(got[:, None].astype(int) - expected[None].astype(int)).mean(axis=(2, 3, 4))
        assert list(errors.argmin(axis=1)) == list(range(9)), (name, np.round(errors, 2))


# --------------------------------------------------------------------------------------------- atomic


def _replace_folder_functions():
    from converters import common
    from mlx_video import fsio

    return [("fsio", fsio.replace_folder), ("converters.common", common.replace_folder)]


@pytest.mark.parametrize("name", ["fsio", "converters.common"])
def test_a_crash_between_the_renames_keeps_the_old_folder(tmp_path, monkeypatch, name):
    """Bug caught: deleting the target before moving the new folder in (a crash in between loses both)."""
    replace = dict(_replace_folder_functions())[name]
    target, new = tmp_path / "model", tmp_path / ".model.partial-1"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old weights")
    new.mkdir()
    (new / "weights.bin").write_bytes(b"new weights")
    real_rename = os.rename

    def crash_when_moving_new_in(src, dst, *a, **k):
        if Path(src) == new and Path(dst) == target:
            raise KeyboardInterrupt("simulated crash")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", crash_when_moving_new_in)
    monkeypatch.setattr(os, "replace", crash_when_moving_new_in)
    with pytest.raises(KeyboardInterrupt):
        replace(new, target)
    monkeypatch.undo()
    survivors = [p for p in tmp_path.rglob("weights.bin") if p.read_bytes() == b"old weights"]
    assert survivors, sorted(str(p) for p in tmp_path.rglob("*"))
    # without a crash: the new content is in place and nothing else is left
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old weights")
    new.mkdir()
    (new / "weights.bin").write_bytes(b"new weights")
    replace(new, target)
    assert (target / "weights.bin").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_png_frame_folder_survives_a_crash_while_being_replaced(tmp_path, monkeypatch):
    """The PNG-folder writer goes through the same replacement: the old frames survive a crash."""
    rng = np.random.default_rng(1)
    first, second = (rng.uniform(0.1, 0.9, (3, 8, 8, 3)).astype(np.float32) for _ in range(2))
    folder = write_video(tmp_path / "frames", first)
    real_rename = os.rename

    def crash(src, dst, *a, **k):
        if Path(dst) == folder and ".partial-" in Path(src).name:
            raise KeyboardInterrupt("simulated crash")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", crash)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_video(folder, second)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_video(folder), np.round(first * 255).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


# ----------------------------------------------------------------------------------------------- INT4


def test_int4_group_size_must_divide_every_quantized_input_width():
    """Bugs caught: a divisibility check on the wrong width (dim for attn.o / ffn.fc2), inverted, or
    applied to modules kept unquantized."""
    from converters.common import ConversionError
    from converters.umt5 import quantization_settings

    cfg = umt5.UMT5Config(vocab_size=100, dim=128, dim_attn=96, dim_ffn=160, num_heads=4, num_layers=1)
    with pytest.raises(ConversionError) as info:
        quantization_settings(4, 64, config=cfg)
    message = str(info.value)
    assert "attn.o (input width 96)" in message and "ffn.fc2 (input width 160)" in message
    assert "attn.q" not in message and "ffn.fc1" not in message  # 128 is divisible by 64
    assert quantization_settings(4, 32, config=cfg)["group_size"] == 32  # 32 divides 128, 96 and 160
    q = quantization_settings(4, 64, keep="attn.o,ffn.fc2", config=cfg)  # kept full precision: allowed
    assert q["keep"] == ["attn.o", "ffn.fc2"]
    with pytest.raises(ConversionError, match="attn.o"):
        quantization_settings(4, 64, keep="ffn.fc2", config=cfg)
    wide = umt5.UMT5Config(vocab_size=100, dim=96, dim_attn=128, dim_ffn=128, num_heads=4, num_layers=1)
    with pytest.raises(ConversionError) as info:
        quantization_settings(4, 64, config=wide)
    assert "attn.q (input width 96)" in str(info.value) and "ffn.gate (input width 96)" in str(info.value)
    assert "attn.o" not in str(info.value) and "ffn.fc2" not in str(info.value)
    with pytest.raises(ConversionError, match="token_embedding"):
        quantization_settings(4, 64, embedding=True, keep="attn.q,attn.k,attn.v,ffn.gate,ffn.fc1", config=wide)


# -------------------------------------------------------------------------------- sampler (mutation)


def test_sampler_timesteps_defaults_and_overrides():
    """Bugs caught: a wrong default sampler name, or step-list / warp overrides dropped on the way."""
    np.testing.assert_allclose(sampling.sampler_timesteps(), [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)
    assert sampling.sampler_timesteps("fewstep", denoising_step_list=[1000, 500], warp=False) == [1000.0, 500.0]
    warped = sampling.sampler_timesteps("fewstep", denoising_step_list=(1000, 500))
    np.testing.assert_allclose(warped, [1000.0, 1000 * 5 * 0.5 / (1 + 4 * 0.5)], rtol=1e-6)  # shift 5 at sigma 0.5
    assert sampling.sampler_timesteps("euler", steps=3, shift=1.0) == [999, 666, 333]


def test_renoise_list_length_is_checked_and_numpy_draws_work():
    """Bugs caught: an off-by-one in the re-noise count check (and its message), numpy draws mishandled."""
    cfg = sampling.sampler_config(None)  # 4 steps: 3 re-noising draws
    shape = (1, 1, 2, 2, 4)
    rng = np.random.default_rng(0)
    draws = [rng.standard_normal(shape) for _ in range(3)]  # float64 numpy
    noise = mx.array(rng.standard_normal(shape).astype(np.float32))
    velocity = lambda x, t: 0.1 * x  # noqa: E731
    with pytest.raises(ValueError, match=r"renoise holds 2 arrays; 3 steps re-noise"):
        sampling.sample(cfg, velocity, noise, renoise=draws[:2])
    from_numpy = sampling.sample(cfg, velocity, noise, renoise=draws)
    from_mlx = sampling.sample(cfg, velocity, noise, renoise=[mx.array(d.astype(np.float32)) for d in draws])
    assert from_numpy.dtype == mx.float32
    np.testing.assert_allclose(np.array(from_numpy), np.array(from_mlx), rtol=1e-6, atol=1e-6)


def test_seeded_renoise_draws_are_full_size_standard_normal():
    """Bug caught: a re-noising draw of the wrong shape (a broadcast scalar) or scale."""
    cfg = sampling.sampler_config(None)
    sched = sampling.schedule(cfg)
    shape = (1, 2, 16, 16, 16)
    seen = []
    sampling.sample(cfg, lambda x, t: seen.append(np.array(x)) or mx.zeros(x.shape), sampling.latent_noise(shape, 3),
                    key=3)
    assert len(seen) == 4 and seen[0].shape == shape
    for i in range(3):  # with v = 0: x_{i+1} = (1 - s) x_i + s eps_i
        s = sched.sigmas[i + 1]
        eps = (seen[i + 1] - (1 - s) * seen[i]) / s
        assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05, (i, eps.mean(), eps.std())
        assert abs(np.corrcoef(eps.ravel(), seen[0].ravel())[0, 1]) < 0.05  # independent of the initial noise
    assert sampling.latent_noise(shape, 3).shape == shape


@pytest.mark.parametrize("name", ["euler", "unipc", "fewstep"])
def test_progress_reports_each_step(name):
    """Bug caught: progress called with the wrong step index, count or timestep."""
    cfg = sampling.sampler_config(name=name, steps=3)
    calls = []
    sampling.sample(cfg, lambda x, t: 0.5 * x, mx.ones((1, 1, 2, 2, 4)), key=0, uncond_velocity=lambda x, t: x,
                    progress=lambda *a: calls.append(a))
    ts = sampling.schedule(cfg).timesteps
    assert calls == [(i, 3, ts[i]) for i in range(3)]


# ---------------------------------------------------------------------------------- video (mutation)


def test_failure_report_holds_what_went_wrong(tmp_path):
    """Bugs caught: a failure report with renamed or empty fields, unserialisable details, a bad timestamp, or
    none at all when the output folder does not exist yet."""
    import re

    target = tmp_path / "not" / "yet" / "video.mp4"
    details = {"nan": np.int64(3), "mean": np.float32(0.25), "shape": mx.array([2, 3]), "where": Path("a/b"),
               "what": object.__new__(type("Thing", (), {"__str__": lambda self: "a thing"}))}
    report = video.write_failure_report(target, "non-finite values after denoise", details)
    assert report == tmp_path / "not" / "yet" / "video.mp4.failure.json"
    data = json.loads(report.read_text())
    assert set(data) == {"output", "reason", "details", "time"}
    assert data["output"] == str(target) and data["reason"] == "non-finite values after denoise"
    assert data["details"] == {"nan": 3, "mean": 0.25, "shape": [2, 3], "where": "a/b", "what": "a thing"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", data["time"]), data["time"]
    assert not target.exists()


def test_generation_failed_message_and_frame_summary():
    """Bugs caught: the failure message losing its stage; the report's frame means unrounded or unbounded."""
    assert str(GenerationFailed("video is all black", "video")) == "video: video is all black"
    plain = GenerationFailed("no frames were written")
    assert str(plain) == "no frames were written" and plain.stage == "" and plain.details == {}
    stats = video.FrameStats()
    frames = np.broadcast_to(np.linspace(0.1, 0.9, 70, dtype=np.float32)[:, None, None, None] + 1e-7,
                             (70, 2, 2, 3))
    stats.update(np.ascontiguousarray(frames))
    summary = stats.summary()
    assert len(summary["frame_means"]) == 64 and stats.frames == 70
    assert summary["frame_means"] == [round(float(m), 6) for m in frames[:64].reshape(64, -1).mean(1)]
    assert summary["min"] == pytest.approx(0.1 + 1e-7) and summary["max"] == pytest.approx(0.9 + 1e-7)


def test_video_info_of_gif_and_png_folder_and_write_video_options(tmp_path):
    """Bugs caught: width/height swapped for GIF/PNG, a PNG folder given a made-up fps, write_video dropping
    its options (format, check_health)."""
    rng = np.random.default_rng(2)
    frames = rng.uniform(0.1, 0.9, (4, 24, 40, 3)).astype(np.float32)  # not square: catches a swap
    gif = write_video(tmp_path / "clip.gif", frames, fps=10)  # GIF stores 10 ms units: 100 ms is exact
    info = video.video_info(gif)
    assert (info.frames, info.width, info.height) == (4, 40, 24) and info.fps == pytest.approx(10.0)
    png = write_video(tmp_path / "clip", frames)
    info = video.video_info(png)
    assert (info.frames, info.width, info.height) == (4, 40, 24) and math.isnan(info.fps)
    black = np.zeros((2, 8, 8, 3), np.float32)
    out = write_video(tmp_path / "black.bin", black, format="gif", check_health=False)  # options reach the writer
    assert out.read_bytes()[:6] in (b"GIF87a", b"GIF89a")  # (Pillow merges the identical frames)


def test_errors_inside_the_writer_block_propagate_and_leave_nothing(tmp_path):
    """Bugs caught: ``__exit__`` swallowing the caller's exception; an empty frame folder read silently."""
    with pytest.raises(RuntimeError, match="caller failed"):
        with VideoWriter(tmp_path / "v.gif") as writer:
            writer.write(np.full((2, 8, 8, 3), 0.5, np.float32))
            raise RuntimeError("caller failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no frame_"):
        read_video(tmp_path / "empty")


# ------------------------------------------------------------------------------------ ops (mutation)


def test_cpu_softmax_survives_extreme_scores_and_many_rows(monkeypatch):
    """Bugs caught in the NumPy softmax: a shift by + max or by the global max (overflow / underflow to 0/0),
    blocks iterated over the wrong axis (rows left unnormalised), and the fallback for a score buffer NumPy
    cannot own computing something else."""
    b, h, lq, lk, d = 1, 2, 200, 20, 8
    q, k, v = (mx.random.normal((b, h, n, d), key=mx.random.key(10 + i)) for i, n in enumerate((lq, lk, lk)))
    # scores of about +-100 in some rows and small ones in others: exp overflows without the per-row shift
    q = q * mx.array(np.where(np.arange(lq) % 3 == 0, 12.0, 0.05).astype(np.float32))[None, None, :, None]
    ref = softmax_attention_f64(q, k, v, 1.0)
    out = np.array(ops.attention(q, k, v, 1.0, budget_bytes=1 << 30, fused=False))
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 1e-4
    monkeypatch.setattr(ops, "_owned_numpy_view", lambda a: None)  # a score buffer that is not ours to overwrite
    out = np.array(ops.attention(q, k, v, 1.0, budget_bytes=1 << 30, fused=False))
    assert np.abs(out - ref).max() < 1e-4


def test_owned_numpy_view_refuses_non_contiguous_buffers():
    a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    view = ops._owned_numpy_view(a)
    assert view is not None and view.shape == (3, 4) and view.flags.writeable
    assert ops._owned_numpy_view(a.T) is None  # a transposed view: overwriting it in place would be wrong


def test_numpy_fallbacks_without_the_native_kernels(monkeypatch):
    """Where the native kernels are not built, LayerNorm and GELU run the NumPy row kernels: both must
    match plain float64 formulas."""
    from mlx_video import native

    monkeypatch.setattr(native, "enabled", lambda: False)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 70, 48)) * 3 + 1).astype(np.float32)  # > 32 rows per batch: several blocks
    mul, add = (rng.standard_normal((2, 1, 48)).astype(np.float32) for _ in range(2))
    xd = x.astype(np.float64)
    norm = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)
    out = np.array(ops.modulated_layer_norm(mx.array(x), mx.array(mul), mx.array(add), 1e-6))
    assert np.abs(out - (norm * mul + add)).max() < 1e-4
    g = rng.standard_normal((70, 48)).astype(np.float32) * 4
    gd = g.astype(np.float64)
    ref = 0.5 * gd * (1 + np.tanh(np.sqrt(2 / np.pi) * (gd + 0.044715 * gd**3)))
    assert np.abs(np.array(ops.gelu_tanh_fresh(mx.array(g) * 1.0)) - ref).max() < 1e-5


# ------------------------------------------------------------------------------- pipeline (mutation)


def test_memory_figures_and_random_seeds():
    """Bugs caught: memory figures in the wrong unit or rounding; a random seed outside the int32 range or
    a constant one."""
    GB = 1024**3
    assert pipeline._gb(3 * GB) == "3.00 GB" and pipeline._gb(GB // 5) == "0.20 GB"
    assert pipeline._gb(50 * MB) == "50 MB" and pipeline._gb(10 * MB) == "10 MB" and pipeline._gb(MB + MB // 2) == "1.5 MB"
    seeds = {pipeline.random_seed() for _ in range(20)}
    assert len(seeds) > 15 and all(0 <= s < 2**31 - 1 for s in seeds)


def test_a_plan_that_cannot_fit_is_refused_with_the_figures(model):
    """Bug caught: a refusal that hides which stage does not fit and by how much."""
    huge = pipeline.GenerationRequest(prompt="x", height=1024, width=1024, frames=81)
    with pytest.raises(pipeline.MemoryPlanError) as info:
        pipeline.plan_memory(model, huge, 64 * MB, low_memory=True)
    message = str(info.value)
    assert message.startswith("a 1024x1024x81 video does not fit the memory limit of 64 MB")
    assert "predicted peaks per stage: " in message and "needs" in message
    assert "--memory-limit" in message and "--height/--width/--frames" in message


def test_kept_models_are_reused_with_their_dtype_and_the_requested_fps(model, tmp_path):
    """Bugs caught: the decoder reloaded on every generation despite keep_models, loaded in the wrong dtype,
    or writers ignoring the requested fps."""
    models = pipeline.Models(model, "bfloat16")
    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5, seed=1, fps=10.0)
    pipeline.generate(model, req, tmp_path / "a.mp4", models=models, keep_models=True, extra_outputs=[tmp_path / "a.gif"])
    decoder = models.decoder
    assert decoder is not None
    from mlx.utils import tree_flatten

    assert {v.dtype for _, v in tree_flatten(decoder.parameters()) if v.dtype != mx.float32} == {mx.bfloat16}
    pipeline.generate(model, req, tmp_path / "b.mp4", models=models, keep_models=True)
    assert models.decoder is decoder
    assert video.video_info(tmp_path / "a.mp4").fps == pytest.approx(10.0)
    assert video.video_info(tmp_path / "a.gif").fps == pytest.approx(10.0)
