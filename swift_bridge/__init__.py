"""Generate mlx-swift code, weights and golden tests from mlx-video model folders."""

import mlx_video  # noqa: F401
