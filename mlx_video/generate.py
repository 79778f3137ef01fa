"""``mlx-video generate``: text prompt -> MP4 (plus a metadata sidecar that can replay the run).

Every flag is checked before any model is loaded (a bad value exits 2 with one line naming the flag), and
the memory plan is checked against ``--memory-limit`` before any stage runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .pipeline import (GenerationRequest, Models, check_memory_limit, check_outputs, generate, metadata_path,
                       parse_memory, random_seed)
from .sampling import DEFAULTS as SAMPLER_DEFAULTS
from .sampling import SAMPLERS
from .utils import DTYPES, UsageError, read_config, resolve_model_path
from .video import GenerationFailed

DEFAULTS = dict(height=352, width=624, frames=49, fps=16.0, seed=0, negative_prompt="", output="out.mp4")
DEFAULT_CACHE = Path.home() / ".cache" / "mlx-video" / "prompt-embeddings"
MAX_SEED = 2**32 - 1
OUTPUT_SUFFIXES = (".mp4", ".m4v", ".mov", ".gif")  # or no suffix: a folder of PNG frames


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", **parser_kwargs())
    add_arguments(p)
    p.set_defaults(func=run)


def parser_kwargs() -> dict:
    unipc = SAMPLER_DEFAULTS["unipc"]
    return dict(
        help="generate a video from a text prompt",
        description="Generate a video: tokenize -> UMT5 encode -> DiT denoise -> TAEHV decode -> MP4. Stages run "
        "one at a time and free their model; per-stage time and peak memory are printed. Sampler defaults "
        "come from the model folder's config.json; flags override them. Every flag is checked before any "
        "model is loaded, and the memory plan against --memory-limit before any stage runs.",
        epilog="examples:\n"
        "  mlx-video generate --prompt 'a red circle moving right on a black background'   # the built-in toy model\n"
        "  mlx-video generate --model ./wan-mlx --prompt 'a red fox running through snow' --output fox.mp4\n"
        "  mlx-video demo --mlx-path demo-model     # a tiny random-weight model: its videos are coloured noise\n"
        f"  mlx-video generate --model ./wan-mlx --prompt '...' --sampler unipc   # {unipc['steps']} steps, "
        f"guidance {unipc['guidance']:g}\n"
        "exit status: 0 written, 1 failed while running (nothing is left at --output), 2 bad flags (nothing ran)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    fewstep, unipc = SAMPLER_DEFAULTS["fewstep"], SAMPLER_DEFAULTS["unipc"]
    p.add_argument("--model", default=None, help="model folder (from `mlx-video convert` or `mlx-video recipe`) or "
                   "Hugging Face repo id already in the local cache (default: the built-in toy Lightning Video, "
                   "4 steps, 64x64, 17 frames, trained on the recipe's shapes world)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--prompt-file", help="file with one prompt per line (one video each, named OUTPUT-000.mp4, "
                     "...; models stay loaded)")
    src.add_argument("--prompt-schedule", metavar="FILE", help="block-causal models (LongLive): one video whose "
                     "prompt changes; each line 'FRAME PROMPT' gives the video frame a prompt starts at (the first "
                     "at 0). A switch takes effect at the next block, with the cached keys/values of the attention "
                     "window recomputed under the new prompt, as LongLive does")
    p.add_argument("--negative-prompt", default=None, help="negative prompt, used only when guidance > 1 "
                   "(default: empty)")
    p.add_argument("--height", type=int, default=None,
                   help=f"video height, multiple of 16 (default {DEFAULTS['height']})")
    p.add_argument("--width", type=int, default=None, help=f"video width, multiple of 16 (default {DEFAULTS['width']})")
    p.add_argument("--frames", type=int, default=None, help=f"number of frames, 4k+1 (default {DEFAULTS['frames']}; "
                   f"81 for block-causal models, whose latent frames (frames-1)/4+1 must fill whole blocks)")
    p.add_argument("--fps", type=float, default=None, help=f"frames per second of the output, > 0 "
                   f"(default {DEFAULTS['fps']:g})")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="fewstep (distilled models), unipc (Wan's solver) or euler (default: the model folder's, "
                   f"else fewstep). unipc and euler switch to their own defaults: {unipc['steps']} steps and "
                   f"guidance {unipc['guidance']:g} (two DiT passes per step), unless --steps/--guidance say otherwise")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None,
                       help=f"number of sampling steps, >= 1 (default: the model's; fewstep "
                       f"{len(fewstep['denoising_step_list'])}, unipc/euler {unipc['steps']}). For fewstep, N "
                       "evenly spaced integer timesteps (3: 1000 666 333), warped")
    steps.add_argument("--denoising-step-list", type=float, nargs="+", default=None,
                       help="few-step timesteps, e.g. 1000 750 500 250 (default: the model's), warped through the "
                       "shifted table unless --no-warp")
    p.add_argument("--no-warp", action="store_true", help="use the step list as timesteps without warping (CausVid)")
    p.add_argument("--shift", type=float, default=None,
                   help=f"flow-matching shift, > 0 (default: the model's, else {fewstep['shift']:g})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale, >= 0; <= 1 disables it (default: the model's, else "
                   f"{fewstep['guidance']:g} for fewstep, {unipc['guidance']:g} for unipc/euler)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"random seed, 0..{MAX_SEED}; -1 picks one and prints it (default {DEFAULTS['seed']})")
    p.add_argument("--output", "-o", default=None,
                   help=f"output .mp4 (or .gif, or a name without extension for a folder of PNG frames); an "
                   f"existing video there is replaced (default: {DEFAULTS['output']})")
    p.add_argument("--gif", action="store_true", help="also write a GIF next to the MP4")
    p.add_argument("--save-frames", metavar="DIR", default=None, help="also write PNG frames to DIR")
    p.add_argument("--memory-limit", default=None,
                   help="memory budget, e.g. 4GB, at least 64MB (default: 75%% of RAM); sets MLX's limits and "
                   "chooses attention chunking, decoder tiling and encoder streaming to fit it. A job that "
                   "cannot fit is refused before it starts")
    p.add_argument("--low-memory", action="store_true", help="for 8 GB devices: smaller chunks and tiles, no cache")
    p.add_argument("--decoder", choices=["taehv", "wan-vae"], default=None,
                   help="taehv (fast, the default where the folder has it) or wan-vae (the full Wan2.1 VAE: slower, "
                   "more memory, final-render quality; add it with `mlx-video convert --vae`)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="LoRA merged into the DiT when it loads (repeatable; the folder is not changed): diffusers/"
                   "PEFT or kohya/ComfyUI files; SCALE multiplies alpha/r (default 1). A LoRA for the unpruned "
                   "Wan2.1-1.3B also fits a folder made by `mlx-video prune` (its kept rows and columns are used)")
    p.add_argument("--extend-prompt", metavar="MODEL", default=None,
                   help="first rewrite each prompt into a detailed one with this mlx-lm instruct model (a folder or "
                   "a cached hub id, e.g. a Qwen2.5 instruct model) and Wan's own system prompt; the result is "
                   "printed, stored in the metadata beside the original, and cached per (model, prompt, seed). "
                   "Needs pip install -e \".[extend]\"")
    p.add_argument("--keep-models", action="store_true", help="keep models resident between prompts")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="compute dtype (default float32 on the CPU, bfloat16 on GPUs)")
    p.add_argument("--prompt-cache", default=str(DEFAULT_CACHE),
                   help=f"folder for cached prompt embeddings (default: {DEFAULT_CACHE})")
    p.add_argument("--no-prompt-cache", action="store_true", help="always run the text encoder")
    p.add_argument("--config-from-metadata", metavar="JSON", default=None,
                   help="replay a run from its metadata sidecar OUTPUT.json (flags given here still override)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--json-events", action="store_true", help="print one JSON event per line on stdout")


def _from_metadata(path: str) -> dict:
    from .inputs import InputError, read_json

    try:
        meta = read_json(path, "--config-from-metadata sidecar")
    except InputError as exc:
        raise UsageError(str(exc)) from None
    kinds = dict(prompt=str, negative_prompt=str, model=str, model_path=str, height=int, width=int, frames=int,
                 seed=int, fps=(int, float), sampler=dict)
    for key, kind in kinds.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise UsageError(f"--config-from-metadata {path}: field {key!r} has the wrong type "
                             f"({type(value).__name__})")
    schedule = meta.get("prompt_schedule") or []
    if not isinstance(schedule, list) or not all(
            isinstance(e, list) and len(e) == 2 and type(e[0]) is int and isinstance(e[1], str) for e in schedule):
        raise UsageError(f"--config-from-metadata {path}: field 'prompt_schedule' must be [[frame, prompt], ...]")
    s = meta.get("sampler") or {}
    return dict(prompt=meta.get("prompt"), negative_prompt=meta.get("negative_prompt"), prompt_schedule=schedule,
                height=meta.get("height"), width=meta.get("width"), frames=meta.get("frames"), fps=meta.get("fps"),
                seed=meta.get("seed"),
                model=meta.get("model_path") or meta.get("model"),
                decoder=meta.get("decoder") if meta.get("decoder") in ("taehv", "wan-vae") else None,
                sampler=dict(name=s.get("name"), steps=s.get("steps"), shift=s.get("shift"),
                             guidance=s.get("guidance"), denoising_step_list=s.get("denoising_step_list"),
                             warp=s.get("warp")))


def check_flags(args) -> None:
    """Range checks of the numeric flags (argparse has checked their types): ``UsageError`` names the flag."""
    def finite(flag, value, low, strict):
        if value is None:
            return
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise UsageError(f"{flag} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")

    finite("--guidance", args.guidance, 0.0, strict=False)
    finite("--shift", args.shift, 0.0, strict=True)
    finite("--fps", args.fps, 0.0, strict=True)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    if args.denoising_step_list is not None and not all(math.isfinite(t) for t in args.denoising_step_list):
        raise UsageError(f"--denoising-step-list must be finite numbers, got {args.denoising_step_list}")
    if args.seed is not None and args.seed != -1 and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in 0..{MAX_SEED} (or -1 to pick one), got {args.seed}")
    for flag in ("height", "width", "frames"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be positive, got {value}")
    if args.memory_limit is not None:
        check_memory_limit(parse_memory(args.memory_limit))
    if args.gif and args.output is not None and Path(args.output).suffix.lower() == ".gif":
        raise UsageError(f"--gif writes a GIF next to the MP4, but --output {args.output} is already a GIF")
    for flag, value in (("--output", args.output), ("--save-frames", args.save_frames)):
        if value is not None:
            _check_output_name(flag, Path(value), folder_only=flag == "--save-frames")


def _check_output_name(flag: str, path: Path, folder_only: bool = False) -> None:
    suffix = path.suffix.lower()
    if folder_only and suffix:
        raise UsageError(f"{flag} {path}: give a folder name (no extension) for the PNG frames")
    if suffix and suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"{flag} {path}: unknown video format {path.suffix!r}; use .mp4, .gif, or a name "
                         "without extension for a folder of PNG frames")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: output folder {parent} does not exist")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: output folder {parent} is not writable")


def _requests(args) -> tuple[list[GenerationRequest], list[Path]]:
    base = _from_metadata(args.config_from_metadata) if args.config_from_metadata else {}
    schedule: list = []

    def pick(name):
        value = getattr(args, name)
        return value if value is not None else base.get(name) if base.get(name) is not None else DEFAULTS.get(name)

    if args.prompt_file:
        from .inputs import MAX_PROMPT_FILE_BYTES, InputError, read_text

        try:  # a regular file of bounded size: a FIFO would block, /dev/zero never ends
            text = read_text(args.prompt_file, "--prompt-file", MAX_PROMPT_FILE_BYTES)
        except InputError as exc:
            raise UsageError(f"cannot read --prompt-file: {exc}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt-file {args.prompt_file} has no prompts")
    elif getattr(args, "prompt_schedule", None):
        from .causal import parse_prompt_schedule
        from .inputs import MAX_PROMPT_FILE_BYTES, InputError, read_text

        try:
            text = read_text(args.prompt_schedule, "--prompt-schedule", MAX_PROMPT_FILE_BYTES)
        except InputError as exc:
            raise UsageError(f"cannot read --prompt-schedule: {exc}") from None
        entries = parse_prompt_schedule(text, f"--prompt-schedule {args.prompt_schedule}")
        prompts, schedule = [entries[0][1]], entries[1:]
    else:
        prompt = args.prompt if args.prompt is not None else base.get("prompt")
        if prompt is None:
            raise UsageError("give --prompt, --prompt-file or --config-from-metadata")
        prompts = [prompt]
        if args.prompt is None:  # a replay keeps its schedule
            schedule = [tuple(e) for e in base.get("prompt_schedule") or []]
    sampler = dict(base.get("sampler") or {})
    if args.sampler is not None and args.sampler != sampler.get("name"):
        sampler = {"name": args.sampler}  # a different sampler: its own defaults, not the replayed ones
    overrides = dict(name=args.sampler, steps=args.steps, shift=args.shift, guidance=args.guidance,
                     denoising_step_list=args.denoising_step_list, warp=False if args.no_warp else None)
    sampler.update({k: v for k, v in overrides.items() if v is not None})
    sampler = {k: v for k, v in sampler.items() if v is not None}
    seed = pick("seed")
    if seed == -1:
        seed = random_seed()
        print(f"seed: {seed}", file=sys.stderr)
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - (len(prompts) - 1):
        raise UsageError(f"--seed {seed}: with {len(prompts)} prompts the seeds {seed}..{seed + len(prompts) - 1} "
                         f"must lie in 0..{MAX_SEED}")
    output = Path(pick("output"))
    _check_output_name("--output", output)
    outputs = [output] if len(prompts) == 1 else [output.with_name(f"{output.stem}-{i:03d}{output.suffix}")
                                                  for i in range(len(prompts))]
    requests = []
    for i, prompt in enumerate(prompts):
        r = GenerationRequest(prompt=prompt, negative_prompt=pick("negative_prompt"), height=pick("height"),
                              width=pick("width"), frames=pick("frames"), seed=seed + i, fps=pick("fps"),
                              sampler=sampler, prompt_schedule=list(schedule))
        try:
            r.validate()
            from .sampling import sampler_config

            sampler_config(None, **sampler)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        requests.append(r)
    if args.model is None:
        args.model = base.get("model")
    if args.decoder is None:  # a replay decodes with the decoder it was made with
        args.decoder = base.get("decoder")
    if args.model is None:  # the built-in toy Lightning Video (mlx_video/default_model)
        from .default_model import path as default_model

        args.model = str(default_model())
        args.using_default_model = True
    return requests, outputs


def run(args) -> int:
    check_flags(args)
    requests, outputs = _requests(args)
    folder = resolve_model_path(args.model)  # ModelPathError: exit 2
    if args.frames is None and not args.config_from_metadata:  # block-causal models: their own default length
        from .causal import default_frames

        frames = default_frames(read_config(folder).get("sampler"))
        for r in requests:
            r.frames = frames or r.frames
    from .lora import check_folder, parse_spec

    loras = [parse_spec(text) for text in (args.lora or [])]
    check_folder(folder, loras)  # a bad LoRA is an error before any work
    sampler_section = read_config(folder).get("sampler")
    size = sampler_section.get("defaults") if isinstance(sampler_section, dict) else None  # presets, e.g. fastwan
    size = size if isinstance(size, dict) else {}
    for flag in ("height", "width", "frames"):
        if getattr(args, flag) is None and not args.config_from_metadata and isinstance(size.get(flag), int):
            for r in requests:
                setattr(r, flag, size[flag])
    for r in requests:
        try:
            r.validate()
        except ValueError as exc:
            raise UsageError(f"{folder}: config.json sampler.defaults: {exc}") from None
    demo = _demo_note(folder)
    if getattr(args, "using_default_model", False) and not (args.quiet or args.json_events):
        print(f"note: no --model: using the built-in toy model ({folder}); it knows the shapes world only, e.g. "
              "'a red circle moving right on a black background'", file=sys.stderr)
    if demo and not args.json_events:
        print(f"note: {args.model} is {demo}", file=sys.stderr)
    events = (lambda e: print(json.dumps(e, default=str), flush=True)) if args.json_events else None
    models = Models(folder, None, loras) if args.keep_models or len(requests) > 1 else None
    extras = {output: ([output.with_suffix(".gif")] if args.gif else []) + ([Path(args.save_frames)] if args.save_frames
                                                                           else []) for output in outputs}
    for output in outputs:  # every output is checked before the first run (fsio: replace only what we wrote)
        check_outputs(output, extras[output])
    if args.extend_prompt:  # before any model of the folder loads; the LLM is freed before the text encoder
        _extend(args, requests)
    for request, output in zip(requests, outputs):
        try:
            result = generate(folder, request, output, models=models, dtype=args.dtype,
                              memory_limit=args.memory_limit, low_memory=args.low_memory,
                              keep_models=args.keep_models or len(requests) > 1,
                              prompt_cache=None if args.no_prompt_cache else args.prompt_cache,
                              extra_outputs=extras[output], events=events, progress=not (args.quiet or args.json_events),
                              decoder=args.decoder, loras=loras)
        except GenerationFailed as exc:
            print(f"mlx-video generate: generation failed in {exc.stage or 'a stage'}: {exc.reason}; nothing was "
                  f"saved (see {output}.failure.json)", file=sys.stderr)
            return 1
        if not (args.quiet or args.json_events):
            _summary(result, output, demo)
    return 0


def _extend(args, requests: list[GenerationRequest]) -> None:
    from .prompt_extend import extend_prompts

    cache = None if args.no_prompt_cache else Path(args.prompt_cache) / "extended-prompts"
    extended = extend_prompts(args.extend_prompt, [r.prompt for r in requests], [r.seed for r in requests], cache)
    for r, text in zip(requests, extended):
        r.prompt_extension = {"model": args.extend_prompt, "original_prompt": r.prompt}
        if args.json_events:
            print(json.dumps({"event": "prompt_extended", "original": r.prompt, "extended": text}), flush=True)
        elif not args.quiet:
            print(f"extended prompt: {text}", file=sys.stderr)
        r.prompt = text


def _demo_note(folder: Path) -> str:
    """What to expect from a demo (random-weight) model folder; empty for a real model."""
    try:
        demo = read_config(folder).get("demo")
    except Exception:  # noqa: BLE001 - the pipeline reports a broken folder with its own message
        return ""
    if isinstance(demo, dict):
        return ("the demo model: random weights, so its videos are moving coloured noise by design (it shows the "
                "pipeline works; convert a trained checkpoint with `mlx-video convert` for real videos)")
    return ""


def _summary(result, output: Path, demo: str = "") -> None:
    print(f"wrote {output} ({metadata_path(output).name} has the settings; seed {result.seed})"
          + (" - coloured noise: demo model, random weights" if demo else ""), file=sys.stderr)
    for name, s in result.stages.items():
        pred = f" (predicted {_size(s.predicted_peak_bytes)})" if s.predicted_peak_bytes else ""
        print(f"  {name:8s} {s.seconds:8.2f} s   peak memory {_size(s.peak_memory_bytes)}{pred}", file=sys.stderr)
    import mlx.core as mx

    from . import native

    if mx.default_device() == mx.cpu:  # which CPU path ran: the native kernels or the MLX/NumPy fallback
        print(f"  {native.describe()}", file=sys.stderr)
    for note in (result.metadata.get("memory_plan") or {}).get("notes", []):  # how the plan was fitted to the limit
        print(f"  memory plan: {note}", file=sys.stderr)
    c = result.metadata.get("causal")
    if c and "time_to_first_frame_s" in c:  # block-causal models stream: frames appear before the run ends
        print(f"  time to first frame {c['time_to_first_frame_s']:.2f} s; {c['blocks']} blocks of "
              f"{c['frames_per_block']} latent frames; KV cache {_size(c.get('kv_cache_bytes', 0))}", file=sys.stderr)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_video.generate``: the same as ``mlx-video generate``."""
    from .cli import run_command

    p = argparse.ArgumentParser(prog="python -m mlx_video.generate", **{k: v for k, v in parser_kwargs().items()
                                                                       if k != "help"})
    add_arguments(p)
    args = p.parse_args(argv)
    args.command = "generate"
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
