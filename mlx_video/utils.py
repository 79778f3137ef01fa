"""Model folders, dtypes and strict weight loading shared by every model.

A converted model folder holds one ``config.json`` with a section per component (``dit``,
``text_encoder``, ``decoder``, ``sampler``) and one safetensors file per component.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

CONFIG_NAME = "config.json"
MLX_VIDEO_FORMAT = "mlx-video/1"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class UserError(Exception):
    """A failure the user can act on (a bad file, folder or value): ``mlx-video`` prints the message as one
    line, without a traceback, and exits 1. Subclass it for errors of that kind outside ``mlx_video``."""


class UsageError(UserError, ValueError):
    """A bad flag value or combination, found before any work: one line, exit status 2 (as argparse's)."""


class ModelFolderError(UserError):
    """A model folder is missing, incomplete or not an mlx-video folder."""


def gpu_available() -> bool:
    metal = getattr(mx, "metal", None)
    cuda = getattr(mx, "cuda", None)
    return bool((metal and metal.is_available()) or (cuda and cuda.is_available()))


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu and gpu_available()


def default_compute_dtype() -> mx.Dtype:
    """fp32 on the CPU (BLAS has fast fp32 only: bf16/fp16 CPU matmuls run ~100x slower); bf16 on GPUs."""
    return mx.bfloat16 if on_gpu() else mx.float32


def parse_dtype(name: str | None) -> mx.Dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class ModelPathError(ModelFolderError, UsageError):
    """The model named on the command line is not there (or not a model folder): exit 2, before any work."""


def resolve_model_path(model: str | os.PathLike, allow_download: bool = False) -> Path:
    """A local folder, or a Hugging Face repo id resolved from the local cache (download only if allowed)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / CONFIG_NAME).exists():
            raise ModelPathError(f"{path} is not an mlx-video model folder (no {CONFIG_NAME}); "
                                 f"create one with `mlx-video convert ... --mlx-path {path}` "
                                 f"or `mlx-video demo --mlx-path {path}`")
        return path
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise ModelPathError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(model), local_files_only=not allow_download))
    except Exception:  # noqa: BLE001 - hub errors vary by version
        raise ModelPathError(f"model {model} is neither a local folder nor in the Hugging Face cache. "
                             + hub_download_hint(str(model))) from None


# Files that tell a converted mlx-video folder from a PyTorch checkpoint repo.
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", "diffusion_pytorch_model.safetensors", "model_index.json")


def hub_download_hint(repo: str) -> str:
    """The commands that get ``repo`` running: a converted folder is downloaded and used as it is; a PyTorch
    checkpoint is downloaded and converted. The repo's file list tells which (one quick request; when the
    network or the hub cannot answer, both recipes are given)."""
    name = repo.split("/")[-1]
    use = f"`hf download {repo} --local-dir {name}` then `--model {name}`"
    convert = (f"`hf download {repo} --local-dir {name}-pytorch` then `mlx-video convert --hf-path {name}-pytorch "
               f"--mlx-path {name}-mlx` and `--model {name}-mlx`")
    files = None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in {"1", "true", "yes"}:
        try:
            from huggingface_hub import HfApi

            files = [f.rfilename for f in HfApi().model_info(repo, timeout=5).siblings or []]
        except Exception:  # noqa: BLE001 - offline, private, missing: fall back to both recipes
            files = None
    if files is not None:
        if CONFIG_NAME in files and any(f.endswith(("dit.safetensors", "decoder.safetensors")) for f in files):
            return f"It is a converted mlx-video folder: {use}."
        if any(f.endswith(_CHECKPOINT_SUFFIXES) for f in files):
            return f"It is a PyTorch checkpoint, which needs converting: {convert}."
    return (f"If it is a converted mlx-video folder: {use}. If it is a PyTorch checkpoint (such as "
            f"Wan-AI/Wan2.1-T2V-1.3B): {convert}. (`hf` comes with huggingface_hub.)")


# config.json section -> (module, config dataclass): every section is validated when the folder is read.
SECTION_CONFIGS = {"dit": ("mlx_video.models.wan_dit", "WanDiTConfig"),
                   "text_encoder": ("mlx_video.models.umt5", "UMT5Config"),
                   "decoder": ("mlx_video.models.taehv", "TAEHVConfig")}


def read_config(folder: str | os.PathLike) -> dict:
    """A model folder's ``config.json``, validated: bounded plain-file read, every section's values of the
    right type and range, every ``*_file`` name inside the folder. Errors name the file and the field."""
    import importlib

    from .inputs import InputError, read_json, resolve_inside

    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.exists():
        raise ModelFolderError(f"{folder} is not an mlx-video model folder (no {CONFIG_NAME})")
    try:
        config = read_json(path, "model config")
    except InputError as exc:
        raise ModelFolderError(str(exc)) from None
    if config.get("format") != MLX_VIDEO_FORMAT:
        raise ModelFolderError(f"{path} is not an mlx-video model config")
    for name, section in config.items():
        if not isinstance(section, dict):
            if name in SECTION_CONFIGS or name == "sampler":
                raise ModelFolderError(f"{path}: section {name!r} must be a JSON object, not {type(section).__name__}")
            continue  # "format", and top-level values of later versions
        for key, value in section.items():
            if key.endswith("_file"):
                try:
                    resolve_inside(folder, value, f"{path}: {name}.{key}")
                except InputError as exc:
                    raise ModelFolderError(str(exc)) from None
        if name in SECTION_CONFIGS:
            module, cls_name = SECTION_CONFIGS[name]
            cls = getattr(importlib.import_module(module), cls_name, None)  # None only if a test stubs the module
            if cls is not None:
                config_from_dict(cls, section, f"{path}: {name}")
        elif name == "sampler":
            from .sampling import sampler_config

            sampler_config(section, where=f"{path}: sampler")
    return config


def model_file(folder: str | os.PathLike, section: dict, key: str, default: str) -> Path:
    """The file a config section names (``weights_file``, ``tokenizer_file``), checked: inside the folder,
    present, and a regular file (never a FIFO or device that would block or never end)."""
    from .inputs import InputError, check_input_path, resolve_inside

    folder = Path(folder)
    try:
        path = resolve_inside(folder, section.get(key, default), f"{folder / CONFIG_NAME}: {key}")
        if not path.exists():
            named = f" (named by {key} in {folder / CONFIG_NAME})" if key in section else ""
            raise ModelFolderError(f"{path} is missing{named}")
        return check_input_path(path, key.replace("_", " "), folder_ok=False)
    except InputError as exc:
        raise ModelFolderError(str(exc)) from None


def config_section(folder: Path, section: str) -> dict:
    config = read_config(folder)
    if section not in config:
        have = sorted(k for k in config if k != "format")
        raise ModelFolderError(f"{folder} has no {section} (it holds: {', '.join(have) or 'nothing'}); "
                               f"add one with `mlx-video convert --{section.replace('_', '-')} ... --mlx-path {folder}`")
    return config[section]


def config_from_dict(cls, data: dict, where: str | None = None):
    """Build a config dataclass, ignoring keys it does not know (forward compatible).

    Values are validated first (:func:`config_values`); any failure, including the class's own
    cross-field checks, is a :class:`ModelFolderError` naming ``where`` (the file and section) and the field.
    """
    where = where or cls.__name__
    values = config_values(cls, data, where)
    try:
        return cls(**values)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        raise ModelFolderError(f"{where}: {exc}") from None


def config_values(cls, data, where: str) -> dict:
    """The known fields of ``data``, each checked against its annotation (int, float, bool, str, list[...],
    dict, ``X | None``) and the class's ``LIMITS`` (``{field: (lo, hi)}``, inclusive, per list element).
    Integers must be JSON integers (``1e9`` and ``true`` are not), floats finite."""
    import typing

    if not isinstance(data, dict):
        raise ModelFolderError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    limits = getattr(cls, "LIMITS", {})
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            problem = _value_problem(data[f.name], hints[f.name], limits.get(f.name))
            if problem:
                raise ModelFolderError(f"{where}: field {f.name!r} {problem}, got {data[f.name]!r:.80}")
            values[f.name] = data[f.name]
    return values


def _value_problem(value, hint, bounds) -> str | None:
    """Why ``value`` does not fit ``hint`` within ``bounds``, or None."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_value_problem(value, a, bounds) for a in args]
        return None if any(p is None for p in problems) else " or ".join(p.removeprefix("must be ") for p in problems)
    if hint is type(None):
        return None if value is None else "must be null"
    if origin is list:
        if not isinstance(value, list) or len(value) > 4096:
            return "must be a list"
        for i, item in enumerate(value):
            problem = _value_problem(item, args[0] if args else typing.Any, bounds)
            if problem:
                return f"must be a list whose item {i} {problem}"
        return None
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if hint is float else int):
            return "must be an integer" if hint is int else "must be a number"
        if not math.isfinite(value):
            return "must be finite"
        if bounds and not bounds[0] <= value <= bounds[1]:
            return f"must be in [{bounds[0]}, {bounds[1]}]"
        return None
    for kind, name in ((bool, "true or false"), (str, "a string"), (dict, "an object")):
        if hint is kind or origin is kind:
            return None if isinstance(value, kind) else f"must be {name}"
    return None


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def load_weights_strict(model: nn.Module, weights: dict[str, mx.array], what: str) -> None:
    """Load with a complete check: missing, unexpected and mis-shaped parameters are one clear error."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(weights) if tuple(weights[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"missing: {missing[:10]}" if missing else "", f"unexpected: {unexpected[:10]}" if unexpected else "",
                 f"wrong shapes: {wrong[:10]}" if wrong else ""]
        raise ModelFolderError(f"{what}: weights do not match the config ({'; '.join(p for p in parts if p)})")
    model.load_weights(list(weights.items()), strict=True)


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype, keep_fp32: tuple[str, ...] = ()) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype``, except names containing one of ``keep_fp32``."""
    out = {}
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(mx.float32 if any(s in k for s in keep_fp32) else dtype)
        out[k] = v
    return out


def parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def readable_count(n: int) -> str:
    """A parameter count for people: 911_536_960 -> '0.91B', 612_000 -> '0.6M', 5_120 -> '5,120'."""
    if n >= 1e8:
        return f"{n / 1e9:.2f}B"
    if n >= 1e5:
        return f"{n / 1e6:.1f}M"
    return f"{n:,}"


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def free_memory() -> None:
    """Return cached buffers to the system after a stage's model is dropped."""
    import gc

    gc.collect()
    mx.clear_cache()


def write_config_section(folder: Path, previous: Path | None, section: str, value: dict) -> dict:
    """Write ``config.json`` in ``folder``: the previous folder's config with ``section`` set to ``value``.
    Sections are not validated here (rewriting one is how a broken one is fixed); a previous config that
    is not a JSON object raises ``InputError``."""
    import json

    from .inputs import read_json

    config = {"format": MLX_VIDEO_FORMAT}
    if previous is not None and (previous / CONFIG_NAME).exists():
        config.update(read_json(previous / CONFIG_NAME, "model config"))
    config[section] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def save_weights(path: Path, weights: dict[str, mx.array], metadata: dict | None = None) -> None:
    """A safetensors file in MLX's layout (``format: mlx`` in its metadata, as ``mx.save_safetensors`` readers expect)."""
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx", **(metadata or {})})


# Declarative key maps: the converters apply them (``converters.common.apply_key_map``); a model file holds
# the map of its original checkpoint names, which ``prune`` also inverts to write checkpoints back.
Transform = Callable[[mx.array], mx.array]


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (a full-match regex on the source key) -> ``target`` (``re`` template), then ``transform``."""

    pattern: str
    target: str
    transform: Transform | None = None
