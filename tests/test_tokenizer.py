"""UMT5 tokenizer: ids equal transformers' T5Tokenizer on the same sentencepiece file, Wan's cleaning,
EOS, truncation with a warning, and clear errors for wrong tokenizer files."""

import io
import warnings

import pytest

from mlx_video.tokenizer import PromptTruncatedWarning, Tokenizer, TokenizerError, clean, load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sits on a warm windowsill in the afternoon sun.",
    "Ein Hund läuft über die grüne Wiese.",
    "Un chat noir dort sur le canapé.",
    "東京の夜景はとても美しい。",
    "Camera pans slowly across a mountain lake at dawn, mist over the water.",
    "Two astronauts float in zero gravity, 4K, cinematic lighting.",
]


def train_tiny_spm(path, vocab_size=120, **ids):
    import sentencepiece as spm

    model = io.BytesIO()
    spec = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) | ids
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=vocab_size,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2, **spec)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tiny_spm(d / "spiece.model")
    return d


@pytest.fixture(scope="session")
def hf_tokenizer(spm_dir):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)


PROMPTS = [
    "The quick brown fox",
    "a  cat   sat\n\ton the\u3000mat  ",
    "Ein Hund läuft über die Wiese",
    "東京の夜景",
    "zzq ☃ unknown 🦊 pieces",
    "Tom &amp;amp; Jerry &lt;3",
    "",
]


def test_ids_equal_transformers(spm_dir, hf_tokenizer):
    tok = Tokenizer(spm_dir / "spiece.model")
    for prompt in PROMPTS:
        expected = hf_tokenizer(clean(prompt), add_special_tokens=True).input_ids  # Wan: clean, then tokenize
        assert tok.encode(prompt) == expected, prompt
        assert tok.encode(prompt)[-1] == 1  # EOS appended, no BOS
    assert tok.encode("") == [1]


def test_cleaning():
    assert clean("  A &amp;amp; B\n\t cat  ") == "A & B cat"  # html.unescape twice, whitespace collapsed
    assert clean("a\u3000b\u00a0c") == "a b c"  # unicode whitespace
    assert clean("cafÃ©") == "café"  # ftfy repairs mojibake
    assert clean("x &lt;b&gt; y") == "x <b> y"


def test_truncation_warns_every_time_and_matches_transformers(spm_dir, hf_tokenizer):
    tok = Tokenizer(spm_dir / "spiece.model", max_length=8)
    prompt = "The quick brown fox jumps over the lazy dog and keeps running"
    full = Tokenizer(spm_dir / "spiece.model").encode(prompt)
    assert len(full) > 8
    with warnings.catch_warnings(record=True) as caught:
        ids = tok.encode(prompt)
        tok.encode(prompt)  # repeated: still reported
    assert len([w for w in caught if issubclass(w.category, PromptTruncatedWarning)]) == 2
    assert "truncated to 8 tokens" in str(caught[0].message)
    assert ids == full[:7] + [1]
    assert ids == hf_tokenizer(clean(prompt), truncation=True, max_length=8).input_ids


def test_no_warning_when_it_fits(spm_dir):
    full = Tokenizer(spm_dir / "spiece.model").encode("The quick brown fox")
    tok = Tokenizer(spm_dir / "spiece.model", max_length=len(full))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode("The quick brown fox") == full


def test_default_max_length_is_512(spm_dir):
    tok = Tokenizer(spm_dir / "spiece.model")
    with pytest.warns(PromptTruncatedWarning):
        ids = tok.encode("cat " * 600)
    assert len(ids) == 512 and ids[-1] == 1


def test_wrong_tokenizer_files(tmp_path, spm_dir):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(bad)
    llama_like = train_tiny_spm(tmp_path / "llama.model", pad_id=-1, bos_id=1, eos_id=2, unk_id=0)
    with pytest.raises(TokenizerError, match="not a T5/UMT5 tokenizer"):
        Tokenizer(llama_like)
    (tmp_path / "only_json").mkdir()
    (tmp_path / "only_json" / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json alone is not supported"):
        Tokenizer(tmp_path / "only_json")
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.model")
    assert load_tokenizer(spm_dir).encode("cat") == Tokenizer(spm_dir / "spiece.model").encode("cat")
