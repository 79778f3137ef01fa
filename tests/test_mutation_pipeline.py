"""``mlx_video.pipeline``: request checks, memory parsing and planning figures, stage accounting, the events and
the metadata sidecar of a run, and its failure report (issue 19, written against survivors of the mutation run
of ``pipeline.py``). Generations use the small cached model folder of ``tests/test_guards.py`` at 32x48x5.
"""

from __future__ import annotations

import json
import math

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import pytest

from mlx_video import pipeline, sampling
from mlx_video.models import taehv
from mlx_video.utils import UsageError
from mlx_video.video import GenerationFailed
from tests.test_guards import model  # noqa: F401  (the shared small model folder fixture)

MB, GB = 1024**2, 1024**3


# ----------------------------------------------------------------------------------------- requests


@pytest.mark.parametrize("change,message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt=" \n\t"), "the prompt is empty"),
    (dict(height=0), "height must be a positive multiple of 16, got 0"),
    (dict(height=-32), "height must be a positive multiple of 16, got -32"),
    (dict(width=40), "width must be a positive multiple of 16, got 40"),
    (dict(frames=0), r"frames must be of the form 4k\+1 \(e.g. 1 or 5\), got 0"),
    (dict(frames=6), r"frames must be of the form 4k\+1 \(e.g. 5 or 9\), got 6"),
    (dict(frames=8), r"frames must be of the form 4k\+1 \(e.g. 9 or 13\), got 8"),
    (dict(fps=0.0), "fps must be positive, got 0.0"),
    (dict(fps=-1.0), "fps must be positive, got -1.0"),
])
def test_bad_requests_are_refused_with_the_value(change, message):
    req = pipeline.GenerationRequest(**{"prompt": "a fox", "height": 32, "width": 48, "frames": 5, **change})
    with pytest.raises(ValueError, match=f"^{message}$"):
        req.validate()


def test_good_requests_and_their_latent_shape():
    for h, w, f in ((16, 16, 1), (32, 48, 5), (480, 832, 81)):
        req = pipeline.GenerationRequest(prompt="x", height=h, width=w, frames=f, fps=0.5)
        req.validate()
        assert req.latent_shape() == (1, (f - 1) // 4 + 1, h // 8, w // 8, 16)


# ------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("text,value", [
    ("4GB", 4 * GB), ("4gb", 4 * GB), ("2GiB", 2 * GB), ("3.5G", int(3.5 * GB)), ("512MB", 512 * MB),
    ("512m", 512 * MB), (" 1TB ", 1024 * GB), ("70000K", 70000 * 1024), ("66000KB", 66000 * 1024),
    (str(100 * MB), 100 * MB), ("104857600B", 100 * MB), (100 * MB, 100 * MB), (float(100 * MB), 100 * MB),
    (None, None),
])
def test_memory_sizes_are_read_in_binary_units(text, value):
    assert pipeline.parse_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "GB", "-4GB", "0", "nan", "inf", True, "4XB"])
def test_unreadable_memory_sizes_name_the_flag(text):
    with pytest.raises(UsageError, match=r"^--low-limit: cannot read .* as a memory size; use a positive size"):
        pipeline.parse_memory(text, flag="--low-limit")


def test_memory_sizes_below_the_minimum_are_refused():
    assert pipeline.parse_memory("64MB") == pipeline.MIN_MEMORY_LIMIT
    with pytest.raises(UsageError, match=r"^--memory-limit 63MB is below the 64 MB minimum"):
        pipeline.parse_memory("63MB")


def test_memory_limit_defaults_to_three_quarters_and_refuses_more_than_the_machine(monkeypatch):
    monkeypatch.setattr(pipeline, "machine_memory_bytes", lambda: 16 * GB)
    assert pipeline.default_memory_limit() == 12 * GB
    assert pipeline.check_memory_limit(None) == 12 * GB
    assert pipeline.check_memory_limit(16 * GB) == 16 * GB
    with pytest.raises(UsageError) as info:
        pipeline.check_memory_limit(16 * GB + 1, flag="--cap")
    assert str(info.value) == ("--cap 16.00 GB is more than this machine's memory (16.00 GB); the default is "
                               "12.00 GB")
    monkeypatch.undo()  # the real figure: a positive size
    assert pipeline.machine_memory_bytes() > 64 * MB


