"""Character ids and word shapes of the raw tokens, for the tagger's character features.

The text encoder may be uncased (the demo's MiniLM is), so case is gone before anything is
cached; these features come from the prepared manifest's tokens instead, so no encoder runs.

* :func:`char_ids`: each word's characters as ids in a fixed, vocabulary-free table
  (code points below 1022 map one to one, the rest are hashed by code point into 1024
  buckets; 0 is padding), first and last :data:`MAX_CHARS` // 2 characters of long words.
* :func:`word_shape`: one of :data:`SHAPES` (URL, @mention, #hashtag, number, all caps,
  capitalised, lower, mixed, emoji/punctuation, blank).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.data.conll import is_blank_token

MAX_CHARS = 24
CHAR_VOCAB = 2048
SHAPES = ("pad", "url", "mention", "hashtag", "number", "all_caps", "capitalised", "lower", "mixed",
          "symbol", "blank")
_URL = re.compile(r"^(https?://|www\.)", re.IGNORECASE)


def char_id(c: str) -> int:
    o = ord(c)
    return o + 2 if o < CHAR_VOCAB // 2 - 2 else CHAR_VOCAB // 2 + o % (CHAR_VOCAB // 2)


def char_ids(words: Sequence[str]) -> np.ndarray:
    """(n_words, MAX_CHARS) int64 character ids, 0 = padding."""
    out = np.zeros((len(words), MAX_CHARS), dtype=np.int64)
    half = MAX_CHARS // 2
    for i, w in enumerate(words):
        chars = w if len(w) <= MAX_CHARS else w[:half] + w[-half:]
        out[i, :len(chars)] = [char_id(c) for c in chars]
    return out


def word_shape(w: str) -> str:
    """The word's shape class (see :data:`SHAPES`)."""
    if not w or is_blank_token(w):
        return "blank"
    if _URL.match(w):
        return "url"
    if len(w) > 1 and w[0] == "@":
        return "mention"
    if len(w) > 1 and w[0] == "#":
        return "hashtag"
    letters = [c for c in w if c.isalpha()]
    if not letters:
        return "number" if any(c.isdigit() for c in w) else "symbol"
    if all(c.isupper() for c in letters):
        return "all_caps" if len(letters) > 1 else "capitalised"
    if letters[0].isupper() and all(c.islower() for c in letters[1:]) and w[0].isalpha():
        return "capitalised"
    if all(c.islower() for c in letters):
        return "lower"
    return "mixed"


def shape_ids(words: Sequence[str]) -> np.ndarray:
    """(n_words,) int64 indices into :data:`SHAPES`."""
    return np.asarray([SHAPES.index(word_shape(unicodedata.normalize("NFC", w))) for w in words], dtype=np.int64)


class CharCNN(nn.Module):
    """Character embeddings -> 1-D convolution (width 3) -> max over the word's characters."""

    def __init__(self, out_dim: int, emb_dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(CHAR_VOCAB, emb_dim, padding_idx=0)
        self.conv = nn.Conv1d(emb_dim, out_dim, kernel_size=3, padding=1)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        # chars (B, N, C) long -> (B, N, out_dim)
        B, N, C = chars.shape
        x = self.emb(chars.reshape(B * N, C)).transpose(1, 2)  # (B*N, e, C)
        y = torch.relu(self.conv(x))  # (B*N, out, C)
        pad = (chars.reshape(B * N, 1, C) == 0)
        y = y.masked_fill(pad, 0.0)  # relu >= 0, so 0 never wins over a real character
        return y.max(dim=2).values.reshape(B, N, -1)
