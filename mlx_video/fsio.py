"""Safe output: ownership checks, atomic files and folders, folder replacement, debris cleanup, signals.

Rules every writer follows (``generate`` outputs, ``convert``/``demo``/``prune``/``export-swift`` folders):

- **Replace only what mlx-video made.** An existing target is replaced only if it is a regular file of the
  expected type (an MP4, a GIF, a JSON object, ...; an empty file too) or a real folder holding our own marker
  (a PNG-frames folder's ``.mlx-video-frames`` manifest, a model folder's ``config.json`` with format
  ``mlx-video/1``); an empty folder is fine. Anything else - a user's folder, a device, a FIFO, a socket, a
  symbolic link (never followed, never replaced) - is refused with ``OutputRefused`` before any work.
- **Publish only finished, checked output.** Everything is written to a hidden temporary beside the target
  (``.<name>.partial-<pid>-<token>``, same filesystem) and renamed over it at the end.
- **Replacing a folder never deletes first:** old renamed aside, new renamed in, old removed; a failure in
  between restores the old one. Removability is checked before anything moves (a read-only folder is
  refused up front), and a removal that still fails is reported, never ignored.
- **Interrupts clean up.** SIGTERM and SIGHUP raise ``Interrupted`` (a ``KeyboardInterrupt``, exit 128+signo)
  like SIGINT does, so every ``except BaseException`` cleanup path runs. Debris left by a process that was
  killed outright (SIGKILL, power loss) is removed by the next writer in that folder: only names of our
  pattern, owned by this user, whose PID is no longer running; an ``.old-`` folder whose target is missing
  is moved back instead.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .utils import CONFIG_NAME, MLX_VIDEO_FORMAT, UsageError, UserError

FRAMES_MANIFEST = ".mlx-video-frames"
FRAMES_FORMAT = "mlx-video-frames/1"

# .<name>.partial-<pid>-<token>[<suffix>] and .<name>.old-<pid>-<token>; folders also without the token
# (.<name>.partial-<pid>: what earlier versions of the model-folder and export writers left)
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<tag>partial|old)-(?P<pid>\d{1,9})(?P<token>-[0-9a-f]{6})?"
                     r"(?P<suffix>\.[A-Za-z0-9]+)?$")


class OutputError(UserError):
    """An output could not be written; nothing was published and no temporary file is left (exit 1)."""


class OutputRefused(UsageError, OutputError):
    """The output path holds something mlx-video did not create (or cannot replace): a usage error (exit 2),
    found before any work."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an interrupt, so cleanup runs as for Ctrl-C."""

    def __init__(self, signo: int):
        super().__init__(f"interrupted by {signal.Signals(signo).name}")
        self.signo = signo
        self.exit_code = 128 + signo


# --------------------------------------------------------------------------------------------------
# What a path is, and whether we may replace it
# --------------------------------------------------------------------------------------------------


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputRefused(f"{path}: cannot inspect the output path ({exc.strerror})") from None


