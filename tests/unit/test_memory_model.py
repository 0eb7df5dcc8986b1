"""The memory model: shapes read from a real exported graph, the budget arithmetic, the grant's parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tritonembed.model_repository.memory_model import (
    FUSED,
    FUSED_MASKED,
    GIB,
    MATERIALIZED,
    MemoryBudgetError,
    ModelShape,
    granted_bytes,
    model_shape,
    parse_grant,
    report_attention,
    token_budget,
)


def shape(attention: str, weights: int = GIB) -> ModelShape:
    return ModelShape(weights, hidden_size=1024, intermediate_size=3072, layers=28, heads=16, attention=attention,
                      compute_bytes=2)


def test_materialized_attention_grows_with_the_square_of_the_length_fused_linearly():
    fused, materialized = shape(FUSED), shape(MATERIALIZED)
    assert fused.activation_bytes(1, 8192) == 2 * fused.activation_bytes(1, 4096)
    assert materialized.activation_bytes(1, 8192) > 3.5 * materialized.activation_bytes(1, 4096)
    # rows x length tokens cost the same as one row of as many tokens when attention is fused
    assert fused.activation_bytes(4, 1024) == fused.activation_bytes(1, 4096)
    assert materialized.activation_bytes(4, 1024) < materialized.activation_bytes(1, 4096)


def test_masked_fused_attention_is_linear_for_one_row_and_holds_the_scores_once_for_a_padded_batch():
    """The BERT graphs' MultiHeadAttention: flash without a mask (one row), one float32 copy of the scores with it."""
    masked, fused, materialized = shape(FUSED_MASKED), shape(FUSED), shape(MATERIALIZED)
    assert masked.activation_bytes(1, 8192) == fused.activation_bytes(1, 8192)
    scores = 2 * 16 * 1024 * 1024 * 4  # rows x heads x L x L x float32
    assert masked.activation_bytes(2, 1024) == fused.activation_bytes(2, 1024) + scores
    assert masked.activation_bytes(2, 1024) < materialized.activation_bytes(2, 1024)


def test_report_attention_prices_each_fused_kind(tmp_path: Path):
    for kind, priced in (("com.microsoft.GroupQueryAttention", FUSED), ("com.microsoft.MultiHeadAttention", FUSED_MASKED)):
        (tmp_path / "report.json").write_text(json.dumps({"graph": {"attention": {"kind": kind, "nodes": 2}}}))
        assert report_attention(tmp_path) == priced


def test_token_budget_subtracts_the_weights_of_every_session_and_shares_between_workers():
    budget = token_budget(shape(FUSED), 10 * GIB, sessions=2, concurrent=2)
    assert budget.activation_bytes == (10 * GIB - 2 * GIB) // 2
    longest = budget.longest_text(1 << 22)
    assert budget.fits(1, longest) and not budget.fits(1, longest + 1)
    with pytest.raises(MemoryBudgetError, match="cannot hold"):
        token_budget(shape(FUSED, weights=8 * GIB), 10 * GIB, sessions=2)


def test_a_fused_graph_fits_texts_far_longer_than_a_materialized_one_in_the_same_memory():
    fused = token_budget(shape(FUSED), 4 * GIB).longest_text(1 << 22)
    materialized = token_budget(shape(MATERIALIZED), 4 * GIB).longest_text(1 << 22)
    assert fused > 10 * materialized > 0


@pytest.mark.parametrize(("value", "expected"), [("20", ("bytes", 20 * GIB)), ("0.5", ("fraction", 0.5)),
                                                 ("1", ("fraction", 1.0)), ("24GiB", ("bytes", 24 * GIB)),
                                                 ("512M", ("bytes", 512 * 1024**2)), ("4096B", ("bytes", 4096)),
                                                 ("", None), (None, None)])
def test_parse_grant(value, expected):
    assert parse_grant(value) == expected


@pytest.mark.parametrize("value", ["lots", "0", "-1", "inf", "0G", "12 apples"])
def test_parse_grant_refuses_nonsense(value):
    with pytest.raises(MemoryBudgetError):
        parse_grant(value)


def test_granted_bytes_on_the_host_reads_this_machine():
    total = granted_bytes("1", device="cpu")  # the whole host (or cgroup) limit
    default = granted_bytes("", device="cpu")  # what is available now minus the margin
    assert 0 < default < total
    assert granted_bytes("0.25", device="cpu") == pytest.approx(total / 4, rel=1e-6)
    assert granted_bytes("3", device="cpu") == 3 * GIB


def test_report_attention_says_materialized_for_an_unfused_graph_and_none_without_a_report(tmp_path: Path):
    assert report_attention(tmp_path) is None
    (tmp_path / "report.json").write_text(json.dumps({"graph": {"attention": {"kind": "unfused (MatMul...)"}}}))
    assert report_attention(tmp_path) == MATERIALIZED


def test_model_shape_of_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(MemoryBudgetError, match="does not exist"):
        model_shape(tmp_path / "model.onnx", 64, "fp32")
