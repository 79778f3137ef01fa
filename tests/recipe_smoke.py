"""The recipe CLI at smoke sizes, for the recipe tests."""

from __future__ import annotations

from mlx_video import cli


def run_recipe(*args) -> int:
    """``mlx-video recipe ARGS --size smoke --quiet``; returns the exit code."""
    return cli.main(["recipe", *args, "--size", "smoke", "--quiet"])


def train_stages(out, steps: dict[str, int]) -> None:
    """Train each stage of ``steps`` (stage -> steps) into ``out``, checkpointing every 4 steps."""
    for stage, n in steps.items():
        assert run_recipe(stage, "--out", str(out), "--steps", str(n), "--checkpoint-every", "4") == 0
