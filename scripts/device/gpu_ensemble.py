"""The Triton ensemble on a GPU beside PyTorch, in phases that can run (and rerun) alone (issue 17).

On the GPU machine ``scripts/device/gpu_ensemble_run.sh`` unpacks the payload and calls this with
``--provider cuda``; the CPU dry run (``tests/integration/test_gpu_ensemble_dryrun.py``) calls the same code with
``--provider cpu`` on the ``tiny`` shape, so a script error never costs GPU minutes.

Phases (``--phases``, in this order; each reads what the earlier ones left in ``--workdir``):

- ``build``: a random-weight Qwen3 checkpoint per shape (:func:`tritonembed.export.testmodels.create_random_qwen3`),
  traced once to fp32 ONNX with the product exporter's pieces (the family's attention form, static shapes), then
  ``fp16`` and ``int4`` (fp16 activations on CUDA) by :func:`tritonembed.export.quantize.quantize_onnx`, each laid
  out as an export folder (spec, tokenizer, ``report.json`` with the graph's attention form). The exporter's own
  validation is skipped here: ``serve`` compares the served vectors with PyTorch instead, and ``export_model``
  would trace the 4B model once per precision.
- ``torch``: the workload through transformers with ``attn_implementation="sdpa"`` per ``--torch-dtypes``, batches
  of 32 sorted by length as sentence-transformers does: tokens/s, per-batch latency, peak memory, MFU at the fixed
  shape; the first dtype's vectors are saved as the reference of the later phases.
- ``serve``: per shape and precision, the GPU-profile repository (Python-backend encoder, ``execution_provider``
  from ``--provider``) on tritonserver: vectors against the reference, ``perf_analyzer`` over a concurrency sweep
  of the mixed workload, the fixed shape through the ensemble (MFU), the bare encoder on the same file
  (``tritonembed.benchmarks.gpu measure``) and the ensemble's ratio to it, the gateway under concurrent clients,
  peak memory while serving.
- ``caps``: per ``--caps`` entry (``precision:GiB``) on ``--caps-shape``, a server granted that much memory
  (``memory_grant``) serves ``--long-rows`` texts of ``--long-tokens`` tokens in one request and one text of
  ``--longest-tokens``: no error, vectors against PyTorch; then the memory guard's limit file is lowered below
  the usage (a request must be shed with UNAVAILABLE while the server lives) and lifted again.

Everything goes into one JSON (``-o``), rewritten after every step, so a timeout keeps what was measured; a
phase that fails records its error and the next phase still runs. ``--deadline-s`` bounds the whole run: a step
that would start after it is recorded as skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpu_ensemble")

PHASES = ("build", "torch", "serve", "caps")
PRECISIONS = ("fp32", "fp16", "int4")
SORTED_BATCH = 32  # sentence-transformers' default batch size
MIN_COSINE = {"fp32": 0.999, "fp16": 0.99, "int4": 0.5}  # int4 of random weights: only a broken graph is caught
LONG_MIN_COSINE = {"fp32": 0.99, "fp16": 0.98, "int4": 0.5}


class EnsembleRunError(RuntimeError):
    """A phase found the product misbehaving (wrong vectors, no shedding) or a prerequisite missing."""


# --- small helpers ------------------------------------------------------------------------------

class Deadline:
    """Seconds left of the run; steps ask before they start."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Recorder:
    """The result JSON, rewritten after every step."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.started = time.monotonic()
        previous = json.loads(path.read_text()) if path.is_file() else {}
        self.data: dict[str, Any] = {**previous, "system": system_info(args.provider)}
        self.data.setdefault("phases", {})
        self.data.setdefault("invocations", []).append(
            {"argv": sys.argv[1:], "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
        self.save()

    def put(self, phase: str, key: str, value: Any) -> None:
        self.data["phases"].setdefault(phase, {})[key] = value
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def system_info(provider: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpu_count": os.cpu_count(), "provider": provider,
                            "tritonserver": os.environ.get("TRITONEMBED_TRITONSERVER", "the nvidia-pytriton package's"),
                            "perf_analyzer": os.environ.get("TRITONEMBED_PERF_ANALYZER", "the venv's"),
                            "server_pythonpath": os.environ.get("GPU_ENSEMBLE_SERVER_PYTHONPATH")}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing or broken package is a fact to record, not a failure
            info[name] = f"missing: {type(exc).__name__}"
    nvml = nvml_reading()
    if nvml:
        info.update(gpu=nvml["gpu"], device_total_bytes=nvml["total"])
    return info


def nvml_reading() -> dict[str, Any] | None:
    """The GPU's name, used and total bytes (NVML), or None without a GPU or nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or no package (the CPU dry run): no reading
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"gpu": name if isinstance(name, str) else name.decode(), "used": int(info.used), "total": int(info.total)}
    finally:
        pynvml.nvmlShutdown()


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (tritonserver and its stubs), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


