"""Safetensors headers read and validated without touching tensor data.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
object ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data. Every structural rule the format states is checked here (types, sizes that match shapes,
offsets inside the file, no two tensors sharing bytes) so that a hostile or damaged file is one clear
error naming the file and the field, never a ``KeyError`` deep in a loader.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from .inputs import InputError, open_regular, parse_json

MAX_HEADER_BYTES = 100_000_000  # the format's own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class SafetensorsError(InputError):
    """A safetensors file is truncated or structurally invalid; the message names the file and field."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def safetensors_layout(path: str | os.PathLike) -> tuple[int, dict]:
    """``(data_start, header)``: the byte offset of the data section and the validated tensor entries
    (``__metadata__`` removed)."""
    path = Path(path)
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: corrupt or truncated safetensors header (header length {n}, file "
                                   f"{size} bytes)")
        raw = f.read(n)
    try:
        header = parse_json(raw, str(path), "safetensors header")
    except InputError as exc:
        raise SafetensorsError(str(exc).replace("safetensors header", "corrupt safetensors header", 1)) from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header: a JSON object is required, not "
                               f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise SafetensorsError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    ranges = []
    for key, info in header.items():
        where = f"{path}: corrupt safetensors entry {key!r}"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{where}: expected an object with dtype/shape/data_offsets, got "
                                   f"{type(info).__name__}")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise SafetensorsError(f"{where}: missing {field!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise SafetensorsError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{where}: data_offsets must be two integers 0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise SafetensorsError(
                f"{path}: truncated safetensors file: tensor {key!r} ends at byte {end} but the data section has "
                f"only {data_size} bytes (incomplete download?)")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise SafetensorsError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} "
                                   f"needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
        if end > begin:
            ranges.append((begin, end, key))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap "
                                   f"(bytes {begin_b}..{end_a}); the format forbids shared bytes")
    return 8 + n, header


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The validated tensor entries of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    return safetensors_layout(path)[1]


def load_safetensors(path: str | os.PathLike) -> dict:
    """``mx.load`` of a safetensors file (lazy), after the header passed every check above."""
    import mlx.core as mx

    read_safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - MLX raises plain RuntimeError/ValueError
        raise SafetensorsError(f"{path}: cannot read safetensors ({exc})") from None
