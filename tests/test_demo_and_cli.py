"""The README's quick-start: `mlx-video demo` then `mlx-video generate` on it; the CLI's help."""

from __future__ import annotations

import json
import subprocess
import sys

from mlx_video.cli import main
from mlx_video.video import video_info


def test_demo_model_generates_a_video(tmp_path):
    assert main(["demo", "--mlx-path", str(tmp_path / "demo")]) == 0
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert {"dit", "text_encoder", "decoder", "sampler"} <= set(config)
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--model", str(tmp_path / "demo"), "--prompt", "a red fox running through fresh snow",
                 "--height", "96", "--width", "128", "--frames", "13", "--output", str(out), "--quiet",
                 "--no-prompt-cache"]) == 0
    info = video_info(out)
    assert (info.frames, info.width, info.height) == (13, 128, 96)


def test_demo_refuses_to_overwrite_a_non_model_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["demo", "--mlx-path", str(tmp_path / "x")]) == 2  # a usage error: fsio.OutputRefused
    assert "not an mlx-video model folder" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "mlx_video", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("convert", "info", "generate", "bench", "prune", "export-swift", "demo"):
        assert command in out
    sub = subprocess.run([sys.executable, "-m", "mlx_video", "generate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--memory-limit" in sub and "--denoising-step-list" in sub and "4k+1" in sub
