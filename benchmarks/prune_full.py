"""Figures for ``mlx-video prune`` (issue #7).

Full-size run (default): build a Wan2.1-1.3B-shaped DiT with random fp32 weights (5.7 GB) in a scratch
folder, prune it to 10 heads / FFN 4480 with Taylor saliency on a small synthetic calibration set in a
separate process (so that its peak memory is the pruning's alone), print JSON with time and peak memory::

    python -m benchmarks.prune_full                 # full size (30 layers): needs ~12 GB disk, a quiet machine
    python -m benchmarks.prune_full --layers 2      # reduced smoke run

Ablation (``--ablation``): output error of the pruned model against the unpruned one on held-out inputs for
Taylor, magnitude and random selection at the same widths, on small random-weight models:
- ``plain``: every weight N(0, std);
- ``low-energy``: the heads/channels to prune are planted with 10x smaller weights (both Taylor and
  magnitude can see them);
- ``anisotropic``: half of the input channels of every prunable Linear carry ~50x less activation energy
  (modulation/norm scales, as in DiTs with massive-activation channels) and the heads/channels to prune put
  4x larger weights on exactly those quiet channels: large ``||w_i||``, small ``||X w_i + b_i||``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_video import prune as P
from mlx_video.models.wan_dit import WEIGHTS_NAME, WanDiT, WanDiTConfig
from mlx_video.utils import config_to_dict, free_memory, parameter_count

# --------------------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------------------

ABLATION_CONFIG = dict(dim=192, num_layers=4, self_attn_heads=12, cross_attn_heads=12, ffn_dim=768, head_dim=16,
                       text_dim=64, text_len=64)


def random_model(config: WanDiTConfig, seed: int = 0, std: float = 0.2) -> WanDiT:
    """Every parameter N(0, std^2), LayerNorm/RMSNorm weights around 1."""
    rng = np.random.default_rng(seed)
    model = WanDiT(config)
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        w = rng.standard_normal(v.shape).astype(np.float32) * std
        if k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            w += 1.0
        weights[k] = mx.array(w)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _planted_sets(config: WanDiTConfig, heads: int, ffn: int, seed: int) -> list[dict]:
    """Per layer: the heads (self, cross) and FFN channels that a good pruner should remove."""
    rng = np.random.default_rng([seed, 99])
    out = []
    for i in range(config.num_layers):
        out.append({"self_attn": rng.choice(config.self_attn_heads[i], config.self_attn_heads[i] - heads, False),
                    "cross_attn": rng.choice(config.cross_attn_heads[i], config.cross_attn_heads[i] - heads, False),
                    "ffn": rng.choice(config.ffn_dim[i], config.ffn_dim[i] - ffn, False)})
    return out


def plant(model: WanDiT, case: str, heads: int, ffn: int, seed: int = 0) -> list[dict]:
    """Plant structure (see the module docstring); returns the planted per-layer sets."""
    if case == "plain":
        return []
    if heads is None or ffn is None:
        raise ValueError("planted cases need both --heads and --ffn widths")
    c = model.config
    sets = _planted_sets(c, heads, ffn, seed)
    w = dict(tree_flatten(model.parameters()))
    rng = np.random.default_rng([seed, 7])
    hd = c.head_dim
    if case == "low-energy":
        for i, s in enumerate(sets):
            for kind in P.ATTENTION_KINDS:
                rows = P.head_channels(s[kind], hd)
                for p in P.PROJECTIONS:
                    for what in ("weight", "bias"):
                        a = np.array(w[f"blocks.{i}.{kind}.{p}.{what}"])
                        a[rows] *= 0.1
                        w[f"blocks.{i}.{kind}.{p}.{what}"] = mx.array(a)
            for what in ("weight", "bias"):
                a = np.array(w[f"blocks.{i}.ffn.fc1.{what}"])
                a[s["ffn"]] *= 0.1
                w[f"blocks.{i}.ffn.fc1.{what}"] = mx.array(a)
    elif case == "anisotropic":
        quiet_scale, decoy_boost = 0.02, 4.0
        w["time_projection.weight"] = mx.zeros_like(w["time_projection.weight"])  # e0 = 0: modulation rules
        w["time_projection.bias"] = mx.zeros_like(w["time_projection.bias"])
        quiet_text = rng.choice(c.dim, c.dim // 2, False)  # quiet channels of the embedded text
        for name in ("text_embedding.linear_2.weight", "text_embedding.linear_2.bias"):
            a = np.array(w[name])
            a[quiet_text] *= quiet_scale
            w[name] = mx.array(a)
        for i, s in enumerate(sets):
            quiet = rng.choice(c.dim, c.dim // 2, False)
            live = np.setdiff1d(np.arange(c.dim), quiet)
            mod = np.zeros((1, 6, c.dim), np.float32)
            mod[0, 1, quiet] = quiet_scale - 1.0  # 1 + scale_msa = 0.02 on the quiet channels
            mod[0, 4, quiet] = quiet_scale - 1.0  # 1 + scale_ffn
            mod[0, 2] = mod[0, 5] = 1.0  # gates
            w[f"blocks.{i}.modulation"] = mx.array(mod)
            n3 = np.ones(c.dim, np.float32)
            n3[quiet] = quiet_scale
            w[f"blocks.{i}.norm3.weight"] = mx.array(n3)
            w[f"blocks.{i}.norm3.bias"] = mx.zeros((c.dim,))

            def decoy(name, rows, cols_quiet, cols_live):
                a = np.array(w[name])
                a[np.ix_(rows, cols_quiet)] *= decoy_boost
                a[np.ix_(rows, cols_live)] /= decoy_boost
                w[name] = mx.array(a)

            for kind in P.ATTENTION_KINDS:
                rows = P.head_channels(s[kind], hd)
                for p in P.PROJECTIONS:
                    if kind == "cross_attn" and p in ("k", "v"):  # their input is the text embedding
                        tq = quiet_text
                        decoy(f"blocks.{i}.{kind}.{p}.weight", rows, tq, np.setdiff1d(np.arange(c.dim), tq))
                    else:
                        decoy(f"blocks.{i}.{kind}.{p}.weight", rows, quiet, live)
            decoy(f"blocks.{i}.ffn.fc1.weight", s["ffn"], quiet, live)
    else:
        raise ValueError(f"unknown case {case!r}")
    model.load_weights(list(w.items()), strict=True)
    mx.eval(model.parameters())
    return sets


def ablation(case: str = "plain", config: dict | None = None, heads: int | None = 10, ffn: int | None = 384,
             calib_texts: int = 4,
             eval_texts: int = 4, timesteps=P.DEFAULT_TIMESTEPS, latent_shape=(2, 8, 8), random_repeats: int = 5,
             qk_norms=("kept", "masked"), seed: int = 0) -> dict:
    """Held-out relative output error per method (random: mean and std over ``random_repeats`` seeds)."""
    cfg = WanDiTConfig(**(config or ABLATION_CONFIG))
    model = random_model(cfg, seed)
    planted = plant(model, case, heads, ffn, seed)
    calib = P.synthetic_text(calib_texts, cfg, seed=seed + 1)
    held_out = P.synthetic_text(eval_texts, cfg, seed=seed + 2)
    energies = P.calibrate(model, calib, timesteps, None, latent_shape, seed=seed + 3)
    weights = dict(tree_flatten(model.parameters()))
    results = {}
    for method in P.METHODS:
        seeds = range(random_repeats) if method == "random" else [seed]
        for qk in qk_norms:
            errs, recovered = [], []
            for s in seeds:
                scores = P.score_layers(cfg, weights, method, energies, seed=s)
                plan = P.plan_pruning(cfg, scores, heads, heads, ffn)
                pruned = P.prune_model(model, plan, qk)
                errs.append(P.output_error(model, pruned, held_out, timesteps, latent_shape, seed=seed + 4))
                if planted:  # fraction of the planted heads/channels that the method removed
                    hit = tot = 0
                    for i, (p, pl) in enumerate(zip(plan, planted)):
                        widths = {"self_attn": cfg.self_attn_heads[i], "cross_attn": cfg.cross_attn_heads[i],
                                  "ffn": cfg.ffn_dim[i]}
                        for part, width in widths.items():
                            removed = np.setdiff1d(np.arange(width), p[part])
                            hit += len(np.intersect1d(removed, pl[part]))
                            tot += len(pl[part])
                    recovered.append(hit / tot)
            entry = {"error": float(np.mean(errs)), "std": float(np.std(errs)) if len(errs) > 1 else 0.0}
            if recovered:
                entry["planted_removed"] = float(np.mean(recovered))
            results[f"{method}/{qk}"] = entry
    return {"case": case, "config": config_to_dict(cfg), "heads": heads, "ffn_dim": ffn,
            "calibration": {"texts": calib_texts, "timesteps": list(timesteps), "latent_shape": list(latent_shape)},
            "held_out": {"texts": eval_texts}, "random_repeats": random_repeats, "results": results}


def ablation_table(runs: list[dict]) -> str:
    keys = list(runs[0]["results"])
    lines = ["| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in runs:
        cells = []
        for k in keys:
            e = r["results"][k]
            cell = f"{e['error']:.4f}" + (f" ± {e['std']:.4f}" if e["std"] else "")
            if "planted_removed" in e:
                cell += f" ({e['planted_removed']:.0%})"
            cells.append(cell)
        c = r["config"]
        widths = (f"heads {c['self_attn_heads'][0]}->{r['heads'] or c['self_attn_heads'][0]}, "
                  f"ffn {c['ffn_dim'][0]}->{r['ffn_dim'] or c['ffn_dim'][0]}")
        lines.append(f"| {r['case']} ({widths}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Full-size time and memory
# --------------------------------------------------------------------------------------------------


def build_folder(folder: Path, layers: int, seed: int = 0) -> dict:
    """A Wan2.1-1.3B-shaped model folder (random fp32 weights; only the layer count may be reduced)."""
    from converters.common import update_config
    from mlx_video.utils import save_weights

    cfg = WanDiTConfig(num_layers=layers)
    mx.random.seed(seed)
    model = WanDiT(cfg)  # MLX's default init: uniform random Linear weights
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    folder.mkdir(parents=True)
    save_weights(folder / WEIGHTS_NAME, weights)
    section = {**config_to_dict(cfg), "weights_file": WEIGHTS_NAME, "dtype": "float32",
               "parameters": parameter_count(model)}
    update_config(folder, None, "dit", section)
    return section


def full_size(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prune_full_"))
    src, out = work / "wan_random", work / "pruned"
    t0 = time.perf_counter()
    if not src.exists():
        build_folder(src, args.layers, args.seed)
        free_memory()  # give the 5.7 GB back before the pruning process starts
    build_s = time.perf_counter() - t0
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "mlx_video", "prune", "--model", str(src), "--mlx-path", str(out),
           "--heads", str(args.heads), "--ffn-dim", str(args.ffn_dim), "--synthetic-text",
           "--samples", str(args.samples), "--timesteps", *map(str, args.timesteps),
           "--latent-shape", *map(str, args.latent_shape), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"prune failed with status {status}")
    report = json.loads((out / P.REPORT_NAME).read_text())
    result = {
        "model": f"Wan2.1-1.3B-shaped, random fp32 weights, {args.layers} layers",
        "parameters_before": report["parameters"]["before"], "parameters_after": report["parameters"]["after"],
        "calibration": report["calibration"],
        "prune_wall_s": round(wall, 2), "phases_s": report["timing_s"],
        "peak_rss_gb": round(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9, 3),
        "mlx_peak_gb": round(report["memory"]["mlx_peak_bytes"] / 1e9, 3),
        "build_s": round(build_s, 1), "cpu_count": os.cpu_count(), "workdir": str(work),
    }
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ablation", action="store_true", help="run the Taylor/magnitude/random ablation instead")
    p.add_argument("--cases", nargs="+", default=["plain", "low-energy", "anisotropic"], help="ablation cases")
    p.add_argument("--layers", type=int, default=30, help="transformer blocks of the full-size model")
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--ffn-dim", type=int, default=4480)
    p.add_argument("--samples", type=int, default=2, help="calibration samples (synthetic text + noise)")
    p.add_argument("--timesteps", type=float, nargs="+", default=[1000.0, 625.0])
    p.add_argument("--latent-shape", type=int, nargs=3, default=[1, 16, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    if args.ablation:
        runs = []
        for case in args.cases:
            runs.append(ablation(case))
            if case == "plain":  # where does the error come from: heads alone, FFN alone
                runs += [ablation(case, ffn=None), ablation(case, heads=None)]
        print(json.dumps(runs, indent=2))
        print(ablation_table(runs))
    else:
        print(json.dumps(full_size(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
