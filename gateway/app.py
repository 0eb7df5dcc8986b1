"""The OpenAI-compatible HTTP gateway: ``create_app(settings) -> FastAPI``.

Routes: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET|HEAD /health``
(liveness, no auth), ``GET /ready`` (Triton and its tritonembed models ready), ``GET /metrics``
(Prometheus). ``/embeddings`` and ``/models`` answer too, for clients configured without ``/v1``.
The gateway talks to Triton only through :class:`tritonembed.client.replicas.ReplicatedEmbeddingClient`
(one or several replicas: least-loaded routing, health checks, failover).

The request bodies are validated in :mod:`.schemas`, errors shaped in :mod:`.errors`, admission in
:mod:`.admission`; what stays here is the route handlers and the middleware that wraps them (auth, deadlines,
access log), which share the app's state.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response

from tritonembed.client import EmbeddingError, ModelInfo, ModelNotFound, RetryPolicy
from tritonembed.client.replicas import ReplicatedEmbeddingClient
from tritonembed.gateway.admission import InputAdmission
from tritonembed.gateway.errors import ErrorKind, GatewayError, describe, error_response
from tritonembed.gateway.metrics import CONTENT_TYPE, Metrics
from tritonembed.gateway.schemas import (
    OpenAIEmbeddingRequest,
    OpenAIModel,
    OpenAIModelList,
    RerankRequest,
    embedding_response_json,
    rerank_response_json,
)
from tritonembed.gateway.settings import GatewaySettings
from tritonembed.gateway.tokens import TokenDecoder
from tritonembed.text_rules import blank_characters, first_blank

logger = logging.getLogger("tritonembed.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health"})
KNOWN_ROUTES = frozenset({"/v1/embeddings", "/embeddings", "/v1/rerank", "/rerank", "/v1/models", "/models",
                          "/health", "/ready", "/metrics"})
# Gateway -> Triton retry rounds (each round tries every replica once): short, since the API client
# (openai-python retries 429/503) retries too.
GATEWAY_RETRY = RetryPolicy(max_retries=2, initial_backoff=0.05, max_backoff=0.5)


def route_label(path: str) -> str:
    """A bounded metrics label for a request path (unknown paths share one label)."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith(("/v1/models/", "/models/")):
        return "/v1/models/{model}"
    return "other"


# --- models --------------------------------------------------------------------------------
class ModelRegistry:
    """The served tritonembed models, cached for ``ttl`` seconds, addressable by Triton name,
    ``spec.name`` or ``spec.model_id``. An unknown name triggers one refresh (at most once a second).

    A name that was served before but is not ready now (Triton restarting, the model loading) is
    503 ``not_ready``, not 404: the caller should retry, not give up.
    """

    MIN_REFRESH_INTERVAL = 1.0

    def __init__(self, client: Any, ttl: float) -> None:
        self._client = client
        self._ttl = ttl
        self._models: list[ModelInfo] = []
        self._aliases: dict[str, ModelInfo] = {}
        self._seen: set[str] = set()  # every alias ever served: absent now means "not ready", not "unknown"
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> list[ModelInfo]:
        """Re-read the served models from Triton.

        Raises:
            EmbeddingError: Triton cannot be asked.
        """
        async with self._lock:
            models = await self._client.models()
            aliases: dict[str, ModelInfo] = {}
            for info in models:
                for alias in (info.spec.model_id, info.spec.name, info.name):  # the Triton name wins
                    aliases[alias] = info
            self._models, self._aliases, self._fetched_at = models, aliases, time.monotonic()
            self._seen.update(aliases)
            return models

    def invalidate(self) -> None:
        """Forget the cached list: the next lookup asks Triton again."""
        self._fetched_at = float("-inf")

    async def list(self) -> list[ModelInfo]:
        if time.monotonic() - self._fetched_at > self._ttl:
            return await self.refresh()
        return self._models

    async def resolve(self, name: str) -> ModelInfo:
        """The served model called ``name``.

        Raises:
            GatewayError: MODEL_NOT_FOUND; NOT_READY when the model was served before, or Triton
                serves no ready model at all (it is starting).
            EmbeddingError: Triton cannot be asked.
        """
        await self.list()
        info = self._aliases.get(name)
        if info is None and time.monotonic() - self._fetched_at > self.MIN_REFRESH_INTERVAL:
            await self.refresh()
            info = self._aliases.get(name)
        if info is None:
            if name in self._seen or not self._models:
                raise GatewayError(ErrorKind.NOT_READY, f"the model '{name}' is not ready; retry later", param="model")
            raise GatewayError(ErrorKind.MODEL_NOT_FOUND, f"The model '{name}' does not exist", param="model")
        return info


