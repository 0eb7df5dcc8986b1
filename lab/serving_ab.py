"""Two serving variants of one export, both up, measured in alternated rounds: which is faster, and by how much.

Each variant is a set of :class:`~tritonembed.model_repository.configs.ServingOptions` overrides written as
in ``tritonembed bench --variants`` (``FIELD=VALUE`` joined by ``+``; ``""`` is the defaults). Both
servers run side by side (an idle server costs next to nothing); each round measures A and B back to
back, in alternating order, so slow swings of load on a shared machine hit both alike:

- one short text at a time through perf_analyzer (C++ gRPC client): p50 and p99;
- single mixed-length texts from 8 concurrent perf_analyzer streams: texts/s;
- the mixed workload embedded in bulk through ``EmbeddingClient.embed`` (texts/s).

B / A is taken within each round; the medians are the verdict.

    python -m lab.serving_ab EXPORT_DIR --b intra_op_spinning=never [--rounds 4] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tritonembed.benchmarks.report import table

log = logging.getLogger("lab.serving_ab")


def measure_once(server: Any, spec: Any, short: Sequence[str], corpus: Sequence[str], workdir: Path,
                 requests: int) -> dict[str, float]:
    """Short-text p50/p99 (perf_analyzer, concurrency 1), many single-text requests (perf_analyzer, the
    mixed texts at concurrency 8: texts/s) and bulk texts/s (``EmbeddingClient.embed``).

    Raises:
        PerfAnalyzerError: perf_analyzer fails. TritonEmbedError: the server refuses the bulk request.
    """
    from tritonembed.benchmarks.perf_analyzer import run_perf_analyzer
    from tritonembed.client import EmbeddingClient

    [row] = run_perf_analyzer(spec.name, server.grpc_url, workdir / "short", concurrency="1:1:1", texts=list(short),
                              request_count=requests, max_trials=3)
    [many] = run_perf_analyzer(spec.name, server.grpc_url, workdir / "c8", concurrency="8:8:1", texts=list(corpus),
                               request_count=requests, max_trials=3)
    with EmbeddingClient(server.grpc_url, model=spec.name) as client:
        client.embed(list(corpus[:2]))  # connect outside the timed call
        started = time.perf_counter()
        client.embed(list(corpus))
        seconds = time.perf_counter() - started
    return {"short_p50_ms": row.p50_ms, "short_p99_ms": row.p99_ms, "c8_texts_per_s": round(many.texts_per_s, 2),
            "bulk_texts_per_s": round(len(corpus) / seconds, 2)}


def compare(export_dir: Path, variants: dict[str, str], *, rounds: int, threads: int, texts: int, requests: int,
            workdir: Path) -> dict[str, Any]:
    """Serve ``export_dir`` once per variant and measure them in alternated rounds.

    Raises:
        ValueError: a variant is not ``FIELD=VALUE`` pairs of ServingOptions. LaunchError: a server does not start.
        PerfAnalyzerError: perf_analyzer fails.
    """
    from dataclasses import replace

    from tritonembed.benchmarks.bench import build_workloads, parse_variant
    from tritonembed.launcher import TritonServer
    from tritonembed.model_repository.assemble import build_repository
    from tritonembed.model_repository.configs import ServingOptions

    workloads = build_workloads(export_dir, texts, 16)
    short, corpus = workloads["short"].texts, workloads["mixed"].texts
    base = ServingOptions(profile="cpu", intra_op_threads=threads)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        servers = {}
        for label, text in variants.items():
            options = replace(base, **(parse_variant(text) if text else {}))
            [spec] = build_repository(workdir / label / "models", [export_dir], options)
            servers[label] = (stack.enter_context(TritonServer(workdir / label / "models",
                                                               log_file=workdir / label / "tritonserver.log")), spec)
        for label, (server, spec) in servers.items():  # warm-up: first requests load lazily imported code
            measure_once(server, spec, short[:4], corpus[:8], workdir / label / "warmup", 16)
        labels = list(servers)
        for k in range(rounds):
            for label in labels if k % 2 == 0 else labels[::-1]:
                server, spec = servers[label]
                row = {"round": k + 1, "variant": label,
                       **measure_once(server, spec, short, corpus, workdir / label / f"round-{k}", requests)}
                log.info("%s", row)
                rows.append(row)
    return {"export_dir": str(export_dir), "variants": variants, "threads": threads, "texts": len(corpus),
            "rows": rows, "summary": summarize(rows, labels)}


def summarize(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, float]:
    """Medians of the per-round B / A ratios (and B - A for the p50), A and B being ``labels``."""
    a, b = labels
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["variant"]] = r
    pairs = [(v[a], v[b]) for v in by_round.values() if a in v and b in v]
    if not pairs:
        return {}

    def median(of: Callable[[dict[str, Any], dict[str, Any]], float]) -> float:
        return round(statistics.median(of(x, y) for x, y in pairs), 3)

    return {
        "short_p50_ms_b_minus_a": median(lambda x, y: y["short_p50_ms"] - x["short_p50_ms"]),
        "short_p99_ms_b_over_a": median(lambda x, y: y["short_p99_ms"] / x["short_p99_ms"]),
        "c8_texts_per_s_b_over_a": median(lambda x, y: y["c8_texts_per_s"] / x["c8_texts_per_s"]),
        "bulk_texts_per_s_b_over_a": median(lambda x, y: y["bulk_texts_per_s"] / x["bulk_texts_per_s"]),
        "rounds": len(pairs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.serving_ab")
    p.add_argument("export_dir", type=Path)
    p.add_argument("--a", default="", help="variant A (default: the defaults)")
    p.add_argument("--b", required=True, help="variant B, e.g. intra_op_spinning=never")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=256, help="texts in the bulk corpus (the bench's mixed workload)")
    p.add_argument("--requests", type=int, default=200, help="short requests per perf_analyzer window")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    variants = {"A": args.a, "B": args.b}
    with tempfile.TemporaryDirectory(prefix="tritonembed-ab-") as tmp:
        result = compare(args.export_dir, variants, rounds=args.rounds, threads=args.threads, texts=args.texts,
                         requests=args.requests, workdir=Path(tmp))
    print(f"A = {args.a or '(defaults)'}; B = {args.b}")
    print(table(["round", "variant", "short p50 ms", "short p99 ms", "texts/s, 8 streams", "bulk texts/s"],
                [[r["round"], r["variant"], f"{r['short_p50_ms']:.2f}", f"{r['short_p99_ms']:.2f}",
                  f"{r['c8_texts_per_s']:.1f}", f"{r['bulk_texts_per_s']:.1f}"] for r in result["rows"]]))
    print(json.dumps(result["summary"]))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
