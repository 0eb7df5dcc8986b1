"""tritonembed.client: embed texts with a model served by Triton (gRPC or HTTP, sync or asyncio).

Imports only numpy, the standard library, :mod:`tritonembed.spec` and (lazily) tritonclient;
never torch or transformers.

>>> from tritonembed.client import EmbeddingClient
>>> with EmbeddingClient("localhost:8001", model="Qwen3-Embedding-4B") as client:  # doctest: +SKIP
...     vectors = client.embed(["a document"], dimensions=768)
...     queries = client.embed(["what is it?"], input_type="query")
"""

from tritonembed.client.aio import AsyncEmbeddingClient
from tritonembed.client.core import EmbeddingResult, ModelInfo, RerankHit, RerankResult, RetryPolicy
from tritonembed.client.errors import (
    ConnectionFailed,
    EmbeddingError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServerError,
    Timeout,
)
from tritonembed.client.replicas import ReplicatedEmbeddingClient
from tritonembed.client.sync import EmbeddingClient

__all__ = [
    "AsyncEmbeddingClient",
    "ConnectionFailed",
    "EmbeddingClient",
    "EmbeddingError",
    "EmbeddingResult",
    "InvalidArgument",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "ReplicatedEmbeddingClient",
    "RerankHit",
    "RerankResult",
    "RetryPolicy",
    "ServerError",
    "Timeout",
]