class PeakMemory:
    """Samples memory in a thread: the GPU's used bytes (NVML) on CUDA, else the server group's RSS."""

    def __init__(self, provider: str, pgid: int | None = None, period: float = 0.2, baseline: int | None = None) -> None:
        self.provider, self.pgid, self.period = provider, pgid, period
        self.baseline = self._read() if baseline is None else baseline
        self.peak = max(self.baseline, self._read())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> int:
        if self.provider == "cuda":
            reading = nvml_reading()
            return reading["used"] if reading else 0
        return group_rss(self.pgid) if self.pgid else 0

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @staticmethod
    def before_start(provider: str) -> int:
        """The baseline to pass before a server starts: the GPU's used bytes, or 0 (no server group yet)."""
        reading = nvml_reading() if provider == "cuda" else None
        return reading["used"] if reading else 0

    def to_dict(self) -> dict[str, Any]:
        what = "device_used" if self.provider == "cuda" else "server_rss"
        return {"what": what, "peak_bytes": self.peak, "baseline_bytes": self.baseline,
                "peak_gib": round(self.peak / 2**30, 3), "delta_gib": round((self.peak - self.baseline) / 2**30, 3)}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def long_texts(tokens: int, count: int) -> list[str]:
    """``count`` distinct texts of about ``tokens`` tokens each (" hello" is one Qwen token)."""
    return [f"text {i}:" + " hello" * max(1, tokens - 5) for i in range(count)]


def fixed_texts(rows: int, tokens: int) -> list[str]:
    return [f"row {i}" + " hello" * max(1, tokens - 4) for i in range(rows)]


def shape_dir(args: argparse.Namespace, shape: str) -> Path:
    return args.workdir / shape


def model_name(shape: str, precision: str) -> str:
    return f"Qwen3-Embedding-{shape}-{precision}"


def export_dir(args: argparse.Namespace, shape: str, precision: str) -> Path:
    return shape_dir(args, shape) / "exports" / precision


def int4_from_fp16(args: argparse.Namespace) -> bool:
    return args.int4_activations == "float16"  # fp16 between 4-bit weights: the GPU form (docs/benchmarks-gpu.md)


def bench_variant(args: argparse.Namespace, precision: str) -> str:
    """The name tritonembed.benchmarks.gpu gives the same graph."""
    return "int4-fp16" if precision == "int4" and int4_from_fp16(args) else precision


# --- workload -----------------------------------------------------------------------------------

def load_texts(args: argparse.Namespace) -> dict[str, list[str]]:
    """The mixed STS-B + passages texts (``--texts-file``, written by ``texts`` where the STS-B data is)."""
    data = json.loads(Path(args.texts_file).read_text(encoding="utf-8"))
    return {"mixed": data["mixed"][:args.texts], "short": data.get("short", [])}


def write_texts(path: Path, count: int) -> None:
    """Write the workload texts (needs ../shared/data/stsb, which the GPU machine lacks: hence a file)."""
    from tritonembed.benchmarks.bench import short_sentences
    from tritonembed.benchmarks.perf_analyzer import workload_texts

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mixed": workload_texts(count), "short": short_sentences(64)}, ensure_ascii=False),
                    encoding="utf-8")


def tokenizer_of(export: Path) -> Any:
    from tritonembed.model_repository.tokenization import SpecTokenizer
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export)
    return SpecTokenizer(export / spec.tokenizer_file, spec)


def checkpoint_tokenizer(args: argparse.Namespace, shape: str) -> Any:
    """The served tokenizer of ``shape`` from its export, or from the checkpoint and the spec the build will write
    (so the torch phase can start while the build still traces and converts)."""
    export = export_dir(args, shape, args.precisions[0])
    if (export / "report.json").is_file():
        return tokenizer_of(export)
    from tritonembed.export.families import ExportOptions, family_for
    from tritonembed.model_repository.tokenization import SpecTokenizer

    checkpoint = shape_dir(args, shape) / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    spec = family_for(config).make_spec(checkpoint, f"random-qwen3:{shape}", config,
                                        ExportOptions(args.precisions[0], args.max_length,
                                                      model_name(shape, args.precisions[0])))
    return SpecTokenizer(checkpoint / spec.tokenizer_file, spec)


