"""``tritonembed bench``: our serving paths, the bare ONNX Runtime ceiling, PyTorch and a peer server,
on the same ``model.onnx`` and the same workload, in one run.

Per model it measures, in this order (one server at a time, so they never compete for the CPU):

1. bare ONNX Runtime in a subprocess (same ``model.onnx``, tokenizer and thread count as the server);
2. PyTorch in a subprocess (sentence-transformers / transformers);
3. tritonserver with our generated repository: perf_analyzer over gRPC (short texts at concurrency 1,
   then the mixed workload at batch 1 and batch 32 over a concurrency sweep), our
   ``AsyncEmbeddingClient`` and the OpenAI gateway (a separate process) under the same closed loop,
   with padding waste (our encoder counters) and batch sizes / queue times (Triton's statistics API)
   taken as deltas around every phase, and the server's peak RSS;
4. variants of the serving options (e.g. ``encoder_queue_delay_us=0``), same phases, for the recommendations;
5. the other precisions: server and bare ORT throughput and peak RSS;
6. the peer (Infinity) under the same closed loop as our gateway.

The result is one JSON document (:func:`run_bench`); :mod:`tritonembed.benchmarks.summary` draws the
ratios and goals from it and :mod:`tritonembed.benchmarks.report` turns it into Markdown tables and PNG plots.
This module stays long because the phases above are the methods of one runner (:class:`Bench`) that share
its server, probes, RSS sampler and workloads; the pure parts live in the modules named here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonembed.benchmarks import stats as st
from tritonembed.benchmarks.loadgen import closed_loop, make_batches
from tritonembed.benchmarks.summary import summarize, summarize_paired
from tritonembed.benchmarks.system import RssSampler, load_average, machine_description
from tritonembed.errors import TritonEmbedError
from tritonembed.precisions import NAMES as PRECISION_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from tritonembed.launcher import TritonServer
    from tritonembed.model_repository.configs import ServingOptions
    from tritonembed.spec import ModelSpec

log = logging.getLogger("tritonembed.bench")

SCHEMA_VERSION = 1
#: Passes over the short texts in each paired round's single-text legs (ours and bare ORT alike): 16 texts
#: once made a p50 of 16 samples, which moved by tenths of a millisecond between rounds.
SHORT_PASSES = 4


@dataclass(frozen=True)
class ModelCase:
    """One model of the run: what to export and under which served name and length limit."""

    key: str
    model_id: str
    name: str | None = None
    max_length: int | None = None


MINILM = ModelCase("minilm", "sentence-transformers/all-MiniLM-L6-v2")
QWEN_SMALL = ModelCase("qwen3-small", "random-qwen3:small", "Qwen3-Embedding-small", 512)
QWEN_06B = ModelCase("qwen3-0.6b", "random-qwen3:0.6B", "Qwen3-Embedding-0.6B-random", 512)
MODEL_CASES = {c.key: c for c in (MINILM, QWEN_SMALL, QWEN_06B)}


@dataclass
class BenchConfig:
    """What one ``tritonembed bench`` run measures.

    The defaults are the full mode; :func:`quick_config` and :func:`smoke_config` are the other presets.
    """

    models: tuple[str, ...] = ("minilm", "qwen3-0.6b")
    precisions: tuple[str, ...] = PRECISION_NAMES
    texts: int = 512
    short_texts: int = 128
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    perf_measurement_ms: int = 4000
    # Windows counted in requests instead of time: batch-32 requests take long on a small CPU.
    perf_requests_b1: int | None = None
    perf_requests_b32: int = 16
    duration_s: float = 10.0
    concurrency_b1: tuple[int, ...] = (1, 2, 4, 8, 16)
    concurrency_b32: tuple[int, ...] = (1, 2, 4)
    torch_baseline: bool = True
    client: bool = True
    gateway: bool = True
    peer: bool = True
    peer_engines: tuple[str, ...] = ("torch", "optimum")
    # Serving-option variants measured beside the defaults ("field=value", "+" joins several).
    # Old defaults are kept as variants for comparison: ONNX Runtime's own spinning, the bounded queue (a queue
    # policy), 2 ms queue delays and the 16k-token budget.
    variants: tuple[str, ...] = ("intra_op_spinning=always", "encoder_queue_delay_us=200", "max_queue_size=512",
                                 "max_tokens_per_batch=2048",
                                 "tokenizer_queue_delay_us=2000+encoder_queue_delay_us=2000+max_tokens_per_batch=16384")
    variant_models: tuple[str, ...] = ("minilm", "qwen3-small", "qwen3-0.6b")
    # Rounds of the paired comparison (ours and bare ORT alternated while the server is up; 0: off).
    paired_rounds: int = 6
    min_requests: int = 4
    precision_models: tuple[str, ...] = ("minilm",)
    mode: str = "full"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quick_config(**overrides: Any) -> BenchConfig:
    """The ``--quick`` preset: MiniLM (all precisions, variants, Infinity) + the small Qwen3 shape, short phases."""
    base = BenchConfig(
        models=("minilm", "qwen3-small"), texts=256, short_texts=64, perf_measurement_ms=1500, perf_requests_b32=6,
        duration_s=4.0, concurrency_b1=(1, 4, 8), concurrency_b32=(1, 2), peer_engines=("torch",), paired_rounds=3,
        variants=("intra_op_spinning=always",),
        variant_models=("minilm",), mode="quick")
    return replace(base, **overrides)


def smoke_config(**overrides: Any) -> BenchConfig:
    """Seconds, not minutes: MiniLM fp32, one concurrency level, no PyTorch, no peer, no variants."""
    base = BenchConfig(
        models=("minilm",), precisions=("fp32",), texts=32, short_texts=16, perf_measurement_ms=500,
        perf_requests_b1=16, perf_requests_b32=2, duration_s=0.5, concurrency_b1=(2,), concurrency_b32=(1,),
        torch_baseline=False, peer=False, variants=(), min_requests=1, paired_rounds=1, mode="smoke")
    return replace(base, **overrides)


# --- workload -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """Texts and the token count of each, as the served model's tokenizer counts them."""

    name: str
    texts: tuple[str, ...]
    tokens: tuple[int, ...]

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens)

    def describe(self) -> dict[str, Any]:
        ordered = sorted(self.tokens)
        return {"texts": len(self.texts), "mean_tokens": round(self.mean_tokens, 1), "min_tokens": ordered[0],
                "p50_tokens": st.percentile(ordered, 50), "max_tokens": ordered[-1]}


