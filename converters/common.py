"""Shared converter machinery: safe checkpoint reading, declarative key maps, strict checks, atomic output.

Every converter is: ``open_checkpoint`` -> ``apply_key_map`` (regex rules + small transforms) ->
``check_strict`` against the MLX model's parameter shapes -> ``write_model_folder``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import mlx.core as mx
import numpy as np

from mlx_video.utils import CONFIG_NAME, MLX_VIDEO_FORMAT


class ConversionError(Exception):
    """A checkpoint cannot be converted; the message says exactly why."""


# --------------------------------------------------------------------------------------------------
# Reading checkpoints without executing pickle code
# --------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
              "F8_E4M3", "F8_E5M2"}


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header: shapes without loading data, and truncation detection."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ConversionError(f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            raise ConversionError(f"{path}: corrupt safetensors entry for {key!r}")
        end = info["data_offsets"][1]
        if end > data_size:
            raise ConversionError(
                f"{path}: truncated safetensors file: tensor {key!r} ends at byte {end} but the data "
                f"section has only {data_size} bytes (incomplete download?)"
            )
    return header


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
            raise ConversionError(f"{path}: cannot read PyTorch checkpoint ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise _pickle_error(path, exc) from None
    if isinstance(obj, Mapping):
        wrappers = [k for k in ("generator_ema", "generator", "state_dict", "model", "module") if k in obj
                    and isinstance(obj[k], Mapping)]
        if select is not None:
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


def _pickle_error(path: Path, exc: Exception) -> ConversionError:
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
        return ConversionError(
            f"{path}: refusing to load: the pickle references code objects that a plain weight file never "
            f"needs, and mlx-video never executes pickle code (torch.load(weights_only=True)). "
            f"Detail: {text.splitlines()[0] if text else type(exc).__name__}"
        )
    return ConversionError(f"{path}: cannot read PyTorch checkpoint ({type(exc).__name__}: {text[:300]})")


def open_checkpoint(path: str | os.PathLike, pattern: str = "*.safetensors", select: str | None = None) -> Checkpoint:
    """Open a checkpoint: one ``.safetensors``/``.pth``/``.pt``/``.bin`` file, a sharded safetensors
    folder (``*.safetensors.index.json``), or a folder of ``*.safetensors`` files matching ``pattern``.
    ``select`` picks a top-level entry of a .pth dict (e.g. ``generator`` instead of ``generator_ema``).
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            index = json.loads(indexes[0].read_text())
            files = sorted({path / f for f in index.get("weight_map", {}).values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{indexes[0]}: shards missing: {missing}")
        else:
            files = sorted(path.glob(pattern))
        if not files:
            pth = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
            if len(pth) == 1:
                return _open_torch(pth[0], select)
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

Transform = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a full-match regex on the source key) -> ``target`` (``re`` template), then ``transform``."""

    pattern: str
    target: str
    transform: Transform | None = None


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


@contextmanager
def atomic_model_folder(mlx_path: str | os.PathLike, replace: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``mlx_path`` only if the block finishes.

    A new path is created from scratch. An existing mlx-video model folder is updated: its files are
    hard-linked (or copied) into the temporary folder first, files named in ``replace`` are dropped, and the
    swap happens at the end. A failure or interrupt leaves ``mlx_path`` exactly as it was.
    """
    target = Path(mlx_path).absolute()
    if target.exists() and not (target / CONFIG_NAME).exists():
        raise ConversionError(
            f"{target} already exists and is not an mlx-video model folder; choose a new --mlx-path or remove it"
        )
    if target.exists():
        fmt = json.loads((target / CONFIG_NAME).read_text()).get("format")
        if fmt != MLX_VIDEO_FORMAT:
            raise ConversionError(f"{target} holds a config.json that is not an mlx-video model folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if target.exists():
            for item in target.iterdir():
                if item.name in replace or item.name == CONFIG_NAME:
                    continue
                link_or_copy(item, tmp / item.name)
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing folder (renamed aside, then deleted)."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def side_config(source: Path) -> dict:
    """The ``config.json`` beside a checkpoint file or inside a checkpoint folder ({} if none or unreadable)."""
    folder = source if source.is_dir() else source.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file (cheap, even for multi-GB weights) or copy it where links are not possible."""
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def update_config(folder: Path, previous: Path | None, section: str, value: dict) -> dict:
    """Write ``config.json`` in ``folder``: the previous folder's config with ``section`` set to ``value``."""
    config = {"format": MLX_VIDEO_FORMAT}
    if previous is not None and (previous / CONFIG_NAME).exists():
        config.update(json.loads((previous / CONFIG_NAME).read_text()))
    config[section] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def save_safetensors(path: Path, weights: dict[str, mx.array], metadata: dict | None = None) -> None:
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx", **(metadata or {})})


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