def test_attention_budget_share_floor_and_cap():
    assert pipeline.default_attention_budget(800 * MB) == 100 * MB
    assert pipeline.default_attention_budget(800 * MB, low_memory=True) == 50 * MB
    assert pipeline.default_attention_budget(100 * MB) == pipeline.MIN_ATTENTION_BUDGET == 16 * MB
    assert pipeline.default_attention_budget(10**6 * GB) == 2 * GB


def test_decoder_choice():
    assert pipeline.choose_decoder({"decoder": {}}) == "taehv"
    assert pipeline.choose_decoder({"vae": {}}) == "wan-vae"
    assert pipeline.choose_decoder({"vae": {}, "decoder": {}}) == "taehv"
    assert pipeline.choose_decoder({}) == "taehv"
    assert pipeline.choose_decoder({"decoder": {}}, "wan-vae") == "wan-vae"
    with pytest.raises(ValueError, match=r"unknown decoder 'vae'; choose one of taehv, wan-vae"):
        pipeline.choose_decoder({"vae": {}}, "vae")


def test_component_and_encode_figures(model):
    """Bugs caught: the resident weight bytes counted at the wrong itemsize or for a missing file; the encode
    stage's output sized without the DiT's text length, the prompts or the width."""
    config = json.loads((model / "config.json").read_text())
    from mlx_video.safetensors_io import read_safetensors_header

    header = read_safetensors_header(model / config["dit"]["weights_file"])
    elements = sum(math.prod(v["shape"]) for v in header.values())
    assert pipeline._component_bytes(model, config["dit"]) == elements * 4  # fp32 on the CPU
    assert pipeline._component_bytes(model, {"weights_file": "missing.safetensors"}) == 0
    assert pipeline._component_bytes(model, {}) == 0
    from mlx_video.models import umt5

    section, text_len = config["text_encoder"], config["dit"]["text_len"]
    for tokens, prompts in ((7, 1), (7, 2), (text_len + 5, 2)):
        out = prompts * max(tokens, text_len) * section["dim"] * 4
        for stream in (True, False):
            own = umt5.text_encoder_peak_bytes(section, tokens=tokens, batch=prompts, stream=stream)
            assert pipeline.encode_peak_bytes(config, tokens, prompts, stream) == own + out


def test_plan_of_a_small_job_and_its_encoder_setting(model):
    req = pipeline.GenerationRequest(prompt="x", height=32, width=48, frames=5)
    plan = pipeline.plan_memory(model, req, 2 * GB, low_memory=False, text_tokens=9, prompts=2)
    assert plan.limit_bytes == 2 * GB and plan.attention_budget_bytes == 2 * GB // 8 and plan.decoder_tile is None
    assert set(plan.predicted) == {"encode", "denoise", "decode"} and plan.notes == []
    assert plan.stream_text_encoder is True  # not kept: the encoder is streamed
    config = json.loads((model / "config.json").read_text())
    assert plan.predicted["encode"] == pipeline.encode_peak_bytes(config, 9, 2, True)
    kept = pipeline.plan_memory(model, req, 2 * GB, low_memory=False, text_tokens=9, prompts=2, keep_models=True)
    assert kept.stream_text_encoder is False  # kept resident where it fits
    assert kept.predicted["encode"] == pipeline.encode_peak_bytes(config, 9, 2, False)
    assert plan.as_dict()["predicted"] == plan.predicted and plan.as_dict()["limit_bytes"] == 2 * GB
    cfg = pipeline.config_from_dict(taehv.TAEHVConfig, config["decoder"])
    assert plan.predicted["decode"] == taehv.decoder_peak_bytes(cfg, req.latent_shape(), tile=None, itemsize=4)


# ------------------------------------------------------------------------------------------- stages


