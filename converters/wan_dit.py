"""Wan2.1 DiT checkpoints -> MLX (``dit.safetensors`` + the ``dit`` section of ``config.json``).

Layouts (``shared/reference/models.md`` §1.7, §5.3):
- original Wan keys (``diffusion_pytorch_model*.safetensors``, sharded or single, or ``.pth``);
- diffusers ``WanTransformer3DModel`` keys (norm2/norm3 swapped);
- single-file prefixes ``model.diffusion_model.`` (ComfyUI) and ``model.`` (Self-Forcing ``generator[_ema]``).
The config (layers, heads and FFN width per layer, text_dim, channels, patch) is inferred from shapes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import mlx.core as mx

from mlx_video.models.wan_dit import (FP32_PARAMETERS, WAN_RULES, WEIGHTS_NAME, WanDiT, WanDiTConfig,
                                     conv3d_to_patch_linear)
from mlx_video.utils import (UsageError, cast_floating, config_from_dict, config_to_dict, dtype_name, parameter_count,
                             save_weights)

from .common import (Checkpoint, ConversionError, Rule, apply_key_map, check_strict, finite_floating, open_checkpoint,
                     parameter_shapes, side_config, side_config_path, strip_common_prefix)


_P = conv3d_to_patch_linear
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
PREFIXES = ["model.diffusion_model.", "diffusion_model.", "model.", "generator.", "module.", "net."]  # net.: rCM


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


ASSUMED_HEAD_DIM = 128  # Wan2.1/2.2's head width, used only when nothing says otherwise (and said loudly)


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"{where} must be a positive integer, got {value!r:.60}")
    return value


def choose_head_dim(head_dim: int | None, side: dict, side_path) -> tuple[int, str]:
    """The attention head width and where it came from: ``--head-dim``, the config.json beside the
    checkpoint (``attention_head_dim``, or ``dim / num_heads``), else Wan's 128, reported as an assumption."""
    if head_dim is not None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
            raise UsageError(f"--head-dim must be an even number >= 6 (3D RoPE splits it in three), got {head_dim}")
        return head_dim, "--head-dim"
    if "attention_head_dim" in side:
        return _positive_int(side["attention_head_dim"], f"{side_path}: field 'attention_head_dim'"), \
            f"{side_path} (attention_head_dim)"
    if "num_heads" in side and "dim" in side:
        dim = _positive_int(side["dim"], f"{side_path}: field 'dim'")
        heads = _positive_int(side["num_heads"], f"{side_path}: field 'num_heads'")
        if dim % heads:
            raise ConversionError(f"{side_path}: field 'dim' {dim} is not a multiple of field 'num_heads' {heads}")
        return dim // heads, f"{side_path} (dim / num_heads)"
    return ASSUMED_HEAD_DIM, "assumed"