def ids_of(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    """The ids the served tokenizer gives (EOS appended, truncated at the spec's max_length)."""
    return tok.encode(tok.format(list(texts))).ids


def token_ids(export: Path, texts: Sequence[str]) -> list[list[int]]:
    return ids_of(tokenizer_of(export), texts)


# --- phase: build -------------------------------------------------------------------------------

def build_shape(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    """Checkpoint, one fp32 trace, the precisions, each as an export folder. Returns timings and sizes.

    Raises:
        ExportError / QuantizationError: the exporter or quantizer failed.
    """
    from tritonembed.artifact import model_bytes
    from tritonembed.export.families import ExportOptions, family_for
    from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
    from tritonembed.export.pipeline import ExportReport, copy_tokenizer
    from tritonembed.export.quantize import quantize_onnx
    from tritonembed.export.testmodels import create_random_qwen3

    started = time.perf_counter()
    out = shape_dir(args, shape)
    checkpoint = out / "checkpoint"
    if not (checkpoint / "DONE").is_file():
        create_random_qwen3(checkpoint, shape=shape, seed=0, dtype=args.checkpoint_dtype)
        (checkpoint / "DONE").touch()  # the torch phase may start on it
    timings: dict[str, Any] = {"checkpoint_s": round(time.perf_counter() - started, 1)}
    config = json.loads((checkpoint / "config.json").read_text())
    family = family_for(config)
    graph: dict[str, Any] = {}
    fp32 = out / "onnx-fp32" / "model.onnx"
    if not (out / "onnx-fp32" / "graph.json").is_file():  # written last: the trace is complete
        base = family.make_spec(checkpoint, f"random-qwen3:{shape}", config, ExportOptions("fp32", args.max_length))
        backbone = family.load_backbone(checkpoint)
        export_onnx(build_pooled_encoder(backbone, base, family.attention), fp32, graph_report=graph)
        del backbone
        (out / "onnx-fp32" / "graph.json").write_text(json.dumps(graph))
    graph = json.loads((out / "onnx-fp32" / "graph.json").read_text())
    timings["fp32_trace_s"] = round(time.perf_counter() - started, 1)

    def fp16_graph() -> Path:
        """The fp16 graph, converted once (a DONE file marks it complete: int4 may run in a later process)."""
        fp16 = out / "onnx-fp16" / "model.onnx"
        if not (fp16.parent / "DONE").is_file():
            quantize_onnx(fp32, fp16, "fp16")
            (fp16.parent / "DONE").touch()
        return fp16

    for precision in args.precisions:
        target_dir = export_dir(args, precision=precision, shape=shape)
        if (target_dir / "report.json").is_file():
            continue
        staging = target_dir.with_name(target_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        spec = family.make_spec(checkpoint, f"random-qwen3:{shape}", config,
                                ExportOptions(precision, args.max_length, model_name(shape, precision)))
        copy_tokenizer(checkpoint, staging, family)
        spec.save(staging)
        report = ExportReport(f"random-qwen3:{shape}", "random", family.name, precision, str(target_dir), True)
        report.graph = graph
        if precision in ("fp32", "fp16"):
            for f in (fp32 if precision == "fp32" else fp16_graph()).parent.glob("model.onnx*"):
                os.link(f, staging / f.name)
        else:
            source = fp16_graph() if int4_from_fp16(args) else fp32
            result = quantize_onnx(source, staging / "model.onnx", precision)
            report.quantization = {"method": result.method, "settings": result.settings,
                                   "activations": "float16" if source != fp32 else "float32"}
        report.files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        report.save(staging)
        shutil.rmtree(target_dir, ignore_errors=True)
        staging.rename(target_dir)
        timings[f"{precision}_s"] = round(time.perf_counter() - started, 1)
    timings["model_bytes"] = {p: model_bytes(export_dir(args, shape, p) / "model.onnx") for p in args.precisions}
    timings["attention"] = graph.get("attention")
    return timings


# --- phase: torch -------------------------------------------------------------------------------

def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class TorchEncoder:
    """transformers' Qwen3Model with SDPA attention, last-token pooling on left padding, L2-normalized (the
    product's pooled encoder, computed the way a user's PyTorch does)."""

    def __init__(self, checkpoint: Path, dtype: str, device: str, pad_id: int) -> None:
        import torch
        from transformers import AutoModel

        self.torch, self.device, self.pad_id = torch, device, pad_id
        self.model = AutoModel.from_pretrained(str(checkpoint), attn_implementation="sdpa",
                                               dtype=torch_dtype(dtype)).to(device).eval()

    def embed(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        torch = self.torch
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row):] = torch.tensor(row)
            mask[i, longest - len(row):] = 1
        with torch.inference_mode():
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            pooled = torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1)
        return pooled.cpu().numpy()

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def sorted_batches(rows: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """Indices in batches of ``batch``, longest first (sentence-transformers sorts by length the same way)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def torch_workload(enc: TorchEncoder, rows: Sequence[Sequence[int]], seconds: float) -> dict[str, Any]:
    batches = sorted_batches(rows, SORTED_BATCH)
    out = [None] * len(rows)
    for b in batches[:2]:
        enc.embed([rows[i] for i in b])  # warm-up: kernels and the allocator for these shapes
    latencies, rounds = [], []
    end = time.perf_counter() + seconds
    while not rounds or (time.perf_counter() < end and len(rounds) < 20):
        t0 = time.perf_counter()
        for b in batches:
            t = time.perf_counter()
            vecs = enc.embed([rows[i] for i in b])
            latencies.append((time.perf_counter() - t) * 1000)
            for i, v in zip(b, vecs):
                out[i] = v
        enc.sync()
        rounds.append(time.perf_counter() - t0)
    median = float(np.median(rounds))
    tokens = sum(len(r) for r in rows)
    return {"batch": SORTED_BATCH, "rounds": len(rounds), "tokens_per_s": round(tokens / median, 1),
            "texts_per_s": round(len(rows) / median, 1), "batch_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "batch_p95_ms": round(float(np.percentile(latencies, 95)), 2), "vectors": np.stack(out)}


def fixed_rate(run: Callable[[], Any], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of ``run()`` after one warm-up."""
    run()
    sync()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 100):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def mfu_fields(shape: str, rows: int, length: int, seconds: float) -> dict[str, Any]:
    from tritonembed.benchmarks.flops import pass_flops, peak_flops
    from tritonembed.export.testmodels import QWEN3_SHAPES

    tflops = pass_flops(QWEN3_SHAPES[shape], rows, length) / seconds / 1e12
    reading = nvml_reading()
    peak = peak_flops(reading["gpu"]) if reading else None
    return {"rows": rows, "length": length, "p50_ms": round(seconds * 1000, 2),
            "tokens_per_s": round(rows * length / seconds, 1), "tflops": round(tflops, 3),
            "mfu": round(tflops * 1e12 / peak, 4) if peak else None}


def torch_shape(args: argparse.Namespace, shape: str, texts: dict[str, list[str]], rec: Recorder) -> None:
    """PyTorch SDPA per dtype on the workload and the fixed shape; the first dtype's vectors become the reference
    (workload rows, long rows, the longest text) in ``reference.npz``."""
    tok = checkpoint_tokenizer(args, shape)
    pad_id = tok.spec.pad_token_id
    mixed = ids_of(tok, texts["mixed"])
    long_rows = ids_of(tok, long_texts(args.long_tokens, args.long_rows)) if shape == args.caps_shape else []
    longest = ids_of(tok, long_texts(args.longest_tokens, 1)) if shape == args.caps_shape else []
    device = "cuda" if args.provider == "cuda" else "cpu"
    rows, length = args.fixed
    for n, dtype in enumerate(args.torch_dtypes):
        key = f"{shape}/{dtype}"
        started = time.perf_counter()
        enc = TorchEncoder(shape_dir(args, shape) / "checkpoint", dtype, device, pad_id)
        if device == "cuda":
            enc.torch.cuda.reset_peak_memory_stats()
        result: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 1)}
        work = torch_workload(enc, mixed, args.seconds)
        vectors = work.pop("vectors")
        result["workload"] = work
        fixed_ids = [[1000 + (i * 7 + j) % 5000 for j in range(length)] for i in range(rows)]
        result["fixed"] = mfu_fields(shape, rows, length, fixed_rate(functools.partial(enc.embed, fixed_ids), args.seconds, enc.sync))
        if device == "cuda":
            result["peak_allocated_gib"] = round(enc.torch.cuda.max_memory_allocated() / 2**30, 3)
        if n == 0:  # the reference of `serve` and `caps`
            ref: dict[str, Any] = {"mixed": vectors}
            for name, rows_ in (("long", long_rows), ("longest", longest)):
                if rows_:
                    # a few rows of the long request: the check, not the cost, of the worst case
                    picked = rows_[:args.long_reference_rows] if name == "long" else rows_
                    t0 = time.perf_counter()
                    ref[name] = np.concatenate([enc.embed([r]) for r in picked])
                    result[f"{name}_reference_s"] = round(time.perf_counter() - t0, 1)
            np.savez(shape_dir(args, shape) / "reference.npz", **ref)
            result["reference"] = True
        enc.close()
        rec.put("torch", key, result)
        log.info("torch %s: %s", key, json.dumps({k: v for k, v in result.items() if k != "reference"}))


