"""Reranker export: the graph of :class:`~tritonembed.export.families.Qwen3RerankerFamily`, checked against
the Qwen3-Reranker model card's own usage code.

:func:`official_scores` is that code (tokenizer padding left, the body truncated to ``max_length`` minus
the prefix and suffix, ``log_softmax`` over the ``no`` / ``yes`` logits of the last position): it keeps its
own copy of the prompt, so a wrong template in the spec fails validation. :func:`export_reranker` traces
the graph (one ``score`` per pair = ``logit(yes) - logit(no)``), then checks P(yes) = sigmoid(score) on
probe pairs (multilingual, one long document cut at ``max_length``) under left, right and mixed padding
and one pair at a time (batch invariance), and writes the folder atomically like ``export_model``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tritonembed.errors import ExportError, ValidationError
from tritonembed.export.families import ExportOptions, family_for, read_json
from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
from tritonembed.export.resolve import resolve_model
from tritonembed.spec import ModelSpec

log = logging.getLogger(__name__)

#: Probe pairs: English, Chinese, German, an instruction-less pair and a document longer than any limit.
PROBE_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("Explain gravity", "Gravity is a force that attracts two bodies towards each other."),
    ("中国的首都是哪里？", "北京是中华人民共和国的首都，也是政治和文化中心。"),
    ("Wie hoch ist die Zugspitze?", "Die Zugspitze ist mit 2962 m der höchste Berg Deutschlands."),
    ("short", "x"),
)


def long_document(words: int = 4000) -> str:
    """A document far past 8,192 tokens, mixing scripts, so truncation is exercised."""
    parts = ["reranking", "long", "documents", "之", "长", "文档", "Überprüfung", "émission"]
    return " ".join(parts[i % len(parts)] + str(i % 97) for i in range(words))


def detect_task(model_id: str, config: dict) -> str:
    """``rerank`` when the checkpoint says so unambiguously (its id names a reranker, or a random test
    model is marked so), else ``embed``."""
    if config.get("tritonembed_random_task") == "rerank" or "reranker" in model_id.lower().rsplit("/", 1)[-1]:
        return "rerank"
    return "embed"


def official_scores(path: Path, queries: Sequence[str], documents: Sequence[str], instruction: str | None = None,
                    max_length: int = 8192, batch_size: int = 8) -> np.ndarray:
    """P(yes) per pair, computed as the Qwen3-Reranker model card does (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)

    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(pairs):
        inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                           max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
        return tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)

    @torch.no_grad()
    def compute_logits(inputs):
        batch_scores = model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, token_true_id]
        false_vector = batch_scores[:, token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    pairs = [format_instruction(instruction, q, d) for q, d in zip(queries, documents, strict=True)]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        scores.extend(compute_logits(process_inputs(pairs[start:start + batch_size])))
    return np.asarray(scores, dtype=np.float64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


class OnnxReranker:
    """An ONNX Runtime session on an exported reranker, fed by the serving :class:`PairTokenizer`."""

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        from tritonembed.export.validate import cpu_session
        from tritonembed.model_repository.rerank_tokenization import PairTokenizer

        directory = Path(directory)
        self.spec = ModelSpec.load(directory)
        self.tokenizer = PairTokenizer(directory / self.spec.tokenizer_file, self.spec)
        self.session = cpu_session(directory / self.spec.onnx_file, threads)
        self.output_name = self.spec.output("yes_no_logit").encoder_name

    def run_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def scores(self, queries: Sequence[str], documents: Sequence[str], instruction: str | None = None,
               padding: str = "left") -> np.ndarray:
        """Raw scores (logits) of the pairs in one batch; ``padding`` is left, right or mixed (alternating)."""
        from tritonembed.model_repository.tokenization import pad_batch

        ids = self.tokenizer.encode_pairs(queries, documents, [instruction] * len(queries)).ids
        pad = self.spec.pad_token_id
        if padding == "mixed":
            left = pad_batch(ids, pad, "left")
            right = pad_batch(ids, pad, "right")
            odd = (np.arange(len(ids)) % 2 == 1)[:, None]
            input_ids, mask = np.where(odd, right[0], left[0]), np.where(odd, right[1], left[1])
        else:
            input_ids, mask = pad_batch(ids, pad, padding)
        return self.run_ids(input_ids, mask).reshape(-1)


def validate_reranker(directory: Path, source: Path, atol: float, instruction: str | None = None) -> tuple[dict, list[str]]:
    """P(yes) of the export against :func:`official_scores` on :data:`PROBE_PAIRS` + a long document.

    Returns the measurements and the failures (empty when it passed).
    """
    onnx = OnnxReranker(directory)
    queries = [q for q, _ in PROBE_PAIRS] + ["Which words repeat?"]
    documents = [d for _, d in PROBE_PAIRS] + [long_document()]
    # the long pair alone: the official code pads a batch, and padded attention is O(L^2) in PyTorch
    want = np.concatenate([
        official_scores(source, queries[:-1], documents[:-1], instruction, max_length=onnx.spec.max_length),
        official_scores(source, queries[-1:], documents[-1:], instruction, max_length=onnx.spec.max_length)])
    measurements: dict = {"pairs": len(queries), "long_document_tokens": len(
        onnx.tokenizer.encode_pairs(queries[-1:], documents[-1:]).ids[0])}
    failures = []
    for padding in ("left", "right", "mixed"):
        got = sigmoid(onnx.scores(queries, documents, instruction, padding))
        diff = float(np.abs(got - want).max())
        measurements[f"p_yes_max_abs_diff_{padding}"] = diff
        if not np.isfinite(got).all() or diff > atol:
            failures.append(f"P(yes) with {padding} padding differs from the official code by {diff:.3g} > {atol}")
    batched = onnx.scores(queries, documents, instruction)
    alone = np.concatenate([onnx.scores([q], [d], instruction) for q, d in zip(queries, documents, strict=True)])
    measurements["batch_invariance_max_abs_diff"] = float(np.abs(batched - alone).max())
    if measurements["batch_invariance_max_abs_diff"] > atol:
        failures.append(f"scores change with the batch by {measurements['batch_invariance_max_abs_diff']:.3g}")
    return measurements, failures


def export_reranker(model: str, output: Path, *, precision: str = "fp32", max_length: int | None = None,
                    name: str | None = None, overwrite: bool = False, static_shapes: bool = True):
    """Export and validate a reranker into ``output`` (fp32; the report says what was checked).

    Raises:
        ModelResolutionError / UnsupportedModelError / OutputExistsError / ExportError: as ``export_model``;
            ExportError also for a precision other than fp32 (not supported for rerankers yet).
        ValidationError: the graph does not match the official code; ``output`` is left untouched.
    """
    from tritonembed.export.pipeline import (
        ExportReport,
        commit_output,
        copy_tokenizer,
        prepare_output,
    )

    if precision != "fp32":
        raise ExportError(f"rerankers export in fp32 only for now, not {precision}")
    output = prepare_output(output, overwrite)
    started = time.perf_counter()
    resolved = resolve_model(model)
    config = read_json(resolved.path / "config.json")
    family = family_for(config, "rerank")
    spec = family.make_spec(resolved.path, resolved.model_id, config, ExportOptions(precision, max_length, name))
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        report = ExportReport(resolved.model_id, resolved.source, family.name, precision, str(output),
                              bool(spec.extra.get("random_weights")))
        copy_tokenizer(resolved.path, staging, family)
        spec.save(staging)
        log.info("exporting reranker %s to ONNX (fp32)", resolved.model_id)
        export_onnx(build_pooled_encoder(family.load_backbone(resolved.path), spec, family.attention),
                    staging / spec.onnx_file, static_shapes=static_shapes, graph_report=report.graph,
                    output_names=tuple(t.name for t in spec.encoder_outputs))
        report.validation, failures = validate_reranker(staging, resolved.path, family.fp32_atol)
        report.failures.extend(f"fp32: {f}" for f in failures)
        report.export_seconds = round(time.perf_counter() - started, 2)
        report.files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        report.save(staging)
        if not report.passed:
            raise ValidationError(f"export of reranker {model} failed validation", report.failures)
        commit_output(staging, output)
        log.info("exported reranker %s to %s in %.1fs", model, output, report.export_seconds)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)



def resolve_task(model: str, task: str = "auto") -> str:
    """``task`` itself, or for ``auto`` the task :func:`detect_task` reads from the checkpoint.

    Raises:
        ModelResolutionError / ExportError: ``auto`` and the model cannot be found or has no config.json.
    """
    if task != "auto":
        return task
    resolved = resolve_model(model)
    return detect_task(resolved.model_id, read_json(resolved.path / "config.json"))
