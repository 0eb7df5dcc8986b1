"""``tritonembed bench --smoke`` end to end: real tritonserver, perf_analyzer, client, gateway, bare ORT.

Only well-formedness is checked (every expected key, positive numbers); never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUMMARY_NUMBERS = ("ours_grpc_best_texts_per_s", "async_client_best_texts_per_s", "gateway_best_texts_per_s",
                   "bare_ort_best_texts_per_s", "ours_short_p50_ms", "bare_ort_short_p50_ms")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_bench_smoke_writes_well_formed_json(tmp_path):
    output = tmp_path / "bench.json"
    report = tmp_path / "docs" / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, "-m", "tritonembed.cli", "bench", "--smoke", "--workdir", str(tmp_path / "work"),
         "--output", str(output), "--report", str(report)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(output.read_text())

    for key in ("schema_version", "command", "config", "machine", "load_average_start", "load_average_end", "gpu",
                "models", "notes", "seconds"):
        assert key in result, key
    assert result["config"]["mode"] == "smoke"
    assert list(result["models"]) == ["minilm"]
    model = result["models"]["minilm"]
    for key in ("workloads", "bare_ort", "ours", "variants", "precisions", "peer", "summary"):
        assert key in model, key
    assert "skipped" in model["peer"]  # the smoke mode never starts a peer

    assert _positive(model["bare_ort"]["peak_rss_bytes"])
    assert {(r["workload"], r["batch_size"]) for r in model["bare_ort"]["results"]} == {
        ("mixed", 1), ("mixed", 32), ("mixed_sorted", 32), ("short", 1)}

    ours = model["ours"]
    assert _positive(ours["peak_rss_bytes"]) and _positive(ours["startup_s"])
    perf = ours["perf"]
    assert [(r["workload"], r["batch_size"]) for r in perf] == [("short", 1), ("mixed", 1), ("mixed", 32)]
    for row in perf:
        for key in ("texts_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms", "avg_encoder_batch"):
            assert _positive(row[key]), (key, row)
        assert 0 <= row["padding_waste"] < 1
        assert row["encoder_counters"]["encoder_rows"] > 0
        assert row["encoder"]["requests"] > 0 and row["tokenizer"]["queue_us"] is not None
    mixed_b32 = perf[2]
    assert mixed_b32["avg_encoder_batch"] >= 1
    paired = ours["paired"]
    assert len(paired["rounds"]) >= 1 and _positive(paired["throughput_ratio"])
    assert _positive(paired["ours_short_p50_ms"]) and _positive(paired["bare_ort_short_p50_ms"])
    for section in ("async_client", "gateway"):
        rows = ours[section]
        assert [(r["workload"], r["batch_size"]) for r in rows] == [("short", 1), ("mixed", 1), ("mixed", 32)]
        for row in rows:
            assert _positive(row["texts_per_s"]) and _positive(row["tokens_per_s"])
            assert 0 < row["latency"]["p50_ms"] <= row["latency"]["p95_ms"] <= row["latency"]["p99_ms"]

    summary = model["summary"]
    for key in SUMMARY_NUMBERS:
        assert _positive(summary[key]), (key, summary[key])
    assert summary["ratios"]["ours_over_bare_ort"] > 0
    assert [g["name"] for g in summary["goals"]] and all(set(g) >= {"name", "target", "measured", "met"}
                                                         for g in summary["goals"])
    assert _positive(model["precisions"]["fp32"]["server_peak_rss_bytes"])

    text = report.read_text()
    assert "<!-- bench:begin -->" in text and "× bare ORT" in text
