"""Decoder stage: TAEHV streaming decode (and a per-op profile) against the PyTorch TAEHV from the tests."""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from pathlib import Path

from benchmarks.common import (SHAPES, Probe, _mlx_op_table, _model_bytes, _record_timings, latent_shape,
                               quiet_native_stderr, request_for, run_interleaved)



def decoder_configs(quick: bool):
    from mlx_video.models import taehv

    if quick:
        kw = {"decoder_channels": [32, 16, 8, 8], "depth": 1, "encoder_channels": 8}
        return taehv.TAEHVConfig(**kw), {"decoder_channels": (32, 16, 8, 8), "depth": 1, "encoder_channels": 8}
    return taehv.taew2_1(), {}


def bench_decoder(args, quick: bool, shapes: list[str], torch_side, mlx_dtype, work: Path, results: dict) -> None:
    import mlx.core as mx
    import numpy as np
    import torch

    from benchmarks import flops as F
    from converters.common import update_config
    from converters.taehv import convert_decoder
    from mlx_video import pipeline
    from mlx_video.models import taehv
    from tests.taehv_reference import TAEHVReference, randomize_

    config, ref_kw = decoder_configs(quick)
    ref = randomize_(TAEHVReference(**ref_kw), seed=args.seed).eval()
    (work / "taehv").mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), work / "taehv" / "taew2_1.pth")
    folder = work / "taehv" / "model"
    folder.mkdir(exist_ok=True)
    section = convert_decoder(work / "taehv" / "taew2_1.pth", folder, mx.float32)
    update_config(folder, None, "decoder", section)
    model = taehv.load(folder, mlx_dtype)
    weight_bytes = _model_bytes(model)
    if torch_side is not None and (torch_side.device.type != "cpu" or torch_side.dtype != torch.float32):
        ref.to(torch_side.device, torch_side.dtype)
    rng = np.random.default_rng(args.seed)
    for shape_name in shapes:
        full_shape = latent_shape(shape_name)
        t_full = full_shape[1]
        limit_t = args.decode_latents.get(shape_name) if isinstance(args.decode_latents, dict) else None
        t_run = min(t_full, limit_t) if limit_t else t_full
        lshape = (full_shape[0], t_run, *full_shape[2:])
        z_np = rng.standard_normal(lshape).astype(np.float32)
        z = mx.array(z_np).astype(mlx_dtype)
        fl_run = F.taehv_decode_flops(config, lshape)
        fl_full = F.taehv_decode_flops(config, full_shape)
        scale = fl_full["total"] / fl_run["total"]
        plan = pipeline.plan_memory(folder, request_for(shape_name) if not quick else request_for("tiny"), None,
                                    False)
        tile = plan.decoder_tile
        entry = {"stage": "decode", "model": "taew2_1" if not quick else "tiny-taehv", "shape": shape_name,
                 "video": list(SHAPES[shape_name]), "latent": list(full_shape), "latent_frames_timed": t_run,
                 "frames": config.num_frames(t_full), "tile": tile,
                 "method": (f"timed on {t_run} of {t_full} latent frames (streaming: the cost per latent frame is "
                            f"constant); full time = timed x FLOP ratio ({scale:.2f})") if t_run != t_full
                 else "measured (all frames)",
                 "scale": scale, "flops": {"timed": fl_run["total"], "full_model": fl_full["total"],
                                           "breakdown_full_model": fl_full["breakdown"]},
                 "modes": "MLX: taehv.decode_stream (the pipeline's mode, one latent frame at a time); reference: "
                          "TAEHVReference.decode_chunks(chunk=1), the same streaming schedule"}
        print(f"[bench] decode {entry['model']} {shape_name} latents={lshape}", file=sys.stderr, flush=True)
        list(taehv.decode_stream(model, z[:, :1], tile=tile))  # warm-up (one latent frame)
        frames_mlx = []

        def mlx_decode(keep=None, z=z, tile=tile, t_run=t_run):
            for k, fr in enumerate(taehv.decode_stream(model, z, tile=tile)):
                mx.eval(fr)
                if keep is not None and k in (0, config.num_frames(t_run) - 1):
                    keep.append(np.array(fr[0].astype(mx.float32)))

        with Probe() as p:
            mlx_decode(frames_mlx)
        entry["mlx"] = {"memory": p.as_dict(), "predicted_peak_bytes": plan.predicted.get("decode"),
                        "weights_bytes_loaded": weight_bytes}
        fns = {"mlx": mlx_decode}
        if torch_side is not None:
            tz = torch_side.tensor(z_np.transpose(0, 1, 4, 2, 3))
            ref.decode_video(tz[:, :1])  # warm-up

            def ref_decode(keep=None, tz=tz, t_run=t_run):
                with torch.no_grad():
                    k = 0
                    for chunk in ref.decode_chunks(tz, 1):
                        for j in range(chunk.shape[1]):
                            if keep is not None and k in (0, config.num_frames(t_run) - 1):
                                keep.append(chunk[0, j].permute(1, 2, 0).float().cpu().numpy().copy())
                            k += 1
                torch_side.sync()

            frames_ref = []
            with Probe(torch_side) as pr:
                ref_decode(frames_ref)
            entry["reference"] = {"name": "PyTorch TAEHV (tests/taehv_reference.py)", "memory": pr.as_dict(mlx=False)}
            entry["parity_max_abs_diff"] = float(max(np.abs(a - b).max() for a, b in zip(frames_mlx, frames_ref)))
            fns["reference"] = ref_decode
        _record_timings(entry, run_interleaved(fns, args.shape_repeats.get(shape_name, args.repeats)),
                        fl_run["total"], scale)
        results["stages"].append(entry)
        if shape_name == args.profile_shape:
            results["profile_decode"] = profile_decoder(model, ref, torch_side, z, z_np, tile, shape_name,
                                                        latents=min(2, t_run))
    gc.collect()
    mx.clear_cache()


