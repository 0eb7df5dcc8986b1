"""ONNX Runtime on a GPU: the Qwen3-Embedding shapes at every precision, tokens/s, MFU, GPU memory.

One command builds a random-weight Qwen3 model of each shape in memory, exports it with the
product's exporter (:mod:`tritonembed.export.onnx_export`) and quantizer
(:mod:`tritonembed.export.quantize`), then measures each variant in a process of its own on the
CUDA execution provider (onnxruntime-gpu)::

    python -m tritonembed.benchmarks.gpu run --shapes 0.6B,4B --precisions fp32,fp16,w8,int4,int8 \\
        --workdir /tmp/gpu-bench -o benchmarks/results/gpu-h200.json

Variants: ``fp32`` (the export), ``fp16`` (``quantize --precision fp16``), ``int4`` (weight-only
4-bit ``MatMulNBits``, last layer 8-bit, 4-bit embedding table), ``w8`` (the same quantizer with
every layer 8-bit: weight-only 8-bit ``MatMulNBits``), ``int8`` (the CPU int8 graph: per-token
``MatMulIntegerToFloat``; measured to show where its nodes run, not as a GPU precision), and
``fp32-traced`` / ``fp16-traced``: the graph as torch traced it, without the exporter's static shapes
(:mod:`tritonembed.export.static_shapes`), for a same-call A/B of what those cost on a GPU.

Each measurement reports: where the nodes ran (ONNX Runtime's profiler, per provider), agreement
with the PyTorch fp32 reference on probe rows (min cosine, with the tolerance of
:data:`MIN_COSINE`), bulk throughput on the mixed STS-B + passages workload through the encoder's
own length planner (:func:`tritonembed.model_repository.batching.plan_microbatches`) at a GPU token
budget, latency percentiles of 32-text batches and of one short text, a compute-bound fixed shape
(64 x 512 tokens) with MFU (:mod:`.flops`), and the process's GPU memory (NVML).

Random weights: speed and memory only, never quality. ``--provider cpu`` runs the same code on
ONNX Runtime's CPU provider (the smoke test does, on the ``tiny`` shape).

One module because every measurement runs in a child process of its own (a CUDA context per variant) and the
parent, the child entry point and the variant builders must agree on one argument and result format.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.artifact import model_bytes
from tritonembed.benchmarks.flops import pass_flops, peak_flops, useful_flops
from tritonembed.benchmarks.stats import latency_summary, ratio
from tritonembed.errors import TritonEmbedError
from tritonembed.export.validate import compare
from tritonembed.model_repository.tokenization import pad_batch

log = logging.getLogger("tritonembed.benchmarks.gpu")

PRECISIONS = ("fp32", "fp16", "w8", "int4", "w8-fp16", "int4-fp16", "int8", "fp32-traced", "fp16-traced")
#: Variants quantized from the fp16 graph (fp16 activations) rather than from the fp32 export.
FROM_FP16 = ("w8-fp16", "int4-fp16")
#: Variants of the traced graph (exported again with ``static_shapes=False``).
TRACED = ("fp32-traced", "fp16-traced")
#: Minimum cosine to the PyTorch fp32 reference per variant. fp32 on a GPU may use TF32 matmuls.
#: The quantized variants of a random-weight model have no quality to keep; their bound only
#: catches a broken graph (NaN, wrong rows), and the measured value is reported.
MIN_COSINE = {"fp32": 0.999, "fp16": 0.99, "w8": 0.98, "int4": 0.5, "w8-fp16": 0.98, "int4-fp16": 0.5, "int8": 0.5,
              "fp32-traced": 0.999, "fp16-traced": 0.99}
PAD_ID = 151643  # Qwen3: <|endoftext|>, padding on the left
PROBE_LENGTHS = (1, 3, 9, 33, 77, 150, 301, 512)
FIXED_SHAPE = (64, 512)
DONE = "DONE"


class GpuBenchError(TritonEmbedError):
    """The CUDA execution provider is missing or did not take the session."""


# --- workload -----------------------------------------------------------------------------------

def build_workload(export_dir: Path, texts: int = 512, short: int = 64) -> dict[str, list[list[int]]]:
    """Token ids of the mixed STS-B + passages workload and of short sentences (serving tokenizer).

    Raises:
        TritonEmbedError: STS-B data or the tokenizer is missing.
    """
    from tritonembed.benchmarks.bench import short_sentences
    from tritonembed.benchmarks.perf_analyzer import workload_texts
    from tritonembed.model_repository.tokenization import SpecTokenizer
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export_dir)
    tokenizer = SpecTokenizer(export_dir / spec.tokenizer_file, spec)

    def ids(items: Sequence[str]) -> list[list[int]]:
        return tokenizer.encode(tokenizer.format(items)).ids

    return {"mixed": ids(workload_texts(texts)), "short": ids(short_sentences(short))}


#: Rows of ids left-padded to the longest with Qwen3's pad id: (input_ids, attention_mask).
pad_left = functools.partial(pad_batch, pad_id=PAD_ID, side="left")


def probe_rows(mixed: Sequence[Sequence[int]], lengths: Sequence[int] = PROBE_LENGTHS) -> list[list[int]]:
    """Rows of the given lengths cut from the workload's concatenated ids (real tokens, varied lengths)."""
    stream = [t for row in mixed for t in row]
    rows, start = [], 0
    for n in lengths:
        n = min(n, len(stream))
        if start + n > len(stream):
            start = 0
        rows.append(stream[start:start + n])
        start += n
    return rows


