"""export/memory.py (the plan and the pre-flight check) and the streaming save of export/onnx_export.py."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tritonembed.artifact import PROTOBUF_LIMIT_BYTES
from tritonembed.errors import ExportError
from tritonembed.export import memory
from tritonembed.export.memory import GIB, StageLog, check_resources, checkpoint_fp32_bytes, plan_export


def write_safetensors_header(path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file whose header declares ``tensors``; the data is zeros (only the header is read)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape)) * {"BF16": 2, "F32": 4}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_fp32_bytes_come_from_the_parameter_count_not_the_file_size(tmp_path):
    write_safetensors_header(tmp_path / "model.safetensors", {"a": ("BF16", [1000, 64]), "b": ("BF16", [64])})
    assert checkpoint_fp32_bytes(tmp_path) == 4 * (64_000 + 64)
    plan = plan_export(tmp_path)
    # under 2 GiB the trace serializes the proto, weights included, in memory
    assert plan.ram_bytes == memory.BASE_OVERHEAD_BYTES + int(memory.PEAK_FP32_COPIES_IN_MEMORY_PROTO * plan.fp32_weight_bytes)


def test_a_model_past_the_protobuf_limit_is_planned_with_external_weights(tmp_path):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [40_000, 16_384], "data_offsets": [0, 2 * 40_000 * 16_384]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)  # the header is all it reads
    plan = plan_export(tmp_path)
    assert plan.fp32_weight_bytes == 4 * 40_000 * 16_384 > PROTOBUF_LIMIT_BYTES
    assert plan.ram_bytes == memory.BASE_OVERHEAD_BYTES + int(memory.PEAK_FP32_COPIES * plan.fp32_weight_bytes)


def test_a_streamed_export_is_planned_from_the_16_bit_checkpoint(tmp_path):
    """Built node by node and checked with bf16 weights: 1.5 GiB + 1.25 x the bf16 size, whatever the size."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [40_000, 16_384], "data_offsets": [0, 2 * 40_000 * 16_384]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    plan = plan_export(tmp_path, streamed=True)
    bf16 = 2 * 40_000 * 16_384
    assert plan.ram_bytes == memory.BASE_OVERHEAD_BYTES + int(1.25 * bf16) < plan_export(tmp_path).ram_bytes
    assert plan.disk_bytes == int(memory.STREAMED_DISK_FP32_COPIES * 2 * bf16) < plan_export(tmp_path).disk_bytes


def test_check_refuses_to_start_when_ram_is_short_and_says_how_much(tmp_path, monkeypatch):
    write_safetensors_header(tmp_path / "model.safetensors", {"w": ("BF16", [1024, 1024])})
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: int(0.5 * GIB))
    monkeypatch.delenv("TRITONEMBED_EXPORT_SKIP_RESOURCE_CHECK", raising=False)
    with pytest.raises(ExportError, match=r"RAM: needs ~1\.5 GiB, 0\.5 GiB available"):
        check_resources(tmp_path, tmp_path)
    monkeypatch.setenv("TRITONEMBED_EXPORT_SKIP_RESOURCE_CHECK", "1")
    assert check_resources(tmp_path, tmp_path).fp32_weight_bytes == 4 * 1024 * 1024


def test_check_refuses_when_the_disk_is_short(tmp_path, monkeypatch):
    write_safetensors_header(tmp_path / "model.safetensors", {"w": ("BF16", [1024, 1024])})
    monkeypatch.setattr(memory, "available_ram_bytes", lambda: 64 * GIB)
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _: type("U", (), {"free": 1024})())
    with pytest.raises(ExportError, match="disk under"):
        check_resources(tmp_path, tmp_path)


def test_stage_log_records_each_stages_own_peak():
    """Each stage reports the peak since the previous one (so the report shows which stage holds what)."""
    stages = StageLog("t")
    stages.stage("a")
    held = bytearray(256 * 1024**2)
    held[::4096] = b"x" * len(held[::4096])  # touch every page: calloc'd pages are not resident until written
    del held  # freed within stage b: its peak still saw it
    stages.stage("b")
    stages.stage("c")
    a, b, c = (s["peak_rss_gib"] for s in stages.stages)
    assert [s["stage"] for s in stages.stages] == ["a", "b", "c"]
    assert b >= a + 0.2  # the 256 MiB buffer lived during stage b
    if memory.reset_peak_rss():  # Linux: the window restarts, so stage c does not inherit b's peak
        assert c <= b - 0.2
    assert stages.peak_rss_gib == max(a, b, c)


def test_streaming_save_keeps_every_weight_and_the_outputs(tmp_path):
    """A graph saved as torch saves a large one (one file per tensor) is rewritten into one data file."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tritonembed.artifact import onnx_files
    from tritonembed.export.onnx_export import _load_small_external, _save_streaming

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 300)).astype(np.float32), rng.standard_normal((300, 5)).astype(np.float32)
    shape = np.array([1, -1], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
         helper.make_node("Reshape", ["y0", "shape"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(shape, "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    staged = tmp_path / "staging"
    staged.mkdir()
    onnx.save(model, str(staged / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    loaded = onnx.load(str(staged / "model.onnx"), load_external_data=False)
    _load_small_external(loaded, staged)
    by_name = {t.name: t for t in loaded.graph.initializer}
    assert by_name["shape"].data_location == TensorProto.DEFAULT  # integers are read: shape arithmetic needs them
    assert by_name["w1"].data_location == TensorProto.EXTERNAL  # float weights stay on disk
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    files = _save_streaming(loaded, staged, out)
    assert files == onnx_files(out) and len(files) == 2
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    again = onnx.load(str(out))
    np.testing.assert_array_equal(numpy_helper.to_array({t.name: t for t in again.graph.initializer}["w1"]), w1)


@pytest.mark.parametrize("content", [b"not a safetensors file", b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", b"\x01"])
def test_a_file_that_is_not_safetensors_is_a_typed_error_not_an_allocation(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ExportError, match="cannot load weights"):
        checkpoint_fp32_bytes(tmp_path)
