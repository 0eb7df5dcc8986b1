"""Gateway settings: one frozen dataclass, filled from ``TRITONEMBED_*`` environment variables.

=================================  ==============================================  =================
variable                           meaning                                         default
=================================  ==============================================  =================
``TRITONEMBED_TRITON_URL``         Triton address(es), comma-separated replicas    ``localhost:8001``
                                   (a scheme picks the protocol)
``TRITONEMBED_TRITON_PROTOCOL``    ``grpc`` or ``http`` when the URL has no scheme ``grpc``
``TRITONEMBED_GATEWAY_HOST``       interface to listen on                          ``127.0.0.1``
``TRITONEMBED_GATEWAY_PORT``       port to listen on                               ``8080``
``TRITONEMBED_API_KEYS``           comma-separated bearer keys                     (none: no auth)
``TRITONEMBED_API_KEY_FILE``       file with one key per line (``#`` comments)     (none)
``TRITONEMBED_MAX_REQUEST_BYTES``  largest request body accepted                   16 MiB
``TRITONEMBED_MAX_INPUTS``         most inputs in one request                      2048
``TRITONEMBED_MAX_PENDING_INPUTS`` inputs in flight before 429 ``overloaded``      8192
``TRITONEMBED_REQUEST_TIMEOUT``    seconds per Triton request                      60
``TRITONEMBED_REQUEST_DEADLINE``   seconds one API request may take in all (504)   120
``TRITONEMBED_HEADER_TIMEOUT``     seconds to receive a request's headers          10
``TRITONEMBED_BODY_TIMEOUT``       seconds to receive a request's body             30
``TRITONEMBED_MAX_CONNECTIONS``    open connections before requests get 503        1024
``TRITONEMBED_GATEWAY_CONCURRENCY`` Triton requests in flight per API request      8
``TRITONEMBED_TOKEN_IDS``          token-id input: ``off`` (400), ``native``,
                                   ``tiktoken:cl100k_base``                        ``off``
``TRITONEMBED_MODEL_DIRS``         exported model dirs (``os.pathsep``-separated),
                                   whose tokenizers ``native`` decodes with        (none)
``TRITONEMBED_MODELS_TTL``         seconds the served-model list is cached         30
``TRITONEMBED_LOG_LEVEL``          gateway log level                               ``info``
=================================  ==============================================  =================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TRITONEMBED_"
# Token-id input modes (see tritonembed.gateway.tokens); the first is the default.
TOKEN_ID_MODES: tuple[str, ...] = ("off", "tiktoken:cl100k_base", "native")


class SettingsError(ValueError):
    """A setting (or the environment variable it came from) is invalid."""


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str = "localhost:8001"
    protocol: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_request_bytes: int = 16 * 1024 * 1024
    max_inputs: int = 2048
    max_pending_inputs: int = 8192
    request_timeout: float = 60.0
    request_deadline: float = 120.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    max_concurrency: int = 8
    token_ids: str = TOKEN_ID_MODES[0]
    model_dirs: tuple[Path, ...] = ()
    models_ttl: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.triton_urls  # noqa: B018 -- validates the URL list
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be within 0..65535, got {self.port}")
        for name in ("max_request_bytes", "max_inputs", "max_pending_inputs", "max_concurrency", "max_connections"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pending_inputs < self.max_inputs:
            raise SettingsError(f"max_pending_inputs ({self.max_pending_inputs}) must be >= max_inputs "
                                f"({self.max_inputs}), or a largest request could never be admitted")
        if self.request_timeout <= 0 or self.models_ttl < 0:
            raise SettingsError("request_timeout must be > 0 and models_ttl >= 0")
        for name in ("request_deadline", "header_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.token_ids not in TOKEN_ID_MODES:
            raise SettingsError(f"token_ids must be one of {', '.join(TOKEN_ID_MODES)}; got {self.token_ids!r}")
        if self.token_ids == "native" and not self.model_dirs:
            raise SettingsError("token_ids=native decodes with the served model's tokenizer: give its exported "
                                "directory with --model-dir (TRITONEMBED_MODEL_DIRS)")
        if any(not key for key in self.api_keys):
            raise SettingsError("API keys must not be empty")

    @property
    def triton_urls(self) -> list[str]:
        """The replicas' URLs from ``triton_url`` (``A,B,...``).

        Raises:
            SettingsError: no URL, a malformed one, or one replica named twice.
        """
        from tritonembed.client import InvalidArgument
        from tritonembed.client.core import parse_url
        from tritonembed.client.replicas import split_urls

        try:
            urls = split_urls(self.triton_url)
            addresses = [parse_url(u, self.protocol).address for u in urls]
        except InvalidArgument as exc:
            raise SettingsError(f"triton_url: {exc}") from None
        if len(set(addresses)) != len(addresses):
            raise SettingsError(f"triton_url names one replica twice: {self.triton_url!r}")
        return urls

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def replace(self, **changes: Any) -> GatewaySettings:
        """A copy with ``changes`` applied (None values are ignored, so CLI defaults can pass through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        """Settings from ``TRITONEMBED_*`` variables, then ``overrides`` (None = keep).

        Raises:
            SettingsError: a variable does not parse, or the key file cannot be read.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value.strip() if value is not None and value.strip() else None

        def number(name: str, kind: type) -> Any:
            raw = get(name)
            if raw is None:
                return None
            try:
                return kind(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name}={raw!r} is not a valid {kind.__name__}") from None

        keys = [k.strip() for k in (get("API_KEYS") or "").split(",") if k.strip()]
        key_file = get("API_KEY_FILE")
        if key_file:
            keys.extend(load_api_key_file(Path(key_file)))
        dirs = get("MODEL_DIRS")
        values: dict[str, Any] = {
            "triton_url": get("TRITON_URL"),
            "protocol": get("TRITON_PROTOCOL"),
            "host": get("GATEWAY_HOST"),
            "port": number("GATEWAY_PORT", int),
            "api_keys": tuple(dict.fromkeys(keys)) or None,
            "max_request_bytes": number("MAX_REQUEST_BYTES", int),
            "max_inputs": number("MAX_INPUTS", int),
            "max_pending_inputs": number("MAX_PENDING_INPUTS", int),
            "request_timeout": number("REQUEST_TIMEOUT", float),
            "request_deadline": number("REQUEST_DEADLINE", float),
            "header_timeout": number("HEADER_TIMEOUT", float),
            "body_timeout": number("BODY_TIMEOUT", float),
            "max_connections": number("MAX_CONNECTIONS", int),
            "token_ids": get("TOKEN_IDS"),
            "max_concurrency": number("GATEWAY_CONCURRENCY", int),
            "model_dirs": tuple(Path(p) for p in dirs.split(os.pathsep) if p) if dirs else None,
            "models_ttl": number("MODELS_TTL", float),
            "log_level": get("LOG_LEVEL"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls().replace(**values)


def load_api_key_file(path: Path) -> list[str]:
    """Keys from a file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        SettingsError: the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read API key file {path}: {exc.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
