"""Check an exported ONNX encoder against a reference: names, then shapes, then values.

Failures are collected, not raised one by one, so a report shows everything that is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.model_repository.tokenization import SpecTokenizer, pad_batch
from tritonembed.spec import ModelSpec, encoder_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """How close ``actual`` is to ``expected`` row by row."""

    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    finite: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(actual: np.ndarray, expected: np.ndarray) -> Comparison:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    finite = bool(np.isfinite(actual).all())
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} != {expected.shape}")
    if not finite:
        return Comparison(float("inf"), float("-inf"), float("-inf"), False)
    num = (actual * expected).sum(axis=1)
    den = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    cos = num / np.maximum(den, 1e-30)
    return Comparison(float(np.abs(actual - expected).max()), float(cos.min()), float(cos.mean()), True)


def cpu_session(model_path: Path, threads: int | None = None, *, low_memory: bool = False):
    """The exporter's ONNX Runtime session: CPU, ``threads`` intra-op threads (default: ONNX Runtime's), errors only
    logged (its optimizer's warnings are about fusions it skips, not about the result).

    ``low_memory``: about one copy of the weights as stored, for checks that must fit the export's budget.
    Weight casts stay casts and run when their weight is used: no graph optimizations (constant folding
    and the fp16 transformers store a float32 copy of every cast weight), the priority-based node order
    (the default order runs every cast first, so all float32 copies are alive at once), and no memory
    arena (it keeps its high-water mark). This is what the validation form of
    :mod:`tritonembed.export.qwen3_graph` needs, and an fp16 graph on a CPU, where ONNX Runtime runs
    float16 MatMuls through float32 casts: the 0.6B shape's fp16 graph peaked at +1.6 GiB in a run instead
    of +2.9 GiB. Outputs agree within float rounding (no fused kernels); runs are slower.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if low_memory:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """An ONNX Runtime session on an exported model, fed by the serving tokenizer."""

    def __init__(self, model_path: Path, tokenizer: SpecTokenizer, threads: int | None = None, *,
                 low_memory: bool = False) -> None:
        self.session = cpu_session(model_path, threads, low_memory=low_memory)
        self.tokenizer = tokenizer
        self.output_name = tokenizer.spec.outputs[0].encoder_name

    def run_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def embed(self, texts: Sequence[str], padding_side: str | None = None, batch_size: int = 32) -> np.ndarray:
        out = []
        spec = self.tokenizer.spec
        for start in range(0, len(texts), batch_size):
            ids = self.tokenizer.encode(texts[start:start + batch_size]).ids
            input_ids, mask = pad_batch(ids, spec.pad_token_id, padding_side or spec.padding_side)
            out.append(self.run_ids(input_ids, mask))
        return np.concatenate(out, axis=0)


def check_signature(encoder: OnnxEncoder, spec: ModelSpec) -> list[str]:
    """Names and dtypes of the graph's inputs/outputs against the spec."""
    failures = []
    got_inputs = [(i.name, i.type) for i in encoder.session.get_inputs()]
    want_inputs = [(t.name, "tensor(int64)") for t in encoder_inputs()]
    if got_inputs != want_inputs:
        failures.append(f"graph inputs {got_inputs} != spec {want_inputs}")
    got_outputs = [(o.name, o.type) for o in encoder.session.get_outputs()]
    want_outputs = [(t.name, "tensor(float)") for t in spec.encoder_outputs]
    if got_outputs != want_outputs:
        failures.append(f"graph outputs {got_outputs} != spec {want_outputs}")
    return failures


def mixed_padding_run(encoder: OnnxEncoder, texts: Sequence[str]) -> np.ndarray:
    """One batch where even rows are left-padded and odd rows right-padded."""
    spec = encoder.tokenizer.spec
    ids = encoder.tokenizer.encode(texts).ids
    length = max(len(x) for x in ids)
    left_ids, left_mask = pad_batch(ids, spec.pad_token_id, "left", length)
    right_ids, right_mask = pad_batch(ids, spec.pad_token_id, "right", length)
    rows = np.arange(len(ids)) % 2 == 1
    input_ids = np.where(rows[:, None], right_ids, left_ids)
    mask = np.where(rows[:, None], right_mask, left_mask)
    return encoder.run_ids(input_ids, mask)


def validate_against_reference(
    encoder: OnnxEncoder, reference: np.ndarray, texts: Sequence[str], *, atol: float, min_cosine: float,
    padding_layouts: Sequence[str] = ("left", "right", "mixed"), invariance_atol: float = 1e-5,
) -> tuple[dict[str, Any], list[str]]:
    """Compare the ONNX model with reference embeddings under every padding layout.

    Returns ``(measurements, failures)``; an empty failure list means the export is valid.
    """
    spec = encoder.tokenizer.spec
    failures = check_signature(encoder, spec)
    if failures:
        return {}, failures
    results: dict[str, Any] = {}
    layouts = {
        "left": lambda: encoder.embed(texts, padding_side="left", batch_size=len(texts)),
        "right": lambda: encoder.embed(texts, padding_side="right", batch_size=len(texts)),
        "mixed": lambda: mixed_padding_run(encoder, texts),
    }
    runs = {f"batched_{spec.padding_side}_padding": layouts[spec.padding_side]()}
    runs.update({f"batched_{name}_padding": layouts[name]() for name in padding_layouts if name != spec.padding_side})
    for name, actual in runs.items():
        if actual.shape != reference.shape:
            failures.append(f"{name}: output shape {actual.shape} != reference {reference.shape}")
            continue
        cmp = compare(actual, reference)
        results[name] = cmp.to_dict()
        if not cmp.finite:
            failures.append(f"{name}: NaN or Inf in the output")
        elif cmp.max_abs_diff > atol or cmp.min_cosine < min_cosine:
            failures.append(
                f"{name}: max |diff| {cmp.max_abs_diff:.3g} (atol {atol:g}), min cosine {cmp.min_cosine:.7f} (need >= {min_cosine})"
            )
    single = np.concatenate([encoder.embed([t], batch_size=1) for t in texts], axis=0)
    batched = runs[f"batched_{spec.padding_side}_padding"]
    invariance = float(np.abs(single - batched).max())
    results["batch_invariance_max_abs_diff"] = invariance
    if not invariance <= invariance_atol:
        failures.append(f"batch invariance: single vs batched max |diff| {invariance:.3g} > {invariance_atol:g}")
    return results, failures
