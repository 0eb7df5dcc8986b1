"""What the tokenizer and encoder models do with one ``execute()`` batch, as plain functions.

The Triton adapters (``tokenizer_model.py``, ``encoder_model.py``) only convert tensors; everything
that can be wrong is here and unit-tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tritonembed.errors import InputError
from tritonembed.model_repository.batching import DEFAULT_MIN_FILL, POOL_MIN_BATCHES, Fits, bucket_length, plan_microbatches
from tritonembed.model_repository.tokenization import SpecTokenizer, decode_text, pad_batch


@dataclass
class TokenizeRequest:
    """One request's raw rows: BYTES texts, optional BYTES instructions, optional truncate flags."""

    texts: Sequence[object]
    instructions: Sequence[object] | None = None
    truncate: Sequence[bool] | None = None


@dataclass
class TokenizedRequest:
    input_ids: np.ndarray  # int64 [n, padded_length]
    attention_mask: np.ndarray  # int64 [n, padded_length]
    token_counts: np.ndarray  # int32 [n, 1]

    @property
    def real_tokens(self) -> int:
        return int(self.token_counts.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


def _decode_instruction(raw: object, index: int) -> str:
    if raw is None:
        return ""
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"instruction for input[{index}] is not valid UTF-8") from exc
    return str(raw)


def _formatted_texts(tokenizer: SpecTokenizer, request: TokenizeRequest) -> list[str]:
    """Decode, shrink and template each row; one text at a time, so a request never holds every
    multi-megabyte text decoded at once.

    Raises: InputError for a blank text, bad UTF-8 or mismatched row counts.
    """
    n = len(request.texts)
    if n == 0:
        raise InputError("request has no texts")
    if request.instructions is not None and len(request.instructions) != n:
        raise InputError(f"INSTRUCTION has {len(request.instructions)} rows, TEXT has {n}")
    formatted = []
    for i, raw in enumerate(request.texts):
        text = decode_text(raw, i)
        if request.instructions is None:
            formatted.extend(tokenizer.format([text]))
        else:
            formatted.extend(tokenizer.format([text], [_decode_instruction(request.instructions[i], i)]))
        del text  # the shrunk copy is all that is kept
    return formatted


def _too_long(index: int, tokens: int | None, limit: int) -> str:
    count = f"more than {limit}" if tokens is None else str(tokens)
    return f"input[{index}] has {count} tokens; the model's limit is {limit} tokens and truncation is disabled"


def tokenize_requests(
    tokenizer: SpecTokenizer, requests: Sequence[TokenizeRequest], *, pad_to_buckets: bool = True
) -> list[TokenizedRequest | InputError]:
    """Tokenize every valid request of the batch (texts within the character cap in one
    ``encode_batch`` call).

    A request with a bad row yields an :class:`InputError` in its slot; the others are unaffected. A
    text that is too long with truncation off is refused before any tokenization when its length alone
    proves it (see :class:`~tritonembed.model_repository.tokenization.CharCap`).
    """
    results: list[TokenizedRequest | InputError | None] = [None] * len(requests)
    spans: list[tuple[int, int, int]] = []  # (request index, start, end) into all_texts
    all_texts: list[str] = []
    limit = tokenizer.spec.max_length
    for r, request in enumerate(requests):
        try:
            if request.truncate is not None and len(request.truncate) != len(request.texts):
                raise InputError(f"TRUNCATE has {len(request.truncate)} rows, TEXT has {len(request.texts)}")
            formatted = _formatted_texts(tokenizer, request)
            flags = request.truncate
            refused = [i for i, text in enumerate(formatted)
                       if flags is not None and not bool(flags[i]) and tokenizer.surely_too_long(text)]
            if refused:
                raise InputError("; ".join(_too_long(i, None, limit) for i in refused))
        except InputError as exc:
            results[r] = exc
            continue
        spans.append((r, len(all_texts), len(all_texts) + len(formatted)))
        all_texts.extend(formatted)
    encoded = tokenizer.encode(all_texts) if all_texts else None
    for r, start, end in spans:
        ids = encoded.ids[start:end]
        truncated = encoded.truncated[start:end]
        flags = requests[r].truncate
        refused = [i for i, cut in enumerate(truncated) if cut and flags is not None and not bool(flags[i])]
        if refused:
            countable = [i for i in refused if not tokenizer.is_long(all_texts[start + i])]
            counts = dict(zip(countable, tokenizer.count_untruncated([all_texts[start + i] for i in countable])))
            results[r] = InputError("; ".join(_too_long(i, counts.get(i), limit) for i in refused))
            continue
        longest = max(len(x) for x in ids)
        length = bucket_length(longest, limit) if pad_to_buckets else longest
        input_ids, mask = tokenizer.pad(ids, length)
        counts = np.array([[len(x)] for x in ids], dtype=np.int32)
        results[r] = TokenizedRequest(input_ids, mask, counts)
    return results  # type: ignore[return-value]


# --- encoder side (CPU and GPU profiles) ------------------------------------------------------

class EncoderRowError(InputError):
    """One input of a request cannot be encoded (too long for the memory budget, or a non-finite vector):
    retrying the same input gives the same answer, so it is reported as INVALID_ARG."""


@dataclass
class EncodeStats:
    """Counters of one encoder execute(): rows, real and padded tokens, micro-batches run, rows refused."""

    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    batch_rows: list[int] = field(default_factory=list)
    too_long_rows: int = 0
    nonfinite_rows: int = 0
    recomputed_rows: int = 0


