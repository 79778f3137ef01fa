"""``mlx-video prune``: the paper's Taylor-based pruning initialisation (inference only).

Method. For a linear layer ``y = X W^T + b`` the saliency of output row ``i`` over calibration
activations ``X`` is ``I_i = ||X w_i + b_i||^2 = w_i^T X^T X w_i + 2 b_i 1^T X w_i + n b_i^2``, i.e. the
summed squared output of that row. It is accumulated streaming, as ``sum(y**2)`` per output channel
while the DiT runs forward on calibration inputs: no activations and no ``d_in x d_in`` matrices are kept.

- FFN: rank the rows of ``ffn.fc1`` (pre-GELU outputs), keep the top ``--ffn-dim``, slice the matching
  rows of ``fc1`` (weight and bias) and columns of ``fc2``.
- Attention heads (self and cross, per layer): head ``h`` owns rows ``[h*head_dim, (h+1)*head_dim)`` of
  q, k, v (weight, bias, ``norm_q``/``norm_k`` weight) and those columns of ``o`` (models.md §1.8).
  **Head score = the summed saliency of its rows in q, k and v, each projection's saliency taken per
  calibration token** (``I_i / n_tokens``). In self-attention q, k and v see the same tokens, so this is
  exactly the plain sum; in cross-attention q sees video tokens and k/v the 512 text slots, and the
  per-token mean keeps one projection's token count from dominating the sum.
- Alternatives (``--method``): ``magnitude`` ranks rows by ``||w_i||^2`` (a head by the squared Frobenius
  norm of its q/k/v rows; no calibration), ``random`` draws a seeded random ranking.
  Kept indices are returned in ascending order, so keeping everything reproduces the model exactly.

q/k RMSNorm semantics of the pruned model (recorded as ``qk_norm`` in ``config.json``):
- ``kept`` (default): the norm averages over the kept channels only, as a model that is fine-tuned (or
  was trained) with its heads physically removed. This is the model meant for recovery training, and what
  a PyTorch ``RMSNorm(heads*head_dim)`` computes on the ``--torch-out`` state dict (whose safetensors
  metadata records ``qk_norm``/``qk_norm_width``; stock Wan/diffusers classes cannot hold the pruned shapes,
  models.md §1.8, so the training framework needs per-layer widths: see ``saliency.json``).
- ``masked``: reproduces the unpruned model with the pruned heads zeroed, exactly (the norm divides by the
  original inner width, ``qk_norm_width``). A masked source model stays masked unless asked otherwise.

Calibration inputs: text embeddings from (a) the model folder's UMT5 encoder and ``--calibration``
prompts, (b) ``--calibration-embeddings`` (precomputed, safetensors), or (c) ``--synthetic-text``
(random N(0,1) embeddings, for tests and figures); Gaussian noise latents, run through the 4-step
schedule (``--timesteps``; by default each step's input is the re-noised x0 prediction of the previous
step, as the few-step sampler does; ``--calibration-inputs noise`` feeds fresh noise at every timestep).

Outputs: an MLX model folder (``dit.safetensors`` with per-layer head counts and FFN widths in
``config.json``; the folder's other components are linked in), ``saliency.json`` (per-layer scores and
kept indices, calibration settings, time and peak memory), optionally ``--torch-out`` (a PyTorch state
dict in original Wan key names; ``.safetensors``, or ``.pt``/``.pth`` via ``torch.save``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import fsio
from .fsio import OutputRefused
from .models import wan_dit
from .models.wan_dit import FP32_PARAMETERS, WAN_RULES, WEIGHTS_NAME, WanDiT, WanDiTConfig, conv3d_to_patch_linear
from .utils import (CONFIG_NAME, DTYPES, ModelFolderError, cast_floating, config_from_dict, config_section,
                    config_to_dict, free_memory, max_rss_bytes, read_config, resolve_model_path)

METHODS = ("taylor", "magnitude", "random")
DEFAULT_TIMESTEPS = (1000.0, 937.5, 833.333, 625.0)  # Lightning / Self-Forcing 4-step schedule (models.md §5.3)
DEFAULT_LATENT_SHAPE = (1, 30, 52)  # one latent frame of 240x416: ~390 tokens, cheap on a CPU
REPORT_NAME = "saliency.json"
ATTENTION_KINDS = ("self_attn", "cross_attn")
PROJECTIONS = ("q", "k", "v")
TORCH_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


# --------------------------------------------------------------------------------------------------
# Streaming saliency: a recording wrapper around each prunable Linear
# --------------------------------------------------------------------------------------------------


class RowEnergy:
    """Running ``sum over tokens of y**2`` per output row of one Linear, and the token count."""

    def __init__(self, rows: int):
        self.sum = mx.zeros((rows,), mx.float32)
        self.tokens = 0

    def add(self, y: mx.array) -> None:
        axes = tuple(range(y.ndim - 1))
        self.sum = self.sum + mx.sum(mx.square(y.astype(mx.float32)), axis=axes)
        self.tokens += int(np.prod(y.shape[:-1]))
        mx.eval(self.sum)  # streaming: nothing but this [rows] vector outlives the forward pass

    def mean(self) -> np.ndarray:
        """Saliency per calibration token (float64)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens were recorded")
        return np.array(self.sum, dtype=np.float64) / self.tokens


