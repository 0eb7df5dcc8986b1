"""UrlPool: batches spread over URLs, a failed URL's batch retried elsewhere, the deadline when all are down.

A URL nobody listens on gives the real client's ConnectionFailed; the answering URLs are stand-ins with the
client's ``embed`` signature (the integration test uses real tritonservers).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tritonembed.client.bulk import AllUrlsDown, BulkError, UrlPool
from tritonembed.client.errors import ConnectionFailed, InvalidArgument, ModelNotFound
from tritonembed.launcher import free_port


class StandIn:
    """Answers like AsyncEmbeddingClient.embed; fails its first ``fail_first`` calls with ``error``."""

    def __init__(self, fail_first: int = 0, error: Exception | None = None) -> None:
        self.fail_first, self.error, self.calls = fail_first, error, 0

    async def embed(self, texts, *, dimensions=None, input_type=None):
        self.calls += 1
        await asyncio.sleep(0.001)
        if self.calls <= self.fail_first:
            raise self.error or ConnectionFailed("stand-in is down")
        return np.ones((len(texts), 4), np.float32)

    async def close(self) -> None:
        pass


def pool_with(stand_ins: dict[int, StandIn], n: int, **kw) -> UrlPool:
    urls = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    pool = UrlPool(urls, **kw)
    by_url = {b.url: b for b in pool.backends}
    for i, stand_in in stand_ins.items():
        by_url[urls[i]].client = stand_in
    return pool, urls


def run_batches(pool: UrlPool, batches: int, size: int = 3) -> list[np.ndarray]:
    async def main():
        try:
            return await asyncio.gather(*(pool.embed([f"t{i}"] * size) for i in range(batches)))
        finally:
            await pool.close()
    return asyncio.run(main())


def test_a_refused_url_costs_no_batch():
    up = StandIn()
    pool, urls = pool_with({1: up}, 2, in_flight_per_url=2)
    out = run_batches(pool, 30)
    assert len(out) == 30 and all(v.shape == (3, 4) for v in out)
    assert pool.rows_per_url() == {urls[0]: 0, urls[1]: 90}
    assert pool.failovers >= 1, "the refused URL was tried and its batch moved"


def test_a_url_that_comes_back_rejoins():
    flaky, steady = StandIn(fail_first=2), StandIn()
    pool, urls = pool_with({0: flaky, 1: steady}, 2, in_flight_per_url=1)

    async def main():
        for i in range(60):  # sequential, so the flaky URL's rest (0.5 s, then 1 s) runs out during the loop
            await pool.embed([f"t{i}"])
            await asyncio.sleep(0.05)
        await pool.close()

    asyncio.run(main())
    rows = pool.rows_per_url()
    assert rows[urls[0]] > 0 and rows[urls[0]] + rows[urls[1]] == 60, rows


def test_all_urls_down_fails_after_the_deadline():
    pool, urls = pool_with({}, 2, deadline=1.0)
    with pytest.raises(AllUrlsDown) as caught:
        run_batches(pool, 4)
    assert all(u in str(caught.value) for u in urls) and "run the same command again" in str(caught.value)


def test_invalid_argument_is_not_retried():
    refusing = [StandIn(fail_first=100, error=InvalidArgument("text 1 is too long", param="texts[1]")) for _ in range(2)]
    pool, _ = pool_with(dict(enumerate(refusing)), 2, in_flight_per_url=1)
    with pytest.raises(InvalidArgument):
        run_batches(pool, 1)
    assert sum(s.calls for s in refusing) == 1, "another URL would refuse the same texts"


def test_a_model_no_url_serves_fails_at_once():
    lacking = [StandIn(fail_first=100, error=ModelNotFound("model 'typo' is not served")) for _ in range(2)]
    pool, urls = pool_with(dict(enumerate(lacking)), 2, in_flight_per_url=1, deadline=600)
    with pytest.raises(BulkError, match="no URL serves the model") as caught:
        run_batches(pool, 1)
    assert not isinstance(caught.value, AllUrlsDown) and all(u in str(caught.value) for u in urls)
