"""API keys never reach a log line: a filter that redacts them on the gateway's and uvicorn's loggers.

Keys arrive in the ``Authorization`` header (never logged) but clients also put them where they do
not belong, e.g. ``?api_key=KEY`` in the URL, which uvicorn's access log writes in full. The filter
replaces, in each record's message and in each of its arguments, with ``***``:

- the value of a credential-looking query parameter (``api_key``, ``api-key``, ``apikey``, ``key``,
  ``token``, ``access_token``, ``auth``, ``password``);
- whatever follows ``Bearer``;
- every configured API key, wherever it appears.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping

REDACTED = "***"
# Loggers that may carry request data: uvicorn's access and error logs, and the gateway's own.
LOGGER_NAMES = ("uvicorn.access", "uvicorn.error", "uvicorn", "tritonembed.gateway")

_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:api[_-]?key|key|token|access[_-]?token|auth|password|secret)=)[^&;\s\"']*"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")


class KeyRedactor(logging.Filter):
    """Rewrites a record's message and arguments with secrets replaced (the record is kept, never dropped)."""

    def __init__(self) -> None:
        super().__init__("tritonembed-key-redactor")
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def add_keys(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._keys.update(k for k in keys if k)

    def redact(self, text: str) -> str:
        text = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        with self._lock:
            keys = sorted(self._keys, key=len, reverse=True)  # longest first: a key inside another
        for key in keys:
            if key in text:
                text = text.replace(key, REDACTED)
        return text

    def _redact_arg(self, value: object) -> object:
        if isinstance(value, (int, float)) or value is None:
            return value
        text = value if isinstance(value, str) else str(value)
        redacted = self.redact(text)
        return value if redacted == text else redacted

    def filter(self, record: logging.LogRecord) -> bool:
        # Arguments are redacted one by one, keeping the tuple: uvicorn's AccessFormatter unpacks it.
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact_arg(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: self._redact_arg(v) for k, v in record.args.items()}
        return True


_REDACTOR = KeyRedactor()


def install_redaction(keys: Iterable[str] = ()) -> KeyRedactor:
    """Attach the (one, process-wide) redactor to :data:`LOGGER_NAMES` and teach it ``keys``.

    Idempotent; call it after uvicorn configured its logging (``uvicorn.Config`` does so).
    """
    _REDACTOR.add_keys(keys)
    for name in LOGGER_NAMES:
        target = logging.getLogger(name)
        if _REDACTOR not in target.filters:
            target.addFilter(_REDACTOR)
    return _REDACTOR
