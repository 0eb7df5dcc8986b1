"""A/B of the exporter's static shapes: the traced graph vs the same graph with constant shape inputs.

For each model the product's exporter writes both graphs from one traced module (``export_onnx`` with
``static_shapes=False`` and ``True``), then bare ONNX Runtime runs them alternately, round after round,
at the shapes the CPU encoder sees: one short text (1 x 12 tokens), a planner micro-batch (16 x 32) and
long passages (4 x 128). Token ids are random (the time of a run does not depend on them); the outputs of
the two graphs are compared on every shape. Reported: nodes as exported and after ONNX Runtime's own
optimizations, p50 per shape and graph, and the median over rounds of static / traced.

    python -m lab.static_shapes_ab --models sentence-transformers/all-MiniLM-L6-v2,random-qwen3:small \\
        --threads 2 --rounds 6 -o lab/results/static-shapes-ab.json
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

log = logging.getLogger("lab.static_shapes_ab")

SHAPES = ((1, 12), (16, 32), (4, 128))
GRAPHS = ("traced", "static")
MAX_ABS_DIFF = 1e-5


def export_both(model_id: str, workdir: Path) -> tuple[dict[str, Path], dict[str, Any], int]:
    """Both graphs of ``model_id`` under ``workdir``, the static-shapes report and the vocabulary size."""
    from tritonembed.export.families import ExportOptions, family_for, read_json
    from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
    from tritonembed.export.resolve import resolve_model

    resolved = resolve_model(model_id)
    config = read_json(resolved.path / "config.json")
    family = family_for(config)
    spec = family.make_spec(resolved.path, resolved.model_id, config, ExportOptions("fp32", None, None))
    encoder = build_pooled_encoder(family.load_backbone(resolved.path), spec)
    graph: dict[str, Any] = {}
    paths = {"traced": export_onnx(encoder, workdir / "traced" / "model.onnx", static_shapes=False),
             "static": export_onnx(encoder, workdir / "static" / "model.onnx", graph_report=graph)}
    return paths, graph["static_shapes"], int(config["vocab_size"])


def optimized_nodes(path: Path, threads: int) -> int:
    """Nodes left after ONNX Runtime's own graph optimizations (what it runs on the CPU)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable, no layout ops
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def compare(model_id: str, workdir: Path, threads: int, rounds: int, seconds: float) -> dict[str, Any]:
    import numpy as np

    from tritonembed.benchmarks import stats as st
    from tritonembed.benchmarks.gpu import session

    paths, report, vocab = export_both(model_id, workdir)
    sessions = {name: session(path, "cpu", threads) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    feeds = {}
    max_diff = 0.0
    for rows, length in SHAPES:
        ids = rng.integers(5, vocab, (rows, length)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        outs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
        max_diff = max(max_diff, float(np.abs(outs["static"] - outs["traced"]).max()))
        feeds[f"{rows}x{length}"] = feed
    if max_diff > MAX_ABS_DIFF:  # timing two graphs that disagree would compare nothing
        raise RuntimeError(f"{model_id}: the static graph differs from the traced one by {max_diff:.3g}")
    per_shape: dict[str, Any] = {}
    for label, feed in feeds.items():
        p50s: dict[str, list[float]] = {name: [] for name in GRAPHS}
        for k in range(rounds):
            for name in (GRAPHS if k % 2 == 0 else GRAPHS[::-1]):  # neither graph always runs first
                times = []
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline or len(times) < 5:
                    t0 = time.perf_counter()
                    sessions[name].run(None, feed)
                    times.append((time.perf_counter() - t0) * 1e3)
                p50s[name].append(st.percentile(times, 50))
        ratios = [s / t for s, t in zip(p50s["static"], p50s["traced"])]
        per_shape[label] = {"traced_p50_ms": round(st.percentile(p50s["traced"], 50), 3),
                            "static_p50_ms": round(st.percentile(p50s["static"], 50), 3),
                            "static_over_traced": round(st.percentile(ratios, 50), 3),
                            "round_ratios": [round(r, 3) for r in ratios]}
        log.info("%s %s: %s", model_id, label, per_shape[label])
    return {"model": model_id, "threads": threads, "rounds": rounds, "static_shapes": report,
            "nodes_after_ort": {name: optimized_nodes(path, threads) for name, path in paths.items()},
            "max_abs_diff": max_diff, "shapes": per_shape}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda s: s.split(","),
                        default=["sentence-transformers/all-MiniLM-L6-v2", "random-qwen3:small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0, help="per graph, shape and round")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("-o", "--output", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    from tritonembed.benchmarks.system import machine_description

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for model_id in args.models:
            slug = "".join(c if c.isalnum() else "-" for c in model_id)
            results.append(compare(model_id, workdir / slug, args.threads, args.rounds, args.seconds))
    out = {"command": " ".join(["python -m lab.static_shapes_ab", *(argv or sys.argv[1:])]),
           "machine": machine_description(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    log.info("results in %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