def short_sentences(count: int, seed: int = 1) -> list[str]:
    """STS-B sentences only (the "single short text" of the latency goal)."""
    from tritonembed.benchmarks.perf_analyzer import workload_texts

    texts = [t for i, t in enumerate(workload_texts(count * 2, seed=seed)) if i % 4 != 3]
    return texts[:count]


def build_workloads(export_dir: Path, texts: int, short: int) -> dict[str, Workload]:
    """``mixed`` (STS-B + passages, in order), ``mixed_sorted`` (the same, by length) and ``short``."""
    from tritonembed.benchmarks.perf_analyzer import workload_texts
    from tritonembed.model_repository.tokenization import SpecTokenizer
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export_dir)
    tokenizer = SpecTokenizer(export_dir / spec.tokenizer_file, spec)

    def counted(name: str, items: Sequence[str]) -> Workload:
        ids = tokenizer.encode(tokenizer.format(items)).ids
        return Workload(name, tuple(items), tuple(len(x) for x in ids))

    mixed = counted("mixed", workload_texts(texts))
    order = sorted(range(len(mixed.texts)), key=lambda i: mixed.tokens[i])
    return {
        "mixed": mixed,
        "mixed_sorted": Workload("mixed_sorted", tuple(mixed.texts[i] for i in order), tuple(mixed.tokens[i] for i in order)),
        "short": counted("short", short_sentences(short)),
    }


def parse_variant(text: str) -> dict[str, Any]:
    """``"encoder_queue_delay_us=0+max_tokens_per_batch=2048"`` -> ServingOptions overrides, each value read
    as its field's type (int, true/false, or text).

    Raises:
        ValueError: not ``field=value`` pairs, a field ServingOptions does not have, or a value not of its type.
    """
    from dataclasses import fields

    from tritonembed.model_repository.configs import ServingOptions

    kinds = {f.name: str(f.type) for f in fields(ServingOptions)}
    out: dict[str, Any] = {}
    for part in text.split("+"):
        key, sep, raw = part.strip().partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"bad serving variant {part!r}: expected FIELD=VALUE with FIELD in {sorted(kinds)}")
        raw = raw.strip()
        if kinds[key] == "bool":
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"bad serving variant {part!r}: {key} is true or false")
            out[key] = raw.lower() == "true"
        elif kinds[key] == "str":
            out[key] = raw
        else:
            out[key] = int(raw)
    return out


# --- small I/O helpers ----------------------------------------------------------------------------

