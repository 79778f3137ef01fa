"""PEFT LoRA adapters for the Wan DiT (LongLive's ``lora.pt``), merged into the base weights at conversion.

LongLive 1.0 ([LL] ``utils/lora_utils.py``, ``configs/longlive_inference.yaml``; ``shared/reference/
checkpoints.md`` §3.3): ``LoraConfig(r=256, lora_alpha=256)`` on every Linear of each attention block
(``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``ffn.0``, ``ffn.2``), saved as ``{"generator_lora",
"critic_lora"}`` or a bare dict with PEFT names (``...blocks.{i}.self_attn.q.lora_A.weight`` [r, in],
``lora_B.weight`` [out, r]). Merge: ``W <- W + (alpha / r) B A`` in fp32 (bias untouched). Strict: a key that
is not a recognised LoRA factor, or a factor without its partner, is an error (no silent partial merge).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from .common import ConversionError, open_checkpoint

_FACTOR = re.compile(r"(?:.*\.)?(blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02]))"
                     r"\.lora_([AB])(?:\.default)?\.weight")


def lora_deltas(path, scale: float = 1.0) -> dict[str, mx.array]:
    """``{Wan weight key (e.g. 'blocks.0.self_attn.q.weight'): scale * B @ A}`` (fp32) from a PEFT file."""
    ckpt = open_checkpoint(Path(path))
    keys = [k for k in ckpt if not k.startswith("critic_lora.")]  # LongLive saves the critic's adapter too
    factors: dict[str, dict[str, str]] = {}
    bad = []
    for key in keys:
        m = _FACTOR.fullmatch(key)
        if m is None:
            bad.append(key)
            continue
        factors.setdefault(m.group(1), {})[m.group(2)] = key
    if bad:
        raise ConversionError(f"{path}: {len(bad)} tensor(s) are not LoRA factors of the DiT's attention/FFN Linears "
                              f"(e.g. {bad[:3]}); expected PEFT names like blocks.0.self_attn.q.lora_A.weight")
    if not factors:
        raise ConversionError(f"{path}: no LoRA factors found")
    deltas = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ConversionError(f"{path}: {module} has lora_{next(iter(pair))} but not its partner")
        a, b = ckpt[pair["A"]].astype(mx.float32), ckpt[pair["B"]].astype(mx.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConversionError(f"{path}: {module} LoRA factors have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                  f"expected A [r, in] and B [out, r]")
        deltas[f"{module}.weight"] = scale * (b @ a)
    return deltas
