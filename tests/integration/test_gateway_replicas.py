"""One ``tritonembed gateway --triton-url A,B`` over two ``tritonembed serve --no-gateway`` replicas (real
tritonserver processes, all-MiniLM-L6-v2), under load from three threads through the real ``openai`` client
with ``max_retries=0``: SIGKILL one replica's tritonserver and every answer is still 200 and correct (vectors
equal to the served reference, cos >= 0.99999); the killed replica, restarted by its serve supervisor, rejoins
and receives traffic again (read from the gateway's per-backend metrics).

Every wait is a bounded poll; the numbers (requests, failovers, seconds) are logged.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.integration.serve_process import ServeProcess
from tritonembed.client import EmbeddingClient
from tritonembed.export.stsb import load_stsb
from tritonembed.launcher import free_port

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

MIN_COS = 0.99999
THREADS = 3
BATCH = 4
N_TEXTS = 48


def backend_metrics(gateway: str) -> dict[str, dict[str, float]]:
    """``{address: {"requests": n, "failures": n, "healthy": 0/1}}`` from the gateway's /metrics."""
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, dict[str, float]] = {}
    for name, key in (("requests_total", "requests"), ("failures_total", "failures"), ("healthy", "healthy")):
        for address, value in re.findall(rf'^tritonembed_gateway_backend_{name}{{backend="([^"]+)"}} (\S+)$', text, re.M):
            found.setdefault(address, {})[key] = float(value)
    return found


def wait_for(what: str, check, timeout: float) -> float:
    """Poll ``check()`` until true; the seconds it took. Raises AssertionError after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


class Load(threading.Thread):
    """Embeds batches of the corpus through the openai client until stopped; records every outcome."""

    def __init__(self, base_url: str, model: str, texts: list[str], offset: int) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        self.model, self.texts, self.offset = model, texts, offset
        self.ok: list[tuple[list[int], np.ndarray]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        k = self.offset
        while not self.stop.is_set():
            rows = [(k * BATCH + j) % len(self.texts) for j in range(BATCH)]
            k += THREADS
            try:
                answer = self.client.embeddings.create(model=self.model, input=[self.texts[i] for i in rows])
                self.ok.append((rows, np.array([d.embedding for d in answer.data], dtype=np.float32)))
            except Exception as exc:  # noqa: BLE001 -- any failure is what the test counts
                self.errors.append(f"{type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    pairs = load_stsb("en")
    return [p.sentence1 for p in pairs][:N_TEXTS]


def test_killing_one_replica_under_load_loses_no_request_and_it_rejoins(minilm_export: Path, tmp_path, texts):
    replicas = [ServeProcess(minilm_export, tmp_path / f"replica-{i}", gateway=False) for i in range(2)]
    gateway_port = free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    gateway_log = tmp_path / "gateway.log"
    gateway = None
    loads: list[Load] = []
    try:
        for replica in replicas:
            replica.start()
        urls = ",".join(f"grpc://127.0.0.1:{r.ports['grpc']}" for r in replicas)
        addresses = [f"127.0.0.1:{r.ports['grpc']}" for r in replicas]
        with open(gateway_log, "wb") as out:
            gateway = subprocess.Popen([sys.executable, "-m", "tritonembed.cli", "gateway", "--triton-url", urls,
                                        "--port", str(gateway_port), "--log-level", "info"],
                                       stdout=out, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert gateway.poll() is None, gateway_log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{gateway_url}/ready", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for("gateway ready", ready, 120)
        with EmbeddingClient(f"127.0.0.1:{replicas[1].ports['grpc']}") as client:
            reference = client.embed(texts)
            model = client.model_info().name

        loads = [Load(f"{gateway_url}/v1", model, texts, i) for i in range(THREADS)]
        for load in loads:
            load.start()
        wait_for("both replicas get traffic", lambda: all(backend_metrics(gateway_url).get(a, {}).get("requests", 0) >= 5
                                                        for a in addresses), 60)

        victim = replicas[0]
        old_pid = victim.triton_pid()
        assert old_pid is not None
        done_before_kill = sum(len(load.ok) for load in loads)
        subprocess.run(["kill", "-KILL", str(old_pid)], check=True)
        killed_at = time.monotonic()
        victim.wait_new_triton(old_pid, timeout=240)
        restarted_in = time.monotonic() - killed_at
        done_during_outage = sum(len(load.ok) for load in loads) - done_before_kill
        at_restart = backend_metrics(gateway_url)[addresses[0]]["requests"]
        rejoined_in = wait_for("the restarted replica gets traffic again",
                               lambda: backend_metrics(gateway_url)[addresses[0]]["requests"] >= at_restart + 5, 60)
    finally:
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(timeout=90)
        final = backend_metrics(gateway_url) if gateway is not None and gateway.poll() is None else {}
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        for replica in replicas:
            replica.__exit__(None, None, None)

    errors = [e for load in loads for e in load.errors]
    answers = [a for load in loads for a in load.ok]
    log.info("%d answers (%d while the victim was down, %.1f s), rejoined %.1f s after its restart; metrics %s",
             len(answers), done_during_outage, restarted_in, rejoined_in, final)
    assert not errors, f"{len(errors)} failed requests, first: {errors[:3]}\ngateway log:\n" + gateway_log.read_text()[-3000:]
    assert done_during_outage >= THREADS, "the load ran while the victim was down"
    for rows, vectors in answers:
        cos = np.sum(vectors * reference[rows], axis=1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference[rows], axis=1))
        assert cos.min() >= MIN_COS, (rows, cos)
    assert final[addresses[0]]["healthy"] == 1 and final[addresses[1]]["healthy"] == 1, final
    gateway_text = gateway_log.read_text()
    assert "is down" in gateway_text and "is back" in gateway_text, "the health check saw the outage and the return"
