"""fp16 variant of an FP32 encoder graph (:func:`tritonembed.export.quantize.quantize_onnx` ``"fp16"``).

Weights and activations in float16, graph I/O in float32; numerically sensitive subgraphs stay float32:
the RMSNorm statistics, every ``Pow`` and the pooling / L2-normalization tail (module docstring of
:mod:`tritonembed.export.quantize`). Converted on a weightless copy of the graph, the weights converted one
at a time, so the model is never in memory twice.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonembed.errors import QuantizationError
from tritonembed.export.onnx_graph import (
    CONTRIB_DOMAIN,
    external_bytes,
    load_graph,
    names_read,
    set_aside_inline_weights,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx

logger = logging.getLogger(__name__)

# convert_float_to_float16's defaults, passed explicitly: the weights converted after it must round the same way.
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = 65504.0
# fp16: op types always kept in float32, on top of ONNX Runtime's default block list.
FP16_FP32_OP_TYPES = ("Pow",)
# fp16: everything downstream of these (pooling sums, L2 norm) stays float32.
FP16_TAIL_ROOT_OPS = ("ReduceSum", "ReduceL2")
_RMSNORM_CHAIN_OPS = ("Add", "Sqrt", "Reciprocal", "Div", "Cast")


def fp16_fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept float32 in the fp16 variant: RMSNorm statistics and the pooling tail."""
    consumers: dict[str, list[Any]] = {}
    producer: dict[str, Any] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node

    keep: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type not in ("Pow", "Mul"):
            continue  # a plain mean, not a variance
        keep[source.name] = None
        keep[node.name] = None
        # ReduceMean -> Add(eps) -> Sqrt -> Div(1, .)/Reciprocal -> Mul(x, .)
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for nxt in (c for out in current.output for c in consumers.get(out, [])):
                if nxt.name in keep:
                    continue
                if nxt.op_type == "Mul":
                    keep[nxt.name] = None  # x * rsqrt(var): the end of the statistics chain
                elif nxt.op_type in _RMSNORM_CHAIN_OPS:
                    keep[nxt.name] = None
                    frontier.append(nxt)

    # the pooling / normalization tail: everything reachable from a ReduceSum or ReduceL2
    frontier = [n for n in model.graph.node if n.op_type in FP16_TAIL_ROOT_OPS]
    for node in frontier:
        keep[node.name] = None
    while frontier:
        current = frontier.pop()
        for nxt in (c for out in current.output for c in consumers.get(out, [])):
            if nxt.name not in keep:
                keep[nxt.name] = None
                frontier.append(nxt)
    return list(keep)


def _drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove ``float32 -> Cast(fp16) -> Cast(fp32)`` round trips; return how many were cut.

    The converter casts every float32-kept node's output to fp16 and back before the next float32
    node, so a chain of kept nodes (RMSNorm statistics, the normalization tail, the graph output)
    would still pass through fp16 -- and overflow there. The second Cast then reads the float32
    tensor directly; first Casts left without consumers are deleted.
    """
    import onnx

    graph = model.graph
    dtype: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dtype[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        dtype[init.name] = init.data_type
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node: Any) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def source_type(name: str) -> int | None:
        return cast_to(producer.get(name)) or dtype.get(name)

    cut = 0
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if cast_to(first) == onnx.TensorProto.FLOAT16 and source_type(first.input[0]) == onnx.TensorProto.FLOAT:
            node.input[0] = first.input[0]
            cut += 1

    graph_outputs = {o.name for o in graph.output}
    while True:
        used = names_read(graph) | graph_outputs
        dead = [n for n in graph.node if cast_to(n) is not None and not any(o in used for o in n.output)]
        if not dead:
            break
        dead_outputs = {o for n in dead for o in n.output}
        kept = [n for n in graph.node if n not in dead]
        graph.ClearField("node")
        graph.node.extend(kept)
        kept_vi = [vi for vi in graph.value_info if vi.name not in dead_outputs]
        graph.ClearField("value_info")
        graph.value_info.extend(kept_vi)
    return cut


def _topological_sort(model: onnx.ModelProto) -> None:
    """Restore the topological node order the ONNX spec requires (the converter appends its Casts)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).topological_sort()


def drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes identical to an earlier one (same op, inputs, outputs, attributes); return how many.

    ``convert_float_to_float16`` before onnxruntime 1.32 inserts one ``<x>_cast_to_fp32`` Cast per
    consumer of ``x`` -- the same node several times, which ONNX Runtime refuses to load ("two nodes
    with same node name"). 1.32 inserts one shared Cast, which is what this leaves.

    Raises:
        QuantizationError: two different nodes write the same output.
    """
    seen: dict[str, bytes] = {}
    keep = []
    for node in model.graph.node:
        signature = node.SerializeToString(deterministic=True)
        clashes = [seen[o] for o in node.output if o in seen]
        if clashes and all(c == signature for c in clashes) and len(clashes) == len(node.output):
            continue
        if clashes:
            raise QuantizationError(f"fp16 conversion left two different nodes writing {list(node.output)}")
        seen.update({o: signature for o in node.output})
        keep.append(node)
    removed = len(model.graph.node) - len(keep)
    if removed:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return removed


def to_fp16(src: Path) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    import onnx
    from onnxruntime.transformers import float16

    model = load_graph(src, external_data=False)  # external weights are read one at a time, at the end
    op_block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_FP32_OP_TYPES))
    node_block = fp16_fp32_nodes(model)
    if any(not n for n in node_block):
        raise QuantizationError(f"{src} has unnamed nodes in the float32 islands; re-export with named nodes")
    # The converter copies the whole proto (shape inference, its own loads): it gets the graph without its
    # float weights, and each weight is converted afterwards, one at a time, by the converter's own function.
    weights = set_aside_inline_weights(model, float_only=True)
    on_disk = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} - set(weights)
    model = _fp16_graph(float16, model, op_block, node_block)
    _restore_fp16_weights(float16, model, weights, on_disk, src.parent)
    duplicates = drop_duplicate_nodes(model)
    round_trips = _drop_fp16_round_trips(model)
    _topological_sort(model)
    method = (
        "float16 weights and activations, float32 graph I/O (onnxruntime.transformers.float16); "
        "RMSNorm statistics, Pow and the pooling/L2-normalization tail kept float32"
    )
    settings = {
        "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "fp32_op_types": list(FP16_FP32_OP_TYPES),
        "fp32_nodes": len(node_block),
        "fp32_tail_roots": list(FP16_TAIL_ROOT_OPS),
        "fp16_round_trips_removed": round_trips,
        "duplicate_casts_removed": duplicates,
    }
    return model, method, settings


def add_contrib_op_types(model: onnx.ModelProto) -> None:
    """Declare the element type of every tensor ONNX Runtime's symbolic shape inference can type and the graph
    does not declare yet.

    onnx's own shape inference, which the converter runs, knows no ``com.microsoft`` operator
    (SkipLayerNormalization, BiasGelu, MultiHeadAttention): every tensor downstream of one stays untyped, and the
    converter inserts no float16 -> float32 cast in front of a float32 island it feeds (the pooling's
    ReduceSum then gets a float16 input and a float32 one). Types only: the shapes the symbolic pass
    merges are not kept (what ONNX Runtime's ``OnnxModel.convert_float_to_float16`` does too).
    """
    from onnx import TensorProto
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    if not any(n.domain == CONTRIB_DOMAIN for n in model.graph.node):
        return
    try:
        # on a graph it cannot type fully it saves the graph as sym_shape_infer_temp.onnx in the working
        # directory before raising: that file goes to a directory of its own, not the user's
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            typed = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # it raises on graphs it cannot follow; the converter then types what it can
        logger.warning("fp16: symbolic shape inference failed (%s: %s); casts around contrib ops may be missing",
                       type(exc).__name__, exc)
        return
    declared = {vi.name for vi in model.graph.value_info} | {t.name for t in model.graph.initializer} \
        | {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    for vi in typed.graph.value_info:
        if vi.name and vi.name not in declared and vi.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            copy = model.graph.value_info.add()
            copy.CopyFrom(vi)
            copy.type.tensor_type.ClearField("shape")


def _fp16_graph(float16: Any, model: onnx.ModelProto, op_block: list[str], node_block: list[str]) -> onnx.ModelProto:
    """``convert_float_to_float16`` on a graph whose float weights are placeholders: its value infos of
    converted initializers are built from their dims (its own helper would read the missing data)."""
    from onnx import helper

    add_contrib_op_types(model)
    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        return float16.convert_float_to_float16(
            model, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE, keep_io_types=True,
            op_block_list=op_block, node_block_list=node_block,
        )
    finally:
        float16.make_value_info_from_tensor = original


# Elements converted at once: the converter's clipping makes several temporaries of its input's size, so a
# whole embedding table (0.6 GB in float32 for Qwen3's 151,669 x 1,024) would cost a few GiB at once.
FP16_CHUNK_ELEMENTS = 1 << 24


def _to_float16_bytes(float16: Any, data: bytes) -> bytes:
    """The converter's elementwise float32 -> float16 (clipping and rounding), a chunk at a time."""
    values = np.frombuffer(data, dtype=np.float32)
    out = np.empty(values.shape, dtype=np.float16)
    for start in range(0, values.size, FP16_CHUNK_ELEMENTS):
        chunk = values[start:start + FP16_CHUNK_ELEMENTS]
        out[start:start + chunk.size] = float16.convert_np_to_float16(chunk, FP16_MIN_POSITIVE, FP16_MAX_FINITE)
    return out.tobytes()


def _restore_fp16_weights(float16: Any, model: onnx.ModelProto, aside: dict[str, bytes], on_disk: set[str],
                          weights_dir: Path) -> None:
    """Put the weights back: the set-aside ones from ``aside``, the ``on_disk`` ones read one at a time from
    their external-data file in ``weights_dir``; as float16 (the converter's rounding and clipping) where
    the converter turned the placeholder into a float16 tensor, unchanged where it kept it float32.

    Raises:
        QuantizationError: a set-aside tensor is missing from the converted graph.
    """
    import onnx

    for tensor in model.graph.initializer:
        if tensor.name in on_disk and tensor.data_location == onnx.TensorProto.EXTERNAL:
            aside[tensor.name] = external_bytes(tensor, weights_dir)  # not via the model: see external_bytes
        if tensor.name not in aside:
            continue
        data = aside.pop(tensor.name)
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            data = _to_float16_bytes(float16, data)
        tensor.raw_data = data
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    if aside:
        raise QuantizationError(f"the fp16 converter dropped {len(aside)} initializer(s), e.g. {next(iter(aside))}")
