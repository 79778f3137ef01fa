"""DiT stage: one step (against diffusers ``WanTransformer3DModel``), a per-op profile, and the 4-step denoise."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import (DEFAULT_TIMESTEP, DIT_MODELS, SHAPES, Probe, _load, _mlx_op_table, _paired_ratio,
                               _record_timings, _rel_error, _scaled, _timed, _timing_block, latent_shape,
                               quiet_native_stderr, request_for, run_interleaved)


def dit_config(name: str, layers: int | None = None):
    from mlx_video.models import wan_dit

    if name == "lightning":
        c = wan_dit.lightning_video()
    elif name == "wan2.1-1.3b":
        c = wan_dit.wan2_1_1_3b()
    elif name == "tiny":  # pruned-style: heads * head_dim != dim, as in the real model
        c = wan_dit.WanDiTConfig(dim=96, num_layers=2, self_attn_heads=2, cross_attn_heads=2, ffn_dim=160,
                                 head_dim=32, text_dim=64)
    else:
        raise ValueError(f"unknown DiT {name!r}; choose from {', '.join(DIT_MODELS + ('tiny',))}")
    if layers is not None and layers != c.num_layers:
        if not 1 <= layers <= c.num_layers:
            raise ValueError(f"--dit-layers must be in 1..{c.num_layers}, got {layers}")
        c = wan_dit.WanDiTConfig(**{**c.__dict__, "num_layers": layers, "self_attn_heads": c.self_attn_heads[:layers],
                                    "cross_attn_heads": c.cross_attn_heads[:layers], "ffn_dim": c.ffn_dim[:layers]})
    return c


def make_reference_dit(config, seed: int = 0):
    """diffusers ``WanTransformer3DModel`` with this config; pruned attention (heads * head_dim != dim) is built
    by swapping in narrower ``WanAttention`` modules (diffusers ties the width to heads * head_dim)."""
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    if config.dim % config.head_dim:
        raise ValueError(f"dim {config.dim} is not a multiple of head_dim {config.head_dim}")
    if len(set(config.ffn_dim)) != 1:
        raise ValueError("the reference builder supports one FFN width for all layers")
    torch.manual_seed(seed)
    full = config.dim // config.head_dim
    model = WanTransformer3DModel(
        patch_size=tuple(config.patch_size), num_attention_heads=full, attention_head_dim=config.head_dim,
        in_channels=config.in_channels, out_channels=config.out_channels, text_dim=config.text_dim,
        freq_dim=config.freq_dim, ffn_dim=config.ffn_dim[0], num_layers=config.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=config.eps, rope_max_seq_len=1024)
    for i, blk in enumerate(model.blocks):
        if config.self_attn_heads[i] != full:
            blk.attn1 = WanAttention(dim=config.dim, heads=config.self_attn_heads[i], dim_head=config.head_dim,
                                     eps=config.eps, cross_attention_dim_head=None, processor=WanAttnProcessor())
        if config.cross_attn_heads[i] != full:
            blk.attn2 = WanAttention(dim=config.dim, heads=config.cross_attn_heads[i], dim_head=config.head_dim,
                                     eps=config.eps, cross_attention_dim_head=config.head_dim,
                                     processor=WanAttnProcessor())
    return model.eval()


def _to_side(model, torch_side):
    """Move a diffusers model to the reference device/dtype, keeping its fp32 modules (time embedding, norms,
    modulation: what the MLX runtime keeps in fp32 too) in fp32."""
    import torch

    if torch_side.device.type == "cpu" and torch_side.dtype == torch.float32:
        return model
    model = model.to(torch_side.device)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if not any(k in name.split(".") for k in keep):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(torch_side.dtype)
    return model


def mlx_dit_from_reference(ref_model, config, work: Path, dtype):
    """Convert the reference's weights with the project's converter and load them as the pipeline does."""
    from safetensors.torch import save_file

    from converters.wan_dit import convert_dit
    from mlx_video.models import wan_dit
    from mlx_video.utils import MLX_VIDEO_FORMAT

    src, out = work / "dit-src", work / "dit-mlx"
    src.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in ref_model.state_dict().items()},
              str(src / "diffusion_pytorch_model.safetensors"))
    section = convert_dit(src, out, head_dim=config.head_dim)
    (out / "config.json").write_text(json.dumps({"format": MLX_VIDEO_FORMAT, "dit": section}))
    model = wan_dit.load(out, dtype)
    for f in src.iterdir():
        f.unlink()
    return_folder = out
    got = model.config
    if (got.num_layers, got.self_attn_heads, got.ffn_dim, got.dim) != (config.num_layers, config.self_attn_heads,
                                                                       config.ffn_dim, config.dim):
        raise RuntimeError(f"converted DiT config differs from the benchmark config: {got}")
    return model, return_folder


def bench_dit(args, model_name: str, shapes: list[str], torch_side, mlx_dtype, work: Path, results: dict) -> None:
    import mlx.core as mx
    import numpy as np

    from benchmarks import flops as F
    from mlx_video import pipeline

    quick = model_name == "tiny"
    full_cfg = dit_config(model_name)
    cfg = dit_config(model_name, None if quick else args.dit_layers)
    subset = cfg.num_layers != full_cfg.num_layers
    ref = make_reference_dit(cfg, seed=args.seed)  # on the CPU in fp32: the converter reads these weights
    mlx_model, dit_folder = mlx_dit_from_reference(ref, cfg, work, mlx_dtype)
    ref = _to_side(ref, torch_side) if torch_side is not None else None
    rng = np.random.default_rng(args.seed)
    ctx_np = (rng.standard_normal((1, cfg.text_len, cfg.text_dim)) * 0.5).astype(np.float32)
    ctx = mx.array(ctx_np)
    t = DEFAULT_TIMESTEP
    for shape_name in shapes:
        lshape = latent_shape(shape_name)
        plan = pipeline.plan_memory(dit_folder, request_for(shape_name), None, False)  # the pipeline's own plan
        budget = plan.attention_budget_bytes
        mlx_model.attention_budget = budget
        x_np = rng.standard_normal(lshape).astype(np.float32)
        x = mx.array(x_np)
        fl_timed = F.dit_step_flops(cfg, lshape)
        fl_full = F.dit_step_flops(full_cfg, lshape)
        scale = fl_full["total"] / fl_timed["total"]
        entry = {"stage": "dit_step", "model": model_name, "shape": shape_name, "video": list(SHAPES[shape_name]),
                 "latent": list(lshape), "tokens": F.dit_tokens(cfg, lshape),
                 "layers_timed": cfg.num_layers, "layers_total": full_cfg.num_layers,
                 "method": (f"timed with {cfg.num_layers} of {full_cfg.num_layers} blocks at full width; full-model "
                            f"time = timed x FLOP ratio ({scale:.2f})") if subset else "measured (whole model)",
                 "scale": scale, "flops": {"timed": fl_timed["total"], "full_model": fl_full["total"],
                                           "breakdown_full_model": fl_full["breakdown"]},
                 "attention_budget_bytes": budget}
        print(f"[bench] dit_step {model_name} {shape_name} latent={lshape} layers={cfg.num_layers}", file=sys.stderr,
              flush=True)
        # Warm-up on the pipeline's path (text K/V prepared once), probed: the stage's peak memory.
        with Probe() as p:
            text = mlx_model.prepare_text(ctx)
            mx.eval(text)
            y = mlx_model(x, [t], text=text)
            mx.eval(y)
        del text
        entry["mlx"] = {"memory": p.as_dict(), "warmup_s": p.seconds}
        entry["mlx"]["predicted_peak_bytes"] = plan.predicted["denoise"]
        y_mlx = np.array(y.astype(mx.float32))
        del y

        def mlx_step(x=x):
            mx.eval(mlx_model(x, [t], context=ctx))

        fns = {"mlx": mlx_step}
        if ref is not None:
            tx = torch_side.tensor(x_np.transpose(0, 4, 1, 2, 3))
            tctx = torch_side.tensor(ctx_np)
            tt = torch_side.torch.tensor([t], device=torch_side.device)

            def ref_step(tx=tx, tt=tt, tctx=tctx):
                with torch_side.torch.no_grad():
                    out = ref(tx, tt, tctx, return_dict=False)[0]
                torch_side.sync()
                return out

            with Probe(torch_side) as p:
                y_ref = ref_step()
            entry["reference"] = {"name": "diffusers WanTransformer3DModel", "memory": p.as_dict(mlx=False),
                                  "warmup_s": p.seconds}
            entry["parity_rel_error"] = _rel_error(y_mlx.transpose(0, 4, 1, 2, 3), y_ref.float().cpu().numpy())
            del y_ref
            fns["reference"] = ref_step
        _record_timings(entry, run_interleaved(fns, args.shape_repeats.get(shape_name, args.repeats)),
                        fl_timed["total"], scale)
        results["stages"].append(entry)
        if shape_name == args.profile_shape and model_name == args.profile_model:
            results["profile"] = profile_dit(mlx_model, x, ctx, t, ref, torch_side, x_np, ctx_np, shape_name,
                                             model_name, fl_timed)
        if (shape_name in args.denoise_shapes_list and model_name == "lightning") or quick:
            results["stages"].append(bench_denoise(args, mlx_model, ref, torch_side, cfg, full_cfg, shape_name,
                                                   lshape, ctx, ctx_np, budget, plan.predicted["denoise"],
                                                   dit_folder))
        gc.collect()
    gc.collect()
    mx.clear_cache()


def bench_denoise(args, mlx_model, ref, torch_side, cfg, full_cfg, shape_name, lshape, ctx, ctx_np, budget,
                  predicted: int, dit_folder: Path) -> dict:
    """The pipeline's denoise stage (``pipeline.denoise``: text K/V once, 4 few-step steps) vs the reference
    running the same sampler (x0 = x - sigma v, re-noise to the next sigma) around the diffusers forward."""
    import mlx.core as mx

    from benchmarks import flops as F
    from mlx_video import pipeline, sampling

    sampler_cfg = sampling.sampler_config(None)
    sched = sampling.schedule(sampler_cfg)
    steps = len(sched.timesteps)
    h, w, f = SHAPES[shape_name]
    request = pipeline.GenerationRequest(prompt="benchmark", height=h, width=w, frames=f, seed=args.seed)
    models = pipeline.Models(dit_folder)
    models.dit = mlx_model  # handed over loaded: the stage's run, not the load, is timed
    step_t = F.dit_step_flops(cfg, lshape)["total"]
    step_full = F.dit_step_flops(full_cfg, lshape)["total"]
    scale = step_full / step_t
    subset = cfg.num_layers != full_cfg.num_layers
    entry = {"stage": "denoise_4_steps", "model": "lightning" if cfg.dim == 1536 else "tiny", "shape": shape_name,
             "video": [h, w, f], "latent": list(lshape), "steps": steps, "sampler": "fewstep (Self-Forcing warp)",
             "timesteps": [float(v) for v in sched.timesteps], "layers_timed": cfg.num_layers,
             "layers_total": full_cfg.num_layers,
             "method": ((f"timed with {cfg.num_layers} of {full_cfg.num_layers} blocks; full-model time = timed x "
                         f"FLOP ratio ({scale:.2f})") if subset else "measured (whole model)")
             + "; MLX: pipeline.denoise (text K/V once per prompt); reference: the same sampler around diffusers",
             "scale": scale, "flops": {"timed": steps * step_t, "full_model": steps * step_full}}
    print(f"[bench] denoise {entry['model']} {shape_name}", file=sys.stderr, flush=True)

    def mlx_denoise():
        lat = pipeline.denoise(models, request, sampler_cfg, ctx, budget, keep=True)
        mx.eval(lat)

    fns = {"mlx": mlx_denoise}
    if ref is not None:
        torch = torch_side.torch
        gen = torch.Generator().manual_seed(args.seed)
        tctx = torch_side.tensor(ctx_np)
        shape_t = (lshape[0], lshape[4], lshape[1], lshape[2], lshape[3])

        def ref_denoise():
            x = torch.randn(shape_t, generator=gen).to(torch_side.device, torch_side.dtype)
            with torch.no_grad():
                for i, t in enumerate(sched.timesteps):
                    v = ref(x, torch.tensor([float(t)], device=torch_side.device), tctx, return_dict=False)[0]
                    x0 = x.float() - float(sched.sigmas[i]) * v.float()
                    if i < steps - 1:
                        s = float(sched.sigmas[i + 1])
                        eps = torch.randn(shape_t, generator=gen).to(torch_side.device)
                        x = ((1 - s) * x0 + s * eps).to(torch_side.dtype)
                    else:
                        x = x0
            torch_side.sync()

        fns["reference"] = ref_denoise
    with Probe() as p:
        mlx_denoise()  # the first run is probed for memory; it is warm (the step case ran the same shapes)
    entry["mlx"] = {"memory": p.as_dict(), "predicted_peak_bytes": predicted}
    samples = run_interleaved(fns, args.denoise_repeats)
    samples["mlx"]["wall"].insert(0, p.seconds)
    samples["mlx"]["cpu"].insert(0, p.cpu_seconds)
    if "reference" in samples:  # pair the probed MLX run with one more reference run
        wall, cpu = _timed(fns["reference"])
        samples["reference"]["wall"].insert(0, wall)
        samples["reference"]["cpu"].insert(0, cpu)
        entry["reference"] = {"name": "diffusers WanTransformer3DModel + the same few-step sampler in PyTorch"}
    for side, s in samples.items():
        d = entry.setdefault(side, {})
        d["time"] = _timing_block(s, os.cpu_count() or 1)
        d["achieved_flops_per_s"] = entry["flops"]["timed"] / d["time"]["median_s"]
        _scaled(d, scale)
    if "reference" in samples:
        entry["ratio"] = _paired_ratio(samples["mlx"]["wall"], samples["reference"]["wall"])
    entry["load_avg_end"] = _load()
    return entry


@contextlib.contextmanager
def _instrumented_dit(model):
    """Patch the DiT's building blocks so each op is evaluated and timed on its own (inputs first)."""
    import mlx.core as mx

    from mlx_video.models import wan_dit

    names = {id(m): n for n, m in model.named_modules()}
    acc: dict[str, float] = {}

    def role(layer):
        n = names.get(id(layer), "")
        parts = n.split(".")
        if n.startswith("blocks."):
            return ".".join(parts[2:])
        return n or "linear"

    def timed(name, fn, *a, **k):
        mx.eval([v for v in list(a) + list(k.values()) if isinstance(v, mx.array)])
        t0 = time.perf_counter()
        y = fn(*a, **k)
        mx.eval(y)
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return y

    orig = {"linear": wan_dit.linear, "attention": wan_dit.attention, "apply_rope": wan_dit.apply_rope,
            "gelu_tanh_fresh": wan_dit.gelu_tanh_fresh, "layer_norm": wan_dit.modulated_layer_norm,
            "qknorm": wan_dit.QKNorm.__call__}
    wan_dit.linear = lambda layer, x: timed(f"matmul {role(layer)}", orig["linear"], layer, x)
    wan_dit.attention = lambda q, k, v, **kw: timed(
        "attention self (QK^T, softmax, PV)" if k.shape[2] == q.shape[2] else "attention cross (QK^T, softmax, PV)",
        orig["attention"], q, k, v, **kw)
    wan_dit.apply_rope = lambda x, c, s: timed("rope", orig["apply_rope"], x, c, s)
    wan_dit.gelu_tanh_fresh = lambda x: timed("gelu (ffn)", orig["gelu_tanh_fresh"], x)
    wan_dit.modulated_layer_norm = lambda *a: timed("layer_norm", orig["layer_norm"], *a)
    wan_dit.QKNorm.__call__ = lambda self, x: timed("qk rms_norm", orig["qknorm"], self, x)
    try:
        yield acc
    finally:
        wan_dit.linear, wan_dit.attention, wan_dit.apply_rope = orig["linear"], orig["attention"], orig["apply_rope"]
        wan_dit.gelu_tanh_fresh, wan_dit.modulated_layer_norm = orig["gelu_tanh_fresh"], orig["layer_norm"]
        wan_dit.QKNorm.__call__ = orig["qknorm"]