# --- phase: serve -------------------------------------------------------------------------------

class Served:
    """A GPU-profile repository of one export on a running tritonserver."""

    def __init__(self, args: argparse.Namespace, shape: str, precision: str, root: Path, *, grant: str = "",
                 limit_file: Path | None = None) -> None:
        from tritonembed.launcher import TritonServer
        from tritonembed.model_repository.assemble import build_repository
        from tritonembed.model_repository.configs import ServingOptions

        self.export = export_dir(args, shape, precision)
        self.name = model_name(shape, precision)
        options = ServingOptions(profile="gpu", execution_provider=args.provider, intra_op_threads=args.threads,
                                 encoder_max_batch=256, memory_grant=grant or args.grant,
                                 memory_limit_file=str(limit_file) if limit_file else "")
        build_repository(root / "models", [self.export], options)
        self.config = (root / "models" / f"{self.name}_encoder" / "config.pbtxt").read_text()
        self.server = TritonServer(root / "models", log_file=root / "tritonserver.log", gpu=args.provider == "cuda",
                                   startup_timeout=args.startup_timeout)

    def __enter__(self) -> Served:
        # the stub's own packages (numpy<2 and onnxruntime-gpu on the GPU machine), for the server alone
        stub_path = os.environ.get("GPU_ENSEMBLE_SERVER_PYTHONPATH")
        saved = os.environ.get("PYTHONPATH")
        if stub_path:
            os.environ["PYTHONPATH"] = stub_path
        try:
            self.server.start()
        finally:
            if stub_path:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def infer(self, texts: Sequence[str], timeout: float = 600.0) -> tuple[np.ndarray, np.ndarray]:
        """Raises: InferenceServerException from Triton (an error answer)."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        try:
            arr = np.array([[t.encode()] for t in texts], dtype=object)
            inp = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
            inp.set_data_from_numpy(arr)
            result = client.infer(self.name, [inp], client_timeout=timeout)
            return result.as_numpy("EMBEDDING"), result.as_numpy("TOKEN_COUNT")
        finally:
            client.close()


def ensemble_fixed(served: Served, args: argparse.Namespace, shape: str) -> dict[str, Any]:
    """Requests of ``rows`` texts x ``length`` tokens from two clients at once: the fixed shape's tokens/s, MFU."""
    rows, length = args.fixed
    texts = fixed_texts(rows, length)
    _, counts = served.infer(texts)
    real_length = int(np.max(counts))
    clients = 2

    def one() -> None:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda _: served.infer(texts), range(clients)))

    seconds = fixed_rate(one, args.seconds) / clients  # two requests per round share the encoder
    return {**mfu_fields(shape, rows, real_length, seconds), "clients": clients}


