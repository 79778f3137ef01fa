"""Golden model and fixtures for the generated XCTest target.

A golden model has the exported model's structure at tiny widths (``components.golden_config``), random
fp32 weights written exactly as the real export writes weights, and a ``config.json``. The fixtures are
computed by the **Python runtime** (``wan_dit.load``, ``umt5.load``, ``taehv.load``, ``sampling``) from
that folder, so Swift and Python see the same bytes. fp32 keeps the comparison about the code, not
about half-precision rounding; inputs come from seeded numpy generators (deterministic).

The contract fixtures (``ContractTests.swift``) cover what the exported configuration does not run: the
runtime on other configurations (chunked FFN, masked q/k norm, a 2x1x3 patch, a patch-2 decoder, Euler and
unwarped few-step sampling), NumPy for the pixel shuffle's definition, sentencepiece on variants of the
exported ``spiece.model`` and on hand-made models, and the runtime's request rules and defaults.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import components as C
from .weights import write_safetensors

GOLDEN_SEED = 20260801
TOKENIZER_PROMPTS = (
    "A corgi runs along a sunny beach, waves crashing behind it.",
    "  Time-lapse of clouds   over Tokyo Tower at dusk, 4K, cinematic &amp; moody  ",
    "Un chat noir saute sur une table en bois; café, croissants et lumière douce.",
    "一只熊猫在竹林里吃竹子，阳光透过树叶。",
    "Fish &amp;amp; chips  at the\tpier &#38;amp; a gull &lt;3 &#x41;",  # escaped twice: Wan unescapes twice
)
# Wan's prompt cleaning alone (mlx_video.tokenizer.clean) on texts ftfy leaves as they are (the Swift port has
# no ftfy: it would turn the fullwidth comma of the Chinese prompt into ",", which the tokenizer's nmt_nfkc
# does anyway).
CLEAN_TEXTS = TOKENIZER_PROMPTS[:2] + TOKENIZER_PROMPTS[4:] + (
    "\u00a0 nbsp &nbsp; x", "  lead", "trail  ", "a\tb\nc", "&lt;&gt;&#65;&#x42;&quot;", "x  &amp;lt;  y", "")
# Encoded with max_length = TRUNCATION_LENGTH: more pieces than that, so the ids are cut before EOS.
TRUNCATED_PROMPT = "a cat walks on the beach at sunset while waves crash on the sand"
TRUNCATION_LENGTH = 6
# sentencepiece alone (no Wan cleaning): runs of spaces at both ends and inside, tabs, an empty text.
WHITESPACE_TEXTS = ("  a  cat   on the beach  ", "\tsunset\t\twaves ", "", "   ", "x", "\u200b", "a\u200b", "\x01",
                    "a\x01", "\uff46\uff55 x \uff46", "a\uff46")  # \x01: nmt_nfkc removes it; \uff46: fullwidth f
# User-defined symbols added to the exported model: kept as they are (nmt_nfkc would make them ASCII),
# the longest first.
USER_SYMBOLS = ("\uff46", "\uff46\uff55")
# The normalizer flags of sentencepiece's NormalizerSpec (field number -> name), defaults all true.
NORMALIZER_FLAGS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
# (frames, height, width) requests checked against the Python runtime's GenerationRequest rules.
REQUESTS = ((1, 32, 48), (5, 16, 16), (9, 32, 48), (21, 480, 832), (0, 32, 48), (-3, 32, 48), (2, 32, 48),
            (4, 32, 48), (6, 32, 48), (9, 40, 48), (9, 32, 40), (9, 24, 48), (9, 48, 8), (9, 0, 48),
            (9, 32, 0), (9, -16, 48), (9, 32, -16))


def _folder_section(component: C.Component, config, dtype: str) -> dict:
    return {**dataclasses.asdict(config), "weights_file": component.weights_file, "dtype": dtype}


def golden_weights(component: C.Component, config) -> dict[str, mx.array]:
    """Random fp32 weights for ``config``; the text encoder is quantized like the real one (same bits,
    group size and predicate, through the Python runtime's ``nn.quantize``)."""
    model = C.build_model(component, config, quantized=False)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(C.random_weights(shapes, GOLDEN_SEED + len(component.name)).items()))
    if component is C.TEXT_ENCODER and config.quantization:
        import mlx.nn as nn

        m, q = component.load().module, config.quantization
        nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda path, mod: hasattr(mod, "to_quantized") and m.is_quantized(path, q))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights


