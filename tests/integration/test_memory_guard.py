"""The memory guard, for real: a limit lowered below the measured usage sheds work with UNAVAILABLE (503 through
the gateway and the openai client), and raising it again lets the same server answer without a restart.

The usage is the real reading of this machine (cgroup v2 or /proc/meminfo); only the operator's limit file moves.
The encoder is the GPU profile's code path on the CPU execution provider (the guard is the same on both).
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonembed.export.pipeline import export_model
from tritonembed.gateway import BackgroundGateway, GatewaySettings
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions
from tritonembed.model_repository.memory_guard import READING_TTL_S

pytestmark = pytest.mark.integration

NAME = "Qwen3-Embedding-guarded"


@pytest.fixture(scope="module")
def limit_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guard") / "memory-limit"


@pytest.fixture(scope="module")
def server(limit_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("guard-triton")
    export = root / "tiny"
    export_model("random-qwen3:tiny", export, precision="fp32", name=NAME, max_length=128, run_stsb=False)
    options = ServingOptions(profile="gpu", execution_provider="cpu", encoder_max_batch=64, intra_op_threads=1,
                             memory_limit_file=str(limit_file), memory_threshold=0.9)
    build_repository(root / "models", [export], options)
    with TritonServer(root / "models", log_file=root / "tritonserver.log") as triton:
        yield triton


@pytest.fixture(scope="module")
def oai(server):
    settings = GatewaySettings(triton_url=server.grpc_url, port=0, log_level="warning", request_timeout=30)
    with BackgroundGateway(settings) as gw:
        yield openai.Client(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


def set_limit(limit_file: Path, text: str) -> None:
    limit_file.write_text(text)
    time.sleep(3 * READING_TTL_S)  # past the guard's cached reading


def grpc_embed(server, text: str) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        arr = np.array([[text.encode()]], dtype=object)
        inp = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr)
        return client.infer(NAME, [inp]).as_numpy("EMBEDDING")
    finally:
        client.close()


def metric(server, name: str) -> float | None:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    match = re.search(rf'^tritonembed_{name}{{model="{NAME}_encoder"}} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_below_the_usage_work_is_shed_with_unavailable_and_503_then_the_service_recovers(server, oai, limit_file):
    ok = oai.embeddings.create(model=NAME, input=["before the limit"], encoding_format="float")
    assert len(ok.data[0].embedding) == 64

    set_limit(limit_file, "1M")  # far below what this machine really uses
    with pytest.raises(InferenceServerException) as err:
        grpc_embed(server, "while memory is short")
    assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
    assert "memory" in err.value.message() and "retry later" in err.value.message()
    with pytest.raises(openai.APIStatusError) as refused:
        oai.embeddings.create(model=NAME, input=["while memory is short"], encoding_format="float")
    assert refused.value.status_code == 503, refused.value
    assert refused.value.response.headers.get("retry-after")
    deadline = time.monotonic() + 10  # the counters are published once the model is idle
    while (metric(server, "encoder_shed_requests") or 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "encoder_shed_requests") >= 2
    assert metric(server, "memory_limit_bytes") == 1024**2
    assert metric(server, "memory_used_bytes") > 1024**2

    set_limit(limit_file, "")  # the operator lifts the limit: no restart needed
    again = oai.embeddings.create(model=NAME, input=["before the limit"], encoding_format="float")
    np.testing.assert_allclose(again.data[0].embedding, ok.data[0].embedding, atol=1e-6)
    assert np.isfinite(grpc_embed(server, "after the limit")).all()
    assert metric(server, "memory_limit_bytes") > 1024**2
