"""8-bit embedding tables (``export/embedding_int8.py``): the numbers, and the graph rewrite run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tritonembed.export.embedding_int8 import dequantize_blocks, quantize_blocks, rewrite_gathers


def test_blocks_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 64)).astype(np.float32)
    table[3] = 0.0  # an all-zero row
    data, scale, zero_point = quantize_blocks(table, 32)
    assert data.dtype == np.uint8 and zero_point.dtype == np.uint8 and scale.shape == (50, 2)
    error = np.abs(dequantize_blocks(data, scale, zero_point) - table)
    assert (error <= scale.repeat(32, axis=1) / 2 + 1e-6).all()
    assert error[3].max() == 0.0


def test_rows_not_a_multiple_of_the_block_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(np.zeros((4, 48), np.float32), 32)


def _gather_model(table: np.ndarray, shared: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed")]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]
    if shared:  # a second reader of the same table (a tied output projection)
        nodes.append(helper.make_node("ReduceSum", ["table"], ["total"], name="other", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              outputs, [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_onnx_runtime_reads_the_rewritten_table_as_dequantized():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(300, 96)).astype(np.float32)
    model = _gather_model(table)
    assert rewrite_gathers(model, ["embed"], block_size=32) == ["embed"]
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    ids = np.array([[0, 7, 299], [5, 5, 1]], np.int64)
    (rows,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    data, scale, zero_point = quantize_blocks(table, 32)
    np.testing.assert_array_equal(rows, dequantize_blocks(data, scale, zero_point)[ids])
    assert np.abs(rows - table[ids]).max() < 0.02


def test_a_shared_table_is_left_float32():
    model = _gather_model(np.ones((10, 32), np.float32), shared=True)
    assert rewrite_gathers(model, ["embed"]) == []
    assert [n.op_type for n in model.graph.node] == ["Gather", "ReduceSum"]


def test_quantized_by_row_chunks_equals_the_whole_table(monkeypatch):
    """A table read a block of rows at a time (an external-data graph's) quantizes to the same arrays."""
    from tritonembed.export import embedding_int8

    monkeypatch.setattr(embedding_int8, "CHUNK_ROWS", 7)
    table = np.random.default_rng(3).standard_normal((50, 64)).astype(np.float32)
    whole = embedding_int8.quantize_blocks(table, 32)
    chunked = embedding_int8.quantize_rows(lambda first, count: table[first:first + count], 50, 32)
    for a, b in zip(whole, chunked):
        assert a.dtype == b.dtype and np.array_equal(a, b)
