"""Tokenization shared by the Triton tokenizer model and the exporter's validator.

Pure functions over the Rust ``tokenizers`` library and numpy, so the served tokenization is the
one validated at export time. No Triton import here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonembed.errors import InputError
from tritonembed.spec import ModelSpec

# Padded lengths the tokenizer rounds each request up to. Requests that land on the same length can
# be merged by the encoder's dynamic batcher; steps grow by <= 1.5x so padding stays bounded.
DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (
    8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512,
    640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192,
    10240, 12288, 16384, 20480, 24576, 32768,
)


def bucket_length(length: int, max_length: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> int:
    """Smallest bucket >= ``length``, never above ``max_length`` (which is always allowed)."""
    i = bisect_left(buckets, length)
    padded = buckets[i] if i < len(buckets) else length
    return min(max(padded, length), max(max_length, length))


def load_tokenizer(tokenizer_json: Path, spec: ModelSpec):
    """Load ``tokenizer.json`` configured for serving: truncation at ``spec.max_length``, no padding.

    Raises:
        InputError: never; OSError/Exception from ``tokenizers`` propagate for a missing/corrupt file.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length=spec.max_length)
    return tok


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids of a batch of texts, unpadded, and whether each was cut at the limit."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


class SpecTokenizer:
    """The model's tokenizer plus the spec's templates and limits."""

    def __init__(self, tokenizer_json: Path, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer = load_tokenizer(tokenizer_json, spec)

    def format(self, texts: Sequence[str], instructions: Sequence[str | None] | None = None) -> list[str]:
        if instructions is None:
            return [self.spec.format_text(t, None) for t in texts]
        return [self.spec.format_text(t, i) for t, i in zip(texts, instructions, strict=True)]

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Tokenize already formatted texts in one call, truncating to ``spec.max_length``."""
        encodings = self.tokenizer.encode_batch(list(texts))
        return EncodedBatch([e.ids for e in encodings], [bool(e.overflowing) for e in encodings])

    def count_untruncated(self, texts: Sequence[str]) -> list[int]:
        """Token counts (special tokens included) the texts would have without truncation."""
        self.tokenizer.no_truncation()
        try:
            return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]
        finally:
            self.tokenizer.enable_truncation(max_length=self.spec.max_length)

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch(ids, self.spec.pad_token_id, self.spec.padding_side, length)


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, side: str, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token lists to one length (the longest when ``length`` is None) on ``side``.

    Returns ``(input_ids, attention_mask)``, both int64 ``[len(ids), length]``.

    Raises:
        ValueError: a row is longer than ``length``.
    """
    longest = max((len(x) for x in ids), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"row of {longest} tokens does not fit padded length {length}")
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, seq in enumerate(ids):
        n = len(seq)
        if n == 0:
            continue
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        input_ids[row, sl] = seq
        mask[row, sl] = 1
    return input_ids, mask


def decode_text(raw: object, index: int) -> str:
    """Turn one BYTES element into text.

    Raises:
        InputError: the element is not valid UTF-8, or the text is empty / whitespace only.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"text {index} is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from exc
    elif isinstance(raw, str):
        text = raw
    else:
        raise InputError(f"text {index} has unsupported type {type(raw).__name__}")
    if not text.strip():
        raise InputError(f"text {index} is empty")
    return text
