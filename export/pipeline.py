"""``tritonembed export``: checkpoint -> validated ONNX artifact directory.

The artifact (one directory) holds ``model.onnx`` (+ ``model.onnx_data`` when > 2 GB), the tokenizer
files, ``tritonembed.json`` (the spec) and ``report.json``. It is built in a temporary sibling
directory and renamed into place only after validation passed, so an interrupted or failed export
leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed import precisions
from tritonembed.artifact import onnx_files, tokenizer_files
from tritonembed.errors import ExportError, OutputExistsError, ValidationError
from tritonembed.export.bert_attention import BertHeads
from tritonembed.export.families import ExportOptions, ModelFamily, family_for, read_json
from tritonembed.export.memory import StageLog, check_resources, release_freed_memory, return_large_blocks_to_os
from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx, inline_small_model
from tritonembed.export.probes import LONG_PROBE_TOKENS, PROBE_TEXTS, long_probe_text
from tritonembed.export.resolve import ResolvedModel, resolve_model
from tritonembed.export.validate import OnnxEncoder, compare, validate_against_reference
from tritonembed.model_repository.tokenization import SpecTokenizer
from tritonembed.spec import INT4_ACTIVATIONS, ModelSpec

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"
# Bumped whenever the same arguments start producing a different export (a new quantization method, a
# graph change): caches keyed on it (``tritonembed serve``) then re-export instead of serving stale files.
# 2: int8 with per-token activation scales. 3: int8 embedding tables as 8-bit blocks. 4: static shapes.
# 5: Qwen3 attention as GroupQueryAttention (memory linear in length); a long-input probe. 6: Qwen3 embedding
# graphs built node by node from the checkpoint (same outputs, bit for bit; fewer nodes). 7: BERT-family attention
# as MultiHeadAttention, with SkipLayerNormalization and BiasGelu.
EXPORT_REVISION = 7
# The long probe (one text of LONG_PROBE_TOKENS) against the reference: the bar for long inputs.
LONG_MIN_COSINE = 0.9999


@dataclass
class ExportReport:
    """What ``report.json`` says: where things are, how close they are, what passed."""

    model_id: str
    source: str
    family: str
    precision: str
    output: str
    random_weights: bool
    export_revision: int = EXPORT_REVISION
    files: dict[str, int] = field(default_factory=dict)
    export_seconds: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)  # what was done to the traced graph (static shapes)
    quantization: dict[str, Any] = field(default_factory=dict)
    stsb: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # per-stage elapsed time and RSS (export/memory.py)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["passed"] = self.passed
        return data

    def save(self, directory: Path) -> Path:
        path = Path(directory) / REPORT_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Raises: OutputExistsError when ``output`` exists and ``overwrite`` is False."""
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def commit_output(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` directory to ``output``, replacing an old one atomically enough."""
    backup = None
    if output.exists():
        backup = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(backup)
    staging.rename(output)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def copy_tokenizer(source: Path, target: Path, family: ModelFamily) -> None:
    family.tokenizer_json(source)  # raises when there is no fast tokenizer
    for path in tokenizer_files(source):
        shutil.copy2(path, target / path.name)


def stsb_scores(embed, precision_label: str) -> dict[str, float]:
    """Spearman x100 on the STS-B dev sets that are present (en, zh)."""
    from tritonembed.export import stsb

    scores = {}
    for lang in ("en", "zh"):
        try:
            pairs = stsb.load_stsb(lang)
        except Exception as exc:  # missing data is reported, not fatal
            log.warning("STS-B %s unavailable: %s", lang, exc)
            continue
        scores[lang] = round(float(stsb.spearman_for(embed, pairs)), 3)
        log.info("STS-B %s Spearman (%s): %.2f", lang, precision_label, scores[lang])
    return scores


def export_model(
    model: str,
    output: Path,
    *,
    precision: str = "fp32",
    max_length: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    run_stsb: bool = True,
    int4_activations: str = "float32",
    static_shapes: bool = True,
) -> ExportReport:
    """Export, validate and (optionally) quantize ``model`` into ``output``.

    ``int4_activations="float16"`` quantizes the fp16 graph instead of the fp32 one, so the int4 model
    computes in float16 between its 4-bit weights: the GPU form (on an H200, 1.49x the float32-activation
    int4's tokens/s at 0.62x the memory; ``docs/benchmarks-gpu.md``). On a CPU keep ``float32``.

    ``static_shapes=False`` keeps the graph as torch traced it, without the constant shape inputs of
    :mod:`tritonembed.export.static_shapes` (faster on the CPU; on a GPU one A/B measured them slower for
    small batches, ``docs/export.md``).

    Raises:
        ModelResolutionError: the model cannot be found.
        UnsupportedModelError: its architecture belongs to no declared family.
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        ExportError: a file is missing/corrupt or the export itself failed.
        ValidationError: the ONNX model does not match the reference; ``output`` is left untouched.
    """
    if precision not in precisions.NAMES:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(precisions.NAMES)}")
    if int4_activations not in INT4_ACTIVATIONS:
        raise ExportError(f"unknown int4 activation type {int4_activations!r}; choose one of {', '.join(INT4_ACTIVATIONS)}")
    output = prepare_output(output, overwrite)
    return_large_blocks_to_os()
    started = time.perf_counter()
    resolved = resolve_model(model)
    config = read_json(resolved.path / "config.json")
    family = family_for(config)
    spec = family.make_spec(resolved.path, resolved.model_id, config, ExportOptions(precision, max_length, name))
    streamed = builds_graph(resolved.path, family, spec, static_shapes)
    check_resources(resolved.path, output.parent, streamed=streamed)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        report = _export_into(staging, resolved, family, spec, run_stsb, int4_activations, static_shapes, streamed)
        report.output = str(output)
        report.export_seconds = round(time.perf_counter() - started, 2)
        report.files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        report.save(staging)
        if not report.passed:
            raise ValidationError(f"export of {model} ({precision}) failed validation", report.failures)
        commit_output(staging, output)
        log.info("exported %s (%s) to %s in %.1fs", model, precision, output, report.export_seconds)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def builds_graph(checkpoint: Path, family: ModelFamily, spec: ModelSpec, static_shapes: bool) -> bool:
    """Whether :func:`write_fp32_graph` builds this export's graph node by node (else it traces it)."""
    from tritonembed.export import qwen3_graph
    from tritonembed.export.checkpoint_tensors import has_safetensors

    if not (static_shapes and family.attention == "gqa" and qwen3_graph.supports(spec) and has_safetensors(checkpoint)):
        return False
    why_not = qwen3_graph.refusal(checkpoint)
    if why_not:
        log.info("tracing the graph instead of building it: %s", why_not)
    return why_not is None


def write_fp32_graph(checkpoint: Path, family: ModelFamily, spec: ModelSpec, output: Path, static_shapes: bool,
                     graph_report: dict[str, Any], build: bool) -> None:
    """The float32 graph of ``checkpoint`` at ``output``; what was built goes into ``graph_report``.

    ``build`` (:func:`builds_graph`): a Qwen3 embedder in safetensors is built node by node, one weight in
    memory at a time (:mod:`tritonembed.export.qwen3_graph`: the same graph as the traced one, bit for bit,
    without two float32 copies of the model); everything else, and ``static_shapes=False`` (the graph as torch
    traces it), is traced.
    """
    from tritonembed.export import qwen3_graph

    if build:
        model = qwen3_graph.build_qwen3_embedding_graph(checkpoint, output, spec)
        from tritonembed.export.attention import graph_attention

        graph_report.update({"builder": qwen3_graph.BUILDER, "attention": graph_attention(model),
                             "static_shapes": {"by_construction": True, "nodes_after": len(model.graph.node)}})
        return
    bert_heads = BertHeads.of_checkpoint(checkpoint) if family.attention == "mha" else None
    # No reference to the module is kept here: export_onnx frees it after the trace (one fp32 copy at a time).
    export_onnx(build_pooled_encoder(family.load_backbone(checkpoint), spec, family.attention), output,
                static_shapes=static_shapes, graph_report=graph_report,
                output_names=tuple(t.name for t in spec.encoder_outputs), bert_heads=bert_heads)


# What report.json says of the graph the float32 checks ran on when it is not the float32 file itself.
STORED_WEIGHTS_VALIDATION = ("the float32 graph with its weights kept in the checkpoint's dtype and cast to float32 "
                             "where used (the same values; half the memory of the float32 file)")


def _export_into(staging: Path, resolved: ResolvedModel, family: ModelFamily, spec: ModelSpec, run_stsb: bool,
                 int4_activations: str = "float32", static_shapes: bool = True, built: bool = False) -> ExportReport:
    report = ExportReport(resolved.model_id, resolved.source, family.name, spec.precision, "",
                          bool(spec.extra.get("random_weights")))
    copy_tokenizer(resolved.path, staging, family)
    spec.save(staging)
    tokenizer = SpecTokenizer(staging / spec.tokenizer_file, spec)

    fp32_dir = staging / "_fp32"
    fp32_dir.mkdir()
    fp32_path = fp32_dir / spec.onnx_file
    stages = StageLog(f"export {resolved.model_id} ({spec.precision})")
    log.info("exporting %s to ONNX (fp32)", resolved.model_id)
    stages.stage("start")
    write_fp32_graph(resolved.path, family, spec, fp32_path, static_shapes, report.graph, built)
    validated_path = fp32_path
    if built and spec.precision != "fp32":
        # The float32 file only feeds the quantizer: its checks run on the same graph with the checkpoint's
        # own (bf16) weights, so the export never holds a float32 copy of the model (a 4B: 15 GiB).
        from tritonembed.export.qwen3_graph import build_qwen3_embedding_graph

        validated_path = fp32_dir / "stored-weights" / spec.onnx_file
        validated_path.parent.mkdir()
        build_qwen3_embedding_graph(resolved.path, validated_path, spec, weights="stored")
    release_freed_memory()
    stages.stage("fp32 graph written")

    # Both references before any ONNX Runtime session: the PyTorch model and a session never coexist.
    reference = family.reference_embed(resolved.path, PROBE_TEXTS, spec)
    long_text = long_probe_text(tokenizer.count_untruncated, min(spec.max_length, LONG_PROBE_TOKENS))
    long_reference = family.reference_embed(resolved.path, [long_text], spec)
    release_freed_memory()
    stages.stage("PyTorch reference computed")
    fp32 = OnnxEncoder(validated_path, tokenizer, low_memory=validated_path != fp32_path)
    measurements, failures = validate_against_reference(
        fp32, reference, PROBE_TEXTS, atol=family.fp32_atol, min_cosine=family.fp32_min_cosine,
        padding_layouts=family.padding_layouts)
    report.validation = {"fp32_vs_reference": measurements, "probe_texts": len(PROBE_TEXTS),
                         "atol": family.fp32_atol, "min_cosine": family.fp32_min_cosine,
                         "padding_layouts": list(family.padding_layouts)}
    if validated_path != fp32_path:
        report.validation["fp32_graph_checked"] = STORED_WEIGHTS_VALIDATION
    report.failures.extend(f"fp32: {f}" for f in failures)
    if failures:
        return report
    fp32_long = fp32.embed([long_text])
    long_cmp = compare(fp32_long, long_reference)
    stages.stage("fp32 validated")
    report.validation["fp32_long_input_vs_reference"] = {
        "tokens": tokenizer.count_untruncated([long_text])[0], **long_cmp.to_dict(), "min_cosine_floor": LONG_MIN_COSINE}
    if not long_cmp.finite or long_cmp.min_cosine < LONG_MIN_COSINE:
        report.failures.append(f"fp32: long input min cosine {long_cmp.min_cosine:.6f} < {LONG_MIN_COSINE}")
        return report

    real_weights = not report.random_weights
    if report.random_weights:
        report.stsb = {"skipped": "random weights: STS-B measures quality, which random weights do not have"}
    fp32_scores = stsb_scores(fp32.embed, "fp32") if (run_stsb and real_weights) else {}
    final_dir = staging
    fp32_out = fp32.embed(PROBE_TEXTS)
    if spec.precision == "fp32":
        final_out = fp32_out  # the session keeps the model; the file only moves
        for f in onnx_files(fp32_path):
            f.rename(final_dir / f.name)
        inline_small_model(final_dir / spec.onnx_file)
        if fp32_scores:
            report.stsb = {lang: {"fp32": s} for lang, s in fp32_scores.items()}
    else:
        from tritonembed.export.quantize import quantize_onnx

        del fp32  # its session holds the fp32 weights; everything needed from it is computed above
        if validated_path != fp32_path:
            shutil.rmtree(validated_path.parent)
        release_freed_memory()
        source = fp32_path
        if spec.precision == "int4" and int4_activations == "float16":  # the GPU form: int4 from the fp16 graph
            source = quantize_onnx(fp32_path, fp32_dir / "fp16" / spec.onnx_file, "fp16").model_path
        result = quantize_onnx(source, final_dir / spec.onnx_file, spec.precision)
        release_freed_memory()
        stages.stage(f"{spec.precision} graph written")
        report.quantization = {"method": result.method, "settings": result.settings}
        quantized = OnnxEncoder(final_dir / spec.onnx_file, tokenizer, low_memory=True)
        final_out = quantized.embed(PROBE_TEXTS)
        cmp = compare(final_out, fp32_out)
        floor = precisions.precision(spec.precision).min_cosine
        report.validation[f"{spec.precision}_vs_fp32"] = {**cmp.to_dict(), "min_cosine_floor": floor}
        if not cmp.finite:
            report.failures.append(f"{spec.precision}: NaN/Inf on the probe set (overflow)")
        elif cmp.min_cosine < floor:
            report.failures.append(f"{spec.precision}: min cosine to fp32 {cmp.min_cosine:.4f} < {floor}")
        long_cmp = compare(quantized.embed([long_text]), fp32_long)
        report.validation[f"{spec.precision}_long_input_vs_fp32"] = {**long_cmp.to_dict(), "min_cosine_floor": floor}
        if not long_cmp.finite or long_cmp.min_cosine < floor:
            report.failures.append(f"{spec.precision}: long input min cosine to fp32 {long_cmp.min_cosine:.4f} < {floor}")
        if fp32_scores:
            scores = stsb_scores(quantized.embed, spec.precision)
            target = precisions.precision(spec.precision).stsb_max_drop
            report.stsb = {
                lang: {"fp32": fp32_scores[lang], spec.precision: scores[lang],
                       "drop": round(fp32_scores[lang] - scores[lang], 3), "max_drop_target": target,
                       "target_met": fp32_scores[lang] - scores[lang] <= target}
                for lang in scores
            }
            for lang, row in report.stsb.items():
                if not row["target_met"]:
                    log.warning("STS-B %s: %s drops %.2f points (target <= %.1f)", lang, spec.precision, row["drop"], target)
    shutil.rmtree(fp32_dir, ignore_errors=True)
    _check_outputs_finite(final_out, report)
    stages.stage("validated")
    report.memory = {"stages": stages.stages, "peak_rss_gib": stages.peak_rss_gib}
    return report


def _check_outputs_finite(out: np.ndarray, report: ExportReport) -> None:
    """The final model's probe-set embeddings must be finite and unit norm (catches fp16 zero vectors)."""
    norms = np.linalg.norm(out, axis=1)
    if not np.isfinite(out).all():
        report.failures.append("final model: NaN/Inf on the probe set")
    elif not np.allclose(norms, 1.0, atol=1e-3):
        report.failures.append(f"final model: embeddings not unit norm (norms {norms.min():.4f}..{norms.max():.4f})")