class _OpTimer:
    """Exclusive time per op label: each wrapped call evaluates its inputs (charged to the caller), runs, and
    evaluates its output; time spent in wrapped calls nested inside it is not charged to it."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self._child: list[float] = []

    def call(self, label: str, fn, *a, **k):
        import mlx.core as mx

        mx.eval([v for v in list(a) + list(k.values()) if isinstance(v, mx.array)])
        self._child.append(0.0)
        t0 = time.perf_counter()
        try:
            y = fn(*a, **k)
            mx.eval(y)
        finally:
            total = time.perf_counter() - t0
            nested = self._child.pop()
        self.acc[label] = self.acc.get(label, 0.0) + total - nested
        if self._child:
            self._child[-1] += total
        return y


@contextlib.contextmanager
def _patched(module, wrappers: dict):
    """Temporarily replace ``module.<name>`` (a function, or ``Class.method`` with a dotted name) by
    ``make(original)`` for each ``name -> make`` whose target exists (the modules evolve; missing ones are skipped)."""
    saved = []
    for name, make in wrappers.items():
        owner, attr = module, name
        if "." in name:
            cls, attr = name.split(".", 1)
            owner = getattr(module, cls, None)
        if owner is None or not hasattr(owner, attr):
            continue
        orig = getattr(owner, attr)
        saved.append((owner, attr, orig))
        setattr(owner, attr, make(orig))
    try:
        yield
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


@contextlib.contextmanager
def _instrumented_taehv():
    """Time the decoder's building blocks (whatever of them this version of ``models/taehv.py`` has)."""
    from mlx_video.models import taehv

    timer = _OpTimer()

    def conv_label(layer, x):
        o, k = layer.weight.shape[0], layer.weight.shape[1]
        if k == 1:
            return f"conv 1x1 (matmul) {x.shape[-1]}->{o}"
        return "conv 3x3: bias add and dispatch (its GEMMs are listed on their own)"

    wrappers = {
        "conv_forward": lambda f: lambda layer, x, *a, **k: timer.call(conv_label(layer, x), f, layer, x, *a, **k),
        "conv3x3": lambda f: lambda terms, *a, **k: timer.call(
            f"conv 3x3 (GEMMs) {sum(t[0].shape[-1] for t in terms)}->{terms[0][1].shape[0]}", f, terms, *a, **k),
        "_conv_by_taps": lambda f: lambda x, w: timer.call(f"conv {w.shape[1]}x{w.shape[1]} by taps "
                                                           f"{x.shape[-1]}->{w.shape[0]}", f, x, w),
        "upconv_forward": lambda f: lambda layer, x, *a, **k: timer.call(
            f"upsample x2 + conv 3x3 (sub-pixel) {x.shape[-1]}->{layer.weight.shape[0]}", f, layer, x, *a, **k),
        "memblock_forward": lambda f: lambda *a, **k: timer.call("memblock: add, bias, relu (own ops)", f, *a, **k),
        "upsample_nearest": lambda f: lambda x, fac: timer.call("upsample (nearest)", f, x, fac),
        "Conv.__call__": lambda f: lambda self, x: timer.call(conv_label(self, x), f, self, x),
        "MemBlock.__call__": lambda f: lambda self, *a: timer.call("memblock (whole, older API)", f, self, *a),
        "ReLU.__call__": lambda f: lambda self, x: timer.call("relu", f, self, x),
        "Clamp.__call__": lambda f: lambda self, x: timer.call("clamp (tanh)", f, self, x),
        "_finish": lambda f: lambda *a: timer.call("clip to [0, 1]", f, *a),
    }
    with _patched(taehv, wrappers):
        yield timer.acc


