"""Shared converter machinery: safe checkpoint reading, declarative key maps, strict checks, atomic output.

Every converter is: ``open_checkpoint`` -> ``apply_key_map`` (regex rules + small transforms) ->
``check_strict`` against the MLX model's parameter shapes -> ``write_model_folder``.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import mlx.core as mx
import numpy as np

from mlx_video import fsio
from mlx_video.inputs import MAX_JSON_BYTES, InputError, check_input_path, read_json, resolve_inside
from mlx_video.safetensors_io import read_safetensors_header as _read_header
from mlx_video.utils import Rule, Transform, UserError, write_config_section


class ConversionError(UserError):
    """A checkpoint cannot be converted; the message says exactly why (exit 1, no traceback)."""


# --------------------------------------------------------------------------------------------------
# Reading checkpoints without executing pickle code
# --------------------------------------------------------------------------------------------------

@contextmanager
def conversion_errors() -> Iterator[None]:
    """Report ``mlx_video``'s input errors (bad file kind, size, JSON, safetensors header) as ConversionError."""
    try:
        yield
    except InputError as exc:
        raise ConversionError(str(exc)) from None


def read_safetensors_header(path: Path) -> dict:
    """Shapes, dtypes and offsets without loading data; truncation, overlaps and malformed entries are errors
    (``mlx_video.safetensors_io``)."""
    with conversion_errors():
        return _read_header(path)


def finite_floating(weights: Mapping[str, mx.array], source, note: str = "") -> None:
    """Refuse integer/bool tensors where float weights go, and NaN/Inf values (a broken or hostile file)."""
    for name, w in weights.items():
        if not mx.issubdtype(w.dtype, mx.floating):
            raise ConversionError(f"{source}: tensor {name!r} has dtype {str(w.dtype).split('.')[-1]}; expected "
                                  f"floating point weights "
                                  f"(float32/float16/bfloat16; not int8/bool or fp8 'scaled' files)")
    bad = [k for k, v in weights.items() if not bool(mx.all(mx.isfinite(v)).item())]
    if bad:
        raise ConversionError(f"{source}: non-finite values (NaN/Inf) in {bad[:5]}{note}")


class Checkpoint(Mapping):
    """A read-only, lazily loaded ``name -> mx.array`` view of one or more checkpoint files.

    ``shape(name)`` reads no tensor data, so configs can be inferred from multi-GB files cheaply.
    """

    def __init__(self, shapes: dict[str, tuple], loaders: dict[str, Callable[[], mx.array]], source: str):
        self._shapes, self._loaders, self.source = shapes, loaders, source

    def __getitem__(self, key: str) -> mx.array:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def renamed(self, mapping: dict[str, str]) -> "Checkpoint":
        """Same tensors under new names (``mapping`` is new -> old)."""
        return Checkpoint({n: self._shapes[o] for n, o in mapping.items()},
                          {n: self._loaders[o] for n, o in mapping.items()}, self.source)


def _open_safetensors(files: list[Path]) -> Checkpoint:
    shapes, loaders = {}, {}
    for file in files:
        header = read_safetensors_header(file)
        cache: dict = {}

        def load(key, file=file, cache=cache):
            if "arrays" not in cache:
                try:
                    cache["arrays"] = mx.load(str(file))  # lazy: tensors are read when evaluated
                except Exception as exc:  # noqa: BLE001 - MLX raises plain RuntimeError/ValueError
                    raise ConversionError(f"{file}: cannot read safetensors ({exc})") from None
            return cache["arrays"][key]

        for key, info in header.items():
            if key in shapes:
                raise ConversionError(f"tensor {key!r} appears in more than one file ({file})")
            shapes[key] = tuple(info["shape"])
            loaders[key] = lambda key=key, load=load: load(key)
    return Checkpoint(shapes, loaders, ", ".join(str(f) for f in files))


def _torch_to_mx(t) -> mx.array:
    import torch

    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def _flatten_tensors(obj, prefix: str, out: dict) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_tensors(v, f"{prefix}{k}.", out)


