"""Replace the shape arithmetic of a traced graph with constants where the shapes prove it safe.

The TorchScript exporter traces ``x.view(*x.shape[:-1], heads, head_dim)`` as
``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), heads, head_dim))``:
four to ten small nodes per Reshape or Expand, hundreds per model (1,300 in the Qwen3-0.6B shape after
ONNX Runtime's own optimizations, all of them placed on the CPU by its CUDA provider). Where symbolic
shape inference shows that each output dimension is either a number or the input's dimension at the
same position, the shape input can be the constant ``[0, 0, heads, head_dim]`` (ONNX ``Reshape``: 0
copies the input's dimension, -1 takes what is left; ``Expand``: 1 keeps the input's dimension), and the
arithmetic that computed it becomes dead. Integer tensors whose value the inference knows outright (Qwen3's
``x.shape[-1] // 2`` for the rotary split: ``Shape → Gather → Div → Unsqueeze``, twice per layer) become
constants too.

Safety: dimensions are compared as symbols from ONNX Runtime's symbolic shape inference. Where the graph
only runs if two dimensions broadcast, that inference records a *merge*. Only ``Min(c, d)`` into the input
dimension ``d`` with a number ``c >= 2`` (BERT's ``Min(512, sequence)``) is accepted: the two broadcast
exactly when they are equal, so it restates what the original graph already requires; any other merge
(an input dimension renamed or fixed to a number, an unknown dimension that might be 1) is an assumption,
and then nothing is rewritten. The inference also evaluates comparisons of symbolic values with Python's
``==`` (``Equal(sequence, 1)`` comes out False); a comparison whose truth the symbols' assumptions (integer,
non-negative) do not decide taints everything computed from it, and nothing tainted is frozen. The export
pipeline then checks the result against PyTorch on batches of several lengths and paddings (``validate``),
as for every export. Not for empty batches: a ``-1`` beside a 0-sized dimension is ambiguous (the encoder
never runs one).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Float initializers with more elements than this are given to shape inference as typed graph inputs
# instead of values: their shapes are all it needs, and a copy of a 16 GB model's weights would not fit.
_VALUE_ELEMENTS_KEPT = 64
_SUFFIX = "_static_shape"  # the constant shape input of a Reshape / Expand, named after its output
_VALUE_SUFFIX = "_static_value"  # a known integer tensor (a Reshape's output may also be one)
_INTEGER_TYPES = {7: np.int64, 6: np.int32}  # onnx.TensorProto.INT64 / INT32
_MIN_OF_TWO = re.compile(r"Min\(([A-Za-z_]\w*|\d+),([A-Za-z_]\w*|\d+)\)")  # as sympy prints it, spaces removed
Dim = int | str


@dataclass
class StaticShapesReport:
    """What :func:`freeze_shape_inputs` did."""

    frozen: int = 0  # Reshape / Expand nodes whose shape input became a constant
    constants: int = 0  # other integer tensors with a known value, now constants
    nodes_before: int = 0
    nodes_after: int = 0
    skipped: list[str] = field(default_factory=list)  # why nothing was rewritten, when it was not

    def to_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "constants": self.constants, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "skipped": self.skipped}


def freeze_shape_inputs(model: Any) -> StaticShapesReport:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place) as the module docstring describes.

    Never raises for a graph it cannot analyse: it leaves that graph unchanged and says why in the
    report's ``skipped``.
    """
    report = StaticShapesReport(nodes_before=len(model.graph.node), nodes_after=len(model.graph.node))
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in model.graph.node for a in node.attribute):
        report.skipped.append("the graph has subgraphs (If/Loop/Scan); not analysed")
        return report
    try:
        shapes, values, merges, input_symbols, tainted = _symbolic_shapes(model)
    except Exception as exc:  # the inference is best effort; an unanalysable graph stays as it is
        report.skipped.append(f"symbolic shape inference failed: {type(exc).__name__}: {exc}")
        return report
    unsafe = unsafe_merges(merges, input_symbols)
    if unsafe:
        report.skipped.append(f"shape inference had to assume {', '.join(unsafe)}; graph left as exported")
        return report
    try:  # plan every change first, so that a failure leaves the graph as it was
        initializers, rewrites, report.frozen, report.constants = _plan(model, shapes, values, tainted)
    except Exception as exc:
        report.skipped.append(f"could not plan the rewrite: {type(exc).__name__}: {exc}")
        return report
    graph = model.graph
    graph.initializer.extend(initializers)
    for node_index, input_index, name in rewrites:
        graph.node[node_index].input[input_index] = name
    if rewrites:
        _drop_dead_nodes(model)
    report.nodes_after = len(graph.node)
    log.info("static shapes: %d Reshape/Expand shape inputs and %d other integer tensors made constant, %d -> %d nodes",
             report.frozen, report.constants, report.nodes_before, report.nodes_after)
    return report


