"""A complete small model folder built by the converters from small random PyTorch models.

DiT: diffusers ``WanTransformer3DModel``; text encoder: transformers ``UMT5EncoderModel`` (INT4 after
conversion) with a sentencepiece model trained in-process; decoder: the PyTorch TAEHV of the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mlx_video.cli import main
from tests.dit_reference import make_diffusers_dit
from tests.taehv_reference import TAEHVReference, randomize_
from tests.test_umt5 import train_tiny_spm

TEXT_DIM = 64
TAEHV_SMALL = dict(decoder_channels=(32, 16, 8, 8), encoder_channels=8, depth=1)


def build_sources(d: Path) -> dict:
    from transformers import UMT5Config, UMT5EncoderModel
    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_spm(d / "spiece.model")
    vocab = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size() + 7
    torch.manual_seed(0)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=vocab, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                     d_model=TEXT_DIM, d_kv=16, num_heads=4, d_ff=128, num_layers=2)).eval()
    with torch.no_grad():
        t5.shared.weight.normal_(0, 1.0)
    t5.save_pretrained(d / "umt5")
    dit = make_diffusers_dit(heads=2, head_dim=32, ffn=128, layers=2, text_dim=TEXT_DIM, seed=0, std=0.05)
    dit.save_pretrained(d / "dit")
    tae = randomize_(TAEHVReference(**TAEHV_SMALL), seed=0).eval()
    save_file({k: v.contiguous() for k, v in tae.state_dict().items()}, str(d / "taew2_1.safetensors"))
    return {"dit": dit, "umt5": t5, "taehv": tae, "tokenizer": tok, "dir": d}


def build_model_folder(d: Path, sources: dict | None = None, quantize: bool = True) -> Path:
    sources = sources or build_sources(d / "sources")
    out = d / "model"
    argv = ["convert", "--mlx-path", str(out), "--dit", str(sources["dir"] / "dit"),
            "--text-encoder", str(sources["dir"] / "umt5"), "--tokenizer", str(sources["tokenizer"]),
            "--decoder", str(sources["dir"] / "taew2_1.safetensors"), "--dtype", "float32"]
    if quantize:
        argv += ["-q", "--q-bits", "4", "--q-group-size", "32"]
    assert main(argv) == 0
    return out
