"""``mlx-video`` command line: one subcommand per task, each defined next to the code it runs.

A subcommand module exposes ``add_parser(subparsers)``, which registers its arguments and sets
``func(args) -> int``. Modules are imported only when their command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import mlx_video  # noqa: F401  (fast BLAS before MLX)

# name -> (module, one-line help). Later commands slot in here.
COMMANDS = {
    "convert": ("converters.convert", "convert PyTorch checkpoints into an MLX model folder"),
    "info": ("mlx_video.info", "describe a converted model folder"),
    "generate": ("mlx_video.generate", "generate a video from a text prompt"),
    "bench": ("benchmarks.run", "benchmark latency and memory per stage"),
    "prune": ("mlx_video.prune", "Taylor-prune attention heads and FFN channels of a DiT"),
    "export-swift": ("swift_bridge.export", "export an mlx-swift package (code, weights, golden tests)"),
    "demo": ("mlx_video.demo", "build a tiny random-weight model folder to try the pipeline"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-video",
        description="On-device text-to-video with MLX: convert Wan-family checkpoints, generate MP4s, "
        "benchmark, prune and export to mlx-swift.",
    )
    parser.add_argument("--version", action="version", version=f"mlx-video {mlx_video.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if wanted == name:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):
                    sub.add_parser(name, help=help_text + " (not available in this build)")
                    continue
                raise
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2 if args.command is None else 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors are printed without a traceback
        from converters.common import ConversionError
        from mlx_video.utils import ModelFolderError

        if isinstance(exc, (ConversionError, ModelFolderError, ValueError, FileNotFoundError)):
            print(f"mlx-video {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
