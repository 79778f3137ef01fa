"""Wan2.1 DiT checkpoints -> MLX (``dit.safetensors`` + the ``dit`` section of ``config.json``).

Layouts (``shared/reference/models.md`` §1.7, §5.3):
- original Wan keys (``diffusion_pytorch_model*.safetensors``, sharded or single, or ``.pth``);
- diffusers ``WanTransformer3DModel`` keys (norm2/norm3 swapped);
- single-file prefixes ``model.diffusion_model.`` (ComfyUI) and ``model.`` (Self-Forcing ``generator[_ema]``).
The config (layers, heads and FFN width per layer, text_dim, channels, patch) is inferred from shapes.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_video.models.wan_dit import FP32_PARAMETERS, WEIGHTS_NAME, WanDiT, WanDiTConfig
from mlx_video.utils import cast_floating, config_to_dict, parameter_count

from .common import (Checkpoint, ConversionError, Rule, apply_key_map, check_strict, open_checkpoint,
                     parameter_shapes, save_safetensors, side_config, strip_common_prefix)


def conv3d_to_patch_linear(w: mx.array) -> mx.array:
    """Conv3d [O, C, kt, kh, kw] (kernel == stride) -> Linear [O, kt*kh*kw*C] over channels-last patches."""
    return w.transpose(0, 2, 3, 4, 1).reshape(w.shape[0], -1)


_P = conv3d_to_patch_linear

WAN_RULES = [
    Rule(r"patch_embedding\.weight", "patch_embedding.weight", _P),
    Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
    Rule(r"text_embedding\.0\.(weight|bias)", r"text_embedding.linear_1.\1"),
    Rule(r"text_embedding\.2\.(weight|bias)", r"text_embedding.linear_2.\1"),
    Rule(r"time_embedding\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    Rule(r"time_embedding\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
    Rule(r"time_projection\.1\.(weight|bias)", r"time_projection.\1"),
    Rule(r"blocks\.(\d+)\.modulation", r"blocks.\1.modulation"),
    Rule(r"blocks\.(\d+)\.(self_attn|cross_attn)\.([qkvo])\.(weight|bias)", r"blocks.\1.\2.\3.\4"),
    Rule(r"blocks\.(\d+)\.(self_attn|cross_attn)\.(norm_[qk])\.weight", r"blocks.\1.\2.\3.weight"),
    Rule(r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm3.\2"),
    Rule(r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"blocks.\1.ffn.fc1.\2"),
    Rule(r"blocks\.(\d+)\.ffn\.2\.(weight|bias)", r"blocks.\1.ffn.fc2.\2"),
    Rule(r"head\.modulation", "head.modulation"),
    Rule(r"head\.head\.(weight|bias)", r"head.linear.\1"),
]

_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
DIFFUSERS_RULES = [
    Rule(r"patch_embedding\.weight", "patch_embedding.weight", _P),
    Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
    Rule(r"condition_embedder\.text_embedder\.(linear_[12])\.(weight|bias)", r"text_embedding.\1.\2"),
    Rule(r"condition_embedder\.time_embedder\.(linear_[12])\.(weight|bias)", r"time_embedding.\1.\2"),
    Rule(r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.\1"),
    Rule(r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    *[Rule(rf"blocks\.(\d+)\.{src}\.to_([qkv])\.(weight|bias)", rf"blocks.\1.{dst}.\2.\3") for src, dst in _ATTN.items()],
    *[Rule(rf"blocks\.(\d+)\.{src}\.to_out\.0\.(weight|bias)", rf"blocks.\1.{dst}.o.\2") for src, dst in _ATTN.items()],
    *[Rule(rf"blocks\.(\d+)\.{src}\.(norm_[qk])\.weight", rf"blocks.\1.{dst}.\2.weight") for src, dst in _ATTN.items()],
    # diffusers' norm2 is Wan's affine cross-attention norm3 (the names are swapped; norm3 has no tensors).
    Rule(r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    Rule(r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.fc1.\2"),
    Rule(r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.fc2.\2"),
    Rule(r"scale_shift_table", "head.modulation"),
    Rule(r"proj_out\.(weight|bias)", r"head.linear.\1"),
]

LAYOUTS = {
    # layout name: (a key only that layout has, its rules)
    "wan": ("time_embedding.0.weight", WAN_RULES),
    "diffusers": ("condition_embedder.time_embedder.linear_1.weight", DIFFUSERS_RULES),
}
PREFIXES = ["model.diffusion_model.", "diffusion_model.", "model.", "generator.", "module."]


def detect_layout(ckpt: Checkpoint) -> tuple[str, Checkpoint]:
    for name, (marker, _) in LAYOUTS.items():
        stripped = strip_common_prefix(ckpt, PREFIXES, marker)
        if marker in stripped:
            return name, stripped
    sample = ", ".join(sorted(ckpt)[:8])
    raise ConversionError(
        f"{ckpt.source}: unknown DiT checkpoint layout: found neither original Wan keys "
        f"('time_embedding.0.weight') nor diffusers keys ('condition_embedder.time_embedder.linear_1.weight'), "
        f"with or without the prefixes {PREFIXES}. First keys: {sample}"
    )


def infer_config(mapped_shapes: dict[str, tuple], patch_shape: tuple, head_dim: int | None, side: dict,
                 qk_norm: str, qk_norm_width: int | None = None) -> WanDiTConfig:
    """Config from tensor shapes; head_dim from the argument, the side config.json, or Wan's 128."""
    if len(patch_shape) != 5:
        raise ConversionError(f"patch_embedding.weight has shape {patch_shape}; expected a Conv3d weight [O, C, kt, kh, kw]")
    dim, in_channels, *patch = patch_shape
    layers = sorted({int(k.split(".")[1]) for k in mapped_shapes if k.startswith("blocks.")})
    if layers != list(range(len(layers))) or not layers:
        raise ConversionError(f"transformer blocks are not numbered 0..N-1 (found {layers[:5]}...)")
    if head_dim is None:
        if "attention_head_dim" in side:
            head_dim = int(side["attention_head_dim"])
        elif "num_heads" in side and "dim" in side:
            head_dim = int(side["dim"]) // int(side["num_heads"])
        else:
            head_dim = 128

    def need(key):
        if key not in mapped_shapes:
            raise ConversionError(f"missing tensor for {key} (cannot infer the config)")
        return mapped_shapes[key]

    def heads(layer, kind):
        rows = need(f"blocks.{layer}.{kind}.q.weight")[0]
        if rows % head_dim:
            raise ConversionError(f"blocks.{layer}.{kind}.q has {rows} rows, not a multiple of head_dim "
                                  f"{head_dim}; pass --head-dim")
        return rows // head_dim

    out_rows = need("head.linear.weight")[0]
    patch_elems = int(patch[0] * patch[1] * patch[2])
    return WanDiTConfig(
        dim=int(dim), num_layers=len(layers), head_dim=head_dim,
        self_attn_heads=[heads(i, "self_attn") for i in layers],
        cross_attn_heads=[heads(i, "cross_attn") for i in layers],
        ffn_dim=[int(need(f"blocks.{i}.ffn.fc1.weight")[0]) for i in layers],
        freq_dim=int(need("time_embedding.linear_1.weight")[1]),
        text_dim=int(need("text_embedding.linear_1.weight")[1]),
        text_len=int(side.get("text_len", 512)),
        in_channels=int(in_channels), out_channels=out_rows // patch_elems, patch_size=[int(p) for p in patch],
        eps=float(side.get("eps", 1e-6)), qk_norm=qk_norm,
        qk_norm_width=int(qk_norm_width or dim) if qk_norm == "masked" else None,
    )


