"""LoRA adapters for the Wan DiT: read diffusers/PEFT and kohya/ComfyUI files, merge ``W + scale * B @ A``.

Used at load time by ``generate --lora FILE[:SCALE]`` (the folder is untouched) and at conversion by
``convert --lora`` (merged into ``dit.safetensors``). Formats:
- diffusers / PEFT: ``<module>.lora_A[.default].weight`` [r, in], ``<module>.lora_B[.default].weight`` [out, r];
  scale alpha / r from a ``<module>.alpha`` tensor, else ``lora_alpha`` and ``r`` of an ``adapter_config.json``
  beside the file, else 1. Prefixes ``base_model.model.``, ``transformer.``, ``diffusion_model.``, ... and
  LongLive's ``{"generator_lora", "critic_lora"}`` dict (checkpoints.md §3.3; the critic is ignored).
- kohya / ComfyUI: ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, ``<module>.alpha`` (scale
  alpha / r), with ``lora_unet_`` + underscored module names (``lora_unet_blocks_0_self_attn_q``) or dotted
  ``diffusion_model.`` names.
Module names are Wan's (``blocks.0.self_attn.q``, ``blocks.0.ffn.0``, ``text_embedding.0``, ``time_projection.1``,
``head.head``) or diffusers' (``blocks.0.attn1.to_q``, ``blocks.0.ffn.net.0.proj``, ``proj_out``, ...): the
attention, FFN, text/time embedding and modulation (``time_projection``) Linears.

Strict: a tensor that is not a factor of one of those Linears, a factor without its partner, or factors whose
shapes do not fit the weight is an error naming the key; every check runs before any weight changes.

Pruned models (``mlx-video prune``): a LoRA made for the unpruned model is mapped by keeping the rows of q, k,
v and ffn.0 and the columns of o and ffn.2 that survived, from the kept indices ``prune`` records in the
folder's ``saliency.json``. Slicing B's rows (or A's columns) equals pruning the merged weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .utils import UsageError, UserError


class LoraError(UserError):
    """A LoRA file that cannot be applied; nothing was changed (exit 1)."""


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.scale:g}"


def parse_spec(text: str, flag: str = "--lora") -> LoraSpec:
    """``FILE[:SCALE]``; the scale is taken only when the text after the last ``:`` is a number."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not np.isfinite(scale):
        raise UsageError(f"{flag} {text}: the scale must be a finite number")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag} {text}: no such file {p}")
    return LoraSpec(p, scale)


# (module regex on dotted names, MLX module); Wan names first, then diffusers'.
_MODULES = [
    (r"blocks\.(\d+)\.(self_attn|cross_attn)\.([qkvo])", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.fc1"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.fc2"),
    (r"text_embedding\.0", "text_embedding.linear_1"), (r"text_embedding\.2", "text_embedding.linear_2"),
    (r"time_embedding\.0", "time_embedding.linear_1"), (r"time_embedding\.2", "time_embedding.linear_2"),
    (r"time_projection\.1", "time_projection"),
    (r"head\.head", "head.linear"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.fc1"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.fc2"),
    (r"condition_embedder\.text_embedder\.linear_([12])", r"text_embedding.linear_\1"),
    (r"condition_embedder\.time_embedder\.linear_([12])", r"time_embedding.linear_\1"),
    (r"condition_embedder\.time_proj", "time_projection"),
    (r"proj_out", "head.linear"),
]
_DOTTED = [(re.compile(p), t) for p, t in _MODULES]
_UNDERSCORED = [(re.compile(p.replace(r"\.", "_")), t) for p, t in _MODULES]  # kohya's lora_unet_ names
_PREFIXES = ("generator_lora.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
             "model.", "unet.")
_FACTOR = re.compile(r"(.+?)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|(.+?)\.(alpha)")


