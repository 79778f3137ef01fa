"""Line-by-line Python mirror of the generated Swift tokenizer (``templates/Tokenizer.swift``).

There is no Swift compiler on Linux, so the algorithm the Swift file implements (protobuf reading of
``spiece.model``, the precompiled-charsmap double-array trie, sentencepiece's ``Normalizer::Normalize``,
unigram Viterbi with float32 path scores, byte fallback, Wan's cleaning minus ftfy) is mirrored here
statement for statement and tested against ``sentencepiece`` and ``mlx_video.tokenizer``. The golden
test on a Mac then checks the Swift translation itself against the same ids. One deliberate difference:
``clean`` here uses Python's full ``html.unescape``; the Swift version knows the common named entities and
all numeric ones (prompts rarely contain others).
"""

from __future__ import annotations

import html
import struct

import numpy as np

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581".encode()


def utf8_length(lead: int) -> int:
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[lead >> 4]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def next(self):
        if self.pos >= len(self.data):
            return None
        key = self.varint()
        return key >> 3, key & 7

    def varint(self) -> int:
        result = shift = 0
        while True:
            if self.pos >= len(self.data) or shift >= 64:
                raise ValueError("truncated sentencepiece model (varint)")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    def bytes(self) -> bytes:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise ValueError("truncated sentencepiece model (field length)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def float(self) -> np.float32:
        (v,) = struct.unpack_from("<f", self.data, self.pos)
        self.pos += 4
        return np.float32(v)

    def skip(self, wire: int) -> None:
        if wire == 0:
            self.varint()
        elif wire == 1:
            self.pos += 8
        elif wire == 2:
            self.bytes()
        elif wire == 5:
            self.pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


class Charsmap:
    def __init__(self, blob: bytes):
        self.units, self.normalized = [], b""
        if len(blob) <= 4:
            return
        (size,) = struct.unpack_from("<I", blob, 0)
        if size + 4 > len(blob):
            return
        self.units = list(struct.unpack_from(f"<{size // 4}I", blob, 4))
        self.normalized = blob[4 + size:]

    def longest_match(self, data: bytes, pos: int):
        if not self.units:
            return None
        u = self.units
        node = (u[0] >> 10) << ((u[0] & (1 << 9)) >> 6)
        best = None
        i = pos
        while i < len(data):
            node ^= data[i]
            if node >= len(u):
                break
            unit = u[node]
            if unit & ((1 << 31) | 0xFF) != data[i]:
                break
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1 and node < len(u):
                best = (i + 1 - pos, u[node] & ((1 << 31) - 1))
            i += 1
        if best is None or best[1] >= len(self.normalized):
            return None
        end = self.normalized.index(b"\0", best[1]) if b"\0" in self.normalized[best[1]:] else len(self.normalized)
        return best[0], self.normalized[best[1]:end]


class MirrorTokenizer:
    def __init__(self, data: bytes, max_length: int = 512, pad_id: int = 0, eos_id: int = 1):
        self.max_length, self.pad_id, self.eos_id = max_length, pad_id, eos_id
        self.pieces: list[tuple[bytes, np.float32, int]] = []
        self.byte_fallback = False
        self.add_dummy_prefix = self.remove_extra_whitespaces = self.escape_whitespaces = True
        self.charsmap = Charsmap(b"")
        model_type = 1
        r = _Reader(data)
        while (fw := r.next()) is not None:
            field, wire = fw
            if (field, wire) == (1, 2):
                p = _Reader(r.bytes())
                text, score, kind = b"", np.float32(0), NORMAL
                while (x := p.next()) is not None:
                    if x == (1, 2):
                        text = p.bytes()
                    elif x == (2, 5):
                        score = p.float()
                    elif x == (3, 0):
                        kind = p.varint()
                    else:
                        p.skip(x[1])
                self.pieces.append((text, score, kind))
            elif (field, wire) == (2, 2):
                t = _Reader(r.bytes())
                while (x := t.next()) is not None:
                    if x == (3, 0):
                        model_type = t.varint()
                    elif x == (35, 0):
                        self.byte_fallback = t.varint() != 0
                    else:
                        t.skip(x[1])
            elif (field, wire) == (3, 2):
                n = _Reader(r.bytes())
                while (x := n.next()) is not None:
                    if x == (2, 2):
                        self.charsmap = Charsmap(n.bytes())
                    elif x == (3, 0):
                        self.add_dummy_prefix = n.varint() != 0
                    elif x == (4, 0):
                        self.remove_extra_whitespaces = n.varint() != 0
                    elif x == (5, 0):
                        self.escape_whitespaces = n.varint() != 0
                    else:
                        n.skip(x[1])
            else:
                r.skip(wire)
        if model_type != 1:
            raise ValueError(f"only unigram sentencepiece models are supported (model type {model_type})")
        self.lookup: dict[bytes, int] = {}
        self.user_defined: list[bytes] = []
        self.max_piece_bytes, self.unk_id = 1, 0
        self.min_score = np.float32(np.finfo(np.float32).max)
        for i, (piece, score, kind) in enumerate(self.pieces):
            if kind in (NORMAL, USER_DEFINED, UNUSED):
                self.lookup.setdefault(piece, i)
                self.max_piece_bytes = max(self.max_piece_bytes, len(piece))
            elif kind == BYTE:
                self.lookup[piece] = i
            elif kind == UNKNOWN:
                self.unk_id = i
            if kind == NORMAL:
                self.min_score = min(self.min_score, score)
            if kind == USER_DEFINED:
                self.user_defined.append(piece)
        self.user_defined.sort(key=len, reverse=True)

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(text))
        out, pending = [], False
        for ch in text:
            if ch.isspace():
                pending = bool(out)
            else:
                if pending:
                    out.append(" ")
                    pending = False
                out.append(ch)
        return "".join(out)

    def encode(self, prompt: str) -> list[int]:
        ids = self.encode_pieces(self.clean(prompt)) + [self.eos_id]
        if len(ids) > self.max_length:
            ids = ids[: self.max_length - 1] + [self.eos_id]
        return ids

    def normalize_prefix(self, data: bytes, pos: int):
        for symbol in self.user_defined:
            if data[pos:pos + len(symbol)] == symbol:
                return symbol, len(symbol)
        m = self.charsmap.longest_match(data, pos)
        if m is not None:
            return m[1], m[0]
        n = min(utf8_length(data[pos]), len(data) - pos)
        return data[pos:pos + n], n

    def normalize(self, data: bytes) -> bytes:
        pos = 0
        if self.remove_extra_whitespaces:
            while pos < len(data):
                rep, n = self.normalize_prefix(data, pos)
                if rep != b" ":
                    break
                pos += n
        if pos >= len(data):
            return b""
        out = bytearray()
        if self.add_dummy_prefix:
            out += SPACE if self.escape_whitespaces else b" "
        prev_space = self.remove_extra_whitespaces
        while pos < len(data):
            rep, n = self.normalize_prefix(data, pos)
            while prev_space and rep[:1] == b" ":
                rep = rep[1:]
            if rep:
                for b in rep:
                    if self.escape_whitespaces and b == 0x20:
                        out += SPACE
                    else:
                        out.append(b)
                prev_space = rep.endswith(b" ")
            pos += n
            if not self.remove_extra_whitespaces:
                prev_space = False
        if self.remove_extra_whitespaces:
            tail = SPACE if self.escape_whitespaces else b" "
            while out.endswith(tail):
                del out[-len(tail):]
        return bytes(out)

    def encode_pieces(self, text: str) -> list[int]:
        s = self.normalize(text.encode())
        size = len(s)
        if size == 0:
            return []
        unk_score = np.float32(self.min_score - np.float32(10))
        best_score = [np.float32(0)] * (size + 1)
        best_start = [-1] * (size + 1)
        best_id = [-1] * (size + 1)
        start = 0
        while start < size:
            char_len = min(utf8_length(s[start]), size - start)
            here = best_score[start]
            single = False
            for end in range(start + 1, min(size, start + self.max_piece_bytes) + 1):
                i = self.lookup.get(s[start:end])
                if i is None or self.pieces[i][2] == UNUSED:
                    continue
                length = end - start
                # user-defined: 0.1 per byte - 0.1, as sentencepiece 0.2.3 scores them (measured; not its
                # source's `length * max_score - 0.1`)
                score = (np.float32(length) * np.float32(0.1) - np.float32(0.1)) if self.pieces[i][2] == USER_DEFINED \
                    else self.pieces[i][1]
                cand = np.float32(score + here)
                if best_start[end] == -1 or cand > best_score[end]:
                    best_score[end], best_start[end], best_id[end] = cand, start, i
                if length == char_len:
                    single = True
            if not single:
                target = start + char_len
                cand = np.float32(unk_score + here)
                if best_start[target] == -1 or cand > best_score[target]:
                    best_score[target], best_start[target], best_id[target] = cand, start, self.unk_id
            start += char_len
        segs, end = [], size
        while end > 0:
            segs.append((best_start[end], end, best_id[end]))
            end = best_start[end]
        ids = []
        for a, b, i in reversed(segs):
            if i == self.unk_id and self.byte_fallback:
                ids += [self.lookup.get(f"<0x{c:02X}>".encode(), self.unk_id) for c in s[a:b]]
            elif i == self.unk_id and ids and ids[-1] == self.unk_id:
                continue  # sentencepiece fuses a run of unknown characters into one <unk>
            else:
                ids.append(i)
        return ids
