"""Batching policy: how rows are grouped before they reach ONNX Runtime, in one place.

- the **length buckets** the tokenizer pads each request up to, so the encoder's dynamic batcher can merge
  requests of one length (:func:`bucket_length`);
- the **micro-batch planner** inside one encoder execute: similar lengths together, under a token budget,
  a row cap and the memory model's ``fits`` (:func:`plan_microbatches`);
- when the **micro-batch pool** (one-thread sessions side by side) is worth it (:data:`POOL_MIN_BATCHES`,
  :data:`MICROBATCH_POOL_MAX_MODEL_BYTES`).

The per-model knobs (token budget, rows, delays, instances) are :class:`~tritonembed.model_repository.configs.ServingOptions`;
the memory budget is :mod:`~tritonembed.model_repository.memory_model`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

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


# A row shorter than this fraction of its micro-batch's longest row starts a new micro-batch. Measured on
# the mixed STS-B + passages workload (docs/benchmarks.md, planner study): padding waste 74-79 % with a
# token budget alone, 5-13 % with 0.7, and 3-6x ONNX Runtime throughput on the same session.
DEFAULT_MIN_FILL = 0.7

#: ``fits(rows, length)``: whether a padded micro-batch of that size stays in the memory budget.
Fits = Callable[[int, int], bool]


def plan_microbatches(
    lengths: Sequence[int], max_tokens: int, max_rows: int, min_fill: float = DEFAULT_MIN_FILL,
    fits: Fits | None = None,
) -> list[list[int]]:
    """Group row indices into micro-batches of similar length.

    Rows are sorted longest first and packed greedily. A micro-batch is closed when adding the next row
    would exceed ``max_tokens`` padded tokens or ``max_rows`` rows, when ``fits`` (the memory budget, see
    :class:`~tritonembed.model_repository.memory_model.TokenBudget`) says the larger micro-batch would not
    fit, or when the next row is shorter than ``min_fill`` x the micro-batch's longest row (so no row
    carries more than ``1 - min_fill`` padding). A row longer than ``max_tokens`` runs alone (the caller
    refuses rows that do not fit even alone). Every index appears in exactly one micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current:
            longest = lengths[current[0]]
            if ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows
                    or lengths[i] < min_fill * longest
                    or (fits is not None and not fits(len(current) + 1, longest))):
                batches.append(current)
                current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# An execute with fewer micro-batches runs them one at a time on the multi-threaded session: a few small
# ones (concurrent short texts) are faster there than spread over one-thread workers.
POOL_MIN_BATCHES = 4
#: The micro-batch pool's second session copies the weights: above this size the encoder runs one session.
MICROBATCH_POOL_MAX_MODEL_BYTES = 256 * 1024**2
