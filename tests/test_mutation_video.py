"""``mlx_video.video``: what a failed encoder says, the writer's argument checks, frame conversion, odd sizes,
fps, and the failure report file (issue 19, written against survivors of the mutation run of ``video.py``).
"""

from __future__ import annotations

import io
import json
import signal

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_video import fsio, video
from mlx_video.video import VideoWriter, read_video, write_video


class _DeadFfmpeg:
    """Stands in for the ffmpeg process of a writer: already exited with ``rc``."""

    def __init__(self, rc: int):
        self.rc, self.stdin, self.waited = rc, io.BytesIO(), 0

    def wait(self):
        self.waited += 1
        return self.rc


def _failed_writer_message(tmp_path, rc: int, said: bytes) -> str:
    w = VideoWriter(tmp_path / "v.mp4")
    w.write(np.full((1, 8, 8, 3), 0.5, np.float32))  # starts the real ffmpeg
    real = w._proc
    real.kill()
    real.wait()
    fake = _DeadFfmpeg(rc)
    w._proc = fake
    w._stderr.seek(0)
    w._stderr.truncate()
    w._stderr.write(said)
    with pytest.raises(fsio.OutputError) as info:
        w._raise_ffmpeg_failed()
    assert w._proc is None and fake.stdin.closed and fake.waited == 1
    w.abort()
    assert list(tmp_path.iterdir()) == []
    return str(info.value)


@pytest.mark.parametrize("rc,why", [
    (3, "ffmpeg failed with exit status 3"),
    (-signal.SIGKILL, "ffmpeg was killed by SIGKILL"),
    (-signal.SIGXFSZ, "ffmpeg was killed by SIGXFSZ (file size limit exceeded)"),
    (-99, "ffmpeg was killed by signal 99"),
])
def test_a_failed_encoder_says_how_it_ended_and_what_it_printed(tmp_path, rc, why):
    said = ("x" * 3000 + "No space left on device\n").encode()
    message = _failed_writer_message(tmp_path, rc, said)
    target = tmp_path / "v.mp4"
    assert message.startswith(f"cannot write {target}: {why}: ")
    assert message.endswith("No space left on device")  # the end of what ffmpeg said, stripped ...
    assert len(message) <= len(f"cannot write {target}: {why}: ") + 2000  # ... and only its last 2000 bytes


def test_a_failed_encoder_that_printed_nothing(tmp_path):
    assert _failed_writer_message(tmp_path, 1, b"") == f"cannot write {tmp_path / 'v.mp4'}: ffmpeg failed with exit status 1"