def _plan(model: Any, shapes: dict[str, list[Dim | None]], values: dict[str, tuple[Any, Any]],
          tainted: set[str]) -> tuple[list[Any], list[tuple[int, int, str]], int, int]:
    """(new initializers, (node, input, new name) rewrites, Reshape/Expand frozen, values made constant)."""
    from onnx import numpy_helper

    graph = model.graph
    constant = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    initializers, rewrites = [], []
    for k, node in enumerate(graph.node):
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2 or node.input[1] in constant:
            continue
        if node.input[1] in tainted or node.output[0] in tainted:
            continue
        if node.op_type == "Reshape" and any(a.name == "allowzero" and a.i for a in node.attribute):
            continue  # there 0 means an empty dimension, not "copy"
        source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
        if source is None or target is None:
            continue
        value = (reshape_target if node.op_type == "Reshape" else expand_target)(source, target)
        if value is None:
            continue
        name = node.output[0] + _SUFFIX
        initializers.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
        rewrites.append((k, 1, name))
    frozen = len(rewrites)
    done = {(k, i) for k, i, _ in rewrites}
    outputs = {o.name for o in graph.output}
    replaced: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            if name not in values or name in constant or name in outputs or name in tainted or (k, i) in done:
                continue
            if name not in replaced:
                replaced[name] = name + _VALUE_SUFFIX
                value, dtype = values[name]
                initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), replaced[name]))
            rewrites.append((k, i, replaced[name]))
    return initializers, rewrites, frozen, len(replaced)


def reshape_target(source: list[Dim | None], target: list[Dim | None]) -> list[int] | None:
    """A constant ``Reshape`` shape giving ``target`` from ``source`` for every value of the symbols, or None.

    Each output dimension is a positive number, or 0 where it is the input's dimension at the same
    position; at most one other dimension becomes -1.
    """
    if any(d is None for d in target):
        return None
    value = []
    for i, dim in enumerate(target):
        if isinstance(dim, int) and dim > 0:
            value.append(dim)
        elif i < len(source) and source[i] is not None and source[i] == dim:
            value.append(0)
        else:
            value.append(-1)
    return value if value.count(-1) <= 1 else None


def expand_target(source: list[Dim | None], target: list[Dim | None]) -> list[int] | None:
    """A constant ``Expand`` shape giving ``target`` from ``source`` for every value of the symbols, or None.

    1 keeps a dimension (``target`` equals ``source`` there); a number broadcasts a dimension of 1.
    """
    if len(source) != len(target) or any(d is None for d in source) or any(d is None for d in target):
        return None
    value = []
    for have, want in zip(source, target):
        if have == want:
            value.append(1)
        elif have == 1 and isinstance(want, int):
            value.append(want)
        else:
            return None
    return value


def unsafe_merges(merges: dict[str, Dim], input_symbols: set[str]) -> list[str]:
    """The merges that are assumptions: all but ``Min(c, d) -> d`` with ``d`` an input dimension, ``c >= 2``."""
    return [f"{k} == {v}" for k, v in sorted(merges.items(), key=str) if not _is_bounded_input(k, v, input_symbols)]


def _is_bounded_input(key: str, value: Dim, input_symbols: set[str]) -> bool:
    """Whether ``key`` is ``Min(c, value)`` (either order) with ``value`` an input dimension and an integer ``c >= 2``."""
    if not isinstance(value, str) or value not in input_symbols or key in input_symbols:
        return False
    match = _MIN_OF_TWO.fullmatch(key.replace(" ", ""))
    if match is None:
        return False
    first, second = match.groups()
    number, symbol = (first, second) if first.isdigit() else (second, first)
    return number.isdigit() and int(number) >= 2 and symbol == value


