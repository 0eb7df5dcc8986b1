"""PyTorch backbone + pooling + normalization -> one ONNX graph with the spec's tensor names."""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path
from typing import Any

from tritonembed.artifact import external_data_file, needs_external_data
from tritonembed.errors import ExportError
from tritonembed.export.bert_attention import BertHeads
from tritonembed.export.onnx_graph import ExternalDataWriter, external_bytes, set_inline, write_inline
from tritonembed.spec import ATTENTION_MASK, ENCODER_EMBEDDING_NAME, INPUT_IDS, ModelSpec

log = logging.getLogger(__name__)

ONNX_OPSET = 17
# "unfused": the backbone traced as transformers runs it (eager attention); "gqa": a decoder with one
# com.microsoft.GroupQueryAttention node per layer (tritonembed.export.attention; causal decoders only); "mha":
# traced as "unfused", then rewritten into one com.microsoft.MultiHeadAttention per layer
# (tritonembed.export.bert_attention; BERT-family encoders).
ATTENTION_FORMS = ("unfused", "gqa", "mha")


def build_pooled_encoder(backbone, spec: ModelSpec, attention: str = "unfused"):
    """Wrap a transformers backbone so that ``forward(input_ids, attention_mask) -> embedding``.

    Last-token pooling takes, per row, the last position whose mask is 1: correct for left, right
    and mixed padding alike. ``attention="gqa"`` builds the fused decoder of
    :func:`tritonembed.export.attention.build_fused_qwen3_encoder` (last-token pooling only).

    Raises:
        ExportError: an unknown ``attention`` form, ``gqa`` with a pooling other than last-token, or a
            backbone the fused decoder does not fit.
    """
    import torch

    if attention not in ATTENTION_FORMS:
        raise ExportError(f"unknown attention form {attention!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    if attention == "gqa":  # "mha" traces as "unfused": export_onnx fuses the graph
        if not spec.decoder or spec.pooling != "last_token":
            raise ExportError(f"GroupQueryAttention is causal: it needs a decoder with last-token pooling, not {spec.pooling}")
        from tritonembed.export.attention import build_fused_qwen3_encoder

        if [o.head for o in spec.outputs] == ["embedding"]:
            return build_fused_qwen3_encoder(backbone, normalize=spec.normalize)
        from tritonembed.export.heads import fused_with_heads

        return fused_with_heads(build_fused_qwen3_encoder(backbone, normalize=False), backbone, spec)

    from tritonembed.export.heads import head_fn, pooling_fn

    needs_token_types = "token_type_ids" in backbone.forward.__code__.co_varnames
    pool = pooling_fn(spec.pooling)
    heads = [head_fn(out.head) for out in spec.outputs]

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids, attention_mask):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if needs_token_types:
                kwargs["token_type_ids"] = torch.zeros_like(input_ids)
            if spec.decoder:
                kwargs["use_cache"] = False
            pooled = pool(self.backbone(**kwargs).last_hidden_state, attention_mask)
            outs = tuple(h(pooled, spec, self.backbone) for h in heads)
            return outs[0] if len(outs) == 1 else outs

    return PooledEncoder().eval()