def profile_dit(mlx_model, x, ctx, t, ref, torch_side, x_np, ctx_np, shape_name, model_name, fl) -> dict:
    """Which ops dominate one DiT step: MLX op by op (each evaluated on its own), and PyTorch's profiler."""
    import mlx.core as mx

    print(f"[bench] profile {model_name} {shape_name}", file=sys.stderr, flush=True)
    out = {"model": model_name, "shape": shape_name, "layers": mlx_model.config.num_layers}
    with _instrumented_dit(mlx_model) as acc:
        t0 = time.perf_counter()
        mx.eval(mlx_model(x, [t], context=ctx))
        total = time.perf_counter() - t0
    out["mlx"] = _mlx_op_table(acc, total, "other (modulation, residuals, casts, patchify)")
    bd = fl["breakdown"]
    out["flops_breakdown_timed"] = bd
    if ref is not None:
        torch = torch_side.torch
        from torch.profiler import ProfilerActivity, profile

        tx = torch_side.tensor(x_np.transpose(0, 4, 1, 2, 3))
        tctx = torch_side.tensor(ctx_np)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch_side.device.type == "cuda" else [])
        with torch.no_grad(), quiet_native_stderr(), profile(activities=acts) as prof:
            t0 = time.perf_counter()
            ref(tx, torch.tensor([t], device=torch_side.device), tctx, return_dict=False)
            torch_side.sync()
            total_ref = time.perf_counter() - t0
        gpu = torch_side.device.type == "cuda"

        def self_time(e):
            return (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if gpu \
                else e.self_cpu_time_total

        rows = sorted(prof.key_averages(), key=lambda e: -self_time(e))[:12]
        out["reference"] = {"total_s": total_ref,
                            "method": f"torch.profiler, self {'GPU' if gpu else 'CPU'} time per op",
                            "ops": [{"op": e.key, "seconds": self_time(e) / 1e6,
                                     "fraction": self_time(e) / 1e6 / total_ref, "calls": e.count} for e in rows]}
    return out
