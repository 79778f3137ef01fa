"""Text-encoder stage: UMT5-xxl INT4 on the pipeline's path, against transformers ``UMT5EncoderModel``."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.common import (Probe, _load, _paired_ratio, _rel_error, _timing_block, request_for,
                               run_interleaved)



def encoder_config(quick: bool, layers: int | None = None, vocab: int | None = None):
    from converters.umt5 import quantization_settings
    from mlx_video.models import umt5

    if quick:
        c = umt5.UMT5Config(vocab_size=vocab or 512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
        c.quantization = quantization_settings(4, 32, "", False, c)
    else:
        c = umt5.UMT5Config(vocab_size=vocab or 256384, num_layers=layers or 24)
        c.quantization = quantization_settings(4, 64, "", False, c)
    return c


def _hf_umt5_state(enc, layers: int) -> dict:
    """transformers ``UMT5EncoderModel`` weights (fp32) from the first ``layers`` MLX blocks, INT4 dequantized:
    both runtimes compute with the same numbers."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    import torch

    def dense(layer):
        if isinstance(layer, nn.QuantizedLinear):  # exactly what the runtime multiplies by on the CPU
            from mlx_video.models import umt5

            if hasattr(umt5, "dequantize_fp32"):
                w = umt5.dequantize_fp32(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits,
                                         layer.mode)
            else:
                w = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                                  layer.group_size, layer.bits, mode=layer.mode, dtype=mx.float32)
        else:
            w = layer.weight.astype(mx.float32)
        return torch.from_numpy(np.array(w))

    state = {}
    for i in range(layers):
        blk = _umt5_block(enc, i)
        p = f"encoder.block.{i}.layer"
        for n in "qkvo":
            state[f"{p}.0.SelfAttention.{n}.weight"] = dense(getattr(blk.attn, n))
        state[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = torch.from_numpy(
            np.array(blk.pos_embedding.weight.astype(mx.float32)))
        state[f"{p}.0.layer_norm.weight"] = torch.from_numpy(np.array(blk.norm1.weight.astype(mx.float32)))
        state[f"{p}.1.DenseReluDense.wi_0.weight"] = dense(blk.ffn.gate)
        state[f"{p}.1.DenseReluDense.wi_1.weight"] = dense(blk.ffn.fc1)
        state[f"{p}.1.DenseReluDense.wo.weight"] = dense(blk.ffn.fc2)
        state[f"{p}.1.layer_norm.weight"] = torch.from_numpy(np.array(blk.norm2.weight.astype(mx.float32)))
    state["encoder.final_layer_norm.weight"] = torch.from_numpy(np.array(enc.norm.weight.astype(mx.float32)))
    return state


def _umt5_block(enc, i: int):
    return enc.layer(i) if hasattr(enc, "layer") else enc.blocks[i]


def make_reference_umt5(enc, layers: int, torch_side):
    """transformers ``UMT5EncoderModel`` with ``layers`` blocks, fed ``inputs_embeds`` (the token table is not
    built: the lookup costs nothing measurable, and the runtime reads rows from a memory-mapped file)."""
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    c = enc.config
    hf = HFConfig(vocab_size=8, d_model=c.dim, d_kv=c.head_dim, d_ff=c.dim_ffn, num_layers=layers,
                  num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets,
                  relative_attention_max_distance=c.max_distance, feed_forward_proj="gated-gelu",
                  layer_norm_epsilon=c.eps, dropout_rate=0.0, is_encoder_decoder=False)
    import torch

    with torch.device("meta"):
        model = UMT5EncoderModel(hf)
    state = _hf_umt5_state(enc, layers)
    state["shared.weight"] = torch.zeros(8, c.dim)
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"reference UMT5 weights not set: {missing[:5]}")
    return model.eval().to(torch_side.device, torch_side.dtype)


