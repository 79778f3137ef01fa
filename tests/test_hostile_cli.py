"""Hostile and newcomer use of the command line: every bad flag is refused before any work with exit 2 and
one line naming the flag (never a traceback), runtime failures exit 1 without the usage block, nothing is
left behind and the user's files stay byte-identical. Also: the memory plan against ``--memory-limit``
(re-plan or refuse), the few-step integer step lists, first-use messages and the README's Python snippet.

Runs on the demo model (random weights, built in about a second) at tiny sizes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_video import pipeline
from mlx_video.cli import main
from mlx_video.demo import build_demo_model
from mlx_video.models import taehv, wan_dit
from mlx_video.utils import MLX_VIDEO_FORMAT, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--height", "32", "--width", "48", "--frames", "5"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    """A working folder holding the user's own files (which must never change) and nothing else."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("the user's notes\n")
    (tmp_path / "holiday.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not ours")
    return tmp_path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``mlx-video ARGV`` in-process: (exit status, stdout, stderr); argparse's own exits count too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(argv, capsys, folder: Path, code: int, *needles: str) -> str:
    before = _snapshot(folder)
    got, _, err = run_cli(argv, capsys)
    assert got == code, (argv, got, err)
    assert "Traceback" not in err, err
    assert "usage:" not in err or code == 2, err  # runtime failures never print the usage block
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(folder) == before, "files were created, changed or removed"
    return err


# --------------------------------------------------------------------------------------------------
# generate: every flag checked before any work (exit 2, the flag named)
# --------------------------------------------------------------------------------------------------

BAD_GENERATE_FLAGS = [
    (["--seed", "-5"], "--seed"),
    (["--seed", str(2**80)], "--seed"),
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "-1"], "--guidance"),
    (["--shift", "nan"], "--shift"),
    (["--shift", "0"], "--shift"),
    (["--fps", "nan"], "--fps"),
    (["--fps", "0"], "--fps"),
    (["--steps", "0"], "--steps"),
    (["--frames", "10"], "4k+1"),
    (["--frames", "-3"], "--frames"),
    (["--height", "50"], "multiple of 16"),
    (["--width", "0"], "--width"),
    (["--output", "clip.avi"], "'.avi'"),
    (["--save-frames", "frames.png"], "--save-frames"),
    (["--memory-limit=infGB"], "--memory-limit"),
    (["--memory-limit=-1GB"], "--memory-limit"),
    (["--memory-limit", "1B"], "--memory-limit"),
    (["--memory-limit", "lots"], "--memory-limit"),
    (["--memory-limit", "1000TB"], "more than this machine's memory"),
    (["--denoising-step-list", "1000", "nan"], "--denoising-step-list"),
    (["--denoising-step-list", "250", "500"], "strictly decreasing"),
    (["--sampler", "ddim"], "invalid choice"),
    (["-q"], "unrecognized arguments: -q"),  # -q quantizes (convert); generate's quiet is --quiet only
    (["--output", "missing-folder/out.mp4"], "does not exist"),
    (["--prompt-file", "."], "--prompt-file"),
    (["--output", "clip.gif", "--gif"], "--gif"),
]


@pytest.mark.parametrize("flags, needle", BAD_GENERATE_FLAGS, ids=[" ".join(f) for f, _ in BAD_GENERATE_FLAGS])
def test_generate_refuses_bad_flags_before_any_work(demo, user_dir, capsys, flags, needle):
    argv = ["generate", "--model", demo, "--prompt", "a fox", *TINY, "--no-prompt-cache", "--quiet", *flags]
    assert_refused(argv, capsys, user_dir, 2, needle)


