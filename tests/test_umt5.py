"""UMT5 text encoder: parity with transformers from both key layouts, relative-position buckets, INT4
quantization (error bound, quantized vs dequantized paths), streaming and lazy-embedding loading, unloading, the
prompt cache, fp16 safety, the memory estimate and the converter's bad-input errors.

Tolerances: fp32 parity with transformers ``UMT5EncoderModel``: max |ours - ref| / max |ref| <= 1e-5 per
prompt. INT4 (g64, RTN affine) vs full precision on this tiny random model: cosine per token >= 0.95 and
mean >= 0.98 (measured min 0.971, mean 0.988). Quantized matmul vs dequantize-then-matmul: relative error <= 1e-5.
"""

import io
import json
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from converters.common import ConversionError, read_safetensors_header
from mlx_video.cli import build_parser
from mlx_video.models import umt5
from mlx_video.tokenizer import load_tokenizer
from mlx_video.utils import ModelFolderError, free_memory

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sits on a warm windowsill in the afternoon sun.",
    "Camera pans slowly across a mountain lake at dawn, mist over the water.",
    "Two astronauts float in zero gravity, cinematic lighting.",
]
# Real lengths 1 (EOS only), short, and ~150 tokens (relative distances past 16, 32, 64 and 128).
PROMPTS = ["", "a quick fox", "the cat sits on a warm windowsill " * 6 + "at dawn, mist over the lake " * 4]
DIMS = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)


def train_tiny_spm(path, vocab_size=80):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=vocab_size,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   character_coverage=1.0, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def convert(*argv):
    argv = ["convert", *map(str, argv)]
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


def wan_state_dict(hf_state: dict) -> dict:
    """HF UMT5EncoderModel keys -> Wan T5Encoder keys (gate.0 <- wi_0, fc1 <- wi_1)."""
    out = {}
    for k, v in hf_state.items():
        if k == "encoder.embed_tokens.weight":
            continue
        k2 = (k.replace("shared.weight", "token_embedding.weight").replace("encoder.final_layer_norm", "norm")
              .replace("encoder.block.", "blocks.").replace("layer.0.layer_norm", "norm1")
              .replace("layer.1.layer_norm", "norm2").replace("layer.0.SelfAttention.relative_attention_bias",
                                                              "pos_embedding.embedding")
              .replace("layer.0.SelfAttention.", "attn.").replace("layer.1.DenseReluDense.wi_0", "ffn.gate.0")
              .replace("layer.1.DenseReluDense.wi_1", "ffn.fc1").replace("layer.1.DenseReluDense.wo", "ffn.fc2"))
        out[k2] = v.clone()
    return out


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    from transformers import UMT5Config, UMT5EncoderModel

    d = tmp_path_factory.mktemp("umt5")
    tok = train_tiny_spm(d / "spiece.model")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size() + 7
    torch.manual_seed(0)
    hf = UMT5EncoderModel(UMT5Config(vocab_size=vocab, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                     **DIMS)).eval()
    with torch.no_grad():  # T5's init is tiny for the embedding; widen it so every path is exercised
        hf.shared.weight.normal_(0, 1.0)
    hf.save_pretrained(d / "hf")
    torch.save(wan_state_dict(hf.state_dict()), d / "models_t5_umt5-xxl-enc-bf16.pth")
    convert("--text-encoder", d / "hf", "--tokenizer", tok, "--mlx-path", d / "fp32_hf", "--dtype", "float32")
    convert("--text-encoder", d / "models_t5_umt5-xxl-enc-bf16.pth", "--tokenizer", tok, "--mlx-path",
            d / "fp32_wan", "--dtype", "float32")
    convert("--text-encoder", d / "hf", "--tokenizer", tok, "--mlx-path", d / "int4", "--dtype", "float32",
            "-q", "--q-bits", "4", "--q-group-size", "64")
    return {"dir": d, "hf": hf, "tok": tok, "vocab": vocab}