# --- prepare: build, reference, export, quantize ------------------------------------------------

def qwen3_spec(shape_name: str) -> Any:
    """The ModelSpec the exporter needs (last-token pooling, normalized) for a random Qwen3 shape."""
    from tritonembed.export.testmodels import QWEN3_SHAPES
    from tritonembed.spec import ModelSpec

    shape = QWEN3_SHAPES[shape_name]
    return ModelSpec(name=f"random-qwen3-{shape_name}", model_id=f"random-qwen3-{shape_name}", family="qwen3",
                     pooling="last_token", normalize=True, hidden_size=shape.hidden_size, max_length=32768,
                     padding_side="left", pad_token_id=PAD_ID, precision="fp32", append_eos=True)


def prepare(shape_name: str, workdir: Path, precisions: Sequence[str], probes: Sequence[Sequence[int]],
            seed: int = 0) -> Path:
    """Build the random model, save its fp32 reference on ``probes``, export and quantize into ``workdir/shape``.

    Each variant's folder gets a ``DONE`` file once complete, so a measurement can start on it while
    the next variant is being written (``run --no-prepare``).

    Raises:
        ExportError / QuantizationError: the export or a quantizer failed.
    """
    import torch
    import transformers

    from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
    from tritonembed.export.testmodels import qwen3_config

    out = workdir / shape_name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = transformers.Qwen3Model._from_config(qwen3_config(shape_name), dtype=torch.float32)
    encoder = build_pooled_encoder(backbone.eval(), qwen3_spec(shape_name))
    ids, mask = pad_left(probes)
    with torch.no_grad():  # each row alone, unpadded: the reference owes nothing to the batch
        reference = np.concatenate([encoder(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)).numpy()
                                    for row in probes])
    np.savez(out / "reference.npz", input_ids=ids, attention_mask=mask, embedding=reference)
    log.info("%s: model built and reference computed in %.0f s", shape_name, time.perf_counter() - started)
    fp32 = export_onnx(encoder, out / "fp32" / "model.onnx")
    (fp32.parent / DONE).touch()
    if any(p in TRACED for p in precisions):
        traced = export_onnx(encoder, out / "fp32-traced" / "model.onnx", static_shapes=False)
        (traced.parent / DONE).touch()
    del encoder, backbone
    log.info("%s: fp32 exported at %.0f s", shape_name, time.perf_counter() - started)
    lanes = [lane for lane in quantize_lanes(precisions) if lane]
    if lanes:  # in parallel: each quantizer is mostly one thread, and a 4B model takes minutes per variant
        with multiprocessing.get_context("spawn").Pool(len(lanes)) as pool:
            pool.starmap(_quantize_lane, [(out, lane, started) for lane in lanes])
    return out