def _umt5_folder(args, config, work: Path, build) -> tuple[Path, dict]:
    """A random-weight INT4 UMT5 folder for ``config``: reused from ``--cache-dir`` when one was built there with
    the same config and seed, else built with ``benchmarks.umt5_xxl.build`` (minutes at full size)."""
    from mlx_video.utils import config_to_dict, read_config

    want = {k: v for k, v in config_to_dict(config).items()}
    if args.cache_dir:
        folder = Path(args.cache_dir) / f"umt5-random-L{config.num_layers}-V{config.vocab_size}-s{args.seed}"
        stamp = folder / "bench-build.json"
        if stamp.exists():
            with contextlib.suppress(Exception):
                section = read_config(folder)["text_encoder"]
                if all(section.get(k) == v for k, v in want.items()):
                    print(f"[bench] text_encoding: reusing {folder}", file=sys.stderr, flush=True)
                    return folder, {**json.loads(stamp.read_text()), "reused": True}
    else:
        folder = work / "umt5"
    print(f"[bench] text_encoding: building a random INT4 UMT5 ({config.num_layers} layers, vocab "
          f"{config.vocab_size}) with benchmarks.umt5_xxl.build", file=sys.stderr, flush=True)
    import mlx.core as mx

    mx.random.seed(args.seed)
    built = build(folder, config)
    if args.cache_dir:
        (folder / "bench-build.json").write_text(json.dumps(built, default=str))
    return folder, built


