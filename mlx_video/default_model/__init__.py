"""The built-in model: what `mlx-video generate`, `info` and `export-swift` use when no --model is given.

A toy Lightning Video: a 4-step distilled DiT (Taylor-pruned student of the recipe's teacher, two-stage
trained, DMD-distilled), its TAEHV decoder, UMT5 text encoder and sentencepiece tokenizer, all trained in MLX
by `mlx-video recipe all` on the synthetic shapes world (64x64, 17 frames; prompts such as "a red circle
moving right on a black background"). This folder is an ordinary model folder (config.json + weights);
`python -m mlx_video.recipe.ship --model <recipe>/distilled` rewrites it.
"""

from pathlib import Path

NAME = "mlx-video toy Lightning Video (shapes world, 4 steps)"


def path() -> Path:
    """The folder of the built-in model (inside the installed package; nothing is downloaded)."""
    return Path(__file__).resolve().parent
