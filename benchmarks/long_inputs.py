"""One long text through our fused export (bare and served), the old unfused graph and transformers SDPA.

``python -m tritonembed.benchmarks.long_inputs --model random-qwen3:tiny --tokens 2048,8192,16384,32768``

For each length, each engine runs the same random token ids (one text, no padding) once in a fresh
subprocess, so one measurement's memory never counts in another's:

* ``fused``: the export of today (``tritonembed export``, fp32, GroupQueryAttention), ONNX Runtime CPU;
* ``unfused``: the same checkpoint traced with transformers' eager attention (MatMul -> Softmax -> MatMul,
  the graph before fused attention), ONNX Runtime CPU; skipped above ``--unfused-max-tokens`` (its L x L
  scores: about 3 GiB at 8k tokens on the tiny model, 12 at 16k);
* ``sdpa``: ``transformers.AutoModel(attn_implementation="sdpa")`` in PyTorch fp32 (what
  sentence-transformers runs);
* ``fused-fp16`` (only when named in ``--engines``): the fp16 export on ONNX Runtime CPU, whose float16
  GroupQueryAttention is not the flash path;
* ``served`` (only when named): the fused export behind a real ``tritonserver`` (the repository ``tritonembed
  serve`` builds, CPU profile, the same thread count), one real text of about that many tokens
  (:func:`~tritonembed.export.probes.long_probe_text`) sent by :class:`~tritonembed.client.EmbeddingClient` over
  gRPC through the ensemble: tokenizer model, encoder model, ONNX Runtime. The server answers one short text
  first, as a running server would have; its memory is the server's process tree, sampled every 0.1 s (peak,
  and peak above idle).

Each child reports the wall time of its one run, its process peak RSS (VmHWM, loading included) and the
run's own peak above the resident size before it (``/proc/self/clear_refs`` resets VmHWM). One run per cell:
numbers for orders of magnitude, not for small differences. Random weights: speed and memory only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENGINES = ("fused", "unfused", "sdpa", "fused-fp16", "served")
DEFAULT_ENGINES = "fused,unfused,sdpa"
TITLES = {"fused": "fused export (ORT fp32, GQA)", "unfused": "unfused graph (ORT fp32)",
          "sdpa": "transformers SDPA (fp32)", "fused-fp16": "fused export, fp16 (ORT CPU)",
          "served": "fused export served (tritonserver, text)"}
GIB = 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


def _reset_peak() -> None:
    """VmHWM := VmRSS (Linux); afterwards VmHWM is the peak of what runs next."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")


