"""In-process baselines, each run in its own subprocess so its peak memory and imports are its own.

- ``ort``: a bare ONNX Runtime session on the same ``model.onnx`` the server runs, fed by the same
  tokenizer, with the same number of intra-op threads: the ceiling of what serving can reach.
- ``torch``: the upstream usage code in PyTorch (sentence-transformers for BERT-like models,
  transformers with last-token pooling for Qwen3).

    python -m tritonembed.benchmarks.inprocess --engine ort --export-dir DIR --workload W.json --out R.json

The workload file holds ``{"name": {"texts": [...], "tokens": [...]}}``; every workload runs at every
batch size given. The result file holds one entry per (workload, batch size) plus the peak RSS.

``--serve`` instead keeps the model loaded and answers timing requests on stdin/stdout (one JSON object per
line: ``{"texts": [...], "batch_size": 32}`` -> ``{"seconds": s}``), so the benchmark can alternate this
baseline with its server in paired rounds while PyTorch runs in a process of its own. See :class:`Worker`.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tritonembed.benchmarks.loadgen import make_batches, sequential_loop
from tritonembed.benchmarks.system import own_peak_rss_bytes

log = logging.getLogger("tritonembed.benchmarks.inprocess")


def ort_encoder(export_dir: Path, threads: int):
    """An ONNX Runtime session on the export's ``model.onnx``, fed by the serving tokenizer."""
    from tritonembed.export.validate import OnnxEncoder
    from tritonembed.model_repository.tokenization import SpecTokenizer
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export_dir)
    return OnnxEncoder(export_dir / spec.onnx_file, SpecTokenizer(export_dir / spec.tokenizer_file, spec),
                       threads=threads)


def ort_embedder(export_dir: Path, threads: int, encoder=None) -> Callable[[Sequence[str]], np.ndarray]:
    """Texts -> embeddings with ONNX Runtime: tokenize (serving tokenizer), pad to the longest, run.

    ``encoder`` (an :func:`ort_encoder`) is reused when given instead of loading a second session.
    """
    encoder = encoder or ort_encoder(export_dir, threads)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return encoder.embed(encoder.tokenizer.format(texts), batch_size=len(texts))

    return embed


def torch_embedder(export_dir: Path, source: Path, threads: int) -> Callable[[Sequence[str]], np.ndarray]:
    """Texts -> embeddings with the upstream PyTorch usage code for the export's family."""
    import torch

    from tritonembed.spec import ModelSpec

    torch.set_num_threads(threads)
    spec = ModelSpec.load(export_dir)
    if spec.family == "bert":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source), device="cpu")
        model.max_seq_length = spec.max_length

        def embed_st(texts: Sequence[str]) -> np.ndarray:
            return model.encode(list(texts), batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)

        return embed_st

    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from tritonembed.export.families import family_by_name

    tokenizer = AutoTokenizer.from_pretrained(str(source), padding_side="left")
    backbone = family_by_name(spec.family).load_backbone(source)

    def embed_qwen(texts: Sequence[str]) -> np.ndarray:
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = backbone(**batch).last_hidden_state
        return F.normalize(hidden[:, -1], p=2, dim=1).numpy()  # left padding: the last position is the EOS

    return embed_qwen


def serve(embed: Callable[[Sequence[str]], np.ndarray], stdin, stdout) -> None:
    """Answer timing requests until stdin closes: embed the texts in batches as given, report the seconds."""
    stdout.write(json.dumps({"ready": True}) + "\n")
    stdout.flush()
    for line in stdin:
        request = json.loads(line)
        texts, size = request["texts"], int(request.get("batch_size", 32))
        started = time.perf_counter()
        for i in range(0, len(texts), size):
            embed(texts[i:i + size])
        stdout.write(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
        stdout.flush()


class Worker:
    """A baseline in its own process (``--serve``), timed on demand: ``seconds(texts, batch_size)``.

    Raises:
        RuntimeError: the worker fails to start or dies (its stderr is in ``log_file`` when one is given).
    """

    def __init__(self, engine: str, export_dir: Path, threads: int, source: Path | None = None,
                 log_file: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "tritonembed.benchmarks.inprocess", "--engine", engine, "--export-dir",
               str(export_dir), "--threads", str(threads), "--serve"]
        if source is not None:
            cmd += ["--source", str(source)]
        self._log = open(log_file, "wb") if log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"in-process worker exited with {self.process.returncode}")
        return json.loads(line)

    def seconds(self, texts: Sequence[str], batch_size: int = 32) -> float:
        self.process.stdin.write(json.dumps({"texts": list(texts), "batch_size": batch_size}) + "\n")
        self.process.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.engine == "ort":
        embed = ort_embedder(args.export_dir, args.threads)
    else:
        embed = torch_embedder(args.export_dir, args.source, args.threads)
    load_s = time.perf_counter() - started
    workloads = json.loads(Path(args.workload).read_text(encoding="utf-8"))
    results = []
    for name, data in workloads.items():
        for batch_size in args.batch_sizes:
            batches = make_batches(data["texts"], data["tokens"], batch_size)
            measured = sequential_loop(embed, batches, duration_s=args.duration, min_requests=args.min_requests,
                                       warmup_requests=min(2, args.min_requests))
            log.info("%s %s b%d: %.1f texts/s, p50 %.1f ms", args.engine, name, batch_size, measured.texts_per_s,
                     measured.latency["p50_ms"])
            results.append({"workload": name, "batch_size": batch_size, **measured.to_dict()})
    return {"engine": args.engine, "threads": args.threads, "load_s": round(load_s, 2),
            "peak_rss_bytes": own_peak_rss_bytes(), "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonembed.benchmarks.inprocess")
    p.add_argument("--engine", choices=("ort", "torch"), required=True)
    p.add_argument("--export-dir", type=Path, required=True)
    p.add_argument("--source", type=Path, help="the checkpoint (torch engine)")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--workload", type=Path)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--out", type=Path)
    p.add_argument("--serve", action="store_true", help="answer timing requests on stdin (see Worker)")
    args = p.parse_args(argv)
    if args.engine == "torch" and args.source is None:
        p.error("--source is required with --engine torch")
    if not args.serve and (args.workload is None or args.out is None):
        p.error("--workload and --out are required without --serve")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.serve:
        embed = ort_embedder(args.export_dir, args.threads) if args.engine == "ort" else torch_embedder(
            args.export_dir, args.source, args.threads)
        serve(embed, sys.stdin, sys.stdout)
        return 0
    args.out.write_text(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