def test_stage_records_time_peak_and_prediction_and_warns_above_the_limit(capsys):
    events, stats = [], {}
    with pipeline._stage("decode", stats, events.append, predicted=123, limit=None):
        mx.eval(mx.zeros((256, 256)))
    s = stats["decode"]
    assert s.seconds > 0 and s.peak_memory_bytes >= 256 * 256 * 4 and s.rss_bytes > 0 and s.predicted_peak_bytes == 123
    assert [e["event"] for e in events] == ["stage_start", "stage_end"]
    assert events[0] == {"event": "stage_start", "stage": "decode"}
    end = events[1]
    assert end["stage"] == "decode" and end["peak_memory_bytes"] == s.peak_memory_bytes
    assert end["predicted_peak_bytes"] == 123 and end["seconds"] == round(s.seconds, 4)
    assert capsys.readouterr().err == ""  # no limit: no warning
    events.clear()
    with pipeline._stage("denoise", stats, events.append, predicted=None, limit=64 * 1024):
        mx.eval(mx.zeros((256, 256)))
    err = capsys.readouterr().err
    assert err.startswith("mlx-video: warning: the denoise stage peaked at ")
    assert "above the memory limit of 0.1 MB (predicted 0.0 MB)" in err
    warning = [e for e in events if e["event"] == "warning"]
    assert warning == [{"event": "warning", "stage": "denoise", "reason": "peak memory above the limit",
                        "peak_memory_bytes": stats["denoise"].peak_memory_bytes, "limit_bytes": 64 * 1024}]
    assert [e["event"] for e in events] == ["stage_start", "warning", "stage_end"]


def test_events_and_sidecar_of_a_run(model, tmp_path):
    """Bugs caught: events with wrong step numbers or counts, a sidecar missing the request, the plan or the
    stage figures, totals that are not the sum / maximum of the stages."""
    events = []
    req = pipeline.GenerationRequest(prompt="a red fox", negative_prompt="blur", height=32, width=48, frames=5,
                                     seed=7, fps=8.0, sampler={"name": "euler", "steps": 2, "guidance": 2.0})
    out = tmp_path / "v.mp4"
    result = pipeline.generate(model, req, out, events=events.append, memory_limit="2GB")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "complete"
    assert events[0] == {"event": "start", "prompt": "a red fox", "seed": 7, "height": 32, "width": 48, "frames": 5}
    steps = [e for e in events if e["event"] == "step"]
    ts = sampling.schedule(sampling.sampler_config(name="euler", steps=2, guidance=2.0)).timesteps
    assert [(e["step"], e["steps"], e["t"]) for e in steps] == [(1, 2, float(ts[0])), (2, 2, float(ts[1]))]
    frames = [e for e in events if e["event"] == "frames"]
    assert frames and frames[-1] == {"event": "frames", "written": 5, "total": 5}
    assert [e["stage"] for e in events if e["event"] == "stage_start"] == ["encode", "denoise", "decode"]
    assert result.output == out and result.seed == 7 and tuple(result.latents.shape) == req.latent_shape()
    meta = json.loads((tmp_path / "v.mp4.json").read_text())
    assert meta == json.loads(json.dumps(result.metadata, default=str))
    for k, v in dict(prompt="a red fox", negative_prompt="blur", seed=7, height=32, width=48, frames=5, fps=8.0,
                     low_memory=False, decoder="taehv", dtype=None, loras=[]).items():
        assert meta[k] == v, k
    assert meta["sampler"]["name"] == "euler" and meta["sampler"]["guidance"] == 2.0
    assert meta["timesteps"] == [float(t) for t in ts] and meta["memory_plan"]["limit_bytes"] == 2 * GB
    assert meta["model"] == str(model) and meta["mlx_version"] == mx.__version__ and "prompt_extension" not in meta
    assert meta["device"] == str(mx.default_device()) and meta["model_path"] == str(model.resolve())
    assert set(meta["stages"]) == {"encode", "denoise", "decode"}
    assert meta["total_seconds"] == pytest.approx(sum(s["seconds"] for s in meta["stages"].values()))
    assert meta["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in meta["stages"].values()) > 0
    assert all(meta["stages"][k]["predicted_peak_bytes"] == meta["memory_plan"]["predicted"][k] for k in meta["stages"])
    complete = events[-1]
    assert complete["output"] == str(out) and complete["seconds"] == meta["total_seconds"]
    assert set(complete["stages"]) == {"encode", "denoise", "decode"}


def test_latents_only_runs_write_nothing_and_skip_the_decoder(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(taehv, "load", lambda *a, **k: pytest.fail("the decoder was loaded for output=None"))
    events = []
    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5, seed=3,
                                     sampler={"name": "euler", "steps": 1})
    result = pipeline.generate(model, req, None, events=events.append)
    assert result.output is None and set(result.stages) == {"encode", "denoise"}
    assert events[-1]["event"] == "complete" and events[-1]["output"] is None
    assert list(tmp_path.iterdir()) == []


def test_a_decoder_failure_leaves_a_report_with_the_request_and_no_video(model, tmp_path, monkeypatch):
    """Bugs caught: the failure report without its stage or request, the finished writers published anyway,
    no error event."""
    original = taehv.decode_stream

    def nan_from_the_second_frame(m, z, tile=None, **k):
        for i, frames in enumerate(original(m, z, tile=tile, **k)):
            yield frames if i == 0 else frames * float("nan")

    monkeypatch.setattr(taehv, "decode_stream", nan_from_the_second_frame)
    events = []
    out = tmp_path / "v.mp4"
    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5, seed=3,
                                     sampler={"name": "euler", "steps": 1})
    with pytest.raises(GenerationFailed) as info:
        pipeline.generate(model, req, out, events=events.append, extra_outputs=[tmp_path / "v.gif"])
    assert info.value.stage == "decode"
    report = json.loads((tmp_path / "v.mp4.failure.json").read_text())
    assert report["details"]["stage"] == "decode" and report["details"]["nan"] > 0
    assert report["details"]["request"]["prompt"] == "a fox" and report["details"]["request"]["seed"] == 3
    assert set(report["details"]["request"]["stages"]) == {"encode", "denoise"}  # decode did not finish
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4.failure.json"]
    err = events[-1]
    assert err["event"] == "error" and err["stage"] == "decode" and err["failure_report"] == str(
        tmp_path / "v.mp4.failure.json")


