import mlx_video  # noqa: F401  (fast BLAS must load before any test imports mlx)
