"""Offline study of the CPU encoder's micro-batch planner: padded tokens and ONNX Runtime time per plan.

The served encoder (``model_repository/stages.py``) packs the rows of one ``execute()`` longest first
while ``rows * longest <= max_tokens_per_batch``; rows of very different lengths then share a micro-batch
and the short ones are padded to the long one. This study replays the mixed workload in groups of
``rows`` texts (what one execute() sees at that load) through the same ``model.onnx`` and compares:

- token budget only (16,384 and 2,048 tokens): the planner before the length-ratio rule;
- length ratio 0.5 / 0.7 at 16,384 tokens, and 0.7 at 4,096 (the served default until 5436a1d): a row also
  starts a new micro-batch when it is shorter than that fraction of the micro-batch's longest row;
- the served default (``ServingOptions.max_tokens_per_batch`` tokens, ratio 0.7).

    python -m lab.planner_study EXPORT_DIR --rows 4,8,32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("lab.planner_study")


def planners(max_rows: int) -> dict[str, Callable[[Sequence[int]], list[list[int]]]]:
    from tritonembed.model_repository.batching import plan_microbatches
    from tritonembed.model_repository.configs import ServingOptions

    served = ServingOptions.max_tokens_per_batch
    # min_fill=0 is the planner before the length-ratio rule (token budget only).
    return {
        "budget only (16384 tokens)": lambda ls: plan_microbatches(ls, 16384, max_rows, min_fill=0.0),
        "budget only (2048 tokens)": lambda ls: plan_microbatches(ls, 2048, max_rows, min_fill=0.0),
        "length ratio 0.5": lambda ls: plan_microbatches(ls, 16384, max_rows, min_fill=0.5),
        "length ratio 0.7": lambda ls: plan_microbatches(ls, 16384, max_rows, min_fill=0.7),
        "length ratio 0.7, 4096 tokens": lambda ls: plan_microbatches(ls, 4096, max_rows),
        f"served default (0.7, {served} tokens)": lambda ls: plan_microbatches(ls, served, max_rows),
    }


def study(export_dir: Path, rows_per_execute: Sequence[int], threads: int, texts: int, repeats: int) -> dict:
    import numpy as np

    from tritonembed.benchmarks.perf_analyzer import workload_texts
    from tritonembed.export.validate import OnnxEncoder
    from tritonembed.model_repository.tokenization import SpecTokenizer, pad_batch
    from tritonembed.spec import ModelSpec

    spec = ModelSpec.load(export_dir)
    tokenizer = SpecTokenizer(export_dir / spec.tokenizer_file, spec)
    encoder = OnnxEncoder(export_dir / spec.onnx_file, tokenizer, threads=threads)
    ids = tokenizer.encode(tokenizer.format(workload_texts(texts))).ids
    encoder.run_ids(*pad_batch(ids[:8], spec.pad_token_id, spec.padding_side))  # warm-up
    results = []
    for rows in rows_per_execute:
        groups = [ids[i:i + rows] for i in range(0, len(ids), rows)]
        for name, plan in planners(256).items():
            real = padded = runs = 0
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                for group in groups:
                    for batch in plan([len(x) for x in group]):
                        input_ids, mask = pad_batch([group[i] for i in batch], spec.pad_token_id, spec.padding_side)
                        encoder.run_ids(input_ids, mask)
                        if _ == 0:
                            padded += int(input_ids.size)
                            real += int(mask.sum())
                            runs += 1
                best = min(best, time.perf_counter() - started)
            results.append({"rows_per_execute": rows, "planner": name, "onnx_runs": runs, "real_tokens": real,
                            "padded_tokens": padded, "padding_waste": round(1 - real / padded, 4),
                            "seconds": round(best, 3), "texts_per_s": round(len(ids) / best, 1)})
            log.info("%3d rows, %-24s waste %5.1f %%, %6.1f texts/s", rows, name, 100 * (1 - real / padded),
                     len(ids) / best)
    del np
    return {"model": spec.name, "threads": threads, "texts": len(ids), "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.planner_study")
    p.add_argument("export_dir", type=Path)
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = study(args.export_dir, args.rows, args.threads, args.texts, args.repeats)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