def infer_config(mapped_shapes: dict[str, tuple], patch_shape: tuple, head_dim: int | None, side: dict,
                 qk_norm: str, qk_norm_width: int | None = None, source="checkpoint",
                 side_path="config.json") -> WanDiTConfig:
    """Config from tensor shapes; head_dim from the argument, the side config.json, or Wan's 128 (see
    :func:`choose_head_dim`; an assumed width must fit every shape, or the conversion is refused)."""
    if len(patch_shape) != 5 or any(int(s) < 1 for s in patch_shape):
        raise ConversionError(f"{source}: patch_embedding.weight has shape {patch_shape}; expected a Conv3d weight "
                              f"[O, C, kt, kh, kw] with every size >= 1")
    dim, in_channels, *patch = patch_shape
    layers = sorted({int(k.split(".")[1]) for k in mapped_shapes if k.startswith("blocks.")})
    if layers != list(range(len(layers))) or not layers:
        raise ConversionError(f"{source}: transformer blocks are not numbered 0..N-1 (found {layers[:5]}...)")
    if qk_norm_width is not None and (qk_norm_width < 1 or qk_norm != "masked"):
        raise UsageError(f"--qk-norm-width must be a positive width and goes with --qk-norm masked, got "
                         f"{qk_norm_width} with --qk-norm {qk_norm}")
    head_dim, origin = choose_head_dim(head_dim, side, side_path)
    assumed = origin == "assumed"
    fix = "" if origin == "--head-dim" else "; pass --head-dim N"
    if assumed and dim % head_dim:
        raise ConversionError(f"{source}: no --head-dim and no head width in a config.json beside the checkpoint, "
                              f"and the model width {dim} is not a multiple of Wan's head_dim {head_dim}: the "
                              f"assumption does not hold; pass --head-dim N")

    def need(key):
        if key not in mapped_shapes:
            raise ConversionError(f"{source}: missing tensor for {key} (cannot infer the config)")
        return mapped_shapes[key]

    def heads(layer, kind):
        rows = need(f"blocks.{layer}.{kind}.q.weight")[0]
        if rows % head_dim or rows == 0:
            raise ConversionError(f"{source}: blocks.{layer}.{kind}.q has {rows} rows, not a positive multiple of "
                                  f"head_dim {head_dim} ({origin}){fix}")
        norm = mapped_shapes.get(f"blocks.{layer}.{kind}.norm_q.weight")
        if qk_norm == "kept" and norm is not None and tuple(norm) != (rows,):
            raise ConversionError(f"{source}: blocks.{layer}.{kind}.norm_q has width {tuple(norm)} but q has {rows} "
                                  f"rows; the q/k norm must cover the kept heads (or use --qk-norm masked)")
        return rows // head_dim

    out_rows = need("head.linear.weight")[0]
    patch_elems = int(patch[0] * patch[1] * patch[2])
    if out_rows % patch_elems:
        raise ConversionError(f"{source}: head.linear has {out_rows} rows, not a multiple of the {patch_elems} "
                              f"elements of a {list(patch)} patch")
    values = dict(
        dim=int(dim), num_layers=len(layers), head_dim=head_dim,
        self_attn_heads=[heads(i, "self_attn") for i in layers],
        cross_attn_heads=[heads(i, "cross_attn") for i in layers],
        ffn_dim=[int(need(f"blocks.{i}.ffn.fc1.weight")[0]) for i in layers],
        freq_dim=int(need("time_embedding.linear_1.weight")[1]),
        text_dim=int(need("text_embedding.linear_1.weight")[1]),
        text_len=side.get("text_len", 512),
        in_channels=int(in_channels), out_channels=out_rows // patch_elems, patch_size=[int(p) for p in patch],
        eps=side.get("eps", 1e-6), qk_norm=qk_norm,
        qk_norm_width=(qk_norm_width or int(dim)) if qk_norm == "masked" else None,
    )
    where = f"{source}: DiT config inferred from its shapes" + (f" and {side_path}" if side else "")
    config = config_from_dict(WanDiTConfig, values, where)
    if assumed:
        print(f"warning: {source}: no --head-dim and no head width in a config.json beside the checkpoint: "
              f"ASSUMING head_dim {head_dim} (Wan2.1/2.2), i.e. {config.self_attn_heads[0]} heads in block 0. If "
              f"the model uses another head width, the conversion succeeds but computes the wrong attention: pass "
              f"--head-dim N.",
              file=sys.stderr)
    return config


def refuse_unsupported(ckpt: Checkpoint) -> None:
    """TurboWan (SLA ``proj_l`` / int8 ``int8_weight`` tensors, checkpoints.md §4.4): refused before any tensor is
    read, with the reason, rather than converted without its sparse-attention branch."""
    from .presets import REFUSED

    if any(".proj_l." in k or k.endswith(".int8_weight") for k in ckpt):
        raise ConversionError(f"{ckpt.source}: a TurboWan checkpoint: {REFUSED['turbowan']}")


