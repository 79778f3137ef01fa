"""PyTorch checkpoints -> MLX model folders (config.json + safetensors)."""

import mlx_video  # noqa: F401  (loads the fast BLAS before MLX is imported)
