"""tritonembed.client against a real tritonserver (fixtures from tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tritonembed.client import (
    AsyncEmbeddingClient,
    ConnectionFailed,
    EmbeddingClient,
    InvalidArgument,
    ModelNotFound,
    RetryPolicy,
    Timeout,
)
from tritonembed.launcher import free_port
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration

TEXTS = [
    "How are you today?",
    "Triton batches requests from many clients into one forward pass.",
    "短い文",
    "A much longer passage about embeddings, " * 12,
    "x",
]
ATOL = 1e-5


def renorm(v: np.ndarray, d: int) -> np.ndarray:
    s = v[:, :d]
    return s / np.linalg.norm(s, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def grpc_client(triton):
    with EmbeddingClient(triton.grpc_url, retry=RetryPolicy(max_retries=1, initial_backoff=0.01)) as client:
        yield client


def test_discovers_models_and_spec(triton, grpc_client):
    served = {m.name: m for m in grpc_client.models()}
    assert set(served) == {s.name for s in triton.specs.values()}
    for key, spec in triton.specs.items():
        info = grpc_client.model_info(spec.name)
        assert info.spec == spec == ModelSpec.load(triton.export_dirs[key])
        assert info.max_batch_size > 1
        assert served[spec.name] == info
    with pytest.raises(InvalidArgument, match="several"):
        EmbeddingClient(triton.grpc_url).model_info()  # two models served: a name is needed
    with EmbeddingClient(triton.grpc_url, model=triton.specs["qwen"].name) as client:
        assert client.spec == triton.specs["qwen"] and client.max_batch_size == served[client.model].max_batch_size
        assert client.is_ready()
        assert not client.is_ready("no-such-model")


@pytest.mark.parametrize("key", ["minilm", "qwen"])
def test_matches_reference(triton, reference, grpc_client, key):
    spec = triton.specs[key]
    got = grpc_client.embed(TEXTS, model=spec.name)
    want = reference(key, TEXTS)
    assert got.shape == (len(TEXTS), spec.hidden_size) and got.dtype == np.float32
    cos = (got * want).sum(1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999


def test_queries_use_the_default_instruction(triton, reference, grpc_client):
    spec = triton.specs["qwen"]
    assert spec.default_query_instruction
    query = grpc_client.embed(TEXTS[:2], model=spec.name, input_type="query")
    explicit = grpc_client.embed(TEXTS[:2], model=spec.name, instruction=spec.default_query_instruction)
    np.testing.assert_allclose(query, explicit, atol=ATOL)
    want = reference("qwen", TEXTS[:2], instruction=spec.default_query_instruction)
    assert ((query * want).sum(1) / np.linalg.norm(want, axis=1)).min() >= 0.99999
    other = grpc_client.embed(TEXTS[:2], model=spec.name, instruction="Find code that answers the question")
    assert np.abs(other - query).max() > 1e-3
    document = grpc_client.embed(TEXTS[:2], model=spec.name, input_type="document")
    np.testing.assert_allclose(document, grpc_client.embed(TEXTS[:2], model=spec.name), atol=ATOL)


def test_matryoshka_slices_the_full_embedding(triton, grpc_client):
    spec = triton.specs["qwen"]
    full = grpc_client.embed(TEXTS, model=spec.name)
    for d in (768, 512, spec.dimension_range[0]):
        got = grpc_client.embed(TEXTS, model=spec.name, dimensions=d)
        assert got.shape == (len(TEXTS), d)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=ATOL)
        np.testing.assert_allclose(got, renorm(full, d), atol=ATOL)
    raw = grpc_client.embed(TEXTS, model=spec.name, dimensions=512, normalize=False)
    np.testing.assert_allclose(raw, full[:, :512], atol=ATOL)
    for bad in (0, spec.dimension_range[0] - 1, spec.hidden_size + 1, 512.0):
        with pytest.raises(InvalidArgument, match="dimensions"):
            grpc_client.embed(TEXTS, model=spec.name, dimensions=bad)
    minilm = triton.specs["minilm"]
    assert not minilm.matryoshka
    with pytest.raises(InvalidArgument, match="force_dimensions"):
        grpc_client.embed(TEXTS, model=minilm.name, dimensions=256)
    forced = grpc_client.embed(TEXTS, model=minilm.name, dimensions=256, force_dimensions=True)
    np.testing.assert_allclose(forced, renorm(grpc_client.embed(TEXTS, model=minilm.name), 256), atol=ATOL)


def test_token_counts_are_the_tokenizers(triton, grpc_client):
    from tokenizers import Tokenizer

    spec = triton.specs["qwen"]
    tok = Tokenizer.from_file(str(triton.export_dirs["qwen"] / spec.tokenizer_file))
    result = grpc_client.embed_with_usage(TEXTS, model=spec.name)
    assert result.token_counts.tolist() == [len(tok.encode(t).ids) for t in TEXTS]
    assert result.total_tokens == sum(len(tok.encode(t).ids) for t in TEXTS)
    long_text = "token " * (spec.max_length + 50)
    assert grpc_client.embed_with_usage([long_text], model=spec.name).token_counts.tolist() == [spec.max_length]


def test_ten_thousand_texts_come_back_in_order(triton, grpc_client):
    from tokenizers import Tokenizer

    spec = triton.specs["minilm"]
    tok = Tokenizer.from_file(str(triton.export_dirs["minilm"] / spec.tokenizer_file))
    tok.no_padding()
    texts = [("w " * (i % 7)) + str(i) for i in range(10_000)]  # short: the test is about order, not load
    result = grpc_client.embed_with_usage(texts, model=spec.name)
    assert result.embeddings.shape == (10_000, spec.hidden_size)
    # token counts vary with i % 7: any misplaced row shows up here
    assert result.token_counts.tolist() == [len(e.ids) for e in tok.encode_batch(texts)]
    sample = sorted(np.random.default_rng(0).choice(10_000, 40, replace=False).tolist())
    alone = grpc_client.embed([texts[i] for i in sample], model=spec.name)
    np.testing.assert_allclose(result.embeddings[sample], alone, atol=ATOL)


def test_sync_async_grpc_http_identical(triton):
    spec = triton.specs["qwen"]
    texts = [f"sentence {i} " + "pad " * (i % 9) for i in range(150)]  # several chunks
    results = {}
    for url in (triton.grpc_url, f"http://{triton.http_url}"):
        with EmbeddingClient(url, spec.name, max_concurrency=3) as client:
            results[("sync", client.protocol)] = client.embed_with_usage(texts, dimensions=512)

        async def run(url=url):
            async with AsyncEmbeddingClient(url, spec.name, max_concurrency=3) as client:
                return client.protocol, await client.embed_with_usage(texts, dimensions=512)

        protocol, result = asyncio.run(run())
        results[("async", protocol)] = result
    assert set(results) == {("sync", "grpc"), ("sync", "http"), ("async", "grpc"), ("async", "http")}
    base = results[("sync", "grpc")]
    for key, result in results.items():
        np.testing.assert_allclose(result.embeddings, base.embeddings, atol=ATOL, err_msg=str(key))
        assert result.token_counts.tolist() == base.token_counts.tolist(), key


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_errors_from_the_server(triton, protocol):
    spec = triton.specs["qwen"]
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with EmbeddingClient(url, spec.name, protocol=protocol, retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(InvalidArgument, match="empty"):
            client.embed(["fine", "   "])  # blank: refused locally by the blank rule (the server refuses it too)
        with pytest.raises(InvalidArgument, match=rf"\d+ tokens.*{spec.max_length}|{spec.max_length}.*\d+ tokens"):
            client.embed(["fine", "token " * (spec.max_length + 10)], truncate=False)
        with pytest.raises(InvalidArgument, match="empty"):
            client.embed([""])  # refused locally
        with pytest.raises(ModelNotFound):
            client.embed(["x"], model="no-such-model")
        assert client.embed(["still works"]).shape == (1, spec.hidden_size)


def test_unreachable_server_and_timeout(triton):
    port = free_port()
    for url in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        with EmbeddingClient(url, "m", retry=RetryPolicy(max_retries=1, initial_backoff=0.01)) as client:
            with pytest.raises(ConnectionFailed):
                client.embed(["x"])
            assert not client.is_ready()

    async def unreachable():
        async with AsyncEmbeddingClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_retries=0)) as client:
            await client.embed(["x"])

    with pytest.raises(ConnectionFailed):
        asyncio.run(unreachable())
    spec = triton.specs["qwen"]
    with EmbeddingClient(triton.grpc_url, spec.name, timeout=0.001) as client:
        with pytest.raises(Timeout):
            client.embed(["a long text to embed " * 40] * 16)
