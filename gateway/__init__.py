"""tritonembed.gateway: an OpenAI-compatible ``/v1/embeddings`` HTTP gateway in front of Triton.

Depends on :mod:`tritonembed.client` (and :mod:`tritonembed.spec`) only, plus FastAPI/uvicorn.

- :func:`create_app` (``GatewaySettings -> FastAPI``), :class:`GatewaySettings` (``TRITONEMBED_*``)
- :func:`run_gateway` (foreground), :class:`BackgroundGateway` (thread, for tests and ``serve``)
- :func:`main` / ``python -m tritonembed.gateway`` (CLI); :func:`build_parser` to reuse its flags
"""

from tritonembed.gateway.app import create_app
from tritonembed.gateway.cli import build_parser, main, settings_from_args
from tritonembed.gateway.errors import ErrorKind, GatewayError
from tritonembed.gateway.server import BackgroundGateway, run_gateway
from tritonembed.gateway.settings import GatewaySettings, SettingsError

__all__ = [
    "BackgroundGateway",
    "ErrorKind",
    "GatewayError",
    "GatewaySettings",
    "SettingsError",
    "build_parser",
    "create_app",
    "main",
    "run_gateway",
    "settings_from_args",
]
