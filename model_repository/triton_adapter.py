"""Small helpers shared by the Python-backend models; imports Triton's utils lazily.

``triton_python_backend_utils`` exists only inside the Triton stub, so the model modules import
through here and stay importable (and testable) outside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

try:  # inside tritonserver's Python backend
    import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
except ImportError:  # unit tests, tooling
    pb_utils = None

log = logging.getLogger("tritonembed.model_repository")


def version_dir(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def error_response(message: str, *, invalid_arg: bool = True):
    """An InferenceResponse carrying an error (INVALID_ARG where this Triton supports codes)."""
    try:
        code = pb_utils.TritonError.INVALID_ARG if invalid_arg else pb_utils.TritonError.INTERNAL
        err = pb_utils.TritonError(message, code)
    except (AttributeError, TypeError):  # older python_backend: message only
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=err)


def optional_input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class Counters:
    """Prometheus counters published on Triton's metrics endpoint (no-ops where unsupported)."""

    def __init__(self, model_name: str, names: dict[str, str]) -> None:
        self._metrics: dict[str, Any] = {}
        self._families: list[Any] = []  # must outlive their Metric objects
        family_cls = getattr(pb_utils, "MetricFamily", None)
        if family_cls is None:
            return
        for key, description in names.items():
            family = family_cls(name=f"tritonembed_{key}", description=description, kind=family_cls.COUNTER)
            self._families.append(family)
            self._metrics[key] = family.Metric(labels={"model": model_name})

    def add(self, key: str, value: float) -> None:
        metric = self._metrics.get(key)
        if metric is not None and value:
            metric.increment(float(value))
