"""Smoke test of ``python -m lab.client_overhead``: it runs and its result is well formed.

Timings are not asserted (they are the benchmark's output, docs/benchmarks.md), only that every leg
produced a positive p50 in every round and the differences are taken against perf_analyzer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.client_overhead import LEGS, main

pytestmark = pytest.mark.integration


def test_client_overhead_runs_every_leg(minilm_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    assert main([str(minilm_export), "--rounds", "2", "--texts", "3", "--samples", "6", "--threads", "1",
                 "--workdir", str(tmp_path / "work"), "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    for row in result["rounds"]:
        assert sorted(row) == sorted(LEGS) and all(v > 0 for v in row.values())
    assert result["over_perf_analyzer_ms"]["perf_analyzer"] == 0
    assert set(result["median_p50_ms"]) == set(LEGS)