def quantize_lanes(precisions: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the variants made from fp32, [fp16 and the variants made from it]) -- fp16 joins when one needs it."""
    wanted = [p for p in precisions if p not in ("fp32", "fp32-traced")]
    from_fp16 = [p for p in wanted if p in FROM_FP16]
    from_fp32 = [p for p in wanted if p not in FROM_FP16 and p != "fp16"]
    return from_fp32, (["fp16"] if from_fp16 or "fp16" in wanted else []) + from_fp16


def _quantize_lane(out: Path, precisions: Sequence[str], started: float) -> None:
    """Write ``precisions`` in order into ``out``, each from fp32 or (for :data:`FROM_FP16`) from fp16."""
    from tritonembed.export.quantize import quantize_onnx

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for precision in precisions:
        target = out / precision / "model.onnx"
        source = out / ("fp16" if precision in FROM_FP16 else "fp32") / "model.onnx"
        if precision == "fp16-traced":
            quantize_onnx(out / "fp32-traced" / "model.onnx", target, "fp16")
        elif precision.startswith("w8"):
            quantize_onnx(source, target, "int4", int4_8bit_last_layers=10**6)
        elif precision.startswith("int4"):
            quantize_onnx(source, target, "int4")
        else:
            quantize_onnx(source, target, precision)
        (target.parent / DONE).touch()
        log.info("%s: %s written at %.0f s", out.name, precision, time.perf_counter() - started)


# --- measure (one variant, in its own process) --------------------------------------------------

def gpu_memory(pid: int) -> dict[str, Any]:
    """NVML's view: this process's GPU memory, the device's used memory and the GPU's name."""
    try:
        import pynvml
    except ImportError:
        return {}
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        process = None
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                process = int(p.usedGpuMemory)
        return {"gpu": name if isinstance(name, str) else name.decode(), "device_used_bytes": int(info.used),
                "device_total_bytes": int(info.total), "process_bytes": process}
    finally:
        pynvml.nvmlShutdown()


def placement(profile_file: Path) -> dict[str, Any]:
    """Kernel count and time per execution provider, read from an ONNX Runtime profile."""
    events = json.loads(profile_file.read_text())
    nodes: dict[str, int] = {}
    micros: dict[str, int] = {}
    cpu_ops: dict[str, int] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        provider = args.get("provider", "?")
        nodes[provider] = nodes.get(provider, 0) + 1
        micros[provider] = micros.get(provider, 0) + int(event.get("dur", 0))
        if provider == "CPUExecutionProvider":
            op = args.get("op_name", "?")
            cpu_ops[op] = cpu_ops.get(op, 0) + 1
    total = sum(micros.values()) or 1
    return {"nodes": nodes, "kernel_us": micros, "cpu_time_share": round(micros.get("CPUExecutionProvider", 0) / total, 4),
            "cpu_ops": dict(sorted(cpu_ops.items(), key=lambda kv: -kv[1]))}


def session(model: Path, provider: str, threads: int, profile_prefix: Path | None = None) -> Any:
    """An InferenceSession on ``provider`` (``cuda`` or ``cpu``); CUDA's arena grows only as requested.

    Raises:
        GpuBenchError: ``cuda`` was asked for and ONNX Runtime fell back to the CPU provider.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if provider == "cuda":
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}),
                                "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(model), options, providers=providers)
    if provider == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise GpuBenchError(f"CUDA execution provider unavailable (install onnxruntime-gpu matching your CUDA): "
                            f"session providers {sess.get_providers()}")
    return sess


