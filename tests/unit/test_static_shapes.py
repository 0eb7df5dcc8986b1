"""Static shapes: the constant each Reshape/Expand gets, when the rewrite refuses, and graphs that stay equal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tritonembed.export.static_shapes import expand_target, freeze_shape_inputs, reshape_target, unsafe_merges


@pytest.mark.parametrize(("source", "target", "expected"), [
    (["batch", "sequence", 1024], ["batch", "sequence", 16, 64], [0, 0, 16, 64]),  # split heads
    (["batch", "sequence", 16, 64], ["batch", "sequence", 1024], [0, 0, 1024]),  # merge heads
    (["batch", 8, 2, "sequence", 64], ["batch", 16, "sequence", 64], [0, 16, -1, 64]),  # repeat_kv
    (["batch", "sequence"], ["sequence", "batch"], None),  # two dimensions move: no constant says that
    (["batch", "sequence", 8], ["batch", None, 8], None),  # an unknown output dimension
    (["unk__1"], ["batch", "sequence"], None),  # flattened and split again: two dimensions unknown
    ([None, "sequence"], ["batch", "sequence"], [-1, 0]),
])
def test_reshape_target(source, target, expected) -> None:
    assert reshape_target(source, target) == expected


@pytest.mark.parametrize(("source", "target", "expected"), [
    (["batch", 8, 1, "sequence", 64], ["batch", 8, 2, "sequence", 64], [1, 1, 2, 1, 1]),
    ([1, 512], [1, 512], [1, 1]),
    ([1, "sequence"], ["batch", "sequence"], None),  # broadcasting 1 to a symbol needs that symbol's value
    (["batch", "sequence"], ["batch", 1, "sequence"], None),  # rank changes
    (["batch", None], ["batch", "sequence"], None),
])
def test_expand_target(source, target, expected) -> None:
    assert expand_target(source, target) == expected


def test_only_a_bounded_input_dimension_is_a_safe_merge() -> None:
    """``Min(512, sequence)`` broadcasts against ``sequence`` only when they are equal; anything that might
    be 1 while the other is not (an unknown dimension, ``Min(1, sequence)``) broadcasts without being equal."""
    inputs = {"batch", "sequence"}
    assert unsafe_merges({"Min(512, sequence)": "sequence", "Min(sequence, 2)": "sequence"}, inputs) == []
    assert unsafe_merges({"sequence": "batch"}, inputs) == ["sequence == batch"]
    assert unsafe_merges({"unk__1": 1}, inputs) == ["unk__1 == 1"]
    assert unsafe_merges({"unk__3": "batch"}, inputs) == ["unk__3 == batch"]
    assert unsafe_merges({"Min(1, sequence)": "sequence"}, inputs) == ["Min(1, sequence) == sequence"]
    assert unsafe_merges({"Min(512, batch)": "sequence"}, inputs) == ["Min(512, batch) == sequence"]


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _split_heads_model() -> onnx.ModelProto:
    """What the tracer writes for ``x.view(b, s, 2, 4).transpose(1, 2)`` then a repeat of the heads."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
        helper.make_node("Unsqueeze", ["s", "axes0"], ["s1"]),
        helper.make_node("Concat", ["b1", "s1", "heads"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["split"]),
        helper.make_node("Transpose", ["split"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Unsqueeze", ["t", "axes2"], ["t5"]),
        helper.make_node("Shape", ["t5"], ["shape5"]),
        helper.make_node("Mul", ["shape5", "rep"], ["expanded_shape"]),
        helper.make_node("Expand", ["t5", "expanded_shape"], ["e"]),
        helper.make_node("Reshape", ["e", "merge"], ["y"]),
    ]
    initializers = [_ints("zero", 0), _ints("one", 1), _ints("axes0", [0]), _ints("axes2", [2]),
                    _ints("heads", [2, 4]), _ints("rep", [1, 1, 3, 1, 1]), _ints("merge", [0, 6, -1, 4])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, "sequence", 4])], initializers)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_traced_shape_arithmetic_becomes_constants_and_the_graph_computes_the_same() -> None:
    original = _split_heads_model()
    model = _split_heads_model()
    report = freeze_shape_inputs(model)
    assert report.skipped == []
    assert report.frozen == 2  # the Reshape from Concat and the Expand from Mul; the last Reshape was constant
    assert report.nodes_before == 13 and report.nodes_after == len(model.graph.node) == 5
    assert {n.op_type for n in model.graph.node} == {"Reshape", "Transpose", "Unsqueeze", "Expand"}
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    for batch, sequence in ((1, 1), (1, 9), (3, 5), (4, 33)):
        x = rng.standard_normal((batch, sequence, 8)).astype(np.float32)
        np.testing.assert_array_equal(_run(model, x), _run(original, x))


def test_a_merge_that_assumes_equal_inputs_leaves_the_graph_alone() -> None:
    """``x[batch] + y[sequence]`` only runs when the two agree (or one is 1): inferring through it
    needs the assumption batch == sequence, which the rewrite must not build on."""
    nodes = [
        helper.make_node("Add", ["x", "y"], ["z"]),
        helper.make_node("Shape", ["z"], ["shape"]),
        helper.make_node("Reshape", ["z", "shape"], ["out"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["sequence"])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n"])])
    before = model.SerializeToString()
    report = freeze_shape_inputs(model)
    assert report.frozen == 0 and report.skipped and "assume" in report.skipped[0]
    assert model.SerializeToString() == before


def test_graphs_with_subgraphs_are_not_analysed() -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["r"])], "b", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch"])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    model = _model(nodes, [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])])
    report = freeze_shape_inputs(model)
    assert report.frozen == 0 and "subgraphs" in report.skipped[0]
    assert len(model.graph.node) == 1