def profile_decoder(model, ref, torch_side, z, z_np, tile, shape_name, latents: int) -> dict:
    """Which ops dominate decoding (``latents`` latent frames): MLX op by op, and PyTorch's profiler."""
    import mlx.core as mx

    from mlx_video.models import taehv

    print(f"[bench] profile decode {shape_name}", file=sys.stderr, flush=True)
    out = {"shape": shape_name, "latent_frames": latents}
    with _instrumented_taehv() as acc:
        t0 = time.perf_counter()
        for fr in taehv.decode_stream(model, z[:, :latents], tile=tile):
            mx.eval(fr)
        total = time.perf_counter() - t0
    out["mlx"] = _mlx_op_table(acc, total, "other (TGrow/TPool reshapes, stream bookkeeping, clip)")
    if ref is not None:
        torch = torch_side.torch
        from torch.profiler import ProfilerActivity, profile

        tz = torch_side.tensor(z_np[:, :latents].transpose(0, 1, 4, 2, 3))
        with torch.no_grad(), quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in ref.decode_chunks(tz, 1):
                pass
            torch_side.sync()
            total_ref = time.perf_counter() - t0
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        out["reference"] = {"total_s": total_ref, "method": "torch.profiler, self CPU time per op",
                            "ops": [{"op": e.key, "seconds": e.self_cpu_time_total / 1e6,
                                     "fraction": e.self_cpu_time_total / 1e6 / total_ref, "calls": e.count}
                                    for e in rows]}
    return out


# --------------------------------------------------------------------------------------------------
# The Wan2.1 VAE (issue #17): MLX vs diffusers AutoencoderKLWan, and vs TAEHV at the same shapes
# --------------------------------------------------------------------------------------------------