def _symbolic_shapes(model: Any) -> tuple[dict[str, list[Dim | None]], dict[str, tuple[Any, Any]],
                                          dict[str, Dim], set[str], set[str]]:
    """Every tensor's shape (numbers and symbol names) by ONNX Runtime's symbolic shape inference on a
    weightless copy of ``model``; the integer tensors whose value it knows (``{name: (value, numpy dtype)}``,
    a scalar or a 1-D list); the merges it needed; the graph inputs' symbols; the tensors tainted by an
    undecided comparison (:func:`undecided_comparisons`).

    Raises:
        whatever the inference raises (the caller catches it); RuntimeError: shapes left incomplete.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # What SymbolicShapeInference.infer_shapes does, spelled out to read its merges and known values: private
    # attributes of onnxruntime's tool (pinned in constraints.txt). Should they change, freeze_shape_inputs
    # catches the error and leaves the graph as traced, with the reason in the report.
    inference = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
    _complete_gqa_rule(inference)
    complete = False
    inference._preprocess(_weightless(model))
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise RuntimeError("shapes left incomplete")
    graph = inference.out_mp_.graph
    shapes = {vi.name: _dims(vi) for vi in (*graph.value_info, *graph.input, *graph.output)}
    dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    values = {}
    for name, value in inference.sympy_data_.items():
        dtype = _INTEGER_TYPES.get(dtypes.get(name))
        literal = _literal(value)
        if dtype is not None and literal is not None and len(shapes.get(name) or ()) == np.ndim(literal):
            values[name] = (literal, dtype)
    # from the model itself too: the inference renames an input dimension it merged away
    input_symbols = {d.dim_param for value in model.graph.input for d in value.type.tensor_type.shape.dim
                     if d.dim_param} | set(inference.input_symbols_)
    tainted = undecided_comparisons(model.graph.node, inference.sympy_data_)
    return shapes, values, dict(inference.suggested_merge_), input_symbols, tainted


def _complete_gqa_rule(inference: Any) -> None:
    """Teach ``inference`` the present_key / present_value shapes of a GroupQueryAttention without a past.

    ONNX Runtime's rule types them only from ``past_key``; the fused Qwen3 graph has none (prompt only),
    so the present tensors are (batch, kv_num_heads, sequence, head_size): the key's rows, per KV head.
    """
    from onnx import helper

    original = inference.dispatcher_.get("GroupQueryAttention")
    if original is None:
        return

    def rule(node: Any) -> None:
        original(node)
        if len(node.input) > 3 and node.input[3]:
            return  # a past: ONNX Runtime's own rule typed the present outputs
        key_shape = inference._try_get_shape(node, 1) if len(node.input) > 1 and node.input[1] else None
        kv_heads = next((a.i for a in node.attribute if a.name == "kv_num_heads"), 0)
        if key_shape is None or len(key_shape) != 3 or not isinstance(key_shape[2], int) or not kv_heads:
            return
        dtype = inference.known_vi_[node.input[0]].type.tensor_type.elem_type
        shape = [key_shape[0], kv_heads, key_shape[1], key_shape[2] // kv_heads]
        for index in (1, 2):
            if len(node.output) > index and node.output[index]:
                vi = inference.known_vi_[node.output[index]]
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, dtype, shape))

    inference.dispatcher_["GroupQueryAttention"] = rule


_COMPARISONS = {"Equal": "Eq", "Less": "Lt", "LessOrEqual": "Le", "Greater": "Gt", "GreaterOrEqual": "Ge"}


def undecided_comparisons(nodes: Any, data: dict[str, Any]) -> set[str]:
    """The tensors computed from a comparison the inference evaluated but the symbols do not decide.

    ``data`` is the inference's known values (``sympy_data_``). A comparison output with a known value
    is trusted only when every element pair compares the same way for all values of the symbols (sympy
    returns ``true`` or ``false`` under their integer, non-negative assumptions: ``sequence == -1`` is
    decided, ``sequence == 1`` is not); everything downstream of an undecided one is tainted, values and
    shapes alike. ``nodes`` are in topological order, as exported graphs are.
    """
    import sympy

    tainted: set[str] = set()
    for node in nodes:
        outputs = [o for o in node.output if o]
        if any(i in tainted for i in node.input if i):
            tainted.update(outputs)
        elif node.op_type in _COMPARISONS and any(o in data for o in outputs):
            relation = getattr(sympy, _COMPARISONS[node.op_type])
            pairs = _element_pairs(data.get(node.input[0]), data.get(node.input[1]))
            if pairs is None or any(relation(a, b) not in (sympy.true, sympy.false) for a, b in pairs):
                tainted.update(outputs)
    return tainted


def _element_pairs(left: Any, right: Any) -> list[tuple[Any, Any]] | None:
    """Broadcast two known values (scalars or 1-D lists) into element pairs; None if either is unknown."""
    if left is None or right is None:
        return None
    left = left if isinstance(left, list) else [left]
    right = right if isinstance(right, list) else [right]
    if len(left) == 1:
        left = left * len(right)
    if len(right) == 1:
        right = right * len(left)
    return list(zip(left, right)) if len(left) == len(right) else None


def _literal(value: Any) -> int | list[int] | None:
    """A scalar or 1-D value of plain integers, or None (a symbol, a nested list, a float)."""
    import sympy

    items = value if isinstance(value, list) else [value]
    if not all(isinstance(x, int | sympy.Integer) and not isinstance(x, bool) for x in items):
        return None
    ints = [int(x) for x in items]
    return ints if isinstance(value, list) else ints[0]


def _weightless(model: Any) -> Any:
    """``model`` without the values of its large float initializers (typed graph inputs instead)."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or \
                int(np.prod(tensor.dims, dtype=np.int64)) <= _VALUE_ELEMENTS_KEPT:
            graph.initializer.append(tensor)
        else:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return light


def _dims(value_info: Any) -> list[Dim | None] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def _drop_dead_nodes(model: Any) -> None:
    """Remove nodes (and initializers, value_info) that no graph output depends on any more."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    for i in reversed(range(len(graph.initializer))):  # in place: copying a 16 GB model's weights would not fit
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]
    produced = {o for node in live for o in node.output}
    value_info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
