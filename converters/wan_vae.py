"""Wan2.1 VAE checkpoints -> MLX (``vae.safetensors`` + the ``vae`` section of ``config.json``).

Sources: the original ``Wan2.1_VAE.pth`` ([WAN] ``wan/modules/vae.py`` names: ``decoder.upsamples.{k}``,
``residual.{0,2,3,6}``, ``middle.{0,1,2}``, ``head.{0,2}``, top-level ``conv1``/``conv2``) or a diffusers
``AutoencoderKLWan`` ``vae/`` folder (``decoder.up_blocks.{i}.resnets.{j}``..., with its ``config.json``).
Original names are mapped to diffusers' (the MLX model's names); conv weights go from ``[O, I, *k]`` to
channels-last ``[O, *k, I]`` and RMS-norm gammas from ``[C, 1, 1(, 1)]`` to ``[C]``. Strict: every tensor
is checked against the model the config implies, and the folder is written atomically by ``convert``.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from mlx_video.models.wan_vae import WEIGHTS_NAME, WanVAE, WanVAEConfig
from mlx_video.utils import cast_floating, config_from_dict, config_to_dict, dtype_name, parameter_count, save_weights

from .common import (Checkpoint, ConversionError, Rule, apply_key_map, check_strict, open_checkpoint, parameter_shapes,
                     side_config, strip_common_prefix)

PREFIXES = ("vae.", "model.", "module.", "first_stage_model.")


def to_channels_last(w: mx.array) -> mx.array:
    """PyTorch conv weight ``[O, I, *k]`` -> ``[O, *k, I]``; a gamma ``[C, 1, ...]`` -> ``[C]``."""
    return w.transpose(0, *range(2, w.ndim), 1)


def flatten_gamma(w: mx.array) -> mx.array:
    return w.reshape(-1)


def _mapped_shape(shape: tuple, transform) -> tuple:
    if transform is to_channels_last:
        return (shape[0], *shape[2:], shape[1])
    if transform is flatten_gamma:
        n = 1
        for d in shape:
            n *= d
        return (n,)
    return tuple(shape)


# diffusers names (also the MLX names): weights of >= 4 dims are convs; gammas are flattened.
DIFFUSERS_RULES = [
    Rule(r"(.+\.gamma)", r"\1", flatten_gamma),
    Rule(r"(.+)\.weight", r"\1.weight", to_channels_last),
    Rule(r"(.+)\.bias", r"\1.bias"),
]


def original_to_diffusers(key: str, num_res_blocks: int) -> str | None:
    """One original Wan VAE key -> its diffusers name (None if it is not a Wan VAE key)."""
    res = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
           "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
           "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
    m = re.fullmatch(r"conv([12])\.(weight|bias)", key)
    if m:
        return f"{'quant_conv' if m[1] == '1' else 'post_quant_conv'}.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    side, rest = m[1], m[2]
    m = re.fullmatch(r"conv1\.(weight|bias)", rest)
    if m:
        return f"{side}.conv_in.{m[1]}"
    m = re.fullmatch(r"head\.(0\.gamma|2\.weight|2\.bias)", rest)
    if m:
        head = {"0.gamma": "norm_out.gamma", "2.weight": "conv_out.weight", "2.bias": "conv_out.bias"}
        return f"{side}.{head[m[1]]}"
    m = re.fullmatch(r"middle\.([02])\.(.+)", rest)
    if m and m[2] in res:
        return f"{side}.mid_block.resnets.{int(m[1]) // 2}.{res[m[2]]}"
    m = re.fullmatch(r"middle\.1\.(norm\.gamma|to_qkv\.weight|to_qkv\.bias|proj\.weight|proj\.bias)", rest)
    if m:
        return f"{side}.mid_block.attentions.0.{m[1]}"
    m = re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest)
    if side == "encoder" and m:
        tail = res.get(m[2], m[2] if re.fullmatch(r"(resample\.1|time_conv)\.(weight|bias)", m[2]) else None)
        return None if tail is None else f"encoder.down_blocks.{m[1]}.{tail}"
    m = re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest)
    if side == "decoder" and m:
        stage, j = divmod(int(m[1]), num_res_blocks + 2)  # each stage: num_res_blocks + 1 resnets, 1 resample
        if j <= num_res_blocks and m[2] in res:
            return f"decoder.up_blocks.{stage}.resnets.{j}.{res[m[2]]}"
        if j == num_res_blocks + 1 and re.fullmatch(r"(resample\.1|time_conv)\.(weight|bias)", m[2]):
            return f"decoder.up_blocks.{stage}.upsamplers.0.{m[2]}"
    return None


def detect_layout(ckpt: Checkpoint) -> str:
    if "decoder.conv_in.weight" in ckpt:
        return "diffusers"
    if "decoder.conv1.weight" in ckpt:
        return "wan"
    raise ConversionError(f"{ckpt.source}: not a Wan VAE checkpoint (no decoder.conv1.weight or decoder.conv_in.weight;"
                          f" first keys: {', '.join(sorted(ckpt)[:6])})")


def infer_config(ckpt: Checkpoint, layout: str, side: dict) -> WanVAEConfig:
    """The architecture: a diffusers ``config.json`` when there is one, else Wan2.1's with the widths and
    z_dim read from the shapes (the strict check catches anything else)."""
    conv_in = "decoder.conv_in.weight" if layout == "diffusers" else "decoder.conv1.weight"
    z_dim = ckpt.shape(conv_in)[1]
    fields = {}
    if side.get("_class_name") == "AutoencoderKLWan":
        if side.get("is_residual") or side.get("patch_size") or side.get("attn_scales"):
            raise ConversionError(f"{ckpt.source}: this AutoencoderKLWan config (is_residual / patch_size / "
                                  f"attn_scales: a Wan 2.2 VAE?) is not the Wan2.1 VAE")
        fields = {k: v for k, v in side.items() if not k.startswith("_")}
    else:
        out_key = "decoder.conv_out.weight" if layout == "diffusers" else "decoder.head.2.weight"
        enc_key = "encoder.conv_in.weight" if layout == "diffusers" else "encoder.conv1.weight"
        dec_base = ckpt.shape(out_key)[1] if out_key in ckpt else 96
        fields = dict(decoder_base_dim=dec_base, base_dim=ckpt.shape(enc_key)[0] if enc_key in ckpt else dec_base)
    fields["z_dim"] = z_dim
    fields["has_encoder"] = any(k.startswith("encoder.") for k in ckpt)
    if len(fields.get("latents_mean", [0] * 16)) != z_dim:
        raise ConversionError(f"{ckpt.source}: z_dim {z_dim} but the Wan2.1 latent statistics have 16 channels")
    try:
        return config_from_dict(WanVAEConfig, fields)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{ckpt.source}: inconsistent Wan VAE config ({exc})") from None


def convert_vae(source, out_dir: Path, dtype: mx.Dtype = mx.float32) -> dict:
    """Convert ``source`` (``Wan2.1_VAE.pth`` or a diffusers ``vae/`` folder) into ``out_dir/vae.safetensors``;
    returns the ``vae`` config section."""
    source = Path(source)
    ckpt = open_checkpoint(source)
    if len(ckpt) == 0:
        raise ConversionError(f"{source}: empty checkpoint")
    ckpt = strip_common_prefix(ckpt, list(PREFIXES), "decoder.conv1.weight")
    ckpt = strip_common_prefix(ckpt, list(PREFIXES), "decoder.conv_in.weight")
    layout = detect_layout(ckpt)
    config = infer_config(ckpt, layout, side_config(source) if source.is_dir() else {})
    unknown = []
    if layout == "wan":
        names = {}
        for key in ckpt:
            new = original_to_diffusers(key, config.num_res_blocks)
            if new is None:
                unknown.append(key)
            elif new in names:
                raise ConversionError(f"{source}: {names[new]!r} and {key!r} both map to {new!r}")
            else:
                names[new] = key
        ckpt = ckpt.renamed(names)
    mapped, unmatched = apply_key_map(ckpt, DIFFUSERS_RULES)
    # biases and 1-D tensors need no transform; a 1-D "weight" is not a conv and stays as it is
    mapped = {t: (s, tr if not (tr is to_channels_last and len(ckpt.shape(s)) < 4) else None)
              for t, (s, tr) in mapped.items()}
    model = WanVAE(config)
    mapped_shapes = {t: _mapped_shape(ckpt.shape(s), tr) for t, (s, tr) in mapped.items()}
    check_strict(mapped_shapes, parameter_shapes(model), unmatched + unknown, f"{source} (Wan VAE, {layout} layout)")
    weights = {}
    for target, (src, transform) in mapped.items():
        w = ckpt[src]
        if not mx.issubdtype(w.dtype, mx.floating):
            raise ConversionError(f"{source}: tensor {src!r} has dtype {w.dtype}; expected floating point")
        weights[target] = transform(w) if transform else w
    weights = cast_floating(weights, dtype, keep_fp32=("gamma",))
    bad = [k for k, v in weights.items() if not bool(mx.all(mx.isfinite(v)).item())]
    if bad:
        raise ConversionError(f"{source}: non-finite values in {bad[:5]} (after casting to {dtype_name(dtype)})")
    save_weights(out_dir / WEIGHTS_NAME, weights, {"source": source.name})
    n_dec = sum(v.size for k, v in weights.items() if k.startswith(("decoder.", "post_quant_conv.")))
    section = config_to_dict(config)
    section.update(weights_file=WEIGHTS_NAME, dtype=dtype_name(dtype), parameters=parameter_count(model),
                   source_layout=layout,
                   summary=f"Wan2.1 VAE ({'encoder+decoder' if config.has_encoder else 'decoder only'}), "
                   f"{n_dec / 1e6:.2f}M decoder parameters, base width {config.decoder_base_dim}, z_dim "
                   f"{config.z_dim}, {dtype_name(dtype)} ({layout} layout)")
    return section