def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def source_dir(model_id: str) -> Path:
    from tritonembed.export.resolve import resolve_model

    return resolve_model(model_id).path


class ServerProbe:
    """Counter and statistics snapshots of one served model, for per-phase deltas."""

    def __init__(self, server: TritonServer, spec: ModelSpec) -> None:
        self.server = server
        self.spec = spec

    def snapshot(self) -> dict[str, dict[str, float]]:
        time.sleep(0.1)  # the models publish their counters once idle for Counters.QUIET_S (20 ms) after the last request
        counters = st.encoder_counters(http_get(self.server.metrics_url), self.spec.encoder_model_name)
        out = {"counters": counters}
        for role, name in (("ensemble", self.spec.name), ("tokenizer", self.spec.tokenizer_model_name),
                           ("encoder", self.spec.encoder_model_name)):
            out[role] = st.model_stats(json.loads(http_get(f"http://{self.server.http_url}/v2/models/{name}/stats")))
        return out

    @staticmethod
    def delta(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, Any]:
        counters = st.counter_delta(after["counters"], before["counters"])
        out: dict[str, Any] = {
            "padding_waste": st.padding_waste(counters["encoder_real_tokens"], counters["encoder_padded_tokens"]),
            "encoder_counters": counters,
            "rows_per_onnx_run": st.ratio(counters["encoder_rows"], counters["encoder_batches"], 2),
        }
        for role in ("ensemble", "tokenizer", "encoder"):
            out[role] = st.stats_breakdown(st.counter_delta(after[role], before[role]))
        out["avg_encoder_batch"] = out["encoder"]["avg_batch"]
        return out


# --- the runner --------------------------------------------------------------------------------------