# --- request parsing ---------------------------------------------------------------------------
def parse_request(body: bytes, schema: type[BaseModel] = OpenAIEmbeddingRequest) -> Any:
    """Parse and validate a ``/v1/embeddings`` body (or, with ``schema``, another route's).

    Raises:
        GatewayError: INVALID_JSON, or INVALID_REQUEST naming the offending ``param``.
    """
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise GatewayError(
            ErrorKind.INVALID_JSON, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise GatewayError(ErrorKind.INVALID_JSON, "request body is nested too deeply") from None
    except UnicodeDecodeError:
        raise GatewayError(ErrorKind.INVALID_JSON, "request body is not valid UTF-8") from None
    except ValueError:  # the parser's own message here names Python internals (the int digit limit)
        raise GatewayError(ErrorKind.INVALID_JSON, "request body holds a number with too many digits") from None
    if not isinstance(payload, dict):
        raise GatewayError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object")
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def validation_error(errors: Sequence[Any]) -> GatewayError:
    """One OpenAI-style 400 from pydantic's (or FastAPI's) error list."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'"
    elif param == "input":
        message = "'input' must be a non-empty string, a list of strings, a list of token ids or a list of lists of token ids"
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}"
    return GatewayError(ErrorKind.INVALID_REQUEST, message, param=param)


def input_rows(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """``(texts, None)`` for text input or ``(None, token_rows)`` for token ids."""
    if isinstance(value, str):
        return [value], None
    if not value:
        raise GatewayError(ErrorKind.INVALID_REQUEST, "'input' must not be empty", param="input")
    if isinstance(value[0], str):
        return list(value), None
    if isinstance(value[0], int):
        return None, [list(value)]
    return None, [list(row) for row in value]


# --- middleware --------------------------------------------------------------------------------
class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


# Status recorded in the metrics for a request whose client left before any answer (nginx's 499).
CLIENT_CLOSED = 499


class GatewayMiddleware:
    """Outermost layer: metrics, API-key check, body-size limit, request deadline, and the
    last-resort error handler.

    The body limit is enforced before the JSON is parsed: a ``Content-Length`` over the limit is
    refused without reading, and a body without one is read only up to the limit. The whole request
    after its body has ``settings.request_deadline`` seconds, else 504 ``timeout``. A client that
    disconnects is logged at INFO, without a traceback.
    """

    def __init__(self, app: ASGIApp, settings: GatewaySettings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._keys = [k.encode() for k in settings.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500, "started": False}
        self.metrics.started()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
            await send(message)

        deadline = self.settings.request_deadline
        app_started = float("inf")
        try:
            rejection = self._check_auth(scope)
            if rejection is None:
                receive, rejection = await self._limit_body(scope, receive)
            if rejection is not None:
                await self._reject(rejection, scope, receive, send_wrapper)
            else:
                app_started = time.perf_counter()
                await asyncio.wait_for(self.app(scope, receive, send_wrapper), deadline)
        except (ClientGone, ClientDisconnect):
            status["code"] = CLIENT_CLOSED if not status["started"] else status["code"]
            logger.info("client %s disconnected before its request was complete (%s %s)",
                        _client(scope), scope.get("method"), scope.get("path"))
        except asyncio.TimeoutError as exc:
            if time.perf_counter() - app_started < deadline:  # not the deadline: a timeout nobody handled
                logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if not status["started"]:
                    await self._reject(exc, scope, receive, send_wrapper)
            else:
                logger.warning("%s %s from %s exceeded the request deadline of %g s",
                               scope.get("method"), scope.get("path"), _client(scope), deadline)
                if not status["started"]:
                    timeout = GatewayError(ErrorKind.TIMEOUT, f"the request did not finish within {deadline:g} s")
                    await self._reject(timeout, scope, receive, send_wrapper)
        except Exception as exc:  # last resort: log the trace, answer the envelope
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not status["started"]:
                await self._reject(exc, scope, receive, send_wrapper)
        finally:
            self.metrics.finished(route_label(scope.get("path", "")), status["code"], time.perf_counter() - started)

    async def _reject(self, exc: BaseException, scope: Scope, receive: Receive, send: Send) -> None:
        kind, message, param = describe(exc)
        self.metrics.error(kind.code)
        await error_response(kind, message, param)(scope, receive, send)

    def _check_auth(self, scope: Scope) -> GatewayError | None:
        if not self._keys or scope.get("path") in PUBLIC_PATHS:
            return None
        header = _header(scope, b"authorization")
        if not header:
            return GatewayError(
                ErrorKind.UNAUTHORIZED, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        matched = False
        for key in self._keys:  # compare against every key: no early exit
            matched |= hmac.compare_digest(token, key)
        if scheme.lower() != b"bearer" or not matched:
            return GatewayError(ErrorKind.UNAUTHORIZED, "Incorrect API key provided.")
        return None

    async def _limit_body(self, scope: Scope, receive: Receive) -> tuple[Receive, GatewayError | None]:
        """The body, read up to the limit and replayed to the app.

        Raises:
            ClientGone: the client disconnected before the body was complete.
        """
        limit = self.settings.max_request_bytes
        too_large = GatewayError(ErrorKind.BODY_TOO_LARGE, f"request body exceeds the limit of {limit} bytes")
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return receive, GatewayError(ErrorKind.INVALID_REQUEST, "invalid Content-Length header")
            if length > limit:
                return receive, too_large
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and declared is None:
            return receive, None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, too_large
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = {"done": False}

        async def replay() -> Message:
            if not replayed["done"]:
                replayed["done"] = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay, None


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


# --- the app -----------------------------------------------------------------------------------
def create_app(settings: GatewaySettings | None = None, *, client: Any = None) -> FastAPI:
    """Build the gateway.

    Args:
        settings: defaults to :meth:`GatewaySettings.from_env`.
        client: a :class:`~tritonembed.client.replicas.ReplicatedEmbeddingClient` or an
            :class:`~tritonembed.client.AsyncEmbeddingClient` (or a stand-in with the same ``models`` /
            ``embed_with_usage`` / ``is_ready`` / ``close`` methods; ``backend_stats`` optional). By default
            a ReplicatedEmbeddingClient over ``settings.triton_urls`` is created when the app starts, and
            closed when it stops.

    Raises:
        GatewayError: a ``model_dirs`` entry is not an exported model directory.
    """
    settings = settings or GatewaySettings.from_env()
    metrics = Metrics()
    admission = InputAdmission(settings.max_pending_inputs)
    metrics.inputs_in_flight = lambda: admission.in_flight
    decoder = TokenDecoder(settings.token_ids, settings.model_dirs)
    blank_characters()  # the blank rule's table takes ~0.4 s to build: at start, not in a request
    if not settings.auth_enabled:
        logger.warning("no API keys configured: the gateway accepts unauthenticated requests")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = client is None
        triton = client or ReplicatedEmbeddingClient(
            settings.triton_urls,
            protocol=settings.protocol,
            timeout=settings.request_timeout,
            max_concurrency=settings.max_concurrency,
            retry=GATEWAY_RETRY,
        )
        app.state.client = triton
        stats = getattr(triton, "backend_stats", None)
        metrics.backends = stats if callable(stats) else list
        app.state.registry = ModelRegistry(triton, settings.models_ttl)
        try:
            models = await app.state.registry.refresh()
            logger.info("gateway serving %s from %s", [m.name for m in models] or "no models (yet)", settings.triton_url)
        except EmbeddingError as exc:
            logger.warning("Triton at %s not reachable yet (%s); will retry on requests", settings.triton_url, exc)
        try:
            yield
        finally:
            if owned:
                await triton.close()

    app = FastAPI(
        title="tritonembed gateway",
        description="OpenAI-compatible embeddings served by Triton Inference Server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.admission = admission
    app.state.metrics = metrics

    def fail(exc: BaseException) -> JSONResponse:
        kind, message, param = describe(exc)
        if kind is ErrorKind.INTERNAL:
            logger.error("request failed: %r", exc, exc_info=exc if not isinstance(exc, EmbeddingError) else None)
        metrics.error(kind.code)
        return error_response(kind, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return fail(GatewayError(ErrorKind.NOT_FOUND, f"Invalid URL ({request.method} {request.url.path})"))
        if exc.status_code == 405:
            return fail(GatewayError(ErrorKind.METHOD_NOT_ALLOWED, f"Method {request.method} not allowed on {request.url.path}"))
        return fail(GatewayError(ErrorKind.INVALID_REQUEST, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> Response:
        return fail(validation_error(exc.errors()))

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return fail(exc)

    @app.exception_handler(EmbeddingError)
    async def embedding_error(request: Request, exc: EmbeddingError) -> Response:
        return fail(exc)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        triton = request.app.state.client
        try:
            models = await request.app.state.registry.refresh()
        except EmbeddingError as exc:
            return fail(GatewayError(ErrorKind.NOT_READY, f"Triton is not reachable: {type(exc).__name__}"))
        if not models:
            return fail(GatewayError(ErrorKind.NOT_READY, "Triton serves no tritonembed model"))
        not_ready = [m.name for m in models if not await triton.is_ready(m.name)]
        if not_ready:
            return fail(GatewayError(ErrorKind.NOT_READY, f"models not ready: {', '.join(not_ready)}"))
        return JSONResponse({"status": "ready", "models": [m.name for m in models]})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    async def list_models(request: Request) -> dict[str, Any]:
        models = await request.app.state.registry.list()
        return OpenAIModelList(data=[OpenAIModel(id=m.name) for m in models]).model_dump()

    async def get_model(request: Request, model: str) -> dict[str, Any]:
        info = await request.app.state.registry.resolve(model)
        return OpenAIModel(id=info.name).model_dump()

    async def create_embeddings(request: Request) -> Response:
        req = parse_request(await request.body())
        texts, token_rows = input_rows(req.input)
        count = len(texts if texts is not None else token_rows)
        if count > settings.max_inputs:
            raise GatewayError(
                ErrorKind.TOO_MANY_INPUTS, f"'input' has {count} items; at most {settings.max_inputs} are allowed", "input"
            )
        if token_rows is not None:
            decoder.check_enabled()  # refused before Triton is asked anything
        registry = request.app.state.registry
        info = await registry.resolve(req.model)
        if texts is None:
            texts = decoder.decode(info.spec, token_rows)
        blank = first_blank(texts)
        if blank is not None:
            raise GatewayError(ErrorKind.INVALID_REQUEST, f"input[{blank}] is empty", f"input[{blank}]")
        with admission.admit(len(texts)):
            try:
                result = await request.app.state.client.embed_with_usage(
                    texts,
                    model=info.name,
                    dimensions=req.dimensions,
                    input_type=req.input_type,
                    instruction=req.instruction,
                    truncate=req.truncate,
                )
            except ModelNotFound:  # resolved a moment ago: Triton is restarting or reloading it
                registry.invalidate()
                raise GatewayError(ErrorKind.NOT_READY, f"the model '{req.model}' is not ready; retry later", "model") from None
        metrics.usage(info.name, len(texts), result.total_tokens)

        def render() -> Response:  # serializing thousands of vectors takes a while: off the event loop
            body = embedding_response_json(
                result.embeddings, model=req.model, prompt_tokens=result.total_tokens, encoding_format=req.encoding_format
            )
            return JSONResponse(body)

        return await asyncio.to_thread(render)

    async def create_rerank(request: Request) -> Response:
        req = parse_request(await request.body(), RerankRequest)
        documents = req.texts()
        if not documents:
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'documents' must not be empty", "documents")
        if len(documents) > settings.max_inputs:
            raise GatewayError(ErrorKind.TOO_MANY_INPUTS,
                               f"'documents' has {len(documents)} items; at most {settings.max_inputs} are allowed",
                               "documents")
        if first_blank([req.query]) is not None:
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'query' is empty", "query")
        blank = first_blank(documents)
        if blank is not None:
            raise GatewayError(ErrorKind.INVALID_REQUEST, f"documents[{blank}] is empty", f"documents[{blank}]")
        registry = request.app.state.registry
        info = await registry.resolve(req.model)
        if info.spec.task != "rerank":
            raise GatewayError(ErrorKind.INVALID_REQUEST,
                               f"the model '{req.model}' is a {info.spec.task} model, not a reranker", "model")
        with admission.admit(len(documents)):
            try:
                result = await request.app.state.client.rerank(
                    req.query, documents, model=info.name, top_n=req.top_n, instruction=req.instruction,
                    truncate=req.truncate)
            except ModelNotFound:  # resolved a moment ago: Triton is restarting or reloading it
                registry.invalidate()
                raise GatewayError(ErrorKind.NOT_READY, f"the model '{req.model}' is not ready; retry later", "model") from None
        metrics.usage(info.name, len(documents), result.total_tokens)
        return JSONResponse(rerank_response_json(result.results, model=req.model, total_tokens=result.total_tokens,
                                                 return_documents=req.return_documents))

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/rerank", create_rerank, methods=["POST"])
        app.add_api_route(f"{prefix}/embeddings", create_embeddings, methods=["POST"])
        app.add_api_route(f"{prefix}/models", list_models, methods=["GET"])
        app.add_api_route(prefix + "/models/{model:path}", get_model, methods=["GET"])

    app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics)
    return app
