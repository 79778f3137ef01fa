"""``mlx-video generate``: text prompt -> MP4 (plus a metadata sidecar that can replay the run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .pipeline import GenerationRequest, Models, generate, metadata_path, parse_memory, random_seed
from .sampling import SAMPLERS
from .utils import DTYPES, ModelFolderError, resolve_model_path
from .video import GenerationFailed

DEFAULTS = dict(height=352, width=624, frames=49, fps=16.0, seed=0, negative_prompt="", output="out.mp4")
DEFAULT_CACHE = Path.home() / ".cache" / "mlx-video" / "prompt-embeddings"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a video from a text prompt",
        description="Generate a video: tokenize -> UMT5 encode -> DiT denoise -> TAEHV decode -> MP4. Stages run "
        "one at a time and free their model; per-stage time and peak memory are printed. Sampler defaults "
        "come from the model folder's config.json; flags override them.",
        epilog="example: mlx-video generate --model ./lightning-video-mlx --prompt 'a red fox running through "
        "snow' --output fox.mp4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="model folder (from `mlx-video convert`) or Hugging Face repo id "
                   "already in the local cache")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--prompt-file", help="file with one prompt per line (one video each; models stay loaded)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (used only when guidance > 1)")
    p.add_argument("--height", type=int, default=None, help="video height, multiple of 16 (default 352)")
    p.add_argument("--width", type=int, default=None, help="video width, multiple of 16 (default 624)")
    p.add_argument("--frames", type=int, default=None, help="number of frames, 4k+1 (default 49)")
    p.add_argument("--fps", type=float, default=None, help="frames per second of the output (default 16)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="fewstep (distilled models, default), unipc (Wan's 50-step solver) or euler")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="number of sampling steps")
    steps.add_argument("--denoising-step-list", type=float, nargs="+", default=None,
                       help="few-step timesteps, e.g. 1000 750 500 250 (warped through the shifted table)")
    p.add_argument("--no-warp", action="store_true", help="use the step list as timesteps without warping (CausVid)")
    p.add_argument("--shift", type=float, default=None, help="flow-matching shift (default 5.0)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 disables it")
    p.add_argument("--seed", type=int, default=None, help="random seed; -1 picks one and prints it (default 0)")
    p.add_argument("--output", "-o", default=None, help="output .mp4 (or .gif, or a folder for PNG frames)")
    p.add_argument("--gif", action="store_true", help="also write a GIF next to the MP4")
    p.add_argument("--save-frames", metavar="DIR", default=None, help="also write PNG frames to DIR")
    p.add_argument("--memory-limit", default=None, help="memory budget, e.g. 4GB (default: 75%% of RAM); sets MLX's "
                   "limits and chooses attention chunking and decoder tiling")
    p.add_argument("--low-memory", action="store_true", help="for 8 GB devices: smaller chunks and tiles, no cache")
    p.add_argument("--keep-models", action="store_true", help="keep models resident between prompts")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="compute dtype (default float32 on the CPU, bfloat16 on GPUs)")
    p.add_argument("--prompt-cache", default=str(DEFAULT_CACHE), help="folder for cached prompt embeddings")
    p.add_argument("--no-prompt-cache", action="store_true", help="always run the text encoder")
    p.add_argument("--config-from-metadata", metavar="JSON", default=None,
                   help="replay a run from its metadata sidecar (flags given here still override)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    p.add_argument("--json-events", action="store_true", help="print one JSON event per line on stdout")
    p.set_defaults(func=run, _parser=p)


def _from_metadata(path: str) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read metadata {path}: {exc}") from None
    s = meta.get("sampler", {})
    return dict(prompt=meta.get("prompt"), negative_prompt=meta.get("negative_prompt"), height=meta.get("height"),
                width=meta.get("width"), frames=meta.get("frames"), fps=meta.get("fps"), seed=meta.get("seed"),
                model=meta.get("model_path") or meta.get("model"),
                sampler=dict(name=s.get("name"), steps=s.get("steps"), shift=s.get("shift"),
                             guidance=s.get("guidance"), denoising_step_list=s.get("denoising_step_list"),
                             warp=s.get("warp")))


def _requests(args, parser) -> tuple[list[GenerationRequest], list[Path]]:
    base = _from_metadata(args.config_from_metadata) if args.config_from_metadata else {}

    def pick(name):
        value = getattr(args, name)
        return value if value is not None else base.get(name) if base.get(name) is not None else DEFAULTS.get(name)

    if args.prompt_file:
        try:
            prompts = [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            parser.error(f"cannot read --prompt-file: {exc}")
        if not prompts:
            parser.error(f"--prompt-file {args.prompt_file} has no prompts")
    else:
        prompt = args.prompt if args.prompt is not None else base.get("prompt")
        if prompt is None:
            parser.error("give --prompt, --prompt-file or --config-from-metadata")
        prompts = [prompt]
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
    output = Path(pick("output"))
    outputs = [output] if len(prompts) == 1 else [output.with_name(f"{output.stem}-{i:03d}{output.suffix}")
                                                  for i in range(len(prompts))]
    requests = []
    for i, prompt in enumerate(prompts):
        r = GenerationRequest(prompt=prompt, negative_prompt=pick("negative_prompt"), height=pick("height"),
                              width=pick("width"), frames=pick("frames"), seed=seed + i, fps=pick("fps"),
                              sampler=sampler)
        try:
            r.validate()
            from .sampling import sampler_config

            sampler_config(None, **sampler)
        except ValueError as exc:
            parser.error(str(exc))
        requests.append(r)
    if args.model is None:
        args.model = base.get("model")
    if args.model is None:
        parser.error("--model is required")
    return requests, outputs


def run(args) -> int:
    parser = args._parser
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.memory_limit is not None:
        try:
            parse_memory(args.memory_limit)
        except ValueError as exc:
            parser.error(str(exc))
    requests, outputs = _requests(args, parser)
    try:
        folder = resolve_model_path(args.model)
    except ModelFolderError as exc:
        parser.error(str(exc))
    for out in outputs:
        parent = out.absolute().parent
        if not parent.is_dir():
            parser.error(f"output folder {parent} does not exist")
    events = (lambda e: print(json.dumps(e, default=str), flush=True)) if args.json_events else None
    models = Models(folder, None) if args.keep_models or len(requests) > 1 else None
    for request, output in zip(requests, outputs):
        extras = ([output.with_suffix(".gif")] if args.gif else []) + ([args.save_frames] if args.save_frames else [])
        try:
            result = generate(folder, request, output, models=models, dtype=args.dtype,
                              memory_limit=args.memory_limit, low_memory=args.low_memory,
                              keep_models=args.keep_models or len(requests) > 1,
                              prompt_cache=None if args.no_prompt_cache else args.prompt_cache,
                              extra_outputs=extras, events=events, progress=not (args.quiet or args.json_events))
        except GenerationFailed as exc:
            print(f"mlx-video generate: generation failed in {exc.stage or 'a stage'}: {exc.reason}; nothing was "
                  f"saved (see {output}.failure.json)", file=sys.stderr)
            return 1
        if not (args.quiet or args.json_events):
            _summary(result, output)
    return 0


def _summary(result, output: Path) -> None:
    print(f"wrote {output} ({metadata_path(output).name} has the settings; seed {result.seed})", file=sys.stderr)
    for name, s in result.stages.items():
        pred = f" (predicted {_size(s.predicted_peak_bytes)})" if s.predicted_peak_bytes else ""
        print(f"  {name:8s} {s.seconds:8.2f} s   peak memory {_size(s.peak_memory_bytes)}{pred}", file=sys.stderr)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