class _Recorder(nn.Module):
    """Stands in for an ``nn.Linear`` inside the DiT: same call and ``weight``, records ``sum(y**2)``."""

    def __init__(self, layer: nn.Module, energy: RowEnergy):
        super().__init__()
        self.inner = layer
        object.__setattr__(self, "_energy", energy)

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        self._energy.add(y)
        return y


def prunable_linears(config: WanDiTConfig) -> list[str]:
    """Names (MLX parameter prefixes) of the Linears whose output rows are scored."""
    names = []
    for i in range(config.num_layers):
        names += [f"blocks.{i}.{kind}.{p}" for kind in ATTENTION_KINDS for p in PROJECTIONS]
        names.append(f"blocks.{i}.ffn.fc1")
    return names


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent = model
    *path, leaf = name.split(".")
    for part in path:
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    return parent, leaf


@contextmanager
def recording(model: WanDiT, names: list[str] | None = None):
    """Wrap the named Linears (default: every prunable one) with recorders for the duration of the block.

    Yields ``{name: RowEnergy}``; the model is restored on exit, even on error.
    """
    names = prunable_linears(model.config) if names is None else names
    energies, originals = {}, []
    try:
        for name in names:
            parent, leaf = _resolve(model, name)
            layer = getattr(parent, leaf)
            if hasattr(layer, "scales"):
                raise ValueError(f"{name} is quantized; prune a float model (convert without --quantize)")
            energies[name] = RowEnergy(layer.weight.shape[0])
            originals.append((parent, leaf, layer))
            setattr(parent, leaf, _Recorder(layer, energies[name]))
        yield energies
    finally:
        for parent, leaf, layer in originals:
            setattr(parent, leaf, layer)


# --------------------------------------------------------------------------------------------------
# Calibration inputs
# --------------------------------------------------------------------------------------------------


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"calibration prompts file {path} is empty (expected one prompt per line)")
    return prompts


def synthetic_text(count: int, config: WanDiTConfig, seed: int = 0) -> list[mx.array]:
    """Random N(0,1) 'T5 embeddings' ``[1, L, text_dim]`` with prompt-like lengths (the rest is padding)."""
    rng = np.random.default_rng([seed, 7919])
    top = max(1, min(64, config.text_len))
    out = []
    for _ in range(count):
        length = int(rng.integers(min(4, top), top + 1))
        out.append(mx.array(rng.standard_normal((1, length, config.text_dim)).astype(np.float32)))
    return out


def load_embeddings(path, config: WanDiTConfig) -> list[mx.array]:
    """Precomputed text embeddings: a safetensors file holding ``embeddings`` (or one tensor) ``[N, L, D]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration embeddings file {path} does not exist")
    try:
        tensors = mx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - MLX raises plain RuntimeError/ValueError
        raise ValueError(f"{path}: cannot read safetensors ({exc})") from None
    if "embeddings" in tensors:
        emb = tensors["embeddings"]
    elif len(tensors) == 1:
        emb = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path}: expected a tensor named 'embeddings' [N, L, text_dim]; found {sorted(tensors)}")
    if emb.ndim == 2:
        emb = emb[None]
    if emb.ndim != 3 or emb.shape[0] == 0 or emb.shape[2] != config.text_dim or emb.shape[1] > config.text_len:
        raise ValueError(f"{path}: embeddings have shape {tuple(emb.shape)}; the model needs [N>=1, L<={config.text_len}, "
                         f"{config.text_dim}]")
    emb = emb.astype(mx.float32)
    return [emb[i:i + 1] for i in range(emb.shape[0])]


def encode_with_folder(folder: Path, prompts: list[str]) -> list[mx.array]:
    """T5 embeddings of the prompts with the folder's own text encoder (freed before the DiT loads)."""
    try:
        from .models import umt5
        from .tokenizer import load_tokenizer
    except ImportError as exc:
        raise ValueError(f"the UMT5 text encoder is not available in this build ({exc}); pass "
                         "--calibration-embeddings FILE or --synthetic-text") from None
    # stream=True: the encoder's blocks are read from disk as they run, so its peak stays ~one block
    encoder, tokenizer = umt5.load(folder, stream=True), load_tokenizer(folder)
    out = []
    for start in range(0, len(prompts), 4):  # small batches: bounded activation memory
        e = umt5.encode_prompts(encoder, tokenizer, prompts[start:start + 4])
        mx.eval(e)
        out += [e[i:i + 1] for i in range(e.shape[0])]
    del encoder, tokenizer
    free_memory()
    return out


