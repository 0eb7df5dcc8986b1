"""tritonembed.export.stsb: data loading, rank correlation, batching, and the ONNX embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tritonembed.errors import TritonEmbedError
from tritonembed.export import stsb
from tritonembed.export.stsb import (
    StsbDataError,
    StsPair,
    cosine_scores,
    embed_texts,
    load_stsb,
    spearman,
    spearman_for,
    stsb_file,
)


def _angle_embedder(texts: list[str]) -> np.ndarray:
    """'deg:<angle>' -> the unit vector at that angle; cos between two texts = cos(angle difference)."""
    angles = np.radians([float(t.split(":")[1]) for t in texts])
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * 3.0  # not normalized on purpose


def _angle_pairs(scores_from_cos) -> list[StsPair]:
    angles = np.linspace(0.0, 170.0, 40)
    return [StsPair(f"deg:{a}", "deg:0", float(scores_from_cos(np.cos(np.radians(a))))) for a in angles]


# --- spearman ----------------------------------------------------------------------------------


def test_spearman_for_perfect_correlation_is_100() -> None:
    pairs = _angle_pairs(lambda c: 2.5 * (c + 1.0))
    assert spearman_for(_angle_embedder, pairs, batch_size=7) == pytest.approx(100.0)


def test_spearman_for_anti_correlation_is_minus_100() -> None:
    pairs = _angle_pairs(lambda c: 2.5 * (1.0 - c))
    assert spearman_for(_angle_embedder, pairs) == pytest.approx(-100.0)


def test_spearman_is_rank_based() -> None:
    x = np.arange(10.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, x[::-1] ** 3) == pytest.approx(-1.0)


def test_spearman_matches_scipy_with_ties() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 300).astype(float)  # many ties, like STS-B's gold scores
    y = x + rng.normal(0, 2.0, 300)
    y[::7] = 1.0
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("x,y", [([1.0], [2.0]), ([1.0, 2.0], [1.0, 2.0, 3.0]), ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])])
def test_spearman_rejects_degenerate_input(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError):
        spearman(x, y)


def test_spearman_for_needs_two_pairs() -> None:
    with pytest.raises(ValueError):
        spearman_for(_angle_embedder, [StsPair("deg:1", "deg:0", 1.0)])


# --- batching ------------------------------------------------------------------------------------


def test_embed_texts_keeps_order_dedupes_and_batches() -> None:
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts])

    texts = ["ccc", "a", "bb", "a", "dddd", "bb"]
    out = embed_texts(embed, texts, batch_size=2)
    assert out[:, 0].tolist() == [3, 1, 2, 1, 4, 2]
    assert sorted(t for c in calls for t in c) == ["a", "bb", "ccc", "dddd"]  # each text once
    assert all(len(c) <= 2 for c in calls)
    assert calls[0] == ["a", "bb"]  # grouped by length: less padding


def test_embed_texts_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        embed_texts(lambda texts: np.zeros((len(texts) + 1, 2)), ["a", "b"])


def test_cosine_scores_normalizes() -> None:
    pairs = [StsPair("deg:0", "deg:0", 5.0), StsPair("deg:90", "deg:0", 0.0), StsPair("deg:180", "deg:0", 0.0)]
    np.testing.assert_allclose(cosine_scores(_angle_embedder, pairs), [1.0, 0.0, -1.0], atol=1e-6)


# --- loading -------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_from_env_dir_with_quotes_and_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(
        tmp_path / "stsb-en-dev.csv",
        'sentence1,sentence2,score\n"A man, a plan.",A plan.,4.5\nx,"he said ""hi""",0\n',
    )
    monkeypatch.setenv(stsb.STSB_DIR_ENV, str(tmp_path))
    assert load_stsb("en") == [StsPair("A man, a plan.", "A plan.", 4.5), StsPair("x", 'he said "hi"', 0.0)]


def test_load_explicit_file_and_dir(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "d" / "stsb-zh-dev.csv", "一个人。,一个男人。,3.2\n")
    assert load_stsb("zh", csv_path)[0].score == 3.2
    assert load_stsb("zh", csv_path.parent)[0].sentence1 == "一个人。"


