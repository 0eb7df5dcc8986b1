"""Benchmark sub-commands of ``tritonembed``: ``perf`` (perf_analyzer against a running server) and
``bench`` (everything side by side in one run: ours, bare ONNX Runtime, PyTorch, a peer server)."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from tritonembed.cli_options import env_default

log = logging.getLogger("tritonembed.bench")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub) -> None:
    p = sub.add_parser("perf", help="profile a served ensemble with perf_analyzer and realistic BYTES input")
    p.add_argument("model", help="served model name, e.g. all-MiniLM-L6-v2")
    p.add_argument("--url", default=env_default("triton_url", "127.0.0.1:8001"), help="Triton gRPC (or HTTP) address")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--concurrency", default="1:8:1", help="perf_analyzer concurrency range start:end:step")
    p.add_argument("--batch-size", type=int, default=1, help="texts per request")
    p.add_argument("--measurement-ms", type=int, default=5000)
    p.add_argument("--texts", type=int, default=256, help="distinct workload texts")
    p.add_argument("--requests", type=int, default=None,
                   help="measure windows of this many requests instead of --measurement-ms (robust on a busy machine)")
    p.add_argument("--max-trials", type=int, default=5, help="windows perf_analyzer may take to stabilize")
    p.add_argument("--workdir", type=Path, default=None, help="keep input data, CSV and log here")
    p.set_defaults(func=cmd_perf)

    b = sub.add_parser("bench", help="ours (gRPC, client, gateway) vs bare ONNX Runtime, PyTorch and a peer, one run",
                       description="Starts every server itself on loopback, one at a time. Writes a JSON result, "
                                   "and with --report a Markdown report plus PNG plots.")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", default=env_default("bench_quick", False, bool),
                      help="MiniLM (all precisions, peer) + random-qwen3:small, short phases: < 10 minutes on 2 cores")
    mode.add_argument("--smoke", action="store_true", default=env_default("bench_smoke", False, bool),
                      help="seconds: MiniLM fp32, one concurrency level, no PyTorch, no peer (for tests)")
    b.add_argument("--models", type=_names, default=env_default("bench_models", None, _names),
                   help="comma-separated: minilm, qwen3-small, qwen3-0.6b (default: by mode)")
    b.add_argument("--precisions", type=_names, default=env_default("bench_precisions", None, _names),
                   help="comma-separated subset of fp32,fp16,int8,int4")
    b.add_argument("--threads", type=int, default=env_default("bench_threads", None, int),
                   help="ONNX Runtime / torch threads, the same for every engine (default: all cores)")
    b.add_argument("--duration", type=float, default=env_default("bench_duration", None, float),
                   help="seconds per closed-loop / in-process measurement")
    b.add_argument("--perf-ms", type=int, default=env_default("bench_perf_ms", None, int),
                   help="perf_analyzer measurement window (ms)")
    b.add_argument("--concurrency", type=_ints, default=env_default("bench_concurrency", None, _ints),
                   help="batch-1 concurrency levels, e.g. 1,4,8")
    b.add_argument("--concurrency-b32", type=_ints, default=env_default("bench_concurrency_b32", None, _ints),
                   help="batch-32 concurrency levels, e.g. 1,2")
    b.add_argument("--texts", type=int, default=env_default("bench_texts", None, int),
                   help="texts in the mixed workload (also the paired rounds' bulk corpus)")
    b.add_argument("--short-texts", type=int, default=env_default("bench_short_texts", None, int),
                   help="texts in the short (STS-B sentences only) workload")
    b.add_argument("--paired-rounds", type=int, default=env_default("bench_paired_rounds", None, int),
                   help="rounds of the paired comparison (0: off)")
    b.add_argument("--precision-models", type=_names, default=env_default("bench_precision_models", None, _names),
                   help="models whose other precisions are exported and measured (default: minilm)")
    b.add_argument("--variants", type=_names, default=env_default("bench_variants", None, _names),
                   help="serving-option variants measured beside the defaults, comma-separated, each FIELD=VALUE "
                        "joined by '+', e.g. encoder_queue_delay_us=0,max_tokens_per_batch=2048 ('' for none)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    b.add_argument("--no-peer", action="store_true", help="skip the peer server (Infinity)")
    b.add_argument("--no-gateway", action="store_true", help="skip the OpenAI gateway")
    b.add_argument("--peer-engines", type=_names, default=None, help="Infinity engines: torch,optimum")
    b.add_argument("--output", "-o", type=Path, default=env_default("bench_output", Path("bench-results/bench.json"), Path))
    b.add_argument("--workdir", type=Path, default=env_default("bench_workdir", None, Path),
                   help="repositories, logs and perf_analyzer files (default: a temporary folder)")
    b.add_argument("--report", type=Path, default=env_default("bench_report", None, Path),
                   help="also write this Markdown report, with PNG plots in an img/ folder beside it")
    b.add_argument("--max-load", type=float, default=env_default("bench_max_load", None, float),
                   help="first wait (up to 10 min) until the 1-minute load average is at most this")
    b.set_defaults(func=cmd_bench)


def cmd_perf(args: argparse.Namespace) -> int:
    from tritonembed.benchmarks.perf_analyzer import run_perf_analyzer, workload_texts

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tritonembed-perf-"))
    rows = run_perf_analyzer(args.model, args.url, workdir, concurrency=args.concurrency, batch_size=args.batch_size,
                             protocol=args.protocol, measurement_ms=args.measurement_ms,
                             texts=workload_texts(args.texts), request_count=args.requests, max_trials=args.max_trials)
    print(f"{'concurrency':>11} {'texts/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r.concurrency:>11} {r.texts_per_s:>9.1f} {r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f}")
    (workdir / "perf.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    print(f"details: {workdir}")
    return 0


def bench_config(args: argparse.Namespace):
    """The preset of the chosen mode with the flags that were given applied."""
    from tritonembed.benchmarks.bench import MODEL_CASES, BenchConfig, quick_config, smoke_config

    overrides = {}
    for flag, key in (("models", "models"), ("precisions", "precisions"), ("threads", "threads"),
                      ("duration", "duration_s"), ("perf_ms", "perf_measurement_ms"), ("concurrency", "concurrency_b1"),
                      ("concurrency_b32", "concurrency_b32"), ("variants", "variants"),
                      ("peer_engines", "peer_engines"), ("texts", "texts"), ("short_texts", "short_texts"),
                      ("paired_rounds", "paired_rounds"), ("precision_models", "precision_models")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.no_torch:
        overrides["torch_baseline"] = False
    if args.no_peer:
        overrides["peer"] = False
    if args.no_gateway:
        overrides["gateway"] = False
    unknown = [m for m in overrides.get("models", ()) + overrides.get("precision_models", ()) if m not in MODEL_CASES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_CASES)}")
    if args.smoke:
        return smoke_config(**overrides)
    if args.quick:
        return quick_config(**overrides)
    from dataclasses import replace

    return replace(BenchConfig(), **overrides)


def cmd_bench(args: argparse.Namespace) -> int:
    from tritonembed.benchmarks.bench import run_bench
    from tritonembed.benchmarks.system import load_average, wait_for_quiet

    config = bench_config(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.max_load is not None:
        load = wait_for_quiet(args.max_load, 600)
        if load > args.max_load:
            log.warning("load average still %.2f (> %.2f): numbers may be skewed by other work", load, args.max_load)
    log.info("load average before the run: %s", load_average())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tritonembed-bench-"))
    result = run_bench(config, workdir, args.output)
    if args.report:
        from tritonembed.benchmarks.report import write_report

        write_report(result, args.report)
    for key, model in result["models"].items():
        s = model["summary"]
        print(f"{key}: ours {s['ours_grpc_best_texts_per_s']} texts/s, bare ORT {s['bare_ort_best_texts_per_s']}, "
              f"PyTorch {s['torch_best_texts_per_s']}, peer {s['peer_best_texts_per_s']}; p50 overhead "
              f"{s['p50_overhead_ms']} ms; padding waste {s['padding_waste_mixed']}")
        for goal in s["goals"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
            print(f"  {goal['name']}: {verdict} ({goal['measured']} {goal['target']})")
    print(f"results: {args.output}" + (f", report: {args.report}" if args.report else "") + f", workdir: {workdir}")
    return 0
