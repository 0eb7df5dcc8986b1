"""The GPU machine's Triton-ensemble run (scripts/device/gpu_ensemble_run.sh), dry-run here on the CPU provider.

The same shell script and driver (scripts/device/gpu_ensemble.py) as on the GPU machine, every step in the
same order (build fp16 then int4, torch, serve-fp16, the caps, serve-int4), on the tiny Qwen3 shape with small
sizes; tritonserver and perf_analyzer are staged and packed by scripts/device/payload.py as part b is, and unpacked by
the run script (the server with only the bundled libraries the payload keeps), so a missing library or a script
error shows here, not on device minutes. What it cannot cover: the CUDA provider, KIND_GPU, NVML, the cp312
wheels and the 3.12 stub (scripts/device/build_payload.sh builds those parts; call 2's preflight checks them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device" / "gpu_ensemble_run.sh"
PAYLOAD = ROOT / "scripts" / "device" / "payload.py"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, Path]:
    root = tmp_path_factory.mktemp("gpu-ensemble")
    stage, parts, payload = root / "stage", root / "parts", root / "unpacked"
    for part, extra in (("triton", ["--python", PY]), ("perf", [])):
        subprocess.run([sys.executable, str(PAYLOAD), part, str(stage / part), *extra], check=True, timeout=120)
        # packed as build_payload.sh packs part b (a fast xz level), unpacked by the run script
        subprocess.run([sys.executable, str(PAYLOAD), "pack", str(stage / part), str(parts / "b" / f"{part}.tar.xz"),
                        "--level", "0"], check=True, timeout=300)
    out = root / "out"
    env = {**os.environ, "GPU_ENSEMBLE_DIR": str(payload), "GPU_ENSEMBLE_WORK": str(root / "work"),
           "GPU_ENSEMBLE_PAYLOAD": str(parts), "PY": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads((out / "gpu-ensemble.json").read_text()), log, payload


def test_the_staged_server_is_the_payload_one_with_only_the_kept_libraries(dry_run):
    data, log, payload = dry_run
    assert "unpacked triton" in log and "unpacked perf" in log
    kept = {p.name for p in (payload / "triton" / "nvidia_pytriton.libs").iterdir()}
    assert not any(name.startswith("libpython3") for name in kept)  # the wheel's 3.13 copy is dropped
    assert (payload / "triton" / "pytriton" / "tritonserver" / "backends" / "python" / "triton_python_backend_stub").is_file()
    assert {"libb64.so.0d", "libcudart.so.12"} <= {p.name for p in (payload / "perf" / "lib").iterdir()}
    # the run used the staged binaries, not the pip ones
    assert data["system"]["tritonserver"] == str(payload / "triton" / "pytriton" / "tritonserver" / "bin" / "tritonserver")
    assert data["system"]["perf_analyzer"] == str(payload / "perf" / "perf_analyzer")
    assert data["invocations"] and all(inv["args"]["provider"] == "cpu" for inv in data["invocations"])


def test_every_step_ran_without_an_error(dry_run):
    data, log, _ = dry_run
    assert data["failed"] == [], log[-3000:]
    phases = data["phases"]
    assert set(phases) == {"build", "torch", "serve", "caps"}
    assert set(phases["serve"]) == {"tiny/fp16", "tiny/int4"}
    assert set(phases["caps"]) == {"tiny/fp16@1GiB", "tiny/int4@0.5GiB", "tiny/fp16@0.75GiB"}
    builds = phases["build"]
    assert len(builds) == 2 and all(b["attention"]["kind"] == "com.microsoft.GroupQueryAttention" for b in builds.values())


def test_the_ensemble_serves_the_gpu_profile_and_matches_pytorch(dry_run):
    serve = dry_run[0]["phases"]["serve"]
    for key, row in serve.items():
        assert row["kind"] == "KIND_CPU"  # the gpu profile's Python encoder with execution_provider=cpu
        assert row["vs_torch"]["min_cosine"] >= row["vs_torch"]["floor"], key
        assert row["vs_torch"]["token_counts_match"], key
        assert [r["concurrency"] for r in row["perf_analyzer"]["rows"]] == [1, 2]
        assert row["perf_analyzer"]["saturation_tokens_per_s"] > 0
        assert row["gateway"]["tokens_per_s"] > 0 and row["gateway"]["calls"] == 3
        assert row["fixed"]["rows"] == 4 and row["fixed"]["tokens_per_s"] > 0
        assert row["bare_encoder"]["tokens_per_s"] > 0 and row["bare_encoder"]["reference"]["ok"], key
        assert row["ensemble_over_bare"] > 0
        assert row["memory"]["peak_bytes"] > 0


def test_pytorch_ran_each_dtype_on_sorted_batches(dry_run):
    torch_rows = dry_run[0]["phases"]["torch"]
    assert {"tiny/fp32", "tiny/bf16"} <= set(torch_rows)
    for key in ("tiny/fp32", "tiny/bf16"):
        assert torch_rows[key]["workload"]["batch"] == 32 and torch_rows[key]["workload"]["tokens_per_s"] > 0
    assert torch_rows["tiny/fp32"]["reference"] is True


def test_the_worst_case_fits_each_grant_and_the_guard_sheds_then_recovers(dry_run):
    for key, row in dry_run[0]["phases"]["caps"].items():
        assert row["ok"], (key, row["failures"])
        assert row["long"]["texts"] == 4 and row["long"]["tokens_per_text"] >= 256
        assert row["longest"]["tokens_per_text"] >= 1024
        assert row["long"]["min_cosine_vs_torch"] >= 0.5 and row["longest"]["finite"]
        assert row["guard"]["shed"] and row["guard"]["status"] == "StatusCode.UNAVAILABLE"
        assert row["guard"]["recovered"]


def test_the_summary_names_every_measured_row(dry_run):
    data, log, _ = dry_run
    assert len(data["summary"]) == 2 + 2 + 3
    assert "failed: []" in log