def bare_encoder(args: argparse.Namespace, served: Served, shape: str, precision: str, mixed: list[list[int]],
                 reference: np.ndarray) -> dict[str, Any]:
    """tritonembed.benchmarks.gpu's measurement of the same ONNX file (no Triton), in its own process."""
    from tritonembed.benchmarks.gpu import pad_left

    work = shape_dir(args, shape) / "bare" / precision
    work.mkdir(parents=True, exist_ok=True)
    (work / "workload.json").write_text(json.dumps({"mixed": mixed, "short": mixed[:16]}))
    have = list(range(min(16, len(mixed))))  # workload rows whose PyTorch vectors the torch phase saved
    ids, mask = pad_left([mixed[i] for i in have])
    np.savez(work / "reference.npz", input_ids=ids, attention_mask=mask, embedding=reference[have])
    out = work / "result.json"
    cmd = [sys.executable, "-m", "tritonembed.benchmarks.gpu", "measure", "--model", str(served.export / "model.onnx"),
           "--shape", shape, "--precision", bench_variant(args, precision), "--workload", str(work / "workload.json"),
           "--reference", str(work / "reference.npz"), "--provider", args.provider, "--threads", str(args.threads),
           "--max-tokens", ",".join(map(str, args.bare_max_tokens)), "--seconds", str(args.seconds), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.bare_timeout, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise EnsembleRunError(f"bare encoder measurement failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    result = json.loads(out.read_text())
    best = max(result["bulk"], key=lambda b: b["tokens_per_s"])
    return {"tokens_per_s": best["tokens_per_s"], "max_tokens": best["max_tokens"], "bulk": result["bulk"],
            "fixed": result["fixed"], "reference": result["reference"], "gpu_memory": result.get("gpu_memory"),
            "placement_nodes": result["placement"]["nodes"]}


def perf_sweep(args: argparse.Namespace, served: Served, texts: list[str], mean_tokens: float) -> dict[str, Any]:
    from tritonembed.benchmarks.perf_analyzer import run_perf_analyzer

    rows = run_perf_analyzer(served.name, served.server.grpc_url, served.export.parent.parent / "perf" / served.name,
                             concurrency=args.concurrency, batch_size=args.perf_batch, texts=texts,
                             measurement_ms=args.perf_ms, max_trials=args.perf_trials, timeout=args.perf_timeout)
    sweep = [{**r.to_dict(), "tokens_per_s": round(r.texts_per_s * mean_tokens, 1)} for r in rows]
    return {"rows": sweep, "saturation_tokens_per_s": max(r["tokens_per_s"] for r in sweep)}


def gateway_load(args: argparse.Namespace, served: Served, texts: list[str], tokens: int) -> dict[str, Any]:
    """The mixed workload through the OpenAI-shaped gateway from ``--gateway-clients`` threads, 16 texts a call.

    Raises:
        EnsembleRunError: an answer was not 200 or had the wrong number of vectors.
    """
    import urllib.request

    from tritonembed.gateway import BackgroundGateway, GatewaySettings

    settings = GatewaySettings(triton_url=served.server.grpc_url, port=0, log_level="warning", request_timeout=300)
    chunks = [texts[i:i + 16] for i in range(0, len(texts), 16)]
    with BackgroundGateway(settings) as gw:
        url = f"{gw.url}/v1/embeddings"

        def post(chunk: list[str]) -> float:
            body = json.dumps({"model": served.name, "input": chunk, "encoding_format": "float"}).encode()
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=300) as resp:
                data = json.loads(resp.read())
            if len(data["data"]) != len(chunk):
                raise EnsembleRunError(f"gateway answered {len(data['data'])} vectors for {len(chunk)} inputs")
            return (time.perf_counter() - t0) * 1000

        post(chunks[0])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.gateway_clients) as pool:
            latencies = list(pool.map(post, chunks))
        wall = time.perf_counter() - t0
    return {"clients": args.gateway_clients, "texts_per_call": 16, "calls": len(chunks),
            "tokens_per_s": round(tokens / wall, 1), "texts_per_s": round(len(texts) / wall, 1),
            "call_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "call_p95_ms": round(float(np.percentile(latencies, 95)), 2)}


def serve_variant(args: argparse.Namespace, shape: str, precision: str, texts: dict[str, list[str]], rec: Recorder,
                  deadline: Deadline) -> None:
    key = f"{shape}/{precision}"
    result: dict[str, Any] = {}
    reference = np.load(shape_dir(args, shape) / "reference.npz")["mixed"]
    mixed_ids = token_ids(export_dir(args, shape, precision), texts["mixed"])
    tokens = sum(len(r) for r in mixed_ids)
    root = shape_dir(args, shape) / "serve" / precision
    started = time.perf_counter()
    baseline = PeakMemory.before_start(args.provider)  # so the peak includes the weights and the CUDA context
    with Served(args, shape, precision, root) as served:
        result["start_s"] = round(time.perf_counter() - started, 1)
        result["kind"] = "KIND_GPU" if "KIND_GPU" in served.config else "KIND_CPU"
        with PeakMemory(args.provider, served.server.process.pid if served.server.process else None,
                        baseline=baseline) as peak:
            emb, counts = served.infer(texts["mixed"][:64])
            cos = cosines(emb, reference[:64])
            result["vs_torch"] = {"rows": len(cos), "min_cosine": round(float(cos.min()), 6),
                                  "mean_cosine": round(float(cos.mean()), 6), "floor": MIN_COSINE[precision],
                                  "token_counts_match": bool((counts.reshape(-1) == [len(r) for r in mixed_ids[:64]]).all())}
            rec.put("serve", key, result)
            if not np.isfinite(emb).all() or cos.min() < MIN_COSINE[precision]:
                raise EnsembleRunError(f"{key}: served vectors differ from PyTorch (min cos {cos.min():.4f})")
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("perf_analyzer", lambda: perf_sweep(args, served, texts["mixed"], tokens / len(mixed_ids))),
                ("fixed", lambda: ensemble_fixed(served, args, shape)),
                ("gateway", lambda: gateway_load(args, served, texts["mixed"], tokens)),
            ]
            for name, step in steps:
                if deadline.left() < args.step_reserve_s:
                    result[name] = {"skipped": "out of time"}
                    continue
                try:
                    result[name] = step()
                except Exception as exc:  # noqa: BLE001 - one step's failure is recorded; the others still measure
                    result[name] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
                    log.error("%s %s: %s", key, name, result[name]["error"])
                rec.put("serve", key, result)
        result["memory"] = peak.to_dict()
    if deadline.left() >= args.step_reserve_s:
        try:
            result["bare_encoder"] = bare_encoder(args, served, shape, precision, mixed_ids, reference)
        except Exception as exc:  # noqa: BLE001 - recorded like the other steps
            result["bare_encoder"] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
    else:
        result["bare_encoder"] = {"skipped": "out of time"}
    sat = result.get("perf_analyzer", {}).get("saturation_tokens_per_s")
    bare = result.get("bare_encoder", {}).get("tokens_per_s")
    result["ensemble_over_bare"] = round(sat / bare, 3) if sat and bare else None
    rec.put("serve", key, result)
    log.info("serve %s: sat %s tok/s, bare %s tok/s, ratio %s", key, sat, bare, result["ensemble_over_bare"])


