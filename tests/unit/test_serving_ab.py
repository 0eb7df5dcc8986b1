from lab.serving_ab import summarize


def _row(k, variant, p50, p99, tps):
    return {"round": k, "variant": variant, "short_p50_ms": p50, "short_p99_ms": p99, "c8_texts_per_s": tps / 2,
            "bulk_texts_per_s": tps}


def test_summary_takes_medians_of_per_round_comparisons():
    rows = [_row(1, "A", 5.0, 10.0, 100.0), _row(1, "B", 4.0, 5.0, 120.0),
            _row(2, "B", 6.0, 8.0, 90.0), _row(2, "A", 5.5, 8.0, 100.0),  # order alternates
            _row(3, "A", 5.0, 10.0, 80.0), _row(3, "B", 5.0, 10.0, 100.0)]
    s = summarize(rows, ["A", "B"])
    assert s == {"short_p50_ms_b_minus_a": 0.0, "short_p99_ms_b_over_a": 1.0, "c8_texts_per_s_b_over_a": 1.2,
                 "bulk_texts_per_s_b_over_a": 1.2, "rounds": 3}


def test_rounds_missing_a_variant_are_left_out():
    rows = [_row(1, "A", 5.0, 10.0, 100.0), _row(1, "B", 4.0, 5.0, 150.0), _row(2, "A", 5.0, 10.0, 100.0)]
    assert summarize(rows, ["A", "B"])["rounds"] == 1
    assert summarize([_row(1, "A", 5.0, 10.0, 100.0)], ["A", "B"]) == {}
