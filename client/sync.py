"""The blocking client: a thin I/O shell over :mod:`tritonembed.client.core`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from tritonembed.client import _transport
from tritonembed.client.core import (
    EmbeddingResult,
    EmbedPlan,
    ModelInfo,
    RerankPlan,
    RerankResult,
    RetryPolicy,
    choose_model,
    map_error,
    parse_model_config,
    parse_url,
    plan_embed,
    plan_rerank,
    ready_model_names,
)
from tritonembed.client.errors import EmbeddingError, InvalidArgument, ModelNotFound
from tritonembed.spec import ModelSpec

logger = logging.getLogger("tritonembed.client")
T = TypeVar("T")


class EmbeddingClient:
    """Embed texts with a tritonembed model served by Triton (blocking).

    Args:
        url: ``host:port``, or a URL whose scheme picks the protocol (``grpc://``, ``http://``,
            ``https://``, ``grpcs://``). Default: Triton's gRPC port on localhost.
        model: the served model's name; None picks the only tritonembed model the server serves.
        protocol: ``"grpc"`` (default) or ``"http"`` when ``url`` has no scheme.
        timeout: seconds each request (one chunk) may take.
        max_concurrency: chunks in flight at once for one :meth:`embed` call.
        batch_size: texts per request; default and upper bound: the model's ``max_batch_size``.
        retry: retry policy for :class:`~tritonembed.client.errors.Overloaded` and
            :class:`~tritonembed.client.errors.ConnectionFailed`; ``RetryPolicy(max_retries=0)`` disables.
        force_dimensions: allow any ``dimensions`` in 1..hidden_size, even outside the spec's range.
        headers: extra headers sent with every request (e.g. auth for a proxy in front of Triton).

    Use as a context manager, or call :meth:`close`. Safe to share between threads.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        model: str | None = None,
        *,
        protocol: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 4,
        batch_size: int | None = None,
        retry: RetryPolicy | None = None,
        force_dimensions: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be positive, got {timeout}")
        self._target = parse_url(url, protocol)
        self._module = _transport.import_protocol(self._target.protocol, aio=False)
        self._model = model
        self.timeout = float(timeout)
        self.max_concurrency = int(max_concurrency)
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self.force_dimensions = force_dimensions
        self._headers = dict(headers) if headers else None
        self._infos: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # HTTP: one tritonclient per thread (it is not thread-safe)
        self._opened: list[Any] = []
        self._grpc: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and the worker pool. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, opened = self._pool, list(self._opened)
            self._pool, self._opened, self._grpc = None, [], None
        if pool is not None:
            pool.shutdown(wait=True)
        for client in opened:
            try:
                client.close()
            except Exception:  # closing is best effort
                logger.debug("error closing a tritonclient", exc_info=True)

    @property
    def url(self) -> str:
        return self._target.address

    @property
    def protocol(self) -> str:
        return self._target.protocol

    def _client(self) -> Any:
        if self._closed:
            raise EmbeddingError("the client is closed")
        if self._target.protocol == "grpc":
            if self._grpc is None:
                with self._lock:
                    if self._grpc is None:
                        self._grpc = self._module.InferenceServerClient(
                            self._target.address, ssl=self._target.ssl, channel_args=_transport.grpc_channel_args()
                        )
                        self._opened.append(self._grpc)
            return self._grpc
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._module.InferenceServerClient(
                self._target.address,
                connection_timeout=self.timeout,
                network_timeout=self.timeout,
                ssl=self._target.ssl,
            )
            self._local.client = client
            with self._lock:
                self._opened.append(client)
        return client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One tritonclient call, errors mapped, no retry."""
        kwargs.setdefault("headers", self._headers)
        if self._target.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout)
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except Exception as exc:
            error = map_error(exc)
            if error is None or error is exc:
                raise
            raise error from exc

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except EmbeddingError as error:
                if not self.retry.should_retry(error, attempt):
                    if attempt:  # one WARNING per request that finally failed, not one per retry
                        logger.warning("%s failed after %d attempts (%s: %s)", what, attempt + 1, type(error).__name__, error)
                    raise
                delay = self.retry.delay(attempt)
                logger.info("%s failed (%s: %s); retry %d in %.2fs", what, type(error).__name__, error, attempt + 1, delay)
                time.sleep(delay)
                attempt += 1

    # --- models --------------------------------------------------------------------------------
    def _fetch_info(self, name: str) -> ModelInfo:
        kwargs = _transport.config_kwargs(self.protocol)
        config = self._retrying(f"config of {name!r}", lambda: self._call("get_model_config", name, **kwargs))
        return parse_model_config(name, config)

    def models(self) -> list[ModelInfo]:
        """The tritonembed models the server serves (READY ensembles that publish a spec).

        Raises:
            EmbeddingError: the repository index or a config could not be read.
        """
        kwargs = _transport.config_kwargs(self.protocol)
        index = self._retrying("repository index", lambda: self._call("get_model_repository_index", **kwargs))
        found = []
        for name in ready_model_names(index):
            try:
                info = self._infos.get(name) or self._fetch_info(name)
            except ModelNotFound:
                continue
            self._infos[name] = info
            found.append(info)
        return found

    def model_info(self, model: str | None = None) -> ModelInfo:
        """Spec and batch limit of ``model`` (default: the client's model), fetched once and cached.

        Raises:
            ModelNotFound: not served, or not a tritonembed model.
            InvalidArgument: no model given and the server serves several.
        """
        name = model or self._model
        if name is None:
            info = choose_model(self.models())
            self._model = info.name
            return info
        info = self._infos.get(name)
        if info is None:
            info = self._infos[name] = self._fetch_info(name)
        return info

    @property
    def model(self) -> str:
        """The default model's name (resolved from the server when not given)."""
        return self.model_info().name

    @property
    def spec(self) -> ModelSpec:
        """The default model's :class:`~tritonembed.spec.ModelSpec` (cached)."""
        return self.model_info().spec

    @property
    def max_batch_size(self) -> int:
        """The default model's ``max_batch_size`` from its Triton config (cached)."""
        return self.model_info().max_batch_size

    def is_ready(self, model: str | None = None) -> bool:
        """Whether the server is ready and ``model`` (default: the client's) is loaded. Never raises
        for I/O errors: an unreachable server is simply not ready."""
        try:
            name = model or self.model
            return bool(self._call("is_server_ready")) and bool(self._call("is_model_ready", name))
        except EmbeddingError as error:
            logger.debug("readiness check failed: %s", error)
            return False

    # --- embedding -----------------------------------------------------------------------------
    def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        input_type: str | None = None,
        instruction: str | None = None,
        normalize: bool = True,
        truncate: bool = True,
        force_dimensions: bool | None = None,
    ) -> np.ndarray:
        """Embed ``texts``; float32 ``[n, dimensions]`` in input order (``n`` = 1 for one string).

        See :meth:`embed_with_usage` for the arguments and errors.
        """
        return self.embed_with_usage(
            texts,
            model=model,
            dimensions=dimensions,
            input_type=input_type,
            instruction=instruction,
            normalize=normalize,
            truncate=truncate,
            force_dimensions=force_dimensions,
        ).embeddings

    def embed_with_usage(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        input_type: str | None = None,
        instruction: str | None = None,
        normalize: bool = True,
        truncate: bool = True,
        force_dimensions: bool | None = None,
    ) -> EmbeddingResult:
        """Embed ``texts`` and report the tokens the model consumed per text.

        Args:
            texts: one string or a sequence of non-empty strings. Any length: the list is sorted by
                length, split into requests of at most ``max_batch_size`` texts sent concurrently,
                and reassembled in input order.
            dimensions: Matryoshka output size (default: full ``hidden_size``); the first
                ``dimensions`` values, re-normalized when ``normalize``.
            input_type: ``"query"`` (the model's default query instruction applies), ``"document"``
                or None (document).
            instruction: a query instruction; makes every text a query and overrides the default.
                Combining it with ``input_type="document"`` is an error.
            normalize: L2-normalize the (sliced) output. The server's full-size output is already
                unit-length, so this only matters when slicing.
            truncate: False makes an over-long text fail the request instead of being cut.
            force_dimensions: override the client's ``force_dimensions`` for this call.

        Raises:
            InvalidArgument: bad arguments (checked before any request) or INVALID_ARG from the server.
            ModelNotFound, Overloaded (after retries), ConnectionFailed (after retries), Timeout,
            ServerError.
        """
        info = self.model_info(model)
        plan = plan_embed(
            info,
            texts,
            dimensions=dimensions,
            input_type=input_type,
            instruction=instruction,
            normalize=normalize,
            truncate=truncate,
            force_dimensions=self.force_dimensions if force_dimensions is None else force_dimensions,
            batch_size=self.batch_size,
        )
        started = time.perf_counter()
        count = len(plan.chunks)
        result = plan.finish(self._run_plan(plan))
        logger.debug(
            "embedded %d texts with %r in %d requests, %.1f ms", plan.size, info.name, count, 1e3 * (time.perf_counter() - started)
        )
        return result

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        instruction: str | None = None,
        model: str | None = None,
        truncate: bool = True,
    ) -> RerankResult:
        """Score every document against ``query`` with a served reranker; the ``top_n`` best, best first.

        ``relevance_score`` is P(relevant) (for Qwen3-Reranker: P("yes"), as its model card computes it).
        ``instruction`` replaces the model's default task instruction.

        Raises:
            InvalidArgument: bad arguments, a model that is not a reranker, or INVALID_ARG from the server.
            ModelNotFound, Overloaded (after retries), ConnectionFailed (after retries), Timeout, ServerError.
        """
        info = self.model_info(model)
        plan = plan_rerank(info, query, documents, top_n=top_n, instruction=instruction, truncate=truncate,
                           batch_size=self.batch_size)
        return plan.finish(self._run_plan(plan))

    def _run_plan(self, plan: EmbedPlan | RerankPlan) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every chunk of ``plan``, concurrently up to ``max_concurrency``; the first failure cancels the rest."""
        count = len(plan.chunks)
        if count <= 1 or self.max_concurrency == 1:
            return [self._infer_chunk(plan, k) for k in range(count)]
        futures = [self._executor().submit(self._infer_chunk, plan, k) for k in range(count)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for future in futures:  # one chunk failed: do not send the ones not started yet
                future.cancel()
            raise

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise EmbeddingError("the client is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="tritonembed-client")
            return self._pool

    def _infer_chunk(self, plan: EmbedPlan | RerankPlan, k: int) -> tuple[np.ndarray, np.ndarray]:
        module = self._module
        inputs = _transport.infer_inputs(module, plan.chunk_inputs(k))
        outputs = _transport.requested_outputs(module, plan.output_name)
        try:
            result = self._retrying(
                f"request {k + 1}/{len(plan.chunks)} to {plan.info.name!r}",
                lambda: self._call("infer", plan.info.name, inputs, outputs=outputs),
            )
        except EmbeddingError as error:
            located = plan.locate_error(k, error)  # the server numbers texts within this chunk
            if located is error:
                raise
            raise located from error.__cause__
        return plan.read_outputs(k, *_transport.output_arrays(result, plan.output_name))