def _open_torch(path: Path, select: str | None) -> Checkpoint:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading PyTorch .pth/.pt files needs torch: pip install 'mlx-video[torch]' "
            "(or convert the checkpoint to .safetensors first)"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zip" in str(exc).lower() or "mmap" in str(exc).lower():  # legacy (non-zip) format: no mmap
            obj = _torch_load_plain(torch, path)
        else:
            raise _pickle_error(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise _pickle_error(path, exc) from None
    if isinstance(obj, Mapping):
        preferred = tuple(select) if isinstance(select, tuple) else ()
        wrappers = [k for k in dict.fromkeys((*preferred, "generator_ema", "generator", "state_dict", "model",
                                              "module")) if k in obj and isinstance(obj[k], Mapping)]
        if isinstance(select, str):
            if select not in obj:
                raise ConversionError(f"{path}: no entry {select!r} (top-level keys: {sorted(obj)[:10]})")
            obj = obj[select]
        elif wrappers and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrappers[0]]  # Self-Forcing/CausVid: prefer the EMA generator
    tensors: dict = {}
    _flatten_tensors(obj, "", tensors)
    if not tensors:
        raise ConversionError(f"{path}: no tensors found in the PyTorch checkpoint")
    return Checkpoint({k: tuple(v.shape) for k, v in tensors.items()},
                      {k: (lambda v=v: _torch_to_mx(v)) for k, v in tensors.items()}, str(path))


def _torch_load_plain(torch, path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise _pickle_error(path, exc) from None


# Modules a plain PyTorch weight pickle references (tensor rebuild functions, storages, OrderedDict).
_WEIGHT_PICKLE_MODULES = ("torch", "collections", "_codecs", "numpy")
_MAX_PICKLE_SCAN_BYTES = 256 * 1024**2


def pickle_code_references(path: Path) -> list[str]:
    """Globals a pickle (or a torch zip's ``data.pkl``) imports beyond what plain weights need, found by
    reading its opcodes only (``pickletools.genops``: nothing is ever executed). Garbage stops the scan."""
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = [i for i in z.infolist() if i.filename.endswith(".pkl") and i.file_size <= _MAX_PICKLE_SCAN_BYTES]
                data = b"".join(z.read(i) for i in pkl[:4])
        else:
            with open(path, "rb") as f:
                data = f.read(_MAX_PICKLE_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return []
    # ``memo`` holds the memoized strings only; MEMOIZE numbers every memoized object (strings or not), and
    # a PUT/MEMOIZE stores the string only when the stack's top is one (else a later GET would fetch a stale name)
    found, strings, memo, memoized, top_is_string = [], [], {}, 0, False
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str) and "UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                strings.append(str(arg))
                top_is_string = True
                continue
            if op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):  # the stack is unchanged
                key = memoized if op.name == "MEMOIZE" else arg
                memoized += op.name == "MEMOIZE"
                if top_is_string:
                    memo[key] = strings[-1]
                continue
            top_is_string = False
            if op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
                top_is_string = True
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - garbage or truncation: keep what was found before it
        pass
    return [g for g in dict.fromkeys(found) if re.fullmatch(r"[A-Za-z_][\w.]*", g)
            and g.split(".")[0] not in _WEIGHT_PICKLE_MODULES]


def _pickle_error(path: Path, exc: Exception) -> ConversionError:
    """A payload (globals beyond plain weights) is refused as code; anything else is a corrupt file."""
    text = str(exc)
    code = pickle_code_references(path)
    m = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", text)  # torch names the global it blocked
    if m and m.group(1) not in code:
        code.insert(0, m.group(1))
    if code:
        return ConversionError(
            f"{path}: refusing to load: the pickle contains code ({', '.join(code[:3])}), which a plain weight "
            f"file never needs; mlx-video never executes pickle code (torch.load(weights_only=True))")
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    lines = [line.strip() for line in text.splitlines()]
    detail = " ".join(line for line in lines if line and not line.startswith(boiler))
    detail = detail.replace("WeightsUnpickler error:", "").strip() or type(exc).__name__
    return ConversionError(f"{path}: not a PyTorch checkpoint, or a corrupt or truncated one "
                           f"({type(exc).__name__}: {detail[:200]})")


