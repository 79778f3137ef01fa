"""Figures for the INT4 UMT5-xxl text encoder (issue #3): bytes on disk, peak memory, encode time.

Builds the encoder at real shapes (vocab 256384, dim 4096, 64 heads, FFN 10240, 24 layers) with random
bf16 weights generated tensor by tensor, straight into an INT4 model folder through the converter's
streaming writer (the 22 GB fp32 / 11.4 GB bf16 model is never materialised; conversion peak is about
one projection). Then, each in a fresh process so that its peak is its own, loads the folder and encodes
one prompt of ``--tokens`` tokens: resident (all INT4 blocks in memory) and streamed (one block at a
time). Token-embedding rows are read from the memory-mapped file in both. Prints JSON::

    python -m benchmarks.umt5_xxl                       # full size: ~4.7 GB disk, a quiet machine
    python -m benchmarks.umt5_xxl --layers 2 --vocab 32000 --tokens 128   # reduced smoke run

Peak memory is reported as MLX's ``mx.get_peak_memory()`` (all MLX buffers) and the process's peak RSS
(``VmHWM``; includes Python and imports and the touched pages of the mapped file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import numpy as np

from converters.common import atomic_model_folder, update_config
from converters.umt5 import quantization_settings, write_text_encoder
from mlx_video.models import umt5
from mlx_video.utils import config_to_dict


class RandomSource:
    """Deterministic random bf16 weights at the model's shapes, generated one tensor (or row chunk) at a time."""

    def __init__(self, config: umt5.UMT5Config, seed: int = 0):
        self.config, self.seed = config, seed
        c = config
        self.shapes = {"token_embedding.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
        for i in range(c.num_layers):
            for n, (o, k) in umt5._linear_shapes(c).items():
                self.shapes[f"blocks.{i}.{n}.weight"] = (o, k)
            self.shapes[f"blocks.{i}.pos_embedding.weight"] = (c.num_buckets, c.num_heads)
            self.shapes[f"blocks.{i}.norm1.weight"] = (c.dim,)
            self.shapes[f"blocks.{i}.norm2.weight"] = (c.dim,)

    def _key(self, name: str, start: int = 0):
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}:{start}".encode()).digest()[:4], "little")
        return mx.random.key(h)

    def tensor(self, name: str) -> mx.array:
        shape = self.shapes[name]
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            return 1.0 + 0.1 * mx.random.normal(shape, key=self._key(name))
        std = 0.5 if "pos_embedding" in name else float(1.0 / np.sqrt(shape[1]))
        return (std * mx.random.normal(shape, key=self._key(name))).astype(mx.bfloat16)

    def rows(self, name: str, start: int, stop: int) -> mx.array:
        return mx.random.normal((stop - start, self.shapes[name][1]), key=self._key(name, start)).astype(mx.bfloat16)


def peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM; ru_maxrss would include the parent's across exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build(folder: Path, config: umt5.UMT5Config) -> dict:
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with atomic_model_folder(folder) as tmp:
        facts = write_text_encoder(RandomSource(config), config, tmp, "bfloat16", {"source_layout": "random"},
                                   progress=True)
        section = config_to_dict(config)
        section.update(weights_file=umt5.WEIGHTS_NAME, dtype="bfloat16", source_layout="random", **facts,
                       summary="random weights at UMT5-xxl shapes (benchmark)")
        update_config(tmp, None, "text_encoder", section)
    return {"seconds": round(time.perf_counter() - t0, 1), "mlx_peak_bytes": mx.get_peak_memory(),
            "rss_peak_bytes": peak_rss_bytes(), "file_bytes": facts["file_bytes"]}


def encode_child(folder: Path, tokens: int, stream: bool, repeat: int) -> dict:
    """Runs in a fresh process: load, encode ``tokens`` tokens, report time and peaks."""
    base_rss = peak_rss_bytes()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    enc = umt5.load(folder, stream=stream)
    load_s = time.perf_counter() - t0
    resident = mx.get_active_memory()
    rng = np.random.default_rng(0)
    ids = list(rng.integers(3, enc.config.vocab_size - 100, size=tokens - 1)) + [enc.config.eos_id]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = enc.encode_tokens([ids])
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    row = np.array(out[0, :tokens])
    return {"mode": "stream" if stream else "resident", "tokens": tokens, "load_seconds": round(load_s, 2),
            "encode_seconds": [round(t, 2) for t in times], "resident_after_load_bytes": resident,
            "mlx_peak_bytes": mx.get_peak_memory(), "rss_peak_bytes": peak_rss_bytes(),
            "rss_before_load_bytes": base_rss, "output_finite": bool(np.isfinite(row).all()),
            "output_rms": float(np.sqrt((row ** 2).mean())),
            "zeros_after_prompt": bool(not np.array(out[0, tokens:]).any())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=256384)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--q-embedding", action="store_true", help="also quantize the token embedding")
    p.add_argument("--repeat", type=int, default=1, help="encodes per mode (the first includes warm-up)")
    p.add_argument("--modes", default="stream,resident", help="comma-separated: stream, resident")
    p.add_argument("--folder", default=None, help="where to build the model folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the built folder")
    p.add_argument("--encode-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.encode_child:
        print(json.dumps(encode_child(Path(args.encode_child), args.tokens, args.stream, args.repeat)))
        return 0
    config = umt5.UMT5Config(vocab_size=args.vocab, num_layers=args.layers)
    config.quantization = quantization_settings(args.bits, args.group_size, "", args.q_embedding, config)
    scratch = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="umt5_xxl_")) / "model"
    report = {"config": {k: v for k, v in config_to_dict(config).items() if k != "model_type"},
              "parameters": config.vocab_size * config.dim + config.dim
              + config.num_layers * (sum(o * i for o, i in umt5._linear_shapes(config).values())
                                     + 2 * config.dim + config.num_buckets * config.num_heads)}
    try:
        report["build"] = build(scratch, config)
        report["bytes_on_disk"] = sum(f.stat().st_size for f in scratch.iterdir())
        report["bf16_bytes_for_comparison"] = report["parameters"] * 2
        report["encode"] = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            cmd = [sys.executable, "-m", "benchmarks.umt5_xxl", "--encode-child", str(scratch), "--tokens",
                   str(args.tokens), "--repeat", str(args.repeat)] + (["--stream"] if mode == "stream" else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if res.returncode:
                raise RuntimeError(f"encode child failed:\n{res.stderr[-3000:]}")
            entry = json.loads(res.stdout.strip().splitlines()[-1])
            entry["predicted_peak_bytes"] = umt5.text_encoder_peak_bytes(config, args.tokens, 1,
                                                                         stream=mode == "stream")
            report["encode"].append(entry)
    finally:
        if not args.keep:
            shutil.rmtree(scratch if args.folder else scratch.parent, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
