"""VideoWriter round trips and fail-closed behaviour (no broken or partial files)."""

import json

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_video.video import (GenerationFailed, VideoWriter, check_finite, read_video, video_info,
                             write_failure_report, write_video)

N, H, W = 9, 48, 64


def clip(n=N, h=H, w=W):
    """A smooth moving gradient (H.264 friendly), floats in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [np.stack([0.5 + 0.4 * np.sin(xx / 9 + k / 3), yy / h, np.full_like(xx, 0.2 + 0.6 * k / n)], -1)
              for k in range(n)]
    return np.stack(frames).astype(np.float32)


def test_mp4_roundtrip_incremental(tmp_path):
    frames = clip()
    out = tmp_path / "video.mp4"
    with VideoWriter(out, fps=16) as writer:
        writer.write(mx.array(frames[0]))  # a single [H, W, 3] mx frame
        writer.write(frames[1:4])  # a numpy batch
        writer.write(mx.array(frames[4:]).astype(mx.bfloat16))  # bf16 mx batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # no temp file left
    info = video_info(out)
    assert (info.frames, info.width, info.height) == (N, W, H)
    assert info.fps == pytest.approx(16.0)
    back = read_video(out)
    assert back.shape == (N, H, W, 3) and back.dtype == np.uint8
    err = np.abs(back / 255.0 - frames)
    assert err.mean() < 0.02, err.mean()  # H.264 + yuv420p is lossy; measured ~0.010 at crf 18


def test_gif_and_png_folder(tmp_path):
    frames = clip()
    gif = write_video(tmp_path / "a.gif", frames, fps=10)
    assert read_video(gif).shape == (N, H, W, 3)
    assert video_info(gif).fps == pytest.approx(10.0)
    folder = write_video(tmp_path / "frames", frames)
    back = read_video(folder)
    assert back.shape == (N, H, W, 3)
    np.testing.assert_array_equal(back, np.round(frames * 255).astype(np.uint8))  # PNG is lossless
    write_video(folder, frames[:3])  # re-writing replaces the folder
    assert video_info(folder).frames == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "frames"]


def test_nan_frames_fail_closed(tmp_path):
    frames = clip()
    frames[5, 3, 4, 1] = np.nan
    out = tmp_path / "nan.mp4"
    with pytest.raises(GenerationFailed) as info:
        with VideoWriter(out) as writer:
            writer.write(frames[:5])
            writer.write(mx.array(frames[5:]))
    assert info.value.details["nan"] == 1 and info.value.stage == "decode"
    assert list(tmp_path.iterdir()) == []


def test_nan_without_context_manager_leaves_nothing(tmp_path):
    writer = VideoWriter(tmp_path / "x.mp4")
    writer.write(clip()[:2])
    with pytest.raises(GenerationFailed):
        writer.write(np.full((H, W, 3), np.inf, np.float32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(clip()[:1])


@pytest.mark.parametrize("value,reason", [(0.0, "black"), (0.6, "constant")])
def test_black_or_constant_video_fails(tmp_path, value, reason):
    out = tmp_path / "flat.mp4"
    with pytest.raises(GenerationFailed, match=reason) as info:
        write_video(out, np.full((N, H, W, 3), value, np.float32))
    assert list(tmp_path.iterdir()) == []
    report = write_failure_report(out, info.value.reason, info.value.details)
    assert report.name == "flat.mp4.failure.json"
    data = json.loads(report.read_text())
    assert reason in data["reason"] and data["details"]["frames"] == N
    assert not out.exists()


def test_dark_but_not_black_passes(tmp_path):
    frames = np.zeros((N, H, W, 3), np.float32)
    frames[:, 10:20, 10:30] = 0.8  # a lit patch on black: mean ~0.05
    write_video(tmp_path / "dark.mp4", frames)
    assert video_info(tmp_path / "dark.mp4").frames == N


def test_exception_inside_with_leaves_no_file(tmp_path):
    out = tmp_path / "boom.mp4"
    with pytest.raises(KeyError):
        with VideoWriter(out) as writer:
            writer.write(clip())
            raise KeyError("pipeline crashed")
    assert list(tmp_path.iterdir()) == []


def test_failed_run_keeps_previous_video(tmp_path):
    out = write_video(tmp_path / "keep.mp4", clip())
    before = out.read_bytes()
    with pytest.raises(GenerationFailed):
        write_video(out, np.zeros((N, H, W, 3), np.float32))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_no_frames_and_bad_shapes(tmp_path):
    with pytest.raises(GenerationFailed, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        write_video(tmp_path / "bad.mp4", np.zeros((N, H, W), np.float32))
    with pytest.raises(ValueError, match="differs"):
        with VideoWriter(tmp_path / "sizes.mp4") as writer:
            writer.write(clip()[:2])
            writer.write(clip(2, 32, 32))
    with pytest.raises(ValueError, match="format"):
        VideoWriter(tmp_path / "x.avi")
    assert list(tmp_path.iterdir()) == []


def test_check_finite():
    check_finite(mx.ones((2, 2)), "dit")
    check_finite(np.ones((2, 2)), "dit")
    check_finite(mx.array([1, 2]), "ints")  # non-float arrays are skipped
    with pytest.raises(GenerationFailed, match="after dit") as info:
        check_finite(mx.array([1.0, float("nan"), float("inf")]), "dit")
    assert (info.value.details["nan"], info.value.details["inf"]) == (1, 1)
    with pytest.raises(GenerationFailed, match="after vae"):
        check_finite(np.array([np.inf], np.float32), "vae")
