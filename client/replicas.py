"""Several Triton replicas behind one client: the routing policy and its asyncio shell.

The one owner of "several replicas" in tritonembed: the gateway (``--triton-url A,B``) and the bulk job's
:class:`~tritonembed.client.bulk.UrlPool` both route through :class:`ReplicaPolicy`.

- :class:`ReplicaPolicy` is pure (no I/O, the clock passed in): which replica gets the next request
  (fewest in flight; ties round-robin), what a failure does (the replica rests 0.5 s, doubling per
  consecutive failure up to 10 s), what a health check does (unhealthy replicas get nothing while a
  healthy one is left), which replicas serve which model.
- :class:`ReplicatedEmbeddingClient` is the I/O shell: one :class:`~tritonembed.client.AsyncEmbeddingClient`
  per replica, a background task that reads each replica's ready models every ``health_interval`` seconds
  (and at once after a failed request; no answer within ``health_timeout`` is down), and failover: a
  request whose replica fails before answering (:class:`ConnectionFailed`, :class:`Overloaded`: the request
  never reached the model) is sent to another replica, since embedding is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from tritonembed.client.aio import AsyncEmbeddingClient
from tritonembed.client.core import EmbeddingResult, ModelInfo, RerankResult, RetryPolicy, choose_model
from tritonembed.client.errors import ConnectionFailed, EmbeddingError, InvalidArgument, Timeout

logger = logging.getLogger("tritonembed.client")
T = TypeVar("T")

REST_INITIAL = 0.5
REST_MAX = 10.0


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """``"A,B"`` or ``["A", "B"]`` as a list of non-empty, stripped URLs.

    Raises:
        InvalidArgument: no URL, or the same URL twice.
    """
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [u.strip() for u in parts if u.strip()]
    if not found:
        raise InvalidArgument(f"no Triton URL in {urls!r}")
    if len(set(found)) != len(found):
        raise InvalidArgument(f"a Triton URL is given twice in {urls!r}")
    return found


# --- the policy (pure) -------------------------------------------------------------------------------------------
@dataclass
class Replica:
    """One replica's routing state and counters. ``address`` is ``host:port`` (a metrics label: never a key)."""

    address: str
    index: int
    healthy: bool = True  # the last health check's verdict (True until one says otherwise)
    in_flight: int = 0
    failures: int = 0  # consecutive failed requests
    resting_until: float = 0.0
    models: frozenset[str] | None = None  # ready models from the last health check; None = not known yet
    requests: int = 0
    failed: int = 0
    rows: int = 0
    last_error: str = ""

    def available(self, now: float) -> bool:
        return self.healthy and self.resting_until <= now

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models


class ReplicaPolicy:
    """Least-loaded routing over replicas, with rests after failures and health verdicts.

    Not thread-safe: use it from one event loop (or under a lock).
    """

    def __init__(self, addresses: Sequence[str], *, rest: float = REST_INITIAL, max_rest: float = REST_MAX) -> None:
        if not addresses:
            raise InvalidArgument("a replica policy needs at least one address")
        self.replicas = [Replica(address, i) for i, address in enumerate(addresses)]
        self.rest, self.max_rest = rest, max_rest
        self._last = -1  # index of the replica chosen last: ties go to the next one after it

    def choose(self, now: float, *, model: str | None = None, exclude: Iterable[Replica] = (),
               capacity: int | None = None, fallback: bool = True) -> Replica | None:
        """The replica for the next request, or None.

        Candidates serve ``model`` (or are not known yet), are not in ``exclude`` and have fewer than
        ``capacity`` requests in flight. Among them the available ones (healthy, not resting) win; with
        ``fallback`` and none available, an unavailable candidate is tried rather than none (so a lone
        replica is asked again as soon as it may be back). Fewest in flight first; ties round-robin.
        """
        skip = {r.index for r in exclude}
        candidates = [r for r in self.replicas if r.index not in skip and r.serves(model)
                      and (capacity is None or r.in_flight < capacity)]
        pool = [r for r in candidates if r.available(now)] or (candidates if fallback else [])
        if not pool:
            return None
        least = min(r.in_flight for r in pool)
        n = len(self.replicas)
        pick = min((r for r in pool if r.in_flight == least), key=lambda r: (r.index - self._last - 1) % n)
        self._last = pick.index
        return pick

    def start(self, replica: Replica) -> None:
        """A request was sent to ``replica``."""
        replica.in_flight += 1
        replica.requests += 1

    def finish(self, replica: Replica, now: float, *, error: str | None = None, rows: int = 0) -> bool:
        """A request to ``replica`` ended, with ``error`` (a short description) when it failed before answering.

        Returns True when a replica that had failed answered again.
        """
        replica.in_flight -= 1
        if error is not None:
            replica.failed += 1
            replica.failures += 1
            replica.resting_until = now + min(self.max_rest, self.rest * 2 ** (replica.failures - 1))
            replica.last_error = error
            return False
        came_back = replica.failures > 0
        replica.failures, replica.resting_until = 0, 0.0
        replica.rows += rows
        return came_back

    def set_health(self, replica: Replica, healthy: bool, *, models: Iterable[str] | None = None,
                   error: str = "") -> bool:
        """A health check's verdict (and, when healthy, the replica's ready models). Returns True on a change."""
        changed = healthy != replica.healthy
        replica.healthy = healthy
        if healthy:
            if models is not None:
                replica.models = frozenset(models)
        else:
            replica.last_error = error or replica.last_error
        return changed

    def all_failing(self) -> bool:
        """Whether every replica's last request failed."""
        return all(r.failures for r in self.replicas)

    def next_rest_end(self, now: float) -> float | None:
        """When the first resting replica may be asked again (None: none rests)."""
        ends = [r.resting_until for r in self.replicas if r.resting_until > now]
        return min(ends) if ends else None


