"""UMT5 text-encoder checkpoints -> MLX (``text_encoder.safetensors`` + ``spiece.model`` + the
``text_encoder`` section of ``config.json``), optionally INT-N quantized.

Layouts (``shared/reference/models.md`` §2.3):
- Wan ``models_t5_umt5-xxl-enc-bf16.pth`` (``T5Encoder`` state dict; read with ``torch.load(weights_only=True)``);
- Hugging Face ``UMT5EncoderModel`` / ``T5EncoderModel``-style keys (``shared.weight``, ``encoder.block.{i}...``),
  single or sharded safetensors, with or without a ``text_encoder.``/``model.`` prefix. Gated FFN:
  Wan ``gate.0`` (the GELU branch) == HF ``wi_0``, ``fc1`` (the linear branch) == HF ``wi_1``.
  A T5/mT5 checkpoint (``model_type`` in a ``config.json`` beside it) shares block 0's position table
  with every block; it is copied into each block.

Memory: tensors are converted, quantized and written one at a time by a streaming safetensors writer
(the header is computed up front from the shapes), and the token embedding in row chunks, so the peak
is about one projection in fp32 whatever the model size: the 5.7B-parameter xxl encoder is never
materialised. Quantization uses MLX's own ``mx.quantize`` (affine, per group) with a per-module
predicate (``mlx_video.models.umt5.is_quantized``): by default every projection of every block is
quantized; the token embedding, relative-position tables and norms stay in full precision.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_video.models.umt5 import (FP32_PARAMETERS, LINEAR_NAMES, TOKENIZER_NAME, WEIGHTS_NAME, UMT5Config,
                                   TensorRows, UMT5Encoder, _quantize_structure, is_quantized)
from mlx_video.inputs import read_json
from mlx_video.utils import CONFIG_NAME, config_from_dict, config_to_dict

from .common import (Checkpoint, ConversionError, Rule, apply_key_map, check_strict, conversion_errors, finite_floating,
                     open_checkpoint, parameter_shapes, side_config, side_config_path, strip_common_prefix)

VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)
_SHARED_POS = "<shared position table>"

WAN_RULES = [
    Rule(r"token_embedding\.weight", "token_embedding.weight"),
    Rule(r"blocks\.(\d+)\.norm([12])\.weight", r"blocks.\1.norm\2.weight"),
    Rule(r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    Rule(r"blocks\.(\d+)\.pos_embedding\.embedding\.weight", r"blocks.\1.pos_embedding.weight"),
    Rule(r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"blocks.\1.ffn.gate.weight"),
    Rule(r"blocks\.(\d+)\.ffn\.fc([12])\.weight", r"blocks.\1.ffn.fc\2.weight"),
    Rule(r"pos_embedding\.embedding\.weight", _SHARED_POS),  # shared_pos=True variant of T5Encoder
    Rule(r"norm\.weight", "norm.weight"),
]

_HF_BLOCK = r"encoder\.block\.(\d+)\.layer"
HF_RULES = [
    Rule(r"shared\.weight", "token_embedding.weight"),
    Rule(_HF_BLOCK + r"\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    Rule(_HF_BLOCK + r"\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    Rule(_HF_BLOCK + r"\.0\.SelfAttention\.relative_attention_bias\.weight", r"blocks.\1.pos_embedding.weight"),
    Rule(_HF_BLOCK + r"\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    Rule(_HF_BLOCK + r"\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.weight"),  # gelu branch
    Rule(_HF_BLOCK + r"\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),  # linear branch
    Rule(_HF_BLOCK + r"\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    Rule(r"encoder\.final_layer_norm\.weight", "norm.weight"),
]

LAYOUTS = {
    "wan": ("blocks.0.attn.q.weight", WAN_RULES),
    "huggingface": ("encoder.block.0.layer.0.SelfAttention.q.weight", HF_RULES),
}
PREFIXES = ["text_encoder.", "model.", "module.", "t5.", "umt5."]
# Keys of a full seq2seq checkpoint that an encoder never needs (and HF's tied alias of shared.weight).
IGNORED_PREFIXES = ("decoder.", "lm_head.")


def detect_layout(ckpt: Checkpoint) -> tuple[str, Checkpoint]:
    if not len(ckpt):
        raise ConversionError(f"{ckpt.source}: empty checkpoint")
    for name, (marker, _) in LAYOUTS.items():
        stripped = strip_common_prefix(ckpt, PREFIXES, marker)
        if marker in stripped:
            return name, stripped
    raise ConversionError(
        f"{ckpt.source}: unknown text-encoder checkpoint layout: found neither Wan T5Encoder keys "
        f"('blocks.0.attn.q.weight') nor Hugging Face UMT5/T5 encoder keys "
        f"('encoder.block.0.layer.0.SelfAttention.q.weight'). First keys: {', '.join(sorted(ckpt)[:8])}"
    )


def _side_config(source: Path) -> dict:
    """A Hugging Face T5/mT5/UMT5 config.json beside the checkpoint, if any (others are ignored)."""
    side = side_config(source)
    return side if side.get("model_type") in ("t5", "mt5", "umt5") else {}


def map_keys(ckpt: Checkpoint, layout: str, side: dict) -> tuple[Checkpoint, dict, list[str], list[str]]:
    """The checkpoint view the sources refer to, ``{target: (source, transform)}``, unmatched source keys,
    and notes for the summary."""
    notes = []
    keys = [k for k in ckpt if not k.startswith(IGNORED_PREFIXES)]
    if len(keys) < len(ckpt):
        notes.append(f"ignored {len(ckpt) - len(keys)} decoder/lm_head tensors")
    if layout == "huggingface" and "encoder.embed_tokens.weight" in ckpt:
        if "shared.weight" in ckpt:  # HF's tied alias of the same table
            keys.remove("encoder.embed_tokens.weight")
        else:
            ckpt = ckpt.renamed({("shared.weight" if k == "encoder.embed_tokens.weight" else k):
                                 k for k in ckpt})
            keys = ["shared.weight" if k == "encoder.embed_tokens.weight" else k for k in keys]
    ckpt_view = ckpt.renamed({k: k for k in keys})
    mapped, unmatched = apply_key_map(ckpt_view, LAYOUTS[layout][1])
    layers = sorted({int(t.split(".")[1]) for t in mapped if t.startswith("blocks.")})
    shared = mapped.pop(_SHARED_POS, None)
    if shared is None and layout == "huggingface" and side.get("model_type") in ("t5", "mt5"):
        shared = mapped.get("blocks.0.pos_embedding.weight")
    if shared is not None:
        own = [i for i in layers if f"blocks.{i}.pos_embedding.weight" in mapped and
               mapped[f"blocks.{i}.pos_embedding.weight"] is not shared]
        if own:
            raise ConversionError(f"{ckpt.source}: both a shared position table and per-block tables "
                                  f"(blocks {own[:5]}) are present")
        for i in layers:
            mapped[f"blocks.{i}.pos_embedding.weight"] = shared
        notes.append("shared position table copied into every block")
    return ckpt_view, mapped, unmatched, notes


def infer_config(shapes: dict[str, tuple], side: dict, source: str) -> UMT5Config:
    def need(key):
        if key not in shapes:
            raise ConversionError(f"{source}: missing tensor for {key} (cannot infer the encoder config)")
        return shapes[key]

    layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")})
    if not layers:
        raise ConversionError(f"{source}: no transformer blocks found")
    if layers != list(range(len(layers))):
        gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise ConversionError(f"{source}: transformer blocks are not numbered 0..N-1: blocks {gaps[:10]} are missing")
    if side.get("num_layers") is not None and side["num_layers"] != len(layers):
        raise ConversionError(f"{source}: config.json says num_layers={side['num_layers']} but the checkpoint has "
                              f"{len(layers)} blocks (missing layers?)")
    act = side.get("dense_act_fn") or side.get("feed_forward_proj")
    if act is not None and act not in ("gelu_new", "gelu_pytorch_tanh", "gated-gelu", "gated-gelu_new",
                                       "gated-gelu_pytorch_tanh"):
        raise ConversionError(f"{source}: FFN activation {act!r} is not supported (UMT5 uses gated GELU-tanh)")
    vocab, dim = need("token_embedding.weight")
    buckets, heads = need("blocks.0.pos_embedding.weight")
    dim_attn = need("blocks.0.attn.q.weight")[0]
    if heads < 1 or dim_attn % heads:
        raise ConversionError(f"{source}: q has {dim_attn} rows, not a multiple of the {heads} heads of the "
                              f"position table")
    values = dict(
        vocab_size=int(vocab), dim=int(dim), dim_attn=int(dim_attn), dim_ffn=int(need("blocks.0.ffn.gate.weight")[0]),
        num_heads=int(heads), num_layers=len(layers), num_buckets=int(buckets),
        max_distance=side.get("relative_attention_max_distance", 128), eps=side.get("layer_norm_epsilon", 1e-6),
    )
    where = f"{source}: encoder config inferred from its shapes" + (
        f" and {side_config_path(Path(source))}" if side else "")
    return config_from_dict(UMT5Config, values, where)


# --------------------------------------------------------------------------------------------------
# Quantization settings
# --------------------------------------------------------------------------------------------------


def module_names(config: UMT5Config) -> list[str]:
    """Modules in file order: embedding, each block (norm1, q, k, v, o, pos, norm2, gate, fc1, fc2), norm."""
    per_block = ["norm1", "attn.q", "attn.k", "attn.v", "attn.o", "pos_embedding", "norm2", "ffn.gate",
                 "ffn.fc1", "ffn.fc2"]
    return (["token_embedding"] + [f"blocks.{i}.{n}" for i in range(config.num_layers) for n in per_block]
            + ["norm"])


def quantization_settings(bits: int, group_size: int, keep: str | list[str] = "", embedding: bool = False,
                          config: UMT5Config | None = None) -> dict:
    """Validated quantization settings (``config.json``'s ``quantization``); errors name the fix."""
    if bits not in VALID_BITS:
        raise ConversionError(f"--q-bits {bits} is not supported; choose one of {list(VALID_BITS)}")
    if group_size not in VALID_GROUP_SIZES:
        raise ConversionError(f"--q-group-size {group_size} is not supported; choose one of {list(VALID_GROUP_SIZES)}")
    frags = [f.strip() for f in keep.split(",")] if isinstance(keep, str) else [str(f).strip() for f in keep]
    frags = [f for f in frags if f]
    q = {"bits": int(bits), "group_size": int(group_size), "mode": "affine", "keep": frags,
         "embedding": bool(embedding)}
    if config is not None:
        linears = [m for m in module_names(config) if m.endswith(LINEAR_NAMES)]
        unused = [f for f in frags if not any(f in m for m in linears)]
        if unused:
            raise ConversionError(f"--q-keep {','.join(unused)} matches no projection (names look like "
                                  f"'blocks.3.attn.o', 'ffn.fc2', 'attn.q')")
        in_dims = {"attn.q": config.dim, "attn.k": config.dim, "attn.v": config.dim, "attn.o": config.dim_attn,
                   "ffn.gate": config.dim, "ffn.fc1": config.dim, "ffn.fc2": config.dim_ffn,
                   "token_embedding": config.dim}
        bad = sorted({f"{n} (input width {w})" for n, w in in_dims.items()
                      if w % group_size and any(m.endswith(n) and is_quantized(m, q) for m in module_names(config))})
        if bad:
            raise ConversionError(f"--q-group-size {group_size} does not divide the input width of {', '.join(bad)}; "
                                  f"choose a group size that does, or keep them unquantized with --q-keep")
    return q


# --------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# --------------------------------------------------------------------------------------------------

_ST = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
_ST_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor (in ``specs`` order, each in one or more row chunks).

    The header is computed from ``specs`` first, so no tensor needs to be in memory before it is written,
    and the SHA-256 of the file is computed on the way.
    """

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple]], metadata: dict[str, str]):
        self.specs, self.path = specs, path
        header, offset = {}, 0
        self.sizes = []
        for name, dtype, shape in specs:
            n = int(np.prod(shape, dtype=np.int64)) * _ST_ITEM[dtype]
            header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
            self.sizes.append(n)
            offset += n
        header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((8 - len(blob) % 8) % 8)
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self._raw(struct.pack("<Q", len(blob)) + blob)
        self.index, self.done = 0, 0
        self.total = 8 + len(blob) + offset

    def _raw(self, data) -> None:
        self.file.write(data)
        self.sha.update(data)

    def write(self, name: str, array: mx.array) -> None:
        spec_name, dtype, shape = self.specs[self.index]
        if name != spec_name or _ST.get(array.dtype) != dtype or tuple(array.shape[1:]) != tuple(shape[1:]):
            raise RuntimeError(f"writer: got {name} {array.dtype} {array.shape}, expected {spec_name} {dtype} {shape}")
        mx.eval(array)
        data = np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        self._raw(buf)
        self.done += buf.nbytes
        if self.done > self.sizes[self.index]:
            raise RuntimeError(f"writer: too much data for {name}")
        if self.done == self.sizes[self.index]:
            self.index, self.done = self.index + 1, 0

    def close(self) -> str:
        self.file.close()
        if self.index != len(self.specs):
            raise RuntimeError(f"writer: {len(self.specs) - self.index} tensors were not written")
        return self.sha.hexdigest()

    def abort(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------------------------------
# Sources: where full-precision tensors come from (a checkpoint, or random weights for benchmarks)
# --------------------------------------------------------------------------------------------------


class CheckpointSource:
    """Target-named tensors of a mapped checkpoint; the embedding can be read in row chunks."""

    def __init__(self, ckpt: Checkpoint, mapped: dict):
        self.ckpt, self.mapped = ckpt, mapped

    def tensor(self, target: str) -> mx.array:
        src, transform = self.mapped[target]
        w = self.ckpt[src]
        finite_floating({src: w}, self.ckpt.source)
        return transform(w) if transform else w

    def rows(self, target: str, start: int, stop: int) -> mx.array:
        src, _ = self.mapped[target]
        if not hasattr(self, "_rows"):
            self._rows = {}
        if src not in self._rows:
            self._rows[src] = _row_reader(self.ckpt, src)
        out = self._rows[src](start, stop)
        finite_floating({f"{src}[{start}:{stop}]": out}, self.ckpt.source)
        return out


def _row_reader(ckpt: Checkpoint, key: str) -> Callable[[int, int], mx.array]:
    """Row slices of one tensor without loading it whole (the 256384-row embedding is 4 GB in fp32).

    Uses ``ckpt.rows`` when the checkpoint offers it; otherwise reaches the torch tensor (.pth, mmapped) or
    the safetensors file behind the lazy loader. TODO(common.py): a public ``Checkpoint.rows``.
    """
    rows = getattr(ckpt, "rows", None)
    if callable(rows):
        return lambda a, b: rows(key, a, b)
    loader = getattr(ckpt, "_loaders", {}).get(key)
    defaults = getattr(loader, "__defaults__", None) or ()
    try:
        import torch

        tensor = next((d for d in defaults if isinstance(d, torch.Tensor)), None)
    except ImportError:
        tensor = None
    if tensor is not None:
        return lambda a, b: _torch_rows(tensor, a, b)
    if len(defaults) == 2 and callable(defaults[1]):
        src_key, file_defaults = defaults[0], getattr(defaults[1], "__defaults__", None) or ()
        if file_defaults and isinstance(file_defaults[0], Path):
            try:
                table = TensorRows(file_defaults[0], src_key)
            except ValueError as exc:
                raise ConversionError(str(exc)) from None
            return table.slice
    cache = {}

    def whole(a, b):  # unknown loader: read once, slice
        if "t" not in cache:
            cache["t"] = ckpt[key]
        return cache["t"][a:b]

    return whole


def _torch_rows(t, a: int, b: int) -> mx.array:
    import torch

    part = t[a:b]
    if part.dtype == torch.bfloat16:
        return mx.array(part.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
    if part.dtype in (torch.float16, torch.float32):
        return mx.array(part.contiguous().numpy())
    if part.is_floating_point():
        return mx.array(part.float().numpy())
    raise ConversionError(f"token embedding has dtype {part.dtype}; only float checkpoints are supported")


# --------------------------------------------------------------------------------------------------
# Writing an encoder
# --------------------------------------------------------------------------------------------------

EMBEDDING_CHUNK_BYTES = 64 * 1024**2


def output_specs(config: UMT5Config, dtype: str) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of every output tensor, in file order."""
    q = config.quantization
    quantized = {m for m in module_names(config) if is_quantized(m, q)}
    skeleton = UMT5Encoder(config)  # lazy: shapes only, nothing is evaluated
    _quantize_structure(skeleton, quantized, q or {})
    shapes = parameter_shapes(skeleton)
    specs = []
    for module in module_names(config):
        parts = ("weight", "scales", "biases") if module in quantized else ("weight",)
        for part in parts:
            name = f"{module}.{part}"
            if part == "weight" and module in quantized:
                st = "U32"
            elif any(s in name for s in FP32_PARAMETERS) and part == "weight":
                st = "F32"
            else:
                st = _ST_NAMES[dtype]
            specs.append((name, st, shapes[name]))
    if {s[0] for s in specs} != set(shapes):
        raise RuntimeError("internal: output specs do not cover the model parameters")
    return specs


def write_text_encoder(source, config: UMT5Config, out_dir: Path, dtype: str = "bfloat16",
                       metadata: dict | None = None, progress: bool = False) -> dict:
    """Write ``out_dir/text_encoder.safetensors`` tensor by tensor from ``source`` (``tensor(name)`` and
    ``rows(name, start, stop)``); returns file facts (bytes, sha256, quantized module count)."""
    q = config.quantization
    specs = output_specs(config, dtype)
    storage = _MX[dtype]
    path = Path(out_dir) / WEIGHTS_NAME
    writer = StreamingSafetensorsWriter(path, specs, {"format": "mlx", **(metadata or {})})
    n_quantized = 0
    try:
        for module in module_names(config):
            quant = is_quantized(module, q)
            n_quantized += quant
            if module == "token_embedding":
                _write_embedding(writer, source, config, storage, q if quant else None)
                continue
            w = source.tensor(f"{module}.weight")
            if quant:
                wq, scales, biases = mx.quantize(w.astype(storage), q["group_size"], q["bits"], mode=q["mode"])
                for part, arr in (("weight", wq), ("scales", scales), ("biases", biases)):
                    writer.write(f"{module}.{part}", arr)
            else:
                fp32 = any(s in module for s in FP32_PARAMETERS)
                writer.write(f"{module}.weight", w.astype(mx.float32 if fp32 else storage))
            del w
            if progress and module.endswith("ffn.fc2"):
                layer = int(module.split(".")[1])
                print(f"text encoder: block {layer + 1}/{config.num_layers} written", file=sys.stderr)
        sha = writer.close()
    except BaseException:
        writer.abort()
        path.unlink(missing_ok=True)
        raise
    return {"file_bytes": writer.total, "fingerprint": "sha256:" + sha, "quantized_modules": n_quantized}


def _write_embedding(writer, source, config: UMT5Config, storage: mx.Dtype, q: dict | None) -> None:
    rows = max(1, EMBEDDING_CHUNK_BYTES // (config.dim * 4))
    scales, biases = [], []
    for start in range(0, config.vocab_size, rows):
        chunk = source.rows("token_embedding.weight", start, min(start + rows, config.vocab_size)).astype(storage)
        if q:
            wq, s, b = mx.quantize(chunk, q["group_size"], q["bits"], mode=q["mode"])
            mx.eval(wq, s, b)
            writer.write("token_embedding.weight", wq)
            scales.append(s)
            biases.append(b)
        else:
            writer.write("token_embedding.weight", chunk)
    if q:
        writer.write("token_embedding.scales", mx.concatenate(scales))
        writer.write("token_embedding.biases", mx.concatenate(biases))


# --------------------------------------------------------------------------------------------------
# Entry point (called by `mlx-video convert`)
# --------------------------------------------------------------------------------------------------


def _tokenizer(path):
    from mlx_video.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer(path)
    except TokenizerError as exc:
        raise ConversionError(f"--tokenizer: {exc}") from None


def check_vocab(config: UMT5Config, tokenizer_vocab: int, what: str) -> None:
    """The tokenizer must index inside the embedding, and the embedding must not be far larger (wrong pair)."""
    if tokenizer_vocab > config.vocab_size:
        raise ConversionError(f"{what}: mismatched vocab size: the tokenizer has {tokenizer_vocab} pieces but the "
                              f"encoder's embedding has only {config.vocab_size} rows: this tokenizer does not "
                              f"belong to this encoder (UMT5-xxl: 256300 pieces, 256384 rows)")
    if config.vocab_size - tokenizer_vocab > 256:
        raise ConversionError(f"{what}: mismatched vocab size: the encoder's embedding has {config.vocab_size} rows "
                              f"but the tokenizer only {tokenizer_vocab} pieces: this tokenizer does not belong to "
                              f"this encoder (UMT5-xxl: 256300 pieces, 256384 rows)")


def convert_text_encoder(source, tokenizer, out_dir: Path, args) -> dict:
    """Convert ``source`` (and/or copy ``tokenizer``) into ``out_dir``; returns the ``text_encoder`` section.

    ``args``: ``quantize``, ``q_bits``, ``q_group_size``, ``q_keep``, ``dtype`` (storage dtype of the
    full-precision tensors, default bfloat16), optional ``q_embedding`` and ``mlx_path``.
    """
    out_dir = Path(out_dir)
    tok = _tokenizer(tokenizer) if tokenizer else None
    if source is None:
        if tok is None:
            raise ConversionError("nothing to convert for the text encoder: give --text-encoder and/or --tokenizer")
        return _tokenizer_only(tok, out_dir, args)
    if tok is None:
        raise ConversionError("--text-encoder needs --tokenizer (the spiece.model the encoder was trained with)")
    dtype = getattr(args, "dtype", None) or "bfloat16"
    if dtype not in _MX:
        raise ConversionError(f"--dtype {dtype!r} is not supported for the text encoder")
    source = Path(source)
    ckpt = open_checkpoint(source)
    if not len(ckpt):
        raise ConversionError(f"{source}: empty checkpoint")
    layout, ckpt = detect_layout(ckpt)
    side = _side_config(source)
    ckpt, mapped, unmatched, notes = map_keys(ckpt, layout, side)
    shapes = {t: ckpt.shape(s) for t, (s, _) in mapped.items()}
    config = infer_config(shapes, side, str(source))
    check_strict(shapes, parameter_shapes(UMT5Encoder(config)), unmatched, f"{source} ({layout} layout)")
    check_vocab(config, tok.vocab_size, str(source))
    if getattr(args, "quantize", False):
        config.quantization = quantization_settings(args.q_bits, args.q_group_size, getattr(args, "q_keep", "") or "",
                                                    bool(getattr(args, "q_embedding", False)), config)
    facts = write_text_encoder(CheckpointSource(ckpt, mapped), config, out_dir, dtype,
                               {"source_layout": layout}, progress=config.num_layers >= 8)
    (out_dir / TOKENIZER_NAME).write_bytes(tok.model_bytes)
    params = sum(int(np.prod(s)) for s in parameter_shapes(UMT5Encoder(config)).values())
    section = config_to_dict(config)
    section.update(weights_file=WEIGHTS_NAME, dtype=dtype, source_layout=layout, parameters=params,
                   **_tokenizer_fields(tok), **facts)
    q = config.quantization
    qtext = (f"INT{q['bits']} g{q['group_size']} ({facts['quantized_modules']} modules quantized"
             f"{', kept: ' + ','.join(q['keep']) if q['keep'] else ''})" if q else dtype)
    size = f"{params / 1e9:.3f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    section["summary"] = (f"UMT5 {config.num_layers} layers, dim {config.dim}, {size} parameters "
                          f"({layout} layout), {qtext}, {facts['file_bytes'] / 1e9:.2f} GB"
                          + (f"; {'; '.join(notes)}" if notes else ""))
    return section


def _tokenizer_fields(tok) -> dict:
    return {"tokenizer_file": TOKENIZER_NAME, "tokenizer_sha256": tok.fingerprint,
            "tokenizer_vocab_size": tok.vocab_size}


def _tokenizer_only(tok, out_dir: Path, args) -> dict:
    """Add or replace the tokenizer; an existing encoder section is kept (and checked against it)."""
    previous = {}
    mlx_path = getattr(args, "mlx_path", None)
    if mlx_path and (Path(mlx_path) / CONFIG_NAME).exists():
        with conversion_errors():  # only this section matters (and is validated by config_from_dict below)
            previous = read_json(Path(mlx_path) / CONFIG_NAME, "model config").get("text_encoder") or {}
        if not isinstance(previous, dict):
            raise ConversionError(f"{Path(mlx_path) / CONFIG_NAME}: section 'text_encoder' must be a JSON object")
    if previous.get("weights_file"):
        check_vocab(config_from_dict(UMT5Config, previous, f"{Path(mlx_path) / CONFIG_NAME}: text_encoder"),
                    tok.vocab_size, str(mlx_path))
    (out_dir / TOKENIZER_NAME).write_bytes(tok.model_bytes)
    section = dict(previous)
    section.update(_tokenizer_fields(tok))
    section["summary"] = f"tokenizer {TOKENIZER_NAME} ({tok.vocab_size} pieces)" + (
        ", encoder kept" if previous.get("weights_file") else ", no encoder weights yet")
    return section
