"""Video output: incremental MP4 (H.264) / GIF / PNG-folder writing with fail-closed health checks.

Nothing broken is ever left at the target path: frames go to a hidden temporary file next to the target
(same filesystem) that is renamed over the target only when ``close()`` succeeds and the finished file
checks out (ffmpeg's exit status, a valid header, every frame there). A non-finite frame, an all-black or
constant video, no frames at all, a failed write (disk full, ``ulimit -f``) or an exception inside
``with VideoWriter(...)`` removes the temporary file. Existing targets are replaced only if mlx-video
could have written them (``fsio``). Health failures raise ``GenerationFailed``; the caller records it next
to the intended output with ``write_failure_report`` (``<output>.failure.json``).

Frames are ``[H, W, 3]`` or ``[N, H, W, 3]`` mx/np arrays, floats in [0, 1] (clipped) or uint8.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import fsio
from .utils import UsageError

DEFAULT_FPS = 16
DEFAULT_CRF = 18  # H.264 constant rate factor: 0 lossless .. 51 worst; 18 is visually near-lossless
BLACK_THRESHOLD = 1.0 / 255.0  # mean below this in every frame: black video
CONSTANT_THRESHOLD = 1.0 / 255.0  # max - min over all pixels below this: constant video
FORMATS = ("mp4", "gif", "png")


class GenerationFailed(RuntimeError):
    """A generation produced unusable output (NaN/Inf, black or constant video). Fail closed."""

    def __init__(self, reason: str, stage: str = "", details: dict | None = None):
        super().__init__(f"{stage}: {reason}" if stage else reason)
        self.reason = reason
        self.stage = stage
        self.details = dict(details or {})


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    try:  # mx.array (bf16 has no numpy dtype: go through fp32)
        import mlx.core as mx

        if isinstance(array, mx.array):
            if array.dtype == mx.bfloat16:
                array = array.astype(mx.float32)
            return np.array(array)
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(array)


def check_finite(array, stage: str) -> None:
    """Raise ``GenerationFailed`` if ``array`` (mx or np) holds NaN or Inf; ``stage`` names where."""
    try:
        import mlx.core as mx

        if isinstance(array, mx.array):
            if not mx.issubdtype(array.dtype, mx.floating):
                return
            bad = mx.logical_not(mx.isfinite(array))
            if not mx.any(bad).item():
                return
            n_nan, n_bad = int(mx.isnan(array).sum().item()), int(bad.sum().item())
            raise GenerationFailed(f"non-finite values after {stage}", stage,
                                   {"nan": n_nan, "inf": n_bad - n_nan, "size": array.size, "shape": list(array.shape)})
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.inexact):
        return
    bad = ~np.isfinite(a)
    if bad.any():
        n_nan = int(np.isnan(a).sum())
        raise GenerationFailed(f"non-finite values after {stage}", stage,
                               {"nan": n_nan, "inf": int(bad.sum()) - n_nan, "size": int(a.size), "shape": list(a.shape)})


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # numpy / mlx scalars and small arrays
        try:
            return _to_numpy(o).tolist()
        except Exception:  # noqa: BLE001
            pass
    return str(o)


def failure_report_path(output_path) -> Path:
    return Path(str(output_path) + ".failure.json")


def write_failure_report(output_path, reason: str, details: dict | None = None) -> Path:
    """Write ``<output_path>.failure.json`` (reason, details, time) atomically; returns its path."""
    output_path = Path(output_path)
    report = failure_report_path(output_path)
    report.parent.mkdir(parents=True, exist_ok=True)
    payload = {"output": str(output_path), "reason": reason, "details": dict(details or {}),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return fsio.write_file(report, json.dumps(payload, indent=2, default=_json_default) + "\n", "json")


@dataclass
class FrameStats:
    """Running statistics over every written pixel (values in [0, 1])."""

    frames: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    max_frame_mean: float = float("-inf")
    frame_means: list[float] = field(default_factory=list)

    def update(self, frames: np.ndarray) -> None:  # float [N, H, W, 3] in [0, 1]
        means = frames.reshape(frames.shape[0], -1).mean(axis=1)
        self.frames += frames.shape[0]
        self.min = min(self.min, float(frames.min()))
        self.max = max(self.max, float(frames.max()))
        self.max_frame_mean = max(self.max_frame_mean, float(means.max()))
        self.frame_means.extend(float(m) for m in means)

    def problem(self) -> str | None:
        if self.frames == 0:
            return "no frames were written"
        if self.max_frame_mean < BLACK_THRESHOLD:
            return "video is all black"
        if self.max - self.min < CONSTANT_THRESHOLD:
            return "video is a constant color"
        return None

    def summary(self) -> dict:
        d = asdict(self)
        d["frame_means"] = [round(m, 6) for m in self.frame_means[:64]]
        return d


def _frames_float(frames) -> np.ndarray:
    a = _to_numpy(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be [H, W, 3] or [N, H, W, 3], got shape {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def _format_for(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise UsageError(f"unknown video format {format!r}; choose one of {', '.join(FORMATS)}")
        return format
    suffix = path.suffix.lower()
    if suffix in (".mp4", ".m4v", ".mov"):
        return "mp4"
    if suffix == ".gif":
        return "gif"
    if suffix == "":
        return "png"  # a folder of frame_00000.png ...
    raise UsageError(f"cannot tell the video format of {path} (use .mp4, .gif, or a folder name for PNG frames)")


class VideoWriter:
    """Write frames incrementally; the target appears only after a successful, healthy ``close()``.

    >>> with VideoWriter("out.mp4", fps=16) as w:
    ...     w.write(frames)            # [H, W, 3] or [N, H, W, 3], floats in [0, 1]

    ``format``: "mp4" (H.264, yuv420p, ``crf``), "gif" or "png" (a folder of numbered frames plus a
    ``.mlx-video-frames`` manifest); default from the suffix. ``check_health=False`` disables the
    black/constant check (NaN is always an error). An existing target is replaced only if mlx-video could
    have written it (``fsio``: a regular MP4/GIF file, or a frames folder with our manifest); anything else
    raises ``fsio.OutputRefused`` here, before any frame. ``close()`` = ``finish()`` (encode and verify:
    ffmpeg's exit status, the file's header and frame count) + ``publish()`` (the rename); a failed write
    raises ``fsio.OutputError`` and leaves no file.
    """

    def __init__(self, path, fps: float = DEFAULT_FPS, crf: int = DEFAULT_CRF, format: str | None = None,
                 check_health: bool = True, preset: str = "medium"):
        self.path = Path(path)
        self.format = _format_for(self.path, format)
        if not fps > 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be a positive number, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.fps, self.crf, self.preset, self.check_health = fps, int(crf), preset, check_health
        self.stats = FrameStats()
        self.size: tuple[int, int] | None = None  # (width, height)
        self._proc: subprocess.Popen | None = None  # ffmpeg (mp4)
        self._stderr = None
        self._gif_frames: list[np.ndarray] = []
        self._closed = self._finished = False
        self._tmp: Path | None = None
        check_output(self.path, self.format, create_parents=True)
        try:
            self._tmp = fsio.make_temp_folder(self.path) if self.format == "png" else fsio.make_temp_file(self.path)
        except BaseException:
            self._closed = True
            raise
        fsio.acquire_signal_guard()

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        self.close()
        return False

    # -- writing ----------------------------------------------------------------------------------------
    def write(self, frames) -> None:
        """Append one frame ``[H, W, 3]`` or a batch ``[N, H, W, 3]``. NaN/Inf aborts the video."""
        if self._closed or self._finished:
            raise RuntimeError(f"VideoWriter for {self.path} is closed")
        try:
            check_finite(frames, "decode")
            f = _frames_float(frames)
            h, w = f.shape[1:3]
            if self.size is None:
                self.size = (w, h)
                self._start()
            elif self.size != (w, h):
                raise ValueError(f"frame size {w}x{h} differs from the first frame's {self.size[0]}x{self.size[1]}")
            self.stats.update(f)
            u8 = np.round(f * 255.0).astype(np.uint8)
            self._write_uint8(u8)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise fsio.OutputError(f"cannot write {self.path} ({exc.strerror or exc})") from None
            raise

    def _start(self) -> None:
        if self.format != "mp4":
            return
        import imageio_ffmpeg

        w, h = self.size
        if w % 2 or h % 2:
            w, h = w + w % 2, h + h % 2  # yuv420p needs even sizes: frames are edge-padded
        self._even_size = (w, h)
        # Our own ffmpeg process (imageio-ffmpeg's writer ignores the exit status): its stderr goes to an
        # anonymous file, so a failure can say why.
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}",
               "-pix_fmt", "rgb24", "-r", str(Fraction(self.fps).limit_denominator()), "-i", "-", "-an",
               "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error", "-crf", str(self.crf),
               "-preset", self.preset, "-movflags", "+faststart", "-f", "mp4", str(self._tmp)]
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def _write_uint8(self, u8: np.ndarray) -> None:
        if self.format == "mp4":
            w, h = self._even_size
            if (w, h) != self.size:
                u8 = np.pad(u8, ((0, 0), (0, h - u8.shape[1]), (0, w - u8.shape[2]), (0, 0)), mode="edge")
            try:
                self._proc.stdin.write(np.ascontiguousarray(u8).tobytes())
            except OSError:  # ffmpeg is gone (no space, file size limit, killed): say what it said
                self._raise_ffmpeg_failed()
        elif self.format == "gif":
            self._gif_frames.extend(u8)
        else:
            import imageio.v3 as iio

            start = self.stats.frames - u8.shape[0]
            for k, frame in enumerate(u8):
                iio.imwrite(self._tmp / f"frame_{start + k:05d}.png", frame, extension=".png")

    def _raise_ffmpeg_failed(self):
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except OSError:
            pass
        rc = proc.wait()
        self._stderr.seek(0)
        said = self._stderr.read()[-2000:].decode(errors="replace").strip()
        if rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
            why = f"ffmpeg was killed by {name}" + (" (file size limit exceeded)" if name == "SIGXFSZ" else "")
        else:
            why = f"ffmpeg failed with exit status {rc}"
        raise fsio.OutputError(f"cannot write {self.path}: {why}" + (f": {said}" if said else ""))

    # -- finishing --------------------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish, check and move the video into place. Raises ``GenerationFailed`` or ``fsio.OutputError``
        (no file left either way)."""
        if self._closed:
            return self.path
        self.finish()
        return self.publish()

    def finish(self) -> None:
        """Finish encoding and verify the file, without publishing it yet (``publish()`` or ``abort()``)."""
        if self._closed or self._finished:
            return
        try:
            problem = self.stats.problem()
            if problem is not None and (self.check_health or self.stats.frames == 0):
                raise GenerationFailed(problem, "video", self.stats.summary())
            self._finish_encoding()
            self._verify()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise fsio.OutputError(f"cannot write {self.path} ({exc.strerror or exc})") from None
            raise
        self._finished = True

    def _finish_encoding(self) -> None:
        if self.format == "mp4":
            self._proc.stdin.close()
            if self._proc.wait() != 0:
                self._raise_ffmpeg_failed()
            self._proc = None
            self._stderr.close()
        elif self.format == "gif":
            import imageio.v3 as iio

            iio.imwrite(self._tmp, np.stack(self._gif_frames), extension=".gif", duration=1000.0 / self.fps, loop=0)
            self._gif_frames = []
        else:
            files = [f"frame_{k:05d}.png" for k in range(self.stats.frames)]
            manifest = {"format": fsio.FRAMES_FORMAT, "frames": self.stats.frames, "fps": self.fps, "files": files}
            (self._tmp / fsio.FRAMES_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    def _verify(self) -> None:
        """The finished temporary must be a readable video holding every frame written."""
        if self.format == "png":
            n = len(list(self._tmp.glob("frame_*.png")))
        else:
            size = self._tmp.stat().st_size
            with open(self._tmp, "rb") as f:
                head = f.read(16)
            if size == 0 or not fsio.KINDS[FORMAT_KIND[self.format]][1](head):
                raise fsio.OutputError(f"cannot write {self.path}: the encoder produced "
                                       f"{'an empty file' if size == 0 else 'a file with no valid header'}")
            n = _count_frames(self._tmp, self.format)
            if self.format == "gif" and 0 < n <= self.stats.frames:
                n = self.stats.frames  # Pillow merges identical consecutive frames into one longer frame
        if n != self.stats.frames:
            raise fsio.OutputError(f"cannot write {self.path}: the finished file holds {n} frames, "
                                   f"{self.stats.frames} were written (truncated output)")

    def publish(self) -> Path:
        """Move the finished video over the target (old frame folder aside, new in, old removed)."""
        if self._closed:
            return self.path
        if not self._finished:
            raise RuntimeError(f"VideoWriter for {self.path}: publish() before finish()")
        try:
            if self.format == "png":
                check_output(self.path, self.format)  # may have changed while we encoded
                fsio.replace_folder(self._tmp, self.path)
            else:
                fsio.publish_file(self._tmp, self.path, FORMAT_KIND[self.format])
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        self._closed = True
        fsio.release_signal_guard()
        return self.path

    def abort(self) -> None:
        """Stop without producing a file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            try:
                proc.stdin.close()
            except OSError:  # the pipe is broken: ffmpeg is gone, which is what we want
                pass
        if self._stderr is not None:
            self._stderr.close()
        self._gif_frames = []
        tmp, self._tmp = self._tmp, None
        fsio.discard(tmp)
        fsio.release_signal_guard()


FORMAT_KIND = {"mp4": "mp4", "gif": "gif"}


def check_output(path, format: str | None = None, create_parents: bool = False) -> None:
    """Refuse (``fsio.OutputRefused``) a video target mlx-video may not replace; see ``VideoWriter``."""
    path = Path(path)
    format = _format_for(path, format)
    if format == "png":
        fsio.check_folder_target(path, fsio.frames_folder_problem, "PNG-frames folder", create_parents)
    else:
        fsio.check_file_target(path, FORMAT_KIND[format], create_parents)


def _count_frames(path: Path, format: str) -> int:
    try:
        if format == "gif":
            from PIL import Image

            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        import imageio_ffmpeg

        # Count the video packets without decoding them (one per frame for H.264; ~3x faster than
        # count_frames_and_secs): a truncated file or a damaged sample table gives fewer, or none.
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy",
               "-f", "null", "-"]
        run = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
        counts = re.findall(r"frame=\s*(\d+)", run.stderr)
        return int(counts[-1]) if run.returncode == 0 and counts else 0
    except Exception:  # noqa: BLE001 - an unreadable file is a failed write
        return 0


def write_video(path, frames, fps: float = DEFAULT_FPS, **kwargs) -> Path:
    """Write a whole ``[N, H, W, 3]`` clip in one call (same checks as ``VideoWriter``)."""
    with VideoWriter(path, fps=fps, **kwargs) as writer:
        writer.write(frames)
    return writer.path


# --------------------------------------------------------------------------------------------------
# Reading (tests, tools)
# --------------------------------------------------------------------------------------------------

@dataclass
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def read_video(path) -> np.ndarray:
    """All frames as ``uint8 [N, H, W, 3]`` (MP4 via ffmpeg, GIF via Pillow, or a PNG frame folder)."""
    path = Path(path)
    if path.is_dir():
        import imageio.v3 as iio

        files = sorted(path.glob("frame_*.png"))
        if not files:
            raise FileNotFoundError(f"{path} holds no frame_*.png files")
        return np.stack([iio.imread(f)[..., :3] for f in files])
    if path.suffix.lower() == ".gif":
        import imageio.v3 as iio

        frames = iio.imread(path, index=None, extension=".gif", mode="RGB")
        return np.asarray(frames)[..., :3]
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = gen.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    if not frames:
        raise ValueError(f"{path} holds no frames")
    return np.stack(frames)


def video_info(path) -> VideoInfo:
    """Frame count, size and fps (decodes the file: exact frame count)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".gif":
        frames = read_video(path)
        fps = float("nan")
        if path.suffix.lower() == ".gif":
            from PIL import Image

            with Image.open(path) as im:
                duration = im.info.get("duration")
            fps = 1000.0 / duration if duration else float("nan")
        return VideoInfo(frames.shape[0], frames.shape[2], frames.shape[1], fps)
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    meta = gen.__next__()
    gen.close()
    n, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    w, h = meta["size"]
    return VideoInfo(int(n), int(w), int(h), float(meta["fps"]))