def calibrate(model: WanDiT, texts: list[mx.array], timesteps=DEFAULT_TIMESTEPS, samples: int | None = None,
              latent_shape=DEFAULT_LATENT_SHAPE, seed: int = 0, inputs: str = "trajectory",
              progress: bool = False) -> dict[str, RowEnergy]:
    """Run the DiT on calibration inputs and return the streaming row energies of every prunable Linear.

    Sample ``s`` uses text ``texts[s % len(texts)]`` and its own noise; it runs at every timestep (in the
    given order). ``inputs='trajectory'``: the next step's input is ``(1-sigma') x0 + sigma' eps`` with
    ``x0 = x - sigma v`` (the few-step sampler, sigma = t/1000); ``'noise'``: fresh noise at every step.
    """
    if not texts:
        raise ValueError("calibration needs at least one text embedding")
    if inputs not in ("trajectory", "noise"):
        raise ValueError(f"calibration inputs must be 'trajectory' or 'noise', not {inputs!r}")
    samples = len(texts) if samples is None else int(samples)
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    c = model.config
    shape = (1, *[int(s) for s in latent_shape], c.in_channels)
    rng = np.random.default_rng([seed, 104729])
    start = time.perf_counter()
    with recording(model) as energies:
        for s in range(samples):
            text = model.prepare_text(texts[s % len(texts)])
            mx.eval(text)
            x = mx.array(rng.standard_normal(shape).astype(np.float32))
            for j, t in enumerate(timesteps):
                v = model(x, [float(t)], text=text)
                mx.eval(v)
                if j + 1 < len(timesteps):
                    noise = mx.array(rng.standard_normal(shape).astype(np.float32))
                    if inputs == "trajectory":
                        sigma, sigma_next = float(t) / 1000.0, float(timesteps[j + 1]) / 1000.0
                        x = (1.0 - sigma_next) * (x - sigma * v) + sigma_next * noise
                    else:
                        x = noise
                    mx.eval(x)
            del text
            if progress:
                _say(f"calibration sample {s + 1}/{samples} ({len(timesteps)} timesteps, "
                     f"{time.perf_counter() - start:.1f} s)")
    return energies


# --------------------------------------------------------------------------------------------------
# Scores and selection
# --------------------------------------------------------------------------------------------------


def _layer_rng(seed: int, layer: int, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, layer, part])


def row_scores(method: str, name: str, weights: dict, energies: dict | None) -> np.ndarray:
    """Per-output-row score of Linear ``name``: Taylor saliency per token, or ``||w_i||^2``."""
    if method == "taylor":
        return energies[name].mean()
    if method == "magnitude":
        w = weights[f"{name}.weight"].astype(mx.float32)
        return np.array(mx.sum(w * w, axis=1), dtype=np.float64)
    raise ValueError(f"row scores are not defined for method {method!r}")