def test_outputs_are_checked_before_any_work(model, tmp_path, monkeypatch):
    """The sidecar and failure-report paths are checked with the videos (a user's file there is refused)."""
    from mlx_video import fsio

    monkeypatch.setattr(pipeline, "encode_text", lambda *a, **k: pytest.fail("work started"))
    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5)
    for taken in ("v.mp4.json", "v.mp4.failure.json", "v.gif"):
        (tmp_path / taken).write_text("the user's own file\n")
        with pytest.raises(fsio.OutputRefused):
            pipeline.generate(model, req, tmp_path / "v.mp4", extra_outputs=[tmp_path / "v.gif"])
        assert (tmp_path / taken).read_text() == "the user's own file\n"
        (tmp_path / taken).unlink()
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_count_steps_and_frames(model, tmp_path, capsys):
    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5, seed=1,
                                     sampler={"name": "euler", "steps": 2})
    pipeline.generate(model, req, tmp_path / "v.gif", progress=True)
    err = capsys.readouterr().err
    assert "denoise" in err and "2/2" in err and "decode" in err and "5/5" in err
    bar = pipeline._bar(False, 3, "x", "y")
    bar.update(2)
    bar.update()
    assert bar.n == 3 and bar.close() is None
    assert capsys.readouterr().err == ""  # the disabled bar writes nothing


def test_the_text_encoder_loads_in_the_requested_dtype_and_is_released(model):
    """Bug caught: the encoder loaded at its default dtype whatever ``--dtype`` asked for."""
    from mlx_video.tokenizer import load_tokenizer

    models = pipeline.Models(model, "bfloat16")
    models.tokenizer = load_tokenizer(model)
    context = pipeline.encode_text(models, ["a fox"], None, keep=True)
    assert models.text_encoder.runtime.dtype == mx.bfloat16  # the compute dtype (INT4 weights stay INT4)
    assert context.shape[0] == 1
    pipeline.encode_text(models, ["a fox"], None, keep=False)
    assert models.text_encoder is None  # not kept: released after the stage


