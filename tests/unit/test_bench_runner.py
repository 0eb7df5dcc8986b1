"""Benchmark pieces that need no server: batching, load loops, variants, summary/goals, the report, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import copy

import pytest

from tritonembed.benchmarks.bench import parse_variant, quick_config, smoke_config
from tritonembed.benchmarks.cli import bench_config, register
from tritonembed.benchmarks.loadgen import closed_loop, make_batches, sequential_loop
from tritonembed.benchmarks.report import BEGIN, END, fmt, render, table, write_report
from tritonembed.benchmarks.summary import summarize


def test_make_batches_chunks_and_token_sums():
    batches = make_batches(["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5], 2)
    assert [b.texts for b in batches] == [("a", "b"), ("c", "d"), ("e",)]
    assert [b.tokens for b in batches] == [3, 7, 5]
    with pytest.raises(ValueError):
        make_batches(["a"], [1], 0)


def test_sequential_loop_counts_every_call():
    calls = []
    batches = make_batches(["a", "b", "c"], [2, 2, 2], 1)
    t = sequential_loop(calls.append, batches, duration_s=0.0, warmup_requests=1, min_requests=5)
    assert t.requests == 5 and t.texts == 5 and t.tokens == 10
    assert len(calls) == 6  # one warm-up
    assert t.latency["p50_ms"] >= 0


def test_closed_loop_runs_concurrent_workers():
    in_flight = 0
    peak = 0

    async def call(texts):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1

    batches = make_batches(["x"] * 4, [3] * 4, 2)
    t = asyncio.run(closed_loop(call, batches, concurrency=3, duration_s=0.05, warmup_requests=0, min_requests=3))
    assert peak == 3
    assert t.texts == 2 * t.requests and t.tokens == 6 * t.requests
    assert t.texts_per_s > 0


def test_closed_loop_propagates_failures():
    async def call(texts):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(closed_loop(call, make_batches(["x"], [1], 1), concurrency=1, duration_s=0.01))


def test_parse_variant():
    assert parse_variant("encoder_queue_delay_us=0") == {"encoder_queue_delay_us": 0}
    assert parse_variant("encoder_queue_delay_us=0+max_tokens_per_batch=2048") == {"encoder_queue_delay_us": 0,
                                                                           "max_tokens_per_batch": 2048}
    assert parse_variant("pad_to_buckets=false") == {"pad_to_buckets": False}
    assert parse_variant("intra_op_spinning=during_run") == {"intra_op_spinning": "during_run"}
    for bad in ("encoder_queue_delay_us", "nope=1", "encoder_queue_delay_us=x", "pad_to_buckets=1"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_presets_are_small_and_complete():
    smoke = smoke_config()
    assert smoke.models == ("minilm",) and smoke.precisions == ("fp32",) and not smoke.peer and not smoke.torch_baseline
    quick = quick_config(models=("minilm",))
    assert quick.models == ("minilm",) and quick.mode == "quick"


def _cli(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_cli_flags_override_the_preset():
    cfg = bench_config(_cli("--smoke", "--concurrency", "1,3", "--no-gateway", "--variants", "encoder_queue_delay_us=0"))
    assert cfg.mode == "smoke" and cfg.concurrency_b1 == (1, 3) and cfg.gateway is False
    assert cfg.variants == ("encoder_queue_delay_us=0",)
    cfg = bench_config(_cli("--quick", "--no-peer", "--models", "minilm"))
    assert cfg.mode == "quick" and cfg.peer is False and cfg.models == ("minilm",)
    with pytest.raises(SystemExit):
        bench_config(_cli("--models", "gpt-5"))


def test_workload_size_rounds_and_quantized_models_are_flags():
    cfg = bench_config(_cli("--quick", "--models", "qwen3-0.6b", "--precision-models", "qwen3-0.6b", "--texts", "64",
                            "--short-texts", "16", "--paired-rounds", "2", "--precisions", "fp32,int8"))
    assert (cfg.models, cfg.precision_models, cfg.precisions) == (("qwen3-0.6b",), ("qwen3-0.6b",), ("fp32", "int8"))
    assert (cfg.texts, cfg.short_texts, cfg.paired_rounds, cfg.mode) == (64, 16, 2, "quick")
    with pytest.raises(SystemExit):
        bench_config(_cli("--quick", "--precision-models", "gpt-5"))


def _perf_row(workload, batch, conc, tps, p50, real, padded):
    return {"tool": "perf_analyzer", "workload": workload, "batch_size": batch, "concurrency": conc, "texts_per_s": tps,
            "tokens_per_s": tps * 10, "p50_ms": p50, "p95_ms": p50 * 2, "p99_ms": p50 * 3, "padding_waste": 1 - real / padded,
            "avg_encoder_batch": 4.0, "rows_per_onnx_run": 4.0,
            "encoder_counters": {"encoder_real_tokens": real, "encoder_padded_tokens": padded, "encoder_rows": 8.0,
                                 "encoder_batches": 2.0},
            "tokenizer": {"queue_us": 2000.0}, "encoder": {"queue_us": 2100.0, "compute_infer_us": 900.0}}


def _loop_row(tool, workload, batch, conc, tps, p50):
    return {"tool": tool, "workload": workload, "batch_size": batch, "concurrency": conc, "texts": 10, "tokens": 100,
            "seconds": 1.0, "requests": 5, "texts_per_s": tps, "tokens_per_s": tps * 10,
            "latency": {"p50_ms": p50, "p95_ms": p50, "p99_ms": p50, "mean_ms": p50}, "p50_ms": p50, "p95_ms": p50,
            "p99_ms": p50}


MODEL = {
    "model_id": "m/id", "served_name": "m", "family": "bert", "max_length": 256, "threads": 2,
    "workloads": {"mixed": {"texts": 8, "mean_tokens": 10.0, "p50_tokens": 8, "max_tokens": 40},
                  "short": {"texts": 4, "mean_tokens": 9.0, "p50_tokens": 9, "max_tokens": 12}},
    "bare_ort": {"peak_rss_bytes": 2**28, "results": [
        {k: v for k, v in _loop_row("ort", "short", 1, 1, 300.0, 3.0).items() if k not in ("p50_ms", "p95_ms", "p99_ms")},
        _loop_row("ort", "mixed", 32, 1, 1000.0, 30.0), _loop_row("ort", "mixed_sorted", 32, 1, 1200.0, 25.0)]},
    "torch": {"peak_rss_bytes": 2**29, "results": [_loop_row("torch", "short", 1, 1, 100.0, 9.0),
                                                   _loop_row("torch", "mixed_sorted", 32, 1, 600.0, 50.0)]},
    "ours": {"peak_rss_bytes": 2**29, "perf": [_perf_row("short", 1, 1, 200.0, 5.5, 90.0, 90.0),
                                               _perf_row("mixed", 1, 4, 900.0, 4.0, 850.0, 1000.0),
                                               _perf_row("mixed", 32, 2, 1100.0, 50.0, 900.0, 1000.0)],
             "async_client": [_loop_row("async_client", "mixed", 32, 2, 1000.0, 60.0)],
             "gateway": [dict(_loop_row("gateway", "mixed", 32, 2, 950.0, 66.0), gateway_peak_rss_bytes=2**26)]},
    "variants": {"queue_delay_us=0": {"peak_rss_bytes": 2**29, "perf": [_perf_row("short", 1, 1, 300.0, 3.5, 9.0, 9.0)]}},
    "precisions": {"fp32": {"server_peak_rss_bytes": 2**29, "server_texts_per_s": 1100.0, "bare_ort_peak_rss_bytes": 2**28,
                            "bare_ort_texts_per_s": 1200.0, "onnx_bytes": 2**26},
                   "int8": {"skipped": "export failed: ModuleNotFoundError: quantize"}},
    "peer": {"infinity-torch": {"peak_rss_bytes": 2**30, "rows": [_loop_row("infinity-torch", "mixed", 32, 2, 500.0, 80.0)]},
             "infinity-optimum": {"skipped": "Infinity (optimum) exited with 1:\nNo onnx files found"}},
}


def test_summary_ratios_and_goals():
    s = summarize(copy.deepcopy(MODEL))
    assert s["ours_grpc_best_texts_per_s"] == 1100.0
    assert s["bare_ort_best_texts_per_s"] == 1200.0
    assert s["ratios"]["ours_over_bare_ort"] == pytest.approx(0.917)
    assert s["ratios"]["ours_over_torch"] == pytest.approx(1.833)
    assert s["ratios"]["ours_over_peer"] == 2.2 and s["peer_best"] == "infinity-torch"
    assert s["ratios"]["gateway_over_peer"] == 1.9
    assert s["p50_overhead_ms"] == 2.5
    assert s["padding_waste_mixed"] == 0.125
    verdicts = {g["name"]: g["met"] for g in s["goals"]}
    assert list(verdicts.values()) == [True, False, True, True, True]
    assert s["serving"]["queue_delay_us=0"]["short_p50_ms"] == 3.5


def test_summary_without_optional_sections():
    model = copy.deepcopy(MODEL)
    del model["torch"]
    model["peer"] = {"skipped": "peer disabled"}
    model["ours"] = {"perf": model["ours"]["perf"]}
    s = summarize(model)
    assert s["torch_best_texts_per_s"] is None and s["peer_best"] is None
    assert [g["met"] for g in s["goals"]][2:4] == [None, None]


def _result():
    model = copy.deepcopy(MODEL)
    model["summary"] = summarize(model)
    return {"command": "tritonembed bench --quick", "started_utc": "2026-01-01T00:00:00Z", "seconds": 1.0,
            "config": {"mode": "quick"}, "gpu": "none", "load_average_start": (0.1, 0.2, 0.3),
            "load_average_end": (0.1, 0.2, 0.3), "notes": ["int8 skipped"],
            "machine": {"cpu_count": 2, "Model name": "CPU", "mem_total_gib": 24.0}, "models": {"m": model}}


PAIRED = {"rounds": [{"perf_analyzer_short_p50_ms": 4.5, "ours_short_p50_ms": 6.0, "bare_ort_short_p50_ms": 3.0,
                      "ours_corpus_texts_per_s": 90.0, "bare_ort_corpus_texts_per_s": 100.0, "load_1min": 0.3}],
          "corpus_texts": 64, "corpus_tokens": 3000, "short_texts": 16, "p50_overhead_ms": 3.0, "throughput_ratio": 0.9,
          "ours_short_p50_ms": 6.0, "bare_ort_short_p50_ms": 3.0, "ours_corpus_texts_per_s": 90.0,
          "bare_ort_corpus_texts_per_s": 100.0, "perf_analyzer_short_p50_ms": 4.5, "perf_analyzer_p50_overhead_ms": 1.5}


def test_paired_rounds_add_two_goals():
    model = copy.deepcopy(MODEL)
    model["ours"]["paired"] = PAIRED
    s = summarize(model)
    paired = {g["name"]: g["met"] for g in s["goals"] if g["name"].startswith("paired")}
    assert list(paired.values()) == [True, False, True]  # bulk; Python client 3.0 ms; perf_analyzer 1.5 ms
    assert "rounds" not in s["paired"] and s["paired"]["throughput_ratio"] == 0.9


def test_render_contains_every_table():
    result = _result()
    result["models"]["m"]["ours"]["paired"] = PAIRED
    text = render(result)
    assert "p50 overhead over perf_analyzer (C++ client) **1.5 ms**" in text
    assert "Paired rounds" in text and "p50 overhead over the Python client **3.0 ms**" in text
    for needle in ("tritonembed bench --quick", "× bare ORT", "**met**", "**not met**", "padding waste",
                   "`queue_delay_us=0`", "skipped: export failed", "infinity-optimum", "int8 skipped"):
        assert needle in text, needle


def test_write_report_keeps_text_around_the_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Title\n\nintro\n\n{BEGIN}\nold\n{END}\n\nanalysis\n")
    write_report(_result(), doc)
    text = doc.read_text()
    assert text.startswith("# Title\n\nintro") and text.rstrip().endswith("analysis")
    assert "old" not in text and "× bare ORT" in text


def test_table_and_fmt():
    assert fmt(None) == "—" and fmt(1234.5) == "1,234.5" and fmt(0.25, 2) == "0.25" and fmt(True) == "yes"
    assert table(["a", "b"], [[1, "x"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]


def test_int8_throughput_is_a_separate_goal_against_pytorch_fp32():
    model = copy.deepcopy(MODEL)
    model["precisions"]["int8"] = {"server_texts_per_s": 960.0, "bare_ort_texts_per_s": 1000.0}
    s = summarize(model)
    assert s["ratios"]["ours_int8_over_torch"] == 1.6
    goals = {g["name"]: g for g in s["goals"]}
    int8 = goals["throughput vs PyTorch: our int8 (per-token scales) vs PyTorch fp32"]
    assert int8["met"] is True and "960.0" in int8["detail"]
    # the fp32-vs-fp32 goal is still reported on its own
    assert goals["throughput vs PyTorch (sentence-transformers/transformers)"]["measured"] == pytest.approx(1.833)


def test_paired_medians_are_taken_per_round_and_feed_the_goals():
    from tritonembed.benchmarks.summary import summarize_paired

    rounds = [{"ours_corpus_texts_per_s": 100.0, "bare_ort_corpus_texts_per_s": 50.0,
               "bare_ort_planned_corpus_texts_per_s": 100.0, "torch_corpus_texts_per_s": 80.0, "load_1min": 1.0},
              {"ours_corpus_texts_per_s": 50.0, "bare_ort_corpus_texts_per_s": 25.0,
               "bare_ort_planned_corpus_texts_per_s": 60.0, "torch_corpus_texts_per_s": 25.0, "load_1min": 3.0},
              {"ours_corpus_texts_per_s": 90.0, "bare_ort_corpus_texts_per_s": 45.0,
               "bare_ort_planned_corpus_texts_per_s": 95.0, "torch_corpus_texts_per_s": 50.0, "load_1min": 1.5}]
    paired = summarize_paired(rounds, corpus_texts=64, corpus_tokens=3000, short_texts=0)
    assert paired["throughput_ratio"] == 2.0
    # per-round ratios 100/100, 50/60, 90/95 -> median 0.947; 100/80, 50/25, 90/50 -> median 1.8
    assert paired["planned_throughput_ratio"] == pytest.approx(0.947, abs=1e-3)
    assert paired["torch_throughput_ratio"] == 1.8
    assert "p50_overhead_ms" not in paired  # no short-latency legs in these rounds
    model = copy.deepcopy(MODEL)
    model["ours"]["paired"] = {**PAIRED, **{k: v for k, v in paired.items() if k != "rounds"}}
    model["precisions"]["int8"] = {"server_texts_per_s": 900.0, "paired": summarize_paired(
        [dict(r, ours_corpus_texts_per_s=r["ours_corpus_texts_per_s"] * 2) for r in rounds], corpus_texts=64,
        corpus_tokens=3000, short_texts=0)}
    goals = {g["name"]: g for g in summarize(model)["goals"]}
    assert goals["paired: bulk throughput vs bare ORT running the served planner (strict ceiling)"]["met"] is True
    assert goals["paired: bulk throughput vs PyTorch (alternated rounds)"]["met"] is True
    assert goals["paired: our int8 vs PyTorch fp32, bulk (alternated rounds)"]["measured"] == 3.6


def test_paired_legs_rotate_so_each_runs_first_in_turn():
    from tritonembed.benchmarks.bench import rotated

    legs = ["ours", "sorted", "planned", "torch"]
    orders = [rotated(legs, k) for k in range(5)]
    assert orders[0] == legs and orders[1] == ["sorted", "planned", "torch", "ours"] and orders[4] == legs
    assert {o[0] for o in orders[:4]} == set(legs) and all(sorted(o) == sorted(legs) for o in orders)
    assert rotated([], 3) == []
