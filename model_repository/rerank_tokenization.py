"""A reranker's tokenization: (query, document, instruction) -> prefix + truncated body + suffix ids.

This is the Qwen3-Reranker usage code's ``process_inputs``: the body (``spec.pair_template``) is tokenized
alone without special tokens and truncated to ``max_length - len(prefix) - len(suffix)`` tokens, then the
fixed prefix and suffix ids are put around it. The body goes through :class:`SpecTokenizer` with that
smaller limit, so the character cap and the long-text cuts are the embedders' own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tritonembed.errors import InputError, SpecError
from tritonembed.model_repository.batching import bucket_length
from tritonembed.model_repository.tokenization import EncodedBatch, SpecTokenizer, decode_text
from tritonembed.spec import ModelSpec


class PairTokenizer:
    """The reranker's tokenizer: :meth:`encode_pairs` gives each pair's ids, at most ``spec.max_length``.

    Raises (constructor):
        SpecError: the spec is not a reranker's, or its prefix and suffix leave no room for a body.
    """

    def __init__(self, tokenizer_json: Path, spec: ModelSpec) -> None:
        if spec.task != "rerank":
            raise SpecError(f"model {spec.name!r} is a {spec.task} model, not a reranker")
        self.spec = spec
        probe = SpecTokenizer(tokenizer_json, spec)
        self.prefix_ids = self._plain_ids(probe, spec.pair_prefix)
        self.suffix_ids = self._plain_ids(probe, spec.pair_suffix)
        budget = spec.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if budget <= 0:
            raise SpecError(f"max_length {spec.max_length} leaves no room between the reranker's prefix and suffix")
        self.body = SpecTokenizer(tokenizer_json, dataclasses.replace(spec, max_length=budget))

    @staticmethod
    def _plain_ids(tokenizer: SpecTokenizer, text: str) -> list[int]:
        return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def format_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instructions: Sequence[str | None] | None = None) -> list[str]:
        """The bodies; each part shrunk to the character cap before templating, the body after."""
        shrink = str if self.body.cap is None else self.body.cap.shrink
        if instructions is None:
            instructions = [None] * len(queries)
        return [shrink(self.spec.format_pair(shrink(q), shrink(d), shrink(i) if i else None))
                for q, d, i in zip(queries, documents, instructions, strict=True)]

    def encode_bodies(self, bodies: Sequence[str]) -> EncodedBatch:
        """Prefix + body (truncated) + suffix per row; ``truncated`` says which bodies were cut."""
        encoded = self.body.encode(bodies)
        return EncodedBatch([self.prefix_ids + ids + self.suffix_ids for ids in encoded.ids], encoded.truncated)

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instructions: Sequence[str | None] | None = None) -> EncodedBatch:
        return self.encode_bodies(self.format_pairs(queries, documents, instructions))

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.body.pad(ids, length)


@dataclasses.dataclass
class PairRequest:
    """One rerank request's raw rows: BYTES queries and documents, optional instructions and truncate flags."""

    queries: Sequence[object]
    documents: Sequence[object]
    instructions: Sequence[object] | None = None
    truncate: Sequence[bool] | None = None


def tokenize_pair_requests(tokenizer: PairTokenizer, requests: Sequence[PairRequest], *, pad_to_buckets: bool = True):
    """Tokenize every valid request of a batch in one call; a bad request gets an InputError in its slot.

    A row is refused (InputError) for a blank query or document, bad UTF-8, mismatched row counts, or a
    pair too long with TRUNCATE false. Returns ``TokenizedRequest | InputError`` per request.
    """
    from tritonembed.model_repository.stages import (
        TokenizedRequest,
        _decode_instruction,
    )

    results: list = [None] * len(requests)
    spans: list[tuple[int, int, int]] = []
    bodies: list[str] = []
    for r, req in enumerate(requests):
        try:
            n = len(req.queries)
            if n == 0:
                raise InputError("request has no pairs")
            for name, rows in (("DOCUMENT", req.documents), ("INSTRUCTION", req.instructions), ("TRUNCATE", req.truncate)):
                if rows is not None and len(rows) != n:
                    raise InputError(f"{name} has {len(rows)} rows, QUERY has {n}")
            queries = [decode_text(q, i) for i, q in enumerate(req.queries)]
            documents = [decode_text(d, i) for i, d in enumerate(req.documents)]
            instructions = None
            if req.instructions is not None:
                # an empty instruction means the model's default one
                instructions = [_decode_instruction(x, i) or None for i, x in enumerate(req.instructions)]
            formatted = tokenizer.format_pairs(queries, documents, instructions)
        except InputError as exc:
            results[r] = exc
            continue
        spans.append((r, len(bodies), len(bodies) + len(formatted)))
        bodies.extend(formatted)
    encoded = tokenizer.encode_bodies(bodies) if bodies else None
    limit = tokenizer.spec.max_length
    for r, start, end in spans:
        ids, cut = encoded.ids[start:end], encoded.truncated[start:end]
        flags = requests[r].truncate
        refused = [i for i, c in enumerate(cut) if c and flags is not None and not bool(flags[i])]
        if refused:
            results[r] = InputError("; ".join(
                f"input[{i}] has more than {limit} tokens with its template; truncation is disabled" for i in refused))
            continue
        longest = max(len(x) for x in ids)
        length = bucket_length(longest, limit) if pad_to_buckets else longest
        input_ids, mask = tokenizer.pad(ids, length)
        results[r] = TokenizedRequest(input_ids, mask, np.array([[len(x)] for x in ids], dtype=np.int32))
    return results