def reference(hf, tokens: list[list[int]]) -> np.ndarray:
    length = max(len(t) for t in tokens)
    ids = torch.zeros(len(tokens), length, dtype=torch.long)
    mask = torch.zeros(len(tokens), length, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = 1
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# --------------------------------------------------------------------------------------------------


def test_relative_position_buckets_match_reference():
    from transformers import UMT5Config
    from transformers.models.t5.modeling_t5 import T5Attention
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    rel = torch.arange(-600, 601)
    ours = umt5.relative_position_bucket(rel.numpy())
    attn = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128),
                         has_relative_attention_bias=True)
    np.testing.assert_array_equal(ours, attn._relative_position_bucket(rel).numpy())
    np.testing.assert_array_equal(ours, T5Attention._relative_position_bucket(rel, True, 32, 128).numpy())
    table = {-130: 15, -128: 15, -127: 15, -100: 15, -64: 14, -63: 13, -32: 12, -31: 11, -16: 10, -15: 9, -12: 9,
             -11: 8, -8: 8, -7: 7, -1: 1, 0: 0, 1: 17, 2: 18, 7: 23, 8: 24, 11: 24, 12: 25, 15: 25, 16: 26, 23: 27,
             24: 27, 31: 27, 32: 28, 45: 28, 46: 29, 63: 29, 64: 30, 90: 30, 91: 31, 127: 31, 128: 31, 500: 31}
    for r, b in table.items():  # shared/reference/models.md §2.2, boundaries 16, 32, 64 included
        assert ours[r + 600] == b, r
    # Other settings (unidirectional, other bucket counts) also follow the reference function.
    np.testing.assert_array_equal(umt5.relative_position_bucket(rel.numpy(), 64, 256, bidirectional=False),
                                  T5Attention._relative_position_bucket(rel, False, 64, 256).numpy())


@pytest.mark.parametrize("folder", ["fp32_hf", "fp32_wan"])
def test_parity_with_transformers(env, folder):
    enc = umt5.load(env["dir"] / folder)
    tok = load_tokenizer(env["dir"] / folder)
    tokens = [tok.encode(p) for p in PROMPTS]
    assert sorted(len(t) for t in tokens)[0] == 1 and max(len(t) for t in tokens) > 130
    out = umt5.encode_prompts(enc, tok, PROMPTS)
    assert out.shape == (3, 512, DIMS["d_model"]) and out.dtype == mx.float32
    ref = reference(env["hf"], tokens)  # padded batch with attention mask, as Wan runs it
    out = np.array(out)
    for i, t in enumerate(tokens):
        n = len(t)
        assert rel_err(out[i, :n], ref[i, :n]) <= 1e-5, (folder, i)
        assert not out[i, n:].any()  # exact zeros from the real length to 512
    # One prompt alone (no padding at all) gives the same rows as inside the padded batch.
    alone = np.array(umt5.encode_prompts(enc, tok, PROMPTS[1:2]))[0]
    assert rel_err(alone[: len(tokens[1])], out[1, : len(tokens[1])]) <= 1e-6


def test_layouts_give_identical_files(env):
    a = mx.load(str(env["dir"] / "fp32_hf" / umt5.WEIGHTS_NAME))
    b = mx.load(str(env["dir"] / "fp32_wan" / umt5.WEIGHTS_NAME))
    assert sorted(a) == sorted(b)
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    section = json.loads((env["dir"] / "fp32_wan" / "config.json").read_text())["text_encoder"]
    assert section["source_layout"] == "wan" and section["num_layers"] == 2 and section["num_heads"] == 4
    assert section["dim_attn"] == 64 and section["dim_ffn"] == 128 and section["weights_file"] == umt5.WEIGHTS_NAME