def _module_target(module: str) -> str | None:
    module = module.replace("_fsdp_wrapped_module.", "")  # FSDP-named adapters (checkpoints.md §0)
    kohya = module.startswith("lora_unet_")
    if kohya:
        module = module[len("lora_unet_"):]
    else:
        for prefix in _PREFIXES:
            while module.startswith(prefix):
                module = module[len(prefix):]
    for regex, target in (_UNDERSCORED if kohya else _DOTTED):
        m = regex.fullmatch(module)
        if m:
            return m.expand(target)
    return None


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A LoRA file's tensors as fp32 numpy arrays (.safetensors, or a .pt/.pth/.bin read with weights_only)."""
    if path.suffix == ".safetensors":
        from .safetensors_io import SafetensorsError, load_safetensors

        try:
            return {k: np.array(v.astype(mx.float32)) for k, v in load_safetensors(path).items()}
        except SafetensorsError as exc:
            raise LoraError(str(exc)) from None
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise LoraError(f"{path}: unknown LoRA file type {path.suffix!r} (expected .safetensors, .pt, .pth)")
    try:
        import torch
    except ImportError:
        raise LoraError(f"{path}: reading .pt/.pth LoRAs needs torch (or convert it to .safetensors)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise LoraError(f"{path}: not a plain PyTorch tensor file ({type(exc).__name__}: {str(exc)[:160]})") from None
    out: dict[str, np.ndarray] = {}

    def walk(o, prefix):
        if isinstance(o, torch.Tensor):
            out[prefix[:-1]] = o.detach().float().numpy()
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{prefix}{k}.")
        else:
            raise LoraError(f"{path}: entry {prefix[:-1]!r} is a {type(o).__name__}, not a tensor")

    walk(obj, "")
    return out


def _adapter_config(path: Path) -> dict:
    cfg = path.parent / "adapter_config.json"
    if not cfg.is_file():
        return {}
    from .inputs import InputError, read_json

    try:
        data = read_json(cfg, "PEFT adapter config")
    except InputError as exc:
        raise LoraError(str(exc)) from None
    if data.get("rank_pattern") or data.get("alpha_pattern"):
        raise LoraError(f"{cfg}: per-module rank_pattern/alpha_pattern are not supported")
    return data


@dataclass
class Factors:
    """One Linear's adapter: ``delta = scale * up @ down`` (up [out, r], down [r, in], fp32)."""
    key: str  # the file's module name (for messages)
    up: np.ndarray
    down: np.ndarray
    scale: float


def read_lora(spec: LoraSpec) -> dict[str, Factors]:
    """``{MLX weight name (e.g. 'blocks.0.self_attn.q.weight'): Factors}``; every key is checked."""
    tensors = {k: v for k, v in _read_tensors(spec.path).items() if not k.startswith("critic_lora.")}
    if not tensors:
        raise LoraError(f"{spec.path}: no LoRA tensors found")
    parts: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    bad = []
    for key, value in tensors.items():
        m = _FACTOR.fullmatch(key)
        module, kind = (m.group(1), m.group(2)) if m and m.group(1) else (m.group(3), m.group(4)) if m else (None, None)
        target = _module_target(module) if module else None
        if target is None:
            bad.append(key)
            continue
        role = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up", "alpha": "alpha"}[kind]
        parts.setdefault(target, {})
        if role in parts[target]:
            raise LoraError(f"{spec.path}: {key} and {parts[target][role][0]} are the same factor of {target}")
        parts[target][role] = (key, value)
    if bad:
        raise LoraError(f"{spec.path}: {len(bad)} tensor(s) are not LoRA factors of the DiT's attention, FFN, "
                        f"embedding or modulation Linears: {bad[:3]}")
    config = _adapter_config(spec.path)
    out = {}
    for target, p in sorted(parts.items()):
        if "up" not in p or "down" not in p:
            have = next(iter(p.values()))[0]
            need = "lora_B/lora_up" if "down" in p else "lora_A/lora_down"
            raise LoraError(f"{spec.path}: {have} is there but not its partner ({need} of the same module)")
        (key, up), (_, down) = p["up"], p["down"]
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{spec.path}: {key}: factors of shapes up {up.shape} and down {down.shape} do not "
                            f"multiply; expected up/lora_B [out, r] and down/lora_A [r, in]")
        rank = down.shape[0]
        if "alpha" in p:
            alpha = float(np.asarray(p["alpha"][1]).reshape(-1)[0])
        elif "lora_alpha" in config:
            alpha = float(config["lora_alpha"]) * rank / float(config.get("r", rank))
        else:
            alpha = float(rank)
        out[f"{target}.weight"] = Factors(key.rsplit(".lora", 1)[0], up, down, spec.scale * alpha / rank)
    return out


# --------------------------------------------------------------------------------------------------
# Pruned models: kept rows/columns from saliency.json
# --------------------------------------------------------------------------------------------------

_ROWS = re.compile(r"blocks\.(\d+)\.(self_attn|cross_attn)\.([qkv])\.weight|blocks\.(\d+)\.ffn\.fc1\.weight")
_COLS = re.compile(r"blocks\.(\d+)\.(self_attn|cross_attn)\.o\.weight|blocks\.(\d+)\.ffn\.fc2\.weight")


def kept_indices(folder: Path, dit_section: dict) -> list[dict] | None:
    """Per layer ``{"self_attn": channels, "cross_attn": channels, "ffn": channels}`` of a pruned folder (kept
    heads expanded to their channels), or None for an unpruned one."""
    pruned = dit_section.get("pruned")
    if not pruned:
        return None
    report = Path(folder) / pruned.get("report", "saliency.json")
    if not report.is_file():
        return None
    from .inputs import InputError, read_json

    try:
        layers = read_json(report, "prune report", 64 * 1024**2)["layers"]
        head_dim = int(dit_section["head_dim"])
        return [{kind: (np.asarray(e[kind]["kept"], np.int64)[:, None] * head_dim
                        + np.arange(head_dim)[None]).reshape(-1) for kind in ("self_attn", "cross_attn")}
                | {"ffn": np.asarray(e["ffn"]["kept"], np.int64)} for e in layers]
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise LoraError(f"{report}: cannot read the kept indices ({exc})") from None


