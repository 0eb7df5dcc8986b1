"""Pure helpers of the benchmark: percentiles, ratios, /proc and Prometheus parsing, goal verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from tritonembed.benchmarks import stats as st


def test_percentile_matches_numpy_linear_interpolation():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0, 10, 50, 95, 99, 100):
        assert st.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_one_value_and_errors():
    assert st.percentile([4.2], 99) == 4.2
    with pytest.raises(ValueError):
        st.percentile([], 50)
    with pytest.raises(ValueError):
        st.percentile([1.0], 101)


def test_latency_summary_keys_and_order():
    summary = st.latency_summary([float(i) for i in range(1, 101)])
    assert set(summary) == {"p50_ms", "p95_ms", "p99_ms", "mean_ms"}
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert summary["mean_ms"] == pytest.approx(50.5)


def test_ratio_handles_missing_and_zero():
    assert st.ratio(90.0, 100.0) == 0.9
    assert st.ratio(None, 1.0) is None
    assert st.ratio(1.0, None) is None
    assert st.ratio(1.0, 0.0) is None
    assert st.ratio(2.0, 3.0, digits=2) == 0.67


def test_throughput_rates():
    t = st.throughput([10.0, 20.0], texts=64, tokens=3200, seconds=2.0)
    d = t.to_dict()
    assert d["texts_per_s"] == 32.0 and d["tokens_per_s"] == 1600.0 and d["requests"] == 2
    assert d["latency"]["p50_ms"] == 15.0
    with pytest.raises(ValueError):
        st.throughput([], 0, 0, 1.0)


STATUS = """Name:\tpython
VmPeak:\t  2000000 kB
VmHWM:\t   123456 kB
VmRSS:\t   100000 kB
Threads:\t4
"""


def test_parse_proc_status_bytes():
    parsed = st.parse_proc_status(STATUS)
    assert parsed["VmRSS"] == 100000 * 1024
    assert parsed["VmHWM"] == 123456 * 1024
    assert "Threads" not in parsed


def test_parse_proc_stat_ppid_with_odd_command_names():
    assert st.parse_proc_stat_ppid("1234 (python) S 99 1234 1234 0 -1") == 99
    assert st.parse_proc_stat_ppid("77 (a) b (c)) R 5 77 77 0") == 5
    with pytest.raises(ValueError):
        st.parse_proc_stat_ppid("garbage")


def test_descendants_follow_the_tree_only():
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 30: 99}
    assert st.descendants(parents, 10) == {10, 11, 12, 13}
    assert st.descendants(parents, 30) == {30}
    assert st.descendants(parents, 555) == {555}


METRICS = """# HELP tritonembed_encoder_rows Texts encoded
# TYPE tritonembed_encoder_rows counter
tritonembed_encoder_rows{model="m_encoder"} 40
tritonembed_encoder_rows{model="other_encoder"} 7
tritonembed_encoder_real_tokens{model="m_encoder"} 1700
tritonembed_encoder_padded_tokens{model="m_encoder"} 2000
tritonembed_encoder_batches{model="m_encoder"} 5
nv_inference_count{model="m",version="1"} 12
weird line without value
"""


def test_parse_prometheus_and_encoder_counters():
    samples = st.parse_prometheus(METRICS)
    assert ("nv_inference_count", {"model": "m", "version": "1"}, 12.0) in samples
    counters = st.encoder_counters(METRICS, "m_encoder")
    assert counters == {"encoder_real_tokens": 1700.0, "encoder_padded_tokens": 2000.0, "encoder_rows": 40.0,
                        "encoder_batches": 5.0}
    assert st.encoder_counters(METRICS, "absent_encoder") == dict.fromkeys(st.ENCODER_COUNTERS, 0.0)


def test_parse_prometheus_escaped_label():
    samples = st.parse_prometheus('x{model="a\\"b"} 1.5e3')
    assert samples == [("x", {"model": 'a"b'}, 1500.0)]


def test_padding_waste_and_delta():
    before = {"encoder_real_tokens": 100.0, "encoder_padded_tokens": 100.0}
    after = {"encoder_real_tokens": 1800.0, "encoder_padded_tokens": 2100.0}
    delta = st.counter_delta(after, before)
    assert delta == {"encoder_real_tokens": 1700.0, "encoder_padded_tokens": 2000.0}
    assert st.padding_waste(delta["encoder_real_tokens"], delta["encoder_padded_tokens"]) == 0.15
    assert st.padding_waste(0, 0) is None


STATS = {"model_stats": [{"name": "m_encoder", "inference_count": 96, "execution_count": 12,
                          "inference_stats": {"success": {"count": 24, "ns": 480_000_000},
                                              "queue": {"count": 24, "ns": 48_000_000},
                                              "compute_input": {"count": 24, "ns": 2_400_000},
                                              "compute_infer": {"count": 24, "ns": 400_000_000},
                                              "compute_output": {"count": 24, "ns": 2_400_000}}}]}


def test_model_stats_and_breakdown():
    stats = st.model_stats(STATS)
    assert stats["inference_count"] == 96 and stats["execution_count"] == 12 and stats["queue_ns"] == 48_000_000
    zero = dict.fromkeys(stats, 0.0)
    b = st.stats_breakdown(st.counter_delta(stats, zero))
    assert b["avg_batch"] == 8.0
    assert b["requests"] == 24
    assert b["queue_us"] == 2000.0
    assert b["compute_infer_us"] == pytest.approx(16666.7)
    assert st.model_stats({}) == {}
    assert st.stats_breakdown({})["queue_us"] is None


def test_goals_verdicts():
    assert st.at_least("x", 0.9, 0.95).met is True
    assert st.at_least("x", 0.9, 0.5).met is False
    assert st.below("y", 2.0, 1.2).met is True
    assert st.below("y", 2.0, 2.0).met is False
    assert st.below("y", 2.0, None).met is None
    assert st.at_least("x", 0.9, 0.95).to_dict()["target"] == ">= 0.9"


def test_best_ignores_missing():
    assert st.best([None, 3.0, 2.0]) == 3.0
    assert st.best([None]) is None
    assert st.best([]) is None
