"""Every error the gateway returns, mapped in one place.

:class:`ErrorKind` is the single table: condition -> HTTP status, OpenAI ``type``, ``code``.
:data:`CLIENT_ERROR_KINDS` maps the client's exception tree onto it, and :func:`error_body`
builds OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` from either.
Route handlers, middleware and exception handlers all go through :func:`error_response`, so a
status code is decided nowhere else.
"""

from __future__ import annotations

import enum
from typing import Any

from starlette.responses import JSONResponse

from tritonembed.client.errors import (
    ConnectionFailed,
    EmbeddingError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServerError,
    Timeout,
)


class ErrorKind(enum.Enum):
    """status, OpenAI error type, code."""

    INVALID_REQUEST = (400, "invalid_request_error", "invalid_value")
    INVALID_JSON = (400, "invalid_request_error", "invalid_json")
    TOO_MANY_INPUTS = (400, "invalid_request_error", "too_many_inputs")
    UNSUPPORTED_INPUT = (400, "invalid_request_error", "unsupported_input")
    UNAUTHORIZED = (401, "invalid_request_error", "invalid_api_key")
    MODEL_NOT_FOUND = (404, "invalid_request_error", "model_not_found")
    NOT_FOUND = (404, "invalid_request_error", "not_found")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", "method_not_allowed")
    BODY_TOO_LARGE = (413, "invalid_request_error", "request_too_large")
    OVERLOADED = (429, "rate_limit_error", "overloaded")
    INTERNAL = (500, "server_error", "internal_error")
    BACKEND_UNAVAILABLE = (503, "server_error", "backend_unavailable")
    NOT_READY = (503, "server_error", "not_ready")
    TOO_MANY_CONNECTIONS = (503, "server_error", "too_many_connections")
    TIMEOUT = (504, "server_error", "timeout")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]

    @property
    def code(self) -> str:
        return self.value[2]


# The client's error tree -> kind. Looked up along the exception's MRO (most specific first).
CLIENT_ERROR_KINDS: dict[type[EmbeddingError], ErrorKind] = {
    InvalidArgument: ErrorKind.INVALID_REQUEST,
    ModelNotFound: ErrorKind.MODEL_NOT_FOUND,
    Overloaded: ErrorKind.OVERLOADED,
    ConnectionFailed: ErrorKind.BACKEND_UNAVAILABLE,
    Timeout: ErrorKind.TIMEOUT,
    ServerError: ErrorKind.INTERNAL,
    EmbeddingError: ErrorKind.INTERNAL,
}

# Client argument names -> the OpenAI request field they come from ("texts[3]" -> "input[3]").
_PARAM_NAMES = {"texts": "input"}


def request_param(param: str | None) -> str | None:
    """The OpenAI request field for a client argument name, keeping an index (``texts[3]`` -> ``input[3]``)."""
    if not param:
        return param
    head, bracket, rest = param.partition("[")
    return _PARAM_NAMES.get(head, head) + bracket + rest

# Seconds a client should wait after a 429/503 (openai-python honours Retry-After).
RETRY_AFTER_SECONDS = 1


class GatewayError(Exception):
    """A condition the gateway itself detects (bad body, auth, limits, unknown route)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind for any exception: gateway errors carry theirs, client errors use the table,
    anything else is an internal error."""
    if isinstance(exc, GatewayError):
        return exc.kind
    for cls in type(exc).__mro__:
        if cls in CLIENT_ERROR_KINDS:
            return CLIENT_ERROR_KINDS[cls]  # type: ignore[index]
    return ErrorKind.INTERNAL


def error_body(kind: ErrorKind, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def describe(exc: BaseException) -> tuple[ErrorKind, str, str | None]:
    """``(kind, client-facing message, param)`` for an exception. Internal errors get a generic
    message: details (and stack traces) go to the log, never to the client."""
    kind = kind_of(exc)
    if isinstance(exc, GatewayError):
        return kind, exc.message, exc.param
    if isinstance(exc, EmbeddingError) and kind is not ErrorKind.INTERNAL:
        param = request_param(exc.param)
        message = exc.message.replace("texts[", "input[") if (param or "").startswith("input") else exc.message
        if kind is ErrorKind.BACKEND_UNAVAILABLE:
            message = "the inference server is unavailable"
        elif kind is ErrorKind.OVERLOADED:
            message = "the inference server is overloaded; retry later"
        elif kind is ErrorKind.TIMEOUT:
            message = "the inference server did not answer in time"
        return kind, message, param
    return kind, "internal server error", None


def error_response(kind: ErrorKind, message: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if kind.status in (429, 503) else None
    if kind is ErrorKind.UNAUTHORIZED:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(kind, message, param), status_code=kind.status, headers=headers)
