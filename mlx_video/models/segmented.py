"""Streaming over decoder segments, shared by the TAEHV and Wan VAE decoders.

Both decoders are cut into segments (one per spatial upsample) and run one latent frame at a time; a segment
that multiplies frames (a temporal upsample) hands each of its output frames to the rest before producing
the next, so only one frame group per segment is alive at once.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import mlx.core as mx


def depth_first(run_segment: Callable[[int, mx.array], mx.array], n_segments: int, x: mx.array,
                k: int = 0) -> Iterator[mx.array]:
    """Segment ``k`` on one frame ``x [B, 1, ...]``, then each of its output frames through segments k+1..,
    depth first; yields the last segment's outputs in order."""
    y = run_segment(k, x)
    if k + 1 == n_segments:
        yield y
        return
    for f in range(y.shape[1]):
        yield from depth_first(run_segment, n_segments, y[:, f:f + 1], k + 1)


def stream_chunks(stream, latents: mx.array | Iterable[mx.array], check: Callable[[mx.array], None],
                  per_latent: bool) -> Iterator[mx.array]:
    """Feed ``latents`` (an array ``[B, T, ...]`` or an iterable of such chunks) to a decoder stream one latent
    frame at a time. Yields single frames ``[B, H, W, 3]`` as ``stream.frames`` finishes them, or with
    ``per_latent=True`` one ``stream.step`` group ``[B, n, H, W, 3]`` per latent frame."""
    chunks = [latents] if isinstance(latents, mx.array) else latents
    for chunk in chunks:
        check(chunk)
        for t in range(chunk.shape[1]):
            if per_latent:
                yield stream.step(chunk[:, t:t + 1])
                continue
            for group in stream.frames(chunk[:, t:t + 1]):
                for k in range(group.shape[1]):
                    yield group[:, k]
