"""Closed-loop load: ``concurrency`` workers each send one request, wait for the answer, send the next.

The same loop drives every HTTP/gRPC target that perf_analyzer cannot (our async client, the gateway,
a peer server), so their numbers differ only by the server behind them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tritonembed.benchmarks.stats import Throughput, throughput


@dataclass(frozen=True)
class Batch:
    """The texts of one request and their token count (tokens as the served model's tokenizer counts them)."""

    texts: tuple[str, ...]
    tokens: int


def make_batches(texts: Sequence[str], token_counts: Sequence[int], batch_size: int) -> list[Batch]:
    """Consecutive chunks of ``batch_size`` texts (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [Batch(tuple(texts[i:i + batch_size]), int(sum(token_counts[i:i + batch_size])))
            for i in range(0, len(texts), batch_size)]


async def closed_loop(
    call: Callable[[Sequence[str]], Awaitable[object]],
    batches: Sequence[Batch],
    *,
    concurrency: int,
    duration_s: float,
    warmup_requests: int = 2,
    min_requests: int = 4,
) -> Throughput:
    """Run ``call`` over ``batches`` (cycled) from ``concurrency`` workers for about ``duration_s``.

    Raises:
        whatever ``call`` raises (a failed request fails the measurement).
    """
    for i in range(warmup_requests):
        await call(batches[i % len(batches)].texts)
    next_index = 0
    latencies: list[float] = []
    texts = tokens = 0
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker() -> None:
        nonlocal next_index, texts, tokens
        while time.perf_counter() < deadline or len(latencies) < min_requests:
            batch = batches[next_index % len(batches)]
            next_index += 1
            t0 = time.perf_counter()
            await call(batch.texts)
            latencies.append((time.perf_counter() - t0) * 1e3)
            texts += len(batch.texts)
            tokens += batch.tokens

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return throughput(latencies, texts, tokens, time.perf_counter() - started)


def sequential_loop(
    call: Callable[[Sequence[str]], object],
    batches: Sequence[Batch],
    *,
    duration_s: float,
    warmup_requests: int = 2,
    min_requests: int = 4,
) -> Throughput:
    """The in-process twin of :func:`closed_loop` with one worker (a library call blocks its caller)."""
    for i in range(warmup_requests):
        call(batches[i % len(batches)].texts)
    latencies: list[float] = []
    texts = tokens = 0
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < duration_s or len(latencies) < min_requests:
        batch = batches[i % len(batches)]
        i += 1
        t0 = time.perf_counter()
        call(batch.texts)
        latencies.append((time.perf_counter() - t0) * 1e3)
        texts += len(batch.texts)
        tokens += batch.tokens
    return throughput(latencies, texts, tokens, time.perf_counter() - started)