def timed_runs(run: Callable[[], Any], seconds: float, min_runs: int, max_runs: int) -> list[float]:
    """Latencies (ms) of repeated ``run()`` calls: at least ``min_runs``, then until ``seconds`` pass."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while len(latencies) < max_runs and (len(latencies) < min_runs or time.perf_counter() < end):
        t0 = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


Run = Callable[[np.ndarray, np.ndarray], np.ndarray]


def agreement(run: Run, reference: Any, precision: str) -> dict[str, Any]:
    """Cosine of the variant's embeddings of the probe rows (one padded batch) to the PyTorch fp32 reference."""
    cmp = compare(run(reference["input_ids"], reference["attention_mask"]), reference["embedding"])
    return {"min_cosine": round(cmp.min_cosine, 6), "mean_cosine": round(cmp.mean_cosine, 6), "finite": cmp.finite,
            "tolerance": MIN_COSINE[precision], "ok": cmp.finite and cmp.min_cosine >= MIN_COSINE[precision]}


def bulk_phase(run: Run, shape: Any, mixed: Sequence[Sequence[int]], budget: int, seconds: float) -> dict[str, Any]:
    """The whole mixed workload through the length planner at a ``budget`` of padded tokens per micro-batch."""
    from tritonembed.model_repository.batching import plan_microbatches

    lengths = [len(r) for r in mixed]
    batches = [pad_left([mixed[i] for i in b]) for b in plan_microbatches(lengths, budget, max_rows=budget)]
    for ids, mask in batches[:2]:
        run(ids, mask)  # warm-up: kernels and arena for these shapes
    rounds = timed_runs(lambda: [run(i, m) for i, m in batches], seconds, 3, 50)
    median, best = float(np.median(rounds)) / 1000, min(rounds) / 1000
    padded = sum(ids.size for ids, _ in batches)
    return {"max_tokens": budget, "micro_batches": len(batches), "rounds": len(rounds),
            "texts_per_s": round(len(mixed) / median, 1), "tokens_per_s": round(sum(lengths) / median, 1),
            "best_tokens_per_s": round(sum(lengths) / best, 1), "padding_waste": round(1 - sum(lengths) / padded, 4),
            "useful_tflops": round(useful_flops(shape, lengths) / median / 1e12, 3)}


def batch32_phase(run: Run, mixed: Sequence[Sequence[int]], budget: int) -> dict[str, Any]:
    """Client batches of 32 texts, each planned and run as the encoder would: latency percentiles."""
    from tritonembed.model_repository.batching import plan_microbatches

    latencies = []
    for _ in range(2):
        for start in range(0, len(mixed) - 31, 32):
            rows = mixed[start:start + 32]
            t = time.perf_counter()
            for b in plan_microbatches([len(r) for r in rows], budget, max_rows=budget):
                run(*pad_left([rows[i] for i in b]))
            latencies.append((time.perf_counter() - t) * 1000)
    return {"max_tokens": budget, **latency_summary(latencies),
            "texts_per_s": round(32 * len(latencies) / (sum(latencies) / 1000), 1)}


def single_text_phase(run: Run, short: Sequence[Sequence[int]], passes: int = 4) -> dict[str, float]:
    """One short text per call: latency percentiles over ``passes`` passes of the short sentences."""
    ones = [pad_left([row]) for row in short]
    for ids, mask in ones[:5]:
        run(ids, mask)
    latencies = []
    for _ in range(passes):
        for ids, mask in ones:
            t = time.perf_counter()
            run(ids, mask)
            latencies.append((time.perf_counter() - t) * 1000)
    return latency_summary(latencies)


