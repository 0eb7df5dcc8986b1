"""tritonclient glue shared by the sync and async shells: lazy imports and tensor wrapping.

tritonclient is imported here, lazily, and nowhere else in the package's import path; a missing
install fails with a message naming the pip extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from tritonembed.client.core import TensorData
from tritonembed.spec import EMBEDDING_OUTPUT_NAME, TOKEN_COUNT

_MODULES = {
    ("grpc", False): "tritonclient.grpc",
    ("grpc", True): "tritonclient.grpc.aio",
    ("http", False): "tritonclient.http",
    ("http", True): "tritonclient.http.aio",
}


def import_protocol(protocol: str, *, aio: bool) -> ModuleType:
    """``tritonclient.{grpc,http}[.aio]``.

    Raises:
        ImportError: tritonclient (or the protocol's extra) is not installed.
    """
    name = _MODULES[(protocol, aio)]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"{name} is not installed ({exc}); install it with `pip install 'tritonembed[client]'` "
            f"(tritonclient[grpc,http])"
        ) from exc


def infer_inputs(module: ModuleType, tensors: Sequence[TensorData]) -> list[Any]:
    """Wrap protocol-neutral tensors in the protocol's ``InferInput``."""
    inputs = []
    for tensor in tensors:
        infer_input = module.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
        infer_input.set_data_from_numpy(tensor.data)
        inputs.append(infer_input)
    return inputs


def requested_outputs(module: ModuleType) -> list[Any]:
    return [module.InferRequestedOutput(EMBEDDING_OUTPUT_NAME), module.InferRequestedOutput(TOKEN_COUNT.name)]


def output_arrays(result: Any) -> tuple[Any, Any]:
    """``(EMBEDDING, TOKEN_COUNT)`` from an ``InferResult`` (None where an output is missing)."""
    return result.as_numpy(EMBEDDING_OUTPUT_NAME), result.as_numpy(TOKEN_COUNT.name)


def config_kwargs(protocol: str) -> dict[str, Any]:
    """Extra arguments that make ``get_model_config`` / ``get_model_repository_index`` return JSON."""
    return {"as_json": True} if protocol == "grpc" else {}