def _index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, each checked to lie inside ``folder``."""
    with conversion_errors():
        data = read_json(index, "safetensors index", MAX_JSON_BYTES)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: 'weight_map' must be a non-empty object mapping tensor names to "
                                  f"shard files")
        files = sorted({resolve_inside(folder, name, f"{index}: weight_map[{key!r}]")
                        for key, name in weight_map.items()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ConversionError(f"{index}: shards missing: {missing}")
        return [check_input_path(f, "safetensors shard", folder_ok=False) for f in files]


def open_checkpoint(path: str | os.PathLike, pattern: str = "*.safetensors", select: str | None = None) -> Checkpoint:
    """Open a checkpoint: one ``.safetensors``/``.pth``/``.pt``/``.bin`` file, a sharded safetensors
    folder (``*.safetensors.index.json``), or a folder of ``*.safetensors`` files matching ``pattern``.
    ``select`` picks a top-level entry of a .pth dict (e.g. ``generator`` instead of ``generator_ema``); a tuple
    of names is an order of preference instead (a preset's usual entry, used when the file has it).
    Only regular files and folders are read: a FIFO or a device such as ``/dev/zero`` is refused.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    with conversion_errors():
        check_input_path(path, "checkpoint")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = _index_shards(path, indexes[0]) if indexes else sorted(path.glob(pattern))
        if not files:
            pth = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
            if len(pth) == 1:
                return open_checkpoint(pth[0], select=select)
            raise ConversionError(f"{path}: no checkpoint files ({pattern}, *.pth) found in this folder")
        return _open_safetensors(files)
    if path.suffix == ".safetensors":
        return _open_safetensors([path])
    if path.suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        return _open_torch(path, select)
    raise ConversionError(f"{path}: unknown checkpoint format {path.suffix!r} (expected .safetensors, .pth, .pt)")


def strip_common_prefix(ckpt: Checkpoint, prefixes: list[str], marker: str) -> Checkpoint:
    """Remove the first prefix in ``prefixes`` under which ``marker`` is found (ComfyUI / Self-Forcing)."""
    for prefix in prefixes:
        if prefix + marker in ckpt:
            return ckpt.renamed({k[len(prefix):]: k for k in ckpt if k.startswith(prefix)} |
                                {k: k for k in ckpt if not k.startswith(prefix)})
    return ckpt


# --------------------------------------------------------------------------------------------------
# Declarative key maps
# --------------------------------------------------------------------------------------------------

def apply_key_map(ckpt: Checkpoint, rules: list[Rule]) -> tuple[dict[str, tuple[str, Transform | None]], list[str]]:
    """Map every source key through the first matching rule.

    Returns ``{target: (source, transform)}`` and the list of source keys no rule matched.
    """
    compiled = [(re.compile(r.pattern), r) for r in rules]
    mapped, unmatched = {}, []
    for key in ckpt:
        for regex, rule in compiled:
            m = regex.fullmatch(key)
            if m:
                target = m.expand(rule.target)
                if target in mapped:
                    raise ConversionError(f"two source tensors map to {target!r}: {mapped[target][0]!r} and {key!r}")
                mapped[target] = (key, rule.transform)
                break
        else:
            unmatched.append(key)
    return mapped, unmatched


def check_strict(mapped_shapes: dict[str, tuple], expected: dict[str, tuple], unmatched: list[str], what: str) -> None:
    """Fail with one message listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(mapped_shapes))
    unexpected = sorted(set(mapped_shapes) - set(expected)) + sorted(unmatched)
    wrong = sorted(f"{k}: checkpoint {tuple(mapped_shapes[k])} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(mapped_shapes) if tuple(mapped_shapes[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        def fmt(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:25])
            more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        raise ConversionError(
            f"{what}: checkpoint does not match the model"
            + fmt("missing tensors", missing) + fmt("unexpected tensors", unexpected) + fmt("wrong shapes", wrong)
        )


def parameter_shapes(model) -> dict[str, tuple]:
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


# --------------------------------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------------------------------


# The model-folder writers live in mlx_video.fsio (runtime file I/O belongs in mlx_video); re-exported here for
# the converters: atomic_model_folder refuses anything at --mlx-path that is not an mlx-video model folder.
atomic_model_folder, replace_folder, link_or_copy = fsio.atomic_model_folder, fsio.replace_folder, fsio.link_or_copy


def side_config_path(source: Path) -> Path:
    return (source if source.is_dir() else source.parent) / "config.json"


def side_config(source: Path) -> dict:
    """The ``config.json`` beside a checkpoint file or inside a checkpoint folder ({} if there is none).

    One that exists but is not a bounded, regular, UTF-8 JSON object is an error naming it: its values
    (head width, text length, ...) decide the conversion, so a broken one is never silently ignored."""
    path = side_config_path(source)
    if not path.exists():
        return {}
    with conversion_errors():
        return read_json(path, "config.json beside the checkpoint")


def update_config(folder: Path, previous: Path | None, section: str, value: dict) -> dict:
    """``mlx_video.utils.write_config_section`` with input errors reported as ConversionError."""
    with conversion_errors():
        return write_config_section(folder, previous, section, value)


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
