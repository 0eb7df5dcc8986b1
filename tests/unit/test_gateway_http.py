"""The gateway behind real uvicorn on a free port (stand-in Triton client): what only real sockets show.

Read deadlines for headers and bodies, the cap on open connections, client disconnects logged at
INFO, API keys redacted from uvicorn's access log.
"""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
from uvicorn.logging import AccessFormatter

from tritonembed.gateway import BackgroundGateway, GatewaySettings

try:
    from .test_gateway_app import KEY, MINILM, StubClient
except ImportError:
    from test_gateway_app import KEY, MINILM, StubClient


def serve(**settings) -> BackgroundGateway:
    base = {"port": 0, "api_keys": (KEY,), "log_level": "info"}
    base.update(settings)
    return BackgroundGateway(GatewaySettings(**base), client=StubClient())


def connect(gw: BackgroundGateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock.settimeout(0.2)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset); False while it is open."""
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:  # reset by the server
        return True


def trickle(sock: socket.socket, data: bytes, every: float, limit: float) -> tuple[bool, float, int]:
    """Send ``data`` one byte per ``every`` seconds until the server closes or ``limit`` passes.

    Returns ``(closed, seconds, bytes_sent)``.
    """
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < limit:
        if closed_by_server(sock):
            return True, time.monotonic() - started, sent
        if sent < len(data):
            try:
                sock.send(data[sent : sent + 1])
            except OSError:
                return True, time.monotonic() - started, sent
            sent += 1
        time.sleep(every)
    return False, time.monotonic() - started, sent


HEADERS = (
    b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"
)


def test_trickled_headers_are_cut_at_the_header_deadline(caplog):
    with serve(header_timeout=1.0) as gw, connect(gw) as sock:
        caplog.set_level(logging.INFO, logger="tritonembed.gateway")
        closed, seconds, sent = trickle(sock, HEADERS, every=0.25, limit=20)
        assert closed, "the connection must be closed while its headers are still incomplete"
        assert sent < len(HEADERS)
        logging.getLogger(__name__).info("trickled headers: closed after %.2f s, %d bytes", seconds, sent)
        assert any("request headers not received within 1 s" in r.getMessage() for r in caplog.records)
        # an idle connection that never sends a byte is closed too
        with connect(gw) as idle:
            closed, _, _ = trickle(idle, b"", every=0.1, limit=20)
            assert closed
        assert httpx.get(f"{gw.url}/health").status_code == 200


def test_a_body_shorter_than_its_content_length_is_cut_at_the_body_deadline(caplog):
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    with serve(body_timeout=1.0) as gw, connect(gw) as sock:
        caplog.set_level(logging.INFO)
        sock.sendall(head + b'{"model": "' + MINILM.name.encode() + b'", "input": "')
        closed, seconds, _ = trickle(sock, b"", every=0.1, limit=20)
        assert closed, "a body that never completes must not hold the connection"
        logging.getLogger(__name__).info("short body: closed after %.2f s", seconds)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("disconnected" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
        assert gone and all(r.levelno == logging.INFO and r.exc_info is None for r in gone)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
        assert any("request body not received within 1 s" in r.getMessage() for r in caplog.records)
        ok = httpx.post(f"{gw.url}/v1/embeddings", json={"model": MINILM.name, "input": "x"},
                        headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_a_client_that_hangs_up_mid_body_is_info_without_traceback(caplog):
    with serve() as gw:
        caplog.set_level(logging.INFO)
        sock = connect(gw)
        sock.sendall(HEADERS.replace(b"\r\n\r\n", b"\r\nContent-Length: 500\r\n\r\n", 1) + b'{"model": ')
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("disconnected" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
        assert gone and gone[0].levelno == logging.INFO and gone[0].exc_info is None
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_open_connections_are_capped():
    with serve(max_connections=3, header_timeout=60) as gw:
        idle = [connect(gw) for _ in range(3)]
        try:
            time.sleep(0.2)
            r = httpx.get(f"{gw.url}/health")
            assert r.status_code == 503 and r.headers["retry-after"] and r.headers["connection"] == "close"
            assert r.json()["error"]["code"] == "too_many_connections"
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server notices the closed sockets
            if httpx.get(f"{gw.url}/health").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(f"{gw.url}/health").status_code == 200


@pytest.mark.parametrize("param", ["api_key", "key", "access_token"])
def test_api_keys_never_reach_the_access_log(param):
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    with serve() as gw:
        handler = Collect()
        handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))  # unpacks args
        access = logging.getLogger("uvicorn.access")
        access.addHandler(handler)
        try:
            r = httpx.get(f"{gw.url}/v1/models?{param}={KEY}&x=1")
            assert r.status_code == 401  # a key in the URL is not a credential
            r = httpx.get(f"{gw.url}/v1/models?{param}=sk-some-other-secret")
            assert r.status_code == 401
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len([m for m in seen if "/v1/models" in m]) < 2:
                time.sleep(0.05)
        finally:
            access.removeHandler(handler)
    lines = [m for m in seen if "/v1/models" in m]
    assert len(lines) == 2, seen
    assert not [m for m in lines if KEY in m or "sk-some-other-secret" in m], lines
    assert all(f"{param}=***" in m for m in lines), lines


def test_head_health_over_http():
    with serve() as gw:
        r = httpx.head(f"{gw.url}/health")
        assert r.status_code == 200