def child(engine: str, path: str, tokens: int, threads: int) -> dict[str, Any]:
    """One run of ``engine`` on ``tokens`` random ids in this process; the measurement as a dict."""
    import numpy as np

    if engine == "served":
        return _served(Path(path).parent, tokens, threads)
    ids = np.random.default_rng(tokens).integers(0, 150000, (1, tokens)).astype(np.int64)
    if engine == "sdpa":
        import torch
        from transformers import AutoModel

        torch.set_num_threads(threads)
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
        loaded_peak = _status_kib("VmHWM:")
        _reset_peak()
        before = _status_kib("VmRSS:")
        started = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids)).last_hidden_state[:, -1].numpy()
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        loaded_peak = _status_kib("VmHWM:")
        _reset_peak()
        before = _status_kib("VmRSS:")
        started = time.perf_counter()
        out = session.run(["embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    seconds = time.perf_counter() - started
    run_peak = _status_kib("VmHWM:")
    return {"engine": engine, "tokens": tokens, "seconds": round(seconds, 3),
            "peak_rss_gib": round(max(loaded_peak, run_peak) * 1024 / GIB, 3),
            "run_extra_gib": round((run_peak - before) * 1024 / GIB, 3), "finite": bool(np.isfinite(out).all())}


def _served(export_dir: Path, tokens: int, threads: int) -> dict[str, Any]:
    """One long text through a real tritonserver serving ``export_dir``; the measurement as a dict."""
    import tempfile

    import numpy as np

    from tritonembed.benchmarks.system import RssSampler, tree_rss_bytes
    from tritonembed.client import EmbeddingClient, RetryPolicy
    from tritonembed.export.probes import long_probe_text
    from tritonembed.launcher import TritonServer
    from tritonembed.model_repository.assemble import build_repository
    from tritonembed.model_repository.configs import ServingOptions
    from tritonembed.model_repository.tokenization import SpecTokenizer
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export_dir)
    text = long_probe_text(SpecTokenizer(export_dir / spec.tokenizer_file, spec).count_untruncated, tokens)
    with tempfile.TemporaryDirectory(prefix="long-served-") as root:
        models = Path(root) / "models"
        build_repository(models, [export_dir], ServingOptions(profile="cpu", intra_op_threads=threads))
        with TritonServer(models, log_file=Path(root) / "tritonserver.log") as triton, \
                EmbeddingClient(triton.grpc_url, spec.name, timeout=3600, retry=RetryPolicy(max_retries=0)) as client:
            client.embed(["a short text first"])
            idle = tree_rss_bytes(triton.process.pid)
            started = time.perf_counter()
            with RssSampler(triton.process.pid, interval=0.1) as sampler:
                result = client.embed_with_usage([text])
            seconds = time.perf_counter() - started
    return {"engine": "served", "tokens": tokens, "served_tokens": int(result.token_counts[0]),
            "seconds": round(seconds, 3), "peak_rss_gib": round(sampler.peak_bytes / GIB, 3),
            "run_extra_gib": round((sampler.peak_bytes - idle) / GIB, 3),
            "finite": bool(np.isfinite(result.embeddings).all())}


def prepare(model: str, workdir: Path, max_tokens: int, engines: Sequence[str]) -> dict[str, str]:
    """Export ``model`` fused (the product's export), unfused and, if asked, fp16 into ``workdir``; engine -> path."""
    from tritonembed.export.families import family_by_name
    from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
    from tritonembed.export.pipeline import export_model
    from tritonembed.export.resolve import resolve_model
    from tritonembed.spec import ModelSpec

    fused_dir = workdir / "fused"
    export_model(model, fused_dir, precision="fp32", max_length=max_tokens, run_stsb=False, overwrite=True)
    source = resolve_model(model).path
    unfused = workdir / "unfused" / "model.onnx"
    backbone = family_by_name("qwen3").load_backbone(source)
    export_onnx(build_pooled_encoder(backbone, ModelSpec.load(fused_dir), "unfused"), unfused)
    paths = {"fused": str(fused_dir / "model.onnx"), "unfused": str(unfused), "sdpa": str(source),
             "served": str(fused_dir / "model.onnx")}
    if "fused-fp16" in engines:
        fp16_dir = workdir / "fused-fp16"
        export_model(model, fp16_dir, precision="fp16", max_length=max_tokens, run_stsb=False, overwrite=True)
        paths["fused-fp16"] = str(fp16_dir / "model.onnx")
    return paths


def run_child(engine: str, path: str, tokens: int, threads: int, timeout: float) -> dict[str, Any]:
    """The child's measurement, or ``{"error": ...}`` when it failed or ran past ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "tritonembed.benchmarks.long_inputs", "--child", engine, path, str(tokens),
           "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "tokens": tokens, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"engine": engine, "tokens": tokens, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: Sequence[dict[str, Any]], lengths: Sequence[int], engines: Sequence[str]) -> str:
    """The docs' table: one line per length, one column per engine (seconds, peak RSS, the run's own peak)."""
    cell = {(r["engine"], r["tokens"]): r for r in rows}
    lines = ["| tokens | " + " | ".join(TITLES[e] for e in engines) + " |", "|---|" + "---|" * len(engines)]
    for tokens in lengths:
        cells = []
        for engine in engines:
            r = cell.get((engine, tokens))
            if r is None:
                cells.append("not run")
            elif "error" in r:
                cells.append(f"failed: {r['error']}")
            elif r.get("skipped"):
                cells.append(r["skipped"])
            else:
                cells.append(f"{r['seconds']:.2f} s, {r['peak_rss_gib']:.2f} GiB (run +{r['run_extra_gib']:.2f})")
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-qwen3:tiny")
    parser.add_argument("--tokens", default="2048,8192,16384,32768", help="comma-separated lengths")
    parser.add_argument("--unfused-max-tokens", type=int, default=8192,
                        help="longest input for the unfused graph (its memory grows with length squared)")
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--fp16-max-tokens", type=int, default=16384,
                        help="longest input for fused-fp16 (ORT's CPU float16 GQA materializes the scores)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tritonembed-long-inputs"))
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per child run")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        engine, path, tokens = args.child
        print(json.dumps(child(engine, path, int(tokens), args.threads)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    lengths = [int(t) for t in args.tokens.split(",")]
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    paths = prepare(args.model, args.workdir, max(lengths), engines)
    limits = {"unfused": args.unfused_max_tokens, "fused-fp16": args.fp16_max_tokens}
    rows = []
    for tokens in lengths:
        for engine in engines:
            if tokens > limits.get(engine, tokens):
                rows.append({"engine": engine, "tokens": tokens, "skipped": "not run (L x L scores)"})
                continue
            row = run_child(engine, paths[engine], tokens, args.threads, args.timeout)
            log.info("%s", row)
            rows.append(row)
    # the machine may be shared: the load average says how much the latencies are worth
    result = {"model": args.model, "threads": args.threads, "load_average_after": os.getloadavg(), "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows, lengths, engines))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
