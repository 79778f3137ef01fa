"""Model folders, dtypes and strict weight loading shared by every model.

A converted model folder holds one ``config.json`` with a section per component (``dit``,
``text_encoder``, ``decoder``, ``sampler``) and one safetensors file per component.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

CONFIG_NAME = "config.json"
MLX_VIDEO_FORMAT = "mlx-video/1"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ModelFolderError(Exception):
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


def resolve_model_path(model: str | os.PathLike, allow_download: bool = False) -> Path:
    """A local folder, or a Hugging Face repo id resolved from the local cache (download only if allowed)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / CONFIG_NAME).exists():
            raise ModelFolderError(f"{path} is not an mlx-video model folder (no {CONFIG_NAME}); "
                                   f"create one with `mlx-video convert ... --mlx-path {path}`")
        return path
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise ModelFolderError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(model), local_files_only=not allow_download))
    except Exception as exc:  # noqa: BLE001 - hub errors vary by version
        raise ModelFolderError(
            f"model {model} is neither a local folder nor in the Hugging Face cache ({type(exc).__name__}). "
            f"Download it first with: huggingface-cli download {model}"
        ) from None


def read_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{folder} is not an mlx-video model folder (no {CONFIG_NAME})") from None
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{folder / CONFIG_NAME}: invalid JSON ({exc})") from None
    if config.get("format") != MLX_VIDEO_FORMAT:
        raise ModelFolderError(f"{folder / CONFIG_NAME} is not an mlx-video model config")
    return config


def config_section(folder: Path, section: str) -> dict:
    config = read_config(folder)
    if section not in config:
        have = sorted(k for k in config if k != "format")
        raise ModelFolderError(f"{folder} has no {section} (it holds: {', '.join(have) or 'nothing'}); "
                               f"add one with `mlx-video convert --{section.replace('_', '-')} ... --mlx-path {folder}`")
    return config[section]


def config_from_dict(cls, data: dict):
    """Build a config dataclass, ignoring keys it does not know (forward compatible)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


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
