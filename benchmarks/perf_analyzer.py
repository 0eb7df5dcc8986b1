"""Run Triton's ``perf_analyzer`` against a served ensemble with realistic BYTES input.

The binary comes from the ``tritonclient==2.50.0`` wheel (``scripts/bootstrap.sh`` unpacks it to
``.venv/opt/perf_analyzer``); newer wheels need glibc 2.38. Input texts are STS-B sentences plus longer
passages, so the length distribution resembles real traffic.

    tritonembed perf all-MiniLM-L6-v2 --url 127.0.0.1:8001 --concurrency 1:8:2 --batch-size 1
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tritonembed.errors import TritonEmbedError

log = logging.getLogger(__name__)


class PerfAnalyzerError(TritonEmbedError):
    """perf_analyzer is missing, failed, or printed no results."""


@dataclass(frozen=True)
class PerfRow:
    """One concurrency level: requests/s, texts/s and client-side latency percentiles (ms)."""

    concurrency: int
    batch_size: int
    requests_per_s: float
    texts_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def find_perf_analyzer() -> Path:
    """Raises: PerfAnalyzerError when the binary is not installed (run ``make install``)."""
    override = os.environ.get("TRITONEMBED_PERF_ANALYZER")
    candidates = [Path(override)] if override else []
    candidates.append(Path(sys.prefix) / "opt" / "perf_analyzer" / "perf_analyzer")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise PerfAnalyzerError(f"perf_analyzer not found (looked at {', '.join(map(str, candidates))}); run `make install`")


def workload_texts(count: int = 256, seed: int = 0) -> list[str]:
    """STS-B sentences (short) mixed with multi-sentence passages (long), deterministic."""
    from tritonembed.export import stsb

    sentences: list[str] = []
    try:
        for pair in stsb.load_stsb("en"):
            sentences += [pair.sentence1, pair.sentence2]
    except TritonEmbedError as exc:
        raise PerfAnalyzerError(f"workload needs the STS-B data: {exc}") from exc
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        if i % 4 == 3:  # one in four is a passage of 5-20 sentences
            texts.append(" ".join(rng.sample(sentences, rng.randint(5, 20))))
        else:
            texts.append(rng.choice(sentences))
    return texts


def write_input_data(path: Path, texts: list[str]) -> Path:
    """perf_analyzer's ``--input-data`` JSON: one TEXT per entry (BYTES, shape [1])."""
    path.write_text(json.dumps({"data": [{"TEXT": [t]} for t in texts]}, ensure_ascii=False), encoding="utf-8")
    return path


def perf_env() -> dict[str, str]:
    binary_dir = find_perf_analyzer().parent
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(binary_dir / "lib"), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def run_perf_analyzer(
    model: str,
    url: str,
    workdir: Path,
    *,
    concurrency: str = "1:4:1",
    batch_size: int = 1,
    protocol: str = "grpc",
    measurement_ms: int = 3000,
    texts: list[str] | None = None,
    timeout: float = 600.0,
    request_count: int | None = None,
    max_trials: int = 3,
) -> list[PerfRow]:
    """Profile ``model`` at ``url`` over a concurrency range; returns one row per level.

    With ``request_count``, each measurement window is that many requests (``count_windows`` mode)
    instead of ``measurement_ms``: slow requests (large batches, a loaded machine) still get measured.

    Windows are compared on average latency and throughput (no ``--percentile``): with a mixed-length
    workload a window's p95 swings with the few passages it happens to hold. The CSV still has p50-p99.

    Raises:
        PerfAnalyzerError: the binary is missing, exits non-zero, or writes no CSV.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_input_data(workdir / "input_data.json", texts or workload_texts())
    csv_path = workdir / "perf.csv"
    cmd = [str(find_perf_analyzer()), "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
           "--input-data", str(data), "--concurrency-range", concurrency,
           "--measurement-interval", str(measurement_ms), "--stability-percentage", "999",
           "--max-trials", str(max_trials), "-f", str(csv_path)]
    if request_count is not None:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(request_count)]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=perf_env())
    (workdir / "perf_analyzer.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise PerfAnalyzerError(f"perf_analyzer exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return parse_csv(csv_path, batch_size)


def parse_csv(path: Path, batch_size: int) -> list[PerfRow]:
    """Raises: PerfAnalyzerError when the CSV is missing or has no rows."""
    if not path.is_file():
        raise PerfAnalyzerError(f"perf_analyzer wrote no results to {path}")
    rows = []
    latency_parts = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                     "Server Compute Infer", "Server Compute Output", "Client Recv")
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            ips = float(rec["Inferences/Second"])

            def ms(column: str, rec: dict = rec) -> float:
                return round(float(rec.get(column) or 0.0) / 1000, 3)

            avg_us = sum(float(rec.get(k) or 0.0) for k in latency_parts)
            rows.append(PerfRow(
                concurrency=int(float(rec["Concurrency"])),
                batch_size=batch_size,
                requests_per_s=round(ips / batch_size, 3),
                texts_per_s=round(ips, 3),
                p50_ms=ms("p50 latency"),
                p90_ms=ms("p90 latency"),
                p95_ms=ms("p95 latency"),
                p99_ms=ms("p99 latency"),
                avg_ms=round(avg_us / 1000, 3),
            ))
    rows.sort(key=lambda r: r.concurrency)
    if not rows:
        raise PerfAnalyzerError(f"no result rows in {path}")
    return rows
