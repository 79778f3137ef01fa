"""mlx-video: on-device text-to-video with MLX.

Data flow (one file per step): prompt -> ``tokenizer.py`` (token ids) -> ``models/umt5.py`` (text
embeddings) -> ``sampling.py`` + ``models/wan_dit.py`` (latents) -> ``models/taehv.py`` (frames) ->
``video.py`` (MP4). ``pipeline.py`` runs the stages one at a time with a memory budget.
"""

from .blas import ensure_fast_blas as _ensure_fast_blas

_ensure_fast_blas()  # must run before the first `import mlx`

__version__ = "0.1.0"
