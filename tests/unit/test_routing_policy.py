"""Several Triton replicas: ReplicaPolicy (pure) and ReplicatedEmbeddingClient's failover over stand-in replicas.

The stand-ins replace each replica's AsyncEmbeddingClient (the integration test
tests/integration/test_gateway_replicas.py uses real tritonservers); a replica nobody listens on is the real
client's ConnectionFailed.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from tritonembed.client.core import EmbeddingResult, ModelInfo, RetryPolicy
from tritonembed.client.errors import ConnectionFailed, InvalidArgument, Overloaded, ServerError
from tritonembed.client.replicas import ReplicaPolicy, ReplicatedEmbeddingClient, split_urls
from tritonembed.gateway.metrics import Metrics
from tritonembed.launcher import free_port


# --- the policy ------------------------------------------------------------------------------------------------
def test_least_loaded_wins_and_ties_go_round_robin():
    policy = ReplicaPolicy(["a:1", "b:1", "c:1"])
    picks = []
    for _ in range(6):  # all idle: a, b, c, a, b, c
        r = policy.choose(0.0)
        picks.append(r.address)
    assert picks == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]
    a, b, c = policy.replicas
    policy.start(a), policy.start(a), policy.start(b)
    assert policy.choose(0.0) is c, "fewest in flight first"
    policy.start(c)
    assert policy.choose(0.0) in (b, c) and policy.choose(0.0) is not a


def test_a_failed_replica_rests_with_backoff_and_one_success_restores_it():
    policy = ReplicaPolicy(["a:1", "b:1"], rest=0.5, max_rest=2.0)
    a, b = policy.replicas
    for n, expected in enumerate((0.5, 1.0, 2.0, 2.0)):
        policy.start(a)
        policy.finish(a, 10.0, error="ConnectionFailed: refused")
        assert a.resting_until == pytest.approx(10.0 + expected), n
    assert a.failed == 4 and a.failures == 4 and a.requests == 4
    assert all(policy.choose(10.5) is b for _ in range(3)), "a rests: every request goes to b"
    assert policy.choose(13.0).address in ("a:1", "b:1")
    policy.start(a)
    assert policy.finish(a, 13.0, rows=5) is True, "a answered again"
    assert a.failures == 0 and a.resting_until == 0 and a.rows == 5


def test_failover_order_excludes_the_tried_and_falls_back_when_none_is_available():
    policy = ReplicaPolicy(["a:1", "b:1", "c:1"])
    a, b, c = policy.replicas
    policy.set_health(a, False, error="down")
    assert policy.choose(0.0, exclude=[b]) is c, "the unhealthy one is skipped while another is left"
    assert policy.choose(0.0, exclude=[b, c]) is a, "with every available one tried, the unhealthy one is tried"
    assert policy.choose(0.0, exclude=[b, c], fallback=False) is None
    assert policy.choose(0.0, exclude=[a, b, c]) is None, "each replica once per round"


def test_all_down_and_rejoin_by_health_check():
    policy = ReplicaPolicy(["a:1", "b:1"])
    a, b = policy.replicas
    assert policy.set_health(a, False) and policy.set_health(b, False)
    assert not policy.set_health(b, False), "no change, no news"
    assert policy.choose(0.0, fallback=False) is None
    assert policy.choose(0.0) is not None, "all down: still try one (it may be back already)"
    assert policy.set_health(b, True, models=["m"]) is True
    assert all(policy.choose(0.0) is b for _ in range(3)), "the one that came back gets the traffic"
    policy.start(b)
    policy.finish(b, 0.0, error="x")
    assert policy.all_failing() is False, "a has no failed request, only a failed health check"
    policy.start(a)
    policy.finish(a, 0.0, error="x")
    assert policy.all_failing() and policy.next_rest_end(0.0) == pytest.approx(0.5)


def test_a_model_is_routed_only_to_the_replicas_that_serve_it():
    policy = ReplicaPolicy(["a:1", "b:1"])
    a, b = policy.replicas
    assert policy.choose(0.0, model="m1") is a, "models not known yet: every replica is a candidate"
    policy.set_health(a, True, models=["m1"])
    policy.set_health(b, True, models=["m1", "m2"])
    assert all(policy.choose(0.0, model="m2") is b for _ in range(4))
    assert policy.choose(0.0, model="m3") is None


def test_capacity_caps_in_flight_per_replica():
    policy = ReplicaPolicy(["a:1"])
    (a,) = policy.replicas
    policy.start(a)
    assert policy.choose(0.0, capacity=1) is None and policy.choose(0.0, capacity=2) is a


def test_split_urls():
    assert split_urls(" a:1, b:2 ,") == ["a:1", "b:2"]
    with pytest.raises(InvalidArgument):
        split_urls(" , ")
    with pytest.raises(InvalidArgument):
        split_urls(["a:1", "a:1"])


# --- the shell -------------------------------------------------------------------------------------------------
def info(name: str) -> ModelInfo:
    return ModelInfo(name=name, spec=None, max_batch_size=8)  # the shell only routes: the spec is not read


class StandIn:
    """Answers like AsyncEmbeddingClient; ``error`` (when set) is raised by every call."""

    def __init__(self, value: float, models: tuple[str, ...] = ("m",)) -> None:
        self.value, self.served, self.error, self.calls = value, models, None, 0

    async def models(self):
        if self.error:
            raise self.error
        return [info(n) for n in self.served]

    async def embed_with_usage(self, texts, *, model=None, **kwargs):
        self.calls += 1
        await asyncio.sleep(0.001)
        if self.error:
            raise self.error
        return EmbeddingResult(np.full((len(texts), 2), self.value, np.float32), np.ones(len(texts), np.int64), model or "m")

    async def is_ready(self, model=None):
        return self.error is None and model in self.served

    async def close(self):
        pass


def replicated(stand_ins: dict[int, StandIn], n: int, **kw) -> ReplicatedEmbeddingClient:
    urls = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    client = ReplicatedEmbeddingClient(urls, retry=kw.pop("retry", RetryPolicy(max_retries=1, initial_backoff=0.01)),
                                       **kw)
    for i, stand_in in stand_ins.items():
        client.clients[i] = stand_in
    return client


def test_a_dead_replica_costs_no_request_and_is_counted(caplog):
    up = StandIn(1.0)
    client = replicated({1: up}, 2)  # replica 0 is a real client to a closed port: ConnectionFailed

    async def main():
        try:
            return await asyncio.gather(*(client.embed_with_usage(["t"] * 3, model="m") for _ in range(20)))
        finally:
            await client.close()

    with caplog.at_level(logging.INFO, "tritonembed.client"):
        results = asyncio.run(main())
    assert all(np.all(r.embeddings == 1.0) for r in results)
    dead, alive = client.backend_stats()
    assert dead["failures"] >= 1 and dead["requests"] == dead["failures"], dead
    assert alive["requests"] == 20 and alive["failures"] == 0 and alive["healthy"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "failed on" in r.getMessage()], \
        "a failover is INFO, not WARNING"


def test_all_down_raises_connection_failed_after_the_rounds_with_one_warning(caplog):
    a, b = StandIn(1.0), StandIn(2.0)
    a.error = b.error = ConnectionFailed("down")
    client = replicated({0: a, 1: b}, 2, retry=RetryPolicy(max_retries=2, initial_backoff=0.01))

    async def main():
        try:
            await client.embed_with_usage(["t"], model="m")
        finally:
            await client.close()

    with caplog.at_level(logging.INFO, "tritonembed.client"), pytest.raises(ConnectionFailed):
        asyncio.run(main())
    assert a.calls == b.calls == 3, "each round asks every replica once"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "every replica" in r.getMessage()]
    assert len(warnings) == 1 and "6 attempts" in warnings[0].getMessage()


@pytest.mark.parametrize("error", [InvalidArgument("bad", param="texts[0]"), ServerError("boom")])
def test_an_error_of_the_request_itself_is_not_resent(error):
    a, b = StandIn(1.0), StandIn(2.0)
    a.error = b.error = error
    client = replicated({0: a, 1: b}, 2)

    async def main():
        try:
            await client.embed_with_usage(["t"], model="m")
        finally:
            await client.close()

    with pytest.raises(type(error)):
        asyncio.run(main())
    assert a.calls + b.calls == 1
    assert all(s["failures"] == 0 and s["in_flight"] == 0 for s in client.backend_stats())


def test_overloaded_moves_to_another_replica():
    a, b = StandIn(1.0), StandIn(2.0)
    a.error = Overloaded("queue full")
    client = replicated({0: a, 1: b}, 2)

    async def main():
        try:
            return [await client.embed(["t"], model="m") for _ in range(4)]
        finally:
            await client.close()

    assert all(np.all(v == 2.0) for v in asyncio.run(main()))


def test_models_are_the_union_and_a_model_goes_only_where_it_is_served():
    a, b = StandIn(1.0, ("m1",)), StandIn(2.0, ("m1", "m2"))
    client = replicated({0: a, 1: b}, 2)

    async def main():
        try:
            names = sorted(m.name for m in await client.models())
            vectors = [await client.embed(["t"], model="m2") for _ in range(4)]
            ready = await client.is_ready("m2"), await client.is_ready("m3")
            return names, vectors, ready
        finally:
            await client.close()

    names, vectors, ready = asyncio.run(main())
    assert names == ["m1", "m2"] and all(np.all(v == 2.0) for v in vectors) and a.calls == 0
    assert ready == (True, False)


def test_a_replica_that_comes_back_rejoins_through_the_health_check():
    a, b = StandIn(1.0), StandIn(2.0)
    a.error = ConnectionFailed("down")
    client = replicated({0: a, 1: b}, 2, health_interval=0.05)

    async def main():
        try:
            await client.models()  # the health check marks a down
            first = [await client.embed(["t"], model="m") for _ in range(4)]
            calls_while_down = a.calls
            a.error = None
            for _ in range(100):  # bounded: the next health check (every 0.05 s) brings a back
                await asyncio.sleep(0.02)
                if client.backend_stats()[0]["healthy"]:
                    break
            second = [await client.embed(["t"], model="m") for _ in range(4)]
            return first, second, calls_while_down
        finally:
            await client.close()

    first, second, calls_while_down = asyncio.run(main())
    assert all(np.all(v == 2.0) for v in first) and calls_while_down == 0, "a down replica got nothing"
    assert sorted(float(v[0, 0]) for v in second) == [1.0, 1.0, 2.0, 2.0], "back: round-robin with b again"


def test_all_models_unreachable_raises_the_first_error():
    a, b = StandIn(1.0), StandIn(2.0)
    a.error, b.error = ConnectionFailed("a down"), ConnectionFailed("b down")
    client = replicated({0: a, 1: b}, 2)

    async def main():
        try:
            await client.models()
        finally:
            await client.close()

    with pytest.raises(ConnectionFailed, match="a down"):
        asyncio.run(main())
    assert [s["healthy"] for s in client.backend_stats()] == [0, 0]


def test_backend_metrics_are_labelled_by_address():
    metrics = Metrics()
    metrics.backends = lambda: [{"backend": "10.0.0.1:8001", "requests": 7, "failures": 2, "in_flight": 1, "healthy": 0}]
    text = metrics.render()
    assert 'tritonembed_gateway_backend_requests_total{backend="10.0.0.1:8001"} 7' in text
    assert 'tritonembed_gateway_backend_failures_total{backend="10.0.0.1:8001"} 2' in text
    assert 'tritonembed_gateway_backend_requests_in_flight{backend="10.0.0.1:8001"} 1' in text
    assert 'tritonembed_gateway_backend_healthy{backend="10.0.0.1:8001"} 0' in text


def test_a_hung_replica_is_marked_down_by_the_health_timeout():
    a, b = StandIn(1.0), StandIn(2.0)

    async def hang():
        await asyncio.sleep(30)

    a.models = hang
    client = replicated({0: a, 1: b}, 2, health_timeout=0.1)

    async def main():
        try:
            names = [m.name for m in await client.models()]
            return names, [await client.embed(["t"], model="m") for _ in range(3)]
        finally:
            await client.close()

    names, vectors = asyncio.run(main())
    assert names == ["m"] and all(np.all(v == 2.0) for v in vectors) and a.calls == 0
    assert [s["healthy"] for s in client.backend_stats()] == [0, 1]