def test_generate_refuses_missing_models_and_says_what_to_run(user_dir, capsys, monkeypatch):
    assert_refused(["generate", "--model", user_dir / "nope", "--prompt", "x"], capsys, user_dir, 2, "nope")
    assert_refused(["generate", "--model", user_dir, "--prompt", "x"], capsys, user_dir, 2,
                   "not an mlx-video model folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = assert_refused(["generate", "--model", "someone/not-downloaded", "--prompt", "x"], capsys, user_dir, 2,
                         "hf download someone/not-downloaded", "mlx-video convert --hf-path")
    assert "huggingface-cli" not in err


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe not json", "sidecar.json"),
    (b"[1, 2, 3]", "JSON object"),
    (json.dumps({"prompt": "x", "height": "tall"}).encode(), "'height'"),
])
def test_config_from_metadata_refuses_bad_sidecars(demo, user_dir, capsys, content, needle):
    (user_dir / "sidecar.json").write_bytes(content)
    assert_refused(["generate", "--model", demo, "--config-from-metadata", "sidecar.json"], capsys, user_dir, 2,
                   needle)


def test_runtime_failure_exits_1_without_usage_block(demo, user_dir, capsys):
    broken = user_dir / "broken-model"
    shutil.copytree(demo, broken)
    (broken / "config.json").write_text('{"format": "mlx-video/1", "dit": {"dim": "wide"}}')
    err = assert_refused(["generate", "--model", broken, "--prompt", "x", *TINY, "--no-prompt-cache", "--quiet"],
                         capsys, user_dir, 1, "config.json")
    assert "usage:" not in err and "dim" in err


# --------------------------------------------------------------------------------------------------
# Memory limits that hold
# --------------------------------------------------------------------------------------------------


def _folder(tmp: Path, **sections) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({"format": MLX_VIDEO_FORMAT, **sections}))
    return tmp


def test_memory_limit_below_the_plan_is_refused_before_any_work(demo, user_dir, capsys):
    err = assert_refused(["generate", "--model", demo, "--prompt", "x", "--memory-limit", "64MB", "--quiet",
                          "--no-prompt-cache"], capsys, user_dir, 2, "does not fit the memory limit of 64 MB")
    assert re.search(r"denoise needs \d+ MB", err) and "predicted peaks per stage" in err


def test_a_job_the_machine_cannot_hold_is_refused_at_the_default_limit(demo, user_dir, capsys):
    """4096x4096x81 with the real Lightning DiT config: refused in the plan, before any weight is read."""
    big = user_dir / "lightning-config"
    shutil.copytree(demo, big)
    config = json.loads((big / "config.json").read_text())
    config["dit"] = {**config_to_dict(wan_dit.lightning_video()), "weights_file": "dit.safetensors"}
    config["dit"]["text_dim"] = config["text_encoder"]["dim"]
    (big / "config.json").write_text(json.dumps(config))
    assert_refused(["generate", "--model", big, "--prompt", "x", "--height", "4096", "--width", "4096", "--frames",
                    "81", "--quiet", "--no-prompt-cache"], capsys, user_dir, 2, "does not fit the memory limit",
                   "4096x4096x81")


