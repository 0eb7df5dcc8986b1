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


# gRPC's default reconnect backoff (1 s, x1.6, up to 120 s) left the channel in backoff for 39-55 s
# after a restarted Triton was ready; capped at 1 s, a channel reconnects within about a second.
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 250, "grpc.min_reconnect_backoff_ms": 250,
                        "grpc.max_reconnect_backoff_ms": 1000}


def grpc_channel_args() -> list[tuple[str, Any]]:
    """The options tritonclient sets by default (its message size and ``KeepAliveOptions`` defaults;
    passing ``channel_args`` replaces them all) plus a short reconnect backoff."""
    size = 2**31 - 1  # tritonclient's MAX_GRPC_MESSAGE_SIZE
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", size),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", False),
        ("grpc.http2.max_pings_without_data", 2),
        *RECONNECT_BACKOFF_MS.items(),
    ]


def infer_inputs(module: ModuleType, tensors: Sequence[TensorData]) -> list[Any]:
    """Wrap protocol-neutral tensors in the protocol's ``InferInput``."""
    inputs = []
    for tensor in tensors:
        infer_input = module.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
        infer_input.set_data_from_numpy(tensor.data)
        inputs.append(infer_input)
    return inputs


def requested_outputs(module: ModuleType, output_name: str = EMBEDDING_OUTPUT_NAME) -> list[Any]:
    return [module.InferRequestedOutput(output_name), module.InferRequestedOutput(TOKEN_COUNT.name)]


def output_arrays(result: Any, output_name: str = EMBEDDING_OUTPUT_NAME) -> tuple[Any, Any]:
    """``(output, TOKEN_COUNT)`` from an ``InferResult`` (None where an output is missing)."""
    return result.as_numpy(output_name), result.as_numpy(TOKEN_COUNT.name)


def config_kwargs(protocol: str) -> dict[str, Any]:
    """Extra arguments that make ``get_model_config`` / ``get_model_repository_index`` return JSON."""
    return {"as_json": True} if protocol == "grpc" else {}