def test_bf16_wan_pth_default_dtype(env, tmp_path):
    """Wan ships bf16: the .pth and the HF files (cast to bf16) give the same bf16 folder, which loads
    (embedding rows read from the memory-mapped bf16 table) and encodes close to fp32."""
    state = {k: v.to(torch.bfloat16) for k, v in torch.load(env["dir"] / "models_t5_umt5-xxl-enc-bf16.pth",
                                                              weights_only=True).items()}
    torch.save(state, tmp_path / "enc-bf16.pth")
    convert("--text-encoder", tmp_path / "enc-bf16.pth", "--tokenizer", env["tok"], "--mlx-path", tmp_path / "wan")
    convert("--text-encoder", env["dir"] / "hf", "--tokenizer", env["tok"], "--mlx-path", tmp_path / "hf")
    a, b = mx.load(str(tmp_path / "wan" / umt5.WEIGHTS_NAME)), mx.load(str(tmp_path / "hf" / umt5.WEIGHTS_NAME))
    assert a["token_embedding.weight"].dtype == mx.bfloat16 and a["norm.weight"].dtype == mx.float32
    assert sorted(a) == sorted(b)
    for k in a:  # norms and position tables are stored fp32 (from bf16 values in the .pth)
        assert mx.array_equal(a[k], b[k].astype(mx.bfloat16).astype(b[k].dtype)), k
    enc, tok = umt5.load(tmp_path / "wan"), load_tokenizer(tmp_path / "wan")
    assert isinstance(enc.token_embedding, umt5.MappedEmbedding)
    ref = umt5.load(env["dir"] / "fp32_hf")
    n = len(tok.encode(PROMPTS[2]))
    out, full = umt5.encode_prompts(enc, tok, PROMPTS[2:]), umt5.encode_prompts(ref, tok, PROMPTS[2:])
    assert rel_err(out[0, :n], full[0, :n]) < 0.05


def test_prefixed_hf_file_with_only_the_tied_alias(env, tmp_path):
    """A single safetensors with a ``text_encoder.`` prefix and only ``encoder.embed_tokens.weight``."""
    from safetensors.torch import save_file

    state = {("text_encoder." + k.replace("shared.weight", "encoder.embed_tokens.weight")): v.contiguous()
             for k, v in env["hf"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(tmp_path / "te.safetensors"))
    convert("--text-encoder", tmp_path / "te.safetensors", "--tokenizer", env["tok"], "--mlx-path", tmp_path / "o",
            "--dtype", "float32")
    a = mx.load(str(tmp_path / "o" / umt5.WEIGHTS_NAME))
    b = mx.load(str(env["dir"] / "fp32_hf" / umt5.WEIGHTS_NAME))
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]) for k in a)


def _bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (Linux ``rchar``)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_embedding_rows_read_without_loading_the_table(env, monkeypatch):
    """Six rows cost six rows of reads: the whole-table loaders are never called and the bytes read are
    those of the rows (plus a header), not of the table (the mmapped .pth reads ~nothing)."""
    from converters import common
    from converters.common import open_checkpoint
    from converters.umt5 import _row_reader

    for source, key in ((env["dir"] / "hf", "shared.weight"),
                        (env["dir"] / "models_t5_umt5-xxl-enc-bf16.pth", "token_embedding.weight")):
        ckpt = open_checkpoint(source)
        table = ckpt[key]  # the reference, read before the guards below
        mx.eval(table)
        reader = _row_reader(ckpt, key)

        def whole_table_loaded(*args, **kwargs):
            raise AssertionError(f"{source}: the whole embedding table was loaded to read 6 rows")

        monkeypatch.setattr(mx, "load", whole_table_loaded)
        monkeypatch.setattr(common, "_torch_to_mx", whole_table_loaded)
        before = _bytes_read()
        rows = reader(3, 9)
        mx.eval(rows)
        read = _bytes_read() - before
        monkeypatch.undo()
        assert mx.array_equal(rows, table[3:9])
        row_bytes = table.nbytes // table.shape[0]
        files = sorted(source.glob("*.safetensors")) if source.is_dir() else []
        header = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)  # may be re-parsed
        assert read <= 6 * row_bytes + header + 512, (source, read, 6 * row_bytes, header, table.nbytes)


