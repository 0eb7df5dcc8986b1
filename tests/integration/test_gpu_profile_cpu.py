"""The GPU profile's encoder code path, run on the CPU execution provider with the pip tritonserver.

What this covers without a GPU: the generated gpu-profile repository (Python-backend encoder, ragged batching,
one session, the GPU token budget) with ``execution_provider=cpu`` on ``KIND_CPU``, the memory model's budget
splitting a request into micro-batches, and a text too long for the budget refused on its own. What it does not
cover: the CUDA execution provider, ``KIND_GPU`` placement, NVML readings (docs/serving.md says so).
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonembed.export.families import family_by_name
from tritonembed.export.pipeline import export_model
from tritonembed.export.resolve import resolve_model
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions
from tritonembed.model_repository.memory_model import FUSED, model_shape, report_attention
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration

MODEL_ID = "random-qwen3:tiny"
NAME = "Qwen3-Embedding-tiny"
ROWS_PER_BATCH = 2  # the grant below leaves room for two rows of BATCH_LENGTH tokens
BATCH_LENGTH = 64


def texts_of(tokens: int, count: int) -> list[str]:
    """``count`` distinct texts of about ``tokens`` tokens each (" hello" is one Qwen token)."""
    return [f"text {i}:" + " hello" * (tokens - 4) for i in range(count)]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-profile") / "tiny"
    export_model(MODEL_ID, out, precision="fp32", name=NAME, max_length=512, run_stsb=False)
    return out


@pytest.fixture(scope="module")
def grant(export) -> int:
    """Bytes that hold the weights and two BATCH_LENGTH-token rows of activations, per the memory model."""
    spec_hidden = 64  # random-qwen3:tiny
    shape = model_shape(export / "model.onnx", spec_hidden, "fp32")
    return shape.weights_bytes + shape.activation_bytes(ROWS_PER_BATCH, BATCH_LENGTH)


@pytest.fixture(scope="module")
def server(export, grant, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-profile-triton")
    options = ServingOptions(profile="gpu", execution_provider="cpu", encoder_max_batch=64,
                             intra_op_threads=1, memory_grant=f"{grant}B")
    build_repository(root / "models", [export], options)
    with TritonServer(root / "models", log_file=root / "tritonserver.log") as triton:
        yield triton


def infer(server, texts):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    arr = np.array([[t.encode()] for t in texts], dtype=object)
    inp = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    try:
        result = client.infer(NAME, [inp])
        return result.as_numpy("EMBEDDING"), result.as_numpy("TOKEN_COUNT")
    finally:
        client.close()


def counter(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    match = re.search(rf'^tritonembed_{name}{{model="{NAME}_encoder"}} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def settled_counter(server, name: str, previous: float) -> float:
    """The counter once the idle publisher has pushed this request's adds (published after QUIET_S of idle)."""
    deadline = time.monotonic() + 10
    value = counter(server, name)
    while value == previous and time.monotonic() < deadline:
        time.sleep(0.1)
        value = counter(server, name)
    return value


def test_the_generated_repository_is_the_python_encoder_on_the_cpu_provider(server):
    config = (server.repository / f"{NAME}_encoder" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "KIND_CPU" in config
    assert re.search(r'key: "execution_provider" value: \{ string_value: "cpu" \}', config)
    model_dir = server.repository / f"{NAME}_encoder" / "1"
    assert report_attention(model_dir) == FUSED  # report.json travels with the model for the memory model
    assert model_shape(model_dir / "model.onnx", 64, "fp32").layers == 2


def test_embeddings_match_the_reference(server, export):
    texts = ["GPU profile, CPU provider.", "a second text, somewhat longer than the first one"]
    emb, counts = infer(server, texts)
    spec = ModelSpec.load(export)
    ref = family_by_name(spec.family).reference_embed(resolve_model(MODEL_ID).path, [spec.format_text(t, None) for t in texts], spec)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.99999
    assert (counts > 0).all()


def test_the_budget_splits_a_request_that_would_exceed_it(server):
    texts = texts_of(BATCH_LENGTH - 8, 8)  # 8 rows of ~56 tokens: the token cap alone would run them together
    before = counter(server, "encoder_batches")
    together, counts = infer(server, texts)
    assert int(counts.max()) <= BATCH_LENGTH
    batches = settled_counter(server, "encoder_batches", before) - before
    assert batches >= len(texts) / ROWS_PER_BATCH  # the planner split by the memory budget
    # the split changes nothing: each text alone gives the same vector
    alone = np.concatenate([infer(server, [t])[0] for t in texts[:3]])
    np.testing.assert_allclose(together[:3], alone, atol=1e-5)


def test_a_text_too_long_for_the_budget_alone_gets_its_own_clear_error(server):
    too_long = texts_of(400, 1)[0]
    with pytest.raises(InferenceServerException) as err:
        infer(server, ["short", too_long])
    message = err.value.message()
    assert "input[1] has" in message and "memory budget" in message, message
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    emb, _ = infer(server, ["short"])  # the server keeps serving
    assert np.isfinite(emb).all()