def unpad_rows(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
    """The real tokens of each row (padding may be on either side)."""
    return [row[mask.astype(bool)] for row, mask in zip(input_ids, attention_mask)]


def bad_rows(embeddings: np.ndarray, normalized: bool) -> np.ndarray:
    """Indices of rows that are not a usable vector: any NaN/Inf, or (``normalized``) a norm far from 1 -- an
    fp16 overflow inside the final L2 norm yields zeros, not NaN."""
    emb = np.asarray(embeddings, dtype=np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if normalized:
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(np.where(np.isfinite(emb), emb, 0.0), axis=1)
        bad |= np.abs(norms - 1.0) > 0.01
    return np.flatnonzero(bad)


def encode_requests(
    run: Callable[[np.ndarray, np.ndarray], np.ndarray],
    requests: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    pad_id: int,
    padding_side: str,
    max_tokens: int,
    max_rows: int,
    min_fill: float = DEFAULT_MIN_FILL,
    run_batches: Callable[[Sequence[tuple[np.ndarray, np.ndarray]]], list[np.ndarray]] | None = None,
    fits: Fits | None = None,
    longest_text: int | None = None,
    normalized: bool = False,
    fallback: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[list[np.ndarray | EncoderRowError], EncodeStats]:
    """Run the encoder over all rows of all requests, regrouped by length; results in request order.

    ``run`` encodes one micro-batch. ``run_batches``, when given, encodes a list of them at once (see
    :class:`~tritonembed.model_repository.microbatch_pool.MicroBatchPool`) and is used when the plan has at
    least :data:`POOL_MIN_BATCHES` micro-batches. ``fits`` bounds each micro-batch by the memory budget;
    a row that does not fit alone (longer than ``longest_text``, reported in the message) is not run and
    its request gets an :class:`EncoderRowError` in its slot. Every output row is checked
    (:func:`bad_rows`): a bad row is recomputed alone with ``fallback`` (a higher-precision session) when
    given, else its request gets an :class:`EncoderRowError` naming the input index. Other requests are
    unaffected. Exceptions of ``run`` propagate.
    """
    rows: list[np.ndarray] = []
    owners: list[tuple[int, int]] = []
    for r, (ids, mask) in enumerate(requests):
        for i, tokens in enumerate(unpad_rows(ids, mask)):
            rows.append(tokens)
            owners.append((r, i))
    outputs: list[np.ndarray | None] = [None] * len(rows)
    errors: dict[int, EncoderRowError] = {}
    stats = EncodeStats(rows=len(rows), real_tokens=int(sum(len(t) for t in rows)))
    runnable = list(range(len(rows)))
    if fits is not None:
        too_long = [k for k in runnable if not fits(1, len(rows[k]))]
        for k in too_long:
            r, i = owners[k]
            limit = f"at most {longest_text} tokens" if longest_text is not None else "fewer tokens"
            errors.setdefault(r, EncoderRowError(
                f"input[{i}] has {len(rows[k])} tokens; the encoder's memory budget fits {limit} in one text "
                "(grant more memory, e.g. --gpu-memory, or send a shorter text)"))
        stats.too_long_rows = len(too_long)
        skip = set(too_long) | {k for k, (r, _) in enumerate(owners) if r in errors}
        runnable = [k for k in runnable if k not in skip]
    sub_plan = plan_microbatches([len(rows[k]) for k in runnable], max_tokens, max_rows, min_fill, fits)
    plan = [[runnable[j] for j in batch] for batch in sub_plan]

    def padded(batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch([rows[i] for i in batch], pad_id, padding_side)

    embeddings: Iterable[np.ndarray]
    if run_batches is not None and len(plan) >= POOL_MIN_BATCHES:
        embeddings = run_batches([padded(batch) for batch in plan])  # the workers take them all at once
    else:
        embeddings = (run(*padded(batch)) for batch in plan)  # one padded micro-batch alive at a time
    for batch, emb in zip(plan, embeddings, strict=True):
        stats.padded_tokens += len(batch) * max(len(rows[i]) for i in batch)
        stats.batches += 1
        stats.batch_rows.append(len(batch))
        for j in bad_rows(emb, normalized):
            k = batch[j]
            stats.nonfinite_rows += 1
            if fallback is not None:  # alone, so a second overflow cannot be blamed on another row
                again = np.asarray(fallback(*pad_batch([rows[k]], pad_id, padding_side)), dtype=np.float32)
                if not len(bad_rows(again, normalized)):
                    emb = np.array(emb, dtype=np.float32)  # a session's output may be read-only
                    emb[j] = again[0]
                    stats.recomputed_rows += 1
                    continue
            r, i = owners[k]
            errors.setdefault(r, EncoderRowError(
                f"input[{i}] produced a non-finite embedding (numeric overflow in {'the fallback and ' if fallback else ''}"
                "the model's precision, e.g. fp16); it was not returned"))
        for j, i in enumerate(batch):
            outputs[i] = emb[j]
    per_request: list[list[np.ndarray]] = [[] for _ in requests]
    for (r, _), out in zip(owners, outputs):
        if r not in errors:
            per_request[r].append(out)  # type: ignore[arg-type]
    hidden = None
    result: list[np.ndarray | EncoderRowError] = []
    for r, parts in enumerate(per_request):
        if r in errors:
            result.append(errors[r])
        elif parts:
            hidden = parts[0].shape[-1]
            result.append(np.stack(parts).astype(np.float32, copy=False))
        else:
            result.append(np.zeros((0, hidden or 0), dtype=np.float32))
    return result, stats