def test_t5_encoder_with_shared_position_table(env, tmp_path):
    """T5EncoderModel-style checkpoint (position table only in block 0, shared): copied into every block."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    hf = T5EncoderModel(T5Config(vocab_size=env["vocab"], dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                 **DIMS)).eval()
    hf.save_pretrained(tmp_path / "t5")
    convert("--text-encoder", tmp_path / "t5", "--tokenizer", env["tok"], "--mlx-path", tmp_path / "out",
            "--dtype", "float32")
    enc, tok = umt5.load(tmp_path / "out"), load_tokenizer(tmp_path / "out")
    tokens = [tok.encode(p) for p in PROMPTS[1:]]
    out, ref = np.array(umt5.encode_prompts(enc, tok, PROMPTS[1:])), reference(hf, tokens)
    for i, t in enumerate(tokens):
        assert rel_err(out[i, :len(t)], ref[i, :len(t)]) <= 1e-5


def test_int4_error_and_paths(env):
    full, tok = umt5.load(env["dir"] / "fp32_hf"), load_tokenizer(env["dir"] / "fp32_hf")
    q = umt5.load(env["dir"] / "int4")
    section = json.loads((env["dir"] / "int4" / "config.json").read_text())["text_encoder"]
    assert section["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine", "keep": [], "embedding": False}
    # The folder loads back into a quantized model; embedding, position tables and norms stay full precision.
    assert isinstance(q.blocks[0].attn.q, nn.QuantizedLinear) and q.blocks[1].ffn.fc2.bits == 4
    assert q.blocks[1].ffn.fc2.group_size == 64
    header = read_safetensors_header(env["dir"] / "int4" / umt5.WEIGHTS_NAME)
    assert header["blocks.0.ffn.gate.weight"]["dtype"] == "U32"
    assert {header[k]["dtype"] for k in ("token_embedding.weight", "blocks.0.pos_embedding.weight",
                                         "blocks.1.norm2.weight", "norm.weight")} == {"F32"}
    tokens = [tok.encode(p) for p in PROMPTS]
    a, b = np.array(umt5.encode_prompts(q, tok, PROMPTS)), np.array(umt5.encode_prompts(full, tok, PROMPTS))
    cosines = []
    for i, t in enumerate(tokens):
        x, y = a[i, :len(t)], b[i, :len(t)]
        cosines += list((x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1))
    assert min(cosines) >= 0.95, min(cosines)  # measured: min 0.971, mean 0.988 on this tiny random model
    assert np.mean(cosines) >= 0.98, np.mean(cosines)
    # quantized_matmul (GPU path) and dequantize-then-fp32-matmul (CPU path) agree.
    q.runtime.dequantize = False
    c = np.array(umt5.encode_prompts(q, tok, PROMPTS))
    assert rel_err(c, a) <= 1e-5


def test_gpu_runtime_path_matches_cpu_path(env):
    """The GPU code path (fused SDPA with bias + key mask, quantized_matmul, lazy graph), run on the CPU."""
    tok = load_tokenizer(env["dir"] / "int4")
    cpu = umt5.load(env["dir"] / "int4")
    gpu = umt5.load(env["dir"] / "int4")
    gpu.runtime = umt5.Runtime(dtype=mx.float32, dequantize=False, fused=True, eval_projections=False)
    a = np.array(umt5.encode_prompts(cpu, tok, PROMPTS))
    b = np.array(umt5.encode_prompts(gpu, tok, PROMPTS))
    assert rel_err(b, a) <= 1e-5
    gpu.runtime = umt5.Runtime(dtype=mx.bfloat16, dequantize=False, fused=True, eval_projections=False)
    c = np.array(umt5.encode_prompts(gpu, tok, PROMPTS))
    assert rel_err(c, a) <= 5e-2 and not c[0, 1:].any()


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_dequantize_fp32_is_exact(bits):
    w = mx.random.normal((40, 256), key=mx.random.key(bits))
    for dtype in (mx.float32, mx.bfloat16):
        wq, scales, biases = mx.quantize(w.astype(dtype), 64, bits)
        expected = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), 64, bits)
        assert mx.array_equal(umt5.dequantize_fp32(wq, scales, biases, 64, bits), expected)


def test_q_keep_and_quantized_embedding(env, tmp_path):
    convert("--text-encoder", env["dir"] / "hf", "--tokenizer", env["tok"], "--mlx-path", tmp_path / "o", "-q",
            "--q-group-size", "32", "--q-keep", "attn.o,blocks.1.ffn.fc2", "--q-embedding")
    header = read_safetensors_header(tmp_path / "o" / umt5.WEIGHTS_NAME)
    assert header["blocks.0.attn.o.weight"]["dtype"] == "BF16" and "blocks.0.attn.o.scales" not in header
    assert header["blocks.1.ffn.fc2.weight"]["dtype"] == "BF16"
    assert header["blocks.0.ffn.fc2.weight"]["dtype"] == "U32"
    assert header["token_embedding.weight"]["dtype"] == "U32" and "token_embedding.scales" in header
    enc, tok = umt5.load(tmp_path / "o"), load_tokenizer(tmp_path / "o")
    full = umt5.load(env["dir"] / "fp32_hf")
    a, b = np.array(umt5.encode_prompts(enc, tok, PROMPTS[1:2])), np.array(umt5.encode_prompts(full, tok, PROMPTS[1:2]))
    n = len(tok.encode(PROMPTS[1]))
    cos = (a[0, :n] * b[0, :n]).sum(-1) / np.linalg.norm(a[0, :n], axis=-1) / np.linalg.norm(b[0, :n], axis=-1)
    assert cos.min() >= 0.95, cos  # INT4 embedding + INT4 projections, bf16 scales


def test_streaming_and_lazy_embedding_match_resident(env):
    tok = load_tokenizer(env["dir"] / "int4")
    resident = umt5.load(env["dir"] / "int4", lazy_embedding=False)
    assert isinstance(resident.token_embedding, nn.Embedding)
    streamed = umt5.load(env["dir"] / "int4", stream=True)
    assert streamed.blocks == [] and isinstance(streamed.token_embedding, umt5.MappedEmbedding)
    from mlx.utils import tree_flatten

    assert [k for k, _ in tree_flatten(streamed.parameters())] == ["norm.weight"]  # nothing else resident
    a = np.array(umt5.encode_prompts(resident, tok, PROMPTS))
    b = np.array(umt5.encode_prompts(streamed, tok, PROMPTS))
    np.testing.assert_array_equal(a, b)


def test_unload_returns_memory(env):
    tok = load_tokenizer(env["dir"] / "fp32_hf")
    free_memory()
    umt5._bucket_matrix.cache_clear()
    base = mx.get_active_memory()
    enc = umt5.load(env["dir"] / "fp32_hf", lazy_embedding=False)
    out = umt5.encode_prompts(enc, tok, PROMPTS)
    mx.eval(out)
    loaded = mx.get_active_memory()
    assert loaded - base > 200_000  # the weights (85k fp32 parameters) are resident
    del enc, out
    umt5._bucket_matrix.cache_clear()
    free_memory()
    assert mx.get_active_memory() - base < 4096


def test_prompt_cache(env, tmp_path, monkeypatch):
    enc, tok = umt5.load(env["dir"] / "fp32_hf"), load_tokenizer(env["dir"] / "fp32_hf")
    calls = []
    original = enc.encode_tokens

    def counting(token_lists, text_len=None):
        calls.append(len(token_lists))
        return original(token_lists, text_len)

    monkeypatch.setattr(enc, "encode_tokens", counting)
    cache = tmp_path / "cache"
    first = umt5.encode_prompts(enc, tok, PROMPTS, cache_dir=cache)
    assert calls == [3] and len(list(cache.glob("*.safetensors"))) == 3
    again = umt5.encode_prompts(enc, tok, ["  a   quick fox ", PROMPTS[0]], cache_dir=cache)  # same cleaned text
    assert calls == [3]  # the encoder did not run
    assert mx.array_equal(again[0], first[1]) and mx.array_equal(again[1], first[0])
    # A corrupt or truncated cache file is a miss: recomputed (same result) and rewritten.
    files = sorted(cache.glob("*.safetensors"))
    files[0].write_bytes(b"garbage")
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    redo = umt5.encode_prompts(enc, tok, PROMPTS, cache_dir=cache)
    assert calls == [3, 2]
    assert mx.array_equal(redo, first)
    umt5.encode_prompts(enc, tok, PROMPTS, cache_dir=cache)
    assert calls == [3, 2]
    # Another model (weights fingerprint) does not reuse these embeddings.
    enc.fingerprint = "sha256:other"
    umt5.encode_prompts(enc, tok, PROMPTS[1:2], cache_dir=cache)
    assert calls == [3, 2, 1]


def test_fp16_does_not_overflow(env, monkeypatch):
    enc = umt5.load(env["dir"] / "fp32_hf", dtype=mx.float16, lazy_embedding=False)
    ref = umt5.load(env["dir"] / "fp32_hf", lazy_embedding=False)
    ids = mx.array([[5, 9, 17, 3, 1]])
    assert rel_err(enc(ids), ref(ids)) < 1e-2
    for model in (enc, ref):  # weights blown up so fp16 matmuls would overflow
        for block in model.blocks:
            block.ffn.fc1.weight = block.ffn.fc1.weight * 3000
            block.ffn.fc2.weight = block.ffn.fc2.weight * 3000
    out = enc(ids)
    assert bool(mx.isfinite(out).all())
    # Reference: the fp32 model with Wan's fp16_clamp applied to every projection's input and output.
    unclamped = ref(ids)
    original = umt5.linear

    def clamped(layer, x, rt):
        return mx.clip(original(layer, mx.clip(x, -65504.0, 65504.0), rt), -65504.0, 65504.0)

    monkeypatch.setattr(umt5, "linear", clamped)
    expected = ref(ids)
    assert rel_err(unclamped, expected) > 1e-3  # the clamp really engaged: fp16 would have overflowed here
    a, b = np.array(out, np.float64)[0], np.array(expected, np.float64)[0]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.98, cosine  # per token (measured min 0.991): fp16 rounds coarsely near the clamp
    assert np.median(np.abs(a - b)) <= 1e-2 * np.abs(b).max(), np.median(np.abs(a - b))


def test_peak_memory_estimate(env):
    section = json.loads((env["dir"] / "int4" / "config.json").read_text())["text_encoder"]
    tok = load_tokenizer(env["dir"] / "int4")
    free_memory()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    enc = umt5.load(env["dir"] / "int4")
    mx.eval(umt5.encode_prompts(enc, tok, PROMPTS[2:]))
    measured = mx.get_peak_memory() - base
    predicted = umt5.text_encoder_peak_bytes(section, len(tok.encode(PROMPTS[2])), 1, storage_dtype="float32")
    # measured ratio 1.51 on this tiny model
    assert measured <= predicted <= 1.75 * measured, (measured, predicted, predicted / measured)
    # Full size (UMT5-xxl, 512 tokens): INT4 g64 streamed fits the 2.5 GB target, bf16 resident does not.
    q = {"bits": 4, "group_size": 64, "mode": "affine", "keep": [], "embedding": False}
    xxl = umt5.UMT5Config(quantization=q)
    assert umt5.text_encoder_peak_bytes(xxl, 512, stream=True) < 2.5e9
    assert umt5.text_encoder_peak_bytes(umt5.UMT5Config(), 512, dequantize=False, lazy_embedding=False) > 11.3e9
    assert umt5.block_weight_bytes(xxl) == pytest.approx(192_937_984 * 4.5 / 8, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# Bad inputs: a clear error and nothing written
# --------------------------------------------------------------------------------------------------


def assert_nothing_written(parent):
    assert not (parent / "out").exists()
    assert not list(parent.glob(".out.partial-*"))


def test_bad_inputs(env, tmp_path):
    d, tok = env["dir"], env["tok"]
    bad_tok = tmp_path / "bad.model"
    bad_tok.write_bytes(b"not a sentencepiece model")
    cases = [
        (["--text-encoder", d / "hf", "--tokenizer", bad_tok], "not a sentencepiece model"),
        (["--text-encoder", d / "hf", "--tokenizer", tok, "-q", "--q-bits", "7"], "--q-bits 7 is not supported"),
        (["--text-encoder", d / "hf", "--tokenizer", tok, "-q", "--q-group-size", "48"], "--q-group-size 48"),
        (["--text-encoder", d / "hf", "--tokenizer", tok, "-q", "--q-group-size", "128"], "does not divide"),
        (["--text-encoder", d / "hf", "--tokenizer", tok, "-q", "--q-keep", "attn.x"], "matches no projection"),
        (["--text-encoder", d / "hf"], "needs --tokenizer"),
    ]
    for argv, message in cases:
        with pytest.raises(ConversionError, match=message):
            convert(*argv, "--mlx-path", tmp_path / "out")
        assert_nothing_written(tmp_path)


def test_bad_checkpoints(env, tmp_path):
    d, tok = env["dir"], env["tok"]
    state = torch.load(d / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    # Missing layer: block 1 removed while block 0 and a block 2 exist.
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()}
    gap.update({k: v for k, v in state.items() if k.startswith("blocks.0.")})
    torch.save(gap, tmp_path / "gap.pth")
    missing_one = {k: v for k, v in state.items() if k != "blocks.1.ffn.fc1.weight"}
    torch.save(missing_one, tmp_path / "missing.pth")
    bigger_vocab = dict(state, **{"token_embedding.weight": torch.randn(env["vocab"] + 500, DIMS["d_model"])})
    torch.save(bigger_vocab, tmp_path / "vocab.pth")
    extra = dict(state, **{"blocks.0.ffn.wi.weight": torch.zeros(4)})
    torch.save(extra, tmp_path / "extra.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    mx.save_safetensors(str(tmp_path / "dit.safetensors"), {"time_embedding.0.weight": mx.zeros((2, 2))})
    cases = [
        (tmp_path / "gap.pth", r"blocks \[1\] are missing"),
        (tmp_path / "missing.pth", r"missing tensors \(1\):\s+blocks.1.ffn.fc1.weight"),
        (tmp_path / "vocab.pth", "mismatched vocab size"),
        (tmp_path / "extra.pth", r"unexpected tensors \(1\):\s+blocks.0.ffn.wi.weight"),
        (tmp_path / "empty.safetensors", "empty checkpoint"),
        (tmp_path / "dit.safetensors", "unknown text-encoder checkpoint layout"),
    ]
    for source, message in cases:
        with pytest.raises(ConversionError, match=message):
            convert("--text-encoder", source, "--tokenizer", tok, "--mlx-path", tmp_path / "out")
        assert_nothing_written(tmp_path)


def test_failed_update_leaves_folder_unchanged_and_tokenizer_only(env, tmp_path):
    d, tok = env["dir"], env["tok"]
    out = tmp_path / "model"
    convert("--tokenizer", tok, "--mlx-path", out)  # tokenizer alone: no encoder weights yet
    section = json.loads((out / "config.json").read_text())["text_encoder"]
    assert (out / "spiece.model").exists() and "weights_file" not in section
    with pytest.raises(ModelFolderError, match="only a tokenizer"):
        umt5.load(out)
    convert("--text-encoder", d / "hf", "--tokenizer", tok, "--mlx-path", out, "--dtype", "float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConversionError):
        convert("--text-encoder", d / "hf", "--tokenizer", tok, "--mlx-path", out, "-q", "--q-bits", "9")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    convert("--tokenizer", tok, "--mlx-path", out)  # replacing the tokenizer keeps the encoder
    assert umt5.load(out).config.num_layers == 2
    weights = out / umt5.WEIGHTS_NAME  # a truncated weight file is a clear error at load time
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFolderError, match="truncated"):
        umt5.load(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tokenizer(out).encode("a cat")[-1] == 1
