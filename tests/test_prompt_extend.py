"""generate --extend-prompt: a tiny random LLM built with mlx-lm's own model classes and a trained tokenizer;
Wan's system prompt, caching per (model, prompt, seed), the LLM freed before the text encoder, metadata."""

from __future__ import annotations

import gc
import json
import weakref

import mlx_video  # noqa: F401  (MKL before MLX)
import mlx.core as mx
import pytest

mlx_lm = pytest.importorskip("mlx_lm")

from mlx_video import prompt_extend as PE  # noqa: E402
from mlx_video.cli import main  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
WORDS = "a cat dog runs jumps on the grass in sunny park slow camera pans close shot red blue sky".split()


def build_tiny_llm(folder):
    """A 1-layer Qwen2 (mlx_lm.models.qwen2) with random weights and a word-level tokenizer, saved as mlx-lm
    loads any model folder: config.json, model.safetensors, tokenizer files with a chat template."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words joined by spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    config = dict(model_type="qwen2", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=len(vocab),
                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                  eos_token_id=vocab["<|im_end|>"])
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs(**{k: v for k, v in config.items() if k != "eos_token_id"}))
    weights = dict(tree_flatten(model.parameters()))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 8  # peaked logits: words, never the specials
    weights["lm_head.weight"][: len(specials)] = 0
    weights["lm_head.weight"][: len(specials)] -= 100.0
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return str(build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny-qwen2"))


def test_extension_uses_wan_system_prompt_caches_and_frees_the_llm(llm, tmp_path, monkeypatch):
    seen, refs = [], []
    real_generate, real_load = mlx_lm.generate, mlx_lm.load

    def recording_generate(model, tokenizer, prompt, **kw):
        seen.append(prompt)
        return real_generate(model, tokenizer, prompt, **kw)

    def recording_load(path, *a, **kw):
        model, tok = real_load(path, *a, **kw)
        refs.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(mlx_lm, "generate", recording_generate)
    monkeypatch.setattr(mlx_lm, "load", recording_load)
    cache = tmp_path / "cache"
    first = PE.extend_prompts(llm, ["a cat", "a dog"], [1, 1], cache, max_tokens=12)
    assert len(first) == 2 and all(first) and first[0] != "a cat"
    assert not any("<|" in text for text in first)  # decoded without special tokens
    assert len(seen) == 2 and PE.WAN_T2V_SYSTEM_PROMPT in seen[0] and seen[0].rstrip().endswith("assistant")
    assert "a cat" in seen[0] and PE.WAN_T2V_SYSTEM_PROMPT.startswith("You are a prompt engineer")
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None  # freed before returning (the text encoder runs after)
    # same (model, prompt, seed): from the cache, no LLM load; another seed is a new run, same seed reproduces
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: pytest.fail("the LLM was loaded for a cached prompt"))
    assert PE.extend_prompts(llm, ["a cat", "a dog"], [1, 1], cache, max_tokens=12) == first
    monkeypatch.setattr(mlx_lm, "load", recording_load)
    assert PE.extend_prompts(llm, ["a cat"], [1], None, max_tokens=12) == first[:1]
    assert len(refs) == 2
    PE.extend_prompts(llm, ["a cat"], [2], cache, max_tokens=12)
    assert len(refs) == 3 and len(list(cache.glob("*.json"))) == 3


def test_generate_with_extended_prompt_and_lora_end_to_end(llm, tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    from tests.model_factory import build_model_folder

    folder = build_model_folder(tmp_path / "m", quantize=False)
    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 64, generator=g) * 0.01,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 2, generator=g) * 0.01},
              str(tmp_path / "style.safetensors"))
    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", str(folder), "--prompt", "a cat", "--height", "32", "--width", "32", "--frames",
            "5", "--seed", "3", "--prompt-cache", str(tmp_path / "pc"), "--extend-prompt", llm]
    assert main(argv + ["--output", str(out), "--quiet", "--lora", f"{tmp_path / 'style.safetensors'}:0.5"]) == 0
    from mlx_video.pipeline import metadata_path

    meta = json.loads(metadata_path(out).read_text())
    assert meta["prompt_extension"] == {"model": llm, "original_prompt": "a cat"}
    assert meta["prompt"] != "a cat" and meta["prompt"].strip()
    assert meta["loras"] == [{"file": str(tmp_path / "style.safetensors"), "scale": 0.5}]
    assert out.exists()
    expected = PE.extend_prompts(llm, ["a cat"], [3], tmp_path / "pc" / "extended-prompts")
    assert meta["prompt"] == expected[0]
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "w.mp4")]) == 0
    assert f"extended prompt: {expected[0]}" in capsys.readouterr().err  # printed, from the cache


def test_missing_llm_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PE.PromptExtensionError, match="cannot load it with mlx-lm"):
        PE.extend_prompts(str(tmp_path / "empty"), ["a cat"], [0])
