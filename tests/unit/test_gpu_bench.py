"""Pure parts of the GPU benchmark: FLOP counts, peak lookup, padding, probe rows, profile parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tritonembed.benchmarks.flops import layer_weight_parameters, pass_flops, peak_flops, useful_flops
from tritonembed.benchmarks.gpu import PAD_ID, pad_left, placement, probe_rows, quantize_lanes
from tritonembed.export.testmodels import QWEN3_SHAPES


def test_layer_parameters_of_the_0_6b_shape() -> None:
    # q 1024x2048, k/v 1024x1024 each, o 2048x1024, gate/up/down 3 x 1024x3072
    assert layer_weight_parameters(QWEN3_SHAPES["0.6B"]) == 2 * 1024 * 2048 + 2 * 1024 * 1024 + 3 * 1024 * 3072


def test_pass_flops_counts_weights_and_full_square_attention() -> None:
    shape = QWEN3_SHAPES["tiny"]  # 2 layers, hidden 64, 4 heads x 16, 2 kv heads, intermediate 128
    per_layer_weights = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    expected = 2 * (2 * 3 * 10 * per_layer_weights + 4 * 3 * 10 * 10 * 4 * 16)
    assert pass_flops(shape, rows=3, length=10) == expected


def test_useful_flops_ignore_padding() -> None:
    shape = QWEN3_SHAPES["tiny"]
    assert useful_flops(shape, [5, 10]) == pass_flops(shape, 1, 5) + pass_flops(shape, 1, 10)
    assert useful_flops(shape, [5, 10]) < pass_flops(shape, 2, 10)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H200", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756.0e12),
    ("NVIDIA L4", 121.0e12), ("NVIDIA L40S", 362.05e12), ("Tesla T4", None)])
def test_peak_flops_by_name(name: str, peak: float | None) -> None:
    assert peak_flops(name) == peak


def test_pad_left_puts_padding_first() -> None:
    ids, mask = pad_left([[7, 8, 9], [5]])
    assert ids.tolist() == [[7, 8, 9], [PAD_ID, PAD_ID, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == np.int64 and mask.dtype == np.int64


def test_probe_rows_have_the_asked_lengths_capped_by_the_stream() -> None:
    rows = probe_rows([[1, 2, 3], [4, 5, 6, 7]], lengths=(1, 3, 100))
    assert [len(r) for r in rows] == [1, 3, 7]
    assert rows[0] == [1] and rows[1] == [2, 3, 4]


def test_placement_counts_kernels_and_time_per_provider(tmp_path) -> None:
    def node(name: str, provider: str, op: str, dur: int) -> dict:
        return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "args": {"provider": provider, "op_name": op}}

    events = [node("a", "CUDAExecutionProvider", "MatMul", 90), node("b", "CPUExecutionProvider", "Gather", 6),
              node("c", "CPUExecutionProvider", "Gather", 4),
              {"cat": "Node", "name": "a_fence_before", "dur": 1, "args": {"provider": "CUDAExecutionProvider"}},
              {"cat": "Session", "name": "model_run", "dur": 200}]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(events))
    got = placement(profile)
    assert got["nodes"] == {"CUDAExecutionProvider": 1, "CPUExecutionProvider": 2}
    assert got["kernel_us"] == {"CUDAExecutionProvider": 90, "CPUExecutionProvider": 10}
    assert got["cpu_time_share"] == 0.1 and got["cpu_ops"] == {"Gather": 2}


@pytest.mark.parametrize("precisions,lanes", [
    (["fp32", "int4", "int4-fp16"], (["int4"], ["fp16", "int4-fp16"])),  # fp16 made first, for int4-fp16
    (["fp32"], ([], [])),
    (["fp16", "w8", "int8"], (["w8", "int8"], ["fp16"])),
    (["w8-fp16", "fp16"], ([], ["fp16", "w8-fp16"])),
    (["fp16", "fp16-traced", "fp32-traced"], (["fp16-traced"], ["fp16"]))])  # fp32-traced is exported, not quantized
def test_quantize_lanes(precisions: list[str], lanes: tuple[list[str], list[str]]) -> None:
    assert quantize_lanes(precisions) == lanes


def _result_file(path, rows):
    path.write_text(json.dumps({"results": rows}))
    return path


def test_plot_rows_skip_failures_and_let_later_files_win(tmp_path) -> None:
    from tritonembed.benchmarks.gpu_plot import measured_rows, plot

    def row(precision: str, tokens: float) -> dict:
        return {"shape": "0.6B", "precision": precision, "bulk": [{"tokens_per_s": tokens}],
                "fixed": {"tokens_per_s": 2 * tokens}, "gpu_memory": {"process_bytes": 2**30}}

    first = _result_file(tmp_path / "a.json", [row("fp32", 1.0), {"shape": "0.6B", "precision": "fp16", "error": "x"}])
    second = _result_file(tmp_path / "b.json", [row("fp32", 3.0), row("fp16", 5.0)])
    rows = measured_rows([first, second])
    assert {p: r["bulk"][0]["tokens_per_s"] for p, r in rows["0.6B"].items()} == {"fp32": 3.0, "fp16": 5.0}
    assert set(measured_rows([first])["0.6B"]) == {"fp32"}
    png = plot(rows, tmp_path / "img" / "gpu.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
