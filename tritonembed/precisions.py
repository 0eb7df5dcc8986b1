"""The precisions an export can have: one declaration each, read by the CLI, the exporter, the validator,
the memory model and the Triton configs.

Measured quality and speed of each, and why each default is what it is: ``docs/quantization.md``.
Adding a precision is one :class:`Precision` entry here plus its quantizer in
:mod:`tritonembed.export.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonembed.errors import SpecError


@dataclass(frozen=True)
class Precision:
    """One precision of an exported encoder graph.

    Attributes:
        name: the CLI and ``tritonembed.json`` spelling.
        summary: one line for ``--help``: what it is for.
        weight_bytes: bytes per matrix weight in the served graph.
        compute_bytes: bytes per activation element while it runs (int8 / int4 compute in float32 on CPU).
        min_cosine: the validator's floor on the probe set against the FP32 export; below it a quantized
            export is broken, not just lossy. ``None`` for the reference precision.
        stsb_max_drop: the quality target: STS-B Spearman (x100) drop against FP32, real weights only.
        reduced_gpu_math: TensorRT may build the engine in FP16 (the graph already trades accuracy away).
    """

    name: str
    summary: str
    weight_bytes: float
    compute_bytes: int
    min_cosine: float | None
    stsb_max_drop: float | None
    reduced_gpu_math: bool

    @property
    def quantized(self) -> bool:
        """Whether the graph is derived from the FP32 export by :func:`~tritonembed.export.quantize.quantize_onnx`."""
        return self.min_cosine is not None


_ALL = (
    Precision("fp32", "the reference: float32 weights and compute", 4, 4, None, None, False),
    Precision("fp16", "GPU: float16 weights and compute, norms and pooling in float32", 2, 2, 0.999, 0.1, True),
    Precision("int8", "CPU: int8 weights, per-token int8 activations, 8-bit embedding tables", 1, 4, 0.95, 0.5, True),
    Precision("int4", "memory: 4-bit weight-only MatMulNBits, last layers 8-bit, 4-bit tables", 0.5, 4, 0.90, 2.0,
              True),
)
BY_NAME: dict[str, Precision] = {p.name: p for p in _ALL}
#: Every precision, the reference first.
NAMES: tuple[str, ...] = tuple(BY_NAME)
#: The precisions a quantizer derives from the FP32 graph.
QUANTIZED: tuple[str, ...] = tuple(p.name for p in _ALL if p.quantized)


def precision(name: str) -> Precision:
    """The declaration of ``name``.

    Raises:
        SpecError: ``name`` is not a precision.
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise SpecError(f"precision {name!r} is not one of {', '.join(NAMES)}") from None


def help_text() -> str:
    """The ``--precision`` help line: every precision and what it is for."""
    return "; ".join(f"{p.name}: {p.summary}" for p in _ALL) + " (docs/quantization.md)"
