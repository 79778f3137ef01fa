"""UMT5-XXL text encoder (Wan's ``T5Encoder``), exact MLX port, with INT-N weights and low-memory loading.

Reference: ``shared/reference/models.md`` §2 ([WAN] ``wan/modules/t5.py``, [HF] ``modeling_umt5.py``).
Parameter names follow Wan's keys where MLX allows (``converters/umt5.py`` holds the mapping):
``token_embedding``, ``blocks.{i}.{norm1,attn.{q,k,v,o},pos_embedding,norm2,ffn.{gate,fc1,fc2}}``, ``norm``.

Math: unscaled token embedding; per block x += Attn(RMSNorm(x)) with this block's own relative-position
bias and no 1/sqrt(d) scaling, then x += fc2(fc1(h) * gelu_tanh(gate(h))); final RMSNorm.

Precision and memory policy:
- the residual stream, RMSNorm statistics, position bias and softmax are fp32; matmuls run in the
  compute dtype (fp32 on the CPU, bf16 on GPUs). fp16 matmul inputs/outputs are clamped to the fp16
  range (Wan's ``fp16_clamp``), so fp16 never produces inf.
- INT-N (affine, per group) projections stay quantized in memory. On the CPU backend, where
  ``quantized_matmul`` is slow, each projection is dequantized to an fp32 copy just before its matmul
  and freed right after (one projection at a time); on GPUs ``quantized_matmul`` runs directly.
- ``load`` never reads the token embedding table (256384 x 4096, 2.1 GB in bf16): the rows a prompt
  uses are read from the safetensors file on demand. ``load(..., stream=True)`` also keeps no transformer block
  resident: each block is read from disk, used and freed in turn (for the smallest devices).
- Prompts are encoded at their real length (pad keys masked within a batch); rows past a prompt's
  length are exact zeros, and ``encode_prompts`` pads them to ``text_len`` (Wan's contract, §2.4).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..ops import attention_chunk_size, fused_attention_available, gelu_tanh
from ..safetensors_io import safetensors_layout  # noqa: F401  (also used by the converter's row reader)

WEIGHTS_NAME = "text_encoder.safetensors"
TOKENIZER_NAME = "spiece.model"

# Parameters that stay fp32 whatever the weight dtype (tiny and precision-critical).
FP32_PARAMETERS = ("norm", "pos_embedding")
# Modules that are never quantized unless asked for (the embedding only with quantize_embedding).
LINEAR_NAMES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.fc1", "ffn.fc2")
_F16_MAX = 65504.0
# Attention-score working set per call on the CPU (64 heads x 512 x 512 fp32 scores are 67 MB each).
ENCODER_ATTENTION_BUDGET = 64 * 1024**2


@dataclass
class UMT5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    pad_id: int = 0
    eos_id: int = 1
    # None, or {"bits", "group_size", "mode", "keep": [name fragments left unquantized], "embedding": bool}
    quantization: dict | None = None
    model_type: str = "umt5-encoder"
    # Ranges checked when a config is read (utils.config_values); not a dataclass field.
    LIMITS = {"vocab_size": (1, 1 << 22), "dim": (1, 65536), "dim_attn": (1, 65536), "dim_ffn": (1, 1 << 20),
              "num_heads": (1, 1024), "num_layers": (1, 1024), "num_buckets": (2, 4096), "max_distance": (2, 1 << 20),
              "eps": (1e-30, 1.0), "text_len": (1, 8192), "pad_id": (0, 1 << 22), "eos_id": (0, 1 << 22)}

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not a multiple of num_heads {self.num_heads}")
        if max(self.pad_id, self.eos_id) >= self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} / eos_id {self.eos_id} must index the {self.vocab_size}-row "
                             f"embedding")
        q = self.quantization
        if q is not None:
            if (not isinstance(q, dict) or q.get("bits") not in (2, 3, 4, 5, 6, 8)
                    or q.get("group_size") not in (32, 64, 128)
                    or q.get("mode", "affine") != "affine" or not isinstance(q.get("keep", []), list)
                    or not all(isinstance(k, str) for k in q.get("keep", []))
                    or not isinstance(q.get("embedding", False), bool)):
                raise ValueError(f"quantization must be {{bits: 2-8, group_size: 32/64/128, mode: 'affine', keep: "
                                 f"[names], embedding: bool}}, got {q!r:.120}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


def umt5_xxl() -> UMT5Config:
    return UMT5Config()


# --------------------------------------------------------------------------------------------------
# Quantization predicate (shared with the converter and the memory estimate)
# --------------------------------------------------------------------------------------------------


def is_quantized(name: str, quantization: dict | None) -> bool:
    """Whether module ``name`` (e.g. ``blocks.3.attn.o``, ``token_embedding``) is stored quantized."""
    if not quantization:
        return False
    if name == "token_embedding":
        return bool(quantization.get("embedding", False))
    if not any(name.endswith(n) for n in LINEAR_NAMES):
        return False  # norms and relative-position tables stay in full precision
    return not any(frag and frag in name for frag in quantization.get("keep", ()))


# --------------------------------------------------------------------------------------------------
# Relative position buckets
# --------------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128,
                             bidirectional: bool = True) -> np.ndarray:
    """T5/UMT5 bucket of ``key_pos - query_pos`` ([HF]/[WAN] ``_relative_position_bucket``).

    The reference evaluates ``max_exact + trunc(log(r / max_exact) / log(max_distance / max_exact) *
    (nb - max_exact))`` in float32; it lands exactly on the boundaries (r = 16, 32, 64 give 10, 12, 14
    at the UMT5 settings). Here the same expression is evaluated in float64 and snapped by 1e-9, which
    gives the exact mathematical value; integer r never comes within 1e-6 of a boundary otherwise
    (tests compare against the reference over -600..600).
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = np.maximum(-rel, 0)
    max_exact = num_buckets // 2
    ratio = np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = max_exact + np.floor(np.maximum(ratio, 0) + 1e-9).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


