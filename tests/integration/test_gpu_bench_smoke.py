"""``python -m tritonembed.benchmarks.gpu`` end to end on ONNX Runtime's CPU provider (no GPU here).

The same code path the GPU run takes -- random Qwen3 in memory, the product's exporter and quantizer,
one measuring process per variant -- on the ``tiny`` shape. Only well-formedness is checked, never
timings; the CUDA provider itself was exercised on an H200 (docs/benchmarks-gpu.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _gpu_bench(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tritonembed.benchmarks.gpu", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_bench_runs_on_the_cpu_provider(qwen_export: Path, tmp_path: Path) -> None:
    workload = tmp_path / "workload.json"
    _gpu_bench("workload", "--export-dir", str(qwen_export), "--texts", "64", "-o", str(workload))
    ids = json.loads(workload.read_text())
    assert len(ids["mixed"]) == 64 and ids["short"]
    assert all(row[-1] == 151643 for row in ids["mixed"])  # Qwen3's appended <|endoftext|>

    output = tmp_path / "gpu.json"
    _gpu_bench("run", "--shapes", "tiny", "--precisions", "fp32,fp16,int4-fp16,fp16-traced", "--provider", "cpu", "--threads", "1",
               "--workdir", str(tmp_path / "work"), "--workload", str(workload), "--max-tokens", "256,1024",
               "--seconds", "0.05", "-o", str(output))
    result = json.loads(output.read_text())
    assert result["workload"]["mixed_texts"] == 64 and "CPUExecutionProvider" in result["system"]["providers"]
    rows = {r["precision"]: r for r in result["results"]}
    assert set(rows) == {"fp32", "fp16", "int4-fp16", "fp16-traced"}
    for precision, row in rows.items():
        assert "error" not in row, row.get("error")
        assert row["reference"]["ok"] and row["reference"]["finite"], row["reference"]
        assert [b["max_tokens"] for b in row["bulk"]] == [256, 1024]
        for b in row["bulk"]:
            assert b["tokens_per_s"] > 0 and 0 <= b["padding_waste"] < 1 and b["micro_batches"] >= 1
        for phase in ("batch32", "batch1_short"):
            assert 0 < row[phase]["p50_ms"] <= row[phase]["p99_ms"], (precision, phase)
        assert row["fixed"]["tflops"] > 0 and row["model_bytes"] > 0
        assert row["placement"]["nodes"].get("CPUExecutionProvider", 0) > 0
    assert rows["fp32"]["reference"]["min_cosine"] >= 0.999
    # the traced graph keeps the shape arithmetic that static shapes removed, and computes the same
    nodes = {p: sum(rows[p]["placement"]["nodes"].values()) for p in ("fp16", "fp16-traced")}
    assert nodes["fp16-traced"] > nodes["fp16"], nodes
    assert (tmp_path / "work" / "tiny" / "int4-fp16" / "DONE").exists()
