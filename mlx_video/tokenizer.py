"""UMT5 tokenizer with Wan's prompt cleaning (``shared/reference/models.md`` §2.4).

``encode`` = Wan's ``whitespace`` cleaning (ftfy, html.unescape twice, strip, collapse ``\\s+``, strip),
sentencepiece ids, ``</s>`` (id 1) appended, no BOS, at most ``max_length`` (512) ids. A longer prompt
is truncated like Hugging Face's ``truncation=True`` (the first ``max_length - 1`` pieces, then EOS),
always with a :class:`PromptTruncatedWarning`. The ids equal ``T5Tokenizer`` loaded from the same
``spiece.model`` (``tests/test_tokenizer.py``); the encoder pads and zeroes the rest (``models/umt5.py``).
"""

from __future__ import annotations

import hashlib
import html
import os
import warnings
from pathlib import Path

TOKENIZER_NAME = "spiece.model"
TEXT_LEN = 512
PAD_ID, EOS_ID = 0, 1  # T5/UMT5 id layout: <pad>=0, </s>=1, <unk>=2


class TokenizerError(ValueError):
    """The tokenizer file is missing, not a sentencepiece model, or not a T5/UMT5 one."""


class PromptTruncatedWarning(UserWarning):
    """A prompt had more than ``max_length`` tokens and was cut."""


warnings.simplefilter("always", PromptTruncatedWarning)  # every truncation is reported, not just the first


def clean(text: str) -> str:
    """Wan's ``whitespace`` cleaning: ftfy, html.unescape twice, strip, collapse whitespace, strip."""
    import regex

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a dependency; Diffusers also skips it when missing
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _load_processor(path: Path):
    import sentencepiece as spm

    from .inputs import MAX_TOKENIZER_BYTES, InputError, read_bytes

    try:
        data = read_bytes(path, "tokenizer", MAX_TOKENIZER_BYTES)
    except InputError as exc:
        raise TokenizerError(str(exc)) from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError with C++ text
        raise TokenizerError(f"{path}: not a sentencepiece model ({str(exc).splitlines()[0][:200]}); "
                             f"give the UMT5 '{TOKENIZER_NAME}' (e.g. google/umt5-xxl/{TOKENIZER_NAME})") from None
    if sp.pad_id() != PAD_ID or sp.eos_id() != EOS_ID:
        raise TokenizerError(f"{path}: not a T5/UMT5 tokenizer: pad id {sp.pad_id()} and eos id {sp.eos_id()}, "
                             f"expected {PAD_ID} and {EOS_ID} (the UMT5 encoder was trained with those)")
    return sp, data


def find_tokenizer_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/spiece.model`` when it is a folder."""
    path = Path(path)
    if path.is_dir():
        if (path / TOKENIZER_NAME).exists():
            return path / TOKENIZER_NAME
        hint = " (tokenizer.json alone is not supported: give the sentencepiece model)" \
            if (path / "tokenizer.json").exists() else ""
        raise TokenizerError(f"{path}: no {TOKENIZER_NAME} in this folder{hint}")
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file")
    return path  # its kind (regular file) and size are checked when it is read


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike, max_length: int = TEXT_LEN):
        self.path = find_tokenizer_file(model_file)
        self.sp, data = _load_processor(self.path)
        self.model_bytes = data  # what was checked and hashed: copied as is (the file may change meanwhile)
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.max_length = int(max_length)
        self.pad_id, self.eos_id = PAD_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @staticmethod
    def clean(prompt: str) -> str:
        return clean(prompt)

    def encode(self, prompt: str) -> list[int]:
        """Cleaned prompt -> ids with EOS, at most ``max_length`` (truncation warns, never silently)."""
        ids = list(self.sp.encode(self.clean(prompt))) + [self.eos_id]
        if len(ids) > self.max_length:
            snippet = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warnings.warn(f"prompt truncated to {self.max_length} tokens (it has {len(ids)} with EOS); the end "
                          f"is ignored by the text encoder: {snippet!r}", PromptTruncatedWarning, stacklevel=2)
            ids = ids[: self.max_length - 1] + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)])


def load_tokenizer(folder: str | os.PathLike, max_length: int | None = None) -> Tokenizer:
    """The tokenizer of a model folder (its ``spiece.model``), or a sentencepiece file/folder directly.

    ``max_length`` defaults to the folder's ``text_encoder.text_len`` (512).
    """
    folder = Path(folder)
    if folder.is_dir() and (folder / "config.json").exists():
        from .utils import model_file, read_config

        section = read_config(folder).get("text_encoder", {})  # validated: text_len in range, names inside
        return Tokenizer(model_file(folder, section, "tokenizer_file", TOKENIZER_NAME),
                         max_length or section.get("text_len", TEXT_LEN))
    return Tokenizer(folder, max_length or TEXT_LEN)