def test_missing_data_raises_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stsb.STSB_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(stsb, "DEFAULT_STSB_DIR", tmp_path / "nowhere")
    with pytest.raises(StsbDataError, match=stsb.STSB_DIR_ENV) as info:
        load_stsb("de")
    assert isinstance(info.value, TritonEmbedError) and isinstance(info.value, FileNotFoundError)
    assert "stsb-de-dev.csv" in str(info.value)


@pytest.mark.parametrize(
    "body,match",
    [("a,b\n", "3 fields"), ("a,b,7.5\n", "outside"), ("a,b,1\nc,d,high\n", "not a number"), ("", "no STS-B")],
)
def test_malformed_file_raises(tmp_path: Path, body: str, match: str) -> None:
    path = _write(tmp_path / "stsb-en-dev.csv", body)
    with pytest.raises(StsbDataError, match=match):
        load_stsb("en", path)


@pytest.mark.parametrize("lang,first", [("en", "A man with a hard hat is dancing."), ("zh", "一个戴着硬帽子的人在跳舞。")])
def test_shared_stsb_dev_sets(lang: str, first: str) -> None:
    try:
        path = stsb_file(lang)
    except StsbDataError as exc:
        pytest.skip(str(exc))
    pairs = load_stsb(lang)
    assert path.name == f"stsb-{lang}-dev.csv"
    assert len(pairs) == 1500
    assert pairs[0] == StsPair(first, pairs[0].sentence2, 5.0)
    assert all(0.0 <= p.score <= 5.0 and p.sentence1 and p.sentence2 for p in pairs)


# --- the ONNX Runtime embedder -------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def toy_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real ONNX graph with the encoder contract (masked mean of an embedding table) and a tokenizer."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    tokenizers = pytest.importorskip("tokenizers")
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("toy")
    table = np.random.default_rng(0).normal(size=(len(VOCAB), 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", 4])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )
    model_path = root / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model_path))

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)  # fixed padding: the embedder must override it
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    np.save(root / "table.npy", table)
    return model_path, tok_path


def _expected(table: np.ndarray, text: str, max_length: int) -> np.ndarray:
    ids = [VOCAB.index(w) if w in VOCAB else 1 for w in text.split()][:max_length]
    return table[ids].mean(axis=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_onnx_embedder_pads_masks_and_truncates(toy_encoder: tuple[Path, Path], padding_side: str) -> None:
    model_path, tok_path = toy_encoder
    table = np.load(model_path.parent / "table.npy")
    embed = stsb.onnx_embedder(model_path, tok_path, max_length=5, padding_side=padding_side)
    texts = ["a", "b c d", "a b c d e f a b", "zzz e"]  # mixed lengths, one over max_length, one unknown word
    out = embed(texts)
    assert out.shape == (4, 4) and out.dtype == np.float32
    for row, text in zip(out, texts):
        np.testing.assert_allclose(row, _expected(table, text, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed(["b c d"])[0], out[1], rtol=1e-6)  # same alone as in a padded batch


def test_onnx_embedder_rejects_bad_arguments(toy_encoder: tuple[Path, Path]) -> None:
    model_path, tok_path = toy_encoder
    with pytest.raises(ValueError, match="padding_side"):
        stsb.onnx_embedder(model_path, tok_path, 8, padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        stsb.onnx_embedder(model_path, tok_path, 0)


def test_onnx_embedder_feeds_spearman_for(toy_encoder: tuple[Path, Path]) -> None:
    model_path, tok_path = toy_encoder
    embed = stsb.onnx_embedder(model_path, tok_path, 8)
    pairs = [StsPair("a b", "a b", 5.0), StsPair("a b", "a c", 3.0), StsPair("a", "f e d", 0.5), StsPair("c", "c d", 4.0)]
    score = spearman_for(embed, pairs, batch_size=3)
    expected = 100 * spearman(cosine_scores(embed, pairs), [p.score for p in pairs])
    assert score == pytest.approx(expected) and -100.0 <= score <= 100.0
    json.dumps(score)
