"""``tritonembed serve CHECKPOINT --task rerank`` end to end: the reranker checkpoint is exported on first use
and served beside an embedder; ``POST /v1/rerank`` equals the model card's code, and the OpenAI embedding
route (the real ``openai`` client) keeps working."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from openai import OpenAI

from tests.integration.serve_process import ServeProcess
from tritonembed.export.rerank import official_scores
from tritonembed.export.testmodels import create_random_qwen3_reranker
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration

NAME = "Qwen3-Reranker-tiny"
QUERY = "Where is the Eiffel tower?"
DOCUMENTS = ["Bananas are yellow.", "The Eiffel Tower is in Paris, on the Champ de Mars.", "埃菲尔铁塔位于巴黎。"]


def test_serve_exports_the_reranker_on_first_use_and_serves_it_beside_an_embedder(minilm_export, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONEMBED_CACHE", str(tmp_path / "cache"))  # serve's export cache, inherited by serve
    checkpoint = create_random_qwen3_reranker(tmp_path / "ckpt" / NAME, "tiny")
    want = official_scores(checkpoint, [QUERY] * len(DOCUMENTS), DOCUMENTS, None)
    embedder = ModelSpec.load(minilm_export).name
    with ServeProcess([minilm_export, checkpoint], tmp_path / "serve", extra=("--task", "rerank")) as serve:
        base = serve.gateway_url.removesuffix("/v1")
        body = {"model": NAME, "query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": True}
        answer = httpx.post(f"{base}/v1/rerank", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [r["index"] for r in results] == list(np.argsort(-want, kind="stable")[:2])
        for r in results:
            assert abs(r["relevance_score"] - want[r["index"]]) <= 1e-4
            assert r["document"]["text"] == DOCUMENTS[r["index"]]
        bad = httpx.post(f"{base}/v1/rerank", json={**body, "documents": []}, timeout=60)
        assert bad.status_code == 400 and "documents" in bad.text

        openai = OpenAI(base_url=serve.gateway_url, api_key="unused", max_retries=0)
        vectors = openai.embeddings.create(model=embedder, input=["hello", "world"]).data
        assert len(vectors) == 2 and abs(np.linalg.norm(vectors[0].embedding) - 1) < 1e-5
        assert "exporting reranker" in serve.text()
