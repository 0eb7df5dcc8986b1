"""Run several encoder micro-batches at once, on threads over a single-threaded ONNX Runtime session.

On a small CPU, one micro-batch of 512 padded tokens does not keep two intra-op threads busy (ONNX Runtime
splits each op, and the halves wait for each other). Two micro-batches side by side, each on one thread,
do more work per second: bare ONNX Runtime on MiniLM's mixed workload, 2 cores, 6 alternated rounds --
two callers on one 1-thread session 1.10 x one 2-thread session (two 1-thread sessions 1.11 x; at 4,096-token
micro-batches it was 0.97-1.0 x). A single micro-batch (one short text) still runs on the multi-threaded
session, where it is faster. ``docs/serving.md`` ("Micro-batch workers") has the server's A/B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tritonembed.model_repository.batching import MICROBATCH_POOL_MAX_MODEL_BYTES

Batch = tuple[np.ndarray, np.ndarray]


def pool_workers(requested: int, intra_op_threads: int, size: int) -> int:
    """The micro-batch workers to use: ``requested``, or 1 (no pool) with fewer than 2 intra-op threads or a
    model over :data:`~tritonembed.model_repository.batching.MICROBATCH_POOL_MAX_MODEL_BYTES`."""
    if requested < 2 or intra_op_threads < 2 or size > MICROBATCH_POOL_MAX_MODEL_BYTES:
        return 1
    return requested


class MicroBatchPool:
    """``workers`` threads calling ``run_one`` (thread-safe, e.g. ``InferenceSession.run``) on a list of micro-batches.

    A context manager: leaving the block shuts the threads down.

    Raises:
        ValueError: fewer than 2 workers.
    """

    def __init__(self, run_one: Callable[[np.ndarray, np.ndarray], np.ndarray], workers: int) -> None:
        if workers < 2:
            raise ValueError(f"a pool needs at least 2 workers, got {workers}")
        self._run_one = run_one
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tritonembed-microbatch")

    def __call__(self, batches: Sequence[Batch]) -> list[np.ndarray]:
        """The embeddings of each micro-batch, in the order given; the first failure is raised."""
        return list(self._pool.map(lambda batch: self._run_one(*batch), batches))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> MicroBatchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
