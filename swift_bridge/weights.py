"""Weight export in the layout mlx-swift loads without remapping, written deterministically.

- Keys and shapes are those of the Python MLX model (``tree_flatten(model.parameters())``): mlx-swift's
  ``Module`` reflection produces the same dotted paths (swift.md §5), channels-last convolutions included.
- Floating tensors are cast to the export dtype (fp16 by default), except the names the Python runtime keeps
  in fp32 (its ``FP32_PARAMETERS``-style lists: norms, modulation, time embedding, ...), which stay fp32.
- Quantized layers (affine) keep their packed ``uint32`` ``weight``; ``scales``/``biases`` take the export
  dtype (mlx-swift's ``quantizedMM`` runs in ``promote(x.dtype, scales.dtype)``).
- The writer is our own: tensors in sorted key order, a sorted JSON header padded to 8 bytes, fixed
  metadata, one tensor in memory at a time. Same input, same bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import numpy as np

ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
             mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.int64: "I64",
             mx.uint64: "U64", mx.bool_: "BOOL"}
EXPORT_DTYPES = {"float16": mx.float16, "float32": mx.float32, "bfloat16": mx.bfloat16}


def _bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(a)).tobytes()


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None,
                      consume: bool = False) -> None:
    """Deterministic safetensors: sorted keys, sorted header JSON, tensors evaluated one at a time.

    ``consume=True`` removes each tensor from ``tensors`` once written, so with lazily loaded inputs at
    most one tensor is in memory (a multi-GB component exports in bounded memory)."""
    header: dict = {"__metadata__": {"format": "mlx", **(metadata or {})}}
    offset = 0
    for key in sorted(tensors):
        a = tensors[key]
        if a.dtype not in ST_DTYPES:
            raise ValueError(f"{key}: dtype {a.dtype} cannot be written to safetensors")
        n = a.nbytes
        header[key] = {"dtype": ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in sorted(header):
            if key == "__metadata__":
                continue
            a = tensors.pop(key) if consume else tensors[key]
            data = _bytes(a)
            del a
            if len(data) != header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:
                raise ValueError(f"{key}: wrote {len(data)} bytes, expected "
                                 f"{header[key]['data_offsets'][1] - header[key]['data_offsets'][0]}")
            f.write(data)
    os.replace(tmp, path)


def header_shapes(path: Path) -> dict[str, tuple]:
    """Key -> shape of a safetensors file, from its header (no tensor data read)."""
    from converters.common import read_safetensors_header

    return {k: tuple(v["shape"]) for k, v in read_safetensors_header(path).items()}


def header_dtypes(path: Path) -> dict[str, str]:
    from converters.common import read_safetensors_header

    return {k: v["dtype"] for k, v in read_safetensors_header(path).items()}