# --- phase: caps --------------------------------------------------------------------------------

def cap_run(args: argparse.Namespace, precision: str, gib: float, rec: Recorder) -> None:
    """Serve the worst case within ``gib`` GiB; then make the guard shed and recover.

    Raises:
        EnsembleRunError: an error answer, wrong vectors, memory above the cap, or the guard not shedding.
    """
    from tritonclient.utils import InferenceServerException

    from tritonembed.model_repository.memory_guard import READING_TTL_S

    shape = args.caps_shape
    key = f"{shape}/{precision}@{gib:g}GiB"
    root = shape_dir(args, shape) / "caps" / f"{precision}-{gib:g}"
    limit_file = root / "memory-limit"
    root.mkdir(parents=True, exist_ok=True)
    limit_file.write_text(str(1 << 50))  # far above any device: the grant, not the file, bounds the run
    ref = np.load(shape_dir(args, shape) / "reference.npz")
    # the encoder's grant leaves the cap's rest to the CUDA context and Triton's pinned / CUDA pools
    grant = f"{int((gib - args.cap_margin_gib) * 2**30)}B"
    result: dict[str, Any] = {"cap_gib": gib, "grant": grant, "margin_gib": args.cap_margin_gib}
    failures: list[str] = []
    baseline = PeakMemory.before_start(args.provider)
    with Served(args, shape, precision, root, grant=grant, limit_file=limit_file) as served:
        with PeakMemory(args.provider, served.server.process.pid if served.server.process else None,
                        baseline=baseline) as peak:
            for name, texts in (("long", long_texts(args.long_tokens, args.long_rows)),
                                ("longest", long_texts(args.longest_tokens, 1))):
                t0 = time.perf_counter()
                try:
                    emb, counts = served.infer(texts)
                except InferenceServerException as exc:
                    result[name] = {"error": exc.message()[-1500:], "status": exc.status()}
                    failures.append(f"{name}: {exc.status()}")
                    continue
                cos = cosines(emb[:len(ref[name])], ref[name])
                result[name] = {"texts": len(texts), "tokens_per_text": int(np.max(counts)),
                                "seconds": round(time.perf_counter() - t0, 2), "finite": bool(np.isfinite(emb).all()),
                                "min_cosine_vs_torch": round(float(cos.min()), 6), "checked_rows": len(cos)}
                if not np.isfinite(emb).all() or cos.min() < LONG_MIN_COSINE[precision]:
                    failures.append(f"{name}: min cosine {cos.min():.4f}")
                rec.put("caps", key, result)
        result["memory"] = peak.to_dict()
        if args.provider == "cuda" and peak.peak - peak.baseline > gib * 2**30:
            failures.append(f"device memory grew {result['memory']['delta_gib']} GiB > {gib:g} GiB")
        # the guard: a limit below the usage sheds with UNAVAILABLE, the server lives, lifting it restores service
        limit_file.write_text("1M")
        time.sleep(3 * READING_TTL_S)
        try:
            served.infer(["shed me"])
            result["guard"] = {"shed": False}
            failures.append("guard: a request below the limit was served, not shed")
        except InferenceServerException as exc:
            result["guard"] = {"shed": "UNAVAILABLE" in str(exc.status()), "status": exc.status(),
                               "message": exc.message()[-300:]}
            if not result["guard"]["shed"]:
                failures.append(f"guard: answered {exc.status()} instead of UNAVAILABLE")
        limit_file.write_text(str(1 << 50))
        time.sleep(3 * READING_TTL_S)
        emb, _ = served.infer(["after the limit was lifted"])
        result["guard"]["recovered"] = bool(np.isfinite(emb).all()) and served.server.is_alive()
    result["ok"] = not failures
    result["failures"] = failures
    rec.put("caps", key, result)
    log.info("caps %s: %s", key, "ok" if not failures else failures)
    if failures:
        raise EnsembleRunError(f"{key}: {'; '.join(failures)}")


