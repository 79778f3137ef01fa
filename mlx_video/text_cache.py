"""On-disk prompt-embedding cache: a repeated prompt skips the text encoder entirely.

One file per prompt, ``<sha256>.safetensors``, holding the fp32 encoder rows of the real tokens
(``[n_tokens, dim]``; the zero padding to ``text_len`` is not stored). The key hashes the encoder
identity (weights fingerprint, tokenizer hash, compute dtype, text length) and the cleaned prompt.
Writes are atomic (temporary file + rename); a file that is unreadable, truncated, of the wrong shape,
non-finite or written for another key is treated as a miss and removed, never returned.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np

CACHE_VERSION = "1"
MAX_HEADER_BYTES = 4096  # our entries' headers are ~150 bytes


class EmbeddingCache:
    def __init__(self, folder: str | os.PathLike, encoder_id: str):
        self.folder = Path(folder).expanduser()
        self.encoder_id = encoder_id
        self.hits = self.misses = 0

    def key(self, cleaned_prompt: str) -> str:
        h = hashlib.sha256()
        for part in (CACHE_VERSION, self.encoder_id, cleaned_prompt):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str, n_tokens: int, dim: int) -> mx.array | None:
        """The cached ``[n_tokens, dim]`` fp32 rows, or None (missing or unusable file, which is removed)."""
        path = self.path(key)
        try:
            info = path.lstat()
        except OSError:
            self.misses += 1
            return None
        try:
            from safetensors import safe_open

            # Only a plain file of plausible size: a FIFO would block the reader, a symlink or device is not ours.
            if not stat.S_ISREG(info.st_mode) or info.st_size > 64 + 4 * n_tokens * dim + MAX_HEADER_BYTES:
                raise ValueError("not a cache entry")
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                rows = f.get_tensor("embedding")
            ok = (meta.get("key") == key and rows.dtype == np.float32 and rows.shape == (n_tokens, dim)
                  and bool(np.isfinite(rows).all()))
        except Exception:  # noqa: BLE001 - any unreadable file is a miss
            ok = False
        if not ok:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a folder in its place: leave it, just never read it
                pass
            self.misses += 1
            return None
        self.hits += 1
        return mx.array(rows)

    def put(self, key: str, rows: mx.array) -> None:
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        try:
            save_file({"embedding": np.ascontiguousarray(np.asarray(rows.astype(mx.float32)))}, str(tmp),
                      metadata={"key": key, "version": CACHE_VERSION})
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
