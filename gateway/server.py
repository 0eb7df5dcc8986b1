"""Running the gateway: in the foreground (:func:`run_gateway`, the CLI) or in a background thread
(:class:`BackgroundGateway`, for tests and for ``tritonembed serve --gateway-port``)."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from tritonembed.gateway.app import create_app
from tritonembed.gateway.logs import install_redaction
from tritonembed.gateway.settings import GatewaySettings

logger = logging.getLogger("tritonembed.gateway")


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"the gateway needs uvicorn and fastapi ({exc}); pip install 'tritonembed[gateway]'") from exc
    return uvicorn


def _config(settings: GatewaySettings, app: Any) -> Any:
    """uvicorn's config: h11 with read deadlines and the cap on open connections (:mod:`.protocol`),
    and key redaction on its loggers."""
    uvicorn = _uvicorn()
    from tritonembed.gateway.protocol import timed_protocol

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=timed_protocol(settings.header_timeout, settings.body_timeout, settings.max_connections),
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    install_redaction(settings.api_keys)  # after Config: it (re)configures uvicorn's loggers
    return config


def run_gateway(settings: GatewaySettings | None = None, **overrides: Any) -> None:
    """Serve the gateway in the foreground until interrupted.

    ``overrides`` replace fields of ``settings`` (default: from ``TRITONEMBED_*`` variables);
    None values are ignored, so CLI flags that were not given fall through to the environment.
    """
    settings = (settings or GatewaySettings.from_env()).replace(**overrides)
    logger.info("gateway listening on http://%s:%d (Triton: %s)", settings.host, settings.port, settings.triton_url)
    _uvicorn().Server(_config(settings, create_app(settings))).run()


class BackgroundGateway:
    """The gateway served by uvicorn in a daemon thread, on ``settings.port`` (0 = a free port).

    >>> with BackgroundGateway(GatewaySettings(triton_url="localhost:8001", port=0)) as gw:  # doctest: +SKIP
    ...     print(gw.url)  # http://127.0.0.1:PORT

    Raises (on start):
        RuntimeError: uvicorn did not start (or ``/health`` did not answer) within ``start_timeout``.
    """

    def __init__(self, settings: GatewaySettings, *, client: Any = None, start_timeout: float = 30.0) -> None:
        self.settings = settings
        self.app = create_app(settings, client=client)
        self._start_timeout = start_timeout
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = settings.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundGateway:
        uvicorn = _uvicorn()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(_config(self.settings, self.app))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="tritonembed-gateway", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the gateway thread exited during startup (see the log)")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the gateway did not answer {self.url}/health within {self._start_timeout}s")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/ready`` (with the first configured API key, if any) until it answers 200.

        Raises:
            RuntimeError: not ready within ``timeout``; the message holds the last answer.
        """
        headers = {"Authorization": f"Bearer {self.settings.api_keys[0]}"} if self.settings.api_keys else {}
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url + "/ready", headers=headers), timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"{exc.code} {exc.read()[:300].decode(errors='replace')}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise RuntimeError(f"the gateway at {self.url} did not become ready in {timeout:.0f}s (last answer: {last})")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> BackgroundGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