def wan_vae_decode_flops(model, shape) -> float:
    """Model FLOPs of a Wan VAE decode of latents ``(B, T, H, W, 16)``: every conv tap (the causal zero taps
    included, as the architecture defines them) and the mid-block attention, 2 per multiply-add."""
    import math

    from mlx_video.models import wan_vae

    b, t, h, w = (int(v) for v in shape[:4])
    total = 2.0 * b * t * h * w * model.post_quant_conv.weight.size
    frames = t
    for seg in wan_vae.decoder_segments(model):
        for kind, m, _ in seg.ops:
            px = b * frames * h * w
            if kind == "res":
                convs = [m.conv1, m.conv2] + ([m.conv_shortcut] if "conv_shortcut" in m else [])
                total += sum(2.0 * px * c.weight.size for c in convs)
            elif kind == "conv":
                total += 2.0 * px * m.weight.size
            elif kind == "head":
                total += 2.0 * px * m.conv_out.weight.size
            elif kind == "attn":
                c, n = m.norm.gamma.shape[0], h * w
                total += 2.0 * b * frames * (4 * n * c * c + 2 * n * n * c)  # q/k/v + proj, scores + values
            elif kind == "up":
                if "time_conv" in m:
                    total += 2.0 * b * (frames - 1) * h * w * m.time_conv.weight.size
                    frames = 2 * frames - 1
                total += 2.0 * b * frames * (2 * h) * (2 * w) * m.resample[1].weight.size
        h, w = h * seg.scale, w * seg.scale
    assert frames == model.config.num_frames(t), (frames, t)
    return math.fsum([total])


