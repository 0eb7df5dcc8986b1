"""The numbers a bench run concludes with: per-path headlines, same-run ratios, paired-round medians and
the goals (target, measured, verdict) -- pure functions over the JSON sections :mod:`.bench` measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tritonembed.benchmarks import stats as st


def _rows(section: Any) -> list[dict[str, Any]]:
    if isinstance(section, dict):
        return section.get("rows", [])
    return section or []


def _best_tps(rows: Sequence[dict[str, Any]], workload: str = "mixed") -> float | None:
    return st.best(r.get("texts_per_s") for r in rows if r.get("workload") == workload)


def _p50(rows: Sequence[dict[str, Any]], workload: str = "short", batch: int = 1, concurrency: int = 1) -> float | None:
    for r in rows:
        if r.get("workload") == workload and r.get("batch_size") == batch and r.get("concurrency", 1) == concurrency:
            return r.get("p50_ms") if "p50_ms" in r else r.get("latency", {}).get("p50_ms")
    return None


def serving_summary(section: dict[str, Any]) -> dict[str, Any]:
    """Short-text p50, best mixed throughput and padding waste of one server configuration."""
    perf = section.get("perf", [])
    short = next((r for r in perf if r["workload"] == "short"), {})
    mixed = [r for r in perf if r["workload"] == "mixed"]
    best_row = max(mixed, key=lambda r: r["texts_per_s"]) if mixed else {}
    b1 = [r for r in mixed if r["batch_size"] == 1]
    b32 = [r for r in mixed if r["batch_size"] == 32]
    real = sum(r["encoder_counters"]["encoder_real_tokens"] for r in mixed)
    padded = sum(r["encoder_counters"]["encoder_padded_tokens"] for r in mixed)
    return {
        "short_p50_ms": short.get("p50_ms"),
        "short_tokenizer_queue_us": (short.get("tokenizer") or {}).get("queue_us"),
        "short_encoder_queue_us": (short.get("encoder") or {}).get("queue_us"),
        "best_b1_texts_per_s": st.best(r["texts_per_s"] for r in b1),
        "best_b32_texts_per_s": st.best(r["texts_per_s"] for r in b32),
        "best_texts_per_s": best_row.get("texts_per_s"),
        "padding_waste_mixed": st.padding_waste(real, padded),
        "peak_rss_bytes": section.get("peak_rss_bytes"),
    }


def summarize_paired(rounds: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """Medians over paired rounds: each ratio or difference is taken within a round, then the median."""
    def median_of(values: list[float]) -> float | None:
        return round(st.percentile(values, 50), 3) if values else None

    def column(key: str) -> float | None:
        return median_of([r[key] for r in rounds if key in r])

    def per_round(a: str, b: str, op: Callable[[float, float], float]) -> float | None:
        return median_of([op(r[a], r[b]) for r in rounds if a in r and b in r])

    out: dict[str, Any] = {"rounds": rounds, **info}
    for key in ("perf_analyzer_short_p50_ms", "ours_short_p50_ms", "bare_ort_short_p50_ms", "ours_corpus_texts_per_s",
                "bare_ort_corpus_texts_per_s", "bare_ort_planned_corpus_texts_per_s", "torch_corpus_texts_per_s"):
        out[key] = column(key)
    minus, over = (lambda a, b: a - b), (lambda a, b: a / b)
    out["p50_overhead_ms"] = per_round("ours_short_p50_ms", "bare_ort_short_p50_ms", minus)
    out["perf_analyzer_p50_overhead_ms"] = per_round("perf_analyzer_short_p50_ms", "bare_ort_short_p50_ms", minus)
    out["throughput_ratio"] = per_round("ours_corpus_texts_per_s", "bare_ort_corpus_texts_per_s", over)
    out["planned_throughput_ratio"] = per_round("ours_corpus_texts_per_s", "bare_ort_planned_corpus_texts_per_s", over)
    out["torch_throughput_ratio"] = per_round("ours_corpus_texts_per_s", "torch_corpus_texts_per_s", over)
    return {k: v for k, v in out.items() if v is not None}


def paired_goals(paired: dict[str, Any], int8_paired: dict[str, Any]) -> list[st.Goal]:
    """The goals judged on paired rounds, each one only where its rounds measured it."""
    p, i8 = paired, int8_paired
    rounds = f"median of {len(p.get('rounds', ()))} rounds"
    candidates = [  # (source, key it needs, goal built only when the key is there)
        (p, "throughput_ratio", lambda: st.at_least(
            "paired: bulk throughput vs bare ORT in length-sorted batches of 32", 0.90, p["throughput_ratio"],
            f"ours {p['ours_corpus_texts_per_s']} vs bare ORT {p['bare_ort_corpus_texts_per_s']} texts/s, {rounds}")),
        (p, "p50_overhead_ms", lambda: st.below(
            "paired: p50 overhead, one short text (ms, alternated rounds)", 2.0, p["p50_overhead_ms"],
            f"ours {p['ours_short_p50_ms']} ms vs bare ORT {p['bare_ort_short_p50_ms']} ms (sync Python gRPC client)")),
        (p, "planned_throughput_ratio", lambda: st.at_least(
            "paired: bulk throughput vs bare ORT running the served planner (strict ceiling)", 0.90,
            p["planned_throughput_ratio"], f"ours {p['ours_corpus_texts_per_s']} vs bare ORT + planner "
            f"{p['bare_ort_planned_corpus_texts_per_s']} texts/s, median of per-round ratios")),
        (p, "torch_throughput_ratio", lambda: st.at_least(
            "paired: bulk throughput vs PyTorch (alternated rounds)", 1.5, p["torch_throughput_ratio"],
            f"ours {p['ours_corpus_texts_per_s']} vs PyTorch {p['torch_corpus_texts_per_s']} texts/s, "
            "median of per-round ratios")),
        (i8, "torch_throughput_ratio", lambda: st.at_least(
            "paired: our int8 vs PyTorch fp32, bulk (alternated rounds)", 1.5, i8["torch_throughput_ratio"],
            f"ours int8 {i8['ours_corpus_texts_per_s']} vs PyTorch fp32 {i8['torch_corpus_texts_per_s']} texts/s, "
            "median of per-round ratios")),
        (p, "perf_analyzer_p50_overhead_ms", lambda: st.below(
            "paired: p50 overhead, one short text (ms, perf_analyzer, alternated rounds)", 2.0,
            p["perf_analyzer_p50_overhead_ms"], f"ours {p['perf_analyzer_short_p50_ms']} ms vs bare ORT "
            f"{p['bare_ort_short_p50_ms']} ms (perf_analyzer, C++ gRPC client)")),
    ]
    return [goal() for source, key, goal in candidates if key in source]


def summarize(model: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers, same-run ratios and the goals of issue 5 for one model's results."""
    ours_perf = model["ours"].get("perf", [])
    ort_rows = model["bare_ort"]["results"]
    torch_rows = model.get("torch", {}).get("results", [])
    ours_tps = _best_tps(ours_perf)
    ort_tps = st.best([_best_tps(ort_rows, "mixed"), _best_tps(ort_rows, "mixed_sorted")])
    torch_tps = st.best([_best_tps(torch_rows, "mixed"), _best_tps(torch_rows, "mixed_sorted")])
    gateway_tps = _best_tps(_rows(model["ours"].get("gateway")))
    client_tps = _best_tps(_rows(model["ours"].get("async_client")))
    ours_p50 = _p50(ours_perf)
    ort_p50 = _p50(ort_rows)
    peers = {k: v for k, v in model.get("peer", {}).items() if isinstance(v, dict) and "rows" in v}
    peer_tps = {k: _best_tps(v["rows"]) for k, v in peers.items()}
    best_peer = max(peer_tps, key=lambda k: peer_tps[k] or 0) if peer_tps else None
    mixed = [r for r in ours_perf if r["workload"] == "mixed"]
    real = sum(r["encoder_counters"]["encoder_real_tokens"] for r in mixed)
    padded = sum(r["encoder_counters"]["encoder_padded_tokens"] for r in mixed)
    waste = st.padding_waste(real, padded)
    overhead = round(ours_p50 - ort_p50, 3) if ours_p50 is not None and ort_p50 is not None else None
    int8 = (model.get("precisions") or {}).get("int8") or {}
    int8_tps = int8.get("server_texts_per_s")
    int8_paired = int8.get("paired") or {}
    summary: dict[str, Any] = {
        "ours_grpc_best_texts_per_s": ours_tps,
        "async_client_best_texts_per_s": client_tps,
        "gateway_best_texts_per_s": gateway_tps,
        "bare_ort_best_texts_per_s": ort_tps,
        "torch_best_texts_per_s": torch_tps,
        "peer_best_texts_per_s": peer_tps.get(best_peer) if best_peer else None,
        "peer_best": best_peer,
        "ours_short_p50_ms": ours_p50,
        "bare_ort_short_p50_ms": ort_p50,
        "p50_overhead_ms": overhead,
        "padding_waste_mixed": waste,
        "ratios": {
            "ours_over_bare_ort": st.ratio(ours_tps, ort_tps),
            "ours_over_torch": st.ratio(ours_tps, torch_tps),
            "ours_int8_over_torch": st.ratio(int8_tps, torch_tps),
            "ours_over_peer": st.ratio(ours_tps, peer_tps.get(best_peer)) if best_peer else None,
            "gateway_over_peer": st.ratio(gateway_tps, peer_tps.get(best_peer)) if best_peer else None,
            "async_client_over_bare_ort": st.ratio(client_tps, ort_tps),
            "gateway_over_bare_ort": st.ratio(gateway_tps, ort_tps),
        },
    }
    ratios = summary["ratios"]
    paired = model["ours"].get("paired")
    if paired:
        summary["paired"] = {k: v for k, v in paired.items() if k != "rounds"}
    summary["serving"] = {"defaults": serving_summary(model["ours"]),
                          **{k: serving_summary(v) for k, v in model.get("variants", {}).items()}}
    summary["goals"] = [g.to_dict() for g in (
        st.at_least("gRPC throughput vs bare ORT at saturation", 0.90, ratios["ours_over_bare_ort"],
                    f"ours {ours_tps} vs bare ORT {ort_tps} texts/s"),
        st.below("p50 overhead, one short text (ms)", 2.0, overhead, f"ours {ours_p50} ms vs bare ORT {ort_p50} ms"),
        *paired_goals(paired or {}, int8_paired),
        st.at_least("throughput vs PyTorch (sentence-transformers/transformers)", 1.5, ratios["ours_over_torch"],
                    f"ours {ours_tps} vs PyTorch {torch_tps} texts/s"),
        *((st.at_least("throughput vs PyTorch: our int8 (per-token scales) vs PyTorch fp32", 1.5,
                       ratios["ours_int8_over_torch"],
                       f"ours int8 {int8_tps} (batch 32) vs PyTorch fp32 {torch_tps} texts/s; int8 STS-B drop "
                       "in the export report"),) if int8_tps else ()),
        st.at_least("throughput vs the peer server", 1.0, ratios["ours_over_peer"],
                    f"ours {ours_tps} vs {best_peer} {peer_tps.get(best_peer) if best_peer else None} texts/s"),
        st.below("padding waste, mixed workload", 0.15, waste, f"{real:.0f} real of {padded:.0f} padded tokens"),
    )]
    return summary
