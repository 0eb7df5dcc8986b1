"""The client's error tree: every error the client raises on purpose derives from :class:`EmbeddingError`.

The tree mirrors openai-python's: one base, one class per condition a caller may handle
differently. :func:`tritonembed.client.core.map_error` turns tritonclient / gRPC / socket
exceptions into these classes; the shells never raise anything else for I/O failures.

- :class:`ConnectionFailed`: the server cannot be reached (refused, DNS, reset), or answers
  UNAVAILABLE / HTTP 503 without a full queue (down, restarting). Retried.
- :class:`Timeout`: the request did not finish within the client's timeout. Not retried.
- :class:`InvalidArgument`: the server answered INVALID_ARG, or the arguments were rejected locally.
- :class:`Overloaded`: Triton's queue is full (UNAVAILABLE / HTTP 503 naming the queue). Retried.
- :class:`ModelNotFound`: the model is not served (or carries no tritonembed spec).
- :class:`ServerError`: anything else the server reports (INTERNAL, unexpected output).
"""

from __future__ import annotations


class EmbeddingError(Exception):
    """Base of every error raised by :mod:`tritonembed.client`.

    Attributes:
        message: human-readable description (without the status prefix).
        status: the raw status the transport reported (``"StatusCode.UNAVAILABLE"``, ``"503"``) or None.
        param: the argument at fault (``"dimensions"``, ``"texts[3]"`` with the caller's index), else None.
        hint: advice for a Python caller (``"pass force_dimensions=True ..."``), or None; part of
            ``str(error)`` but not of ``message``, which stays true for any caller (the HTTP gateway
            returns ``message``).
        retryable: whether the client's retry policy may resend the request.
    """

    retryable = False

    def __init__(self, message: str, *, status: str | None = None, param: str | None = None, hint: str | None = None) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.message = message
        self.status = status
        self.param = param
        self.hint = hint


class ConnectionFailed(EmbeddingError):
    """The server could not be reached (connection refused, reset, name resolution)."""

    retryable = True


class Timeout(EmbeddingError):
    """The request exceeded the client's timeout (or Triton's own request timeout)."""


class InvalidArgument(EmbeddingError, ValueError):
    """The request is invalid: rejected locally, or INVALID_ARG from the server."""


class Overloaded(EmbeddingError):
    """The server rejected the request because its queue is full."""

    retryable = True


class ModelNotFound(EmbeddingError, LookupError):
    """The model is not served by this server, or is not a tritonembed model."""


class ServerError(EmbeddingError):
    """The server failed for a reason that is not the caller's fault."""


__all__ = [
    "ConnectionFailed",
    "EmbeddingError",
    "InvalidArgument",
    "ModelNotFound",
    "Overloaded",
    "ServerError",
    "Timeout",
]