def convert_dit(source, out_dir: Path, dtype: mx.Dtype = mx.float32, head_dim: int | None = None,
                qk_norm: str = "kept", select: str | None = None, qk_norm_width: int | None = None) -> dict:
    """Convert ``source`` into ``out_dir/dit.safetensors``; returns the ``dit`` config section."""
    source = Path(source)
    ckpt = open_checkpoint(source, pattern="diffusion_pytorch_model*.safetensors", select=select)
    if not any(True for _ in ckpt):
        raise ConversionError(f"{source}: empty checkpoint")
    if source.is_dir() and not list(source.glob("diffusion_pytorch_model*.safetensors")):
        ckpt = open_checkpoint(source, select=select)
    layout, ckpt = detect_layout(ckpt)
    _, rules = LAYOUTS[layout]
    mapped, unmatched = apply_key_map(ckpt, rules)
    mapped_shapes = {}
    for target, (src, transform) in mapped.items():
        shape = ckpt.shape(src)
        if transform is conv3d_to_patch_linear and len(shape) == 5:
            shape = (shape[0], int(shape[1] * shape[2] * shape[3] * shape[4]))
        mapped_shapes[target] = shape
    patch_src = mapped.get("patch_embedding.weight", (None,))[0]
    if patch_src is None:
        check_strict(mapped_shapes, {"patch_embedding.weight": ()}, unmatched, f"{source}")
    config = infer_config(mapped_shapes, ckpt.shape(patch_src), head_dim, side_config(source), qk_norm, qk_norm_width)
    model = WanDiT(config)
    check_strict(mapped_shapes, parameter_shapes(model), unmatched, f"{source} ({layout} layout)")
    weights = {}
    for target, (src, transform) in mapped.items():
        w = ckpt[src]
        weights[target] = transform(w) if transform else w
    weights = cast_floating(weights, dtype, keep_fp32=FP32_PARAMETERS)
    save_safetensors(out_dir / WEIGHTS_NAME, weights, {"source_layout": layout})
    section = config_to_dict(config)
    section.update(weights_file=WEIGHTS_NAME, dtype={mx.float32: "float32", mx.float16: "float16",
                                                     mx.bfloat16: "bfloat16"}[dtype],
                   source_layout=layout, parameters=parameter_count(model))
    return section
