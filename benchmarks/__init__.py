"""Latency and memory benchmarks per stage (``mlx-video bench``)."""

import mlx_video  # noqa: F401
