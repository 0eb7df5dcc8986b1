"""`tritonembed serve` supervises a real tritonserver: kill -9 -> reaped, restarted on the same ports, logs kept;
past --max-restarts it exits 2 with the log of the server that died last."""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest

from tests.integration.serve_process import ServeProcess, group_snapshot, stub_pids
from tritonembed.client import EmbeddingClient, RetryPolicy
from tritonembed.supervisor import SHM_DIR, ProcessGroup, live_pids

pytestmark = pytest.mark.integration

OLD_LOG = "AN UNRELATED LOG FROM AN EARLIER RUN\n"


def test_killed_tritonserver_is_reaped_restarted_and_the_cap_exits_with_its_own_log(minilm_export, tmp_path):
    serve = ServeProcess(minilm_export, tmp_path, gateway=False,
                         extra=("--max-restarts", "1", "--restart-window", "600", "--restart-backoff", "0.2"))
    serve.log_file.parent.mkdir(parents=True, exist_ok=True)
    serve.log_file.write_text(OLD_LOG)
    with serve:
        first = serve.triton_pid()
        members, regions = group_snapshot(first)
        stubs = stub_pids(first)
        assert len(stubs) == 2 and len(regions) == 2, (members, regions)  # tokenizer + encoder stubs, one region each
        # A stopped stub neither obeys SIGTERM nor unlinks its region: what a stub busy in ONNX Runtime looks like.
        os.kill(stubs[0], signal.SIGSTOP)
        os.kill(first, signal.SIGKILL)

        second = serve.wait_new_triton(first, timeout=180)
        # Ready over HTTP comes before serve's start() returns (it checks every model); killed before that, the
        # death is a failed restart, not a crash of a running server: wait until serve says the restart is done.
        serve.wait_output(f"tritonserver restarted (pid {second})", timeout=120)
        assert live_pids(members) == [] and ProcessGroup(first).pids() == []
        assert sorted(r for r in regions if (SHM_DIR / r).exists()) == []
        assert re.search(rf"by SIGKILL \[[0-9, ]*\b{stubs[0]}\b", serve.text())  # the stopped stub needed SIGKILL
        with EmbeddingClient(f"127.0.0.1:{serve.ports['grpc']}", retry=RetryPolicy(max_retries=0)) as client:
            vector = client.embed(["served again after a restart"])
        assert vector.shape == (1, 384) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
        # One log per start: the crash log is kept, the old one shifted, the current one is the new server's.
        log = serve.log_file
        assert log.read_text().startswith("== tritonembed: tritonserver start #2 ")
        crash_log = log.with_name(log.name + ".1").read_text()
        assert crash_log.startswith("== tritonembed: tritonserver start #1 ") and f" {first} " in crash_log
        assert log.with_name(log.name + ".2").read_text() == OLD_LOG

        members2, regions2 = group_snapshot(second)
        os.kill(second, signal.SIGKILL)  # a second death within the window: over --max-restarts 1
        assert serve.proc.wait(timeout=120) == 2
        out = serve.text()
        assert f"giving up. Last crash (pid {second}, signal SIGKILL), log {log}:" in out
        last_lines = log.read_text().splitlines()[-5:]
        assert f" {second} " in log.read_text() and all(line in out for line in last_lines)
        assert OLD_LOG.strip() not in out
        assert live_pids(members2) == [] and sorted(r for r in regions2 if (SHM_DIR / r).exists()) == []