def _fit(name: str, f: Factors, shape: tuple, kept: list[dict] | None, source: Path) -> Factors:
    """The factors sliced to a pruned weight's shape (rows of q/k/v/fc1, columns of o/fc2), or a shape error."""
    if (f.up.shape[0], f.down.shape[1]) == tuple(shape):
        return f
    if kept is not None:
        m, c = _ROWS.fullmatch(name), _COLS.fullmatch(name)
        if m:
            layer = int(m.group(1) or m.group(4))
            index = kept[layer][m.group(2) or "ffn"]
            if len(index) == shape[0] and f.up.shape[0] > index.max(initial=-1) and f.down.shape[1] == shape[1]:
                return Factors(f.key, f.up[index], f.down, f.scale)
        if c:
            layer = int(c.group(1) or c.group(3))
            index = kept[layer][c.group(2) or "ffn"]
            if len(index) == shape[1] and f.down.shape[1] > index.max(initial=-1) and f.up.shape[0] == shape[0]:
                return Factors(f.key, f.up, f.down[:, index], f.scale)
    raise LoraError(f"{source}: {f.key}: the LoRA changes a [{f.up.shape[0]}, {f.down.shape[1]}] weight, but the "
                    f"model's {name} is {list(shape)}" + ("" if kept is None else
                                                         " (and it is not this pruned model's unpruned width)"))


def plan_merge(shapes: dict[str, tuple], specs: list[LoraSpec], kept: list[dict] | None = None
               ) -> list[tuple[str, Factors]]:
    """Every file read and checked against the model's weight shapes: ``[(weight name, fitted factors)]``."""
    plan: list[tuple[str, Factors]] = []
    for spec in specs:
        for name, f in read_lora(spec).items():
            if name not in shapes:
                raise LoraError(f"{spec.path}: {f.key}: the model has no weight {name}")
            plan.append((name, _fit(name, f, tuple(shapes[name]), kept, spec.path)))
    return plan


def check_folder(folder: Path, specs: list[LoraSpec]) -> None:
    """``generate --lora``: check the files against the folder's DiT (its safetensors header only) before any work."""
    if not specs:
        return
    from .safetensors_io import read_safetensors_header
    from .utils import config_section, model_file

    section = config_section(folder, "dit")
    header = read_safetensors_header(model_file(folder, section, "weights_file", "dit.safetensors"))
    plan_merge({k: tuple(v["shape"]) for k, v in header.items()}, specs, kept_indices(folder, section))


def _merge_each(weights: dict[str, mx.array], plan: list[tuple[str, Factors]], out_dtype: mx.Dtype | None):
    """``(name, W + sum of its LoRAs' scale * B @ A)`` one weight at a time (fp32 sums, cast to ``out_dtype``)."""
    by_name: dict[str, list[Factors]] = {}
    for name, f in plan:
        by_name.setdefault(name, []).append(f)
    for name, fs in by_name.items():
        w = weights[name].astype(mx.float32)
        for f in fs:
            w = w + f.scale * (mx.array(f.up) @ mx.array(f.down))
        w = w.astype(out_dtype or weights[name].dtype)
        mx.eval(w)
        yield name, w


def merged_weights(weights: dict[str, mx.array], specs: list[LoraSpec], kept: list[dict] | None = None,
                   out_dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """The weights the LoRAs change, merged (``W + scale * B @ A`` in fp32, cast to ``out_dtype``, default W's).

    Every file is read and checked against ``weights`` (names, shapes) before anything is computed, so a bad
    file changes nothing."""
    plan = plan_merge({k: tuple(w.shape) for k, w in weights.items()}, specs, kept)
    return dict(_merge_each(weights, plan, out_dtype))


def apply_to_model(model, specs: list[LoraSpec], folder: Path | None = None, dit_section: dict | None = None) -> None:
    """Merge LoRAs into a loaded DiT in place (``generate --lora``); the folder on disk is untouched. All files
    are checked first; then each weight is replaced as soon as it is merged, so the peak grows by one weight,
    not by every weight a LoRA touches (LongLive's adapter touches all block Linears)."""
    if not specs:
        return
    from mlx.utils import tree_flatten, tree_unflatten

    weights = dict(tree_flatten(model.parameters()))
    kept = kept_indices(folder, dit_section or {}) if folder is not None else None
    plan = plan_merge({k: tuple(w.shape) for k, w in weights.items()}, specs, kept)
    for name, merged in _merge_each(weights, plan, None):
        model.update(tree_unflatten([(name, merged)]))
        weights[name] = None  # drop this reference to the old weight now


def describe(specs: list[LoraSpec]) -> list[dict]:
    """What ``config.json`` / the metadata record about applied LoRAs."""
    return [{"file": s.path.name, "scale": s.scale} for s in specs]