@lru_cache(maxsize=8)
def _bucket_matrix(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> mx.array:
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    return mx.array(relative_position_bucket(rel, num_buckets, max_distance).astype(np.int32))


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """How to compute: matmul dtype, INT-N strategy, attention kernel and its memory bound."""

    dtype: mx.Dtype = mx.float32
    dequantize: bool = True  # CPU: dequantize each INT-N projection to `dtype` (fast BLAS) before its matmul
    fused: bool = False  # fused SDPA (GPUs)
    budget: int = ENCODER_ATTENTION_BUDGET
    eval_projections: bool = True  # evaluate each projection at once (bounds the CPU working set)


DEQUANT_CHUNK_BYTES = 32 * 1024**2  # fp32 weight rows dequantized (and multiplied) at a time on the CPU
GELU_CHUNK_BYTES = 4 * 1024**2  # fp32 FFN activations per GELU evaluation on the CPU


def _unpack_shifts(bits: int) -> mx.array:
    return mx.arange(0, 32, bits, dtype=mx.uint32)


def dequantize_fp32(weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                    mode: str = "affine") -> mx.array:
    """Exact fp32 ``scale * q + bias`` of an affine-quantized matrix.

    For 2/4/8 bits this unpacks with shifts and masks (elementwise ops the CPU backend vectorises; ~4x
    faster there than ``mx.dequantize``, which also rounds through the scales' dtype, e.g. bf16). Other
    widths use ``mx.dequantize`` with fp32 scales.
    """
    if mode != "affine" or 32 % bits:
        return mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits,
                             mode=mode, dtype=mx.float32)
    return _unpack_affine(weight, scales, biases, _unpack_shifts(bits), mx.array((1 << bits) - 1, mx.uint32))


