"""``mlx-video convert``: build or update an MLX model folder from PyTorch checkpoints.

Each component is optional; several can be converted into one folder in one call or in several calls
(the folder is updated atomically: a failed conversion leaves it exactly as it was).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_video.utils import DTYPES, parse_dtype

from .common import ConversionError, atomic_model_folder, update_config


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert PyTorch checkpoints into an MLX model folder",
        description="Convert Wan DiT, UMT5 text encoder and TAEHV decoder checkpoints into one MLX model "
        "folder (config.json + safetensors). Loading is strict: missing, unexpected or mis-shaped tensors "
        "are an error, and nothing is unpickled beyond plain tensors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mlx-path", required=True, help="output model folder (created, or updated if it is one)")
    p.add_argument("--dit", help="DiT checkpoint: file (.safetensors/.pth/.pt) or folder (Wan, diffusers, "
                   "ComfyUI or Self-Forcing layout)")
    p.add_argument("--text-encoder", help="UMT5 encoder checkpoint (Wan .pth or Hugging Face safetensors)")
    p.add_argument("--tokenizer", help="sentencepiece model (spiece.model) or a folder holding it")
    p.add_argument("--decoder", help="TAEHV decoder checkpoint (taew2_1.pth or .safetensors)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype on disk (default: float16 for the decoder, bfloat16 for the text encoder, "
                   "float32 for the DiT)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the text encoder (affine, per group)")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight when quantizing")
    p.add_argument("--q-group-size", type=int, default=64, help="group size when quantizing")
    p.add_argument("--q-keep", default="", help="comma-separated name fragments of text-encoder Linear layers "
                   "to keep unquantized (e.g. 'attn.o,ffn.fc2')")
    p.add_argument("--q-embedding", action="store_true", help="with -q, also quantize the text encoder's token "
                   "embedding (by default it stays full precision; its rows are read from disk on demand)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="DiT attention head width (default: from a config.json beside the checkpoint, else 128)")
    p.add_argument("--qk-norm", choices=["kept", "masked"], default="kept",
                   help="pruned q/k RMSNorm semantics: 'kept' normalises over the kept heads (trained pruned); "
                   "'masked' reproduces a wider model whose pruned heads were zeroed")
    p.add_argument("--qk-norm-width", type=int, default=None,
                   help="with --qk-norm masked: the width of the unpruned q/k norm (default: the model width, right "
                   "for Wan2.1 where heads*head_dim == dim; give it when re-pruning an already pruned model)")
    p.add_argument("--sampler", choices=["fewstep", "unipc", "euler"], default=None,
                   help="record the model's default sampler in config.json (fewstep for distilled models, unipc for "
                   "Wan's 50-step solver); `generate` flags still override it")
    p.add_argument("--select", default=None,
                   help="entry of a .pth dict to read (e.g. 'generator' instead of the default 'generator_ema')")
    p.set_defaults(func=run)


def run(args) -> int:
    if not (args.dit or args.text_encoder or args.decoder or args.tokenizer or args.sampler):
        raise ConversionError("nothing to convert: give --dit, --text-encoder/--tokenizer and/or --decoder")
    if args.text_encoder and not args.tokenizer:
        raise ConversionError("--text-encoder needs --tokenizer (the spiece.model the encoder was trained with)")
    out = Path(args.mlx_path)
    previous = out if out.exists() else None
    replace = []
    if args.dit:
        replace.append("dit.safetensors")
    if args.text_encoder:
        replace.append("text_encoder.safetensors")
    if args.tokenizer:
        replace.append("spiece.model")
    if args.decoder:
        replace.append("decoder.safetensors")
    with atomic_model_folder(out, replace=tuple(replace)) as tmp:
        config_dir = previous
        if args.dit:
            from .wan_dit import convert_dit

            section = convert_dit(args.dit, tmp, parse_dtype(args.dtype or "float32"), args.head_dim,
                                  args.qk_norm, args.select, args.qk_norm_width)
            update_config(tmp, config_dir, "dit", section)
            config_dir = tmp
            n = section["parameters"]
            size = f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
            _say(f"DiT: {section['num_layers']} layers, {size} parameters ({section['source_layout']} layout)")
        if args.text_encoder or args.tokenizer:
            from .umt5 import convert_text_encoder

            section = convert_text_encoder(args.text_encoder, args.tokenizer, tmp, args)
            update_config(tmp, config_dir, "text_encoder", section)
            config_dir = tmp
            _say(f"text encoder: {section.get('summary', 'done')}")
        if args.decoder:
            from .taehv import convert_decoder

            section = convert_decoder(args.decoder, tmp, parse_dtype(args.dtype or "float16"))
            update_config(tmp, config_dir, "decoder", section)
            config_dir = tmp
            _say(f"decoder: {section.get('summary', 'done')}")
        if args.sampler:
            from mlx_video.sampling import DEFAULTS

            update_config(tmp, config_dir, "sampler", {"name": args.sampler, **DEFAULTS[args.sampler]})
            config_dir = tmp
        if config_dir is previous:  # nothing written (cannot happen after the checks above)
            raise ConversionError("nothing converted")
    _say(f"wrote {out}")
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)
