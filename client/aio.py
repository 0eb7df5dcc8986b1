"""The asyncio client: the same core as :class:`~tritonembed.client.EmbeddingClient`, awaited."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
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


class AsyncEmbeddingClient:
    """Embed texts with a tritonembed model served by Triton (asyncio).

    Takes the same arguments as :class:`~tritonembed.client.EmbeddingClient`. The channel is opened
    on first use inside the running event loop; use ``async with`` or ``await client.close()``.
    ``async with`` also fetches the default model's spec, so :attr:`spec` and
    :attr:`max_batch_size` are available inside the block when ``model`` was given (otherwise call
    :meth:`model_info` first).
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
        self._module = _transport.import_protocol(self._target.protocol, aio=True)
        self._model = model
        self.timeout = float(timeout)
        self.max_concurrency = int(max_concurrency)
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self.force_dimensions = force_dimensions
        self._headers = dict(headers) if headers else None
        self._infos: dict[str, ModelInfo] = {}
        self._client_obj: Any = None
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncEmbeddingClient:
        if self._model is not None:
            await self.model_info()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. Idempotent."""
        self._closed = True
        client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                await client.close()
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
        if self._client_obj is None:
            if self._target.protocol == "grpc":
                self._client_obj = self._module.InferenceServerClient(
                    self._target.address, ssl=self._target.ssl, channel_args=_transport.grpc_channel_args()
                )
            else:
                self._client_obj = self._module.InferenceServerClient(
                    self._target.address, conn_timeout=self.timeout, conn_limit=max(100, self.max_concurrency), ssl=self._target.ssl
                )
        return self._client_obj

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One tritonclient call, errors mapped, no retry."""
        kwargs.setdefault("headers", self._headers)
        if self._target.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout)
        try:
            return await getattr(self._client(), method)(*args, **kwargs)
        except Exception as exc:
            error = map_error(exc)
            if error is None or error is exc:
                raise
            raise error from exc

    async def _retrying(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except EmbeddingError as error:
                if not self.retry.should_retry(error, attempt):
                    if attempt:  # one WARNING per request that finally failed, not one per retry
                        logger.warning("%s failed after %d attempts (%s: %s)", what, attempt + 1, type(error).__name__, error)
                    raise
                delay = self.retry.delay(attempt)
                logger.info("%s failed (%s: %s); retry %d in %.2fs", what, type(error).__name__, error, attempt + 1, delay)
                await asyncio.sleep(delay)
                attempt += 1

    # --- models --------------------------------------------------------------------------------
    async def _fetch_info(self, name: str) -> ModelInfo:
        config = await self._retrying(
            f"config of {name!r}", lambda: self._call("get_model_config", name, **_transport.config_kwargs(self.protocol))
        )
        return parse_model_config(name, config)

    async def models(self) -> list[ModelInfo]:
        """The tritonembed models the server serves (READY ensembles that publish a spec).

        Raises:
            EmbeddingError: the repository index or a config could not be read.
        """
        index = await self._retrying(
            "repository index", lambda: self._call("get_model_repository_index", **_transport.config_kwargs(self.protocol))
        )
        found = []
        for name in ready_model_names(index):
            try:
                info = self._infos.get(name) or await self._fetch_info(name)
            except ModelNotFound:
                continue
            self._infos[name] = info
            found.append(info)
        return found

    async def model_info(self, model: str | None = None) -> ModelInfo:
        """Spec and batch limit of ``model`` (default: the client's model), fetched once and cached.

        Raises:
            ModelNotFound: not served, or not a tritonembed model.
            InvalidArgument: no model given and the server serves several.
        """
        name = model or self._model
        if name is None:
            info = choose_model(await self.models())
            self._model = info.name
            return info
        info = self._infos.get(name)
        if info is None:
            info = self._infos[name] = await self._fetch_info(name)
        return info

    def _cached_default(self) -> ModelInfo:
        info = self._infos.get(self._model) if self._model else None
        if info is None:
            raise EmbeddingError("model spec not fetched yet: `await client.model_info()` or use `async with`")
        return info

    @property
    def spec(self) -> ModelSpec:
        """The default model's spec; available after ``async with`` / :meth:`model_info`."""
        return self._cached_default().spec

    @property
    def max_batch_size(self) -> int:
        """The default model's ``max_batch_size``; available after ``async with`` / :meth:`model_info`."""
        return self._cached_default().max_batch_size

    async def is_ready(self, model: str | None = None) -> bool:
        """Whether the server is ready and ``model`` (default: the client's) is loaded. Never raises
        for I/O errors: an unreachable server is simply not ready."""
        try:
            name = model or (await self.model_info()).name
            return bool(await self._call("is_server_ready")) and bool(await self._call("is_model_ready", name))
        except EmbeddingError as error:
            logger.debug("readiness check failed: %s", error)
            return False

    # --- embedding -----------------------------------------------------------------------------
    async def embed(
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
        """Embed ``texts``; see :meth:`tritonembed.client.EmbeddingClient.embed_with_usage`."""
        result = await self.embed_with_usage(
            texts,
            model=model,
            dimensions=dimensions,
            input_type=input_type,
            instruction=instruction,
            normalize=normalize,
            truncate=truncate,
            force_dimensions=force_dimensions,
        )
        return result.embeddings

    async def embed_with_usage(
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
        """Embed ``texts`` and report token counts; arguments and errors as
        :meth:`tritonembed.client.EmbeddingClient.embed_with_usage`. Chunks run concurrently, at
        most ``max_concurrency`` at a time."""
        info = await self.model_info(model)
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
        result = plan.finish(await self._run_plan(plan))
        logger.debug(
            "embedded %d texts with %r in %d requests, %.1f ms",
            plan.size,
            info.name,
            len(plan.chunks),
            1e3 * (time.perf_counter() - started),
        )
        return result

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        instruction: str | None = None,
        model: str | None = None,
        truncate: bool = True,
    ) -> RerankResult:
        """Async :meth:`tritonembed.client.EmbeddingClient.rerank` (same arguments, result and errors)."""
        info = await self.model_info(model)
        plan = plan_rerank(info, query, documents, top_n=top_n, instruction=instruction, truncate=truncate,
                           batch_size=self.batch_size)
        return plan.finish(await self._run_plan(plan))

    async def _run_plan(self, plan: EmbedPlan | RerankPlan) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every chunk of ``plan``, at most ``max_concurrency`` at a time; a failure cancels the others."""
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def bounded(k: int) -> tuple[np.ndarray, np.ndarray]:
            async with semaphore:
                return await self._infer_chunk(plan, k)

        tasks = [asyncio.ensure_future(bounded(k)) for k in range(len(plan.chunks))]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # one chunk failed: do not leave the others running
                task.cancel()
            raise

    async def _infer_chunk(self, plan: EmbedPlan | RerankPlan, k: int) -> tuple[np.ndarray, np.ndarray]:
        module = self._module
        inputs = _transport.infer_inputs(module, plan.chunk_inputs(k))
        outputs = _transport.requested_outputs(module, plan.output_name)
        try:
            result = await self._retrying(
                f"request {k + 1}/{len(plan.chunks)} to {plan.info.name!r}",
                lambda: self._call("infer", plan.info.name, inputs, outputs=outputs),
            )
        except EmbeddingError as error:
            located = plan.locate_error(k, error)  # the server numbers texts within this chunk
            if located is error:
                raise
            raise located from error.__cause__
        return plan.read_outputs(k, *_transport.output_arrays(result, plan.output_name))
