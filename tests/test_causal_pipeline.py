"""`convert --sampler self-forcing` and `mlx-video generate` on a causal folder: block-by-block generation
streamed through the TAEHV decoder into the video, events, and clear errors that leave nothing behind."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_video import causal, pipeline, sampling
from mlx_video.cli import main
from mlx_video.models import taehv, wan_dit
from mlx_video.video import video_info
from tests.model_factory import build_model_folder

PROMPT = "a red fox running through snow"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_model_folder(tmp_path_factory.mktemp("causal"), quantize=False)
    assert main(["convert", "--sampler", "self-forcing", "--mlx-path", str(folder)]) == 0
    return folder


def request(frames=21, **kw):
    return pipeline.GenerationRequest(prompt=PROMPT, height=32, width=48, frames=frames, seed=3, **kw)


def test_convert_records_the_preset(model):
    section = json.loads((model / "config.json").read_text())["sampler"]
    assert section["preset"] == "self-forcing" and section["causal"]["frames_per_block"] == 3
    assert section["shift"] == 5.0 and section["warp"] is True and section["causal"]["max_frames"] == 21


def test_generate_streams_blocks_into_the_video(model, tmp_path):
    events = []
    out = tmp_path / "v.mp4"
    result = pipeline.generate(model, request(), out, events=events.append, keep_models=True)
    assert video_info(out).frames == 21
    kinds = [e["event"] for e in events]
    blocks = [i for i, k in enumerate(kinds) if k == "block"]
    assert len(blocks) == 2  # 6 latent frames in blocks of 3
    # frames are written while the second block is still to come
    assert blocks[0] < kinds.index("first_frame") < kinds.index("frames") < blocks[1]
    meta = json.loads((tmp_path / "v.mp4.json").read_text())
    assert meta["causal"]["time_to_first_frame_s"] > 0 and len(meta["causal"]["seconds_per_block"]) == 2
    assert "generate" in meta["stages"] and "denoise" not in meta["stages"]

    # the same run through the Python API (same seed, same re-noising draws) gives the same latents
    dit = wan_dit.load(model)
    from mlx_video.models import umt5
    from mlx_video.tokenizer import load_tokenizer

    context = umt5.encode_prompts(umt5.load(model), load_tokenizer(model), [PROMPT])
    section = json.loads((model / "config.json").read_text())["sampler"]
    latents = causal.causal_sample(dit, dit.prepare_text(context), sampling.latent_noise((1, 6, 4, 6, 16), 3),
                                   sampling.sampler_config(section), causal.causal_config(section), key=3)
    np.testing.assert_allclose(np.array(result.latents), np.array(latents), rtol=0, atol=1e-5)

    # streaming decode of the blocks equals decoding all latents at once
    decoder = taehv.load(model)
    streamed = mx.concatenate(list(taehv.decode_stream(decoder, iter([latents[:, :3], latents[:, 3:]]),
                                                       per_latent=True)), axis=1)
    np.testing.assert_allclose(np.array(streamed), np.array(taehv.decode(decoder, latents)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("frames,match", [(13, "do not split into blocks of 3"),
                                          (93, "exceed this model's KV cache of 21 frames")])
def test_bad_frame_counts_exit_2_and_write_nothing(model, tmp_path, capsys, frames, match):
    out = tmp_path / "x.mp4"
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--height", "32", "--width", "48",
                 "--frames", str(frames), "--output", str(out), "--quiet", "--no-prompt-cache"])
    assert code == 2 and match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_bidirectional_sampler_on_a_causal_model_is_refused(model, tmp_path, capsys):
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--height", "32", "--width", "48",
                 "--frames", "9", "--sampler", "unipc", "--output", str(tmp_path / "x.mp4"), "--quiet",
                 "--no-prompt-cache"])
    assert code == 2 and "block-causal" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bidirectional_folder_is_unchanged(model, tmp_path):
    """Recording a bidirectional sampler again removes the causal settings."""
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    assert main(["convert", "--sampler", "fewstep", "--mlx-path", str(folder)]) == 0
    assert causal.causal_config(json.loads((folder / "config.json").read_text())["sampler"]) is None


def test_cli_reports_blocks_and_time_to_first_frame(model, tmp_path, capsys):
    base = ["generate", "--model", str(model), "--prompt", PROMPT, "--height", "16", "--width", "16",
            "--no-prompt-cache"]
    assert main(base + ["--output", str(tmp_path / "a.mp4")]) == 0  # no --frames: the causal default, 81
    assert "time to first frame" in capsys.readouterr().err and video_info(tmp_path / "a.mp4").frames == 81
    base += ["--frames", "9"]
    assert main(base + ["--output", str(tmp_path / "b.mp4"), "--json-events"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds.count("block") == 1 and "first_frame" in kinds and kinds.count("step") == 4
    assert events[kinds.index("block")]["kv_cache_bytes"] > 0


def test_memory_plan_counts_the_cache_not_the_whole_video(model, tmp_path):
    """With a window the planned peak is the same for 21 and 42 latent frames; bidirectionally it grows."""
    windowed, bidirectional = tmp_path / "w", tmp_path / "b"
    shutil.copytree(model, windowed)
    shutil.copytree(model, bidirectional)
    assert main(["convert", "--sampler", "longlive", "--mlx-path", str(windowed)]) == 0
    assert main(["convert", "--sampler", "fewstep", "--mlx-path", str(bidirectional)]) == 0

    def planned(folder, frames):
        return pipeline.plan_memory(folder, request(frames=frames), None, False).predicted["denoise"]

    assert planned(windowed, 81) == planned(windowed, 165)  # 21 and 42 latent frames
    rolling = tmp_path / "r"
    shutil.copytree(model, rolling)
    assert main(["convert", "--preset", "rolling-forcing", "--mlx-path", str(rolling)]) == 0
    assert planned(rolling, 81) == planned(rolling, 165) > planned(windowed, 81)  # a 15-frame window of queries
    assert planned(bidirectional, 165) > planned(bidirectional, 81)
    cfg = wan_dit.load(windowed).config
    assert planned(windowed, 81) - planned(bidirectional, 9) >= causal.cache_bytes(
        cfg, (1, 21, 4, 6, 16), causal.causal_config(causal.preset_section("longlive")), 4) > 0


# --------------------------------------------------------------------------------------------------
# Prompt schedule (LongLive switching) and Rolling Forcing through `generate`
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def longlive(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ll") / "m"
    shutil.copytree(model, folder)
    assert main(["convert", "--sampler", "longlive", "--mlx-path", str(folder)]) == 0
    return folder


def test_prompt_schedule_switches_with_recache(longlive, tmp_path, capsys):
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("# LongLive-style interactive prompts\n0: a red fox running through snow\n"
                        "14: a grey wolf howling at the moon\n")
    out = tmp_path / "s.mp4"
    base = ["generate", "--model", str(longlive), "--height", "16", "--width", "16", "--frames", "33",
            "--no-prompt-cache", "--quiet", "--json-events"]
    assert main(base + ["--prompt-schedule", str(schedule), "--output", str(out)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    switch = [e for e in events if e["event"] == "prompt_switch"]
    # video frame 14 is in latent frame 4, so the switch happens at the next block start: latent 6 = video frame 21
    assert len(switch) == 1 and switch[0]["block"] == 3 and switch[0]["latent_frame"] == 6
    assert switch[0]["video_frame"] == 21 and switch[0]["requested_video_frame"] == 14
    meta = json.loads((tmp_path / "s.mp4.json").read_text())
    assert meta["prompt_schedule"] == [[14, "a grey wolf howling at the moon"]] and video_info(out).frames == 33

    # the same run through the API equals the causal loop with the switch (and differs from no switch)
    small = dict(prompt=PROMPT, height=16, width=16, frames=33, seed=3)
    result = pipeline.generate(longlive, pipeline.GenerationRequest(
        **small, prompt_schedule=[(14, "a grey wolf howling at the moon")]), None)
    plain = pipeline.generate(longlive, pipeline.GenerationRequest(**small), None)
    a, b = np.array(result.latents), np.array(plain.latents)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:], atol=1e-4)

    # a replay from the sidecar keeps the schedule
    assert main(base[:1] + ["--config-from-metadata", str(tmp_path / "s.mp4.json"), "--output",
                            str(tmp_path / "r.mp4"), "--no-prompt-cache", "--quiet"]) == 0
    assert json.loads((tmp_path / "r.mp4.json").read_text())["prompt_schedule"] == meta["prompt_schedule"]


@pytest.mark.parametrize("text,match", [
    ("0 a fox\n21 a wolf\n", "out of range"),  # frame 21 is past the last video frame (20)
    ("0 a fox\n17 a wolf\n", "after the video's last block"),
    ("5 a fox\n", "must start at frame 0"),
    ("0 a fox\nforty a wolf\n", "expected 'FRAME PROMPT'"),
    ("0 a fox\n9 a wolf\n10 a bear\n", "fall into the same block"),
])
def test_bad_prompt_schedules_exit_2_and_write_nothing(longlive, tmp_path, capsys, text, match):
    schedule = tmp_path / "schedule.txt"
    schedule.write_text(text)
    out = tmp_path / "out" / "x.mp4"
    out.parent.mkdir()
    code = main(["generate", "--model", str(longlive), "--prompt-schedule", str(schedule), "--height", "32",
                 "--width", "48", "--frames", "21", "--output", str(out), "--quiet", "--no-prompt-cache"])
    assert code == 2 and match in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []


def test_prompt_schedule_on_a_bidirectional_model_is_refused(model, tmp_path, capsys):
    folder = tmp_path / "b"
    shutil.copytree(model, folder)
    assert main(["convert", "--sampler", "fewstep", "--mlx-path", str(folder)]) == 0
    (tmp_path / "s.txt").write_text("0 a fox\n9 a wolf\n")
    out = tmp_path / "x.mp4"
    code = main(["generate", "--model", str(folder), "--prompt-schedule", str(tmp_path / "s.txt"), "--height", "32",
                 "--width", "48", "--frames", "21", "--output", str(out), "--quiet", "--no-prompt-cache"])
    assert code == 2 and "needs one" in capsys.readouterr().err and not out.exists()


def test_rolling_forcing_generates_a_streamed_video(model, tmp_path, capsys):
    folder = tmp_path / "rf"
    shutil.copytree(model, folder)
    assert main(["convert", "--preset", "rolling-forcing", "--mlx-path", str(folder)]) == 0
    out = tmp_path / "rf.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--height", "16", "--width", "16",
                 "--frames", "69", "--output", str(out), "--no-prompt-cache", "--quiet", "--json-events"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds.count("window") == 6 + 4 and kinds.count("block") == 6 and video_info(out).frames == 69
    assert kinds.index("first_frame") < len(kinds) - 1 - kinds[::-1].index("block")  # frames before the last block
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--height", "16", "--width", "16",
                 "--frames", "45", "--output", str(tmp_path / "short.mp4"), "--quiet", "--no-prompt-cache"])
    assert code == 2 and "fewer than Rolling Forcing's window" in capsys.readouterr().err
    assert not (tmp_path / "short.mp4").exists()