def fixed_phase(run: Run, shape: Any, rows: int, length: int, seconds: float) -> dict[str, Any]:
    """A full ``rows`` x ``length`` batch (no padding), repeated: the compute-bound figure."""
    ids = np.random.default_rng(0).integers(0, 150000, size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    run(ids, mask)
    median = float(np.median(timed_runs(lambda: run(ids, mask), seconds, 3, 200))) / 1000
    return {"rows": rows, "length": length, "p50_ms": round(median * 1000, 3),
            "tokens_per_s": round(rows * length / median, 1),
            "tflops": round(pass_flops(shape, rows, length) / median / 1e12, 3)}


def measure(model: Path, shape_name: str, precision: str, workload: dict[str, list[list[int]]], reference: Path,
            provider: str, threads: int, max_tokens: Sequence[int], seconds: float) -> dict[str, Any]:
    """Every number of one variant (see the module docstring).

    Raises:
        GpuBenchError: ``provider`` is ``cuda`` and ONNX Runtime cannot use it.
    """
    from tritonembed.export.testmodels import QWEN3_SHAPES

    shape = QWEN3_SHAPES[shape_name]
    result: dict[str, Any] = {"shape": shape_name, "precision": precision, "provider": provider,
                              "model_bytes": model_bytes(model)}
    before = gpu_memory(os.getpid())
    t0 = time.perf_counter()
    profile_dir = model.parent / "profile"
    profile_dir.mkdir(exist_ok=True)
    sess = session(model, provider, threads, profile_prefix=profile_dir / "ort")
    result["load_s"] = round(time.perf_counter() - t0, 2)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    result["reference"] = agreement(run, np.load(reference), precision)  # also the one profiled run
    result["placement"] = placement(Path(sess.end_profiling()))
    bulk = [bulk_phase(run, shape, workload["mixed"], budget, seconds) for budget in max_tokens]
    result["bulk"] = bulk
    best_budget = max(bulk, key=lambda b: b["tokens_per_s"])["max_tokens"]
    result["batch32"] = batch32_phase(run, workload["mixed"], best_budget)
    result["batch1_short"] = single_text_phase(run, workload["short"])
    result["fixed"] = fixed_phase(run, shape, *(FIXED_SHAPE if provider == "cuda" else (4, 64)), seconds)
    after = gpu_memory(os.getpid())
    if after:
        peak = peak_flops(after["gpu"])
        result["gpu"] = after["gpu"]
        result["gpu_memory"] = {"process_bytes": after["process_bytes"],
                                "device_used_delta_bytes": after["device_used_bytes"] - before.get("device_used_bytes", 0)}
        result["peak_dense_fp16_tflops"] = peak / 1e12 if peak else None
        if peak:
            result["fixed"]["mfu"] = ratio(result["fixed"]["tflops"] * 1e12, peak, 4)
            for b in bulk:
                b["mfu"] = ratio(b["useful_tflops"] * 1e12, peak, 4)
    return result


# --- orchestration ------------------------------------------------------------------------------

def wait_for(path: Path, timeout: float) -> bool:
    """True once ``path`` exists; False if ``timeout`` seconds pass first."""
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            return False
        time.sleep(2)
    return True


def measure_in_subprocess(args: argparse.Namespace, shape_dir: Path, shape_name: str, precision: str) -> dict[str, Any]:
    """Run ``measure`` in a fresh interpreter, so its GPU memory and imports are its own."""
    out = shape_dir / precision / "result.json"
    cmd = [sys.executable, "-m", "tritonembed.benchmarks.gpu", "measure", "--model", str(shape_dir / precision / "model.onnx"),
           "--shape", shape_name, "--precision", precision, "--workload", str(args.workload_file),
           "--reference", str(shape_dir / "reference.npz"), "--provider", args.provider, "--threads", str(args.threads),
           "--max-tokens", ",".join(map(str, args.max_tokens)), "--seconds", str(args.seconds), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.measure_timeout)
    if proc.returncode != 0 or not out.exists():
        return {"shape": shape_name, "precision": precision, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(out.read_text())


def system_info() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                            "cpu_count": os.cpu_count()}
    info.update({k: v for k, v in gpu_memory(os.getpid()).items() if k in ("gpu", "device_total_bytes")})
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    workload = json.loads(Path(args.workload_file).read_text())
    result: dict[str, Any] = {"command": " ".join(sys.argv), "system": system_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "workload": {"mixed_texts": len(workload["mixed"]),
                                           "mixed_tokens": sum(len(r) for r in workload["mixed"]),
                                           "short_texts": len(workload["short"])},
                              "min_cosine": MIN_COSINE, "results": []}
    output = Path(args.output)
    deadline = time.monotonic() + args.prepare_timeout
    for shape_name in args.shapes:
        shape_dir = Path(args.workdir) / shape_name
        if args.prepare:
            prepare(shape_name, Path(args.workdir), args.precisions, probe_rows(workload["mixed"]))
        for precision in args.precisions:
            if not wait_for(shape_dir / precision / DONE, deadline - time.monotonic()):
                result["results"].append({"shape": shape_name, "precision": precision,
                                          "error": f"{shape_dir / precision / DONE} did not appear in time"})
                continue
            row = measure_in_subprocess(args, shape_dir, shape_name, precision)
            log.info("%s %s: %s", shape_name, precision, json.dumps(summary_line(row)))
            result["results"].append(row)
            output.write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    output.write_text(json.dumps(result, indent=1))
    return result


def summary_line(row: dict[str, Any]) -> dict[str, Any]:
    if "error" in row:
        return {"error": row["error"][-300:]}
    best = max(row["bulk"], key=lambda b: b["tokens_per_s"])
    return {"tokens_per_s": best["tokens_per_s"], "mfu_bulk": best.get("mfu"), "fixed_mfu": row["fixed"].get("mfu"),
            "b1_p50": row["batch1_short"]["p50_ms"], "b32_p50": row["batch32"]["p50_ms"],
            "gpu_mib": (row.get("gpu_memory", {}).get("process_bytes") or 0) / 2**20,
            "cos": row["reference"]["min_cosine"], "cpu_nodes": row["placement"]["nodes"].get("CPUExecutionProvider", 0)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tritonembed.benchmarks.gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("workload", help="tokenize the mixed workload with a Qwen3 export's tokenizer")
    w.add_argument("--export-dir", type=Path, required=True)
    w.add_argument("--texts", type=int, default=512)
    w.add_argument("-o", "--output", type=Path, required=True)
    for name in ("run", "measure", "prepare"):
        p = sub.add_parser(name)
        p.add_argument("--workload", dest="workload_file", type=Path, required=True)
        p.add_argument("--workdir", type=Path, default=Path("/tmp/tritonembed-gpu"))
        p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
        p.add_argument("--threads", type=int, default=4, help="intra-op threads (the CPU side of each session)")
        p.add_argument("--max-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384],
                       help="micro-batch token budgets of the bulk phase (comma-separated)")
        p.add_argument("--seconds", type=float, default=3.0, help="minimum time per timed phase")
        p.add_argument("-o", "--output", type=Path)
        if name == "measure":
            p.add_argument("--model", type=Path, required=True)
            p.add_argument("--shape", required=True)
            p.add_argument("--precision", choices=PRECISIONS, required=True)
            p.add_argument("--reference", type=Path, required=True)
        else:
            p.add_argument("--shapes", type=lambda s: s.split(","), default=["0.6B"])
            p.add_argument("--precisions", type=lambda s: s.split(","), default=list(PRECISIONS[:4]))
        if name == "run":
            p.add_argument("--no-prepare", dest="prepare", action="store_false",
                           help="wait for WORKDIR/SHAPE/PRECISION/DONE written by a separate `prepare` instead")
            p.add_argument("--prepare-timeout", type=float, default=900.0)
            p.add_argument("--measure-timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.command == "workload":
        args.output.write_text(json.dumps(build_workload(args.export_dir, args.texts)))
    elif args.command == "prepare":
        workload = json.loads(args.workload_file.read_text())
        for shape_name in args.shapes:
            prepare(shape_name, args.workdir, args.precisions, probe_rows(workload["mixed"]))
    elif args.command == "measure":
        workload = json.loads(args.workload_file.read_text())
        result = measure(args.model, args.shape, args.precision, workload, args.reference, args.provider,
                         args.threads, args.max_tokens, args.seconds)
        args.output.write_text(json.dumps(result, indent=1))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
