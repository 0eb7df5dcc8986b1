"""Benchmark sub-commands of ``tritonembed``: ``perf`` (perf_analyzer against a running server)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tritonembed.cli import env_default


def register(sub) -> None:
    p = sub.add_parser("perf", help="profile a served ensemble with perf_analyzer and realistic BYTES input")
    p.add_argument("model", help="served model name, e.g. all-MiniLM-L6-v2")
    p.add_argument("--url", default=env_default("triton_url", "127.0.0.1:8001"), help="Triton gRPC (or HTTP) address")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--concurrency", default="1:8:1", help="perf_analyzer concurrency range start:end:step")
    p.add_argument("--batch-size", type=int, default=1, help="texts per request")
    p.add_argument("--measurement-ms", type=int, default=5000)
    p.add_argument("--texts", type=int, default=256, help="distinct workload texts")
    p.add_argument("--workdir", type=Path, default=None, help="keep input data, CSV and log here")
    p.set_defaults(func=cmd_perf)


def cmd_perf(args: argparse.Namespace) -> int:
    from tritonembed.benchmarks.perf_analyzer import run_perf_analyzer, workload_texts

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tritonembed-perf-"))
    rows = run_perf_analyzer(args.model, args.url, workdir, concurrency=args.concurrency, batch_size=args.batch_size,
                             protocol=args.protocol, measurement_ms=args.measurement_ms,
                             texts=workload_texts(args.texts))
    print(f"{'concurrency':>11} {'texts/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r.concurrency:>11} {r.texts_per_s:>9.1f} {r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f}")
    (workdir / "perf.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    print(f"details: {workdir}")
    return 0