def describe(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "a special file"


def _is_mp4(head: bytes) -> bool:
    return head[4:8] == b"ftyp"


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _is_torch(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # zip (torch.save) or a legacy pickle


def read_marker(path: Path, max_bytes: int = 1 << 24) -> dict | None:
    """A small JSON object in a regular file (not a link), or None: how we recognise our own outputs."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _is_json_object(path: Path) -> bool:
    return read_marker(path) is not None


# kind -> (description, test on the first 16 bytes, or None for a whole-file test)
KINDS: dict[str, tuple[str, Callable[[bytes], bool] | None]] = {
    "mp4": ("an MP4 video", _is_mp4),
    "gif": ("a GIF", lambda head: head.startswith((b"GIF87a", b"GIF89a"))),
    "json": ("a JSON file", None),
    "safetensors": ("a safetensors file", _is_safetensors),
    "torch": ("a PyTorch checkpoint", _is_torch),
    "file": ("a regular file", lambda head: True),
}


def kind_for_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".mp4": "mp4", ".m4v": "mp4", ".mov": "mp4", ".gif": "gif", ".json": "json",
            ".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}.get(suffix, "file")


def check_parent(path: Path, create: bool = False) -> None:
    """The folder that will hold ``path`` exists (or, with ``create``, can be made), and is writable."""
    parent = Path(path).absolute().parent
    while create and not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent  # the nearest existing ancestor is where the first folder gets made
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputRefused(f"output folder {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputRefused(f"output folder {parent} is not writable")


def check_file_target(path: str | os.PathLike, kind: str, create_parents: bool = False) -> None:
    """Refuse (``OutputRefused``) unless ``path`` is absent, empty, or a regular file of type ``kind``."""
    path = Path(path)
    check_parent(path, create_parents)
    st = _lstat(path)
    if st is None:
        return
    if not stat.S_ISREG(st.st_mode):
        extra = "; mlx-video never writes through or over links" if stat.S_ISLNK(st.st_mode) else ""
        raise OutputRefused(f"{path} exists and is {describe(st)}, where {KINDS[kind][0]} is to be written{extra}; "
                            f"choose another output path")
    if st.st_size == 0:
        return
    description, test = KINDS[kind]
    if test is None:
        ok = _is_json_object(path)
    else:
        try:
            with open(path, "rb") as f:
                ok = test(f.read(16))
        except OSError:
            ok = False
    if not ok:
        raise OutputRefused(f"{path} exists and is not {description}; mlx-video replaces only files of the type it "
                            f"writes. Choose another output path or remove it")


def frames_folder_problem(folder: Path) -> str | None:
    """None if ``folder`` is a PNG-frames folder we wrote (manifest present, nothing else added)."""
    data = read_marker(folder / FRAMES_MANIFEST)
    if data is None or data.get("format") != FRAMES_FORMAT or not isinstance(data.get("files"), list):
        return f"is not a PNG-frames folder written by mlx-video (no {FRAMES_MANIFEST} manifest)"
    return unlisted_entries(folder, set(map(str, data["files"])) | {FRAMES_MANIFEST}, "mlx-video")


def unlisted_entries(folder: Path, listed: set[str], writer: str) -> str | None:
    """None if every entry of ``folder`` is in ``listed``; else which are not (so a replace would lose them)."""
    try:
        extra = sorted(p.name for p in folder.iterdir() if p.name not in listed)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        return f"holds files {writer} did not write ({shown})"
    return None


def model_folder_problem(folder: Path) -> str | None:
    """None if ``folder`` is an mlx-video model folder (``config.json`` with our format)."""
    data = read_marker(folder / CONFIG_NAME, 1 << 26)
    if data is None or data.get("format") != MLX_VIDEO_FORMAT:
        return f"is not an mlx-video model folder (no {CONFIG_NAME} with format {MLX_VIDEO_FORMAT})"
    return None


def check_folder_target(path: str | os.PathLike, problem: Callable[[Path], str | None], what: str = "folder",
                        create_parents: bool = False) -> bool:
    """Refuse unless ``path`` is absent, an empty folder, or a folder ``problem`` accepts (returns None).

    Also refuses a folder that could not be removed after the swap (read-only inside). Returns whether
    something exists there (to be replaced).
    """
    path = Path(path)
    check_parent(path, create_parents)
    st = _lstat(path)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        extra = "; mlx-video never writes through or over links" if stat.S_ISLNK(st.st_mode) else ""
        raise OutputRefused(f"{path} exists and is {describe(st)}, not a {what}{extra}; choose another path")
    try:
        with os.scandir(path) as entries:
            empty = next(entries, None) is None
    except OSError as exc:
        raise OutputRefused(f"{path}: cannot read the existing folder ({exc.strerror})") from None
    if not empty:
        reason = problem(path)
        if reason:
            raise OutputRefused(f"{path} already exists and {reason}; mlx-video replaces only {what}s it wrote. "
                                f"Choose a new path or remove it yourself")
    check_removable(path)
    return True


def check_removable(folder: Path) -> None:
    """Refuse now if the old ``folder`` could not be deleted after being replaced (read-only somewhere)."""
    for root, dirs, _ in os.walk(folder, onerror=_raise_walk):
        if not os.access(root, os.W_OK | os.X_OK):
            raise OutputRefused(f"cannot replace {folder}: {root} is read-only, so the previous version could not "
                                f"be removed; make it writable or choose another path")


def _raise_walk(exc: OSError) -> None:
    raise OutputRefused(f"cannot replace {exc.filename}: {exc.strerror}")


# --------------------------------------------------------------------------------------------------
# Temporary names and stale debris
# --------------------------------------------------------------------------------------------------


def temp_path(target: Path, tag: str = "partial", keep_suffix: bool = True) -> Path:
    """``.<name>.<tag>-<pid>-<token>[<suffix>]`` beside ``target`` (files keep the suffix: tools pick formats
    by it)."""
    target = Path(target)
    suffix = target.suffix if keep_suffix else ""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}{suffix}"


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a PID we can judge: leave it alone
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove our temporaries in ``folder`` left by processes that no longer run; returns what was handled.

    Only names of our pattern, owned by this user, regular files or real folders. An ``.old-`` folder
    whose target is missing (a crash between the two renames) is renamed back instead of removed.
    """
    folder = Path(folder)
    handled = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return handled
    for entry in entries:
        m = _DEBRIS.match(entry.name)
        if not m or _pid_running(int(m["pid"])):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if st.st_uid != os.geteuid() or not (stat.S_ISREG(st.st_mode) or is_dir) or not (m["token"] or is_dir):
            continue
        path = Path(entry.path)
        target = folder / m["name"]
        try:
            if m["tag"] == "old" and not os.path.lexists(target):
                os.rename(path, target)  # the previous version of an interrupted replace: put it back
            elif is_dir:
                shutil.rmtree(path)
            else:
                path.unlink()
            handled.append(path)
        except OSError as exc:
            print(f"mlx-video: warning: cannot remove stale {path} ({exc.strerror})", file=sys.stderr)
    return handled


# Temporaries of this process not yet published or discarded: removed at exit if an interrupt skipped them.
_live: set[Path] = set()


@atexit.register
def _discard_live() -> None:
    for path in list(_live):
        m = _DEBRIS.match(path.name)
        if m and m["tag"] == "old" and not os.path.lexists(path.parent / m["name"]):
            continue  # the previous version with no replacement in place: keep it (clean_stale restores it)
        discard(path)


def remove_tree(path: Path) -> None:
    """Remove a file or folder we created; a failure raises ``OutputError`` naming what is left."""
    _live.discard(Path(path))
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"cannot remove {exc.filename or path} ({exc.strerror})") from None


def discard(path: Path | None) -> None:
    """Best-effort removal of our temporary while another error is already on its way up."""
    if path is None:
        return
    try:
        remove_tree(path)
    except OutputError as exc:
        print(f"mlx-video: warning: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, target: Path, kind: str) -> None:
    """Rename the finished ``tmp`` over ``target`` (re-checked: it may have changed since we started)."""
    check_file_target(target, kind)
    try:
        _fsync(tmp)
        os.replace(tmp, target)
        _live.discard(Path(tmp))
    except OSError as exc:
        raise OutputError(f"cannot write {target} ({exc.strerror})") from None


def replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``: old aside, new in, old removed.

    A failure before the new folder is in place restores the old one (``OutputError``); a failure to
    remove the old one afterwards is reported (``OutputError`` naming the folder left), never ignored.
    """
    new, target = Path(new), Path(target)
    old = None
    with _signals_deferred():  # no interrupt between the two renames
        if os.path.lexists(target):
            old = temp_path(target, "old", keep_suffix=False)
            try:
                os.rename(target, old)
            except OSError as exc:
                raise OutputError(f"cannot replace {target}: cannot move it aside ({exc.strerror})") from None
            _live.add(old)  # removed below, or at exit if an interrupt held during the swap lands first
        try:
            os.rename(new, target)
            _live.discard(new)
        except BaseException as exc:
            if old is not None:
                _restore(old, target)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot move the new {target} into place ({exc.strerror}); the previous "
                                  f"version is unchanged") from None
            raise
    if old is not None:
        try:
            remove_tree(old)
        except OutputError as exc:
            raise OutputError(f"wrote {target}, but the previous version could not be removed: {exc}; "
                              f"delete {old} by hand") from None


def _restore(old: Path, target: Path) -> None:
    try:
        os.rename(old, target)
    except OSError as exc:
        _live.discard(old)  # the only copy of the previous version now: never removed by us
        raise OutputError(f"cannot put the previous {target} back from {old} ({exc.strerror}); move it back by "
                          f"hand") from None
    _live.discard(old)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (they are delivered right after)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, *TERMINATION_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PendingFile:
    """A finished temporary file waiting for ``publish()`` (or ``discard()``)."""

    def __init__(self, target: Path, tmp: Path, kind: str):
        self.target, self.tmp, self.kind = target, tmp, kind

    def publish(self) -> Path:
        if self.tmp is not None:
            tmp, self.tmp = self.tmp, None
            try:
                publish_file(tmp, self.target, self.kind)
            except BaseException:
                discard(tmp)
                raise
        return self.target

    def discard(self) -> None:
        tmp, self.tmp = self.tmp, None
        discard(tmp)


def prepare_file(path: str | os.PathLike, data: bytes | str, kind: str) -> PendingFile:
    """Write ``data`` to a temporary beside ``path`` (checked first); ``publish()`` moves it in place."""
    path = Path(path)
    check_file_target(path, kind)
    blob = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        with guard_signals():
            tmp = make_temp_file(path)
            with open(tmp, "wb") as f:
                f.write(blob)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path} ({exc.strerror})") from None
        raise
    return PendingFile(path, tmp, kind)


def write_file(path: str | os.PathLike, data: bytes | str, kind: str) -> Path:
    """Atomically write ``data`` to ``path`` (ownership-checked; no temporary survives a failure)."""
    return prepare_file(path, data, kind).publish()


def make_temp_file(target: Path) -> Path:
    """A new, empty temporary file beside ``target`` (parents made; stale debris there cleaned first)."""
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent)
        tmp = temp_path(target)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        _live.add(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {target} ({exc.strerror})") from None
    return tmp


def make_temp_folder(target: Path) -> Path:
    """A new, empty temporary folder beside ``target`` (parents made; stale debris there cleaned first)."""
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent)
        tmp = temp_path(target, keep_suffix=False)
        os.mkdir(tmp)
        _live.add(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {target} ({exc.strerror})") from None
    return tmp


@contextmanager
def atomic_folder(target: str | os.PathLike, problem: Callable[[Path], str | None],
                  what: str = "folder") -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block finishes (see ``replace_folder``)."""
    target = Path(target).absolute()
    check_folder_target(target, problem, what, create_parents=True)
    with guard_signals():
        tmp = make_temp_folder(target)
        try:
            yield tmp
            replace_folder(tmp, target)
        except BaseException:
            discard(tmp)
            raise


@contextmanager
def atomic_model_folder(mlx_path: str | os.PathLike, replace: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``mlx_path`` only if the block finishes.

    A new path is created from scratch. An existing mlx-video model folder is updated: its files are
    hard-linked (or copied) into the temporary folder first, files named in ``replace`` are dropped, and the
    swap happens at the end. A failure or interrupt leaves ``mlx_path`` exactly as it was; any other
    existing folder, file or link is refused (``OutputRefused``).
    """
    target = Path(mlx_path).absolute()
    with atomic_folder(target, model_folder_problem, "model folder") as tmp:
        if target.is_dir():
            for item in target.iterdir():
                if item.name in replace or item.name == CONFIG_NAME:
                    continue
                link_or_copy(item, tmp / item.name)
        yield tmp


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file (cheap, even for multi-GB weights) or copy it where links are not possible."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


# --------------------------------------------------------------------------------------------------
# SIGTERM / SIGHUP -> Interrupted
# --------------------------------------------------------------------------------------------------

TERMINATION_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_guard = {"depth": 0, "saved": {}, "fired": False}


def _on_signal(signo, frame):
    if _guard["fired"]:  # cleanup of the first one is running: let it finish
        return
    _guard["fired"] = True
    raise Interrupted(signo)


@contextmanager
def guard_signals() -> Iterator[None]:
    """While writing (and for a whole CLI command): SIGTERM/SIGHUP raise ``Interrupted`` so writers clean up.

    Nested guards share one installation; handlers a program set itself are left alone.
    """
    acquire_signal_guard()
    try:
        yield
    finally:
        release_signal_guard()


def acquire_signal_guard() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if _guard["depth"] == 0:
        for s in TERMINATION_SIGNALS:
            if signal.getsignal(s) is signal.SIG_DFL:
                _guard["saved"][s] = signal.signal(s, _on_signal)
    _guard["depth"] += 1


def release_signal_guard() -> None:
    if threading.current_thread() is not threading.main_thread() or _guard["depth"] == 0:
        return
    _guard["depth"] -= 1
    if _guard["depth"] == 0:
        for s, previous in _guard["saved"].items():
            signal.signal(s, previous)
        _guard["saved"].clear()
        _guard["fired"] = False
