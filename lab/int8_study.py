"""int8 activation scales per tensor vs per token: batch dependence, distance to FP32, CPU throughput.

Quantizes one FP32 export both ways (``quantize_onnx(..., int8_activation_scales=...)``) and measures, on
the benchmark's mixed workload, with the serving tokenizer and the same thread count:

- batch dependence: each text embedded alone vs inside batches of ``--batch`` (max |diff|, min cosine);
- min / mean cosine to the FP32 graph;
- texts/s over the workload sorted by length in batches of 32 (best of 3 passes, passes interleaved).

    python -m lab.int8_study EXPORT_DIR [--texts 256] [--threads 2] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tritonembed.benchmarks.report import table

log = logging.getLogger("lab.int8_study")


def study(export_dir: Path, *, texts: int, threads: int, batch: int, workdir: Path) -> list[dict[str, Any]]:
    import numpy as np

    from tritonembed.benchmarks.perf_analyzer import workload_texts
    from tritonembed.export.quantize import quantize_onnx
    from tritonembed.export.validate import OnnxEncoder, compare
    from tritonembed.model_repository.tokenization import SpecTokenizer, pad_batch
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export_dir)
    tokenizer = SpecTokenizer(export_dir / spec.tokenizer_file, spec)
    fp32 = export_dir / spec.onnx_file
    paths = {"fp32": fp32}
    for scales in ("tensor", "token"):
        paths[f"int8 per {scales}"] = quantize_onnx(fp32, workdir / scales / "model.onnx", "int8",
                                                    int8_activation_scales=scales).model_path
    encoders = {name: OnnxEncoder(path, tokenizer, threads=threads) for name, path in paths.items()}
    corpus = tokenizer.format(workload_texts(texts))
    ids = tokenizer.encode(corpus).ids
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [pad_batch([ids[i] for i in order[s:s + 32]], spec.pad_token_id, spec.padding_side)
               for s in range(0, len(order), 32)]
    reference = encoders["fp32"].embed(corpus, batch_size=batch)
    rows = {}
    for name, encoder in encoders.items():
        batched = encoder.embed(corpus, batch_size=batch)
        alone = np.concatenate([encoder.embed([t], batch_size=1) for t in corpus])
        dependence, to_fp32 = compare(alone, batched), compare(batched, reference)
        rows[name] = {"variant": name, "alone_vs_batched_max_abs_diff": dependence.max_abs_diff,
                      "alone_vs_batched_min_cosine": dependence.min_cosine,
                      "vs_fp32_min_cosine": to_fp32.min_cosine, "vs_fp32_mean_cosine": to_fp32.mean_cosine,
                      "texts_per_s": 0.0}
    for _ in range(3):  # interleaved passes share the machine's noise
        for name, encoder in encoders.items():
            started = time.perf_counter()
            for input_ids, mask in batches:
                encoder.run_ids(input_ids, mask)
            rows[name]["texts_per_s"] = max(rows[name]["texts_per_s"], round(len(ids) / (time.perf_counter() - started), 1))
    for row in rows.values():
        log.info("%s", row)
    return list(rows.values())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.int8_study")
    p.add_argument("export_dir", type=Path, help="an FP32 export (tritonembed export ... --precision fp32)")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=30, help="batch size of the 'batched' side of the comparison")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="tritonembed-int8-") as tmp:
        rows = study(args.export_dir, texts=args.texts, threads=args.threads, batch=args.batch, workdir=Path(tmp))
    print(table(["variant", "alone vs batched: max abs diff / min cos", "vs FP32: min / mean cos",
                 "texts/s (sorted, batch 32)"],
                [[r["variant"], f"{r['alone_vs_batched_max_abs_diff']:.2g} / {r['alone_vs_batched_min_cosine']:.5f}",
                  f"{r['vs_fp32_min_cosine']:.4f} / {r['vs_fp32_mean_cosine']:.5f}", f"{r['texts_per_s']:.1f}"]
                 for r in rows]))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