def test_plan_shrinks_attention_chunks_to_fit(tmp_path, monkeypatch):
    """Chunked CPU attention (no native kernel): the default score budget (limit / 8) does not fit with 3.6 GB of
    weights at 4.7 GB; the plan halves it until the predicted peak fits."""
    from mlx_video import native

    monkeypatch.setattr(native, "enabled", lambda: False)
    monkeypatch.setattr(pipeline, "_component_bytes", lambda folder, section: int(3.6 * 2**30))
    folder = _folder(tmp_path / "m", dit=config_to_dict(wan_dit.lightning_video()))
    request = pipeline.GenerationRequest(prompt="x", height=352, width=624, frames=49)
    limit = int(4.7 * 2**30)
    plan = pipeline.plan_memory(folder, request, limit, low_memory=False)
    assert plan.attention_budget_bytes < limit // 8 and plan.predicted["denoise"] <= limit
    assert any("attention" in n for n in plan.notes)
    cfg = wan_dit.lightning_video()
    unplanned = pipeline.dit_peak_bytes(cfg, request.latent_shape(), int(3.6 * 2**30), limit // 8)
    assert unplanned > limit  # the re-plan was needed
    with pytest.raises(pipeline.MemoryPlanError, match="denoise needs"):
        pipeline.plan_memory(folder, request, int(4.0 * 2**30), low_memory=False)


def test_plan_gives_the_decoder_the_whole_limit_or_refuses_clearly(tmp_path):
    folder = _folder(tmp_path / "m", decoder=config_to_dict(taehv.taew2_1()))
    request = pipeline.GenerationRequest(prompt="x", height=480, width=832, frames=81)
    limit = 512 * 2**20
    with pytest.raises(MemoryError):  # the decoder's default share of the limit cannot hold it ...
        taehv.choose_tile(taehv.taew2_1(), request.latent_shape(), limit // 4)
    plan = pipeline.plan_memory(folder, request, limit, low_memory=False)  # ... so the plan gives it the whole limit
    assert plan.predicted["decode"] <= limit and any("decoder" in n for n in plan.notes)
    with pytest.raises(pipeline.MemoryPlanError, match="TAEHV streaming decode .* does not fit"):
        pipeline.plan_memory(folder, request, 256 * 2**20, low_memory=False)
    assert issubclass(pipeline.MemoryPlanError, pipeline.UsageError)  # exit 2, not a traceback


def test_plan_streams_a_resident_text_encoder_that_does_not_fit(demo, tmp_path):
    request = pipeline.GenerationRequest(prompt="x", height=32, width=48, frames=5)
    roomy = pipeline.plan_memory(demo, request, 4 * 2**30, low_memory=False, keep_models=True)
    assert roomy.stream_text_encoder is False
    config = json.loads((demo / "config.json").read_text())
    resident = pipeline.encode_peak_bytes(config, 512, 1, stream=False)
    streamed = pipeline.encode_peak_bytes(config, 512, 1, stream=True)
    assert streamed < resident
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(pipeline, "MIN_MEMORY_LIMIT", 1)
    try:  # a limit between the two: the plan streams instead of refusing
        limit = (streamed + resident) // 2
        tight = pipeline.plan_memory(_folder(tmp_path / "t", text_encoder=config["text_encoder"]), request, limit,
                                     low_memory=False, keep_models=True)
    finally:
        monkeypatch.undo()
    assert tight.stream_text_encoder is True and tight.predicted["encode"] <= limit and tight.notes


def test_a_stage_above_the_limit_warns(capsys):
    import mlx.core as mx

    stats = {}
    with pipeline._stage("denoise", stats, lambda e: None, predicted=1000, limit=1000):
        mx.eval(mx.zeros((1024, 1024)))
    err = capsys.readouterr().err
    assert "denoise stage peaked at" in err and "above the memory limit" in err


# --------------------------------------------------------------------------------------------------
# Few-step --steps N: evenly spaced integers, then warped (Self-Forcing / CausVid)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [
    (3, [1000, 666, 333]),
    (4, [1000, 750, 500, 250]),
    (6, [1000, 833, 666, 500, 333, 166]),
    (7, [1000, 857, 714, 571, 428, 285, 142]),
    (9, [1000, 888, 777, 666, 555, 444, 333, 222, 111]),
])
def test_fewstep_steps_n_are_integer_lists_warped_like_the_references(n, expected):
    from mlx_video import sampling

    config = sampling.sampler_config(None, steps=n)
    assert config.denoising_step_list == expected
    # Warp (models.md §5.3): t = 1000 * shift(sigma), sigma = list / 1000 (float32 table entries).
    s = 5.0
    sig = np.array(expected, np.float64) / 1000
    reference = 1000 * s * sig / (1 + (s - 1) * sig)
    assert np.allclose(sampling.sampler_timesteps(steps=n), reference, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# convert, info, export-swift, bench: usage errors exit 2
# --------------------------------------------------------------------------------------------------


def test_convert_usage_errors_exit_2(user_dir, capsys):
    out = user_dir / "out-model"
    cases = [
        (["convert", "--mlx-path", out], "nothing to convert"),
        (["convert", "--mlx-path", out, "--text-encoder", "t5.pth", "--tokenizer", "spiece.model", "-q", "--q-bits",
          "7"], "--q-bits 7"),
        (["convert", "--mlx-path", out, "--text-encoder", "t5.pth", "-q", "--q-group-size", "48"], "--tokenizer"),
        (["convert", "--mlx-path", out, "--text-encoder", "t5.pth", "--tokenizer", "spiece.model", "-q",
          "--q-group-size", "48"], "--q-group-size 48"),
        (["convert", "--mlx-path", user_dir / "no" / "out", "--decoder", "taew2_1.pth"], "does not exist"),
        (["convert", "--mlx-path", user_dir / "precious.txt", "--decoder", "taew2_1.pth"], "not a folder"),
        (["convert", "--mlx-path", out, "--hf-path", user_dir / "no-such-download"], "--hf-path"),
        (["convert", "--mlx-path", out, "--dit", "d.pth", "-q"], "-q/--quantize"),
    ]
    for argv, needle in cases:
        assert_refused(argv, capsys, user_dir, 2, needle)


def test_info_and_export_swift_take_model_and_refuse_clearly(demo, user_dir, capsys):
    code, out, _ = run_cli(["info", "--model", demo, "--json"], capsys)
    assert code == 0 and json.loads(out)["components"]["dit"]["tensors"] > 0
    code, out2, _ = run_cli(["info", demo, "--json"], capsys)  # the positional form still works
    assert code == 0 and json.loads(out2) == json.loads(out)
    assert_refused(["info", "--model", user_dir / "nope"], capsys, user_dir, 2, "nope")
    code, out3, _ = run_cli(["info", "--json"], capsys)  # no model: the built-in one (mlx_video/default_model)
    assert code == 0 and json.loads(out3)["components"]["dit"]["tensors"] > 0
    assert_refused(["info", demo, "--model", user_dir], capsys, user_dir, 2, "two models")


def test_info_into_a_closed_pipe_is_quiet(demo):
    shell = f"{sys.executable} -m mlx_video info --json --model {demo} | head -c 10"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stdout.startswith("{") and r.returncode in (0, 141)


BAD_BENCH_FLAGS = [
    (["--stages", "bogus"], "--stages: unknown value 'bogus'"),
    (["--stages", "model"], "--model DIR"),
    (["--shapes", "huge"], "--shapes"),
    (["--repeats", "0"], "--repeats"),
    (["--decode-latents", "paper:x"], "--decode-latents"),
    (["--shape-repeats", "moon:2"], "--shape-repeats"),
    (["--models", "gpt"], "--models"),
    (["--profile-shape", "big"], "--profile-shape"),
]


@pytest.mark.parametrize("flags, needle", BAD_BENCH_FLAGS, ids=[" ".join(f) for f, _ in BAD_BENCH_FLAGS])
def test_bench_refuses_bad_flags_before_any_work(user_dir, capsys, flags, needle):
    assert_refused(["bench", "--no-reference", "--out", "bench-out", *flags], capsys, user_dir, 2, needle)


def test_bench_model_refuses_a_missing_folder(user_dir, capsys):
    assert_refused(["bench", "--model", user_dir / "nope", "--out", "bench-out"], capsys, user_dir, 2, "nope")


def test_bench_short_summary_of_a_full_report():
    from benchmarks import report

    path = ROOT / "benchmarks" / "results"
    sample = next(iter(sorted(path.glob("*.json"))), None)
    if sample is None:
        pytest.skip("no stored benchmark report")
    results = json.loads(sample.read_text())
    lines = report.short_summary(results)
    assert 3 <= len(lines) <= len(results["stages"]) + 3
    assert any(line.startswith("dit_step") for line in lines) and lines[-1].startswith("targets:")
    assert len(report.markdown(results).splitlines()) > 2 * len(lines)


def test_bench_modules_have_no_import_circle():
    """report.py and derive.py do not import the entry points (run.py / cli.py); run.py is a thin entry point."""
    for name in ("report.py", "derive.py", "common.py", "dit.py", "text.py", "decoder.py", "model_folder.py"):
        text = (ROOT / "benchmarks" / name).read_text()
        assert "benchmarks.run" not in text and "benchmarks.cli" not in text and "from benchmarks import run" \
            not in text, name
    assert len((ROOT / "benchmarks" / "run.py").read_text().splitlines()) < 30


# --------------------------------------------------------------------------------------------------
# First use
# --------------------------------------------------------------------------------------------------


def test_help_explains_defaults_once(capsys):
    code, gen_help, _ = run_cli(["generate", "--help"], capsys)
    assert code == 0
    flat = " ".join(gen_help.split())
    for needle in ("(default: out.mp4)", "prompt-embeddings", "unipc/euler 50", "guidance 5", "0..4294967295",
                   "coloured noise", "3: 1000 666 333"):
        assert needle in flat, needle
    assert "-q," not in gen_help and "--quiet" in gen_help
    for command in ("convert", "bench", "export-swift", "info", "prune"):
        code, text, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "(default: None)" not in text, command
        assert not re.search(r"\(default[^)]*\) \(default", " ".join(text.split())), command
    import argparse

    from mlx_video.cli import build_parser

    subparsers = next(a for a in build_parser(["bench"])._actions if isinstance(a, argparse._SubParsersAction))
    bench = subparsers.choices["bench"]
    assert [a.option_strings for a in bench._actions if not a.help] == []  # every bench option has help


def test_python_m_generate_help_prints_the_help():
    r = subprocess.run([sys.executable, "-m", "mlx_video.generate", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "--memory-limit" in r.stdout and "usage: python -m mlx_video.generate" in r.stdout


def test_missing_blas_path_is_named():
    r = subprocess.run([sys.executable, "-c", "import mlx_video"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MLX_VIDEO_BLAS": "/nonexistent.so"})
    assert r.returncode == 0 and "MLX_VIDEO_BLAS=/nonexistent.so: that path does not exist" in r.stderr


@pytest.mark.filterwarnings("ignore::mlx_video.tokenizer.PromptTruncatedWarning")  # the in-process replay
def test_demo_run_says_noise_warns_once_and_replays_from_elsewhere(demo, user_dir, capsys):
    """A long prompt: one truncation line without Python source; the summary says the demo makes noise; the
    sidecar's absolute model path replays from another working folder."""
    prompt = " ".join(["a red fox running through fresh snow"] * 120)
    r = subprocess.run([sys.executable, "-m", "mlx_video", "generate", "--model", str(demo), "--prompt", prompt,
                        *TINY, "--no-prompt-cache", "--output", "fox.mp4", "--steps", "3", "--seed", "4"],
                       capture_output=True, text=True, timeout=300, cwd=user_dir)
    err = r.stderr
    assert r.returncode == 0, err
    assert err.count("prompt truncated") == 1 and "warnings.warn" not in err and ".py:" not in err, err
    assert "coloured noise" in err
    meta = json.loads((user_dir / "fox.mp4.json").read_text())
    assert Path(meta["model_path"]).is_absolute()
    assert meta["sampler"]["denoising_step_list"] == [1000, 666, 333]
    elsewhere = user_dir / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    code, _, err = run_cli(["generate", "--config-from-metadata", user_dir / "fox.mp4.json", "--output", "again.mp4",
                            "--quiet", "--no-prompt-cache"], capsys)
    assert code == 0, err
    again = json.loads((elsewhere / "again.mp4.json").read_text())
    assert (again["prompt"], again["seed"], again["model_path"]) == (prompt, 4, meta["model_path"])
    assert (user_dir / "precious.txt").read_text() == "the user's notes\n"


def test_readme_python_snippet_runs_as_written(user_dir):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    result = namespace["result"]
    assert (user_dir / "fox.mp4").stat().st_size > 0 and (user_dir / "fox.mp4.json").exists()
    assert result.stages["denoise"].seconds > 0 and result.stages["denoise"].peak_memory_bytes > 0
    assert math.isfinite(result.stages["decode"].seconds)


def test_hub_hint_tells_a_converted_folder_from_a_checkpoint(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from mlx_video.utils import hub_download_hint

    def listing(*files):
        return lambda self, repo, timeout=None: SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", listing("config.json", "dit.safetensors",
                                                                     "decoder.safetensors", "spiece.model"))
    assert hub_download_hint("someone/video-mlx") == (
        "It is a converted mlx-video folder: `hf download someone/video-mlx --local-dir video-mlx` then "
        "`--model video-mlx`.")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", listing(
        "config.json", "diffusion_pytorch_model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"))
    hint = hub_download_hint("Wan-AI/Wan2.1-T2V-1.3B")
    assert hint.startswith("It is a PyTorch checkpoint")
    assert "mlx-video convert --hf-path Wan2.1-T2V-1.3B-pytorch" in hint


def test_convert_hf_path_finds_the_wan_files_and_fails_cleanly_on_garbage(user_dir, capsys):
    """A Wan-AI download layout: DiT, UMT5 encoder and tokenizer are found; garbage weights are a runtime
    failure (exit 1) naming the file, and no output folder appears."""
    ckpt = user_dir / "wan-download"
    (ckpt / "google" / "umt5-xxl").mkdir(parents=True)
    (ckpt / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (ckpt / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"not a pickle")
    (ckpt / "google" / "umt5-xxl" / "spiece.model").write_bytes(b"not a sentencepiece model")
    err = assert_refused(["convert", "--hf-path", ckpt, "--mlx-path", user_dir / "wan-mlx"], capsys, user_dir, 1,
                         "wan-download")
    assert "usage:" not in err


def test_bench_model_times_your_own_folder(demo, user_dir, capsys):
    code, out, err = run_cli(["bench", "--model", demo, "--shapes", "tiny", "--repeats", "1", "--out", "bench-out"],
                             capsys)
    assert code == 0, err
    results = json.loads((user_dir / "bench-out" / "bench.json").read_text())
    stages = {s["stage"]: s for s in results["stages"]}
    assert {"model:encode", "model:denoise", "model:decode", "model:end_to_end"} <= set(stages)
    assert stages["model:denoise"]["mlx"]["time"]["median_s"] > 0 and stages["model:denoise"]["model"] == demo.name
    assert stages["model:denoise"]["mlx"]["predicted_peak_bytes"] > 0
    assert len(out.splitlines()) <= 8 and "model:denoise" in out  # a short summary; the report is in the files
    assert (user_dir / "bench-out" / "bench.md").read_text().startswith("# mlx-video benchmark")


BAD_PRUNE_FLAGS = [
    (["--heads", "0"], "--heads must be >= 1"),
    (["--timesteps", "nan"], "--timesteps"),
    (["--latent-shape", "0", "4", "4"], "--latent-shape"),
    (["--calibration", "no-prompts.txt"], "--calibration no-prompts.txt"),
    (["--mlx-path", "missing/pruned"], "--mlx-path"),
]


@pytest.mark.parametrize("flags, needle", BAD_PRUNE_FLAGS, ids=[" ".join(f) for f, _ in BAD_PRUNE_FLAGS])
def test_prune_refuses_bad_flags_before_any_work(demo, user_dir, capsys, flags, needle):
    argv = ["prune", "--model", demo, "--mlx-path", "pruned", "--synthetic-text", *flags]
    assert_refused(argv, capsys, user_dir, 2, needle)


def test_parameter_counts_read_like_numbers():
    from mlx_video.utils import readable_count

    assert [readable_count(n) for n in (911_536_960, 612_000, 418_000, 5_120)] == ["0.91B", "0.6M", "0.4M", "5,120"]


def test_exit_status_policy_maps_exception_kinds(capsys):
    from types import SimpleNamespace

    from mlx_video.cli import run_command
    from mlx_video.utils import ModelFolderError, UsageError

    def raising(exc):
        def func(args):
            raise exc
        return func

    args = SimpleNamespace(command="generate")
    cases = [(UsageError("--seed must be in 0..9"), 2, "--seed"), (ModelFolderError("x/config.json: bad"), 1, "x/"),
             (OSError(28, "No space left on device"), 1, "No space"), (MemoryError(), 1, "out of memory"),
             (KeyboardInterrupt(), 130, "interrupted")]
    for exc, code, needle in cases:
        assert run_command(raising(exc), args) == code, exc
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and "usage:" not in err, err
    with pytest.raises(ZeroDivisionError):  # a bug in mlx-video keeps its traceback
        run_command(raising(ZeroDivisionError()), args)
