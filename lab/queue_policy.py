"""Same server, with and without a Triton queue policy: the 500 ms idle-wake stall, measured.

Builds the CPU repository twice from one export -- ``max_queue_size=N`` (a ``default_queue_policy`` with
``REJECT``) and ``0`` (no policy) -- and profiles one short text at concurrency 1 with perf_analyzer,
against the tokenizer model alone and against the whole ensemble. Queue time (summed over the models
a request went through) comes from Triton's statistics API, as a delta around each run. Alternating the
two servers cancels slow load swings.

    python -m lab.queue_policy EXPORT_DIR [--requests 1000] [--rounds 1] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tritonembed.benchmarks.report import table

log = logging.getLogger("lab.queue_policy")


def measure(export_dir: Path, *, queue_size: int, requests: int, threads: int, workdir: Path) -> list[dict[str, Any]]:
    """Rows for the tokenizer alone and for the ensemble, one server with ``max_queue_size=queue_size``.

    Raises:
        LaunchError: the server does not start. PerfAnalyzerError: perf_analyzer fails.
    """
    from tritonembed.benchmarks import stats as st
    from tritonembed.benchmarks.bench import http_get, short_sentences
    from tritonembed.benchmarks.perf_analyzer import run_perf_analyzer
    from tritonembed.launcher import TritonServer
    from tritonembed.model_repository.assemble import build_repository
    from tritonembed.model_repository.configs import ServingOptions

    label = f"max_queue_size={queue_size}" if queue_size else "no queue policy"
    root = workdir / f"q{queue_size}"
    options = ServingOptions(profile="cpu", intra_op_threads=threads, max_queue_size=queue_size)
    [spec] = build_repository(root / "models", [export_dir], options)
    texts = short_sentences(64)
    rows = []
    with TritonServer(root / "models", log_file=root / "tritonserver.log") as server:
        composing = (spec.tokenizer_model_name, spec.encoder_model_name)

        def snapshot() -> dict[str, dict[str, float]]:
            return {m: st.model_stats(json.loads(http_get(f"http://{server.http_url}/v2/models/{m}/stats")))
                    for m in composing}

        for model in (spec.tokenizer_model_name, spec.name):
            before = snapshot()
            [row] = run_perf_analyzer(model, server.grpc_url, root / model, concurrency="1", texts=texts,
                                      request_count=requests, max_trials=4)
            after = snapshot()
            # queue time of the composing models that this run went through, per request
            queue_us = sum(st.stats_breakdown(st.counter_delta(after[m], before[m]))["queue_us"] or 0.0
                           for m in (composing if model == spec.name else composing[:1]))
            rows.append({"server": label, "model": "tokenizer alone" if model != spec.name else "ensemble",
                         "requests_per_s": row.requests_per_s, "p50_ms": row.p50_ms, "p99_ms": row.p99_ms,
                         "queue_us": round(queue_us, 1)})
            log.info("%s", rows[-1])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.queue_policy")
    p.add_argument("export_dir", type=Path)
    p.add_argument("--queue-size", type=int, default=512, help="the bounded variant's max_queue_size")
    p.add_argument("--requests", type=int, default=1000, help="requests per perf_analyzer window")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tritonembed-queue-") as tmp:
        for _ in range(args.rounds):
            for size in (args.queue_size, 0):
                rows += measure(args.export_dir, queue_size=size, requests=args.requests, threads=args.threads,
                                workdir=Path(tmp))
    print(table(["server", "model", "requests/s", "p50 ms", "p99 ms", "avg queue µs"],
                [[r["server"], r["model"], f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.1f}",
                  str(r["queue_us"])] for r in rows]))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
