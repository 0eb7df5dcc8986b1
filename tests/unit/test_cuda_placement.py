"""scripts/device/cuda_placement.py: the replica of ONNX Runtime's CUDA CPU-fallback rule, on small graphs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device" / "cuda_placement.py"


def _module():
    spec = importlib.util.spec_from_file_location("cuda_placement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(nodes, initializers=(), dtype=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", dtype, ["b", "s", 4])],
        [helper.make_tensor_value_info("y", dtype, None)], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _int64(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def test_shape_arithmetic_stays_on_the_cpu_and_crosses_nothing() -> None:
    # y = Reshape(x, Concat(Gather(Shape(x), 0), [-1])): the traced-graph pattern
    model = _model([helper.make_node("Shape", ["x"], ["shape"]),
                    helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
                    helper.make_node("Concat", ["batch", "minus_one"], ["new_shape"], axis=0),
                    helper.make_node("Reshape", ["x", "new_shape"], ["y"])],
                   [_int64("zero", [0]), _int64("minus_one", [-1])])
    result = _module().placement(model)
    assert result["cpu_ops"] == {"Gather": 1, "Concat": 1}
    assert result["device_to_host"] == {} and result["host_to_device"] == {}


def test_a_gpu_tensor_read_on_the_cpu_is_a_device_to_host_copy() -> None:
    # ArgMax has no CUDA kernel here: the GPU-computed Mul output must come back to the host
    model = _model([helper.make_node("Mul", ["x", "x"], ["sq"]),
                    helper.make_node("ArgMax", ["sq"], ["y"], axis=1)])
    result = _module().placement(model)
    assert result["cpu_ops"] == {"ArgMax": 1}
    assert result["device_to_host"] == {"Mul -> ArgMax[0]": 1}


def test_a_large_initializer_keeps_a_node_on_the_gpu() -> None:
    big = helper.make_tensor("big", TensorProto.INT64, [200], np.arange(200).tolist())
    model = _model([helper.make_node("Shape", ["x"], ["shape"]),
                    helper.make_node("Gather", ["big", "shape"], ["picked"], axis=0),  # a 200-element table
                    helper.make_node("Reshape", ["x", "picked"], ["y"])], [big])
    result = _module().placement(model)
    assert result["cpu_ops"] == {}  # Gather reads a large initializer: it stays a CUDA kernel
    assert result["device_to_host"] == {"Gather -> Reshape[1]": 1}  # and Reshape wants its shape on the host
