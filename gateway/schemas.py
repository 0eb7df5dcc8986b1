"""Request and response bodies, shaped like OpenAI's (hence the ``OpenAI*`` names).

Field types are strict: ``"512"`` or ``512.0`` is not an integer, ``"true"`` is not a boolean,
and unknown fields are rejected (as OpenAI rejects unrecognized arguments).
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

TokenId = Annotated[StrictInt, Field(ge=0)]


class OpenAIEmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's fields plus ``input_type``, ``instruction`` and ``truncate``."""

    model_config = ConfigDict(extra="forbid")

    input: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    model: StrictStr
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None
    # Extensions (docs/gateway.md).
    input_type: Literal["query", "document"] | None = None
    instruction: StrictStr | None = None
    truncate: StrictBool = True


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` in the Cohere / Jina shape, plus ``instruction`` and ``truncate``."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: Annotated[StrictInt, Field(ge=1)] | None = None
    return_documents: StrictBool = False
    # Extensions (docs/rerank.md).
    instruction: StrictStr | None = None
    truncate: StrictBool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


def rerank_response_json(hits, *, model: str, total_tokens: int, return_documents: bool) -> dict[str, object]:
    """``{"results": [{index, relevance_score, document?}], "model", "usage"}``, best first."""
    results: list[dict[str, object]] = []
    for hit in hits:
        item: dict[str, object] = {"index": hit.index, "relevance_score": hit.relevance_score}
        if return_documents:
            item["document"] = {"text": hit.document}
        results.append(item)
    return {"results": results, "model": model,
            "usage": {"prompt_tokens": int(total_tokens), "total_tokens": int(total_tokens)}}


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tritonembed"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def encode_base64(vector: np.ndarray) -> str:
    """One embedding as OpenAI's ``base64`` format: little-endian float32 bytes, base64-encoded
    (what the ``openai`` client decodes with ``np.frombuffer(..., dtype="float32")``)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def embedding_response_json(
    embeddings: np.ndarray, *, model: str, prompt_tokens: int, encoding_format: str
) -> dict[str, object]:
    """The response body as plain JSON types (built directly: a pydantic round trip of 2048 x 4096
    floats would dominate the request's CPU time)."""
    if encoding_format == "base64":
        vectors: list[object] = [encode_base64(row) for row in embeddings]
    else:
        vectors = embeddings.astype(np.float32, copy=False).tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": vector, "index": i} for i, vector in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)},
    }