def _dense_umt5_blocks(enc, layers: int):
    """The first ``layers`` blocks with the INT4 projections replaced by their fp32 values (isolates the cost
    of dequantizing on every call from the rest of the encoder's work)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_video.models import umt5

    state = _hf_umt5_state(enc, layers)
    out = []
    for i in range(layers):
        blk = umt5.Block(enc.config)
        p = f"encoder.block.{i}.layer"
        w = {"norm1.weight": state[f"{p}.0.layer_norm.weight"], "norm2.weight": state[f"{p}.1.layer_norm.weight"],
             "pos_embedding.weight": state[f"{p}.0.SelfAttention.relative_attention_bias.weight"],
             "ffn.gate.weight": state[f"{p}.1.DenseReluDense.wi_0.weight"],
             "ffn.fc1.weight": state[f"{p}.1.DenseReluDense.wi_1.weight"],
             "ffn.fc2.weight": state[f"{p}.1.DenseReluDense.wo.weight"]}
        for n in "qkvo":
            w[f"attn.{n}.weight"] = state[f"{p}.0.SelfAttention.{n}.weight"]
        blk.load_weights([(k, mx.array(v.numpy())) for k, v in w.items()], strict=True)
        mx.eval(blk.parameters())
        assert len(tree_flatten(blk.parameters())) == len(w)
        out.append(blk)
    return out


def bench_encoder(args, quick: bool, torch_side, mlx_dtype, work: Path, results: dict) -> None:
    import mlx.core as mx
    import numpy as np

    from benchmarks import flops as F
    from benchmarks.umt5_xxl import build as build_umt5_folder
    from mlx_video.models import umt5

    config = encoder_config(quick, vocab=args.encoder_vocab)
    tokens = 16 if quick else args.encoder_tokens
    folder, built = _umt5_folder(args, config, work, build_umt5_folder)
    rng = np.random.default_rng(args.seed)
    ids = [int(v) for v in rng.integers(3, config.vocab_size - 1, size=tokens - 1)] + [config.eos_id]
    ref_layers = config.num_layers if quick else min(args.encoder_ref_layers, config.num_layers)
    fl_full = F.umt5_flops(config, tokens)
    fl_sub = F.umt5_flops(config, tokens, layers=ref_layers)
    entry = {"stage": "text_encoding", "model": "umt5-xxl-int4" if not quick else "tiny-umt5-int4",
             "shape": "any", "tokens": tokens, "layers_total": config.num_layers,
             "quantization": config.quantization, "build_seconds": built.get("seconds"),
             "file_bytes": built.get("file_bytes"),
             "flops": {"full_model": fl_full["total"], "breakdown_full_model": fl_full["breakdown"],
                       "subset": fl_sub["total"], "subset_layers": ref_layers}}
    from mlx_video import pipeline

    stream = args.encoder_mode == "stream"
    plan = pipeline.plan_memory(folder, request_for(args.shapes_list[0] if args.shapes_list else "device"), None,
                                False, text_tokens=tokens, keep_models=not stream)
    with Probe() as p:  # the pipeline's stage: load (streamed: blocks read when they run) + encode
        enc = umt5.load(folder, mlx_dtype, stream=stream)
        out = enc.encode_tokens([ids])
        mx.eval(out)
    entry["mode"] = ("streamed: each block read from disk when it runs (the pipeline's default)" if stream
                     else "resident: all INT4 blocks in memory (keep_models)")
    entry["mlx"] = {"memory": p.as_dict(), "first_run_s_including_load": p.seconds,
                    "predicted_peak_bytes": plan.predicted.get("encode")}
    del out

    def mlx_encode():  # streamed: blocks come from the page cache after the first run
        mx.eval(enc.encode_tokens([ids]))

    def mlx_subset():  # the first `ref_layers` blocks + the final norm: the reference's exact work
        x = enc.token_embedding(mx.array([ids])).astype(mx.float32)
        for i in range(ref_layers):
            x = _umt5_block(enc, i)(x, None, enc.runtime)
            mx.eval(x)
        y = enc.norm(x)
        mx.eval(y)
        return y

    samples = run_interleaved({"mlx": mlx_encode}, args.repeats)
    d = entry["mlx"]
    d["time"] = _timing_block(samples["mlx"], os.cpu_count() or 1)
    d["achieved_flops_per_s"] = fl_full["total"] / d["time"]["median_s"]
    d["full_model_time_s"] = d["time"]["median_s"]
    entry["method"] = "MLX: measured, whole encoder (pipeline path: umt5.load + encode_tokens)"
    if torch_side is not None:
        torch = torch_side.torch
        ref = make_reference_umt5(enc, ref_layers, torch_side)
        emb = np.array(enc.token_embedding(mx.array([ids])).astype(mx.float32))
        temb = torch_side.tensor(emb)

        def ref_encode():
            with torch.no_grad():
                o = ref(inputs_embeds=temb).last_hidden_state
            torch_side.sync()
            return o

        with Probe(torch_side) as p:
            y_ref = ref_encode()
        y_mlx = np.array(mlx_subset())
        dense = _dense_umt5_blocks(enc, ref_layers)

        def mlx_subset_dense():  # same blocks, fp32 weights: no per-call dequantization
            x = enc.token_embedding(mx.array([ids])).astype(mx.float32)
            for blk in dense:
                x = blk(x, None, enc.runtime)
                mx.eval(x)
            y = enc.norm(x)
            mx.eval(y)
            return y

        entry["parity_rel_error_dense"] = _rel_error(np.array(mlx_subset_dense()), y_ref.float().cpu().numpy())
        entry["parity_rel_error"] = _rel_error(y_mlx, y_ref.float().cpu().numpy())
        scale = fl_full["total"] / fl_sub["total"]
        pair = run_interleaved({"mlx_subset": mlx_subset, "reference": ref_encode,
                                "mlx_subset_dense": mlx_subset_dense}, args.repeats)
        entry["reference"] = {"name": "transformers UMT5EncoderModel (fp32 weights = the INT4 weights dequantized)",
                              "memory": p.as_dict(mlx=False), "layers_timed": ref_layers,
                              "time": _timing_block(pair["reference"], os.cpu_count() or 1)}
        entry["reference"]["achieved_flops_per_s"] = fl_sub["total"] / entry["reference"]["time"]["median_s"]
        entry["reference"]["full_model_time_s"] = entry["reference"]["time"]["median_s"] * scale
        entry["mlx_subset"] = {"layers_timed": ref_layers, "time": _timing_block(pair["mlx_subset"],
                                                                                 os.cpu_count() or 1)}
        entry["mlx_subset_fp32_weights"] = {
            "layers_timed": ref_layers, "time": _timing_block(pair["mlx_subset_dense"], os.cpu_count() or 1),
            "what": "the same blocks in MLX with the INT4 projections stored as fp32 (no dequantization per call)"}
        entry["ratio"] = _paired_ratio(pair["mlx_subset"]["wall"], pair["reference"]["wall"])
        entry["ratio_fp32_weights"] = _paired_ratio(pair["mlx_subset_dense"]["wall"], pair["reference"]["wall"])
        q_med = statistics.median(pair["mlx_subset"]["wall"])
        d_med = statistics.median(pair["mlx_subset_dense"]["wall"])
        entry["profile"] = {"int4_dequantize_share": max(0.0, (q_med - d_med) / q_med),
                            "how": "(INT4 subset - fp32-weight subset) / INT4 subset, same blocks and inputs"}
        entry["scale"] = scale
        del dense
        if ref_layers != config.num_layers:
            entry["method"] += (f"; ratio: MLX vs reference on the same {ref_layers} of {config.num_layers} blocks "
                                f"(the fp32 reference does not fit in memory at 24 layers); reference full-model "
                                f"time = timed x FLOP ratio ({scale:.1f})")
        del y_ref
    entry["load_avg_end"] = _load()
    results["stages"].append(entry)
    gc.collect()
    mx.clear_cache()
    if not args.cache_dir:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
