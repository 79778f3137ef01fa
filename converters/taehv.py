"""TAEHV checkpoints (``taew2_1.pth`` / ``taew2_1.safetensors``) -> MLX (``decoder.safetensors`` + the
``decoder`` section of ``config.json``).

Keys are kept as they are (positional ``encoder.{i}`` / ``decoder.{i}``, ``shared/reference/models.md``
§4.2-4.3); 4-D convolution weights go from ``[O, I, kh, kw]`` to channels-last ``[O, kh, kw, I]``.
Widths, depth, latent channels, patch size and the TGrow/TPool time strides are read from the shapes,
then every tensor is checked strictly against the model they imply. A checkpoint with no ``encoder.*``
tensors at all converts as decoder-only; a partial encoder is an error.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_video.models.taehv import WEIGHTS_NAME, TAEHV, TAEHVConfig
from mlx_video.utils import cast_floating, config_to_dict, dtype_name, parameter_count, save_weights

from .common import (Checkpoint, ConversionError, Rule, apply_key_map, check_strict, finite_floating, open_checkpoint,
                     parameter_shapes, strip_common_prefix)


def conv_to_channels_last(w: mx.array) -> mx.array:
    """PyTorch Conv2d weight ``[O, I, kh, kw]`` -> MLX ``[O, kh, kw, I]``."""
    return w.transpose(0, 2, 3, 1)


RULES = [
    Rule(r"((?:en|de)coder\.\d+(?:\.conv(?:\.\d+)?|\.skip)?)\.weight", r"\1.weight", conv_to_channels_last),
    Rule(r"((?:en|de)coder\.\d+(?:\.conv\.\d+)?)\.bias", r"\1.bias"),
]
PREFIXES = ("taehv.", "model.", "module.", "vae.")


def _mapped_shape(shape: tuple, transform) -> tuple:
    if transform is conv_to_channels_last and len(shape) == 4:
        return (shape[0], shape[2], shape[3], shape[1])
    return tuple(shape)


def infer_config(ckpt: Checkpoint) -> TAEHVConfig:
    """Read the architecture from tensor shapes (PyTorch layout)."""

    def shape(key: str) -> tuple:
        if key not in ckpt:
            hint = (f" (is this a TAEHV checkpoint? first keys: {', '.join(sorted(ckpt)[:6])})"
                    if "decoder.1.weight" not in ckpt else "")
            raise ConversionError(f"{ckpt.source}: missing tensor {key!r}, needed to read the TAEHV "
                                  f"architecture{hint}")
        s = tuple(ckpt.shape(key))
        if len(s) != 4 or min(s) < 1:
            raise ConversionError(f"{ckpt.source}: {key} has shape {s}; expected a 4-D conv weight (no empty axis)")
        return s

    first = shape("decoder.1.weight")  # conv latent -> n_f[0]
    latent_channels, n0 = first[1], first[0]
    # MemBlocks follow at 3, 4, ...; the first TGrow (a bare 1x1 `conv.weight`) sits at 3 + depth + 1.
    depth = 0
    while f"decoder.{3 + depth}.conv.0.weight" in ckpt:
        depth += 1
    if depth == 0:
        raise ConversionError(f"{ckpt.source}: no MemBlock at decoder.3 (expected decoder.3.conv.0.weight)")
    stage = depth + 3  # layers per stage: depth MemBlocks, Upsample, TGrow, conv
    n_f, t_up = [n0], []
    for k in range(3):
        base = 3 + k * stage
        tgrow = shape(f"decoder.{base + depth + 1}.conv.weight")
        if tgrow[0] % tgrow[1]:
            raise ConversionError(f"decoder.{base + depth + 1}.conv.weight {tgrow}: output channels are not a "
                                  f"multiple of the input channels (not a TGrow)")
        t_up.append(tgrow[0] // tgrow[1] == 2)
        n_f.append(shape(f"decoder.{base + depth + 2}.weight")[0])
    final = shape(f"decoder.{3 + 3 * stage + 1}.weight")
    io = final[0]
    patch = int(round((io / 3) ** 0.5))
    if patch * patch * 3 != io:
        raise ConversionError(f"decoder output conv has {io} channels; expected 3 * patch_size^2")
    has_encoder = any(k.startswith("encoder.") for k in ckpt)
    enc_width, t_down = 64, [True, True, False]
    if has_encoder:
        enc_width = shape("encoder.0.weight")[0]
        enc_stage = 2 + depth
        t_down = []
        for k in range(3):
            pool = shape(f"encoder.{2 + k * enc_stage}.conv.weight")
            t_down.append(pool[1] // max(pool[0], 1) == 2)
    try:
        return TAEHVConfig(latent_channels=latent_channels, patch_size=patch, decoder_channels=n_f,
                           encoder_channels=enc_width, depth=depth, decoder_time_upscale=t_up,
                           encoder_time_downscale=t_down, has_encoder=has_encoder)
    except ValueError as exc:
        raise ConversionError(f"{ckpt.source}: inconsistent TAEHV shapes ({exc})") from None


def convert_decoder(source, out_dir: Path, dtype: mx.Dtype = mx.float16) -> dict:
    """Convert ``source`` into ``out_dir/decoder.safetensors``; returns the ``decoder`` config section."""
    source = Path(source)
    ckpt = open_checkpoint(source)
    if len(ckpt) == 0:
        raise ConversionError(f"{source}: empty checkpoint")
    ckpt = strip_common_prefix(ckpt, list(PREFIXES), "decoder.1.weight")
    mapped, unmatched = apply_key_map(ckpt, RULES)
    config = infer_config(ckpt)
    model = TAEHV(config)
    mapped_shapes = {t: _mapped_shape(ckpt.shape(s), tr) for t, (s, tr) in mapped.items()}
    check_strict(mapped_shapes, parameter_shapes(model), unmatched, f"{source} (TAEHV)")
    weights = {}
    for target, (src, transform) in mapped.items():
        w = ckpt[src]
        weights[target] = transform(w) if transform else w
    weights = cast_floating(weights, dtype)
    finite_floating(weights, source, f" (after casting to {dtype_name(dtype)})")
    save_weights(out_dir / WEIGHTS_NAME, weights, {"source": source.name})
    n_dec = sum(v.size for k, v in weights.items() if k.startswith("decoder."))
    section = config_to_dict(config)
    section.update(weights_file=WEIGHTS_NAME, dtype=dtype_name(dtype), parameters=parameter_count(model),
                   summary=f"TAEHV {'encoder+decoder' if config.has_encoder else 'decoder only'}, "
                   f"{n_dec / 1e6:.2f}M decoder parameters, widths {config.decoder_channels}, depth {config.depth}, "
                   f"{config.latent_channels} latent channels, x{config.t_upscale} time / x{config.space_upscale} "
                   f"space, {dtype_name(dtype)}")
    return section

