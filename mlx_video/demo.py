"""``mlx-video demo``: a tiny random-weight model folder, to try every stage without downloading weights.

It has the real architectures (Wan DiT, UMT5 encoder, TAEHV decoder, sentencepiece tokenizer) at toy
sizes with random weights, so its videos are moving coloured noise: it shows that the pipeline, the CLI
and the memory report work on a machine, not what the model can draw. Built in a few seconds, no torch.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .models import taehv, umt5, wan_dit
from .utils import config_to_dict, parameter_count

CORPUS = [
    "a red fox running through fresh snow", "waves crashing on a rocky beach at sunset",
    "a cat sleeping on a warm windowsill", "a drone shot over a green forest in the morning mist",
    "two astronauts floating inside a space station", "city traffic at night with neon lights",
    "a hot air balloon rising over mountains", "rain drops falling on a quiet lake",
]
TEXT_DIM = 64


def _randomize(model, seed: int, special: dict | None = None) -> dict[str, mx.array]:
    """Weights ~ N(0, 1/fan_in) (activations stay O(1)), zero biases, unit norms, small modulation."""
    key = mx.random.key(seed)
    out = {}
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        k = mx.random.fold_in(key, i) if hasattr(mx.random, "fold_in") else mx.random.key(seed * 10007 + i)
        if special and name in special:
            out[name] = special[name](p, k)
        elif name.endswith("bias"):
            out[name] = mx.zeros_like(p)
        elif "norm" in name and p.ndim == 1:
            out[name] = mx.ones_like(p)
        elif "modulation" in name:
            out[name] = 0.1 * mx.random.normal(p.shape, key=k)
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 1
            out[name] = mx.random.normal(p.shape, key=k) / math.sqrt(fan_in)
    return out


def _train_tokenizer(path: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=96, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
                                   minloglevel=2)
    path.write_bytes(buf.getvalue())


def build_demo_model(mlx_path, seed: int = 0) -> Path:
    from .utils import save_weights, write_config_section

    from .fsio import atomic_model_folder
    from .tokenizer import load_tokenizer

    with atomic_model_folder(mlx_path, replace=("dit.safetensors", "text_encoder.safetensors", "spiece.model",
                                                "decoder.safetensors")) as tmp:
        _train_tokenizer(tmp / umt5.TOKENIZER_NAME)
        tok = load_tokenizer(tmp)

        t5_cfg = umt5.UMT5Config(vocab_size=tok.vocab_size, dim=TEXT_DIM, dim_attn=64, dim_ffn=128, num_heads=4,
                                 num_layers=2)
        t5 = umt5.UMT5Encoder(t5_cfg)
        t5_w = _randomize(t5, seed, {"token_embedding.weight": lambda p, k: mx.random.normal(p.shape, key=k)})
        save_weights(tmp / umt5.WEIGHTS_NAME, t5_w)
        write_config_section(tmp, None, "text_encoder", {
            **config_to_dict(t5_cfg), "weights_file": umt5.WEIGHTS_NAME, "dtype": "float32",
            "parameters": parameter_count(t5), "tokenizer_file": umt5.TOKENIZER_NAME,
            "tokenizer_sha256": tok.fingerprint, "tokenizer_vocab_size": tok.vocab_size,
            "summary": "demo UMT5 (random weights)"})

        dit_cfg = wan_dit.WanDiTConfig(dim=128, num_layers=2, self_attn_heads=2, cross_attn_heads=2, ffn_dim=256,
                                       head_dim=64, text_dim=TEXT_DIM)
        dit = wan_dit.WanDiT(dit_cfg)
        save_weights(tmp / wan_dit.WEIGHTS_NAME, _randomize(dit, seed + 1))
        write_config_section(tmp, tmp, "dit", {
            **config_to_dict(dit_cfg), "weights_file": wan_dit.WEIGHTS_NAME, "dtype": "float32",
            "parameters": parameter_count(dit), "source_layout": "demo (random weights)"})

        dec_cfg = taehv.TAEHVConfig(decoder_channels=[32, 16, 8, 8], depth=1, has_encoder=False)
        dec = taehv.TAEHV(dec_cfg)
        last = max((n for n, _ in tree_flatten(dec.parameters()) if n.endswith(".weight")),
                   key=lambda n: int(n.split(".")[1]))
        last_bias = last[: -len("weight")] + "bias"
        special = {  # a mid-grey, low-contrast last layer so frames spread inside (0, 1)
            last: lambda p, k: 0.05 * mx.random.normal(p.shape, key=k) / math.sqrt(math.prod(p.shape[1:])),
            last_bias: lambda p, k: mx.full(p.shape, 0.5),
        }
        save_weights(tmp / taehv.WEIGHTS_NAME, _randomize(dec, seed + 2, special))
        write_config_section(tmp, tmp, "decoder", {
            **config_to_dict(dec_cfg), "weights_file": taehv.WEIGHTS_NAME, "dtype": "float32",
            "parameters": parameter_count(dec), "summary": "demo TAEHV (random weights)"})
        write_config_section(tmp, tmp, "sampler", {"name": "fewstep", "denoising_step_list": [1000, 750, 500, 250],
                                                   "shift": 5.0, "warp": True})
        write_config_section(tmp, tmp, "demo", {"note": "random weights: the videos are coloured noise", "seed": seed})
    return Path(mlx_path)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build a tiny random-weight model folder to try the pipeline",
                              description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlx-path", default="demo-model", help="output model folder")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.set_defaults(func=run)


def run(args) -> int:
    path = build_demo_model(args.mlx_path, args.seed)
    print(f"wrote {path}: a tiny model with random weights, so its videos are moving coloured noise by design (it "
          f"shows the pipeline works). Try: mlx-video generate --model {path} --prompt \"a red fox\"", file=sys.stderr)
    return 0