# --- the I/O shell -----------------------------------------------------------------------------------------------
def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class ReplicatedEmbeddingClient:
    """An :class:`~tritonembed.client.AsyncEmbeddingClient` over several Triton replicas, with failover.

    Takes the :class:`AsyncEmbeddingClient` arguments, with ``urls`` (``"A,B"`` or a list) instead of one URL.
    ``retry`` applies to whole rounds: a request first tries each replica that serves its model once (no
    wait in between); when all of them failed before answering, it waits ``retry.delay(k)`` and starts
    round ``k + 1``, up to ``retry.max_retries`` more rounds. Errors of the request itself
    (:class:`InvalidArgument`, :class:`ModelNotFound`, :class:`Timeout`, :class:`ServerError`) are raised at
    once. Use ``async with`` or ``await client.close()``.

    Raises (constructor):
        InvalidArgument: no URL, a URL twice, or an invalid argument of :class:`AsyncEmbeddingClient`.
    """

    def __init__(self, urls: str | Sequence[str], model: str | None = None, *, protocol: str | None = None,
                 timeout: float = 60.0, max_concurrency: int = 4, batch_size: int | None = None,
                 retry: RetryPolicy | None = None, force_dimensions: bool = False,
                 headers: dict[str, str] | None = None, health_interval: float = 1.0,
                 health_timeout: float = 5.0) -> None:
        if health_interval <= 0 or health_timeout <= 0:
            raise InvalidArgument(f"health_interval and health_timeout must be positive, got {health_interval}, "
                                  f"{health_timeout}")
        self.clients = [AsyncEmbeddingClient(url, model, protocol=protocol, timeout=timeout,
                                             max_concurrency=max_concurrency, batch_size=batch_size,
                                             retry=RetryPolicy(max_retries=0), force_dimensions=force_dimensions,
                                             headers=headers)
                        for url in split_urls(urls)]
        addresses = [c.url for c in self.clients]
        if len(set(addresses)) != len(addresses):
            raise InvalidArgument(f"two URLs name the same replica: {addresses}")
        self.policy = ReplicaPolicy(addresses)
        self.retry = retry or RetryPolicy()
        self.health_interval, self.health_timeout = health_interval, health_timeout
        self._model = model
        self._poller: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return ",".join(r.address for r in self.policy.replicas)

    # --- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> ReplicatedEmbeddingClient:
        self._ensure_poller()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the health checks and close every replica's channel. Idempotent."""
        self._closed = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await poller
        for client in self.clients:
            await client.close()

    def _ensure_poller(self) -> None:
        if self._poller is None and not self._closed:
            self._wake = asyncio.Event()
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="tritonembed-replica-health")

    async def _poll(self) -> None:
        assert self._wake is not None
        while not self._closed:  # the flag too: 3.11's wait_for can swallow a cancel that meets a wake-up
            await self.check_health()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.health_interval)
            self._wake.clear()

    async def check_health(self) -> list[list[ModelInfo] | EmbeddingError]:
        """Ask every replica for its ready models now and record the verdicts; the answers, per replica."""
        answers = await asyncio.gather(*(self._check(i) for i in range(len(self.clients))))
        return list(answers)

    async def _check(self, i: int) -> list[ModelInfo] | EmbeddingError:
        replica = self.policy.replicas[i]
        try:
            try:
                models = await asyncio.wait_for(self.clients[i].models(), self.health_timeout)
            except asyncio.TimeoutError:  # a hung replica: down, and the other replicas' checks go on
                raise Timeout(f"no answer to the health check within {self.health_timeout:g} s") from None
        except EmbeddingError as error:
            if self.policy.set_health(replica, False, error=describe_error(error)):
                logger.warning("Triton replica %s is down (%s)", replica.address, describe_error(error))
            return error
        if self.policy.set_health(replica, True, models=[m.name for m in models]):
            logger.info("Triton replica %s is back (%d models ready)", replica.address, len(models))
        return models

    def backend_stats(self) -> list[dict[str, Any]]:
        """Per replica: ``backend`` (address), ``requests``, ``failures``, ``in_flight``, ``healthy`` (0/1)."""
        now = time.monotonic()
        return [{"backend": r.address, "requests": r.requests, "failures": r.failed, "in_flight": r.in_flight,
                 "healthy": int(r.available(now))} for r in self.policy.replicas]

    # --- models --------------------------------------------------------------------------------
    async def models(self) -> list[ModelInfo]:
        """The union of the tritonembed models the replicas serve (by Triton name; the first replica's
        description wins). Also records each replica's health.

        Raises:
            EmbeddingError: no replica could be asked (the first replica's error).
        """
        self._ensure_poller()
        answers = await self.check_health()
        found: dict[str, ModelInfo] = {}
        for answer in answers:
            if not isinstance(answer, EmbeddingError):
                for info in answer:
                    found.setdefault(info.name, info)
        if not found and all(isinstance(a, EmbeddingError) for a in answers):
            raise answers[0]
        return list(found.values())

    async def model_info(self, model: str | None = None) -> ModelInfo:
        """Spec and batch limit of ``model`` (default: the client's model), from a replica that serves it.

        Raises:
            ModelNotFound: not served. InvalidArgument: no model given and several are served.
            EmbeddingError: no replica answered.
        """
        name = model or self._model
        if name is None:
            info = choose_model(await self.models())
            self._model = info.name
            return info
        return await self._route(f"config of {name!r}", name, lambda c: c.model_info(name), rows=0)

    async def is_ready(self, model: str | None = None) -> bool:
        """Whether some replica is ready with ``model`` (default: the client's). Never raises for I/O errors."""
        name = model or self._model
        candidates = [c for c, r in zip(self.clients, self.policy.replicas) if r.serves(name)]
        answers = await asyncio.gather(*(c.is_ready(name) for c in candidates))
        return any(answers)

    # --- embedding -----------------------------------------------------------------------------
    async def embed(self, texts: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """Embed ``texts``; arguments as :meth:`AsyncEmbeddingClient.embed`."""
        return (await self.embed_with_usage(texts, **kwargs)).embeddings

    async def embed_with_usage(self, texts: str | Sequence[str], *, model: str | None = None,
                               **kwargs: Any) -> EmbeddingResult:
        """Embed ``texts`` on the least-loaded replica that serves ``model``, failing over to the others;
        arguments as :meth:`AsyncEmbeddingClient.embed_with_usage`.

        Raises:
            ConnectionFailed / Overloaded: every replica failed before answering, in every round.
            InvalidArgument, ModelNotFound, Timeout, ServerError: as :class:`AsyncEmbeddingClient` (not retried).
        """
        name = model or self._model
        rows = 1 if isinstance(texts, str) else len(texts)
        return await self._route(f"embedding {rows} texts", name,
                                 lambda c: c.embed_with_usage(texts, model=name, **kwargs), rows=rows)

    async def rerank(self, query: str, documents: Sequence[str], *, model: str | None = None,
                     **kwargs: Any) -> RerankResult:
        """Rerank on the least-loaded replica that serves ``model``, failing over as :meth:`embed_with_usage`;
        arguments as :meth:`AsyncEmbeddingClient.rerank`.

        Raises:
            ConnectionFailed / Overloaded: every replica failed before answering, in every round.
            InvalidArgument, ModelNotFound, Timeout, ServerError: as :class:`AsyncEmbeddingClient` (not retried).
        """
        name = model or self._model
        rows = len(documents) if isinstance(documents, Sequence) and not isinstance(documents, str) else 1
        return await self._route(f"reranking {rows} documents", name,
                                 lambda c: c.rerank(query, documents, model=name, **kwargs), rows=rows)

    async def _route(self, what: str, model: str | None, call: Callable[[AsyncEmbeddingClient], Awaitable[T]],
                     *, rows: int) -> T:
        self._ensure_poller()
        policy, tried, round_, attempts, last = self.policy, [], 0, 0, None
        while True:
            replica = policy.choose(time.monotonic(), model=model, exclude=tried)
            if replica is None:
                if last is None:  # no replica serves the model now (all reloading it)
                    raise ConnectionFailed(f"no Triton replica serves the model {model!r} now")
                if not self.retry.should_retry(last, round_):
                    logger.warning("%s failed on every replica (%d attempts): %s", what, attempts, describe_error(last))
                    raise last
                delay = self.retry.delay(round_)
                logger.info("%s failed on every replica; round %d in %.2fs", what, round_ + 2, delay)
                await asyncio.sleep(delay)
                round_, tried = round_ + 1, []
                continue
            policy.start(replica)
            attempts += 1
            try:
                result = await call(self.clients[replica.index])
            except EmbeddingError as error:
                if not error.retryable:  # the request's own fault, or it may have run: not resent
                    policy.finish(replica, time.monotonic())
                    raise
                policy.finish(replica, time.monotonic(), error=describe_error(error))
                logger.info("%s failed on %s (%s); trying another replica", what, replica.address,
                            describe_error(error))
                if self._wake is not None:
                    self._wake.set()  # check its health now rather than at the next tick
                tried.append(replica)
                last = error
                continue
            except BaseException:
                policy.finish(replica, time.monotonic())
                raise
            if policy.finish(replica, time.monotonic(), rows=rows):
                logger.info("Triton replica %s answers again", replica.address)
            return result


__all__ = ["Replica", "ReplicaPolicy", "ReplicatedEmbeddingClient", "split_urls"]