# --- orchestration ------------------------------------------------------------------------------

def run_step(rec: Recorder, phase: str, key: str, deadline: Deadline, reserve: float, step: Callable[[], Any]) -> bool:
    """Run one step, recording a skip (out of time) or its error; True when it completed."""
    if deadline.left() < reserve:
        rec.put(phase, key, {"skipped": f"out of time ({deadline.left():.0f} s left, {reserve:.0f} s reserved)"})
        return False
    t0 = time.perf_counter()
    try:
        value = step()
    except Exception as exc:  # noqa: BLE001 - recorded, then the run goes on: a failed phase can be rerun alone
        log.error("%s %s failed: %s", phase, key, exc)
        entry = rec.data["phases"].setdefault(phase, {}).get(key)
        error = {"error": f"{type(exc).__name__}: {exc}"[-3000:], "traceback": traceback.format_exc()[-3000:]}
        rec.put(phase, key, {**entry, **error} if isinstance(entry, dict) else error)
        return False
    if value is not None:
        rec.put(phase, key, value)
    log.info("%s %s done in %.0f s (%.0f s left)", phase, key, time.perf_counter() - t0, deadline.left())
    return True


def errors_in(value: Any, path: str = "") -> list[str]:
    """Paths of every ``error`` entry in the result tree (a step's or a measurement's)."""
    if not isinstance(value, dict):
        return []
    found = [path or "."] if "error" in value else []
    for key, item in value.items():
        found += errors_in(item, f"{path}/{key}" if path else str(key))
    return found


