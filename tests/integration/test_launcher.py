"""`tritonembed serve` as a user runs it, and the launcher's failure modes (taken port, dying server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import openai
import pytest

from tests.integration.serve_process import group_snapshot, stub_pids
from tritonembed.errors import LaunchError
from tritonembed.launcher import PortInUseError, TritonServer, free_port
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions
from tritonembed.supervisor import SHM_DIR, ProcessGroup, live_pids

pytestmark = pytest.mark.integration


def test_taken_port_fails_fast_naming_the_flag(tmp_path):
    (tmp_path / "models").mkdir()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"grpc port {port} is already in use.*--grpc-port"):
            TritonServer(tmp_path / "models", grpc_port=port).start()


def test_a_server_that_dies_reports_its_log(tmp_path):
    broken = tmp_path / "models" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\nmax_batch_size: 1\n')
    server = TritonServer(tmp_path / "models", startup_timeout=60)
    with pytest.raises(LaunchError, match="exited with code") as info:
        server.start()
    assert "broken" in str(info.value)  # the log tail names the failing model
    assert not server.is_alive()


def test_stop_after_a_crash_reaps_the_stubs_and_their_shm(minilm_export, tmp_path):
    build_repository(tmp_path / "models", [minilm_export], ServingOptions(profile="cpu", intra_op_threads=1))
    server = TritonServer(tmp_path / "models", startup_timeout=120).start()
    try:
        pid = server.process.pid
        members, regions = group_snapshot(pid)
        assert len(stub_pids(pid)) == 2 and len(regions) == 2
        assert server.remember_shm() == regions  # what the launcher recorded while the server ran
        os.kill(stub_pids(pid)[1], signal.SIGSTOP)  # deaf to SIGTERM, like a stub busy in a long run
        os.kill(pid, signal.SIGKILL)
        server.process.wait(10)
    finally:
        server.stop()  # the main process is gone already: stop() must still clean up after it
    assert live_pids(members) == [] and ProcessGroup(pid).pids() == []
    assert sorted(r for r in regions if (SHM_DIR / r).exists()) == []


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if needle in line:
                return "".join(seen)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.2)
    raise AssertionError(f"{needle!r} not printed; output:\n{''.join(seen)[-3000:]}")


def test_serve_command_serves_the_openai_api_and_stops_on_sigterm(minilm_export, reference, tmp_path):
    ports = {flag: free_port() for flag in ("http", "grpc", "metrics", "gateway")}
    cmd = [sys.executable, "-m", "tritonembed.cli", "serve", str(minilm_export), "--repository", str(tmp_path / "repo")]
    cmd += [f"--{flag}-port={port}" for flag, port in ports.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = _wait_for(proc, "Press Ctrl-C to stop.", timeout=240)
        assert f"127.0.0.1:{ports['gateway']}/v1/embeddings" in banner
        client = openai.Client(base_url=f"http://127.0.0.1:{ports['gateway']}/v1", api_key="EMPTY")
        texts = ["How are you today?", "Serving with one command."]
        response = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert (got * reference("minilm", texts)).sum(1).min() >= 0.99999
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for port in ports.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
            s.bind(("127.0.0.1", port))
