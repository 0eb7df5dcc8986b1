"""A Qwen3-Reranker look-alike served by a real tritonserver beside MiniLM: the client's rerank() against
the model card's usage code, side-by-side embeddings, and the errors a bad request gets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tritonembed.client import AsyncEmbeddingClient, EmbeddingClient, InvalidArgument
from tritonembed.export.rerank import export_reranker, long_document, official_scores
from tritonembed.export.testmodels import create_random_qwen3_reranker
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions

log = logging.getLogger(__name__)
NAME = "Qwen3-Reranker-tiny"
QUERY = "Where is the Eiffel tower?"
DOCUMENTS = ["The Eiffel Tower is in Paris, on the Champ de Mars.", "埃菲尔铁塔位于巴黎。", "Bananas are yellow.",
             "Der Eiffelturm steht in Paris.", long_document(3000), "A tower of cards."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return create_random_qwen3_reranker(tmp_path_factory.mktemp("ckpt") / NAME, "tiny")


@pytest.fixture(scope="module")
def served(checkpoint, minilm_export, tmp_path_factory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("rerank-triton")
    export_reranker(str(checkpoint), root / "reranker")
    build_repository(root / "models", [root / "reranker", minilm_export], ServingOptions(profile="cpu", intra_op_threads=2))
    server = TritonServer(root / "models", log_file=root / "tritonserver.log")
    with server:
        yield server
    log.info("tritonserver log tail:\n%s", server.log_tail(20))


@pytest.fixture(scope="module")
def official(checkpoint):
    def scores(instruction=None):
        return np.concatenate([official_scores(checkpoint, [QUERY] * 4, DOCUMENTS[:4], instruction),
                               official_scores(checkpoint, [QUERY], DOCUMENTS[4:5], instruction),
                               official_scores(checkpoint, [QUERY], DOCUMENTS[5:], instruction)])
    return scores


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_rerank_equals_the_official_code_sorted_and_cut_to_top_n(served, official, protocol):
    want = official()
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with EmbeddingClient(url, model=NAME, protocol=protocol, batch_size=4) as client:  # two requests
        result = client.rerank(QUERY, DOCUMENTS)
        top = client.rerank(QUERY, DOCUMENTS, top_n=2)
    assert [h.index for h in result.results] == sorted(range(len(DOCUMENTS)), key=lambda i: (-want[i], i))
    np.testing.assert_allclose([h.relevance_score for h in result.results], np.sort(want)[::-1], atol=1e-4, rtol=0)
    assert [h.document for h in result.results] == [DOCUMENTS[h.index] for h in result.results]
    assert top.results == result.results[:2] and result.model == NAME
    assert result.token_counts[4] == 8192 and result.total_tokens > 8192


def test_async_client_with_an_instruction(served, official):
    instruction = "Given a question, find a passage in any language that answers it"
    want = official(instruction)

    async def run():
        async with AsyncEmbeddingClient(served.grpc_url, model=NAME) as client:
            return await client.rerank(QUERY, DOCUMENTS, instruction=instruction, top_n=len(DOCUMENTS))

    got = {h.index: h.relevance_score for h in asyncio.run(run()).results}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], want, atol=1e-4, rtol=0)


def test_embeddings_keep_working_beside_the_reranker(served, minilm_export):
    from tritonembed.spec import ModelSpec

    name = ModelSpec.load(minilm_export).name
    with EmbeddingClient(served.grpc_url) as client:
        vectors = client.embed(["a sentence", "another one"], model=name)
        assert vectors.shape == (2, 384)
        with pytest.raises(InvalidArgument, match="not a reranker"):
            client.rerank("q", ["d"], model=name)
        with pytest.raises(InvalidArgument, match="embed"):
            client.embed(["x"], model=NAME)


@pytest.mark.parametrize("call, match", [
    (lambda c: c.rerank("  ", ["d"]), "query"),
    (lambda c: c.rerank("q", []), "documents"),
    (lambda c: c.rerank("q", ["d", " "]), r"documents\[1\]"),
    (lambda c: c.rerank("q", ["d"], top_n=0), "top_n"),
    (lambda c: c.rerank("q", ["d", long_document(3000)], truncate=False), r"documents\[1\].*truncation is disabled"),
])
def test_bad_requests_are_invalid_arguments(served, call, match):
    with EmbeddingClient(served.grpc_url, model=NAME) as client, pytest.raises(InvalidArgument, match=match):
        call(client)


# --- the gateway: POST /v1/rerank in the Cohere / Jina shape, beside /v1/embeddings ------------
@pytest.fixture(scope="module")
def gateway(served):
    from tritonembed.gateway import BackgroundGateway, GatewaySettings

    settings = GatewaySettings(triton_url=served.grpc_url, port=0, max_inputs=8, log_level="warning")
    with BackgroundGateway(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def http(gateway):
    import httpx

    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client


def test_gateway_rerank_agrees_with_the_client_and_honours_top_n_and_documents(served, http):
    body = {"model": NAME, "query": QUERY, "documents": DOCUMENTS[:3] + [{"text": DOCUMENTS[3]}], "top_n": 3,
            "return_documents": True}
    answer = http.post("/v1/rerank", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    with EmbeddingClient(served.grpc_url, model=NAME) as client:
        want = client.rerank(QUERY, DOCUMENTS[:4], top_n=3)
    assert [(r["index"], r["document"]["text"]) for r in data["results"]] == [(h.index, h.document) for h in want.results]
    np.testing.assert_allclose([r["relevance_score"] for r in data["results"]],
                               [h.relevance_score for h in want.results], atol=1e-6, rtol=0)
    assert data["model"] == NAME and data["usage"]["total_tokens"] == want.total_tokens
    plain = http.post("/rerank", json={"model": NAME, "query": QUERY, "documents": DOCUMENTS[:2]}).json()
    assert len(plain["results"]) == 2 and "document" not in plain["results"][0]


def test_gateway_lists_both_models_and_embeddings_still_work(served, http, minilm_export):
    from tritonembed.spec import ModelSpec

    embedder = ModelSpec.load(minilm_export).name
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {NAME, embedder}
    answer = http.post("/v1/embeddings", json={"model": embedder, "input": ["one", "two"]})
    assert answer.status_code == 200 and len(answer.json()["data"][1]["embedding"]) == 384
    assert http.post("/v1/embeddings", json={"model": NAME, "input": ["x"]}).status_code == 400


@pytest.mark.parametrize("body, status, param", [
    ({"model": NAME, "query": " ", "documents": ["d"]}, 400, "query"),
    ({"model": NAME, "query": "q", "documents": []}, 400, "documents"),
    ({"model": NAME, "query": "q", "documents": ["d", ""]}, 400, "documents[1]"),
    ({"model": NAME, "query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ({"model": NAME, "query": "q", "documents": ["d"] * 9}, 400, "documents"),
    ({"model": "nope", "query": "q", "documents": ["d"]}, 404, "model"),
    ({"model": NAME, "query": "q", "documents": [{"txt": "d"}]}, 400, None),
])
def test_gateway_rerank_errors_use_the_openai_envelope(http, body, status, param):
    answer = http.post("/v1/rerank", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_gateway_refuses_rerank_on_an_embedder(http, minilm_export):
    from tritonembed.spec import ModelSpec

    answer = http.post("/v1/rerank", json={"model": ModelSpec.load(minilm_export).name, "query": "q", "documents": ["d"]})
    assert answer.status_code == 400 and "not a reranker" in answer.json()["error"]["message"]
