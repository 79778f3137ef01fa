"""Reading files a user hands us, defensively: regular files only, bounded sizes, paths that stay inside
their folder, and errors that name the file (and the field) instead of a codec or parser traceback.

Every reader opens with ``O_NONBLOCK`` and checks the *opened* descriptor, so a FIFO never blocks, a
character device such as ``/dev/zero`` is never read, and a file swapped after a check is still caught.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .utils import UserError

# Size bounds: each is far above any real file of that kind, and far below what exhausts memory.
MAX_JSON_BYTES = 64 * 1024**2  # config.json, *.safetensors.index.json, metadata sidecars
MAX_TOKENIZER_BYTES = 64 * 1024**2  # UMT5's spiece.model is 4.5 MB
MAX_PROMPT_FILE_BYTES = 16 * 1024**2
MAX_JSON_DEPTH = 32  # our configs nest 3 levels; deeper is hostile (and recursion trouble for json)


class InputError(UserError, ValueError):
    """A file we were asked to read is of the wrong kind, too large, malformed, or points elsewhere."""


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_input_path(path: str | os.PathLike, what: str, folder_ok: bool = True) -> Path:
    """``path`` must exist and be a regular file (or a folder when ``folder_ok``); symlinks are followed."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: {what}: no such file or directory") from None
    except OSError as exc:
        raise InputError(f"{path}: {what}: cannot access ({exc.strerror})") from None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return path
    raise InputError(f"{path}: {what} is {file_kind(mode)}, not a regular file{' or folder' if folder_ok else ''}")


def open_regular(path: str | os.PathLike, what: str, max_bytes: int | None = None):
    """Open ``path`` for binary reading; refuse non-regular files and files over ``max_bytes``."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: {what}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: {what} is a folder, not a file") from None
    except OSError as exc:
        raise InputError(f"{path}: {what}: cannot open ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: {what} is {file_kind(info.st_mode)}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise InputError(f"{path}: {what} is {info.st_size:,} bytes, more than the {max_bytes:,} such a file "
                             f"can plausibly be")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    with open_regular(path, what, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise InputError(f"{path}: {what} is larger than {max_bytes:,} bytes")
    return data


def read_text(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: {what} is not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}; a binary file?)") from None


def parse_json(data: bytes | str, where: str, what: str = "JSON"):
    """Parse JSON from bytes or text; every failure names ``where`` and says it is not valid UTF-8 JSON."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: {what} is not valid UTF-8 JSON (byte 0x{data[exc.start]:02x} at offset "
                             f"{exc.start}; a binary file?)") from None
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: {what} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: {what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise InputError(f"{where}: {what} is not valid JSON ({str(exc)[:120]})") from None
    depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"{where}: {what} is nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    return value


def json_depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES, object_only: bool = True):
    """A JSON file (an object unless ``object_only`` is False), bounded, with errors naming the file."""
    value = parse_json(read_bytes(path, what, max_bytes), str(path), what)
    if object_only and not isinstance(value, dict):
        raise InputError(f"{path}: {what} must hold a JSON object, not {type(value).__name__}")
    return value


def resolve_inside(folder: str | os.PathLike, name, where: str) -> Path:
    """``folder / name`` for a file name read from a file; refuse names that leave ``folder``.

    Absolute paths, ``..`` and symlinks that resolve outside ``folder`` are refused; ``where`` names the
    file and field the name came from (e.g. ``model/config.json: dit.weights_file``).
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{where}: expected a file name inside {folder}, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"{where}: {name!r} points outside {folder}; only files inside it are read")
    base = Path(folder).resolve()
    target = (base / rel).resolve()
    roots = [base]
    if base.parent.name == "snapshots":  # a Hugging Face cache snapshot: its files link into the repo's blobs/
        roots.append(base.parent.parent / "blobs")
    if not any(target == root or root in target.parents for root in roots):
        raise InputError(f"{where}: {name!r} resolves to {target}, outside {folder} (a symlink?); only files "
                         f"inside it are read")
    return Path(folder) / rel