def test_the_text_encoder_streams_unless_it_is_kept(model, monkeypatch):
    """Not kept resident, the encoder is loaded block by block (peak: one block). Bug caught: loaded whole."""
    from mlx_video.models import umt5
    from mlx_video.tokenizer import load_tokenizer

    seen, original = [], umt5.load
    monkeypatch.setattr(umt5, "load", lambda *a, **k: seen.append(k.get("stream")) or original(*a, **k))
    models = pipeline.Models(model, "float32")
    models.tokenizer = load_tokenizer(model)
    pipeline.encode_text(models, ["a fox"], None, keep=False)
    pipeline.encode_text(models, ["a fox"], None, keep=True)
    assert seen == [True, False]


def _causal_copy(model, tmp_path, change=None):
    import shutil

    from mlx_video.cli import main

    folder = tmp_path / "causal"
    shutil.copytree(model, folder)
    assert main(["convert", "--sampler", "self-forcing", "--mlx-path", str(folder)]) == 0
    if change:
        config = json.loads((folder / "config.json").read_text())
        change(config["sampler"])
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_causal_folder_is_run_causally_and_its_bad_settings_name_the_file(model, tmp_path):
    """Bugs caught: the causal settings looked up under the wrong key (the model then runs bidirectionally,
    not as it was trained), and a bad causal setting reported without the file it is in."""
    from mlx_video.utils import ModelFolderError

    req = pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=9, seed=1, sampler={"name": "unipc"})
    with pytest.raises(UsageError, match="block-causal"):
        pipeline.generate(_causal_copy(model, tmp_path / "a"), req, tmp_path / "a.mp4")
    bad = _causal_copy(model, tmp_path / "b", lambda s: s["causal"].update(frames_per_block="three"))
    with pytest.raises(ModelFolderError, match=r"config\.json: sampler\.causal"):
        pipeline.generate(bad, pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=9, seed=1),
                          tmp_path / "b.mp4")
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()


def test_no_video_is_published_when_its_sidecar_cannot_be_written(model, tmp_path, monkeypatch):
    """The videos and their metadata sidecar appear together or not at all. Bug caught: the decoder
    published the MP4 itself, so a failure writing the sidecar left a video without it."""
    from mlx_video import fsio

    original = fsio.prepare_file

    def failing(path, *a, **k):
        if str(path).endswith(".json"):
            raise OSError("disk full (simulated)")
        return original(path, *a, **k)

    monkeypatch.setattr(fsio, "prepare_file", failing)
    out = tmp_path / "v.mp4"
    with pytest.raises(OSError, match="disk full"):
        pipeline.generate(model, pipeline.GenerationRequest(prompt="a fox", height=32, width=48, frames=5, seed=1),
                          out, extra_outputs=[str(tmp_path / "v.gif")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_plan_of_a_causal_model_counts_one_block_of_latents(model, tmp_path):
    """A causal model holds one block of latent frames in the sampler, not the whole video. Bug caught: the
    block size dropped from the plan (it then failed on every causal job)."""
    folder = _causal_copy(model, tmp_path)
    short = pipeline.plan_memory(folder, pipeline.GenerationRequest(prompt="a", height=32, width=48, frames=9, seed=1),
                                 None, False)
    longer = pipeline.plan_memory(folder, pipeline.GenerationRequest(prompt="a", height=32, width=48, frames=21,
                                                                     seed=1), None, False)
    assert 0 < short.predicted["denoise"] <= longer.predicted["denoise"]


def test_a_planned_decoder_tile_is_what_the_decode_figure_assumes(model):
    """When the decoder's share of the limit needs tiles, the predicted decode peak is the tiled one. Bug
    caught: the untiled figure reported for a tiled plan (over-predicting, so plans refused jobs that fit)."""
    from mlx_video.models import taehv
    from mlx_video.utils import config_from_dict, read_config

    cfg = config_from_dict(taehv.TAEHVConfig, read_config(model)["decoder"])
    request = pipeline.GenerationRequest(prompt="a", height=720, width=1280, frames=5, seed=1)
    untiled = taehv.decoder_peak_bytes(cfg, request.latent_shape(), tile=None)
    plan = pipeline.plan_memory(model, request, 3 * untiled, False)
    assert plan.decoder_tile is not None
    tiled = taehv.decoder_peak_bytes(cfg, request.latent_shape(), tile=plan.decoder_tile)
    assert plan.predicted["decode"] == tiled < untiled
