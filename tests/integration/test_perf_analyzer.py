"""perf_analyzer (installed by scripts/bootstrap.sh) profiles the real ensemble; only well-formedness is checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_perf_command_profiles_the_ensemble(triton, tmp_path):
    spec = triton.specs["minilm"]
    proc = subprocess.run(
        [sys.executable, "-m", "tritonembed.cli", "perf", spec.name, "--url", triton.grpc_url, "--concurrency", "1:2:1",
         "--measurement-ms", "1000", "--texts", "32",
         "--requests", "16", "--max-trials", "10", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(cols[0]) for cols in lines] == [1, 2]
    assert all(float(cols[1]) > 0 for cols in lines), proc.stdout
    assert (tmp_path / "perf.csv").is_file() and (tmp_path / "input_data.json").is_file()
