"""Tokenizer/encoder stage logic without a server: padding, buckets, micro-batches, per-request errors."""

from __future__ import annotations

import numpy as np
import pytest

from tritonembed.errors import InputError
from tritonembed.export.families import BertLikeFamily, ExportOptions, read_json
from tritonembed.export.resolve import resolve_model
from tritonembed.model_repository.batching import bucket_length, plan_microbatches
from tritonembed.model_repository.stages import (
    EncoderRowError,
    TokenizeRequest,
    bad_rows,
    encode_requests,
    tokenize_requests,
    unpad_rows,
)
from tritonembed.model_repository.tokenization import SpecTokenizer, decode_text, pad_batch


@pytest.fixture(scope="module")
def minilm_tokenizer() -> SpecTokenizer:
    resolved = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    family = BertLikeFamily()
    config = read_json(resolved.path / "config.json")
    spec = family.make_spec(resolved.path, resolved.model_id, config, ExportOptions(max_length=16))
    return SpecTokenizer(resolved.path / "tokenizer.json", spec)


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="right", length=5)
    assert ids.tolist() == [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9]] and mask.sum() == 4
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    with pytest.raises(ValueError):
        pad_batch([[1, 2, 3]], 0, "left", length=2)


def test_unpad_rows_undoes_either_side():
    for side in ("left", "right"):
        ids, mask = pad_batch([[5, 6, 7], [8]], 0, side)
        assert [r.tolist() for r in unpad_rows(ids, mask)] == [[5, 6, 7], [8]]


@pytest.mark.parametrize("length, limit, expected", [(1, 512, 8), (8, 512, 8), (9, 512, 16), (33, 512, 48),
                                                     (500, 512, 512), (300, 300, 300), (9000, 8192, 9000)])
def test_bucket_length(length, limit, expected):
    assert bucket_length(length, limit) == expected


def test_buckets_bound_padding():
    for n in range(1, 8193):
        b = bucket_length(n, 8192)
        assert n <= b <= max(n + 8, int(n * 1.5) + 1)  # steps of 8 below 32, <= 1.5x above


def test_plan_microbatches_covers_every_row_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 600, size=300).tolist()
    batches = plan_microbatches(lengths, max_tokens=4096, max_rows=64)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(300))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 64
        assert len(b) * longest <= 4096 or len(b) == 1
    # length-sorted grouping keeps padding small
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.1


def test_plan_microbatches_never_pads_a_row_beyond_min_fill():
    # the mixed-workload shape: a few long passages among many short sentences
    lengths = [256] * 8 + [12, 15, 9, 20, 31, 7, 18, 22] * 3
    batches = plan_microbatches(lengths, max_tokens=16384, max_rows=256, min_fill=0.7)
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert all(lengths[i] >= 0.7 * longest for i in b), [lengths[i] for i in b]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.15  # a token budget alone would pad every row to 256: 65 % waste


def test_encode_requests_returns_rows_in_request_order():
    def run(ids, mask):  # an "encoder" whose output encodes the first real token of each row
        first = np.array([row[m.astype(bool)][0] for row, m in zip(ids, mask)], dtype=np.float32)
        return np.stack([first, mask.sum(1).astype(np.float32)], axis=1)

    req_a = pad_batch([[10, 11, 12], [20]], 0, "left")
    req_b = pad_batch([[30, 31], [40, 41, 42, 43, 44], [50]], 0, "left", length=8)
    outputs, stats = encode_requests(run, [req_a, req_b], pad_id=0, padding_side="left", max_tokens=8, max_rows=4)
    assert outputs[0][:, 0].tolist() == [10, 20] and outputs[0][:, 1].tolist() == [3, 1]
    assert outputs[1][:, 0].tolist() == [30, 40, 50] and outputs[1][:, 1].tolist() == [2, 5, 1]
    assert stats.rows == 5 and stats.real_tokens == 12 and stats.batches >= 2
    assert stats.padded_tokens >= stats.real_tokens


def test_decode_text_errors():
    assert decode_text("héllo".encode(), 0) == "héllo"
    with pytest.raises(InputError, match=r"input\[2\] is not valid UTF-8"):
        decode_text(b"\xc3\x28", 2)
    # one blank rule with the gateway and the client (tritonembed.text_rules): whitespace, controls,
    # zero-width and format characters only
    for blank in (b"  \n", "\u200b".encode(), b"\x00\x01", "\ufeff\n\u3000".encode()):
        with pytest.raises(InputError, match=r"input\[0\] is empty"):
            decode_text(blank, 0)
    assert decode_text("\u200ba".encode(), 0) == "\u200ba"