def linear_patch_to_conv3d(ckpt: Checkpoint, side: dict) -> Checkpoint:
    """rCM's ``patch_embedding = nn.Linear(64, 1536)`` (weight [1536, 64] over ``(c kt kh kw)``, checkpoints.md
    §4.2) viewed as Wan's Conv3d weight [1536, 16, 1, 2, 2], so the rest of the conversion is Wan's."""
    key = "patch_embedding.weight"
    out, cols = ckpt.shape(key)
    patch = tuple(side.get("patch_size", (1, 2, 2)))
    per_channel = math.prod(patch)
    if cols % per_channel:
        raise ConversionError(f"{ckpt.source}: Linear patch embedding {key} [{out}, {cols}] does not split into "
                              f"{list(patch)} patches")
    shape = (out, cols // per_channel, *patch)
    names = {k: k for k in ckpt}
    view = ckpt.renamed(names)
    view._shapes[key] = shape
    view._loaders[key] = lambda: ckpt[key].reshape(shape)
    return view


def strip_fsdp_names(ckpt: Checkpoint) -> Checkpoint:
    """Delete every ``_fsdp_wrapped_module.`` (FSDP-named EMA weights of the causal families, checkpoints.md §0)."""
    marker = "_fsdp_wrapped_module."
    if not any(marker in k for k in ckpt):
        return ckpt
    mapping = {}
    for key in ckpt:
        new = key.replace(marker, "")
        if new in mapping:
            raise ConversionError(f"{ckpt.source}: {key!r} and {mapping[new]!r} both become {new!r} without FSDP wrappers")
        mapping[new] = key
    return ckpt.renamed(mapping)


def lora_specs(lora) -> list:
    """``convert --lora`` values (paths, ``FILE:SCALE`` strings or ``mlx_video.lora.LoraSpec``) as specs."""
    from mlx_video.lora import LoraSpec, parse_spec

    items = lora if isinstance(lora, (list, tuple)) else [lora] if lora else []
    return [x if isinstance(x, LoraSpec) else parse_spec(str(x)) for x in items]


def open_dit(source, select: str | None = None) -> tuple[str, Checkpoint]:
    """The DiT checkpoint's layout (``wan``, ``diffusers`` or ``rcm``) and its tensors under Wan names (lazy:
    only headers are read, so ``convert`` can check a preset against it before the long part)."""
    source = Path(source)
    ckpt = open_checkpoint(source, pattern="diffusion_pytorch_model*.safetensors", select=select)
    if not any(True for _ in ckpt):
        raise ConversionError(f"{source}: empty checkpoint")
    if source.is_dir() and not list(source.glob("diffusion_pytorch_model*.safetensors")):
        ckpt = open_checkpoint(source, select=select)
    ckpt = strip_fsdp_names(ckpt)
    refuse_unsupported(ckpt)
    layout, ckpt = detect_layout(ckpt)
    if len(ckpt.shape("patch_embedding.weight") if "patch_embedding.weight" in ckpt else ()) == 2:
        ckpt, layout = linear_patch_to_conv3d(ckpt, side_config(source)), "rcm"
    return layout, ckpt


def convert_dit(source, out_dir: Path, dtype: mx.Dtype = mx.float32, head_dim: int | None = None,
                qk_norm: str = "kept", select: str | None = None, qk_norm_width: int | None = None,
                lora=None) -> dict:
    """Convert ``source`` into ``out_dir/dit.safetensors``; returns the ``dit`` config section. ``lora``: LoRA
    files (``FILE[:SCALE]``, any format of ``mlx_video/lora.py``) merged into the weights (LongLive: PEFT)."""
    source = Path(source)
    specs = lora_specs(lora)
    layout, ckpt = open_dit(source, select)
    _, rules = LAYOUTS["wan" if layout == "rcm" else layout]
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
    side = side_config(source)
    head_dim_origin = choose_head_dim(head_dim, side, side_config_path(source))[1]
    config = infer_config(mapped_shapes, ckpt.shape(patch_src), head_dim, side, qk_norm, qk_norm_width,
                          source=str(source), side_path=side_config_path(source))
    model = WanDiT(config)
    check_strict(mapped_shapes, parameter_shapes(model), unmatched, f"{source} ({layout} layout)")
    weights = {}
    for target, (src, transform) in mapped.items():
        w = ckpt[src]
        weights[target] = transform(w) if transform else w
    if specs:
        from mlx_video.lora import merged_weights

        weights.update(merged_weights(weights, specs, out_dtype=mx.float32))
    weights = cast_floating(weights, dtype, keep_fp32=FP32_PARAMETERS)
    finite_floating(weights, source, f" (after casting to {dtype_name(dtype)})")
    save_weights(out_dir / WEIGHTS_NAME, weights, {"source_layout": layout})
    section = config_to_dict(config)
    section.update(weights_file=WEIGHTS_NAME, dtype=dtype_name(dtype), source_layout=layout,
                   parameters=parameter_count(model),
                   **({"lora_merged": ", ".join(x.path.name for x in specs),
                       "loras": [{"file": x.path.name, "scale": x.scale} for x in specs]} if specs else {}),
                   head_dim_source=head_dim_origin if head_dim_origin != "assumed" else
                   f"assumed {config.head_dim} (Wan default): no --head-dim, no head width in a config.json beside "
                   f"the checkpoint")
    return section
