"""``mlx-video convert``: build or update an MLX model folder from PyTorch checkpoints.

Each component is optional; several can be converted into one folder in one call or in several calls
(the folder is updated atomically: a failed conversion leaves it exactly as it was).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_video.causal import PRESETS as CAUSAL_PRESETS, preset_section
from mlx_video.cli import HelpFormatter
from mlx_video.fsio import atomic_model_folder
from mlx_video.utils import DTYPES, UsageError, parse_dtype, readable_count

from .common import ConversionError, update_config
from .umt5 import VALID_BITS, VALID_GROUP_SIZES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert PyTorch checkpoints into an MLX model folder",
        description="Convert Wan DiT, UMT5 text encoder and TAEHV decoder checkpoints into one MLX model "
        "folder (config.json + safetensors). Loading is strict: missing, unexpected or mis-shaped tensors "
        "are an error, and nothing is unpickled beyond plain tensors.",
        epilog="examples:\n"
        "  hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan-pytorch\n"
        "  mlx-video convert --hf-path wan-pytorch --mlx-path wan-mlx -q\n"
        "  mlx-video convert --decoder taew2_1.pth --mlx-path wan-mlx   # add the TAEHV decoder\n"
        "exit status: 0 written, 1 a checkpoint could not be converted (the folder is unchanged), 2 bad flags",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--mlx-path", required=True, help="output model folder (created, or updated if it is one)")
    p.add_argument("--hf-path", default=None, metavar="DIR",
                   help="a downloaded Wan2.1 snapshot folder (Wan-AI/Wan2.1-T2V-1.3B or its -Diffusers layout, "
                   "recognised by content) or its Hugging Face id in the local cache: its DiT, UMT5 encoder, tokenizer "
                   "and Wan VAE are found inside (--dit/--text-encoder/--tokenizer/--vae override them)")
    p.add_argument("--dit", help="DiT checkpoint: file (.safetensors/.pth/.pt) or folder (Wan, diffusers, "
                   "ComfyUI or Self-Forcing layout)")
    p.add_argument("--text-encoder", help="UMT5 encoder checkpoint (Wan .pth or Hugging Face safetensors)")
    p.add_argument("--tokenizer", help="sentencepiece model (spiece.model) or a folder holding it")
    p.add_argument("--decoder", help="TAEHV decoder checkpoint (taew2_1.pth or .safetensors)")
    p.add_argument("--vae", help="Wan2.1 VAE: Wan2.1_VAE.pth or a diffusers AutoencoderKLWan vae/ folder (the quality "
                   "decoder: `generate --decoder wan-vae`; stored float32 unless --dtype)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype on disk (default: float16 for the decoder, bfloat16 for the text encoder, "
                   "float32 for the DiT and the Wan VAE)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the text encoder (affine, per group)")
    p.add_argument("--q-bits", type=int, default=4,
                   help=f"bits per weight when quantizing, one of {', '.join(map(str, VALID_BITS))}")
    p.add_argument("--q-group-size", type=int, default=64,
                   help=f"group size when quantizing, one of {', '.join(map(str, VALID_GROUP_SIZES))}")
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
    p.add_argument("--sampler", choices=["fewstep", "unipc", "euler", *CAUSAL_PRESETS], default=None,
                   help="record the model's default sampler in config.json (fewstep for distilled models, unipc for "
                   "Wan's 50-step solver); `generate` flags still override it. A causal preset (self-forcing, "
                   "causvid-ar, causal-forcing, ...) marks a block-causal checkpoint: `generate` then runs it block by "
                   "block with a KV cache, as it was trained (the weights alone cannot tell)")
    p.add_argument("--select", default=None,
                   help="entry of a .pth dict to read (e.g. 'generator' instead of the default 'generator_ema')")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="LoRA merged into the DiT weights, W + SCALE * alpha/r * B A (repeatable; diffusers/PEFT "
                   "lora_A/lora_B or kohya/ComfyUI lora_down/lora_up files, e.g. LongLive's lora.pt)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="checkpoint family: records its sampler (and default size) in config.json, as the weights "
                   "alone cannot tell: " + ", ".join(_preset_names()) + " (default with --hf-path: the snapshot's "
                   "own, e.g. wan2.1 or fastwan)")
    p.set_defaults(func=run)


def _preset_names() -> list[str]:
    from .presets import preset_names

    return preset_names()


class ConvertUsageError(ConversionError, UsageError):
    """A bad flag or combination of ``convert``: exit 2, before anything is read or written."""


def _from_hf_path(args) -> None:
    """Fill --dit/--text-encoder/--tokenizer/--vae (and the default --preset) from a downloaded Wan2.1 snapshot,
    found by content (``converters/snapshot.py``); explicit flags win."""
    from . import snapshot

    snap = snapshot.find(snapshot.resolve(args.hf_path))
    given = {name: getattr(args, name) for name in snapshot.COMPONENTS}
    required = [n for n in ("dit", "text_encoder", "tokenizer") if given[n] is None]
    if snapshot.missing_report(snap, required):
        repo = "Wan-AI/Wan2.1-T2V-1.3B" + ("-Diffusers" if snap.layout == "diffusers" else "")
        raise ConvertUsageError(f"--hf-path {snap.folder}: an incomplete {snap.layout} snapshot: no "
                                f"{snapshot.missing_report(snap, required)} found; finish the download (e.g. "
                                f"`{snapshot.download_command(repo)}`) or name the files with --dit, --text-encoder, "
                                f"--tokenizer")
    for name, path in snap.files.items():
        if given[name] is None and path is not None and not (name == "vae" and args.decoder):
            setattr(args, name, str(path))
    if args.preset is None and args.sampler is None and given["dit"] is None:
        args.preset = snap.preset
    if given["dit"] is not None and args.head_dim is None:  # a distilled DiT file: the base's head width,
        from .common import side_config

        own = side_config(Path(given["dit"]).expanduser())  # unless a config.json beside it says
        if "attention_head_dim" not in own and "num_heads" not in own:
            args.head_dim = snapshot.base_head_dim(snap)


def _check_preset_and_dit(args) -> None:
    """The preset exists (TurboWan is refused with its reason) and fits the DiT's layout; the DiT and LoRA
    files are readable and recognised. Only headers are read: this runs before the long part."""
    from .presets import check_preset, required_layout

    if args.preset:
        if args.sampler:
            raise ConvertUsageError(f"--preset {args.preset} records the sampler; drop --sampler {args.sampler}")
        check_preset(args.preset)
    if args.dit:
        from .wan_dit import lora_specs, open_dit

        layout, ckpt = open_dit(args.dit, _dit_entries(args))
        need = required_layout(args.preset)
        if need and layout != need:
            raise ConvertUsageError(f"--preset {args.preset} is for a {need}-layout DiT, but {args.dit} has the "
                                    f"{layout} layout: wrong checkpoint or wrong preset")
        _check_causal_preset(args, _dit_fields(layout, ckpt), args.dit)
        if args.lora:
            from mlx_video.lora import read_lora

            args.lora = lora_specs(args.lora)
            for spec in args.lora:
                read_lora(spec)
    elif _causal_name(args) and (Path(args.mlx_path) / "config.json").is_file():  # the folder's own DiT
        from mlx_video.inputs import InputError, read_json

        try:  # unvalidated, as update_config reads it: converting a section is how a broken one is fixed
            dit = read_json(Path(args.mlx_path) / "config.json", "model config").get("dit")
        except (InputError, OSError, ValueError, AttributeError):
            dit = None
        if isinstance(dit, dict):
            _check_causal_preset(args, dit, Path(args.mlx_path) / "config.json")
    if args.text_encoder:  # a wrong or broken encoder file fails now, not after the DiT is written
        from .common import open_checkpoint
        from .umt5 import _tokenizer, detect_layout

        encoder = open_checkpoint(args.text_encoder)
        if len(encoder):  # (an empty one is reported by the conversion, as such)
            detect_layout(encoder)
        if args.tokenizer:
            _tokenizer(args.tokenizer)
    if args.vae:
        from .common import open_checkpoint, strip_common_prefix
        from .wan_vae import PREFIXES as VAE_PREFIXES, detect_layout as vae_layout

        vae = open_checkpoint(args.vae)
        for marker in ("decoder.conv1.weight", "decoder.conv_in.weight"):
            vae = strip_common_prefix(vae, list(VAE_PREFIXES), marker)
        if len(vae):
            vae_layout(vae)


def _causal_name(args) -> str | None:
    return next((n for n in (args.preset, args.sampler) if n in CAUSAL_PRESETS), None)


def _dit_entries(args):
    from .presets import checkpoint_entries

    return checkpoint_entries(_causal_name(args), args.select)


def _dit_fields(layout: str, ckpt) -> dict:
    """The fields of the ``dit`` section a causal preset depends on, from the checkpoint's headers only."""
    patch = ckpt.shape("patch_embedding.weight") if "patch_embedding.weight" in ckpt else ()
    head = next((k for k in ("head.head.weight", "proj_out.weight") if k in ckpt), None)
    fields = {"source_layout": layout}
    if len(patch) == 5:
        fields.update(patch_size=list(patch[2:]), in_channels=int(patch[1]))
        if head is not None:
            fields["out_channels"] = int(ckpt.shape(head)[0]) // max(1, int(patch[2] * patch[3] * patch[4]))
    return fields


