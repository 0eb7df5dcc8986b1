"""Overload: a server with a tiny queue refuses the excess fast, answers the rest correctly, and stays healthy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonembed.client import EmbeddingClient
from tritonembed.client.errors import Overloaded
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_queue_server(minilm_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    options = ServingOptions(profile="cpu", intra_op_threads=1, max_queue_size=2, encoder_max_batch=64,
                             tokenizer_max_batch=64, max_texts_per_request=64)
    [spec] = build_repository(root / "models", [minilm_export], options)
    with TritonServer(root / "models", log_file=root / "tritonserver.log") as server:
        yield server, spec


def _request(client, name, texts):
    arr = np.array([[t.encode()] for t in texts], dtype=object)
    inp = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    try:
        return client.infer(name, [inp]).as_numpy("EMBEDDING")
    except InferenceServerException as exc:
        return exc


def test_flood_is_refused_fast_and_the_rest_is_answered(small_queue_server):
    server, spec = small_queue_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    texts = [f"request {i}: " + "a fairly long sentence about nothing in particular " * 4 for i in range(64)]
    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(lambda _: _request(client, spec.name, texts), range(48)))
    refused = [r for r in results if isinstance(r, InferenceServerException)]
    answered = [r for r in results if not isinstance(r, InferenceServerException)]
    assert refused, "48 concurrent requests against a queue of 2 must be refused in part"
    assert answered, "the requests that got in must be answered"
    for exc in refused:
        assert "queue" in exc.message().lower(), exc.message()
        assert exc.status() in ("StatusCode.UNAVAILABLE", "UNAVAILABLE"), exc.status()
    expected = _request(client, spec.name, texts)
    for got in answered:
        assert np.abs(got - expected).max() <= 1e-5
    assert client.is_server_ready() and client.is_model_ready(spec.name)
    client.close()


def test_client_maps_refusal_to_overloaded_and_retries(small_queue_server):
    server, spec = small_queue_server
    texts = ["overload " * 30] * 64
    with EmbeddingClient(server.grpc_url, model=spec.name) as client:
        expected = client.embed(texts[:1])[0]
        # retries with capped backoff ride out most of the flood; what is still refused is Overloaded
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(lambda _: _safe(client.embed, texts), range(16)))
    assert all(isinstance(o, (np.ndarray, Overloaded)) for o in outcomes), outcomes
    answered = [o for o in outcomes if isinstance(o, np.ndarray)]
    assert answered
    for got in answered:
        assert got.shape == (64, spec.hidden_size) and np.abs(got - expected).max() <= 1e-5


def _safe(fn, *args):
    try:
        return fn(*args)
    except Overloaded as exc:
        return exc
