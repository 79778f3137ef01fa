"""Video output: incremental MP4 (H.264) / GIF / PNG-folder writing with fail-closed health checks.

Nothing broken is ever left at the target path: frames go to a hidden temporary file next to the target
(same filesystem) that is renamed over the target only when ``close()`` succeeds. A non-finite frame, an
all-black or constant video, no frames at all, or an exception inside ``with VideoWriter(...)`` removes
the temporary file. Health failures raise ``GenerationFailed``; the caller records it next to the intended
output with ``write_failure_report`` (``<output>.failure.json``).

Frames are ``[H, W, 3]`` or ``[N, H, W, 3]`` mx/np arrays, floats in [0, 1] (clipped) or uint8.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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


def write_failure_report(output_path, reason: str, details: dict | None = None) -> Path:
    """Write ``<output_path>.failure.json`` (reason, details, time) atomically; returns its path."""
    output_path = Path(output_path)
    report = Path(str(output_path) + ".failure.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    payload = {"output": str(output_path), "reason": reason, "details": dict(details or {}),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = report.with_name(f".{report.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, report)
    return report


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
            raise ValueError(f"unknown video format {format!r}; choose one of {', '.join(FORMATS)}")
        return format
    suffix = path.suffix.lower()
    if suffix in (".mp4", ".m4v", ".mov"):
        return "mp4"
    if suffix == ".gif":
        return "gif"
    if suffix == "":
        return "png"  # a folder of frame_00000.png ...
    raise ValueError(f"cannot tell the video format of {path} (use .mp4, .gif, or a folder name for PNG frames)")


class VideoWriter:
    """Write frames incrementally; the target appears only after a successful, healthy ``close()``.

    >>> with VideoWriter("out.mp4", fps=16) as w:
    ...     w.write(frames)            # [H, W, 3] or [N, H, W, 3], floats in [0, 1]

    ``format``: "mp4" (H.264, yuv420p, ``crf``), "gif" or "png" (a folder of numbered frames); default
    from the suffix. ``check_health=False`` disables the black/constant check (NaN is always an error).
    """

    def __init__(self, path, fps: float = DEFAULT_FPS, crf: int = DEFAULT_CRF, format: str | None = None,
                 check_health: bool = True, preset: str = "medium"):
        self.path = Path(path)
        self.format = _format_for(self.path, format)
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.fps, self.crf, self.preset, self.check_health = fps, int(crf), preset, check_health
        self.stats = FrameStats()
        self.size: tuple[int, int] | None = None  # (width, height)
        self._gen = None  # imageio-ffmpeg writer generator (mp4)
        self._gif_frames: list[np.ndarray] = []
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.path.name}.partial-"
        if self.format == "png":
            self._tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=self.path.suffix or f".{self.format}", dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(tmp)

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
        if self._closed:
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
        except BaseException:
            self.abort()
            raise

    def _start(self) -> None:
        if self.format != "mp4":
            return
        import imageio_ffmpeg

        w, h = self.size
        if w % 2 or h % 2:
            w, h = w + w % 2, h + h % 2  # yuv420p needs even sizes: frames are edge-padded
        self._even_size = (w, h)
        self._gen = imageio_ffmpeg.write_frames(
            str(self._tmp), (w, h), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=self.fps, quality=None,
            codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(self.crf), "-preset", self.preset, "-movflags", "+faststart", "-f", "mp4"])
        self._gen.send(None)

    def _write_uint8(self, u8: np.ndarray) -> None:
        if self.format == "mp4":
            w, h = self._even_size
            if (w, h) != self.size:
                u8 = np.pad(u8, ((0, 0), (0, h - u8.shape[1]), (0, w - u8.shape[2]), (0, 0)), mode="edge")
            for frame in u8:
                self._gen.send(np.ascontiguousarray(frame))
        elif self.format == "gif":
            self._gif_frames.extend(u8)
        else:
            import imageio.v3 as iio

            start = self.stats.frames - u8.shape[0]
            for k, frame in enumerate(u8):
                iio.imwrite(self._tmp / f"frame_{start + k:05d}.png", frame)

    # -- finishing --------------------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish, check health, and move the video into place. Raises ``GenerationFailed`` (no file left)."""
        if self._closed:
            return self.path
        try:
            problem = self.stats.problem()
            if problem is not None and (self.check_health or self.stats.frames == 0):
                raise GenerationFailed(problem, "video", self.stats.summary())
            self._finish_encoding()
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def _finish_encoding(self) -> None:
        if self.format == "mp4":
            gen, self._gen = self._gen, None
            gen.close()  # flushes and waits for ffmpeg; raises if ffmpeg failed
        elif self.format == "gif":
            import imageio.v3 as iio

            iio.imwrite(self._tmp, np.stack(self._gif_frames), extension=".gif", duration=1000.0 / self.fps, loop=0)
            self._gif_frames = []

    def _commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, (0o777 if self._tmp.is_dir() else 0o666) & ~umask)  # mkstemp makes 0600 files
        if self.format != "png" or not self.path.exists():
            os.replace(self._tmp, self.path)
            return
        # Replace an existing frame folder: move it aside, move the new one in, then delete the old one.
        old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
        os.rmdir(old)
        os.replace(self.path, old)
        os.replace(self._tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Stop without producing a file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.close()
            except Exception:  # noqa: BLE001 - we are discarding the output anyway
                pass
        self._gif_frames = []
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass


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
