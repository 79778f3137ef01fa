"""Native CPU kernels against the MLX/NumPy path they replace and PyTorch's CPU kernels, op by op.

    python -m benchmarks.native_kernels [--tokens 11154] [--repeats 3] [--out benchmarks/results/native-kernels]

Each op runs interleaved (native, MLX path, PyTorch, repeated) on the same inputs at Lightning Video's
device shape (10 heads x 128, dim 1536, FFN 4480, 11,154 tokens for 480x832x81) and TAEHV's largest
3x3 convolutions; the sgemm rate is measured in the same run so that attention's share of it is
comparable. Writes ``OUT.json`` and ``OUT.md``. Heavy: minutes on 2 cores; never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import numpy as np

from mlx_video import native, ops
from mlx_video.models import taehv

from benchmarks.common import json_default, machine_info, time_stats


def _off(fn):
    """Run ``fn`` with the native kernels switched off (the MLX/NumPy path)."""
    def run():
        saved = native._STATE.get("module")
        native._STATE["module"] = None
        try:
            return fn()
        finally:
            native._STATE["module"] = saved
    return run


def _interleaved(fns: dict, repeats: int) -> dict:
    samples = {k: [] for k in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: time_stats(v) for k, v in samples.items()}


def _mx(fn):
    return lambda: mx.eval(fn())


def cases(tokens: int, torch):
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    heads, hd, dim, ffn = 10, 128, 1536, 4480
    q, k, v = (f32(1, tokens, heads, hd) for _ in range(3))
    mq, mk, mv = (mx.array(a).transpose(0, 2, 1, 3) for a in (q, k, v))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    x, mul, add = f32(1, tokens, dim), f32(1, 1, dim), f32(1, 1, dim)
    mxx, mmul, madd = mx.array(x), mx.array(mul), mx.array(add)
    tx, tmul, tadd = (torch.from_numpy(a) for a in (x, mul, add))
    h = f32(1, tokens, ffn)
    mh, th = mx.array(h), torch.from_numpy(h)
    yield "self-attention", 4 * heads * tokens * tokens * hd, {
        "native": _mx(lambda: ops.attention(mq, mk, mv, hd ** -0.5)),
        "mlx": _off(_mx(lambda: ops.attention(mq, mk, mv, hd ** -0.5))),
        "torch": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)}
    yield "adaLN modulated LayerNorm", 0, {
        "native": _mx(lambda: ops.modulated_layer_norm(mxx, mmul, madd, 1e-6)),
        "mlx": _off(_mx(lambda: ops.modulated_layer_norm(mxx, mmul, madd, 1e-6))),
        "torch": lambda: torch.nn.functional.layer_norm(tx, (dim,), eps=1e-6) * tmul + tadd}
    yield "tanh-GELU (FFN hidden)", 0, {
        "native": _mx(lambda: ops.gelu_tanh_fresh(mh * 1.0)),
        "mlx": _off(_mx(lambda: ops.gelu_tanh_fresh(mh * 1.0))),
        "torch": lambda: torch.nn.functional.gelu(th * 1.0, approximate="tanh")}
    # TAEHV (taew2_1) at 480x832 output: the 64-channel MemBlock conv on the last stage, and its upconv
    img = f32(1, 240, 416, 64)
    w = f32(64, 3, 3, 128) * 0.05
    mimg, mw, mb = mx.array(img), mx.array(w), mx.array(f32(64))
    timg = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tpast = timg.clone()
    tw = torch.from_numpy(w).permute(0, 3, 1, 2).contiguous()
    tb = torch.from_numpy(np.array(mb))
    yield "TAEHV MemBlock conv3x3 (cat 2x64 -> 64) + ReLU, 240x416", 2 * 240 * 416 * 64 * 9 * 128, {
        "native": _mx(lambda: ops.native_conv3x3([mimg, mimg], mw, mb, relu=True)),
        "mlx": _off(_mx(lambda: mx.maximum(taehv.conv3x3([(mimg, mw[..., :64]), (mimg, mw[..., 64:])]) + mb, 0))),
        "torch": lambda: torch.relu(torch.nn.functional.conv2d(torch.cat([timg, tpast], 1), tw, tb, padding=1))}
    up = f32(1, 120, 208, 64)
    uw = f32(64, 3, 3, 64) * 0.05
    mup, muw = mx.array(up), mx.array(uw)
    layer = taehv.Conv(64, 64, bias=False)
    layer.weight = muw
    tup = torch.from_numpy(up).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tuw = torch.from_numpy(uw).permute(0, 3, 1, 2).contiguous()
    yield "TAEHV upsample x2 + conv3x3 64 -> 64, 120x208 -> 240x416", 2 * 240 * 416 * 64 * 9 * 64, {
        "native": _mx(lambda: taehv.upconv_forward(layer, mup)),
        "mlx": _off(_mx(lambda: taehv.upconv_forward(layer, mup))),
        "torch": lambda: torch.nn.functional.conv2d(torch.nn.functional.interpolate(tup, scale_factor=2.0), tuw,
                                                    padding=1)}


def sgemm_rate(repeats: int) -> float:
    a = mx.random.normal((2048, 2048))
    mx.eval(a)
    best = min(_interleaved({"mm": _mx(lambda: a @ a)}, repeats)["mm"]["samples_s"])
    return 2 * 2048**3 / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.native_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=11154, help="self-attention tokens (default: 11154, 480x832x81)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per op (default: 3)")
    p.add_argument("--out", default="benchmarks/results/native-kernels", help="output path without extension")
    args = p.parse_args(argv)
    if not native.enabled():
        p.error(native.describe())
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rate = sgemm_rate(args.repeats)
    rows = []
    for name, flops, fns in cases(args.tokens, torch):
        stats = _interleaved(fns, args.repeats)
        med = {k: s["median_s"] for k, s in stats.items()}
        row = {"op": name, "flops": flops, "seconds": stats,
               "native_vs_torch": med["native"] / med["torch"], "native_vs_mlx": med["native"] / med["mlx"]}
        if flops:
            row["native_share_of_sgemm"] = flops / med["native"] / rate
        rows.append(row)
        print(f"{name}: native {med['native']:.3f} s, MLX path {med['mlx']:.3f} s, torch {med['torch']:.3f} s")
    report = {"machine": machine_info(None), "native": native.describe(), "sgemm_flops_per_s": rate,
              "tokens": args.tokens, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=json_default))
    lines = [f"# Native CPU kernels ({report['native']})", "",
             f"sgemm 2048^3: {rate / 1e9:.0f} GFLOP/s; self-attention at {args.tokens} tokens, 10 x 128 heads; "
             f"median of {args.repeats} interleaved runs.", "",
             "| op | native s | MLX path s | PyTorch s | native / PyTorch | native / MLX path | share of sgemm rate |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        share = f"{r['native_share_of_sgemm']:.2f}" if "native_share_of_sgemm" in r else "-"
        lines.append(f"| {r['op']} | {s['native']['median_s']:.3f} | {s['mlx']['median_s']:.3f} | {s['torch']['median_s']:.3f} "
                     f"| {r['native_vs_torch']:.2f} | {r['native_vs_mlx']:.2f} | {share} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