def _check_causal_preset(args, dit: dict, where) -> None:
    """A causal preset that contradicts the DiT (``mlx_video.causal.dit_conflicts``), and LongLive without its
    LoRA, are usage errors: refused before anything is written."""
    from mlx_video.causal import dit_conflicts

    name = _causal_name(args)
    if name is None:
        return
    problems = dit_conflicts(dit, name)
    if problems:
        raise ConvertUsageError(f"--{'preset' if args.preset else 'sampler'} {name} contradicts {where}: "
                                + "; ".join(problems))
    if name == "longlive" and args.dit and not args.lora:
        raise ConvertUsageError(f"--{'preset' if args.preset else 'sampler'} longlive: LongLive's base checkpoint runs "
                                "only with its LoRA merged (checkpoints.md §3.3): add --lora lora.pt (for a checkpoint "
                                "that already has it merged, convert it without the preset, then record it with "
                                "`convert --sampler longlive --mlx-path FOLDER`)")


def check_args(args) -> None:
    """Usage errors, before anything is read or written (exit 2)."""
    if args.hf_path:
        _from_hf_path(args)
    if not (args.dit or args.text_encoder or args.decoder or args.vae or args.tokenizer or args.sampler
            or args.preset):
        raise ConvertUsageError("nothing to convert: give --hf-path, --dit, --text-encoder/--tokenizer, --decoder "
                                "and/or --sampler")
    if args.text_encoder and not args.tokenizer:
        raise ConvertUsageError("--text-encoder needs --tokenizer (the spiece.model the encoder was trained with)")
    if getattr(args, "lora", None) and not args.dit:
        raise ConvertUsageError("--lora is merged into the DiT: give --dit (the base checkpoint) too")
    if args.q_bits not in VALID_BITS:
        raise ConvertUsageError(f"--q-bits {args.q_bits} is not supported; choose one of {list(VALID_BITS)}")
    if args.q_group_size not in VALID_GROUP_SIZES:
        raise ConvertUsageError(f"--q-group-size {args.q_group_size} is not supported; choose one of "
                                f"{list(VALID_GROUP_SIZES)}")
    if args.quantize and not args.text_encoder:
        raise ConvertUsageError("-q/--quantize quantizes the text encoder: give --text-encoder (and --tokenizer)")
    out = Path(args.mlx_path)
    parent = out if out.is_dir() else out.absolute().parent
    if out.exists() and not out.is_dir():
        raise ConvertUsageError(f"--mlx-path {out} exists and is not a folder")
    if not parent.is_dir():
        raise ConvertUsageError(f"--mlx-path {out}: the folder {parent} does not exist")
    import os

    if not os.access(parent, os.W_OK | os.X_OK) or not os.access(out.absolute().parent, os.W_OK | os.X_OK):
        raise ConvertUsageError(f"--mlx-path {out}: {out.absolute().parent} is not writable")
    _check_preset_and_dit(args)