def export_onnx(encoder, output: Path, *, example_length: int = 16, static_shapes: bool = True,
                graph_report: dict[str, Any] | None = None, output_names: tuple[str, ...] = (ENCODER_EMBEDDING_NAME,),
                bert_heads: BertHeads | None = None) -> Path:
    """Trace ``encoder`` to ``output`` (dynamic batch and sequence axes), one external-data file if > 2 GB.

    With ``static_shapes``, the traced shape arithmetic is replaced by constants where that is provably
    the same graph (:mod:`tritonembed.export.static_shapes`); what was done (or ``{"off": True}``) goes
    into ``graph_report`` (key ``static_shapes``) when one is given. ``bert_heads`` (the ``mha`` attention
    form) then fuses a BERT-like graph's attention (:mod:`tritonembed.export.bert_attention`; key
    ``fused_operators``). Which attention the graph computes goes under key ``attention``
    (:func:`tritonembed.export.attention.graph_attention`).

    Raises:
        ExportError: tracing or saving failed.
    """
    import onnx
    import torch

    output = Path(output)
    staging = output.parent / "_onnx_staging"
    staging.mkdir(parents=True, exist_ok=True)
    staged = staging / output.name
    ids = torch.full((2, example_length), 100, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[0, : example_length // 2] = 0  # a padded row so no shape-specializing shortcut is traced
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder,
                (ids, mask),
                str(staged),
                input_names=[INPUT_IDS.name, ATTENTION_MASK.name],
                output_names=list(output_names),
                dynamic_axes={
                    INPUT_IDS.name: {0: "batch", 1: "sequence"},
                    ATTENTION_MASK.name: {0: "batch", 1: "sequence"},
                    **{name: {0: "batch"} for name in output_names},
                },
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # torch raises a zoo of tracer/exporter exceptions
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    # The module is not needed past the trace: freed here (when the caller holds no other reference) so that
    # the float32 weights are never in memory twice while the graph is post-processed.
    del encoder
    gc.collect()
    model = onnx.load(str(staged), load_external_data=False)
    _load_small_external(model, staging)
    if static_shapes:
        from tritonembed.export.static_shapes import freeze_shape_inputs

        frozen = freeze_shape_inputs(model)
        if graph_report is not None:
            graph_report["static_shapes"] = frozen.to_dict()
    elif graph_report is not None:
        graph_report["static_shapes"] = {"off": True}
    if bert_heads is not None:
        from tritonembed.export.bert_attention import fuse_bert_attention

        onnx.load_external_data_for_model(model, str(staging))  # the optimizer reads the q / k / v weights
        model, made = fuse_bert_attention(model, bert_heads)
        if graph_report is not None:
            graph_report["fused_operators"] = made
    if graph_report is not None:
        from tritonembed.export.attention import graph_attention

        graph_report["attention"] = graph_attention(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        _save_streaming(model, staging, output)
    else:
        save_onnx(model, output)
    del model
    for leftover in staging.iterdir():
        leftover.unlink()
    staging.rmdir()
    return output


def _is_small_or_integer(tensor) -> bool:
    import onnx

    count = 1
    for dim in tensor.dims:
        count *= dim
    return tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) \
        or count <= 64


def _load_small_external(model, base_dir: Path) -> None:
    """Read the external data of integer and tiny tensors (shape arithmetic reads their values); the float
    weights stay on disk, where :func:`_save_streaming` copies them one by one."""
    import onnx

    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and _is_small_or_integer(tensor):
            set_inline(tensor, external_bytes(tensor, base_dir))


def _save_streaming(model, source_dir: Path, output: Path) -> list[Path]:
    """Write ``model`` with every still-external tensor copied, one at a time, into ``<name>_data``.

    The tensors torch wrote beside the traced graph (one file each, in ``source_dir``) are read back one by
    one, so at most one weight is in memory; offsets are 4 KiB aligned (ONNX Runtime can map them).

    Raises:
        ExportError: a tensor's external file is missing, outside ``source_dir`` or shorter than it says.
    """
    import onnx

    output = Path(output)
    writer = ExternalDataWriter(output)
    try:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                writer.point(tensor, *writer.append([external_bytes(tensor, source_dir)]))
    finally:
        writer.close()
    onnx.save(model, str(output))
    return [output, writer.path]


def save_onnx(model, output: Path) -> list[Path]:
    """Save an ONNX ModelProto; weights go to ``<name>_data`` in one file when the model exceeds 2 GB.

    Returns the files written.
    """
    import onnx

    output = Path(output)
    data_file = external_data_file(output)
    if data_file.exists():
        data_file.unlink()
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if not needs_external_data(weights):
        write_inline(model, output)
        return [output]
    onnx.save(model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_file.name, size_threshold=1024)
    data_file.chmod(0o644)  # onnx creates it 0600; Triton in a container may run as another user
    return [output, data_file]


def inline_small_model(model_path: Path) -> bool:
    """Move ``<name>_data`` back into ``model_path`` when the weights fit one protobuf (the artifact's layout:
    one file below the threshold). Holds the model in memory once, so only below the threshold.

    Returns whether it did.
    """
    import onnx

    data_file = external_data_file(model_path)
    if not data_file.exists() or needs_external_data(data_file.stat().st_size):
        return False
    model = onnx.load(str(model_path))
    data_file.unlink()
    write_inline(model, model_path)
    return True
