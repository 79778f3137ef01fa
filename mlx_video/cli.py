"""``mlx-video`` command line: one subcommand per task, each defined next to the code it runs.

A subcommand module exposes ``add_parser(subparsers)``, which registers its arguments and sets
``func(args) -> int``. Modules are imported only when their command runs, so ``--help`` stays fast.

Exit status, the same for every command: 0 success; 2 a usage error (a bad flag value or combination,
``UsageError`` or argparse's own checks), found before any work; 1 a runtime failure (``UserError`` and its
kinds, ``OSError``, a failed generation); 130 interrupted. A user's mistake is one line on stderr, never a
traceback; only a bug in mlx-video shows one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

import mlx_video  # noqa: F401  (fast BLAS before MLX)
from mlx_video.utils import UsageError, UserError

# name -> (module, one-line help). Later commands slot in here.
COMMANDS = {
    "convert": ("converters.convert", "convert PyTorch checkpoints into an MLX model folder"),
    "info": ("mlx_video.info", "describe a converted model folder"),
    "generate": ("mlx_video.generate", "generate a video from a text prompt"),
    "bench": ("benchmarks.cli", "benchmark latency and memory per stage"),
    "prune": ("mlx_video.prune", "Taylor-prune attention heads and FFN channels of a DiT"),
    "export-swift": ("swift_bridge.export", "export an mlx-swift package (code, weights, golden tests)"),
    "demo": ("mlx_video.demo", "build a tiny RANDOM-WEIGHT model folder (coloured noise; for pipeline tests)"),
    "recipe": ("mlx_video.recipe.cli", "train a small model on the synthetic shapes world"),
    "eval": ("mlx_video.recipe.evaluate", "score a model's prompt faithfulness on the shapes world"),
}

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends ``(default: X)`` to an option's help unless the help already
    says its default or there is none to show (``None``, ``False``, suppressed)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if "default" in text.lower() or nothing or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-video",
        description="On-device text-to-video with MLX: convert Wan-family checkpoints, generate MP4s, "
        "benchmark, prune and export to mlx-swift.",
        epilog="first try: mlx-video generate --prompt 'a red circle moving right on a black background' (without "
        "--model: the built-in toy Lightning Video, trained by `mlx-video recipe` on a world of coloured shapes; "
        "64x64, 17 frames, 4 steps). Exit status: 0 done, 1 failed while running, 2 usage error (nothing ran).",
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
        return EXIT_USAGE
    return run_command(args.func, args)


def run_command(func, args) -> int:
    """Run ``func(args)`` with the exit-status policy above (shared by ``python -m`` entry points)."""
    prog = f"mlx-video {args.command}"
    saved_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    from mlx_video import fsio

    fsio.acquire_signal_guard()  # SIGTERM/SIGHUP raise fsio.Interrupted: cleanup runs as for Ctrl-C
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"{prog}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)  # 128 + signal number for SIGTERM/SIGHUP
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (`| head`): stop quietly, like a process killed by SIGPIPE
        return EXIT_BROKEN_PIPE
    except UsageError as exc:
        print(f"{prog}: error: {exc} (see `{prog} --help`)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - user-facing errors are printed without a traceback
        from mlx_video.video import GenerationFailed

        if isinstance(exc, GenerationFailed):
            print(f"{prog}: error: generation failed in {exc.stage or 'a stage'}: {exc.reason}", file=sys.stderr)
            return EXIT_FAILURE
        if isinstance(exc, (UserError, ValueError, OSError)):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if isinstance(exc, MemoryError):
            print(f"{prog}: error: out of memory ({exc or 'an allocation failed'}); try a smaller job or "
                  "--memory-limit / --low-memory", file=sys.stderr)
            return EXIT_FAILURE
        raise
    finally:
        warnings.formatwarning = saved_format
        fsio.release_signal_guard()
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()


def add_model_arguments(p: argparse.ArgumentParser, what: str = "model folder") -> None:
    """``--model DIR`` and, as an alias kept for older scripts, a positional MODEL (read with ``model_argument``)."""
    p.add_argument("model_dir", nargs="?", metavar="MODEL", help=f"{what}; the same as --model")
    p.add_argument("--model", default=None, help=f"{what} (from `mlx-video convert` or `mlx-video demo`), or a "
                   "Hugging Face repo id in the local cache")


def model_argument(args) -> str:
    """``--model`` or the positional MODEL (``UsageError`` if two differ); neither: the built-in model."""
    if args.model and args.model_dir and args.model != args.model_dir:
        raise UsageError(f"two models given ({args.model_dir} and --model {args.model}); give one")
    model = args.model or args.model_dir
    if not model:
        from mlx_video.default_model import path as default_model

        return str(default_model())  # the toy Lightning Video shipped inside the package
    return model


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one line, no Python source (they are for users, not developers)."""
    return f"mlx-video: warning: {message}\n"


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