def run(args) -> int:
    check_args(args)
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
    if args.vae:
        replace.append("vae.safetensors")
    with atomic_model_folder(out, replace=tuple(replace)) as tmp:
        config_dir = previous
        if args.dit:
            from .wan_dit import convert_dit

            section = convert_dit(args.dit, tmp, parse_dtype(args.dtype or "float32"), args.head_dim,
                                  args.qk_norm, _dit_entries(args), args.qk_norm_width, lora=args.lora)
            update_config(tmp, config_dir, "dit", section)
            config_dir = tmp
            _say(f"DiT: {section['num_layers']} layers, {readable_count(section['parameters'])} parameters "
                 f"({section['source_layout']} layout)")
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
        if args.vae:
            from .wan_vae import convert_vae

            section = convert_vae(args.vae, tmp, parse_dtype(args.dtype or "float32"))
            update_config(tmp, config_dir, "vae", section)
            config_dir = tmp
            _say(f"vae: {section.get('summary', 'done')}")
        if args.sampler or args.preset:
            from mlx_video.sampling import DEFAULTS

            from . import presets

            section = (presets.preset_section(args.preset) if args.preset else preset_section(args.sampler)
                       if args.sampler in CAUSAL_PRESETS else {"name": args.sampler, **DEFAULTS[args.sampler]})
            update_config(tmp, config_dir, "sampler", section)
            config_dir = tmp
            if args.preset:
                _say(f"preset: {args.preset} ({section['name']} sampler)")
        if config_dir is previous:  # nothing written (cannot happen after the checks above)
            raise ConversionError("nothing converted")
    _say(f"wrote {out}")
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)