def summary(data: dict[str, Any]) -> list[str]:
    """One line per measured thing, for the log."""
    lines = []
    for key, r in data["phases"].get("torch", {}).items():
        if "workload" in r:
            lines.append(f"torch {key}: {r['workload']['tokens_per_s']} tok/s, fixed MFU {r['fixed']['mfu']}, "
                         f"peak {r.get('peak_allocated_gib')} GiB")
    for key, r in data["phases"].get("serve", {}).items():
        pa = r.get("perf_analyzer", {})
        lines.append(f"serve {key}: cos {r.get('vs_torch', {}).get('min_cosine')}, sat {pa.get('saturation_tokens_per_s')} "
                     f"tok/s, bare {r.get('bare_encoder', {}).get('tokens_per_s')} tok/s, ratio {r.get('ensemble_over_bare')}, "
                     f"fixed MFU {r.get('fixed', {}).get('mfu')}, gateway {r.get('gateway', {}).get('tokens_per_s')} tok/s, "
                     f"mem {r.get('memory', {}).get('peak_gib')} GiB" + (f", error {r['error'][:200]}" if "error" in r else ""))
    for key, r in data["phases"].get("caps", {}).items():
        lines.append(f"caps {key}: ok {r.get('ok')}, mem {r.get('memory', {}).get('delta_gib')} GiB, "
                     f"guard {r.get('guard')}, failures {r.get('failures', r.get('error', ''))}")
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = Deadline(args.deadline_s)
    rec = Recorder(args.output, args)
    texts = load_texts(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for phase in args.phases:
        if phase == "build":
            for shape in args.shapes:
                run_step(rec, "build", shape, deadline, args.reserve["build"], lambda s=shape: build_shape(args, s))
        elif phase == "torch":
            for shape in args.shapes:
                run_step(rec, "torch", f"{shape}/run", deadline, args.reserve["torch"],
                         lambda s=shape: torch_shape(args, s, texts, rec))
        elif phase == "serve":
            for shape in args.shapes:
                for precision in args.precisions:
                    run_step(rec, "serve", f"{shape}/{precision}", deadline, args.reserve["serve"],
                             lambda s=shape, p=precision: serve_variant(args, s, p, texts, rec, deadline))
        elif phase == "caps":
            for precision, gib in args.caps:
                run_step(rec, "caps", f"{args.caps_shape}/{precision}@{gib:g}GiB", deadline, args.reserve["caps"],
                         lambda p=precision, g=gib: cap_run(args, p, g, rec))
    rec.data["summary"] = summary(rec.data)  # printed by `merge`, which the run script calls last
    rec.save()
    return rec.data


def merge(output: Path, others: Sequence[Path]) -> list[str]:
    """Copy each of ``others``' build results into ``output`` (the background build writes its own JSON), print
    the summary; returns the failed steps."""
    data = json.loads(output.read_text()) if output.is_file() else {"phases": {}}
    for other in others:
        if other.is_file():
            for key, value in json.loads(other.read_text()).get("phases", {}).get("build", {}).items():
                data["phases"].setdefault("build", {})[f"{key} ({other.stem})"] = value
    data["summary"] = summary(data)
    data["failed"] = errors_in(data["phases"])
    output.write_text(json.dumps(data, indent=1, default=str))
    for line in data["summary"] + [f"failed: {data['failed']}"]:
        log.info("%s", line)
    return data["failed"]


def csv_of(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


def cap_entry(text: str) -> tuple[str, float]:
    precision, _, gib = text.partition(":")
    if precision not in PRECISIONS or not gib:
        raise argparse.ArgumentTypeError(f"a cap is PRECISION:GiB (e.g. fp16:24), got {text!r}")
    return precision, float(gib)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("texts", help="write the workload texts file (where ../shared/data/stsb exists)")
    t.add_argument("-o", "--output", type=Path, required=True)
    t.add_argument("--count", type=int, default=512)
    m = sub.add_parser("merge", help="copy the build phase of separate runs' JSONs into the first (and summarize)")
    m.add_argument("output", type=Path)
    m.add_argument("others", type=Path, nargs="*")
    r = sub.add_parser("run", help="run the phases")
    r.add_argument("--phases", type=csv_of(str), default=list(PHASES), help=f"comma-separated of {','.join(PHASES)}")
    r.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--shapes", type=csv_of(str), default=["0.6B", "4B"])
    r.add_argument("--precisions", type=csv_of(str), default=["fp16", "int4"])
    r.add_argument("--torch-dtypes", type=csv_of(str), default=["fp16", "bf16"])
    r.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-ensemble"))
    r.add_argument("--texts-file", type=Path, required=True)
    r.add_argument("--texts", type=int, default=512, help="mixed workload texts used")
    r.add_argument("-o", "--output", type=Path, required=True)
    r.add_argument("--checkpoint-dtype", default="bfloat16", help="dtype of the random checkpoint on disk")
    r.add_argument("--max-length", type=int, default=32768)
    r.add_argument("--int4-activations", choices=("float16", "float32"), default="float16",
                   help="int4 quantized from the fp16 graph (the GPU form) or from fp32")
    r.add_argument("--threads", type=int, default=4, help="intra-op threads of the encoder")
    r.add_argument("--grant", default="", help="memory grant of the serve phase ('' = free at start)")
    r.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per timed measurement")
    r.add_argument("--fixed", type=csv_of(int), default=[64, 512], help="ROWS,LENGTH of the MFU shape")
    r.add_argument("--concurrency", default="4:64:20", help="perf_analyzer --concurrency-range")
    r.add_argument("--perf-batch", type=int, default=4, help="texts per perf_analyzer request")
    r.add_argument("--perf-ms", type=int, default=2000)
    r.add_argument("--perf-trials", type=int, default=3, help="windows per level (3 is perf_analyzer's least)")
    r.add_argument("--perf-timeout", type=float, default=150.0)
    r.add_argument("--gateway-clients", type=int, default=16)
    r.add_argument("--bare-max-tokens", type=csv_of(int), default=[16384, 65536])
    r.add_argument("--bare-timeout", type=float, default=150.0)
    r.add_argument("--startup-timeout", type=float, default=240.0)
    r.add_argument("--caps", type=csv_of(cap_entry), default=[("fp16", 24.0), ("fp16", 16.0), ("int4", 12.0)],
                   help="PRECISION:GiB,... of the worst-case phase")
    r.add_argument("--caps-shape", default="4B")
    r.add_argument("--cap-margin-gib", type=float, default=1.5,
                   help="of each cap, what the encoder's grant leaves to the CUDA context and Triton's pools")
    r.add_argument("--long-rows", type=int, default=64)
    r.add_argument("--long-tokens", type=int, default=8192)
    r.add_argument("--longest-tokens", type=int, default=32768)
    r.add_argument("--long-reference-rows", type=int, default=2, help="rows of the long request checked vs PyTorch")
    r.add_argument("--deadline-s", type=float, default=530.0, help="no step starts after this many seconds")
    r.add_argument("--reserve", type=lambda s: {k: float(v) for k, v in (x.split("=") for x in s.split(","))},
                   default={"build": 200.0, "torch": 40.0, "serve": 60.0, "caps": 60.0},
                   help="PHASE=SECONDS,...: a step starts only with this much time left")
    r.add_argument("--step-reserve-s", type=float, default=20.0, help="time a measurement inside serve needs")
    args = p.parse_args(argv)
    if args.command == "run":
        bad = [x for x in args.phases if x not in PHASES] + [x for x in args.precisions if x not in PRECISIONS]
        if bad:
            p.error(f"unknown phase or precision: {bad}")
        if len(args.fixed) != 2:
            p.error("--fixed is ROWS,LENGTH")
        if args.caps_shape not in args.shapes and "caps" in args.phases:
            p.error("--caps-shape must be one of --shapes (its checkpoint and reference are built there)")
        if any(prec not in args.precisions for prec, _ in args.caps) and "caps" in args.phases:
            p.error("each --caps precision must be in --precisions (its export is built there)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.command == "texts":
        write_texts(args.output, args.count)
        return 0
    if args.command == "merge":
        return 1 if merge(args.output, args.others) else 0
    data = run(args)
    failed = errors_in(data["phases"])
    if failed:
        log.error("failed steps: %s", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
