"""Response encoding (base64 as the openai client decodes it) and request validation."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from tritonembed.gateway.schemas import OpenAIEmbeddingRequest, embedding_response_json, encode_base64


def vectors() -> np.ndarray:
    rng = np.random.default_rng(3)
    v = rng.standard_normal((3, 768)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_base64_is_little_endian_float32():
    v = np.array([1.0, -2.5, 3.25e-8], dtype=np.float32)
    raw = base64.b64decode(encode_base64(v))
    assert raw == b"".join(np.float32(x).astype("<f4").tobytes() for x in v)
    # big-endian or float64 input is converted, not reinterpreted
    assert encode_base64(v.astype(">f4")) == encode_base64(v) == encode_base64(v.astype(np.float64))


def test_base64_matches_what_the_openai_client_decodes():
    """openai.lib._parsing._embeddings.parse_embedding_response decodes base64 with
    np.frombuffer(base64.b64decode(s), dtype="float32") (or array('f') without numpy) when the
    caller did not choose an encoding_format; it then asked the server for base64."""
    emb = vectors()
    body = embedding_response_json(emb, model="m", prompt_tokens=7, encoding_format="base64")
    for i, item in enumerate(body["data"]):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="float32")
        np.testing.assert_array_equal(decoded, emb[i])

    parsing = pytest.importorskip("openai.lib._parsing._embeddings")
    from openai._models import construct_type
    from openai._types import omit
    from openai.types import CreateEmbeddingResponse

    # the client builds the response object without validation (construct_type), then post-parses it
    response = construct_type(type_=CreateEmbeddingResponse, value=json.loads(json.dumps(body)))
    parsed = parsing.parse_embedding_response(response, encoding_format=omit)
    for i, item in enumerate(parsed.data):
        np.testing.assert_array_equal(np.asarray(item.embedding, dtype=np.float32), emb[i])
    float_body = embedding_response_json(emb, model="m", prompt_tokens=7, encoding_format="float")
    float_parsed = CreateEmbeddingResponse.model_validate(json.loads(json.dumps(float_body)))
    for a, b in zip(parsed.data, float_parsed.data, strict=True):
        assert a.embedding == b.embedding  # base64 == float, exactly


def test_response_shape():
    body = embedding_response_json(vectors()[:2], model="Qwen/Qwen3-Embedding-4B", prompt_tokens=11, encoding_format="float")
    assert body["object"] == "list" and body["model"] == "Qwen/Qwen3-Embedding-4B"
    assert body["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 768 for d in body["data"])
    assert all(isinstance(x, float) for x in body["data"][0]["embedding"])
    json.dumps(body)  # plain JSON types only


@pytest.mark.parametrize(
    "payload",
    [
        {"model": "m", "input": "x"},
        {"model": "m", "input": ["x", "y"]},
        {"model": "m", "input": [1, 2, 3]},
        {"model": "m", "input": [[1, 2], [3]]},
        {"model": "m", "input": "x", "dimensions": 512, "encoding_format": "base64", "user": "u"},
        {"model": "m", "input": "x", "input_type": "query", "instruction": "Find", "truncate": False},
    ],
)
def test_valid_requests(payload):
    OpenAIEmbeddingRequest.model_validate(payload)


@pytest.mark.parametrize(
    "payload",
    [
        {"input": "x"},
        {"model": "m"},
        {"model": 3, "input": "x"},
        {"model": "m", "input": 3},
        {"model": "m", "input": ["x", 1]},
        {"model": "m", "input": [-1]},
        {"model": "m", "input": [[1], ["a"]]},
        {"model": "m", "input": "x", "dimensions": "512"},
        {"model": "m", "input": "x", "dimensions": 512.0},
        {"model": "m", "input": "x", "dimensions": 0},
        {"model": "m", "input": "x", "dimensions": True},
        {"model": "m", "input": "x", "encoding_format": "int8"},
        {"model": "m", "input": "x", "input_type": "passage"},
        {"model": "m", "input": "x", "truncate": "false"},
        {"model": "m", "input": "x", "unknown_field": 1},
    ],
)
def test_invalid_requests(payload):
    with pytest.raises(ValidationError):
        OpenAIEmbeddingRequest.model_validate(payload)