def select_top(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` highest scores (ties: lower index first), in ascending order."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError("non-finite saliency (calibration activations overflowed); check the model and inputs")
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def score_layers(config: WanDiTConfig, weights: dict, method: str, energies: dict | None = None,
                 seed: int = 0) -> list[dict]:
    """Per layer: head scores of self/cross attention (with the q/k/v parts) and FFN channel scores."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "taylor" and energies is None:
        raise ValueError("taylor scores need calibration energies")
    hd = config.head_dim
    layers = []
    for i in range(config.num_layers):
        entry = {}
        for part, kind in enumerate(ATTENTION_KINDS):
            heads = (config.self_attn_heads if kind == "self_attn" else config.cross_attn_heads)[i]
            if method == "random":
                entry[kind] = {"scores": _layer_rng(seed, i, part).random(heads)}
                continue
            parts = {p: row_scores(method, f"blocks.{i}.{kind}.{p}", weights, energies).reshape(heads, hd).sum(1)
                     for p in PROJECTIONS}
            entry[kind] = {"scores": parts["q"] + parts["k"] + parts["v"], **parts}
        if method == "random":
            entry["ffn"] = {"scores": _layer_rng(seed, i, 2).random(config.ffn_dim[i])}
        else:
            entry["ffn"] = {"scores": row_scores(method, f"blocks.{i}.ffn.fc1", weights, energies)}
        layers.append(entry)
    return layers


def check_widths(config: WanDiTConfig, heads: int | None, cross_heads: int | None, ffn_dim: int | None) -> None:
    """Clear errors for widths the model cannot be pruned to."""
    for flag, value, available, what in (("--heads", heads, config.self_attn_heads, "self-attention heads"),
                                         ("--cross-heads", cross_heads, config.cross_attn_heads,
                                          "cross-attention heads"),
                                         ("--ffn-dim", ffn_dim, config.ffn_dim, "FFN channels")):
        if value is None:
            continue
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
        for layer, n in enumerate(available):
            if value > n:
                raise ValueError(f"{flag} {value} exceeds the {n} {what} of layer {layer} (pruning cannot add width)")


def plan_pruning(config: WanDiTConfig, scores: list[dict], heads: int | None = None, cross_heads: int | None = None,
                 ffn_dim: int | None = None) -> list[dict]:
    """Kept head / channel indices per layer (``None`` widths keep everything)."""
    cross_heads = heads if cross_heads is None else cross_heads
    check_widths(config, heads, cross_heads, ffn_dim)
    plan = []
    for i, s in enumerate(scores):
        plan.append({
            "self_attn": select_top(s["self_attn"]["scores"], heads or config.self_attn_heads[i]),
            "cross_attn": select_top(s["cross_attn"]["scores"], cross_heads or config.cross_attn_heads[i]),
            "ffn": select_top(s["ffn"]["scores"], ffn_dim or config.ffn_dim[i]),
        })
    return plan


# --------------------------------------------------------------------------------------------------
# Slicing weights and config
# --------------------------------------------------------------------------------------------------

_ATTN_KEY = re.compile(r"blocks\.(\d+)\.(self_attn|cross_attn)\.([qkvo]|norm_q|norm_k)\.(weight|bias)")
_FFN_KEY = re.compile(r"blocks\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)")


def head_channels(kept_heads, head_dim: int) -> np.ndarray:
    """Channel indices owned by the kept heads (head h owns [h*head_dim, (h+1)*head_dim))."""
    kept = np.asarray(kept_heads, dtype=np.int64)
    return (kept[:, None] * head_dim + np.arange(head_dim)[None]).reshape(-1)


def _take(w: mx.array, index: np.ndarray, axis: int) -> mx.array:
    if len(index) == w.shape[axis] and np.array_equal(index, np.arange(w.shape[axis])):
        return w  # keep everything: the very same tensor
    return mx.take(w, mx.array(index.astype(np.int32)), axis=axis)


def prune_tensor(key: str, w: mx.array, config: WanDiTConfig, plan: list[dict]) -> mx.array:
    m = _ATTN_KEY.fullmatch(key)
    if m:
        layer, kind, proj, what = int(m[1]), m[2], m[3], m[4]
        index = head_channels(plan[layer][kind], config.head_dim)
        if proj == "o":
            return _take(w, index, 1) if what == "weight" else w
        return _take(w, index, 0)
    m = _FFN_KEY.fullmatch(key)
    if m:
        layer, fc, what = int(m[1]), m[2], m[3]
        index = np.asarray(plan[layer]["ffn"], dtype=np.int64)
        if fc == "fc1":
            return _take(w, index, 0)
        return _take(w, index, 1) if what == "weight" else w
    return w


def prune_weights(weights: dict, config: WanDiTConfig, plan: list[dict], consume: bool = False) -> dict:
    """Sliced copies of MLX-named DiT weights. ``consume=True`` pops each source tensor once its slice is
    evaluated, so the peak is about one model's worth of memory rather than two."""
    out = {}
    for key in list(weights):
        w = weights.pop(key) if consume else weights[key]
        out[key] = prune_tensor(key, w, config, plan)
        if consume:
            mx.eval(out[key])
            del w
            mx.clear_cache()  # hand the source tensor's memory back now, not after the whole model
    return out


def resolve_qk_norm(config: WanDiTConfig, requested: str | None) -> tuple[str, int | None]:
    """(qk_norm, qk_norm_width) of the pruned model; ``None`` inherits the source's semantics."""
    requested = config.qk_norm if requested is None else requested
    if requested == "kept":
        return "kept", None
    if requested != "masked":
        raise ValueError(f"qk_norm must be 'kept' or 'masked', not {requested!r}")
    if config.qk_norm == "masked":
        return "masked", config.qk_norm_width or config.dim
    widths = {h * config.head_dim for h in config.self_attn_heads + config.cross_attn_heads}
    if len(widths) != 1:
        raise ValueError("--qk-norm masked needs one attention width in every layer of the source model "
                         f"(found {sorted(widths)}); use --qk-norm kept")
    return "masked", widths.pop()


def pruned_config(config: WanDiTConfig, plan: list[dict], qk_norm: str | None = None) -> WanDiTConfig:
    mode, width = resolve_qk_norm(config, qk_norm)
    return dataclasses.replace(
        config,
        self_attn_heads=[len(p["self_attn"]) for p in plan],
        cross_attn_heads=[len(p["cross_attn"]) for p in plan],
        ffn_dim=[len(p["ffn"]) for p in plan],
        qk_norm=mode, qk_norm_width=width,
    )


def prune_model(model: WanDiT, plan: list[dict], qk_norm: str | None = None) -> WanDiT:
    """An in-memory pruned copy of ``model`` (the source model is left untouched)."""
    config = pruned_config(model.config, plan, qk_norm)
    pruned = WanDiT(config)
    weights = prune_weights(dict(tree_flatten(model.parameters())), model.config, plan)
    pruned.load_weights(list(weights.items()), strict=True)
    mx.eval(pruned.parameters())
    return pruned


# --------------------------------------------------------------------------------------------------
# PyTorch state dict in original Wan key names
# --------------------------------------------------------------------------------------------------


def _invert_rule(rule) -> tuple[re.Pattern, str]:
    """MLX-name regex and Wan-name template for one ``wan_dit.WAN_RULES`` rule (groups are not nested)."""
    groups = re.findall(r"\(([^()]*)\)", rule.pattern)
    regex = ""
    for part in re.split(r"(\\\d)", rule.target):
        m = re.fullmatch(r"\\(\d)", part)
        regex += f"(?P<g{m[1]}>{groups[int(m[1]) - 1]})" if m else re.escape(part)
    counter = iter(range(1, len(groups) + 1))
    template = re.sub(r"\([^()]*\)", lambda _: f"\\g<g{next(counter)}>", rule.pattern).replace(r"\.", ".")
    if "\\" in template.replace("\\g<", ""):
        raise ValueError(f"cannot invert converter rule {rule.pattern!r}")
    return re.compile(regex), template


def wan_state_dict(weights: dict, config: WanDiTConfig) -> dict[str, mx.array]:
    """MLX-named DiT weights -> original Wan names and PyTorch layouts (Conv3d patch embedding)."""
    inverse = [(rule, *_invert_rule(rule)) for rule in WAN_RULES]
    out = {}
    for key, w in weights.items():
        hits = [(rule, regex.fullmatch(key), template) for rule, regex, template in inverse]
        hits = [(rule, m, template) for rule, m, template in hits if m]
        if len(hits) != 1:
            raise ValueError(f"no unique Wan name for MLX parameter {key!r} ({len(hits)} rules match)")
        rule, m, template = hits[0]
        name = m.expand(template)
        if not re.fullmatch(rule.pattern, name):  # the converter maps it back to the same MLX key
            raise ValueError(f"inverse of {key!r} gave {name!r}, which the converter does not map back")
        if rule.transform is conv3d_to_patch_linear:
            pt, ph, pw = config.patch_size
            w = w.reshape(w.shape[0], pt, ph, pw, config.in_channels).transpose(0, 4, 1, 2, 3)
        elif rule.transform is not None:
            raise ValueError(f"no inverse for the converter transform of {key!r}")
        if name in out:
            raise ValueError(f"two MLX parameters map to {name!r}")
        out[name] = w
    return out


def save_torch_state_dict(path, weights: dict, config: WanDiTConfig, metadata: dict | None = None) -> None:
    """Write ``wan_state_dict(weights)``: ``.safetensors`` (no torch needed) or ``torch.save`` for .pt/.pth/.bin."""
    path = Path(path)
    state = wan_state_dict(weights, config)
    tmp = fsio.make_temp_file(path)  # keeps the suffix: MLX appends a missing .safetensors
    try:
        if path.suffix == ".safetensors":
            mx.save_safetensors(str(tmp), {k: mx.contiguous(v) for k, v in state.items()},
                                metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
        else:
            import torch

            tensors = {}
            for k, v in state.items():
                if v.dtype == mx.bfloat16:
                    tensors[k] = torch.from_numpy(np.array(v.astype(mx.float32))).bfloat16()
                else:
                    tensors[k] = torch.from_numpy(np.ascontiguousarray(np.asarray(v)))
            with open(tmp, "wb") as f:
                torch.save(tensors, f)
        fsio.publish_file(tmp, path, fsio.kind_for_suffix(path))
    except BaseException:
        fsio.discard(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# Evaluation (ablations)
# --------------------------------------------------------------------------------------------------


def output_error(reference: WanDiT, candidate: WanDiT, texts: list[mx.array], timesteps=DEFAULT_TIMESTEPS,
                 latent_shape=DEFAULT_LATENT_SHAPE, seed: int = 1) -> float:
    """Relative L2 error ``||v_c - v_r|| / ||v_r||`` of the velocity over held-out inputs: one noise latent
    per text, at every timestep (the same inputs for both models)."""
    rng = np.random.default_rng([seed, 15485863])
    num = den = 0.0
    for text in texts:
        ref_text, cand_text = reference.prepare_text(text), candidate.prepare_text(text)
        for t in timesteps:
            x = mx.array(rng.standard_normal((1, *latent_shape, reference.config.in_channels)).astype(np.float32))
            a, b = reference(x, [float(t)], text=ref_text), candidate(x, [float(t)], text=cand_text)
            d = (b - a).astype(mx.float32)
            num += float(mx.sum(d * d))
            den += float(mx.sum(a.astype(mx.float32) ** 2))
    return math.sqrt(num / max(den, 1e-30))


# --------------------------------------------------------------------------------------------------
# The whole command
# --------------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _round(values, digits: int = 6) -> list:
    return [float(f"{float(v):.{digits}g}") for v in np.asarray(values).reshape(-1)]


def _layer_report(config: WanDiTConfig, scores: list[dict], plan: list[dict]) -> list[dict]:
    layers = []
    for i, (s, p) in enumerate(zip(scores, plan)):
        entry = {"layer": i}
        for kind in ATTENTION_KINDS:
            heads = (config.self_attn_heads if kind == "self_attn" else config.cross_attn_heads)[i]
            entry[kind] = {"heads": heads, "kept": [int(h) for h in p[kind]], "scores": _round(s[kind]["scores"]),
                           **{f"{q}_scores": _round(s[kind][q]) for q in PROJECTIONS if q in s[kind]}}
        entry["ffn"] = {"channels": config.ffn_dim[i], "kept": [int(c) for c in p["ffn"]],
                        "scores": _round(s["ffn"]["scores"])}
        layers.append(entry)
    return layers


def calibration_texts(folder: Path, config: WanDiTConfig, calibration=None, calibration_embeddings=None,
                      synthetic: bool = False, samples: int | None = None, seed: int = 0,
                      progress: bool = False) -> tuple[list[mx.array], str]:
    """Text embeddings for calibration and a description of where they came from."""
    if calibration_embeddings:
        return load_embeddings(calibration_embeddings, config), f"embeddings:{calibration_embeddings}"
    prompts = read_prompts(calibration) if calibration else None
    if synthetic:
        n = len(prompts) if prompts else (samples or 4)
        return synthetic_text(n, config, seed), f"synthetic:{n}"
    if prompts is None:
        raise ValueError("taylor pruning needs calibration text: give --calibration PROMPTS_FILE (encoded with the "
                         "model folder's text encoder), --calibration-embeddings FILE or --synthetic-text")
    if progress:
        _say(f"encoding {len(prompts)} calibration prompts with the folder's text encoder")
    return encode_with_folder(folder, prompts), f"prompts:{calibration}"


def _validate_calibration_source(folder: Path, calibration, calibration_embeddings, synthetic: bool) -> None:
    """Cheap checks done before any work, so that bad inputs fail fast and write nothing."""
    if calibration_embeddings and (synthetic or calibration):
        raise ValueError("give one calibration text source: --calibration-embeddings, or --calibration and/or "
                         "--synthetic-text")
    if calibration_embeddings:
        if not Path(calibration_embeddings).is_file():
            raise FileNotFoundError(f"calibration embeddings file {calibration_embeddings} does not exist")
        return
    if calibration:
        read_prompts(calibration)
    if synthetic:
        return
    if not calibration:
        raise ValueError("taylor pruning needs calibration text: give --calibration PROMPTS_FILE (encoded with the "
                         "model folder's text encoder), --calibration-embeddings FILE or --synthetic-text")
    if "text_encoder" not in read_config(folder):
        raise ModelFolderError(f"{folder} has no text_encoder to embed the calibration prompts; add one with "
                               "`mlx-video convert --text-encoder ...`, or pass --calibration-embeddings FILE or "
                               "--synthetic-text")


def prune(model, mlx_path, heads: int | None = None, cross_heads: int | None = None, ffn_dim: int | None = None,
          method: str = "taylor", calibration=None, calibration_embeddings=None, synthetic_text: bool = False,
          timesteps=DEFAULT_TIMESTEPS, samples: int | None = None, latent_shape=DEFAULT_LATENT_SHAPE,
          seed: int = 0, inputs: str = "trajectory", qk_norm: str | None = None, torch_out=None,
          dtype: str | None = None, progress: bool = True) -> dict:
    """Prune the DiT of model folder ``model`` into the new folder ``mlx_path``; returns the saliency report."""
    t_start = time.perf_counter()
    # ---- validate everything before any work: bad inputs fail fast and leave nothing behind
    folder = resolve_model_path(model)
    section = config_section(folder, "dit")
    config = config_from_dict(WanDiTConfig, section)
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    check_widths(config, heads, heads if cross_heads is None else cross_heads, ffn_dim)
    resolve_qk_norm(config, qk_norm)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(mlx_path)
    if os.path.lexists(out):  # a pruned model is always a new folder: never replace anything
        raise OutputRefused(f"{out} already exists; choose a new --mlx-path or remove it")
    fsio.check_parent(out, create=True)
    if torch_out is not None:
        torch_out = Path(torch_out)
        if torch_out.suffix not in TORCH_SUFFIXES:
            raise ValueError(f"--torch-out {torch_out}: use one of {', '.join(TORCH_SUFFIXES)}")
        if os.path.lexists(torch_out):
            raise OutputRefused(f"--torch-out {torch_out} already exists; choose a new path or remove it")
        fsio.check_parent(torch_out)
    weights_path = folder / section.get("weights_file", WEIGHTS_NAME)
    if not weights_path.is_file():
        raise ModelFolderError(f"{folder} has no DiT weights ({weights_path.name})")
    from .safetensors_io import read_safetensors_header

    header = read_safetensors_header(weights_path)
    if any(k.endswith(".scales") for k in header):
        raise ValueError(f"{weights_path} is quantized; prune a float model (convert without --quantize)")
    expected = {k: tuple(v.shape) for k, v in tree_flatten(WanDiT(config).parameters())}  # lazy: no allocation
    if expected != {k: tuple(v["shape"]) for k, v in header.items()}:
        raise ModelFolderError(f"{weights_path} does not match the dit section of {folder / CONFIG_NAME}")
    timesteps = [float(t) for t in timesteps]
    if not timesteps or any(not 0.0 <= t <= 1000.0 for t in timesteps):
        raise ValueError(f"--timesteps must be in [0, 1000], got {timesteps}")
    if samples is not None and samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    latent_shape = tuple(int(s) for s in latent_shape)
    if len(latent_shape) != 3 or any(s < 1 for s in latent_shape) or any(
            s % p for s, p in zip(latent_shape, config.patch_size)):
        raise ValueError(f"--latent-shape {latent_shape} must be 3 positive sizes divisible by the patch size "
                         f"{tuple(config.patch_size)}")
    if method == "taylor":
        _validate_calibration_source(folder, calibration, calibration_embeddings, synthetic_text)

    timing = {}
    calib_info = {"method": method}
    energies = None
    if method == "taylor":
        t0 = time.perf_counter()
        texts, source = calibration_texts(folder, config, calibration, calibration_embeddings, synthetic_text,
                                          samples, seed, progress)
        timing["text_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dit = wan_dit.load(folder)
        timing["load_s"] = time.perf_counter() - t0
        if progress:
            _say(f"calibrating {config.num_layers} layers: {samples or len(texts)} samples x {len(timesteps)} "
                 f"timesteps at latent {latent_shape}")
        t0 = time.perf_counter()
        energies = calibrate(dit, texts, timesteps, samples, latent_shape, seed, inputs, progress)
        timing["calibration_s"] = time.perf_counter() - t0
        calib_info.update(text=source, texts=len(texts), samples=samples or len(texts), timesteps=timesteps,
                          latent_shape=list(latent_shape), inputs=inputs, seed=seed,
                          tokens={"video": energies["blocks.0.self_attn.q"].tokens,
                                  "text": energies["blocks.0.cross_attn.k"].tokens})
        del texts, dit
        free_memory()
    else:
        calib_info.update(seed=seed)

    # Score and slice the weights as stored (read lazily, tensor by tensor): exact, and the calibration
    # model (possibly in another compute dtype) is gone, so the peak stays about one model's worth.
    t0 = time.perf_counter()
    weights = mx.load(str(weights_path))
    params_before = sum(v.size for v in weights.values())
    scores = score_layers(config, weights, method, energies, seed)
    plan = plan_pruning(config, scores, heads, cross_heads, ffn_dim)
    del energies
    new_config = pruned_config(config, plan, qk_norm)
    new = prune_weights(weights, config, plan, consume=True)
    if dtype is not None:
        new = cast_floating(new, DTYPES[dtype], keep_fp32=FP32_PARAMETERS)
        mx.eval(new)
    timing["select_and_slice_s"] = time.perf_counter() - t0
    params_after = sum(v.size for v in new.values())

    report = {
        "method": method,
        "saliency": "I_i = ||X w_i + b_i||^2 per output row (sum of y_i^2 over calibration tokens); head score = "
                    "sum over its q, k, v rows of I_i / tokens; FFN channel score = I_i / tokens of ffn.fc1"
                    if method == "taylor" else
                    ("||w_i||^2 per row; head score = sum over its q, k, v rows" if method == "magnitude"
                     else "seeded uniform random ranking"),
        "source": str(folder),
        "calibration": calib_info,
        "widths": {"heads": heads, "cross_heads": heads if cross_heads is None else cross_heads, "ffn_dim": ffn_dim,
                   "head_dim": config.head_dim},
        "qk_norm": new_config.qk_norm,
        "qk_norm_width": new_config.qk_norm_width,
        "parameters": {"before": int(params_before), "after": int(params_after)},
        "layers": _layer_report(config, scores, plan),
    }
    dit_section = {k: v for k, v in section.items() if k not in config_to_dict(config)}
    dit_section.update(config_to_dict(new_config))
    dit_section.update(weights_file=WEIGHTS_NAME, parameters=int(params_after),
                       dtype=dtype or section.get("dtype", "float32"),
                       pruned={"method": method, "report": REPORT_NAME, "source": str(folder),
                               "qk_norm": new_config.qk_norm})

    from .utils import save_weights

    from .fsio import atomic_model_folder, link_or_copy

    t0 = time.perf_counter()
    with atomic_model_folder(out) as tmp:
        source_config = json.loads((folder / CONFIG_NAME).read_text())
        skip = {CONFIG_NAME, REPORT_NAME, weights_path.name}
        for item in folder.iterdir():
            if item.name not in skip and not item.name.startswith("."):
                link_or_copy(item, tmp / item.name)
        save_weights(tmp / WEIGHTS_NAME, new, {"pruned_by": "mlx-video prune", "method": method,
                                               "qk_norm": new_config.qk_norm})
        source_config["dit"] = dit_section
        (tmp / CONFIG_NAME).write_text(json.dumps(source_config, indent=2, sort_keys=True) + "\n")
        if torch_out is not None:
            save_torch_state_dict(torch_out, new, new_config,
                                  {"qk_norm": new_config.qk_norm, "qk_norm_width": new_config.qk_norm_width,
                                   "head_dim": new_config.head_dim})
        timing["write_s"] = time.perf_counter() - t0
        timing["total_s"] = time.perf_counter() - t_start
        report["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
        report["memory"] = {"peak_rss_bytes": max_rss_bytes(), "mlx_peak_bytes": int(mx.get_peak_memory())}
        (tmp / REPORT_NAME).write_text(json.dumps(report) + "\n")
    if progress:
        from .utils import readable_count

        _say(f"pruned {readable_count(params_before)} -> {readable_count(params_after)} parameters ({method}, qk_norm "
             f"{new_config.qk_norm}) in {timing['total_s']:.1f} s; wrote {out}"
             + (f" and {torch_out}" if torch_out else ""))
    return report


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="Taylor-prune attention heads and FFN channels of a DiT",
        description="Prune a DiT model folder with the paper's Taylor saliency (the energy ||X w_i + b_i||^2 "
        "of each output row over calibration activations; a head scores the sum over its q, k and v rows, "
        "each per calibration token). Writes a new model folder, saliency.json and optionally a PyTorch "
        "state dict in original Wan key names.",
    )
    p.add_argument("--model", required=True, help="source model folder (or Hugging Face repo id in the local cache)")
    p.add_argument("--mlx-path", required=True, help="output model folder (must not exist)")
    p.add_argument("--heads", type=int, default=None, help="attention heads to keep per layer (default: all)")
    p.add_argument("--cross-heads", type=int, default=None,
                   help="cross-attention heads to keep per layer (default: --heads)")
    p.add_argument("--ffn-dim", type=int, default=None, help="FFN channels to keep per layer (default: all)")
    p.add_argument("--method", choices=METHODS, default="taylor",
                   help="selection: taylor saliency (default), weight magnitude ||w_i||, or random (for comparison)")
    p.add_argument("--calibration", default=None,
                   help="calibration prompts file, one per line (embedded with the folder's text encoder)")
    p.add_argument("--calibration-embeddings", default=None,
                   help="precomputed text embeddings: safetensors with 'embeddings' [N, L, text_dim]")
    p.add_argument("--synthetic-text", action="store_true",
                   help="random N(0,1) text embeddings instead of a text encoder (tests, figures)")
    p.add_argument("--timesteps", type=float, nargs="+", default=list(DEFAULT_TIMESTEPS),
                   help="calibration timesteps, in sampling order (default: the 4-step schedule "
                   f"{' '.join(f'{t:g}' for t in DEFAULT_TIMESTEPS)})")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration noise latents, each run at every timestep (default: one per text)")
    p.add_argument("--latent-shape", type=int, nargs=3, default=list(DEFAULT_LATENT_SHAPE), metavar=("F", "H", "W"),
                   help="calibration latent frames, height and width (default: "
                   f"{' '.join(map(str, DEFAULT_LATENT_SHAPE))}, i.e. one 240x416 frame)")
    p.add_argument("--calibration-inputs", choices=["trajectory", "noise"], default="trajectory",
                   help="trajectory (default): re-noised x0 predictions of the previous step (few-step sampler); "
                   "noise: fresh noise at every timestep")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration noise, synthetic text and random (default: 0)")
    p.add_argument("--qk-norm", choices=["kept", "masked"], default=None,
                   help="q/k RMSNorm of the pruned model: 'kept' normalises over the kept heads (to fine-tune); "
                   "'masked' reproduces the source with pruned heads zeroed (default: kept, or the source's)")
    p.add_argument("--torch-out", default=None,
                   help="also write a PyTorch state dict in original Wan key names (.safetensors, .pt or .pth)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype of the pruned model (default: the source's)")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Flag values that are wrong whatever the model: a usage error (exit 2) before anything is read."""
    from .utils import UsageError

    for flag, value in (("--heads", args.heads), ("--cross-heads", args.cross_heads), ("--ffn-dim", args.ffn_dim),
                        ("--samples", args.samples)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if not all(math.isfinite(t) and 0 <= t <= 1000 for t in args.timesteps):
        raise UsageError(f"--timesteps must be in [0, 1000], got {args.timesteps}")
    if any(n < 1 for n in args.latent_shape):
        raise UsageError(f"--latent-shape must be 3 positive sizes, got {tuple(args.latent_shape)}")
    for flag, value in (("--calibration", args.calibration), ("--calibration-embeddings", args.calibration_embeddings)):
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{flag} {value}: no such file")
    parent = Path(args.mlx_path).absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--mlx-path {args.mlx_path}: the folder {parent} does not exist")


def run(args) -> int:
    check_args(args)
    prune(args.model, args.mlx_path, heads=args.heads, cross_heads=args.cross_heads, ffn_dim=args.ffn_dim,
          method=args.method, calibration=args.calibration, calibration_embeddings=args.calibration_embeddings,
          synthetic_text=args.synthetic_text, timesteps=args.timesteps, samples=args.samples,
          latent_shape=args.latent_shape, seed=args.seed, inputs=args.calibration_inputs, qk_norm=args.qk_norm,
          torch_out=args.torch_out, dtype=args.dtype)
    return 0
