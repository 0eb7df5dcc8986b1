"""PNG of ``benchmarks.gpu`` results: tokens/s and GPU memory per precision, one group per model shape.

    python -m tritonembed.benchmarks.gpu_plot benchmarks/results/gpu-h200-*.json -o docs/img/gpu-h200.png

Several result files may hold rows of the same shape (separate calls); a variant measured twice keeps the
row of the file given last. Rows that failed are left out. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("tritonembed.benchmarks.gpu_plot")


def measured_rows(paths: Iterable[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{shape: {precision: row}}`` of the successful rows, later files winning."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["results"]:
            if "error" not in row:
                rows.setdefault(row["shape"], {})[row["precision"]] = row
    return rows


def plot(rows: dict[str, dict[str, dict[str, Any]]], output: Path, title: str) -> Path:
    """Three panels: bulk tokens/s (best budget), 64x512 tokens/s, GPU memory of the process (GiB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("mixed workload, tokens/s", lambda r: max(b["tokens_per_s"] for b in r["bulk"])),
              ("64 x 512 tokens, tokens/s", lambda r: r["fixed"]["tokens_per_s"]),
              ("GPU memory of the process, GiB", lambda r: (r.get("gpu_memory", {}).get("process_bytes") or 0) / 2**30))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 5))
    for ax, (label, value) in zip(axes, panels):
        names, values, colors = [], [], []
        for i, (shape, variants) in enumerate(sorted(rows.items())):
            for precision, row in variants.items():
                names.append(f"{shape} {precision}")
                values.append(value(row))
                colors.append(f"C{i}")
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), names, fontsize=7, rotation=60, ha="right")
        ax.set_title(label, fontsize=10)
        for x, v in enumerate(values):
            ax.annotate(f"{v / 1000:.0f}k" if v >= 1000 else f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--title", default="Qwen3-Embedding shapes (random weights) on onnxruntime-gpu")
    args = parser.parse_args(argv)
    rows = measured_rows(args.results)
    if not rows:
        log.error("no successful rows in %s", [str(p) for p in args.results])
        return 1
    log.info("wrote %s", plot(rows, args.output, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
