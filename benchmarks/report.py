"""``bench.json`` -> a Markdown report and a PNG chart.

    python -m benchmarks.report bench-results/bench.json            # rewrites bench.md and bench.png beside it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GB = 1024**3
MB = 1024**2


def _s(v) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:.0f} s"
    if v >= 1:
        return f"{v:.2f} s"
    return f"{v * 1000:.1f} ms"


def _b(v) -> str:
    if v is None:
        return "–"
    if v >= GB:
        return f"{v / GB:.2f} GB"
    return f"{v / MB:.0f} MB" if v >= 10 * MB else f"{v / MB:.2f} MB"


def _f(v) -> str:
    if v is None:
        return "–"
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f}"


def _shape(s: dict) -> str:
    v = s.get("video")
    return f"{s['shape']} ({v[0]}x{v[1]}x{v[2]})" if v else s["shape"]


def _timed(side: dict | None) -> str:
    if not side or "time" not in side:
        return "–"
    t = side["time"]
    return f"{_s(t['median_s'])} ({_s(t['min_s'])}–{_s(t['max_s'])}, n={t['repeats']})"


def _how(s: dict) -> str:
    if s["stage"] == "dit_step" or s["stage"] == "denoise_4_steps":
        return f"{s['layers_timed']}/{s['layers_total']} blocks" + (" (scaled)" if s["layers_timed"] != s["layers_total"] else "")
    if s["stage"] in ("decode", "vae_decode"):
        t, total = s["latent_frames_timed"], s["latent"][1]
        return f"{t}/{total} latents" + (" (scaled)" if t != total else "")
    if s["stage"] == "text_encoding":
        r = s.get("reference", {}).get("layers_timed")
        return f"{s['tokens']} tokens; MLX all {s['layers_total']} blocks" + (
            f"; ratio on {r}/{s['layers_total']} blocks, ref scaled" if r and r != s["layers_total"] else "")
    if s.get("device"):  # imported with --import (benchmarks/device_import.py)
        fp = s.get("mlx", {}).get("memory", {}).get("footprint_bytes")
        return f"device run on {s['device']} (imported)" + (f"; footprint {_b(fp)}" if fp else "")
    if s["stage"].startswith("model:"):
        return "your model folder, whole pipeline"
    return "composed"


def short_summary(results: dict) -> list[str]:
    """A few lines for the terminal: one per stage (MLX time, ratio to PyTorch, peak) and the targets missed."""
    lines = []
    mm = results.get("matmul")
    if mm:
        lines.append(f"matmul rate: {mm['peak_flops_per_s'] / 1e9:.0f} GFLOP/s")
    for s in results["stages"]:
        m = s.get("mlx", {})
        t = m.get("full_model_time_s", m.get("time", {}).get("median_s"))
        ratio = s.get("ratio", {})
        rv = ratio.get("median", ratio.get("of_medians"))
        peak = m.get("memory", {}).get("mlx_peak_bytes")
        lines.append(f"{s['stage']:16s} {s['model']:14s} {_shape(s):26s} {_s(t):>9s}"
                     + (f"  MLX/PyTorch {rv:.2f}" if rv is not None else "")
                     + (f"  peak {_b(peak)}" if peak else ""))
    missed = [t for t in results.get("targets", []) if not t["met"]]
    if results.get("targets"):
        lines.append(f"targets: {len(results['targets']) - len(missed)} of {len(results['targets'])} met"
                     + (" (missed: " + "; ".join(f"{t['target']} {t['model']} {t['shape']}" for t in missed[:4])
                        + (" ..." if len(missed) > 4 else "") + ")" if missed else ""))
    return lines


def summary_table(results: dict) -> list[str]:
    lines = ["| stage | model | shape | timed on | MLX timed: median (min–max) | PyTorch timed | ratio MLX/ref "
             "(median of pairs) | MLX full model | PyTorch full model | model FLOPs | MLX FLOP/s | MLX MFU | "
             "MLX peak (MLX counter) | peak RSS growth MLX / ref |",
             "|" + "---|" * 14]
    for s in results["stages"]:
        m, r = s.get("mlx", {}), s.get("reference", {})
        ratio = s.get("ratio", {})
        rv = ratio.get("median", ratio.get("of_medians"))
        rtxt = "–" if rv is None else (f"**{rv:.2f}**" + (f" ({ratio['min']:.2f}–{ratio['max']:.2f})"
                                                         if "min" in ratio else ""))
        mem = m.get("memory", {})
        rmem = r.get("memory", {})
        timed_mlx = _timed(s.get("mlx_subset")) if s["stage"] == "text_encoding" and "mlx_subset" in s else None
        lines.append("| " + " | ".join([
            s["stage"], s["model"], _shape(s), _how(s),
            _timed(m) + (f"; {r.get('layers_timed')} blocks: {timed_mlx}" if timed_mlx else ""), _timed(r), rtxt,
            _s(m.get("full_model_time_s")), _s(r.get("full_model_time_s")),
            _f(s.get("flops", {}).get("full_model")),
            _f(m.get("achieved_flops_per_s")) + ("FLOP/s" if m.get("achieved_flops_per_s") else ""),
            f"{m['mfu']:.2f}" if "mfu" in m else "–",
            _b(mem.get("mlx_peak_bytes")),
            f"{_b(mem.get('rss_growth_bytes'))} / {_b(rmem.get('rss_growth_bytes'))}" if mem or rmem else "–",
        ]) + " |")
    return lines


def markdown(results: dict) -> str:
    mach, be, ver = results["machine"], results["backend"], results["versions"]
    title = mach.get("label") or mach.get("cpu_model") or mach.get("machine")
    out = [f"# mlx-video benchmark: {title}", ""]
    out.append(f"- **Machine**: {mach.get('cpu_model', '?')}, {mach.get('cpus')} CPUs, "
               f"{_b(mach.get('memory_bytes'))} RAM, {mach.get('platform')}; load average at start "
               f"{mach.get('load_avg_start')}, at end {mach.get('load_avg_end')}")
    blas = be.get("blas", {})
    ref = be.get("reference") or {}
    out.append(f"- **Backend**: MLX on `{be.get('mlx_device')}`, {be.get('dtype')}, BLAS {blas.get('kind')} "
               f"({blas.get('library') or blas.get('reason')}); reference: PyTorch on {ref.get('device', '–')} "
               f"({ref.get('threads', '–')} threads)")
    out.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    out.append(f"- **Run**: `{results.get('command')}` ({results.get('mode')} mode), {results.get('created')}, "
               f"{results.get('wall_seconds', 0):.0f} s wall")
    out.append(f"- **FLOPs**: {results.get('flops_convention')}")
    out.append("- **How to read**: times are wall clock, warm-up excluded; MLX and PyTorch runs alternate, so the "
               "ratio (median of per-pair ratios, MLX/PyTorch; < 1 means MLX is faster) is robust to load from other "
               "processes, absolute times are not. *Full model* = the timed subset scaled by the FLOP ratio where a "
               "subset was timed (column *timed on*). Peak memory: MLX's own counter (resident weights included) and the "
               "growth of the process's peak RSS during the first (probed) run, which leaves out weights loaded "
               "before it (all but the text encoder, whose load is part of its stage). PyTorch has no CPU memory "
               "counter, so its column is RSS growth only.")
    out.append("")
    mm = results.get("matmul")
    if mm:
        parts = [f"{k} {v['median_flops_per_s'] / 1e9:.0f} GFLOP/s" for k, v in mm.items() if isinstance(v, dict)
                 and "median_flops_per_s" in v]
        end = results.get("matmul_end", {})
        out.append(f"**Machine matmul rate** ({mm['n']}x{mm['n']} fp32, median): {', '.join(parts)}; limit used for "
                   f"MFU: **{mm['peak_flops_per_s'] / 1e9:.0f} GFLOP/s**" + (
                       f"; at the end of the run: {end['peak_flops_per_s'] / 1e9:.0f} GFLOP/s "
                       f"({100 * mm.get('drift_start_to_end', 0):+.0f}%)" if end else ""))
        out.append("")
    out += ["## Stages", ""] + summary_table(results) + [""]
    methods = sorted({s.get("method", "") for s in results["stages"] if s.get("method")})
    if methods:
        out += ["Methods:", ""] + [f"- {m}" for m in methods] + [""]
    parity = [(s["stage"], s["model"], s["shape"], s.get("parity_rel_error", s.get("parity_max_abs_diff")))
              for s in results["stages"] if "parity_rel_error" in s or "parity_max_abs_diff" in s]
    if parity:
        out.append("Same function check (MLX vs reference output on the benchmark inputs): " + "; ".join(
            f"{a} {b} {c}: {v:.1e}" for a, b, c, v in parity) + " (DiT/encoder: max relative error; decode: max abs "
            "pixel difference).")
        out.append("")
    for s in results["stages"]:
        if s["stage"] == "text_encoding" and "mlx_subset" in s:
            q, d, r = s["mlx_subset"]["time"], s.get("mlx_subset_fp32_weights", {}).get("time"), s["reference"]["time"]
            rf = s.get("ratio_fp32_weights", {})
            out.append(f"Text encoder detail ({s['mlx_subset']['layers_timed']} blocks, {s['tokens']} tokens): MLX INT4 "
                       f"{_s(q['median_s'])}" + (f", MLX with the same weights stored fp32 {_s(d['median_s'])} (ratio "
                                                f"{rf.get('median', 0):.2f})" if d else "")
                       + f", PyTorch fp32 {_s(r['median_s'])}; dequantizing INT4" + (" (and reading each block: streamed mode)"
                                                               if s.get("mode", "").startswith("streamed") else "")
                       + f" on every call is {100 * s.get('profile', {}).get('int4_dequantize_share', 0):.0f}% of "
                       f"MLX's time.")
            out.append("")
    from benchmarks.causal import markdown_lines as causal_lines

    out += causal_lines(results)
    tg = results.get("targets", [])
    if tg:
        out += ["## Targets", "", "| target | model | case | value | met | note |", "|---|---|---|---|---|---|"]
        for t in tg:
            out.append(f"| {t['target']} | {t['model']} | {t['shape']} | {t['value']:.3f} | "
                       f"{'yes' if t['met'] else '**no**'} | {t.get('note', '')} |")
        out.append("")
        whys = results.get("why") or {}
        if whys:
            out += ["Why the missed ones are missed (profiles and memory figures from this run):", ""]
            out += [f"- **{k}**: {v}" for k, v in whys.items()] + [""]
    mp = results.get("memory_plan", {})
    if mp.get("checks"):
        out += ["## Memory planner: predicted vs measured (MLX peak)", "",
                "| stage | model | shape | predicted (pipeline) | measured | error | within 15% | note |",
                "|---|---|---|---|---|---|---|---|"]
        for c in mp["checks"]:
            out.append(f"| {c['stage']} | {c['model']} | {c['shape']} | {_b(c['predicted_bytes'])} | "
                       f"{_b(c['measured_mlx_peak_bytes'])} | {100 * c['error']:+.1f}% | "
                       f"{'yes' if c['within_15pct'] else '**no**'} | {c.get('note', '')} |")
        out += ["", "Predicted: `pipeline.plan_memory(...).predicted[stage]` on the model folder that ran (for the DiT, "
                "the converted timed layer subset), with the default memory limit. Measured: `mx.get_peak_memory()` "
                "over the stage's first run, weights included. The tiny CI models are not held to the 15% target "
                "(a few MB, where fixed overheads dominate).", ""]
    dev = mp.get("device_setting")
    if dev:
        v = dev["video"]
        out += [f"## Predicted peak for the device setting ({v[0]}x{v[1]}x{v[2]}, fp16 weights, INT4 encoder, "
                f"staged loading)", "", "| stage | predicted peak |", "|---|---|"]
        for k, b in dev["predicted_stage_peaks_bytes"].items():
            out.append(f"| {k} | {_b(b)} |")
        out.append(f"| **run peak (largest stage)** | **{_b(dev['peak_bytes'])}** (target < "
                   f"{_b(dev['target_bytes'])}: {'met' if dev['met'] else 'missed'}) |")
        out += ["", f"Assumptions: {dev['assumptions']}.", ""]
    for key in ("profile", "profile_decode"):
        prof = results.get(key)
        if not prof:
            continue
        if key == "profile":
            out += [f"## Where one DiT step's time goes ({prof['model']}, {prof['shape']}, {prof['layers']} block(s))", ""]
        else:
            out += [f"## Where decoding time goes ({prof['shape']}, {prof['latent_frames']} latent frame(s))", ""]
        for side in ("mlx", "reference"):
            if side not in prof:
                continue
            p = prof[side]
            out += [f"**{'MLX' if side == 'mlx' else 'PyTorch'}** ({_s(p['total_s'])} total; {p['method']})", "",
                    "| op | time | share |", "|---|---|---|"]
            rows = p["ops"][:12] if side == "reference" else p["ops"][:-1][:11] + p["ops"][-1:]
            for o in rows:
                out.append(f"| {o['op']} | {_s(o['seconds'])} | {100 * o['fraction']:.0f}% |")
            out.append("")
    notes = results.get("notes") or []
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def chart(results: dict, path: Path) -> Path | None:
    """Full-model time per stage and shape (MLX vs PyTorch, log scale) and the MLX/PyTorch ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [s for s in results["stages"] if "mlx" in s and "full_model_time_s" in s["mlx"]]
    if not rows:
        return None
    labels = [f"{s['stage']}\n{s['model']}\n{s['shape']}" for s in rows]
    mlx_t = [s["mlx"]["full_model_time_s"] for s in rows]
    ref_t = [s.get("reference", {}).get("full_model_time_s") for s in rows]
    ratios = [(s.get("ratio") or {}).get("median", (s.get("ratio") or {}).get("of_medians")) for s in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(rows) + 2), 8), height_ratios=[3, 2])
    xs = range(len(rows))
    ax1.bar([x - 0.2 for x in xs], mlx_t, 0.4, label="MLX (mlx-video)", color="#2f6db5")
    ax1.bar([x + 0.2 for x in xs], [v or 0 for v in ref_t], 0.4, label="PyTorch reference", color="#d9822b")
    ax1.set_yscale("log")
    ax1.set_ylabel("full-model time (s, log)")
    ax1.set_xticks(list(xs), labels, fontsize=7)
    ax1.legend()
    mach = results["machine"]
    ax1.set_title(f"mlx-video bench on {mach.get('label') or mach.get('cpu_model')} ({mach.get('cpus')} CPUs, "
                  f"{results['backend'].get('dtype')}) — {results.get('created', '')[:10]}", fontsize=9)
    ax2.bar(list(xs), [r or 0 for r in ratios], 0.5, color=["#3a923a" if (r or 9) <= 1 else "#c0392b" for r in ratios])
    ax2.axhline(1.0, color="black", lw=1, ls="--")
    ax2.set_ylabel("time ratio MLX / PyTorch\n(< 1: MLX faster)")
    ax2.set_xticks(list(xs), labels, fontsize=7)
    for x, r in zip(xs, ratios):
        if r:
            ax2.text(x, r, f"{r:.2f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="bench.json -> bench.md + bench.png")
    p.add_argument("json", help="a bench.json written by `mlx-video bench`")
    p.add_argument("--out", default=None, help="output folder (default: beside the JSON)")
    p.add_argument("--rederive", action="store_true",
                   help="recompute the derived sections (end to end, memory plan, targets) from the measured ones "
                        "with this version of benchmarks/derive.py, and rewrite the JSON too")
    args = p.parse_args(argv)
    src = Path(args.json)
    results = json.loads(src.read_text())
    if args.rederive:
        from benchmarks.common import json_default
        from benchmarks.derive import derive

        derive(results)
        out_json = (Path(args.out) if args.out else src.parent) / src.name
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2, default=json_default) + "\n")
    out = Path(args.out) if args.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = src.stem
    (out / f"{stem}.md").write_text(markdown(results))
    chart(results, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.md')}, {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
