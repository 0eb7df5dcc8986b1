"""Markdown tables and PNG plots from a ``tritonembed bench`` result.

:func:`write_report` replaces the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in the
target file (creating it when missing), so hand-written analysis around the tables survives a rerun.
Plots need matplotlib (``pip install matplotlib``); without it the tables are written and the plots skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: ``—`` for missing values, thousands separators for large numbers."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def mib(value: float | None) -> str:
    return "—" if not value else f"{value / 2**20:,.0f}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _p(row: dict[str, Any], q: int) -> float | None:
    key = f"p{q}_ms"
    return row.get(key, row.get("latency", {}).get(key))


def _rows(section: Any) -> list[dict[str, Any]]:
    if isinstance(section, dict):
        return section.get("rows", section.get("results", []))
    return section or []


def headline_table(model: dict[str, Any]) -> str:
    s = model["summary"]
    ort = s["bare_ort_best_texts_per_s"]
    mean_tokens = model["workloads"]["mixed"]["mean_tokens"]

    def line(label: str, tps: float | None, p50: float | None, rss: float | None) -> list[Any]:
        ratio = fmt(round(tps / ort, 2), 2) if tps and ort else "—"
        return [label, tps, None if tps is None else round(tps * mean_tokens), p50, ratio, mib(rss)]

    ours = model["ours"]
    rows = [
        line("ours: Triton ensemble, gRPC (perf_analyzer)", s["ours_grpc_best_texts_per_s"], s["ours_short_p50_ms"],
             ours.get("peak_rss_bytes")),
        line("ours: AsyncEmbeddingClient (gRPC)", s["async_client_best_texts_per_s"],
             _short_p50(_rows(ours.get("async_client"))), ours.get("peak_rss_bytes")),
        line("ours: OpenAI gateway (HTTP, httpx)", s["gateway_best_texts_per_s"],
             _short_p50(_rows(ours.get("gateway"))), _gateway_rss(ours)),
        line("bare ONNX Runtime, in-process (ceiling)", ort, s["bare_ort_short_p50_ms"],
             model["bare_ort"].get("peak_rss_bytes")),
    ]
    if "torch" in model:
        torch = model["torch"]
        rows.append(line("PyTorch, in-process (" + ("sentence-transformers" if model["family"] == "bert" else
                                                      "transformers") + ")",
                         s["torch_best_texts_per_s"], _short_p50(torch["results"]), torch.get("peak_rss_bytes")))
    for key, peer in model.get("peer", {}).items():
        if isinstance(peer, dict) and "rows" in peer:
            rows.append(line(f"peer: {key} (HTTP, httpx)", max(r["texts_per_s"] for r in peer["rows"] if r["workload"] == "mixed"),
                             _short_p50(peer["rows"]), peer.get("peak_rss_bytes")))
    return table(["path", "best texts/s (mixed)", "tokens/s", "p50 ms, 1 short text", "× bare ORT", "peak RSS MiB"], rows)


def _gateway_rss(ours: dict[str, Any]) -> float | None:
    rows = _rows(ours.get("gateway"))
    extra = rows[0].get("gateway_peak_rss_bytes") if rows else None
    return (ours.get("peak_rss_bytes") or 0) + (extra or 0) if extra else None


def _short_p50(rows: Sequence[dict[str, Any]]) -> float | None:
    for r in rows:
        if r.get("workload") == "short" and r.get("batch_size") == 1 and r.get("concurrency", 1) == 1:
            return _p(r, 50)
    return None


def ratios_table(model: dict[str, Any]) -> str:
    names = {"ours_over_bare_ort": "ours gRPC / bare ORT", "ours_over_torch": "ours gRPC / PyTorch",
             "ours_int8_over_torch": "ours gRPC, int8 (batch 32) / PyTorch fp32",
             "ours_over_peer": "ours gRPC / best peer", "gateway_over_peer": "ours gateway / best peer (both HTTP)",
             "async_client_over_bare_ort": "AsyncEmbeddingClient / bare ORT",
             "gateway_over_bare_ort": "gateway / bare ORT"}
    return table(["ratio (same run, best mixed-workload throughput)", "value"],
                 [[names.get(k, k), fmt(v, 2)] for k, v in model["summary"]["ratios"].items() if v is not None])


def goals_table(model: dict[str, Any]) -> str:
    verdict = {True: "**met**", False: "**not met**", None: "not measured"}
    return table(["goal", "target", "measured", "verdict", "numbers"],
                 [[g["name"], g["target"], fmt(g["measured"], 3), verdict[g["met"]], g["detail"]]
                  for g in model["summary"]["goals"]])


PAIRED_COLUMNS = (  # (key in a round, column title); a column is shown when any round has it
    ("perf_analyzer_short_p50_ms", "perf_analyzer p50 ms"),
    ("ours_short_p50_ms", "Python client p50 ms"),
    ("bare_ort_short_p50_ms", "bare ORT p50 ms"),
    ("ours_corpus_texts_per_s", "ours bulk texts/s"),
    ("bare_ort_corpus_texts_per_s", "bare ORT bulk (sorted, 32)"),
    ("bare_ort_planned_corpus_texts_per_s", "bare ORT bulk (served planner)"),
    ("torch_corpus_texts_per_s", "PyTorch bulk (sorted, 32)"),
    ("load_1min", "load (1 min)"),
)
PAIRED_MEDIANS = (
    ("perf_analyzer_p50_overhead_ms", "p50 overhead over perf_analyzer (C++ client)", " ms"),
    ("p50_overhead_ms", "p50 overhead over the Python client", " ms"),
    ("throughput_ratio", "bulk: ours / bare ORT sorted batches of 32", ""),
    ("planned_throughput_ratio", "bulk: ours / bare ORT with the served planner", ""),
    ("torch_throughput_ratio", "bulk: ours / PyTorch", ""),
)


def paired_table(paired: dict[str, Any]) -> list[str]:
    rounds = paired["rounds"]
    columns = [(k, title) for k, title in PAIRED_COLUMNS if any(k in r for r in rounds)]
    rows = [[i + 1, *(fmt(r.get(k), 2) for k, _ in columns)] for i, r in enumerate(rounds)]
    medians = "; ".join(f"{title} **{paired[k]}{unit}**" for k, title, unit in PAIRED_MEDIANS if k in paired)
    return [table(["round", *(title for _, title in columns)], rows), "",
            f"Medians of the per-round values: {medians}.", ""]


def paired_section(model: dict[str, Any]) -> list[str]:
    """Rounds of ours vs the in-process baselines alternated while the server is up (robust to outside load)."""
    paired = model["ours"].get("paired")
    if not paired:
        return []
    passes = paired.get("short_passes", 1)
    lines = [
        "#### Paired rounds (ours and the in-process baselines alternated, server up)", "",
        f"Each round: {paired.get('short_texts', 0)} short texts one at a time through perf_analyzer (3 windows of 64 "
        "requests, concurrency 1) and through the sync Python gRPC `EmbeddingClient`, the same texts one at a time "
        "through bare ORT" + (f" (these two legs: {passes} passes over the texts)" if passes > 1 else "") +
        f"; then a corpus of {paired['corpus_texts']} mixed texts ({paired['corpus_tokens']} tokens) "
        "embedded in bulk by `EmbeddingClient.embed(corpus)`, by bare ORT in length-sorted batches of 32, by bare ORT "
        "over the micro-batches of the served planner (same grouping as the server: the strict ceiling) and by "
        "PyTorch in length-sorted batches of 32; the four bulk legs start one place later in each round, so none "
        "always runs first or right after the same leg. Alternating cancels slow swings of load from other work on "
        "the machine; each ratio is taken within a round.", "",
        *paired_table(paired),
    ]
    int8 = ((model.get("precisions") or {}).get("int8") or {}).get("paired")
    if int8:
        lines += ["Same bulk rounds against the **int8** server (PyTorch stays fp32):", "", *paired_table(int8)]
    return lines


def perf_table(rows: Sequence[dict[str, Any]]) -> str:
    return table(
        ["workload", "batch", "conc.", "texts/s", "tokens/s", "p50", "p95", "p99", "padding waste",
         "avg encoder batch", "rows / ONNX run", "tokenizer queue µs", "encoder queue µs", "encoder compute µs"],
        [[r["workload"], r["batch_size"], r["concurrency"], r["texts_per_s"], r["tokens_per_s"], _p(r, 50), _p(r, 95),
          _p(r, 99), pct(r.get("padding_waste")), fmt(r.get("avg_encoder_batch"), 2), fmt(r.get("rows_per_onnx_run"), 2),
          (r.get("tokenizer") or {}).get("queue_us"), (r.get("encoder") or {}).get("queue_us"),
          (r.get("encoder") or {}).get("compute_infer_us")] for r in rows])


def loop_table(sections: dict[str, Sequence[dict[str, Any]]]) -> str:
    rows = []
    for label, items in sections.items():
        for r in items:
            rows.append([label, r["workload"], r["batch_size"], r.get("concurrency", 1), r["texts_per_s"],
                         r["tokens_per_s"], _p(r, 50), _p(r, 95), _p(r, 99), r["requests"]])
    return table(["path", "workload", "batch", "conc.", "texts/s", "tokens/s", "p50", "p95", "p99", "requests"], rows)


def variants_table(model: dict[str, Any]) -> str:
    rows = []
    for name, v in model["summary"].get("serving", {}).items():
        rows.append([f"`{name}`", v["short_p50_ms"], v["short_tokenizer_queue_us"], v["short_encoder_queue_us"],
                     v["best_b1_texts_per_s"], v["best_b32_texts_per_s"], pct(v["padding_waste_mixed"]),
                     mib(v["peak_rss_bytes"])])
    return table(["serving options", "p50 ms, 1 short text", "tokenizer queue µs", "encoder queue µs",
                  "best texts/s batch 1", "best texts/s batch 32", "padding waste (mixed)", "peak RSS MiB"], rows)


def precision_table(model: dict[str, Any]) -> str:
    rows = []
    for precision, p in model.get("precisions", {}).items():
        if "skipped" in p:
            rows.append([precision, "—", "—", "—", "—", "—", "skipped: " + p["skipped"].splitlines()[0][:120]])
            continue
        rows.append([precision, mib(p.get("onnx_bytes")), mib(p.get("server_peak_rss_bytes")), p.get("server_texts_per_s"),
                     mib(p.get("bare_ort_peak_rss_bytes")), p.get("bare_ort_texts_per_s"), ""])
    return table(["precision", "model.onnx MiB", "server peak RSS MiB", "server texts/s (batch 32)",
                  "bare ORT peak RSS MiB", "bare ORT texts/s (batch 32)", "note"], rows)


def model_section(key: str, model: dict[str, Any], img_prefix: str, plots: dict[str, str]) -> str:
    w = model["workloads"]
    parts = [
        f"### {model['served_name']} (`{model['model_id']}`, {model['family']}, max {model['max_length']} tokens, "
        f"{model['threads']} threads everywhere)",
        "",
        f"Workload: `mixed` = {w['mixed']['texts']} texts (STS-B sentences + one passage of 5–20 sentences in four), "
        f"{w['mixed']['mean_tokens']} tokens on average (median {w['mixed']['p50_tokens']}, max {w['mixed']['max_tokens']}); "
        f"`short` = {w['short']['texts']} STS-B sentences, {w['short']['mean_tokens']} tokens on average. "
        "`mixed_sorted` is `mixed` sorted by length (what `SentenceTransformer.encode` does internally).",
        "",
        "#### Side by side", "", headline_table(model), "", ratios_table(model), "",
        "#### Goals", "", goals_table(model), "",
        *paired_section(model),
        "#### Triton ensemble over gRPC (perf_analyzer)", "",
        "Padding waste = 1 − real / padded tokens run by ONNX Runtime (our encoder counters); avg encoder batch = "
        "inference_count / execution_count of the encoder (statistics API); queue and compute µs per request from the "
        "statistics API.", "",
        perf_table(model["ours"].get("perf", [])), "",
        "#### Closed loop (our client, gateway and peers under the same Python load generator)", "",
        loop_table({"AsyncEmbeddingClient": _rows(model["ours"].get("async_client")),
                    "gateway": _rows(model["ours"].get("gateway")),
                    **{k: v["rows"] for k, v in model.get("peer", {}).items() if isinstance(v, dict) and "rows" in v}}),
        "",
        "#### In-process baselines (sequential calls)", "",
        loop_table({"bare ORT": model["bare_ort"]["results"], **({"PyTorch": model["torch"]["results"]}
                                                                 if "torch" in model else {})}), "",
    ]
    skipped = {k: v["skipped"] for k, v in model.get("peer", {}).items() if isinstance(v, dict) and "skipped" in v}
    if skipped:
        parts += ["Peers not measured: " + "; ".join(f"{k}: {v.splitlines()[0][:300]}" for k, v in skipped.items()), ""]
    parts += ["#### Serving-option variants (same run, same workload)", "", variants_table(model), "",
              "#### Precisions", "", precision_table(model), ""]
    for name, file in plots.items():
        parts += [f"![{name}]({img_prefix}{file})", ""]
    return "\n".join(parts)


def render(result: dict[str, Any], img_prefix: str = "img/", plots: dict[str, dict[str, str]] | None = None) -> str:
    """The generated Markdown (without the markers)."""
    m = result["machine"]
    header = [
        f"Generated by `{result['command']}` on {result['started_utc']} ({result['seconds']} s, mode "
        f"`{result['config']['mode']}`).",
        "",
        f"Machine: {m.get('Model name', '?')}, {m.get('cpu_count')} logical CPUs "
        f"({m.get('Core(s) per socket', '?')} cores × {m.get('Thread(s) per core', '?')} threads), "
        f"{m.get('mem_total_gib')} GiB RAM, {m.get('platform')}, Python {m.get('python')}; "
        f"SIMD: {m.get('Flags', '?')}. GPU: {result.get('gpu')}. "
        f"Load average (1/5/15 min) at start {tuple(round(x, 2) for x in result['load_average_start'])}, "
        f"at end {tuple(round(x, 2) for x in result['load_average_end'])}.",
        "",
    ]
    if result.get("notes"):
        header += ["Notes from the run:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    sections = [model_section(k, v, img_prefix, (plots or {}).get(k, {})) for k, v in result["models"].items()]
    return "\n".join(header + sections)


def write_report(result: dict[str, Any], path: Path) -> Path:
    """Write the tables (and plots into ``img/`` beside ``path``) into ``path`` between the markers."""
    path = Path(path)
    plots = write_plots(result, path.parent / "img")
    body = render(result, "img/", plots)
    block = f"{BEGIN}\n{body}\n{END}"
    if path.is_file() and BEGIN in (text := path.read_text(encoding="utf-8")) and END in text:
        before, _, rest = text.partition(BEGIN)
        _, _, after = rest.partition(END)
        new = before + block + after
    else:
        new = "# Benchmarks\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")
    return path


# --- plots ----------------------------------------------------------------------------------------

def write_plots(result: dict[str, Any], img_dir: Path) -> dict[str, dict[str, str]]:
    """PNG plots per model: throughput vs concurrency, latency percentiles, memory per precision."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return {}
    img_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, str]] = {}
    for key, model in result["models"].items():
        files: dict[str, str] = {}
        name = model["served_name"]
        s = model["summary"]

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for batch, marker in ((1, "o"), (32, "s")):
            rows = [r for r in model["ours"].get("perf", []) if r["workload"] == "mixed" and r["batch_size"] == batch]
            if rows:
                ax.plot([r["concurrency"] for r in rows], [r["texts_per_s"] for r in rows], marker=marker,
                        label=f"ours gRPC, batch {batch}")
        for label, value, style in (("bare ORT (ceiling)", s["bare_ort_best_texts_per_s"], "--"),
                                    ("PyTorch", s["torch_best_texts_per_s"], ":"),
                                    (f"peer {s['peer_best']}", s["peer_best_texts_per_s"], "-."),
                                    ("ours gateway (best)", s["gateway_best_texts_per_s"], (0, (1, 3)))):
            if value:
                ax.axhline(value, linestyle=style, color="gray" if label.startswith("bare") else None, label=label)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("texts/s (mixed workload)")
        ax.set_title(f"{name}: throughput vs concurrency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files["throughput vs concurrency"] = f"{key}-throughput.png"
        fig.tight_layout()
        fig.savefig(img_dir / files["throughput vs concurrency"], dpi=110)
        plt.close(fig)

        paths = {"ours gRPC": model["ours"].get("perf", []), "client": _rows(model["ours"].get("async_client")),
                 "gateway": _rows(model["ours"].get("gateway")), "bare ORT": model["bare_ort"]["results"]}
        if "torch" in model:
            paths["PyTorch"] = model["torch"]["results"]
        for k, v in model.get("peer", {}).items():
            if isinstance(v, dict) and "rows" in v:
                paths[k] = v["rows"]
        labels, values = [], {50: [], 95: [], 99: []}
        for label, rows in paths.items():
            row = next((r for r in rows if r.get("workload") == "short" and r.get("batch_size") == 1
                        and r.get("concurrency", 1) == 1), None)
            if row is None:
                continue
            labels.append(label)
            for q in values:
                values[q].append(_p(row, q) or 0)
        if labels:
            fig, ax = plt.subplots(figsize=(7, 4.2))
            width = 0.27
            for i, q in enumerate(values):
                ax.bar([x + (i - 1) * width for x in range(len(labels))], values[q], width, label=f"p{q}")
            ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
            ax.set_ylabel("ms")
            ax.set_title(f"{name}: latency of one short text (batch 1, 1 in flight)")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
            files["latency percentiles"] = f"{key}-latency.png"
            fig.tight_layout()
            fig.savefig(img_dir / files["latency percentiles"], dpi=110)
            plt.close(fig)

        precisions = {p: v for p, v in model.get("precisions", {}).items() if "skipped" not in v}
        if precisions:
            fig, ax = plt.subplots(figsize=(7, 4.2))
            xs = list(precisions)
            width = 0.27
            for i, (label, field) in enumerate((("server peak RSS", "server_peak_rss_bytes"),
                                                ("bare ORT peak RSS", "bare_ort_peak_rss_bytes"),
                                                ("model.onnx", "onnx_bytes"))):
                ax.bar([x + (i - 1) * width for x in range(len(xs))],
                       [(precisions[p].get(field) or 0) / 2**20 for p in xs], width, label=label)
            ax.set_xticks(range(len(xs)), xs)
            ax.set_ylabel("MiB")
            ax.set_title(f"{name}: memory per precision")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
            files["memory per precision"] = f"{key}-memory.png"
            fig.tight_layout()
            fig.savefig(img_dir / files["memory per precision"], dpi=110)
            plt.close(fig)
        out[key] = files
    return out