def write_golden_model(folder: Path, configs: dict[str, object], sampler_section: dict) -> dict:
    """``configs``: component name -> golden config. Returns the written config.json."""
    folder.mkdir(parents=True)
    config = {"format": "mlx-video/1"}
    for component in C.MODEL_COMPONENTS:
        cfg = configs[component.name]
        write_safetensors(folder / component.weights_file, golden_weights(component, cfg), {"golden": "1"})
        config[component.name] = _folder_section(component, cfg, "float32")
    config["sampler"] = sampler_section
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


class _Stop(Exception):
    pass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _fields(data: bytes):
    """(field number, wire type, raw bytes of the whole field) of a protobuf message, in order."""
    from .spm import _Reader

    reader = _Reader(data)
    while True:
        start = reader.pos
        key = reader.next()
        if key is None:
            return
        if key[1] == 0:
            reader.varint()
        elif key[1] == 2:
            reader.bytes()
        elif key[1] in (1, 5):
            reader.pos += 8 if key[1] == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {key[1]}")
        yield key[0], key[1], data[start:reader.pos]


def with_user_symbols(model: bytes, symbols) -> bytes:
    """``model`` with user-defined pieces appended (score 0)."""
    out = bytearray(model)
    for symbol in symbols:
        text = symbol.encode()
        piece = _varint(1 << 3 | 2) + _varint(len(text)) + text + _varint(3 << 3) + _varint(4)
        out += _varint(1 << 3 | 2) + _varint(len(piece)) + piece
    return bytes(out)


def normalizer_variant(model: bytes, flags: dict[str, bool | None]) -> bytes:
    """``model`` (a sentencepiece ModelProto) with NormalizerSpec flags set (True/False) or left unset (None)."""
    numbers = {name: number for number, name in NORMALIZER_FLAGS.items()}
    out = bytearray()
    for field, wire, raw in _fields(model):
        if field != 3 or wire != 2:
            out += raw
            continue
        from .spm import _Reader

        reader = _Reader(raw)
        reader.next()
        spec = reader.bytes()
        kept = b"".join(r for f, _, r in _fields(spec) if f not in {numbers[n] for n in flags})
        kept += b"".join(_varint(numbers[n] << 3) + _varint(int(v)) for n, v in sorted(flags.items()) if v is not None)
        out += _varint(3 << 3 | 2) + _varint(len(kept)) + kept
    return bytes(out)


# A hand-made unigram model (identity normalizer, no charsmap) whose scores put the Viterbi search's choices on
# a knife's edge: a tie (ab = a + b), unknown characters against pieces that cover them (sentencepiece's
# unknown penalty of 10 decides: z+q wins over zq, xq over x+q), an unused piece, user-defined symbols
# (sentencepiece 0.2.3 scores them 0.1 per byte - 0.1, not its source's `length * max_score - 0.1`: f + u
# (0.08) loses to the user-defined fu (0.1), g + h (0.12) beats gh, and the two-character user-defined ｆｕ
# (six bytes: 0.5) beats ｆ + ｕ (0.4) but not ｊ + ｋ (0.6)); then the same with byte fallback.
# d + d beats dd by one float32 step (dd is -1.5 minus one ulp: its last mantissa bit and byte are set, d's
# are clear); an unknown two-byte character against a piece covering it (kq, as zq). (piece, type, score);
# types as in spm.py.
CRAFTED_PIECES = (("<pad>", 3, 0.0), ("</s>", 3, 0.0), ("<unk>", 2, 0.0), ("\u2581", 1, 0.0), ("a", 1, -1.0),
                  ("b", 1, -1.5), ("ab", 1, -2.5), ("q", 1, 10.5), ("zq", 1, -4.8), ("xq", 1, 0.0), ("w", 1, -5.0),
                  ("c", 5, -40.0), ("~~", 4, 0.0), ("~~~", 4, 0.0), ("^^", 4, 0.0), ("y", 1, 0.5),
                  ("yy", 1, None),  # no score field: 0, against y + y = 1
                  ("d", 1, -0.75), ("dd", 1, struct.unpack("<f", struct.pack("<I", 0xBFC00001))[0]),
                  ("\u043aq", 1, -4.8),
                  ("f", 1, 0.04), ("u", 1, 0.04), ("fu", 4, 0.0), ("g", 1, 0.06), ("h", 1, 0.06), ("gh", 4, 0.0),
                  ("\uff46", 1, 0.2), ("\uff55", 1, 0.2), ("\uff46\uff55", 4, 0.0),
                  ("\uff4a", 1, 0.3), ("\uff4b", 1, 0.3), ("\uff4a\uff4b", 4, 0.0))
