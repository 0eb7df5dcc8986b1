"""``tritonembed embed`` against two real tritonserver replicas serving all-MiniLM-L6-v2.

3,000 real texts (the sentences of the STS-B en dev set). The CLI runs as a subprocess, as a user runs it:
killed with SIGKILL part-way and run again, it completes with every id once and vectors equal to the ones
``EmbeddingClient.embed`` gets from the same servers; the Ray engine (a local Ray cluster) gives the same output
and skips finished shards on a rerun; a replica killed mid-job costs no row.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tritonembed.client import EmbeddingClient
from tritonembed.client.bulk import SUCCESS, parse_part_name, read_output
from tritonembed.export.stsb import load_stsb
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions

pytestmark = pytest.mark.integration

N_TEXTS = 3000
MIN_COS = 0.99999


@pytest.fixture(scope="module")
def replicas(minilm_export: Path, tmp_path_factory) -> Iterator[list[TritonServer]]:
    """Two tritonservers on free ports from one repository (one thread each: two replicas on a 2-core box)."""
    root = tmp_path_factory.mktemp("replicas")
    build_repository(root / "models", [minilm_export], ServingOptions(profile="cpu", intra_op_threads=1))
    servers = [TritonServer(root / "models", log_file=root / f"tritonserver-{i}.log") for i in range(2)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    pairs = load_stsb("en")
    texts = [t for p in pairs for t in (p.sentence1, p.sentence2)][:N_TEXTS]
    assert len(texts) == N_TEXTS
    return texts


@pytest.fixture(scope="module")
def served(replicas, corpus) -> np.ndarray:
    """What the served model returns for the corpus, one EmbeddingClient call."""
    with EmbeddingClient(replicas[0].grpc_url) as client:
        return client.embed(corpus)


def write_jsonl(path: Path, texts: list[str], offset: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": f"s-{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts, offset))
    return path


def embed_cmd(source: Path, out: Path, replicas, *extra: str) -> list[str]:
    urls = ",".join(s.grpc_url for s in replicas)
    return [sys.executable, "-m", "tritonembed.cli", "embed", str(source), "--output", str(out), "--url", urls,
            "--no-progress", *extra]


def run_cli(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done


def check_vectors(ids: list, vectors: np.ndarray, served: np.ndarray) -> None:
    assert len(ids) == N_TEXTS and len(set(ids)) == N_TEXTS, "every id exactly once"
    assert set(ids) == {f"s-{i}" for i in range(N_TEXTS)}
    rows = np.array([int(i.split("-")[1]) for i in ids])
    cos = np.sum(vectors * served[rows], axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(served[rows], axis=1))
    assert cos.min() >= MIN_COS, f"min cosine {cos.min():.7f} at id {ids[int(cos.argmin())]}"


def table_arrays(table) -> tuple[list, np.ndarray]:
    return table.column("id").to_pylist(), np.array(table.column("embedding").to_pylist(), dtype=np.float32)


def requests_served(server: TritonServer) -> float:
    """Triton's count of successful inferences on ``server``, all models."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("nv_inference_request_success{"))


def wait_for_parts(out: Path, n: int, process: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if out.is_dir() and sum(1 for p in out.iterdir() if parse_part_name(p.name)) >= n:
            return
        assert process.poll() is None, f"the job ended before {n} parts: {process.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} parts after {limit} s")


def test_killed_job_resumes_with_each_id_once_and_the_served_vectors(tmp_path, replicas, corpus, served):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "out"
    cmd = embed_cmd(source, out, replicas, "--part-rows", "200", "--batch-size", "16")
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_parts(out, 3, job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.communicate(timeout=30)
    assert job.returncode == -signal.SIGKILL
    assert not (out / SUCCESS).exists(), "killed before the end"
    killed_at = sum(1 for p in out.iterdir() if parse_part_name(p.name))
    assert 3 <= killed_at < N_TEXTS // 200

    done = run_cli(cmd)
    summary = done.stdout.strip().splitlines()[-1]
    assert f"{N_TEXTS} in all" in summary, summary
    already = int(summary.split(" already done")[0].rsplit(" ", 1)[1])
    assert already >= killed_at * 200, summary
    for s in replicas:  # both replicas took batches
        assert f"{s.grpc_url} 0;" not in summary and f"{s.grpc_url} 0," not in summary, summary
    table = read_output(out)
    ids, vectors = table_arrays(table)
    assert ids == [f"s-{i}" for i in range(N_TEXTS)], "parts cover the input in order, no gap, no overlap"
    check_vectors(ids, vectors, served)
    assert pq.read_table(out).num_rows == N_TEXTS, "a plain Parquet reader sees the parts only"


def test_ray_engine_gives_the_same_output_and_skips_finished_shards(tmp_path, replicas, corpus, served):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        write_jsonl(shards / f"corpus-{k}.jsonl", corpus[k * 1000:(k + 1) * 1000], offset=k * 1000)
    out = tmp_path / "ray-out"
    cmd = embed_cmd(shards, out, replicas, "--engine", "ray", "--batch-size", "32")
    before = [requests_served(s) for s in replicas]
    run_cli(cmd)
    assert all(requests_served(s) > b for s, b in zip(replicas, before)), "the actors used both replicas"
    ids, vectors = table_arrays(pq.read_table(out))
    check_vectors(ids, vectors, served)
    first = dict(zip(ids, vectors))

    shutil.rmtree(out / "shard-corpus-1.jsonl")  # as if the run had died in shard 1
    (out / ".tmp-shard-corpus-1.jsonl-deadbeef").mkdir()
    (out / SUCCESS).unlink()
    kept = {p: p.stat().st_ino for p in (out / "shard-corpus-0.jsonl").iterdir()}
    again = run_cli(cmd)
    assert "2000 already done" in again.stdout and "embedded 1000 rows" in again.stdout, again.stdout
    assert all(p.stat().st_ino == ino for p, ino in kept.items()), "a finished shard is not rewritten"
    assert not (out / ".tmp-shard-corpus-1.jsonl-deadbeef").exists()
    ids, vectors = table_arrays(pq.read_table(out))
    check_vectors(ids, vectors, served)
    assert max(float(np.abs(v - first[i]).max()) for i, v in zip(ids, vectors)) < 1e-5


def test_a_model_no_replica_serves_fails_at_once_with_a_clear_error(tmp_path, replicas, corpus):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus[:50])
    done = subprocess.run(embed_cmd(source, tmp_path / "out", replicas, "--model", "no-such-model"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no URL serves the model" in done.stderr and "no-such-model" in done.stderr, done.stderr[-3000:]
    assert all(s.grpc_url in done.stderr for s in replicas), done.stderr[-3000:]


def test_a_replica_killed_mid_job_costs_no_row(tmp_path, replicas, corpus, served):
    """Runs last in this module: it kills the second replica."""
    source = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"s-{i}" for i in range(N_TEXTS)], "text": corpus}), source, row_group_size=500)
    out = tmp_path / "out"
    job = subprocess.Popen(embed_cmd(source, out, replicas, "--part-rows", "100", "--batch-size", "8"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_parts(out, 2, job)
        os.killpg(replicas[1].process.pid, signal.SIGKILL)  # the whole server, stubs included
        replicas[1].cleanup()
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-5000:]
    assert "retrying it on another URL" in stderr and "batches retried on another URL" in stdout
    assert " 0 batches retried" not in stdout, stdout
    ids, vectors = table_arrays(read_output(out))
    assert ids == [f"s-{i}" for i in range(N_TEXTS)]
    check_vectors(ids, vectors, served)