def test_integer_values_known_from_the_shapes_become_constants() -> None:
    """Qwen3's rotate_half: ``x[..., : x.shape[-1] // 2]`` with a static last dimension."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "last"], ["width"], axis=0),
        helper.make_node("Div", ["width", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "axes0"], ["end"]),
        helper.make_node("Slice", ["x", "start", "end", "axis"], ["y"]),
    ]
    initializers = [_ints("last", -1), _ints("two", 2), _ints("axes0", [0]), _ints("start", [0]), _ints("axis", [-1])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])], initializers)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    report = freeze_shape_inputs(model)
    assert report.constants >= 1 and [n.op_type for n in model.graph.node] == ["Slice"]
    [end] = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name == model.graph.node[0].input[2]]
    assert end.tolist() == [4] and end.dtype == np.int64
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, x), _run(original, x))


def test_a_reshape_whose_output_is_also_a_known_value_gets_two_distinct_constants() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["w"], axis=0),
        helper.make_node("Unsqueeze", ["w", "axes0"], ["w1"]),
        helper.make_node("Shape", ["w1"], ["ws"]),
        helper.make_node("Reshape", ["w1", "ws"], ["r"]),  # computed shape input, and r's value is known: [8]
        helper.make_node("Concat", ["minus1", "r"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    initializers = [_ints("one", 1), _ints("axes0", [0]), _ints("minus1", [-1])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializers)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    report = freeze_shape_inputs(model)
    assert report.skipped == [] and report.constants >= 1
    onnx.checker.check_model(model)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, x), _run(original, x))


def _unchanged_and_equal(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    original = model.SerializeToString()
    freeze_shape_inputs(model)
    for feed in feeds:
        a = ort.InferenceSession(original, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        np.testing.assert_array_equal(b, a)


def test_a_comparison_the_symbols_do_not_decide_is_never_frozen() -> None:
    """The inference evaluates ``Equal(sequence, 1)`` as False; freezing the ``Where`` after it would give
    the sequence-1 case the other branch."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["d"], axis=0),
        helper.make_node("Equal", ["d", "one"], ["eq"]),
        helper.make_node("Where", ["eq", "five", "seven"], ["w"]),
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "wf"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])],
                   [_ints("one", 1), _ints("five", 5), _ints("seven", 7)])
    _unchanged_and_equal(model, [{"x": np.zeros((2, n), np.float32)} for n in (1, 3)])


def test_a_merge_of_an_unknown_dimension_leaves_the_graph_alone() -> None:
    """``NonZero`` gives a dimension that may be 1 and then broadcasts against ``sequence`` without equalling it."""
    nodes = [
        helper.make_node("NonZero", ["m"], ["nz"]),
        helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["nzf", "minus1"], ["g"]),
        helper.make_node("Add", ["g", "x"], ["z"]),
        helper.make_node("Shape", ["z"], ["zs"]),
        helper.make_node("Expand", ["g", "zs"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["sequence"]),
                           helper.make_tensor_value_info("m", TensorProto.FLOAT, ["n"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])], [_ints("minus1", [-1])])
    report_model = onnx.ModelProto()
    report_model.CopyFrom(model)
    assert freeze_shape_inputs(report_model).skipped
    _unchanged_and_equal(model, [{"x": np.zeros(3, np.float32), "m": np.array([0, 5, 0], np.float32)}])


def _gqa_graph() -> onnx.ModelProto:
    """x [batch, sequence, 32] -> Reshape (traced shape arithmetic) -> GroupQueryAttention (no past) -> out."""
    heads, kv_heads, head = 2, 1, 16
    shape = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["bu"]),
             helper.make_node("Unsqueeze", ["n", "axes"], ["nu"]),
             helper.make_node("Concat", ["bu", "nu", "width"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["q"]),
             helper.make_node("Cast", ["n"], ["total"], to=TensorProto.INT32)]
    gqa = helper.make_node("GroupQueryAttention", ["q", "kv", "kv", "", "", "seqlens_k", "total"],
                           ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                           kv_num_heads=kv_heads, scale=head ** -0.5)
    graph = helper.make_graph(
        [*shape, gqa], "gqa",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", heads * head]),
         helper.make_tensor_value_info("kv", TensorProto.FLOAT, ["batch", "sequence", kv_heads * head]),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", heads * head])],
        [numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
         numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
         numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"),
         numpy_helper.from_array(np.array([heads * head], dtype=np.int64), "width")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_group_query_attention_without_a_past_is_typed_and_the_graph_still_computes_the_same() -> None:
    """ONNX Runtime's shape rule types GQA's present outputs only from a past; the fused Qwen3 graph has none."""
    model = _gqa_graph()
    original = model.SerializeToString()
    report = freeze_shape_inputs(model)
    assert report.skipped == [] and report.frozen == 1, report
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 5, 32)).astype(np.float32),
            "kv": rng.standard_normal((2, 5, 16)).astype(np.float32), "seqlens_k": np.array([4, 2], dtype=np.int32)}

    def run(blob):
        return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, feed)[0]

    np.testing.assert_array_equal(run(model.SerializeToString()), run(original))
