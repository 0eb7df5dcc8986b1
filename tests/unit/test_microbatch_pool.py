"""MicroBatchPool and the encoder's choice of workers; encode_requests with a pool."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tritonembed.model_repository.batching import MICROBATCH_POOL_MAX_MODEL_BYTES, POOL_MIN_BATCHES
from tritonembed.model_repository.microbatch_pool import MicroBatchPool, pool_workers
from tritonembed.model_repository.stages import encode_requests
from tritonembed.model_repository.tokenization import pad_batch


def _first_token_encoder(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An "encoder" whose rows say which row they came from: (first real token, real length)."""
    first = np.array([row[m.astype(bool)][0] for row, m in zip(ids, mask)], dtype=np.float32)
    return np.stack([first, mask.sum(1).astype(np.float32)], axis=1)


def test_pool_keeps_the_order_and_runs_batches_at_once() -> None:
    running, peak, lock = 0, 0, threading.Lock()

    def slow(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05 if ids[0, -1] == 1 else 0.01)  # the first batch finishes last
        with lock:
            running -= 1
        return _first_token_encoder(ids, mask)

    pool = MicroBatchPool(slow, workers=2)
    try:
        batches = [pad_batch([[k, k]], 0, "left") for k in (1, 2, 3, 4)]
        out = pool(batches)
    finally:
        pool.close()
    assert [float(o[0, 0]) for o in out] == [1, 2, 3, 4]
    assert peak == 2


def test_pool_raises_the_first_failure() -> None:
    def broken(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise RuntimeError("bad batch")

    pool = MicroBatchPool(broken, workers=2)
    with pytest.raises(RuntimeError, match="bad batch"):
        pool([pad_batch([[1]], 0, "left")] * 2)
    pool.close()


def test_a_pool_of_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        MicroBatchPool(_first_token_encoder, workers=1)


@pytest.mark.parametrize("requested,threads,size,expected", [
    (2, 2, 90 * 2**20, 2), (1, 2, 90 * 2**20, 1), (2, 1, 90 * 2**20, 1),
    (2, 2, MICROBATCH_POOL_MAX_MODEL_BYTES + 1, 1), (3, 4, MICROBATCH_POOL_MAX_MODEL_BYTES, 3)])
def test_pool_workers(requested: int, threads: int, size: int, expected: int) -> None:
    assert pool_workers(requested, threads, size) == expected


def test_encode_requests_uses_the_pool_only_for_several_micro_batches() -> None:
    calls: list[int] = []

    def run_batches(batches):
        calls.append(len(batches))
        return [_first_token_encoder(*b) for b in batches]

    def encode(requests):
        return encode_requests(_first_token_encoder, requests, pad_id=0, padding_side="left", max_tokens=4,
                               max_rows=4, run_batches=run_batches)

    # rows of lengths 1..6 under a 4-token budget: one micro-batch per length class, at least POOL_MIN_BATCHES
    many = [pad_batch([[10 * k + j for j in range(k)] for k in range(1, 7)], 0, "left")]
    outputs, stats = encode(many)
    assert stats.batches >= POOL_MIN_BATCHES and calls == [stats.batches]
    assert outputs[0][:, 0].tolist() == [10 * k for k in range(1, 7)]
    assert outputs[0][:, 1].tolist() == [1, 2, 3, 4, 5, 6]

    calls.clear()
    few = [pad_batch([[7, 8]], 0, "left"), pad_batch([[9, 9, 9, 9]], 0, "left")]
    outputs, stats = encode(few)
    assert calls == [] and 1 <= stats.batches < POOL_MIN_BATCHES  # the multi-threaded session runs them
    assert outputs[0][:, 0].tolist() == [7] and outputs[1][:, 0].tolist() == [9]
