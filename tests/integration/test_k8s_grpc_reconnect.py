"""deploy/k8s starts Triton with ``--grpc-max-connection-age`` so that gateways reconnect through the Service and
reach replicas the HPA added. That must cost our gRPC clients no request: run the real tritonserver with the
manifests' flag (at a 1 s age instead of 60 s, to see many reconnects in seconds) under sync and async load."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import yaml

from tritonembed.client import EmbeddingClient
from tritonembed.client.aio import AsyncEmbeddingClient
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AGE_FLAG = "--grpc-max-connection-age"
TEST_AGE_MS = 1000
SECONDS = 6.0


def manifest_age_flag() -> str:
    """The Triton Deployment's connection-age argument, read from the base manifest."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "triton.yaml").read_text())
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [triton] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
    [arg] = [a for a in triton["args"] if a.startswith(AGE_FLAG + "=")]
    return arg


def client_ports(server_port: int) -> set[int]:
    """Local ports of established TCP connections to ``server_port`` on loopback (from /proc/net/tcp*)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:  # 01 = ESTABLISHED
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_clients_lose_no_request_when_triton_ages_out_their_connections(minilm_export, tmp_path):
    arg = manifest_age_flag()
    assert int(arg.split("=", 1)[1]) >= 10_000, "a connection age of seconds would reconnect all the time"
    specs = build_repository(tmp_path / "models", [minilm_export], ServingOptions(profile="cpu", intra_op_threads=1))
    name = specs[0].name
    server = TritonServer(tmp_path / "models", log_file=tmp_path / "tritonserver.log",
                          extra_args=(f"{AGE_FLAG}={TEST_AGE_MS}",))
    with server:
        seen: set[int] = set()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                seen.update(client_ports(server.grpc_port))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        failures: list[str] = []
        done = 0
        with EmbeddingClient(server.grpc_url, model=name) as client:
            end = time.monotonic() + SECONDS
            while time.monotonic() < end:
                try:
                    vectors = client.embed(["hello world", "a second text"])
                    assert vectors.shape[0] == 2
                    done += 1
                except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                    failures.append(repr(exc))

        async def load() -> int:
            count = 0
            async with AsyncEmbeddingClient(server.grpc_url, model=name) as client:
                end = time.monotonic() + SECONDS

                async def worker() -> None:
                    nonlocal count
                    while time.monotonic() < end:
                        try:
                            vectors = await client.embed(["hello world", "a longer second text"])
                            assert vectors.shape[0] == 2
                            count += 1
                        except Exception as exc:  # noqa: BLE001
                            failures.append(repr(exc))

                await asyncio.gather(*(worker() for _ in range(4)))
            return count

        done += asyncio.run(load())
        stop.set()
        sampler.join(timeout=5)
    assert not failures, f"{len(failures)} of {done + len(failures)} requests failed: {failures[:3]}"
    assert done > 0
    # Two clients over 2 x 6 s with a 1 s age: several connections each, not one per client.
    assert len(seen) >= 4, f"only {len(seen)} connections seen: the server did not age them out"
