"""The error tree shared by the offline side (export) and the serving side (repository, launcher).

Client-side errors live in :mod:`tritonembed.client.errors`; they do not derive from these so the
client stays importable without anything else.
"""

from __future__ import annotations


class TritonEmbedError(Exception):
    """Base of every error this package raises on purpose."""


class SpecError(TritonEmbedError):
    """A model spec (``tritonembed.json``) is missing, malformed or inconsistent."""


class ModelResolutionError(TritonEmbedError):
    """A model id or path could not be resolved to a local Hugging Face directory."""


class UnsupportedModelError(TritonEmbedError):
    """The checkpoint's architecture belongs to no declared model family."""


class ExportError(TritonEmbedError):
    """The ONNX export itself failed."""


class QuantizationError(ExportError):
    """A quantized variant could not be produced."""


class ValidationError(TritonEmbedError):
    """The exported ONNX model does not match the PyTorch reference within tolerance."""

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        self.failures = list(failures or [])
        detail = "".join(f"\n  - {f}" for f in self.failures)
        super().__init__(message + detail)


class OutputExistsError(TritonEmbedError):
    """The output directory exists and ``--overwrite`` was not given."""


class RepositoryError(TritonEmbedError):
    """A Triton model repository could not be assembled."""


class CacheError(TritonEmbedError):
    """The export cache cannot be read or cleaned."""


class LaunchError(TritonEmbedError):
    """tritonserver (or the gateway) could not be started or died."""


class InputError(TritonEmbedError):
    """One request's input is invalid (empty text, bad UTF-8, too long with truncation off)."""