CRAFTED_TEXTS = ("ab", "zq", "xq", "zzq", "a c b", "~~", "~~~~~", "^^^", "w~~^^zq", "  a  b  ", "", "é", "yy",
                 "\x01a", "\x1fa", "\u043aa", "\U0001f303a", "dd", "\u043aq", "fu", "gh", "fugh", "ghfu",
                 "\uff46\uff55", "\uff4a\uff4b", "\uff4a\uff4b\uff46\uff55")


def crafted_model(byte_fallback: bool, pieces=CRAFTED_PIECES) -> bytes:
    """``CRAFTED_PIECES`` as a sentencepiece ModelProto (with the 256 byte pieces when ``byte_fallback``), and an
    unknown fixed64 field at the end, which readers skip."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    pieces = list(pieces) + ([(f"<0x{b:02X}>", 6, 0.0) for b in range(256)] if byte_fallback else [])
    for text, kind, score in pieces:
        model.pieces.add(piece=text, type=kind, **({} if score is None else {"score": score}))
    model.trainer_spec.model_type = 1
    model.trainer_spec.vocab_size = len(pieces)
    model.trainer_spec.byte_fallback = byte_fallback
    model.trainer_spec.pad_id, model.trainer_spec.eos_id, model.trainer_spec.unk_id = 0, 1, 2
    model.trainer_spec.bos_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.precompiled_charsmap = b""  # an empty field, written as such
    return model.SerializeToString() + _varint(99 << 3 | 1) + bytes(range(8))


def toy_velocity(x, t):
    """The velocity the sampler fixtures use instead of a DiT (the Swift test writes the same function)."""
    return x * (t / 1000.0) - 0.25


def pixel_shuffle_reference(x: np.ndarray, p: int) -> np.ndarray:
    """``[B, T, H, W, C p p]`` -> ``[B, T, H p, W p, C]`` by its definition: channel ``c p p + i p + j`` of
    pixel ``(h, w)`` goes to channel ``c`` of pixel ``(h p + i, w p + j)``."""
    b, t, h, w, cpp = x.shape
    c = cpp // (p * p)
    out = np.empty((b, t, h * p, w * p, c), x.dtype)
    for i in range(p):
        for j in range(p):
            out[:, :, i::p, j::p, :] = x[..., np.arange(c) * p * p + i * p + j]
    return out


def write_fixtures(model_folder: Path, out: Path, tokenizer_file: Path | None) -> list[str]:
    """Run the Python runtime on the golden model; one safetensors file per component. Returns names."""
    from mlx_video import sampling
    from mlx_video.models import taehv, umt5, wan_dit

    out.mkdir(parents=True)
    rng = np.random.default_rng(GOLDEN_SEED)
    config = json.loads((model_folder / "config.json").read_text())
    written = []

    def save(name: str, arrays: dict, metadata: dict | None = None):
        write_safetensors(out / f"{name}.safetensors", {k: mx.array(v) if not isinstance(v, mx.array) else v
                                                        for k, v in arrays.items()}, metadata)
        written.append(name)

    # DiT: one forward pass, fractional timestep, a context shorter than text_len (padding path).
    dit = wan_dit.load(model_folder, dtype=mx.float32)
    dc = dit.config
    latents = rng.standard_normal((1, 2, 4, 6, dc.in_channels)).astype(np.float32)
    context = rng.standard_normal((1, max(1, dc.text_len - 3), dc.text_dim)).astype(np.float32)
    timesteps = np.array([937.5], np.float32)
    velocity = dit(mx.array(latents), [float(timesteps[0])], context=mx.array(context))
    save("dit", {"latents": latents, "context": context, "timesteps": timesteps, "velocity": velocity})

    # Text encoder: a batch of two prompts of different lengths (key masking and zeroed rows).
    enc = umt5.load(model_folder, dtype=mx.float32)
    ec = enc.config
    lengths = [6, 4]
    tokens = [rng.integers(3, ec.vocab_size, n).tolist() for n in lengths]
    embeddings = enc.encode_tokens(tokens, ec.text_len)
    ids = np.full((2, max(lengths)), ec.pad_id, np.int32)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = t
    save("text_encoder", {"ids": ids, "lengths": np.array(lengths, np.int32), "embeddings": embeddings})

    # Decoder: three latent frames -> 9 frames (parallel decode; the Swift test also streams).
    dec = taehv.load(model_folder, dtype=mx.float32)
    z = rng.standard_normal((1, 3, 4, 5, dec.config.latent_channels)).astype(np.float32)
    save("decoder", {"latents": z, "frames": taehv.decode(dec, mx.array(z))})

    # Sampler schedules: the exported few-step list, and the Euler grid at 8 steps.
    scfg = sampling.sampler_config(config.get("sampler"))
    sched = sampling.schedule(scfg)
    euler = sampling.schedule(sampling.sampler_config(name="euler", steps=8, shift=scfg.shift))
    save("sampler", {"timesteps": np.array(sched.timesteps, np.float32), "sigmas": sched.sigmas.astype(np.float32),
                     "euler_timesteps": np.array(euler.timesteps, np.float32),
                     "euler_sigmas": euler.sigmas.astype(np.float32),
                     "euler_shift": np.array(scfg.shift, np.float32)})

    # One full denoise step through sampling.sample: the DiT's velocity, x0, re-noising with injected noise.
    noise = rng.standard_normal((1, 2, 4, 6, dc.in_channels)).astype(np.float32)
    renoise = [rng.standard_normal(noise.shape).astype(np.float32) for _ in range(max(1, len(sched.timesteps) - 1))]
    text = dit.prepare_text(mx.array(context))
    seen: list = []

    def velocity_fn(x, t):
        if seen:
            seen.append(x)
            raise _Stop
        v = dit(x, [t], text=text)
        seen.append(v)
        return v

    try:
        final = sampling.sample(scfg, velocity_fn, mx.array(noise), renoise=[mx.array(r) for r in renoise])
        next_latents = final  # a one-step schedule ends after its only step
    except _Stop:
        next_latents = seen[1]
    save("denoise_step", {"sampler": np.array(0 if scfg.name == "fewstep" else 1, np.int32),  # 1: euler
                          "noise": noise, "context": context, "renoise": renoise[0],
                          "timestep": np.array(sched.timesteps[0], np.float32),
                          "sigma": np.array(sched.sigmas[0], np.float32),
                          "next_sigma": np.array(sched.sigmas[1], np.float32),
                          "velocity": seen[0], "next_latents": next_latents})

    # The staged pipeline end to end (what LightningVideoPipeline runs): UMT5 on fixed ids, the exported
    # sampler from a seed (noise and re-noising drawn by MLX's PRNG, as on the phone), TAEHV decode.
    pipeline_seed = 7
    pipeline_ids = rng.integers(3, ec.vocab_size, 5).tolist() + [ec.eos_id]
    pipeline_context = enc.encode_tokens([pipeline_ids], ec.text_len)
    pipeline_text = dit.prepare_text(pipeline_context)
    pipeline_noise = sampling.latent_noise((1, 2, 4, 6, dc.in_channels), pipeline_seed)
    pipeline_latents = sampling.sample(scfg, lambda x, t: dit(x, [t], text=pipeline_text), pipeline_noise,
                                       key=pipeline_seed)
    save("pipeline", {"ids": np.array(pipeline_ids, np.int32), "seed": np.array(pipeline_seed, np.int32),
                      "context": pipeline_context, "noise": pipeline_noise, "latents": pipeline_latents,
                      "frames": taehv.decode(dec, pipeline_latents)})

    _contract_fixtures(save, out, dit, enc, dec, scfg)
    _tokenizer_fixtures(save, out, tokenizer_file)
    return written


def _contract_fixtures(save, out: Path, dit, enc, dec, scfg) -> None:
    """What the golden forward passes do not reach, from the Python runtime or NumPy (ContractTests.swift).
    Inputs come from their own generator, so the golden fixtures keep theirs."""
    from mlx_video import sampling
    from mlx_video.models import taehv, umt5, wan_dit

    dc, ec = dit.config, enc.config
    rng = np.random.default_rng(GOLDEN_SEED + 1)

    # The DiT's FFN split into chunks of 3 tokens (more tokens than channels, the last chunk short), and the
    # runtime's budget.
    from mlx_video import ops

    hidden = dc.ffn_dim[0] if isinstance(dc.ffn_dim, list) else dc.ffn_dim
    ffn_x = rng.standard_normal((1, dc.dim + 6, dc.dim)).astype(np.float32)
    ffn_budget = 3 * hidden * 4 * 2 + 7
    save("ffn", {"x": ffn_x, "y": dit.blocks[0].ffn(mx.array(ffn_x), budget=ffn_budget)},
         {"budget": str(ffn_budget), "chunk_tokens": "3", "activation_budget": str(ops.DEFAULT_ATTENTION_BUDGET)})

    # The "masked" q/k RMSNorm of a pruned model (the golden one is "kept"): mean over 4x the kept channels,
    # so weights scale by sqrt(4) = 2 and eps by 4; inputs small enough for eps to matter.
    norm_width, norm_full = 32, 128
    norm = wan_dit.QKNorm(norm_width, dc.eps, norm_full)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, norm_width).astype(np.float32))
    norm_x = (1e-3 * rng.standard_normal((1, 5, norm_width))).astype(np.float32)
    save("qk_norm", {"x": norm_x, "weight": norm.weight, "y": norm(mx.array(norm_x))},
         {"full_width": str(norm_full), "eps": repr(float(dc.eps))})

    # Patchify and unpatchify with a patch whose three sizes differ (the exported one is 1x2x2).
    patched_dit = wan_dit.WanDiT(dataclasses.replace(dc, patch_size=[2, 1, 3]))
    patch_x = rng.standard_normal((1, 4, 3, 6, dc.in_channels)).astype(np.float32)
    tokens, grid = patched_dit.patchify(mx.array(patch_x))
    head_out = rng.standard_normal((1, tokens.shape[1], 2 * 1 * 3 * dc.out_channels)).astype(np.float32)
    save("patchify", {"x": patch_x, "tokens": tokens, "head_out": head_out,
                      "video": patched_dit.unpatchify(mx.array(head_out), grid)},
         {"config": json.dumps(dataclasses.asdict(patched_dit.config), sort_keys=True), "grid": json.dumps(list(grid))})

    # RoPE tables at a real head width (the golden one, 16, splits its pairs the same under many formulas).
    rope_grid, rope_head_dim = (2, 3, 4), 128
    cos, sin = wan_dit.rope_tables(rope_grid, rope_head_dim, dc.rope_theta)
    rope_x = rng.standard_normal((1, cos.shape[0], 2, rope_head_dim)).astype(np.float32)
    save("rope", {"cos": cos, "sin": sin, "x": rope_x, "rotated": wan_dit.apply_rope(mx.array(rope_x), cos, sin)},
         {"grid": json.dumps(rope_grid), "head_dim": str(rope_head_dim), "theta": repr(float(dc.rope_theta))})

    # A decoder the export's configuration is not: patch 2 (pixel shuffle), no spatial upsampling, time upscale
    # 4 from two stages of three, and frames only 2 pixels high (fewer than the 3 trimmed frames). Random
    # weights (their own file), the Python runtime's decode.
    variant = dataclasses.replace(dec.config, patch_size=2, decoder_space_upscale=[False, False, False],
                                  decoder_time_upscale=[True, True, False])
    variant_model = taehv.TAEHV(variant)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(variant_model.parameters())}
    variant_model.load_weights(list(C.random_weights(shapes, GOLDEN_SEED + 2).items()))
    write_safetensors(out / "decoder_variant_weights.safetensors", dict(tree_flatten(variant_model.parameters())))
    variant_z = rng.standard_normal((1, 2, 1, 3, variant.latent_channels)).astype(np.float32)
    save("decoder_variant", {"latents": variant_z, "frames": taehv.decode(variant_model, mx.array(variant_z))},
         {"config": json.dumps(dataclasses.asdict(variant), sort_keys=True),
          "num_frames": json.dumps([variant.num_frames(k) for k in range(4)])})

    # The DiT on a batch of two with one timestep for both (broadcast), and two contexts.
    batch_latents = rng.standard_normal((2, 2, 4, 6, dc.in_channels)).astype(np.float32)
    batch_context = rng.standard_normal((2, dc.text_len, dc.text_dim)).astype(np.float32)
    save("dit_batch", {"latents": batch_latents, "context": batch_context, "timesteps": np.array([625.0], np.float32),
                       "velocity": dit(mx.array(batch_latents), [625.0], context=mx.array(batch_context))})

    # UMT5: relative-position buckets out to distances past max_distance (the golden prompts stay in the exact
    # range), and a float16 projection whose input and output overflow float16 (Wan's fp16 clamp).
    relative = np.arange(-3 * ec.max_distance, 3 * ec.max_distance + 1)
    import mlx.nn as nn

    f16_layer = nn.Linear(8, 6, bias=False)
    f16_layer.weight = mx.array(rng.uniform(-2, 2, (6, 8)).astype(np.float16))
    f16_x = rng.uniform(-1, 1, (1, 3, 8)).astype(np.float32) * np.array([1e5] + [1e4] * 7, np.float32)
    f16_y = umt5.linear(f16_layer, mx.array(f16_x), umt5.Runtime(dtype=mx.float16, dequantize=False,
                                                                 eval_projections=False))
    save("umt5_numerics", {"relative": relative.astype(np.int32),
                           "buckets": umt5.relative_position_bucket(relative, ec.num_buckets, ec.max_distance)
                           .astype(np.int32), "weight": f16_layer.weight, "x": f16_x, "y": f16_y},
         {"num_buckets": str(ec.num_buckets), "max_distance": str(ec.max_distance)})

    # Pixel shuffle at patch 2 (the exported TAEHV has patch 1; other decoders do not).
    shuffle_x = rng.standard_normal((1, 2, 3, 4, 3 * 2 * 2)).astype(np.float32)
    save("pixel_shuffle", {"x": shuffle_x, "y": pixel_shuffle_reference(shuffle_x, 2)}, {"patch": "2"})

    # The whole few-step table (the schedules above read four of its 1000 entries), bit for bit.
    table_sigmas, table_timesteps = sampling.flow_match_table(scfg.shift)
    save("flow_table", {"sigmas": table_sigmas, "timesteps": table_timesteps}, {"shift": repr(float(scfg.shift))})

    # sampling.sample with toy_velocity for samplers and schedules the exported one is not: Euler at 3 and 1
    # steps, the few-step sampler unwarped in two steps (re-noising keys split in two; the second timestep
    # halfway between two table entries: the first is nearest, as numpy's argmin picks), and warped from a
    # list that ends in 0 (CausVid's; 0 is dropped).
    halfway = (float(table_timesteps[600]) + float(table_timesteps[601])) / 2
    sections = [dict(name="euler", steps=3, shift=5.0, guidance=1.0),
                dict(name="euler", steps=1, shift=3.0, guidance=1.0),
                dict(name="fewstep", denoising_step_list=[1000, halfway], warp=False, shift=scfg.shift),
                dict(name="fewstep", denoising_step_list=[1000, 750, 500, 0], warp=True)]
    run_noise = rng.standard_normal((1, 2, 2, 3, 4)).astype(np.float32)
    arrays, meta = {"noise": run_noise}, {}
    for i, section in enumerate(sections):
        run = sampling.sampler_config(**section)
        run_schedule = sampling.schedule(run)
        arrays[f"timesteps_{i}"] = np.array(run_schedule.timesteps, np.float32)
        arrays[f"sigmas_{i}"] = run_schedule.sigmas.astype(np.float32)
        arrays[f"latents_{i}"] = sampling.sample(run, toy_velocity, mx.array(run_noise), key=11 + i)
        meta[f"config_{i}"] = json.dumps({**dataclasses.asdict(run), **section}, sort_keys=True)
        meta[f"seed_{i}"] = str(11 + i)
    save("sampler_runs", arrays, meta)

    # Requests the Python runtime accepts (with its latent shape) or refuses; its default seed; the phone
    # memory settings the generator renders into Pipeline.swift.
    from mlx_video.pipeline import GenerationRequest

    from .codegen import PHONE_MEMORY

    arrays, meta = {}, {k: str(v) for k, v in PHONE_MEMORY.items()}
    meta["default_seed"] = str(GenerationRequest(prompt="x").seed)
    for i, (frames, height, width) in enumerate(REQUESTS):
        request = GenerationRequest(prompt="x", frames=frames, height=height, width=width)
        try:
            request.validate()
            arrays[f"latent_shape_{i}"] = np.array(request.latent_shape(), np.int32)
        except ValueError:
            pass
        meta[f"request_{i}"] = json.dumps({"frames": frames, "height": height, "width": width})
    save("requests", arrays, meta)



def _sentencepiece_ids(out: Path, models: dict[str, bytes], texts) -> tuple[dict, dict]:
    """Write each model as ``spiece_<name>.model`` and sentencepiece's ids of every text under it: the arrays
    ``<name>_ids_<i>`` and the metadata naming each model file and text."""
    import sentencepiece as spm

    arrays, meta = {}, {}
    for name, data in models.items():
        (out / f"spiece_{name}.model").write_bytes(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
        meta[f"model_{name}"] = f"spiece_{name}.model"
        for i, text in enumerate(texts):
            arrays[f"{name}_ids_{i}"] = np.array(sp.encode(text), np.int32)
            meta[f"text_{i}"] = text
    return arrays, meta


def _tokenizer_fixtures(save, out: Path, tokenizer_file: Path | None) -> None:
    """Tokenizer ids and cleaning from the Python runtime and sentencepiece, and the model files they use."""
    from mlx_video.tokenizer import clean

    if tokenizer_file is not None:
        import warnings

        from mlx_video.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_file)
        arrays, meta = {}, {}
        for i, prompt in enumerate(TOKENIZER_PROMPTS):
            arrays[f"ids_{i}"] = np.array(tok.encode(prompt), np.int32)
            meta[f"prompt_{i}"] = prompt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning: truncating is the point here
            short = Tokenizer(tokenizer_file, max_length=TRUNCATION_LENGTH)
            arrays["truncated_ids"] = np.array(short.encode(TRUNCATED_PROMPT), np.int32)
        meta.update(truncated_prompt=TRUNCATED_PROMPT, truncation_length=str(TRUNCATION_LENGTH),
                    max_length=str(tok.max_length), pad_id=str(tok.pad_id), eos_id=str(tok.eos_id))
        save("tokenizer", arrays, meta)

        # The exported model with its normalizer flags unset (defaults), all off, only extra whitespace kept,
        # and with user-defined symbols added: sentencepiece's ids on whitespace runs and symbols.
        model = tokenizer_file.read_bytes()
        variants = {"defaults": normalizer_variant(model, {n: None for n in NORMALIZER_FLAGS.values()}),
                    "flags_off": normalizer_variant(model, {n: False for n in NORMALIZER_FLAGS.values()}),
                    "prefix_only": normalizer_variant(model, {"add_dummy_prefix": True,
                                                              "remove_extra_whitespaces": False,
                                                              "escape_whitespaces": True}),
                    "user_defined": with_user_symbols(model, USER_SYMBOLS)}
        save("tokenizer_normalizer", *_sentencepiece_ids(out, variants, WHITESPACE_TEXTS))

    # Wan's cleaning and the hand-made models (they need no exported tokenizer).
    save("tokenizer_clean", {"count": np.array(len(CLEAN_TEXTS), np.int32)},
         {**{f"text_{i}": t for i, t in enumerate(CLEAN_TEXTS)},
          **{f"clean_{i}": clean(t) for i, t in enumerate(CLEAN_TEXTS)}})
    crafted = {"crafted": crafted_model(False), "crafted_bytes": crafted_model(True)}
    save("tokenizer_crafted", *_sentencepiece_ids(out, crafted, CRAFTED_TEXTS))
