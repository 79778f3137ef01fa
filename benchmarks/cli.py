"""``mlx-video bench``: latency, memory and FLOPs per stage, side by side with the PyTorch reference.

Stages: text encoding (UMT5-xxl INT4), one DiT step, a whole 4-step denoise, TAEHV decoding, and end to
end. For each: wall time (median and spread over repeats, warm-up excluded), peak memory (MLX's counter and
the process's peak RSS growth), model FLOPs (``benchmarks/flops.py``) and achieved FLOP/s. The reference
runs in the same process on the same inputs and dtype: diffusers ``WanTransformer3DModel``, transformers
``UMT5EncoderModel`` and the PyTorch TAEHV from the tests. Runs alternate between the two runtimes, so
load from other processes hits both alike; the per-pair time ratio is the figure that carries across
machines. The machine's fp32 matmul rate is measured at the start and the end of the run (the DiT's
achieved FLOP/s divided by it is the model FLOP utilisation, and the two readings show the drift).

Weights are random at real sizes. Where a full-size run would take too long on a small machine, a subset
is timed (DiT: ``--dit-layers`` of 30 blocks; text encoder reference: ``--encoder-ref-layers`` of 24;
decoder: ``--decode-latents`` latent frames) and scaled by the FLOP ratio; every such figure says so
(``method``). ``--quick`` runs tiny models at tiny shapes (CI; seconds).

Outputs ``bench.json``, ``bench.md`` and ``bench.png`` in ``--out``. ``benchmarks/report.py`` rebuilds the
Markdown and the chart from a JSON file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

from mlx_video.utils import UsageError

from benchmarks.common import (DIT_MODELS, SCHEMA, SHAPES, TorchSide, _load, _reference_modules, backend_info,
                               bench_matmul, json_default, machine_info, versions)

# --stages names -> what each times. "model" times a model folder of your own (--model) through the pipeline.
STAGES = {"matmul": "the machine's fp32 matmul rate (start and end of the run)",
          "encode": "UMT5-xxl INT4 text encoding vs transformers",
          "dit": "one DiT step and a 4-step denoise vs diffusers",
          "decode": "TAEHV streaming decode vs the PyTorch TAEHV",
          "vae": "Wan2.1 VAE decode vs diffusers AutoencoderKLWan, and vs TAEHV where decode runs too (slow)",
          "causal": "block-causal presets (self-forcing, longlive, rolling-forcing) vs a PyTorch causal loop: time to "
                    "first block, per block, video fps, peak memory with the KV cache",
          "model": "your model folder (--model) end to end through the pipeline: encode, denoise, decode"}
DEFAULT_STAGES = "matmul,encode,dit,decode"
DEFAULT_SHAPES = "small,device,paper"
MODEL_DEFAULT_SHAPES = "small"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark latency and memory per stage",
                              description=__doc__.split("\n\n")[0] + " Writes bench.json/.md/.png.",
                              epilog="examples:\n  mlx-video bench --quick                 # seconds: tiny models, "
                                     "CI\n  mlx-video bench --model ./my-model      # time your own model folder",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny models at tiny shapes, one repeat (CI; seconds)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="time this model folder (from `mlx-video convert` or `mlx-video demo`) through the pipeline; "
                        f"implies --stages model and --shapes {MODEL_DEFAULT_SHAPES} unless given")
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--label", default=None, help="a name for this machine in the report (default: the CPU model)")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated, from {', '.join(SHAPES)} (default: {DEFAULT_SHAPES}; with --model: "
                        f"{MODEL_DEFAULT_SHAPES})")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated, from {', '.join(STAGES)} (default: {DEFAULT_STAGES}; with --model: model). "
                        "Denoise and end to end come with dit")
    p.add_argument("--models", default="lightning,wan2.1-1.3b",
                   help=f"random-weight DiTs to time, from {', '.join(DIT_MODELS)} (default: lightning,wan2.1-1.3b)")
    p.add_argument("--wan-shapes", default="device", help="shapes for wan2.1-1.3b (default: device)")
    p.add_argument("--denoise-shapes", default="small,device",
                   help="shapes with a measured 4-step denoise (default: small,device)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement, after one warm-up (default 2)")
    p.add_argument("--shape-repeats", default="paper:1",
                   help="per-shape repeats overriding --repeats, SHAPE:N,... (default paper:1)")
    p.add_argument("--denoise-repeats", type=int, default=0,
                   help="extra denoise runs (one probed run always; default 0)")
    p.add_argument("--dit-layers", type=int, default=1, help="DiT blocks timed at full width, scaled to all 30 "
                   "(default 1)")
    p.add_argument("--encoder-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--encoder-ref-layers", type=int, default=2,
                   help="blocks of the fp32 reference encoder (24 do not fit in memory in fp32; default 2)")
    p.add_argument("--encoder-vocab", type=int, default=None, help="token table rows (default: the real 256384)")
    p.add_argument("--encoder-mode", choices=["stream", "resident"], default="stream",
                   help="text encoder blocks read from disk per call (the pipeline's default) or kept resident "
                        "(default: stream)")
    p.add_argument("--decode-latents", default="paper:5,device:7",
                   help="latent frames decoded per shape, SHAPE:N,... (default 'paper:5,device:7'; others: all)")
    p.add_argument("--profile-shape", default="device",
                   help="shape of the per-op DiT and decoder profiles ('none' to skip; default: device)")
    p.add_argument("--profile-model", default="lightning",
                   help="DiT profiled op by op, one of --models (default: lightning)")
    p.add_argument("--matmul-n", type=int, default=4096, help="matrix size of the matmul-rate check (default 4096)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="MLX device (gpu: Metal or CUDA; the "
                   "reference then runs on CUDA; default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype for both runtimes (default: float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--cache-dir", default=None,
                   help="keep the random INT4 UMT5 folder here and reuse it (building it takes minutes; default: "
                        "a temporary folder, removed after)")
    p.add_argument("--note", action="append", default=None, help="a note to carry into the report (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--verbose", action="store_true", help="also print the whole Markdown report")
    # Device runs: options that bring in results measured elsewhere go here and are merged in `collect`.
    from benchmarks.device_import import add_import_argument

    add_import_argument(p)  # --import FILE


def _apply_quick(args) -> None:
    args.shapes, args.models, args.wan_shapes = "tiny", "tiny", ""
    args.denoise_shapes, args.repeats, args.denoise_repeats = "tiny", 1, 0
    args.profile_shape, args.profile_model, args.matmul_n = "tiny", "tiny", 512
    args.decode_latents, args.shape_repeats = "", ""


def _names(flag: str, text: str, allowed, extra=()) -> list[str]:
    names = [s.strip() for s in str(text or "").split(",") if s.strip()]
    bad = [n for n in names if n not in allowed and n not in extra]
    if bad:
        raise UsageError(f"{flag}: unknown {'value' if len(bad) == 1 else 'values'} {', '.join(map(repr, bad))}; "
                         f"choose from {', '.join(allowed)}")
    return names


def _per_shape(flag: str, text: str) -> dict[str, int]:
    out = {}
    for item in [i for i in str(text or "").split(",") if i.strip()]:
        k, _, v = item.partition(":")
        k = k.strip()
        if k not in SHAPES:
            raise UsageError(f"{flag}: unknown shape {k!r} in {item!r}; use SHAPE:N with SHAPE from "
                             f"{', '.join(SHAPES)}")
        try:
            n = int(v)
        except ValueError:
            raise UsageError(f"{flag}: {item!r} is not SHAPE:N with a whole number N") from None
        if n < 1:
            raise UsageError(f"{flag}: {item!r}: N must be >= 1")
        out[k] = n
    return out


def _parse(args) -> None:
    """Validate and normalise every option before any work (usage errors: exit 2)."""
    if args.quick:
        _apply_quick(args)
    if args.stages is None:
        args.stages = "model" if args.model else DEFAULT_STAGES
    if args.shapes is None:
        args.shapes = MODEL_DEFAULT_SHAPES if args.model else DEFAULT_SHAPES
    args.stages_list = _names("--stages", args.stages, list(STAGES))
    if not args.stages_list:
        raise UsageError(f"--stages is empty; choose from {', '.join(STAGES)}")
    if "model" in args.stages_list and not args.model:
        raise UsageError("--stages model times a model folder: give it with --model DIR")
    if args.model and "model" not in args.stages_list:
        raise UsageError(f"--model {args.model} is timed by the 'model' stage; add it to --stages")
    args.shapes_list = _names("--shapes", args.shapes, list(SHAPES))
    args.wan_shapes_list = _names("--wan-shapes", args.wan_shapes, list(SHAPES))
    args.denoise_shapes_list = _names("--denoise-shapes", args.denoise_shapes, list(SHAPES))
    args.models_list = _names("--models", args.models, list(DIT_MODELS), extra=("tiny",))
    if args.profile_shape not in SHAPES and args.profile_shape != "none":
        raise UsageError(f"--profile-shape: unknown shape {args.profile_shape!r}; choose from "
                         f"{', '.join(SHAPES)} or none")
    for flag, value, low in (("--repeats", args.repeats, 1), ("--denoise-repeats", args.denoise_repeats, 0),
                             ("--dit-layers", args.dit_layers, 1), ("--encoder-tokens", args.encoder_tokens, 1),
                             ("--encoder-ref-layers", args.encoder_ref_layers, 1), ("--matmul-n", args.matmul_n, 1),
                             ("--encoder-vocab", args.encoder_vocab, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    args.decode_latents = _per_shape("--decode-latents", args.decode_latents)
    args.shape_repeats = _per_shape("--shape-repeats", args.shape_repeats)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.model:
        from mlx_video.utils import resolve_model_path

        args.model_path = resolve_model_path(args.model)  # ModelFolderError: a clear message, exit 1
    from benchmarks.device_import import load_device_run

    args.device_runs = [load_device_run(f) for f in getattr(args, "import_files", None) or []]  # bad: exit 2
    _check_out(Path(args.out))


def _check_out(out: Path) -> None:
    import os

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    parent = out if out.exists() else out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


def collect(args) -> dict:
    """Run the suite; returns the results dict (what ``bench.json`` holds)."""
    import mlx.core as mx

    from benchmarks.derive import derive

    _parse(args)
    if args.device == "gpu":
        from mlx_video.utils import gpu_available

        if not gpu_available():
            raise UsageError("--device gpu: this MLX build has no GPU backend (install mlx[cuda] or use a Mac)")
        mx.set_default_device(mx.gpu)
    mlx_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[args.dtype]
    torch_side = None
    if not args.no_reference and set(args.stages_list) - {"model"}:
        _reference_modules()
        torch_side = TorchSide(args.device, args.dtype)
    started = time.perf_counter()
    results = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "command": "mlx-video bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
               "mode": "quick" if args.quick else "full", "machine": machine_info(args.label),
               "backend": backend_info(args, torch_side), "versions": versions(),
               "settings": {k: getattr(args, k) for k in ("shapes", "stages", "models", "wan_shapes", "denoise_shapes",
                                                          "repeats", "shape_repeats", "denoise_repeats", "dit_layers",
                                                          "encoder_tokens", "encoder_mode",
                                                          "encoder_ref_layers", "decode_latents", "seed", "dtype",
                                                          "device", "no_reference", "model")},
               "flops_convention": "2 FLOPs per multiply-add of every matmul/conv; elementwise work not counted; "
                                   "model FLOPs as the architecture defines them (text K/V each DiT step, TGrow "
                                   "after the upsample), the same figure for both runtimes",
               "stages": [], "notes": []}
    stages = args.stages_list
    with tempfile.TemporaryDirectory(prefix="mlx-video-bench-") as tmp:
        work = Path(tmp)
        if "matmul" in stages:
            print("[bench] matmul rate", file=sys.stderr, flush=True)
            results["matmul"] = bench_matmul(args.matmul_n, max(3, args.repeats), torch_side, mlx_dtype)
        if "encode" in stages:
            from benchmarks.text import bench_encoder

            bench_encoder(args, args.quick, torch_side, mlx_dtype, work, results)
        if "dit" in stages:
            from benchmarks.dit import bench_dit

            for model in args.models_list:
                shapes = args.shapes_list if model != "wan2.1-1.3b" else args.wan_shapes_list
                if shapes:
                    bench_dit(args, model, shapes, torch_side, mlx_dtype, work, results)
        if "decode" in stages:
            from benchmarks.decoder import bench_decoder

            bench_decoder(args, args.quick, args.shapes_list, torch_side, mlx_dtype, work, results)
        if "vae" in stages:
            from benchmarks.decoder import bench_wan_vae

            bench_wan_vae(args, args.quick, args.shapes_list, torch_side, mlx_dtype, work, results)
        if "causal" in stages:
            from benchmarks.causal import bench_causal

            bench_causal(args, args.quick, args.shapes_list, torch_side, mlx_dtype, work, results)
        if "model" in stages:
            from benchmarks.model_folder import bench_model_folder

            bench_model_folder(args, args.model_path, args.shapes_list, work, results)
        if "matmul" in stages:
            results["matmul_end"] = bench_matmul(args.matmul_n, max(3, args.repeats), torch_side, mlx_dtype)
            drift = results["matmul_end"]["peak_flops_per_s"] / results["matmul"]["peak_flops_per_s"] - 1
            results["matmul"]["drift_start_to_end"] = drift
    # Stages measured elsewhere (e.g. imported from a device run) join results["stages"] here, before deriving.
    from benchmarks.device_import import merge

    merge(results, getattr(args, "device_runs", []))
    derive(results, args)
    results["notes"] += list(args.note or [])
    results["machine"]["load_avg_end"] = _load()
    results["wall_seconds"] = time.perf_counter() - started
    return results


def write_outputs(results: dict, out: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in ``out``, each written whole (temporary file, then renamed)."""
    from benchmarks import report

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in (("bench.json", json.dumps(results, indent=2, default=json_default) + "\n"),
                       ("bench.md", report.markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        written[name] = out / name
    chart = report.chart(results, out / "bench.png")
    if chart:
        written["bench.png"] = chart
    return written


def run(args) -> int:
    from benchmarks import report

    results = collect(args)
    written = write_outputs(results, Path(args.out))
    if args.verbose:
        print(report.markdown(results))
    else:
        print("\n".join(report.short_summary(results)))
    print("wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """``python -m benchmarks.run``: the same options as ``mlx-video bench``, with the same exit codes."""
    from mlx_video.cli import run_command

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.command = "bench"
    return run_command(run, args)