def test_tokenize_requests_isolates_bad_requests(minilm_tokenizer):
    long_text = "word " * 100
    requests = [
        TokenizeRequest([b"hello world", b"a"]),
        TokenizeRequest([b""]),
        TokenizeRequest([b"\xff"]),
        TokenizeRequest([long_text.encode()], truncate=[False]),
        TokenizeRequest([long_text.encode()], truncate=[True]),
        TokenizeRequest([b"x"], instructions=[b"q", b"extra"]),
    ]
    results = tokenize_requests(minilm_tokenizer, requests)
    ok = results[0]
    assert ok.input_ids.shape == (2, 8) and ok.token_counts.ravel().tolist() == [4, 3]
    assert isinstance(results[1], InputError) and "empty" in str(results[1])
    assert isinstance(results[2], InputError) and "UTF-8" in str(results[2])
    assert isinstance(results[3], InputError) and "input[0] has 102 tokens" in str(results[3]) and "limit is 16" in str(results[3])
    assert results[4].token_counts.ravel().tolist() == [16]
    assert isinstance(results[5], InputError) and "INSTRUCTION has 2 rows" in str(results[5])


def test_tokenize_requests_without_buckets_pads_to_longest(minilm_tokenizer):
    [result] = tokenize_requests(minilm_tokenizer, [TokenizeRequest([b"hello world"])], pad_to_buckets=False)
    assert result.input_ids.shape == (1, 4)


# --- encoder side: memory budget and non-finite rows -----------------------------------------

def _first_token(ids, mask):  # an "encoder" whose unit-norm output encodes the first real token of each row
    first = np.array([row[m.astype(bool)][0] for row, m in zip(ids, mask)], dtype=np.float32)
    return np.stack([np.cos(first), np.sin(first)], axis=1)


def test_plan_microbatches_splits_what_the_memory_budget_does_not_fit():
    lengths = [100] * 8
    fits = lambda rows, length: rows * length * length <= 2 * 100 * 100  # noqa: E731 - quadratic, two rows
    batches = plan_microbatches(lengths, max_tokens=10_000, max_rows=64, fits=fits)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert [len(b) for b in batches] == [2, 2, 2, 2]


def test_encode_requests_refuses_a_text_too_long_for_the_budget_and_serves_the_others():
    fits = lambda rows, length: rows * length <= 6  # noqa: E731
    too_long = pad_batch([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], 0, "left")
    fine = pad_batch([[11, 12], [13, 14], [15, 16, 17]], 0, "left")
    calls = []

    def run(ids, mask):
        calls.append(ids.shape)
        return _first_token(ids, mask)

    outputs, stats = encode_requests(run, [too_long, fine], pad_id=0, padding_side="left", max_tokens=100,
                                     max_rows=8, fits=fits, longest_text=6)
    assert isinstance(outputs[0], EncoderRowError)
    assert "input[1] has 7 tokens" in str(outputs[0]) and "at most 6 tokens" in str(outputs[0])
    np.testing.assert_allclose(outputs[1], _first_token(*pad_batch([[11], [13], [15]], 0, "left")))
    assert stats.too_long_rows == 1
    assert all(rows * length <= 6 for rows, length in calls)  # every run stayed in the budget
    assert sum(rows for rows, _ in calls) == 3  # the refused request's other row was not run either


def test_a_nonfinite_row_fails_only_its_request_or_is_recomputed_by_the_fallback():
    def overflowing(ids, mask):  # token 99 overflows, like an fp16 graph on an unlucky input
        out = _first_token(ids, mask)
        out[(ids == 99).any(axis=1)] = np.nan
        return out

    bad = pad_batch([[1, 2], [99, 3]], 0, "left")
    good = pad_batch([[5, 6], [7]], 0, "left")
    outputs, stats = encode_requests(overflowing, [bad, good], pad_id=0, padding_side="left", max_tokens=64,
                                     max_rows=8, normalized=True)
    assert isinstance(outputs[0], EncoderRowError) and "input[1] produced a non-finite embedding" in str(outputs[0])
    assert np.isfinite(outputs[1]).all() and outputs[1].shape == (2, 2)
    assert stats.nonfinite_rows == 1

    outputs, stats = encode_requests(overflowing, [bad, good], pad_id=0, padding_side="left", max_tokens=64,
                                     max_rows=8, normalized=True, fallback=_first_token)
    np.testing.assert_allclose(outputs[0], _first_token(*pad_batch([[1], [99]], 0, "left")), rtol=1e-6)
    assert stats.recomputed_rows == 1


def test_bad_rows_catches_the_zero_vector_of_an_overflowed_norm():
    emb = np.array([[0.6, 0.8], [0.0, 0.0], [np.inf, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert bad_rows(emb, normalized=True).tolist() == [1, 2]
    assert bad_rows(emb, normalized=False).tolist() == [2]
