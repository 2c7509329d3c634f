"""CLIP's byte-pair tokenizer without torch: the same token ids as open_clip's SimpleTokenizer.

    tokenizer = ClipTokenizer(vocab_file, context_length=77)
    tokenizer(["a cat sunbathing"])   # (1, 77) int64: start, the word pieces, end, zero padding

A fresh query process loads this instead of open_clip (whose import pulls in torch, seconds of
start-up). It is a port of open_clip.tokenizer.SimpleTokenizer (itself OpenAI CLIP's): the
same text cleaning, word pattern, byte-to-unicode table, merges and truncation, checked token
for token against it in tests/test_tokenizer.py. open_clip's token-dropping "reduction masks"
are not ported: models that use one keep the torch path.
"""

from __future__ import annotations

import gzip
import html
import itertools
import math
import string
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np

__all__ = ["CLEANERS", "MERGES", "ClipTokenizer", "read_merges"]

START, END = "<start_of_text>", "<end_of_text>"
MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary keeps, after the 512 byte symbols and the two special tokens


@lru_cache
def _byte_symbols() -> dict[int, str]:
    """Each byte as a printable unicode character, so that the merges never meet whitespace or controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + n for n in range(len(others))]), strict=True))


def _basic(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonical(text: str) -> str:
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split()).strip()


# open_clip's `clean` settings, by the name its model configs use
CLEANERS = {
    "lower": lambda text: _whitespace(_basic(text)).lower(),
    "whitespace": lambda text: _whitespace(_basic(text)),
    "canonicalize": lambda text: _canonical(_basic(text)),
}


def read_merges(path: str | Path) -> list[str]:
    """The merges CLIP uses, from open_clip's gzipped vocabulary file or a plain copy of its first lines."""
    data = Path(path).read_bytes()
    text = (gzip.decompress(data) if str(path).endswith(".gz") else data).decode("utf-8")
    return text.split("\n", MERGES + 1)[1 : MERGES + 1]  # after a header line; the rest of the file is unused


class ClipTokenizer:
    def __init__(
        self,
        merges_file: str | Path,
        context_length: int = 77,
        clean: str = "lower",
        special_tokens: tuple[str, ...] = (START, END),
    ):
        # Merges stay "a b" strings, as in the file: a fresh process builds these maps in milliseconds.
        merges = read_merges(merges_file)
        symbols = list(_byte_symbols().values())
        vocab = [*symbols, *(symbol + "</w>" for symbol in symbols), *(m.replace(" ", "") for m in merges)]
        self.ids = {piece: number for number, piece in enumerate([*vocab, *special_tokens])}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.start, self.end = self.ids[special_tokens[0]], self.ids[special_tokens[1]]
        self.context_length = context_length
        self.clean = CLEANERS[clean]
        self._cache = {token: token for token in special_tokens}
        import regex  # for CLIP's pattern only: a Hugging Face tokenizer's query never loads it

        self._words = regex.compile(
            "|".join(map(regex.escape, special_tokens))
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def encode(self, text: str) -> list[int]:
        """The word-piece ids of a text, without the start and end tokens."""
        symbols = _byte_symbols()
        ids = []
        for word in self._words.findall(self.clean(text)):
            pieces = self._merge("".join(symbols[b] for b in word.encode("utf-8")))
            ids.extend(self.ids[piece] for piece in pieces.split(" "))
        return ids

    def _merge(self, word: str) -> str:
        """Apply the merges to one word, lowest rank first: its pieces, separated by spaces."""
        if word in self._cache:
            return self._cache[word]
        parts = (*word[:-1], word[-1] + "</w>")
        while len(parts) > 1:
            pairs = {f"{a} {b}": (a, b) for a, b in itertools.pairwise(parts)}
            merge = min(pairs, key=lambda pair: self.ranks.get(pair, math.inf))
            if merge not in self.ranks:
                break
            best = pairs[merge]
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        self._cache[word] = " ".join(parts)
        return self._cache[word]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), context_length) int64 ids; a text too long is cut and still ends with the end token."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.start, *self.encode(text), self.end]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.end
            out[row, : len(ids)] = ids
        return out