def bench_wan_vae(args, quick: bool, shapes: list[str], torch_side, mlx_dtype, work: Path, results: dict) -> None:
    """Stage ``vae``: Wan2.1 VAE decode (random weights at the real config; diffusers' init, seeded), MLX
    ``wan_vae.decode_stream`` (the pipeline's mode, whole frames) against diffusers ``AutoencoderKLWan.decode``
    (one latent at a time through its feature cache) on the same latents, runs alternating. Each run is
    probed (MLX counter, RSS growth) and timed. With the ``decode`` stage in the same run, each shape also
    gets the Wan VAE / TAEHV time ratio at the full-model figures."""
    import mlx.core as mx
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    from converters.common import update_config
    from converters.wan_vae import convert_vae
    from mlx_video import pipeline
    from mlx_video.models import wan_vae

    torch.manual_seed(args.seed)
    kw = {"base_dim": 8} if quick else {}
    ref = AutoencoderKLWan(**kw).eval()
    root = work / "wan-vae"
    ref.save_pretrained(root / "vae")
    folder = root / "model"
    folder.mkdir(parents=True, exist_ok=True)
    update_config(folder, None, "vae", convert_vae(root / "vae", folder, mx.float32))
    model = wan_vae.load(folder, mlx_dtype)
    weight_bytes = _model_bytes(model)
    name = "wan2.1-vae" if not quick else "tiny-wan-vae"
    if torch_side is not None and (torch_side.device.type != "cpu" or torch_side.dtype != torch.float32):
        ref.to(torch_side.device, torch_side.dtype)
    mean = np.array(ref.config.latents_mean, np.float32)
    std = np.array(ref.config.latents_std, np.float32)
    rng = np.random.default_rng(args.seed)
    for shape_name in shapes:
        full_shape = latent_shape(shape_name)
        limit_t = args.decode_latents.get(shape_name) if isinstance(args.decode_latents, dict) else None
        t_run = min(full_shape[1], limit_t) if limit_t else full_shape[1]
        lshape = (full_shape[0], t_run, *full_shape[2:])
        z_np = rng.standard_normal(lshape).astype(np.float32)
        z = mx.array(z_np).astype(mlx_dtype)
        fl_run, fl_full = wan_vae_decode_flops(model, lshape), wan_vae_decode_flops(model, full_shape)
        scale = fl_full / fl_run
        plan = pipeline.plan_memory(folder, request_for(shape_name if not quick else "tiny"), None, False,
                                    decoder="wan-vae")
        tile = plan.decoder_tile
        entry = {"stage": "vae_decode", "model": name, "shape": shape_name, "video": list(SHAPES[shape_name]),
                 "latent": list(full_shape), "latent_frames_timed": t_run,
                 "frames": model.config.num_frames(full_shape[1]), "tile": tile,
                 "method": (f"timed on {t_run} of {full_shape[1]} latent frames (streaming: the cost per later latent "
                            f"frame is constant); full time = timed x FLOP ratio ({scale:.2f})")
                 if t_run != full_shape[1] else "measured (all frames)",
                 "scale": scale, "flops": {"timed": fl_run, "full_model": fl_full},
                 "modes": "MLX: wan_vae.decode_stream (the pipeline's mode); reference: diffusers "
                          "AutoencoderKLWan.decode (fp32, one latent at a time through its feature cache); each run "
                          "probed and timed, MLX and PyTorch alternating"}
        print(f"[bench] vae decode {name} {shape_name} latents={lshape}", file=sys.stderr, flush=True)
        list(wan_vae.decode_stream(model, z[:, :1], tile=tile))  # warm-up (one latent frame)
        n_frames = model.config.num_frames(t_run)
        kept: dict[str, list] = {"mlx": [], "reference": []}

        def mlx_decode(keep, z=z, tile=tile, n_frames=n_frames):
            for k, fr in enumerate(wan_vae.decode_stream(model, z, tile=tile)):
                mx.eval(fr)
                if keep is not None and k in (0, n_frames - 1):
                    keep.append(np.array(fr[0].astype(mx.float32)))

        fns = {"mlx": mlx_decode}
        if torch_side is not None:
            tz = torch_side.tensor((z_np * std + mean).transpose(0, 4, 1, 2, 3))
            with torch.no_grad():
                ref.decode(tz[:, :, :1])  # warm-up

            def ref_decode(keep, tz=tz, n_frames=n_frames):
                with torch.no_grad():
                    video = ref.decode(tz).sample  # [B, 3, F, H, W] in [-1, 1]
                torch_side.sync()
                if keep is not None:
                    for k in (0, n_frames - 1):
                        keep.append((video[0, :, k].permute(1, 2, 0).float().cpu().numpy() * 0.5 + 0.5).clip(0, 1))

            fns["reference"] = ref_decode
        samples = {n: {"wall": [], "cpu": []} for n in fns}
        repeats = args.shape_repeats.get(shape_name, args.repeats)
        for r in range(repeats):
            for side in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                with Probe(torch_side if side == "reference" else None) as p:
                    fns[side](kept[side] if r == 0 else None)
                samples[side]["wall"].append(p.seconds)
                samples[side]["cpu"].append(p.cpu_seconds)
                if r == 0:
                    mem = p.as_dict(mlx=side == "mlx")
                    entry[side] = {"memory": mem}
        entry["mlx"].update({"predicted_peak_bytes": plan.predicted.get("decode"), "weights_bytes_loaded": weight_bytes})
        if "reference" in entry:
            entry["reference"]["name"] = f"diffusers AutoencoderKLWan (torch {torch.__version__})"
            entry["parity_max_abs_diff"] = float(max(np.abs(a - b).max() for a, b in zip(kept["mlx"], kept["reference"])))
        _record_timings(entry, samples, fl_run, scale)
        taehv = next((s for s in results["stages"] if s["stage"] == "decode" and s["shape"] == shape_name), None)
        if taehv is not None:
            entry["vs_taehv"] = {"taehv_model": taehv["model"],
                                 "taehv_full_model_time_s": taehv["mlx"]["full_model_time_s"],
                                 "wan_vae_full_model_time_s": entry["mlx"]["full_model_time_s"],
                                 "time_ratio_wan_vae_over_taehv": entry["mlx"]["full_model_time_s"]
                                 / taehv["mlx"]["full_model_time_s"],
                                 "peak_ratio_wan_vae_over_taehv": entry["mlx"]["memory"]["mlx_peak_bytes"]
                                 / max(1, taehv["mlx"]["memory"]["mlx_peak_bytes"])}
        results["stages"].append(entry)
        gc.collect()
        mx.clear_cache()