@mx.compile
def _unpack_affine(weight, scales, biases, shifts, mask):
    # One fused kernel: no uint32/fp32 temporaries of the full chunk besides the result.
    rows, groups = scales.shape
    per_word = shifts.shape[0]
    q = ((weight.reshape(rows, groups, -1, 1) >> shifts) & mask).astype(mx.float32)
    q = q * scales.astype(mx.float32)[:, :, None, None] + biases.astype(mx.float32)[:, :, None, None]
    return q.reshape(rows, groups * (weight.shape[1] // groups) * per_word)


def linear(layer: nn.Module, x: mx.array, rt: Runtime) -> mx.array:
    """``x @ W.T`` for a Linear or QuantizedLinear, in ``rt.dtype`` (see the module docstring).

    CPU path (``rt.dequantize``): INT-N weights are dequantized to fp32 (and bf16/fp16 ones upcast) in
    row chunks of ``DEQUANT_CHUNK_BYTES``, each multiplied and freed before the next, so the transient
    full-precision copy stays small whatever the projection size.
    """
    if rt.dtype == mx.float16:
        x = mx.clip(x, -_F16_MAX, _F16_MAX)
    x = x.astype(rt.dtype)
    quantized = isinstance(layer, nn.QuantizedLinear)
    if quantized and not rt.dequantize:
        y = layer(x.astype(layer.scales.dtype)).astype(rt.dtype)
    elif quantized or (rt.dequantize and layer.weight.dtype != rt.dtype):
        out_dims = layer.weight.shape[0]
        in_dims = layer.scales.shape[1] * layer.group_size if quantized else layer.weight.shape[1]
        step = max(1, min(out_dims, DEQUANT_CHUNK_BYTES // (4 * in_dims)))
        parts = []
        for s in range(0, out_dims, step):
            if quantized:
                w = dequantize_fp32(layer.weight[s:s + step], layer.scales[s:s + step], layer.biases[s:s + step],
                                    layer.group_size, layer.bits, layer.mode)
            else:
                w = layer.weight[s:s + step].astype(mx.float32)
            part = x @ w.astype(rt.dtype).T
            if rt.eval_projections and step < out_dims:
                mx.eval(part)
            parts.append(part)
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    else:
        w = layer.weight
        y = x @ (w if w.dtype == rt.dtype else w.astype(rt.dtype)).T
    if rt.dtype == mx.float16:
        y = mx.clip(y, -_F16_MAX, _F16_MAX)
    if rt.eval_projections:
        mx.eval(y)  # the dequantized / upcast weight copies are freed here, one projection at a time
    return y


class RMSNorm(nn.Module):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * w, no mean subtraction, no bias, fp32 statistics."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)


class Attention(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.q = nn.Linear(config.dim, config.dim_attn, bias=False)
        self.k = nn.Linear(config.dim, config.dim_attn, bias=False)
        self.v = nn.Linear(config.dim, config.dim_attn, bias=False)
        self.o = nn.Linear(config.dim_attn, config.dim, bias=False)

    def __call__(self, x: mx.array, bias_fn, key_valid: mx.array | None, rt: Runtime) -> mx.array:
        b, l, _ = x.shape

        def heads(t):
            return t.reshape(b, l, self.heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(linear(self.q, x, rt)), heads(linear(self.k, x, rt)), heads(linear(self.v, x, rt))
        if rt.fused:
            mask = bias_fn(0, l).astype(q.dtype)[None]  # [1, H, L, L]
            if key_valid is not None:
                mask = mx.where(key_valid[:, None, None, :], mask, mx.array(mx.finfo(q.dtype).min, q.dtype))
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        else:
            out = _chunked_attention(q, k, v, bias_fn, key_valid, rt)
        return linear(self.o, out.transpose(0, 2, 1, 3).reshape(b, l, -1), rt)


def _chunked_attention(q, k, v, bias_fn, key_valid, rt: Runtime) -> mx.array:
    """softmax(q k^T + bias + key mask) v with fp32 scores, query-chunked to stay within ``rt.budget``."""
    b, h, lq, _ = q.shape
    kt = k.swapaxes(-1, -2)
    neg = None
    if key_valid is not None:
        neg = mx.where(key_valid, 0.0, mx.finfo(mx.float32).min)[:, None, None, :]  # [B, 1, 1, Lk]
    chunk = min(lq, attention_chunk_size(b, h, k.shape[2], rt.budget))
    outs = []
    for s in range(0, lq, chunk):
        scores = (q[:, :, s:s + chunk] @ kt).astype(mx.float32) + bias_fn(s, min(s + chunk, lq))[None]
        if neg is not None:
            scores = scores + neg
        o = mx.softmax(scores, axis=-1).astype(v.dtype) @ v
        if chunk < lq:
            mx.eval(o)
        outs.append(o)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


class FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x))); Wan ``gate.0`` == HF ``wi_0``, ``fc1`` == ``wi_1``."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.dim_ffn, bias=False)
        self.fc1 = nn.Linear(config.dim, config.dim_ffn, bias=False)
        self.fc2 = nn.Linear(config.dim_ffn, config.dim, bias=False)

    def __call__(self, x: mx.array, rt: Runtime) -> mx.array:
        gate, lin = linear(self.gate, x, rt), linear(self.fc1, x, rt)
        if not rt.eval_projections:
            return linear(self.fc2, gelu_tanh(gate.astype(mx.float32)) * lin.astype(mx.float32), rt)
        # CPU: the GELU's temporaries are several times its input, so it runs in token chunks.
        shape = gate.shape
        gate, lin = gate.reshape(-1, shape[-1]), lin.reshape(-1, shape[-1])
        step = max(1, GELU_CHUNK_BYTES // (4 * shape[-1]))
        parts = []
        for s in range(0, gate.shape[0], step):
            part = gelu_tanh(gate[s:s + step].astype(mx.float32)) * lin[s:s + step].astype(mx.float32)
            mx.eval(part)
            parts.append(part)
        del gate, lin
        h = (parts[0] if len(parts) == 1 else mx.concatenate(parts)).reshape(shape)
        return linear(self.fc2, h, rt)


class Block(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.num_buckets, self.max_distance = config.num_buckets, config.max_distance
        self.norm1 = RMSNorm(config.dim, config.eps)
        self.attn = Attention(config)
        self.pos_embedding = nn.Embedding(config.num_buckets, config.num_heads)
        self.norm2 = RMSNorm(config.dim, config.eps)
        self.ffn = FeedForward(config)

    def position_bias(self, q_len: int, k_len: int, start: int = 0, stop: int | None = None) -> mx.array:
        """This block's bias ``[H, stop - start, k_len]`` (fp32) for query rows ``start:stop``."""
        buckets = _bucket_matrix(q_len, k_len, self.num_buckets, self.max_distance)[start:stop]
        return mx.take(self.pos_embedding.weight.astype(mx.float32).T, buckets, axis=1)  # contiguous [H, q, k]

    def __call__(self, x: mx.array, key_valid: mx.array | None, rt: Runtime) -> mx.array:
        l = x.shape[1]

        def bias_fn(s, e):
            return self.position_bias(l, l, s, e)

        x = x + self.attn(self.norm1(x), bias_fn, key_valid, rt).astype(mx.float32)
        return x + self.ffn(self.norm2(x), rt).astype(mx.float32)


# --------------------------------------------------------------------------------------------------
# Rows read from the weight file (token embedding)
# --------------------------------------------------------------------------------------------------

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
              "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "I64": np.int64}


class TensorRows:
    """Rows of one tensor in a safetensors file, read with plain file reads (no mmap).

    Reads go through the OS page cache, never into this process's resident set: with mmap, fault-around
    and readahead map far more than the rows used (on a VM here, 512 random rows of a 262 MB table
    mapped nearly all of it).
    """

    def __init__(self, path: Path, name: str, layout: tuple[int, dict] | None = None):
        start, header = layout or safetensors_layout(path)
        info = header[name]
        if info["dtype"] not in _NP_DTYPES:
            raise ValueError(f"{path}: {name} has unsupported dtype {info['dtype']}")
        self.path, self.name, self.st_dtype = Path(path), name, info["dtype"]
        self.np_dtype = np.dtype(_NP_DTYPES[info["dtype"]])
        self.shape = tuple(info["shape"])
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.np_dtype.itemsize
        self.offset = start + info["data_offsets"][0]

    def _read(self, f, first: int, count: int) -> bytes:
        f.seek(self.offset + first * self.row_bytes)
        data = f.read(count * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise ValueError(f"{self.path}: truncated data for {self.name}")
        return data

    def _to_mx(self, data: bytes, count: int) -> mx.array:
        arr = mx.array(np.frombuffer(data, self.np_dtype).reshape(count, *self.shape[1:]))
        return arr.view(mx.bfloat16) if self.st_dtype == "BF16" else arr

    def slice(self, start: int, stop: int) -> mx.array:
        """Rows ``start:stop`` (one contiguous read)."""
        with open(self.path, "rb") as f:
            return self._to_mx(self._read(f, start, stop - start), stop - start)

    def take(self, rows: np.ndarray) -> mx.array:
        """The given rows (sorted, unique), one read per run of consecutive rows."""
        out = []
        with open(self.path, "rb") as f:
            i = 0
            while i < len(rows):
                j = i + 1
                while j < len(rows) and rows[j] == rows[j - 1] + 1:
                    j += 1
                out.append(self._read(f, int(rows[i]), j - i))
                i = j
        return self._to_mx(b"".join(out), len(rows))


class MappedEmbedding(nn.Module):
    """Token embedding whose rows are read on demand from the weight file.

    A prompt needs at most ``text_len`` of the 256384 rows, so nothing of the 2.1 GB table is resident.
    A quantized table (``weight``/``scales``/``biases``) is read the same way and the rows dequantized.
    """

    def __init__(self, path: Path, layout: tuple[int, dict], quantization: dict | None):
        super().__init__()
        self._parts = {}
        for part in ("weight", "scales", "biases"):
            name = f"token_embedding.{part}"
            if name in layout[1]:
                self._parts[part] = TensorRows(path, name, layout)
        self._q = quantization if "scales" in self._parts else None
        self.num_embeddings = self._parts["weight"].shape[0]

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.asarray(ids).reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise ValueError(f"token id out of range [0, {self.num_embeddings}): {int(flat.max())}")
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = {k: t.take(uniq) for k, t in self._parts.items()}
        if self._q:
            table = dequantize_fp32(rows["weight"], rows["scales"], rows["biases"], self._q["group_size"],
                                    self._q["bits"], self._q.get("mode", "affine"))
        else:
            table = rows["weight"].astype(mx.float32)
        return table[mx.array(inverse.reshape(-1).astype(np.int32))].reshape(*ids.shape, -1)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


class UMT5Encoder(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = [Block(config) for _ in range(config.num_layers)]
        self.norm = RMSNorm(config.dim, config.eps)
        self.runtime = default_runtime()
        self.fingerprint: str | None = None  # identity of the weights (set by load; keys the prompt cache)
        self._stream: _BlockStream | None = None

    def layer(self, i: int) -> Block:
        """Block ``i``: resident, or read from disk now when streaming."""
        return self.blocks[i] if self._stream is None else self._stream.block(i)

    def __call__(self, ids: mx.array, lengths: Sequence[int] | None = None) -> mx.array:
        """Encode ``ids [B, L]``; with ``lengths``, keys past each length are masked and rows past it zeroed.

        Returns fp32 ``[B, L, dim]``.
        """
        ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
        b, l = ids.shape
        valid = None
        if lengths is not None and any(int(n) < l for n in lengths):
            valid = mx.arange(l)[None, :] < mx.array([int(n) for n in lengths])[:, None]
        x = self.token_embedding(ids).astype(mx.float32)
        for i in range(self.config.num_layers):
            block = self.layer(i)
            x = block(x, valid, self.runtime)
            mx.eval(x)
            del block  # a streamed block is freed before the next one is read
        x = self.norm(x)
        if valid is not None:
            x = mx.where(valid[..., None], x, 0.0)
        return x

    def encode_tokens(self, token_lists: Sequence[Sequence[int]], text_len: int | None = None) -> mx.array:
        """Wan's contract: ``[B, text_len, dim]`` fp32, encoder outputs for real tokens, exact zeros after.

        The batch runs at its longest real length (pad keys masked), not at ``text_len``.
        """
        text_len = text_len or self.config.text_len
        lengths = [len(t) for t in token_lists]
        if not token_lists or min(lengths) < 1:
            raise ValueError("every prompt needs at least one token (the tokenizer appends EOS)")
        if max(lengths) > text_len:
            raise ValueError(f"a prompt has {max(lengths)} tokens, more than text_len {text_len}")
        longest = max(lengths)
        ids = np.full((len(token_lists), longest), self.config.pad_id, dtype=np.int32)
        for i, t in enumerate(token_lists):
            ids[i, :len(t)] = t
        out = self(mx.array(ids), lengths)
        if longest < text_len:
            out = mx.pad(out, [(0, 0), (0, text_len - longest), (0, 0)])
        return out


def default_runtime(dtype: mx.Dtype | None = None) -> Runtime:
    from ..utils import default_compute_dtype

    fused = fused_attention_available()
    return Runtime(dtype=dtype or default_compute_dtype(), dequantize=not fused, fused=fused,
                   eval_projections=not fused)


def _quantize_structure(module: nn.Module, names: set[str], quantization: dict, prefix: str = "") -> None:
    """Turn the submodules named in ``names`` (relative to ``prefix``) into quantized modules."""
    if not names:
        return

    def predicate(path, m):
        return (prefix + path) in names and hasattr(m, "to_quantized")

    nn.quantize(module, quantization["group_size"], quantization["bits"], mode=quantization.get("mode", "affine"),
                class_predicate=predicate)


class _BlockStream:
    """Reads block ``i`` from the weight file when it is needed; nothing stays resident between blocks."""

    def __init__(self, path: Path, config: UMT5Config, quantized: set[str], runtime_dtype: mx.Dtype,
                 cast_linears: bool):
        self.path, self.config, self.quantized = path, config, quantized
        self.dtype, self.cast_linears = runtime_dtype, cast_linears

    def block(self, i: int) -> Block:
        prefix = f"blocks.{i}."
        arrays = mx.load(str(self.path))  # lazy: only this block's tensors are read
        weights = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        del arrays
        block = Block(self.config)
        _quantize_structure(block, {n[len(prefix):] for n in self.quantized if n.startswith(prefix)},
                            self.config.quantization or {})
        block.load_weights(list(_cast_for_runtime(weights, self.dtype, self.cast_linears).items()), strict=True)
        mx.eval(block.parameters())
        return block


def _cast_for_runtime(weights: dict, dtype: mx.Dtype, cast_linears: bool) -> dict:
    out = {}
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating):
            if any(s in k for s in FP32_PARAMETERS):
                v = v.astype(mx.float32)
            elif cast_linears and not k.endswith(("scales", "biases")):
                v = v.astype(dtype)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load(folder, dtype: mx.Dtype | None = None, stream: bool = False, lazy_embedding: bool = True) -> UMT5Encoder:
    """Load the text encoder of a model folder.

    ``dtype``: compute dtype (default fp32 on the CPU, bf16 on GPUs). Full-precision projections keep
    their stored dtype on the CPU (upcast per matmul) and are cast once on GPUs; INT-N ones stay INT-N.
    ``stream``: read each block from disk when it runs (peak ~ one block) instead of keeping all resident.
    ``lazy_embedding``: read the rows a prompt uses from the file (default) instead of loading the table.
    """
    from ..utils import ModelFolderError, config_from_dict, config_section, model_file

    folder = Path(folder)
    section = config_section(folder, "text_encoder")
    if not section.get("weights_file"):
        raise ModelFolderError(f"{folder} holds only a tokenizer for the text encoder, no weights; add them with "
                               f"`mlx-video convert --text-encoder ... --tokenizer ... --mlx-path {folder}`")
    path = model_file(folder, section, "weights_file", WEIGHTS_NAME)
    config = config_from_dict(UMT5Config, section)
    model = UMT5Encoder(config)
    model.runtime = default_runtime(dtype)
    rt = model.runtime
    try:
        layout = safetensors_layout(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelFolderError(f"{path}: not a readable safetensors file ({exc})") from None
    header = layout[1]
    quantized = {k[: -len(".scales")] for k in header if k.endswith(".scales")}
    if quantized and not config.quantization:
        raise ModelFolderError(f"{path} holds quantized tensors but config.json has no quantization settings")
    _quantize_structure(model, quantized, config.quantization or {})
    _check_header(model, header, f"{path}")
    cast_linears = not rt.dequantize  # GPUs: cast full-precision projections to the compute dtype once
    if lazy_embedding:
        model.token_embedding = MappedEmbedding(path, layout, config.quantization)
    if stream:
        model._stream = _BlockStream(path, config, {q for q in quantized if q.startswith("blocks.")}, rt.dtype,
                                     cast_linears)
        model.blocks = []
    arrays = mx.load(str(path))  # lazy
    keep = {k: v for k, v in arrays.items()
            if not (stream and k.startswith("blocks.")) and not (lazy_embedding and k.startswith("token_embedding."))}
    del arrays
    keep = _cast_for_runtime(keep, rt.dtype, cast_linears)
    model.load_weights(list(keep.items()), strict=True)
    del keep
    for block in model.blocks:  # read block by block so the load itself never holds more than the result
        mx.eval(block.parameters())
    mx.eval(model.parameters())
    model.fingerprint = section.get("fingerprint") or _stat_fingerprint(path, section)
    return model


def _check_header(model: UMT5Encoder, header: dict, what: str) -> None:
    from mlx.utils import tree_flatten

    from ..utils import ModelFolderError

    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    found = {k: tuple(v["shape"]) for k, v in header.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {found[k]} vs model {expected[k]}" for k in set(expected) & set(found)
                   if found[k] != expected[k])
    if missing or unexpected or wrong:
        parts = [f"missing: {missing[:10]}" if missing else "", f"unexpected: {unexpected[:10]}" if unexpected else "",
                 f"wrong shapes: {wrong[:10]}" if wrong else ""]
        raise ModelFolderError(f"{what}: weights do not match the config ({'; '.join(p for p in parts if p)})")


def _stat_fingerprint(path: Path, section: dict) -> str:
    import hashlib

    st = path.stat()
    text = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, section], sort_keys=True, default=str)
    return "stat:" + hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Prompts -> embeddings (with the on-disk cache)
# --------------------------------------------------------------------------------------------------


def encode_prompts(encoder: UMT5Encoder, tokenizer, prompts: Sequence[str], cache_dir=None) -> mx.array:
    """Prompts -> fp32 ``[B, text_len, dim]``: encoder outputs for real tokens (EOS included), zeros after.

    With ``cache_dir``, prompts seen before (same weights, tokenizer, compute dtype and cleaned text)
    are read from disk and skip the encoder entirely; new ones are encoded together and stored.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    text_len = encoder.config.text_len
    tokens = [tokenizer.encode(p) for p in prompts]  # always tokenize: truncation warnings stay visible
    rows: list[mx.array | None] = [None] * len(prompts)
    cache = keys = None
    if cache_dir is not None:
        from ..text_cache import EmbeddingCache

        cache = EmbeddingCache(cache_dir, encoder_id(encoder, tokenizer))
        keys = [cache.key(tokenizer.clean(p)) for p in prompts]
        for i, key in enumerate(keys):
            rows[i] = cache.get(key, len(tokens[i]), encoder.config.dim)
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        out = encoder.encode_tokens([tokens[i] for i in todo], text_len)
        mx.eval(out)
        for j, i in enumerate(todo):
            rows[i] = out[j, :len(tokens[i])]
            if cache is not None:
                cache.put(keys[i], rows[i])
    return mx.stack([mx.pad(r, [(0, text_len - r.shape[0]), (0, 0)]) for r in rows])


def encoder_id(encoder: UMT5Encoder, tokenizer) -> str:
    """What an embedding depends on besides the prompt: weights, tokenizer, compute dtype, text length."""
    if encoder.fingerprint is None:
        raise ValueError("this encoder has no fingerprint (it was not loaded from a model folder); "
                         "set encoder.fingerprint to enable the prompt cache")
    return json.dumps({"model": encoder.fingerprint, "tokenizer": tokenizer.fingerprint,
                       "dtype": str(encoder.runtime.dtype), "text_len": encoder.config.text_len}, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Memory planning
# --------------------------------------------------------------------------------------------------

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _linear_shapes(config: UMT5Config) -> dict[str, tuple[int, int]]:
    d, a, f = config.dim, config.dim_attn, config.dim_ffn
    return {"attn.q": (a, d), "attn.k": (a, d), "attn.v": (a, d), "attn.o": (d, a),
            "ffn.gate": (f, d), "ffn.fc1": (f, d), "ffn.fc2": (d, f)}


def block_weight_bytes(config: UMT5Config, layer: int = 0, storage_dtype: str = "bfloat16") -> int:
    """Bytes of one block's weights as stored (INT-N projections with their scales/biases)."""
    item = _ITEMSIZE[storage_dtype]
    q = config.quantization or {}
    total = (2 * config.dim + config.num_buckets * config.num_heads) * 4  # norms, position table: fp32
    for name, (o, i) in _linear_shapes(config).items():
        if is_quantized(f"blocks.{layer}.{name}", config.quantization):
            total += o * i * q["bits"] // 8 + 2 * o * (i // q["group_size"]) * item
        else:
            total += o * i * item
    return total


def text_encoder_peak_bytes(config: UMT5Config | dict, tokens: int, batch: int = 1, *, stream: bool = False,
                            dequantize: bool = True, compute_dtype: str = "float32",
                            storage_dtype: str = "bfloat16", lazy_embedding: bool = True,
                            budget: int | None = None) -> int:
    """Predicted peak MLX memory of loading the encoder and encoding ``batch`` prompts of ``tokens`` tokens.

    Weights resident (one block when ``stream``; plus the embedding table unless ``lazy_embedding``), the
    residual stream, one dequantized weight chunk and its product (``dequantize``: the CPU path), and the
    larger of a block's attention and FFN working sets. ``config`` may be the ``text_encoder`` section
    of ``config.json``. Checked against measurement in ``tests/test_umt5.py`` and ``benchmarks/umt5_xxl.py``.
    """
    if isinstance(config, dict):
        from ..utils import config_from_dict

        storage_dtype = config.get("dtype", storage_dtype)
        config = config_from_dict(UMT5Config, config)
    c, ci = config, _ITEMSIZE[compute_dtype]
    blocks = [block_weight_bytes(c, i, storage_dtype) for i in range(c.num_layers)]
    weights = (max(blocks) if stream else sum(blocks)) + c.dim * 4
    if not lazy_embedding:
        q = c.quantization or {}
        if q.get("embedding"):
            weights += c.vocab_size * c.dim * q["bits"] // 8 + 2 * c.vocab_size * (c.dim // q["group_size"]) * 2
        else:
            weights += c.vocab_size * c.dim * _ITEMSIZE[storage_dtype]
    n = batch * tokens
    resident = 2 * n * c.dim * 4 + n * c.dim * ci  # residual stream, its normed copy
    largest = max(o * i for o, i in _linear_shapes(c).values()) * 4
    dequant = min(DEQUANT_CHUNK_BYTES, largest) + n * min(DEQUANT_CHUNK_BYTES // (4 * c.dim), c.dim_ffn) * ci \
        if dequantize else 0
    q_rows = min(tokens, attention_chunk_size(batch, c.num_heads, tokens, ENCODER_ATTENTION_BUDGET if budget is None
                                              else budget))
    attn = (4 * n * c.dim_attn * ci  # q, k, v, context
            + 3 * batch * c.num_heads * q_rows * tokens * 4 + c.num_heads * q_rows * tokens * 4)  # scores, bias
    ffn = n * c.dim_ffn * (2 * ci + 2 * 4) + 8 * min(GELU_CHUNK_BYTES, n * c.dim_ffn * 4)  # gate, fc1, h, GELU
    return int(weights + resident + dequant + max(attn, ffn))