class Bench:
    """One run: ``Bench(config, workdir).run()`` returns the result document (and never leaves servers running)."""

    def __init__(self, config: BenchConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        log.warning("%s", message)
        self.notes.append(message)

    # ----- top level -----
    def run(self) -> dict[str, Any]:
        started = time.time()
        result: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "config": self.config.to_dict(),
            "machine": machine_description(),
            "load_average_start": load_average(),
            "gpu": "none: this run used the CPU profile only",
            "models": {},
        }
        for key in self.config.models:
            case = MODEL_CASES[key]
            log.info("=== %s (%s) ===", case.key, case.model_id)
            result["models"][key] = self.run_model(case)
        result["load_average_end"] = load_average()
        result["seconds"] = round(time.time() - started, 1)
        result["notes"] = self.notes
        return result

    def export(self, case: ModelCase, precision: str) -> Path:
        from tritonembed.export_cache import ensure_export

        return ensure_export(case.model_id, precision, case.max_length, case.name)

    def run_model(self, case: ModelCase) -> dict[str, Any]:
        from tritonembed.spec import ModelSpec

        cfg = self.config
        export_dir = self.export(case, "fp32")
        spec = ModelSpec.load(export_dir)
        workloads = build_workloads(export_dir, cfg.texts, cfg.short_texts)
        mdir = self.workdir / case.key
        mdir.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {"model_id": case.model_id, "served_name": spec.name, "family": spec.family,
                               "max_length": spec.max_length, "threads": cfg.threads,
                               "workloads": {k: w.describe() for k, w in workloads.items()}}
        plan = {"mixed": [1, 32], "mixed_sorted": [32], "short": [1]}
        out["bare_ort"] = self.in_process("ort", export_dir, None, workloads, plan, mdir / "ort-fp32")
        if cfg.torch_baseline:
            try:
                out["torch"] = self.in_process("torch", export_dir, source_dir(case.model_id), workloads, plan,
                                               mdir / "torch")
            except TritonEmbedError as exc:
                self.note(f"{case.key}: PyTorch baseline failed: {exc}")
        from tritonembed.model_repository.configs import ServingOptions

        options = ServingOptions(profile="cpu", intra_op_threads=cfg.threads)
        out["serving_options"] = {"tokenizer_queue_delay_us": options.tokenizer_queue_delay_us,
                                  "encoder_queue_delay_us": options.encoder_queue_delay_us,
                                  "intra_op_threads": options.intra_op_threads,
                                  "encoder_instances": options.encoder_instances,
                                  "max_tokens_per_batch": options.max_tokens_per_batch,
                                  "microbatch_workers": options.microbatch_workers}
        torch_embed = self.torch_worker(case, export_dir) if cfg.torch_baseline else None
        try:
            out["ours"] = self.serve_and_measure(export_dir, spec, options, workloads, mdir / "triton-fp32", full=True,
                                                 torch_embed=torch_embed)
            variants = {}
            for i, text in enumerate(cfg.variants if case.key in cfg.variant_models else ()):
                variant = replace(options, **parse_variant(text))
                variants[text] = self.serve_and_measure(export_dir, spec, variant, workloads,
                                                        mdir / f"triton-variant{i}", full=False)
            out["variants"] = variants
            if case.key in cfg.precision_models:
                out["precisions"] = self.precisions(case, out, workloads, mdir, torch_embed)
            else:
                out["precisions"] = {"fp32": self.precision_entry(out["ours"], out["bare_ort"])}
            out["peer"] = self.peers(case, export_dir, spec, workloads, mdir) if cfg.peer else {
                "skipped": "peer disabled for this run (--no-peer or smoke mode)"}
        finally:
            if torch_embed is not None:
                torch_embed.close()
        out["summary"] = summarize(out)
        return out

    def torch_worker(self, case: ModelCase, export_dir: Path) -> Any:
        """PyTorch kept loaded in a process of its own, timed on demand in the paired rounds (None on failure)."""
        from tritonembed.benchmarks.inprocess import Worker

        try:
            return Worker("torch", export_dir, self.config.threads, source=source_dir(case.model_id),
                          log_file=self.workdir / case.key / "torch-worker.log")
        except Exception as exc:  # an optional baseline: report, do not abort the run
            self.note(f"{case.key}: PyTorch worker for the paired rounds failed: {type(exc).__name__}: {exc}"[:300])
            return None

    # ----- in-process baselines -----
    def in_process(self, engine: str, export_dir: Path, source: Path | None, workloads: dict[str, Workload],
                   plan: dict[str, list[int]], wdir: Path) -> dict[str, Any]:
        """Raises: TritonEmbedError when the worker fails (its log tail in the message)."""
        wdir.mkdir(parents=True, exist_ok=True)
        data = {name: {"texts": list(w.texts), "tokens": list(w.tokens)} for name, w in workloads.items() if name in plan}
        results = []
        peak = 0
        load_s = 0.0
        # One worker per batch size keeps each worker's job simple; the model loads once per batch size.
        by_size: dict[int, list[str]] = {}
        for name, sizes in plan.items():
            for size in sizes:
                by_size.setdefault(size, []).append(name)
        for size, names in sorted(by_size.items()):
            wfile = wdir / f"workload-b{size}.json"
            wfile.write_text(json.dumps({n: data[n] for n in names}, ensure_ascii=False), encoding="utf-8")
            rfile = wdir / f"result-b{size}.json"
            cmd = [sys.executable, "-m", "tritonembed.benchmarks.inprocess", "--engine", engine, "--export-dir",
                   str(export_dir), "--threads", str(self.config.threads), "--workload", str(wfile), "--batch-sizes",
                   str(size), "--duration", str(self.config.duration_s), "--min-requests",
                   str(self.config.min_requests), "--out", str(rfile)]
            if source is not None:
                cmd += ["--source", str(source)]
            log.info("in-process %s, batch %d", engine, size)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            (wdir / f"worker-b{size}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise TritonEmbedError(f"{engine} worker failed ({proc.returncode}):\n{proc.stderr[-1500:]}")
            res = json.loads(rfile.read_text())
            results += res["results"]
            peak = max(peak, res["peak_rss_bytes"])
            load_s = max(load_s, res["load_s"])
        return {"engine": engine, "threads": self.config.threads, "peak_rss_bytes": peak, "load_s": load_s,
                "results": results}

    # ----- our server -----
    def serve_and_measure(self, export_dir: Path, spec: ModelSpec, options: ServingOptions, workloads: dict[str, Workload], wdir: Path,
                          *, full: bool, b32_only: bool = False, torch_embed: Any = None,
                          paired_bulk_rounds: int = 0) -> dict[str, Any]:
        from tritonembed.launcher import TritonServer
        from tritonembed.model_repository.assemble import build_repository

        cfg = self.config
        wdir.mkdir(parents=True, exist_ok=True)
        build_repository(wdir / "models", [export_dir], options)
        server = TritonServer(wdir / "models", log_file=wdir / "tritonserver.log")
        out: dict[str, Any] = {}
        started = time.perf_counter()
        with server:
            out["startup_s"] = round(time.perf_counter() - started, 2)
            sampler = RssSampler(server.process.pid).start()
            out["idle_rss_bytes"] = sampler.peak_bytes
            try:
                probe = ServerProbe(server, spec)
                self.warm_up(server, spec, workloads)
                out["perf"] = self.perf_phases(server, spec, probe, workloads, wdir,
                                               b1=cfg.concurrency_b1 if full else () if b32_only else (max(cfg.concurrency_b1),),
                                               b32=cfg.concurrency_b32 if full else (max(cfg.concurrency_b32),))
                if full and cfg.paired_rounds:
                    out["paired"] = self.paired(server, spec, export_dir, workloads, wdir, torch_embed=torch_embed,
                                                max_tokens=options.max_tokens_per_batch,
                                                workers=options.microbatch_workers)
                elif paired_bulk_rounds:
                    out["paired"] = self.paired(server, spec, export_dir, workloads, wdir, torch_embed=torch_embed,
                                                short_latency=False, rounds=paired_bulk_rounds,
                                                max_tokens=options.max_tokens_per_batch,
                                                workers=options.microbatch_workers)
                if full and cfg.client:
                    out["async_client"] = self.client_phases(server, spec, probe, workloads)
                if full and cfg.gateway:
                    out["gateway"] = self.gateway_phases(server, spec, probe, workloads, wdir)
            finally:
                out["peak_rss_bytes"] = sampler.stop()
        return out

    def paired(self, server: TritonServer, spec: ModelSpec, export_dir: Path, workloads: dict[str, Workload],
               wdir: Path | None = None, *, torch_embed: Any = None,
               short_latency: bool = True, rounds: int | None = None, max_tokens: int | None = None,
               workers: int | None = None) -> dict[str, Any]:
        """Ours and the in-process baselines alternated in short rounds, so that load from elsewhere on a shared
        machine hits all of them alike.

        Each round: (with ``short_latency``) one short text at a time through perf_analyzer (C++) and the sync
        Python gRPC client vs bare ORT; then one corpus of mixed texts embedded in bulk by
        ``EmbeddingClient.embed(corpus)``, by bare ORT in length-sorted batches of 32 (what a user writes), by
        bare ORT over the served planner's micro-batches (the strict ceiling: same grouping, and the same
        micro-batch workers on a one-thread session as the encoder uses (``workers``); no serving), and
        by PyTorch (``torch_embed``, an :class:`~tritonembed.benchmarks.inprocess.Worker`: its own process,
        length-sorted batches of 32) when given.
        """
        from tritonembed.artifact import model_bytes
        from tritonembed.benchmarks.inprocess import ort_embedder, ort_encoder
        from tritonembed.benchmarks.perf_analyzer import PerfAnalyzerError, run_perf_analyzer
        from tritonembed.client import EmbeddingClient
        from tritonembed.model_repository.configs import ServingOptions
        from tritonembed.model_repository.microbatch_pool import MicroBatchPool, pool_workers
        from tritonembed.model_repository.stages import encode_requests

        encoder = ort_encoder(export_dir, self.config.threads)  # one session for both bare-ORT legs
        tokenizer = encoder.tokenizer
        bare = ort_embedder(export_dir, self.config.threads, encoder)
        budget = max_tokens or ServingOptions().max_tokens_per_batch
        n_workers = pool_workers(ServingOptions.microbatch_workers if workers is None else workers,
                                 self.config.threads, model_bytes(export_dir / spec.onnx_file))
        pool = MicroBatchPool(ort_encoder(export_dir, 1).run_ids, n_workers) if n_workers > 1 else None
        short = list(workloads["short"].texts[:16])
        mixed = workloads["mixed"]
        corpus = list(mixed.texts)  # the whole mixed workload: a small corpus would exaggerate padding losses
        corpus_tokens = sum(mixed.tokens)
        by_length = [t for _, t in sorted(zip(mixed.tokens, corpus, strict=True), key=lambda p: p[0])]

        def bare_planned(texts: Sequence[str]) -> None:  # tokenize + plan + run, as the server does, in-process
            ids = tokenizer.encode(tokenizer.format(list(texts))).ids
            encode_requests(encoder.run_ids, [tokenizer.pad(ids)], pad_id=spec.pad_token_id,
                            padding_side=spec.padding_side, max_tokens=budget, max_rows=256, run_batches=pool)

        def timed(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return round(len(corpus) / (time.perf_counter() - t0), 2)

        out_rounds = []
        with EmbeddingClient(server.grpc_url, model=spec.name) as client, pool or contextlib.nullcontext():
            bare(short[:2]), client.embed(short[:2]), bare_planned(short[:2])  # warm-up
            if torch_embed is not None:
                torch_embed.seconds(short[:2])
            for k in range(rounds or self.config.paired_rounds):
                row: dict[str, Any] = {}
                if short_latency:
                    try:  # three windows of 64 requests: ~1 s for a short text
                        [pa] = run_perf_analyzer(spec.name, server.grpc_url, (wdir or self.workdir) / f"paired-pa-{k}",
                                                 concurrency="1:1:1", texts=short, request_count=64, max_trials=3)
                        row["perf_analyzer_short_p50_ms"] = pa.p50_ms
                    except PerfAnalyzerError as exc:
                        self.note(f"paired round {k + 1}: perf_analyzer failed: {str(exc).splitlines()[0]}")
                    for label, one in (("ours", lambda t: client.embed([t])), ("bare_ort", lambda t: bare([t]))):
                        lat = []
                        for text in [t for _ in range(SHORT_PASSES) for t in short]:
                            t0 = time.perf_counter()
                            one(text)
                            lat.append((time.perf_counter() - t0) * 1e3)
                        row[f"{label}_short_p50_ms"] = round(st.percentile(lat, 50), 3)
                bulk_legs = [
                    ("ours_corpus_texts_per_s", lambda: timed(lambda: client.embed(corpus))),
                    ("bare_ort_corpus_texts_per_s", lambda: timed(
                        lambda: [bare(by_length[i:i + 32]) for i in range(0, len(by_length), 32)])),
                    ("bare_ort_planned_corpus_texts_per_s", lambda: timed(lambda: bare_planned(corpus))),
                ]
                if torch_embed is not None:
                    bulk_legs.append(("torch_corpus_texts_per_s",
                                      lambda: round(len(corpus) / torch_embed.seconds(by_length, 32), 2)))
                order = rotated(bulk_legs, k)  # no leg always runs first or right after another
                for key, leg in order:
                    row[key] = leg()
                row["bulk_order"] = [key for key, _ in order]
                row["load_1min"] = round(load_average()[0], 2)
                out_rounds.append(row)
                log.info("paired round: %s", row)
        return summarize_paired(out_rounds, corpus_texts=len(corpus), corpus_tokens=corpus_tokens,
                                short_texts=len(short) if short_latency else 0,
                                short_passes=SHORT_PASSES if short_latency else 0)

    def warm_up(self, server: TritonServer, spec: ModelSpec, workloads: dict[str, Workload]) -> None:
        from tritonembed.client import EmbeddingClient

        with EmbeddingClient(server.grpc_url, model=spec.name) as client:
            mixed = list(workloads["mixed"].texts)
            for start in range(0, min(len(mixed), 64), 32):
                client.embed(mixed[start:start + 32])
            client.embed(list(workloads["short"].texts[:4]))

    def perf_phases(self, server: TritonServer, spec: ModelSpec, probe: ServerProbe, workloads: dict[str, Workload], wdir: Path,
                    *, b1: Sequence[int], b32: Sequence[int]) -> list[dict[str, Any]]:
        from tritonembed.benchmarks.perf_analyzer import PerfAnalyzerError, run_perf_analyzer

        phases = [("short", 1, 1)] + [("mixed", 1, c) for c in b1] + [("mixed", 32, c) for c in b32]
        rows = []
        for workload, batch, concurrency in phases:
            w = workloads[workload]
            before = probe.snapshot()
            count = self.config.perf_requests_b1 if batch == 1 else max(self.config.perf_requests_b32, 2 * concurrency)
            pdir = wdir / f"perf-{workload}-b{batch}-c{concurrency}"
            try:
                perf = run_perf_analyzer(spec.name, server.grpc_url, pdir, concurrency=f"{concurrency}:{concurrency}:1",
                                         batch_size=batch, measurement_ms=self.config.perf_measurement_ms,
                                         texts=list(w.texts), request_count=count)[0]
            except PerfAnalyzerError as exc:
                # "Failed to obtain stable measurement" happens on a busy machine: retry once, longer.
                log.warning("perf_analyzer failed (%s); retrying with longer windows", str(exc).splitlines()[0])
                try:
                    perf = run_perf_analyzer(spec.name, server.grpc_url, pdir, concurrency=f"{concurrency}:{concurrency}:1",
                                             batch_size=batch, measurement_ms=2 * self.config.perf_measurement_ms,
                                             texts=list(w.texts), request_count=count and 2 * count, max_trials=10)[0]
                except PerfAnalyzerError as again:
                    self.note(f"{spec.name}: perf_analyzer {workload} batch {batch} concurrency {concurrency} failed "
                              f"twice, phase left out: {str(again).splitlines()[-1][:200]}")
                    continue
            delta = probe.delta(probe.snapshot(), before)
            row = {"tool": "perf_analyzer", "protocol": "grpc", "workload": workload, "batch_size": batch,
                   "concurrency": concurrency, **perf.to_dict(),
                   "tokens_per_s": round(perf.texts_per_s * w.mean_tokens, 1), **delta}
            log.info("perf %s b%d c%d: %.1f texts/s, p50 %.1f ms, waste %s, encoder batch %s", workload, batch,
                     concurrency, perf.texts_per_s, perf.p50_ms, delta["padding_waste"], delta["avg_encoder_batch"])
            rows.append(row)
        return rows

    def _closed_loop_phases(self, label: str, probe: ServerProbe | None, workloads: dict[str, Workload],
                            make_call: Callable[[], Any], phases: Sequence[tuple[str, int, int]]) -> list[dict[str, Any]]:
        """Run ``phases`` ((workload, batch, concurrency)) through ``make_call()`` -> (call, close) in one event loop."""
        async def main() -> list[dict[str, Any]]:
            call, close = await make_call()
            rows = []
            try:
                for workload, batch, concurrency in phases:
                    w = workloads[workload]
                    before = probe.snapshot() if probe else None
                    measured = await closed_loop(call, make_batches(w.texts, w.tokens, batch),
                                                 concurrency=concurrency, duration_s=self.config.duration_s,
                                                 min_requests=max(self.config.min_requests, concurrency))
                    row = {"tool": label, "workload": workload, "batch_size": batch, "concurrency": concurrency,
                           **measured.to_dict(), **measured.latency}
                    if probe:
                        row.update(probe.delta(probe.snapshot(), before))
                    log.info("%s %s b%d c%d: %.1f texts/s, p50 %.1f ms", label, workload, batch, concurrency,
                             measured.texts_per_s, measured.latency["p50_ms"])
                    rows.append(row)
            finally:
                await close()
            return rows

        return asyncio.run(main())

    def loop_phases(self) -> list[tuple[str, int, int]]:
        cfg = self.config
        return [("short", 1, 1), ("mixed", 1, max(cfg.concurrency_b1)), ("mixed", 32, max(cfg.concurrency_b32))]

    def client_phases(self, server: TritonServer, spec: ModelSpec, probe: ServerProbe, workloads: dict[str, Workload]) -> list[dict]:
        from tritonembed.client import AsyncEmbeddingClient

        async def make_call():
            client = AsyncEmbeddingClient(server.grpc_url, model=spec.name,
                                          max_concurrency=max(self.config.concurrency_b1))
            await client.model_info()

            async def call(texts):
                return await client.embed(list(texts))

            return call, client.close

        return self._closed_loop_phases("async_client", probe, workloads, make_call, self.loop_phases())

    def gateway_phases(self, server: TritonServer, spec: ModelSpec, probe: ServerProbe, workloads: dict[str, Workload],
                       wdir: Path) -> list[dict] | dict[str, str]:
        from tritonembed.launcher import free_port

        port = free_port()
        cmd = [sys.executable, "-m", "tritonembed.gateway", "--triton-url", server.grpc_url, "--port", str(port),
               "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRITONEMBED_API_KEY")}
        with open(wdir / "gateway.log", "wb") as log_out:
            proc = subprocess.Popen(cmd, stdout=log_out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    http_get(url + "/ready", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        self.note(f"gateway did not become ready; see {wdir / 'gateway.log'}")
                        return {"skipped": "gateway did not start"}
                    time.sleep(0.2)
            sampler = RssSampler(proc.pid).start()
            rows = self._closed_loop_phases("gateway", probe, workloads, openai_http_call(url + "/v1/embeddings", spec.name),
                                            self.loop_phases())
            for row in rows:
                row["gateway_peak_rss_bytes"] = sampler.peak_bytes
            sampler.stop()
            return rows
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ----- precisions -----
    @staticmethod
    def precision_entry(ours: dict[str, Any], ort: dict[str, Any]) -> dict[str, Any]:
        b32 = [r for r in ours.get("perf", []) if r["workload"] == "mixed" and r["batch_size"] == 32]
        top = max(b32, key=lambda r: r["texts_per_s"]) if b32 else None
        ort_b32 = [r for r in ort["results"] if r["batch_size"] == 32]
        return {
            "server_peak_rss_bytes": ours.get("peak_rss_bytes"),
            "server_texts_per_s": top["texts_per_s"] if top else None,
            "server_tokens_per_s": top["tokens_per_s"] if top else None,
            "server_concurrency": top["concurrency"] if top else None,
            "bare_ort_peak_rss_bytes": ort.get("peak_rss_bytes"),
            "bare_ort_texts_per_s": st.best(r["texts_per_s"] for r in ort_b32),
        }

    def precisions(self, case: ModelCase, out: dict[str, Any], workloads: dict[str, Workload], mdir: Path,
                   torch_embed: Any = None) -> dict:
        from tritonembed.model_repository.configs import ServingOptions
        from tritonembed.spec import ModelSpec

        entries = {"fp32": self.precision_entry(out["ours"], out["bare_ort"])}
        for precision in self.config.precisions:
            if precision == "fp32":
                continue
            try:
                export_dir = self.export(case, precision)
            except Exception as exc:  # the quantizer is young: any failure is reported, not fatal
                entries[precision] = {"skipped": f"export failed: {type(exc).__name__}: {exc}"[:500]}
                self.note(f"{case.key} {precision}: {entries[precision]['skipped']}")
                continue
            spec = ModelSpec.load(export_dir)
            pdir = mdir / f"precision-{precision}"
            try:
                ort = self.in_process("ort", export_dir, None, workloads, {"mixed_sorted": [32]}, pdir / "ort")
                options = ServingOptions(profile="cpu", intra_op_threads=self.config.threads)
                ours = self.serve_and_measure(export_dir, spec, options, workloads, pdir / "triton", full=False,
                                              b32_only=True, torch_embed=torch_embed,
                                              paired_bulk_rounds=self.config.paired_rounds if precision == "int8"
                                              else 0)
            except TritonEmbedError as exc:
                entries[precision] = {"skipped": f"measurement failed: {exc}"[:500]}
                self.note(f"{case.key} {precision}: {entries[precision]['skipped']}")
                continue
            entries[precision] = self.precision_entry(ours, ort)
            if "paired" in ours:
                entries[precision]["paired"] = ours["paired"]
            entries[precision]["onnx_bytes"] = sum(p.stat().st_size for p in export_dir.glob(spec.onnx_file + "*"))
        entries["fp32"]["onnx_bytes"] = sum(p.stat().st_size for p in self.export(case, "fp32").glob("model.onnx*"))
        return entries

    # ----- peer -----
    def peers(self, case: ModelCase, export_dir: Path, spec: ModelSpec, workloads: dict[str, Workload], mdir: Path) -> dict:
        from tritonembed.benchmarks.peers import InfinityServer, PeerUnavailable, optimum_model_dir

        out: dict[str, Any] = {}
        source = source_dir(case.model_id)
        for engine in self.config.peer_engines:
            key = f"infinity-{engine}"
            model_dir = source
            if engine == "optimum":
                model_dir = optimum_model_dir(source, export_dir / spec.onnx_file, mdir / "infinity-optimum-model")
            try:
                server = InfinityServer(model_dir, spec.name, engine=engine, log_file=mdir / f"{key}.log")
                with server:
                    sampler = RssSampler(server.process.pid).start()
                    rows = self._closed_loop_phases(key, None, workloads, openai_http_call(server.url + "/embeddings",
                                                                                             spec.name), self.loop_phases())
                    out[key] = {"rows": rows, "peak_rss_bytes": sampler.stop()}
            except PeerUnavailable as exc:
                out[key] = {"skipped": str(exc)[-1500:]}
                self.note(f"{case.key}: peer {key} skipped: {str(exc).splitlines()[0]}")
        return out


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` started at position ``k`` (modulo its length): round ``k``'s order of the paired legs."""
    shift = k % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def openai_http_call(url: str, model: str) -> Callable[[], Any]:
    """An async factory of ``(call, close)`` posting OpenAI embedding requests with httpx."""
    async def make():
        import httpx

        client = httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

        async def call(texts):
            response = await client.post(url, json={"model": model, "input": list(texts)})
            response.raise_for_status()
            data = response.json()["data"]
            if len(data) != len(texts):
                raise TritonEmbedError(f"{url} returned {len(data)} embeddings for {len(texts)} inputs")
            return data

        return call, client.aclose

    return make


def run_bench(config: BenchConfig, workdir: Path, output: Path) -> dict[str, Any]:
    """Run everything, write the JSON to ``output`` and return it."""
    result = Bench(config, workdir).run()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    log.info("results in %s", output)
    return result