def test_killing_the_encoder_mid_video_is_an_output_error_and_leaves_nothing(tmp_path):
    w = VideoWriter(tmp_path / "v.mp4")
    w.write(np.full((1, 64, 64, 3), 0.5, np.float32))
    w._proc.kill()
    w._proc.wait()
    with pytest.raises(fsio.OutputError, match=r"ffmpeg was killed by SIGKILL"):
        for _ in range(200):  # the pipe breaks once ffmpeg is gone
            w.write(np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,message", [
    (dict(fps=0), "fps must be a positive number, got 0"),
    (dict(fps=-2.0), "fps must be a positive number, got -2.0"),
    (dict(fps=float("nan")), "fps must be a positive number, got nan"),
    (dict(fps=float("inf")), "fps must be a positive number, got inf"),
    (dict(crf=-1), r"crf must be in \[0, 51\], got -1"),
    (dict(crf=52), r"crf must be in \[0, 51\], got 52"),
])
def test_writer_arguments_are_checked_before_anything_is_created(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        VideoWriter(tmp_path / "v.mp4", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unknown_formats_are_usage_errors(tmp_path):
    with pytest.raises(video.UsageError, match="unknown video format 'webm'; choose one of mp4, gif, png"):
        VideoWriter(tmp_path / "v", format="webm")
    with pytest.raises(video.UsageError, match="cannot tell the video format of"):
        VideoWriter(tmp_path / "v.avi")
    for name, fmt in (("a.MP4", "mp4"), ("a.m4v", "mp4"), ("a.MOV", "mp4"), ("a.Gif", "gif"), ("frames", "png")):
        assert video._format_for(tmp_path / name, None) == fmt
    assert list(tmp_path.iterdir()) == []


def test_frames_in_every_accepted_form_become_the_same_pixels(tmp_path):
    """uint8 frames are taken as is (/255), floats are clipped to [0, 1], a single [H, W, 3] frame is one
    frame, bf16 MLX arrays are read through fp32."""
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "a", u8)), u8)
    f = u8.astype(np.float32) / 255.0
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "b", mx.array(f))), u8)
    wild = f * 3 - 1  # values far outside [0, 1]
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "c", wild)),
                                  np.round(np.clip(wild, 0, 1) * 255).astype(np.uint8))
    one = read_video(write_video(tmp_path / "d", f[0]))
    assert one.shape == (1, 8, 8, 3)
    bf = mx.array(f).astype(mx.bfloat16)
    expect = np.round(np.clip(np.array(bf.astype(mx.float32)), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "e", bf)), expect)
    for bad in (np.zeros((8, 8)), np.zeros((2, 8, 8, 4)), np.zeros((1, 2, 8, 8, 3))):
        with pytest.raises(ValueError, match=r"frames must be \[H, W, 3\] or \[N, H, W, 3\], got shape"):
            write_video(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()


def test_frame_size_changes_and_writes_after_close_are_refused(tmp_path):
    w = VideoWriter(tmp_path / "v.gif")
    w.write(np.full((1, 8, 10, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match="^frame size 12x8 differs from the first frame's 10x8$"):
        w.write(np.full((1, 8, 12, 3), 0.5, np.float32))
    assert not (tmp_path / "v.gif").exists() and list(tmp_path.iterdir()) == []  # the writer aborted
    frames = np.random.default_rng(0).uniform(0.2, 0.8, (2, 8, 8, 3)).astype(np.float32)
    out = write_video(tmp_path / "ok.gif", frames)
    w = VideoWriter(tmp_path / "ok2.gif")
    w.write(frames)
    assert w.close() == tmp_path / "ok2.gif" and w.close() == tmp_path / "ok2.gif"  # a second close: a no-op
    with pytest.raises(RuntimeError, match="is closed"):
        w.write(frames)
    assert out.exists()


def test_odd_sized_mp4_frames_are_edge_padded_to_even_and_fps_is_kept(tmp_path):
    # grey (no chroma to subsample) smooth ramps, different per frame, with a bright last row and a dark last
    # column that the padding must repeat
    y, x = np.mgrid[0:9, 0:13]
    frames = np.stack([(0.2 + 0.4 * (x / 12) * (k + 1) / 3 + 0.1 * y / 8) for k in range(3)]).astype(np.float32)
    frames[:, -1, :], frames[:, :, -1] = 0.9, 0.1
    frames = np.repeat(frames[..., None], 3, axis=-1)
    out = write_video(tmp_path / "odd.mp4", frames, fps=12.5, crf=0)
    info = video.video_info(out)
    assert (info.frames, info.width, info.height) == (3, 14, 10) and info.fps == pytest.approx(12.5)
    got = read_video(out).astype(int)
    expect = np.round(np.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge") * 255).astype(int)
    assert np.abs(got - expect).max() <= 3, np.abs(got - expect).max()  # crf 0 on grey: near-lossless


def test_crf_sets_the_quality(tmp_path):
    frames = np.random.default_rng(7).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    best = write_video(tmp_path / "best.mp4", frames, crf=0).stat().st_size
    worst = write_video(tmp_path / "worst.mp4", frames, crf=51).stat().st_size
    assert best > 4 * worst


def test_failure_report_is_indented_json_and_refuses_a_user_file(tmp_path):
    out = tmp_path / "v.mp4"
    report = video.write_failure_report(out, "video is all black", {"frames": 3})
    text = report.read_text()
    assert text.endswith("}\n") and '\n  "reason": "video is all black",\n' in text  # human-readable, 2 spaces
    assert json.loads(text)["details"] == {"frames": 3}
    again = video.write_failure_report(out, "second failure")  # our own report is replaced
    assert json.loads(again.read_text())["reason"] == "second failure" and json.loads(again.read_text())["details"] == {}
    user = tmp_path / "w.mp4.failure.json"
    user.write_bytes(b"\x89PNG not a report")
    with pytest.raises(fsio.OutputRefused):
        video.write_failure_report(tmp_path / "w.mp4", "x")
    assert user.read_bytes() == b"\x89PNG not a report"


def test_uppercase_gif_names_read_like_gif(tmp_path):
    frames = np.random.default_rng(8).uniform(0.1, 0.9, (3, 16, 24, 3)).astype(np.float32)
    lower = write_video(tmp_path / "a.gif", frames, fps=10)
    upper = tmp_path / "B.GIF"
    upper.write_bytes(lower.read_bytes())
    np.testing.assert_array_equal(read_video(upper), read_video(lower))
    info = video.video_info(upper)
    assert (info.frames, info.width, info.height) == (3, 24, 16) and info.fps == pytest.approx(10.0)


def test_gif_fps_is_unknown_without_a_frame_duration(tmp_path):
    from PIL import Image

    path = tmp_path / "still.gif"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)  # no duration stored
    info = video.video_info(path)
    assert info.frames == 1 and np.isnan(info.fps)


def test_png_targets_create_missing_parents_on_request_and_refusals_name_the_kind(tmp_path):
    """Missing parents of a PNG-frames target are refused unless the caller will create them. Bugs caught:
    the flag not passed on (refused even when asked), and the refusal naming the wrong kind of target."""
    target = tmp_path / "a" / "b" / "frames"
    with pytest.raises(fsio.OutputRefused):
        video.check_output(target, "png")
    video.check_output(target, "png", create_parents=True)  # allowed: the writer makes them
    assert not (tmp_path / "a").exists()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(fsio.OutputRefused, match="mlx-video replaces only PNG-frames folders it wrote"):
        video.check_output(precious, "png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(fsio.OutputRefused, match="is a file, not a PNG-frames folder; choose another path"):
        video.check_output(tmp_path / "file", "png")


def test_gifs_loop_forever(tmp_path):
    """Bug caught: the GIF played once (loop=1) instead of looping (loop=0)."""
    from PIL import Image

    path = tmp_path / "v.gif"
    write_video(path, np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32), fps=8)
    with Image.open(path) as im:
        assert im.info.get("loop") == 0


@pytest.mark.parametrize("fmt,damage,says", [
    ("mp4", b"", "the encoder produced an empty file"),
    ("mp4", b"not a video at all", "the encoder produced a file with no valid header"),
    ("gif", b"", "the encoder produced an empty file"),
    ("gif", b"GIF? no", "the encoder produced a file with no valid header"),
])
def test_an_empty_or_headerless_encoder_output_is_refused_and_removed(tmp_path, monkeypatch, fmt, damage, says):
    """The finished temporary is checked before it is published: an encoder that exits cleanly but leaves an
    empty or garbled file is an output error naming which, and neither the temporary nor the target remain."""
    target = tmp_path / f"v.{fmt}"
    w = VideoWriter(target)
    w.write(np.random.default_rng(0).random((2, 8, 8, 3), np.float32))  # healthy frames: the file is at fault
    encode = VideoWriter._finish_encoding

    def encode_then_damage(self):
        encode(self)
        self._tmp.write_bytes(damage)

    monkeypatch.setattr(VideoWriter, "_finish_encoding", encode_then_damage)
    with pytest.raises(fsio.OutputError) as info:
        w.close()
    assert str(info.value) == f"cannot write {target}: {says}"
    assert list(tmp_path.iterdir()) == []
