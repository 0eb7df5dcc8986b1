"""Predict, on a CPU-only machine, which nodes ONNX Runtime's CUDA provider would leave on the CPU.

A replica of ``GetCpuPreferredNodes`` (onnxruntime/core/framework/fallback_cpu_capability.cc): starting from
the CPU outputs of CUDA kernels (Shape, Size), a node moves to the CPU when every input is a CPU tensor, a
small initializer (<= 100 elements) or a graph input, none is float16/bfloat16, and none is an input the CUDA
kernel itself takes in CPU memory. It runs on the graph after ONNX Runtime's basic optimizations (the level
applied before partitioning), and then counts where data crosses: device-to-host copies (each one stalls the
stream) and host-to-device copies. On the 2026-11-26 H200 run it predicted the profiler's CPU nodes exactly
for the static-shape fp16 graph (Gather 7, ArgMax 1, Concat 1).

    python scripts/device/cuda_placement.py MODEL.onnx [MODEL.onnx ...]

Limits: the kernel tables below are hand-copied for the ops our graphs use (CPU-memory inputs of the CUDA
kernels; ops with no CUDA kernel for our types); an op missing from them counts as a plain CUDA kernel.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("cuda_placement")

#: Inputs that ONNX Runtime's CUDA kernels take in CPU memory (``InputMemoryType(OrtMemTypeCPUInput, i)``).
CPU_INPUTS = {"Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1},
              "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Tile": {1}, "Split": {1}, "ReduceSum": {1},
              "ReduceMean": {1}, "ReduceMax": {1}, "Pad": {1, 2, 3}, "TopK": {1}, "Trilu": {1}, "Clip": {1, 2},
              "CumSum": {1}, "OneHot": {1}}
#: CUDA kernels whose output is in CPU memory.
CPU_OUTPUTS = {"Shape", "Size"}
#: Ops our graphs use with no CUDA kernel for their types (ArgMax over the int64 attention mask).
NO_CUDA_KERNEL = {"ArgMax"}
SMALL_INITIALIZER = 100


def basic_optimized(path: Path, workdir: Path) -> Any:
    """The graph after ONNX Runtime's basic (provider-independent) optimizations, without its weights."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(workdir / "basic.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(workdir / "basic.onnx"), load_external_data=False)


def placement(model: Any) -> dict[str, Any]:
    """CPU nodes by op type and the device-to-host / host-to-device crossings of ``model``'s graph."""
    import onnx
    from onnx import TensorProto

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    dtypes = {i.name: i.data_type for i in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    for value in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        dtypes.setdefault(value.name, value.type.tensor_type.elem_type)
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = collections.defaultdict(list)
    producer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            consumers[name].append(k)
        for name in node.output:
            producer[name] = k

    def small_initializer(name: str) -> bool:
        tensor = initializers.get(name)
        if tensor is None:
            return False
        size = 1
        for dim in tensor.dims:
            size *= dim
        return size <= SMALL_INITIALIZER

    cuda = {k for k, node in enumerate(nodes) if node.op_type not in NO_CUDA_KERNEL}
    cpu_nodes = set(range(len(nodes))) - cuda
    cpu_tensors: set[str] = set()
    candidates: list[int] = []
    for k in cuda:
        if nodes[k].op_type in CPU_OUTPUTS:
            for name in nodes[k].output:
                cpu_tensors.add(name)
                for c in consumers[name]:
                    heapq.heappush(candidates, c)
    visited: set[int] = set()
    while candidates:
        k = heapq.heappop(candidates)
        if k in visited:
            continue
        visited.add(k)
        node = nodes[k]
        if k in cuda:
            movable = True
            for index, name in enumerate(node.input):
                if not name:
                    continue
                if dtypes.get(name) in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                    movable = False
                    break
                if small_initializer(name) or name in graph_inputs:
                    continue
                if name not in cpu_tensors or index in CPU_INPUTS.get(node.op_type, ()):
                    movable = False
                    break
            if not movable:
                continue
            cpu_nodes.add(k)
        for name in node.output:
            cpu_tensors.add(name)
            for c in consumers[name]:
                heapq.heappush(candidates, c)

    def on_cpu(name: str) -> bool | None:
        if name in graph_inputs or name in initializers or name not in producer:
            return None  # placed wherever it is needed, once
        k = producer[name]
        return k in cpu_nodes or nodes[k].op_type in CPU_OUTPUTS

    to_host: collections.Counter[str] = collections.Counter()
    to_device: collections.Counter[str] = collections.Counter()
    for k, node in enumerate(nodes):
        for index, name in enumerate(node.input):
            where = on_cpu(name) if name else None
            if where is None:
                continue
            wants_cpu = k in cpu_nodes or index in CPU_INPUTS.get(node.op_type, ())
            crossing = f"{nodes[producer[name]].op_type} -> {node.op_type}[{index}]"
            if wants_cpu and not where:
                to_host[crossing] += 1
            elif not wants_cpu and where:
                to_device[crossing] += 1
    return {"nodes": len(nodes), "cpu_nodes": len(cpu_nodes),
            "cpu_ops": dict(collections.Counter(nodes[k].op_type for k in cpu_nodes).most_common()),
            "device_to_host": dict(to_host.most_common()), "host_to_device": dict(to_device.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            result = placement(basic_optimized(path, Path(tmp)))
        log.info("%s: %d nodes, %d on the CPU %s", path, result["nodes"], result["cpu_nodes"], result["cpu_ops"])
        log.info("  device -> host (%d): %s", sum(result["device_to_host"].values()), result["device_to_host"])
        log.info("  host -> device (%d): %s", sum(result["host_to_device"].values()), result["host_to_device"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
