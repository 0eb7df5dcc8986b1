"""BERT-family exports compute attention with one com.microsoft.MultiHeadAttention per layer, with the answer
of the traced graph and of PyTorch.

Every declared architecture is built small with random weights from its transformers config (its checkpoints
cannot be downloaded here) and exported as the exporter exports it, fused and unfused; all-MiniLM-L6-v2 (real
weights) goes through the whole export and its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.integration.test_static_shapes_export import _bert_like_configs
from tritonembed.export.attention import FUSED_MHA, UNFUSED, graph_attention
from tritonembed.export.bert_attention import UNMASKED_BRANCH, BertHeads
from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
from tritonembed.model_repository.memory_model import FUSED_MASKED, model_shape
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration

# MPNet adds a relative position bias to the scores: ONNX Runtime's fusion does not take it, the graph stays traced.
UNFUSABLE = {"mpnet"}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batches(rng: np.random.Generator):
    """Right padding (what the tokenizer writes), one token, no padding (the graph's branch without the mask), and
    masks a client might build: a hole, left padding."""
    for batch, length in ((1, 1), (1, 7), (3, 5), (4, 40), (2, 100)):
        ids = rng.integers(5, 1000, (batch, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if batch > 1:
            mask[-1, length - length // 3:] = 0
        yield "right", ids, mask
    ids = rng.integers(5, 1000, (2, 9)).astype(np.int64)
    yield "no row padded", ids, np.ones_like(ids)  # the branch without the mask, two rows
    ids = rng.integers(5, 1000, (3, 30)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :10] = 0
    mask[1, 12:15] = 0
    yield "left and a hole", ids, mask


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra"])
def test_every_declared_architecture_fuses_to_the_same_answer(model_type: str, tmp_path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = _bert_like_configs()[model_type]
    backbone = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    spec = ModelSpec(name=model_type, model_id=model_type, family="bert", pooling="mean", normalize=True,
                     hidden_size=64, max_length=120, padding_side="right", pad_token_id=0, precision="fp32")
    encoder = build_pooled_encoder(backbone, spec, "mha")
    heads = BertHeads(int(config.num_attention_heads), int(config.hidden_size))
    report: dict = {}
    fused_path = export_onnx(encoder, tmp_path / "fused" / "model.onnx", graph_report=report, bert_heads=heads)
    traced = _session(export_onnx(encoder, tmp_path / "traced" / "model.onnx"))
    fused = _session(fused_path)

    layers = int(config.num_hidden_layers)
    if model_type in UNFUSABLE:
        assert report["attention"]["kind"] == UNFUSED and "MultiHeadAttention" not in report["fused_operators"]
    else:
        assert report["attention"] == {"kind": FUSED_MHA, "nodes": layers}
        assert report["fused_operators"]["MultiHeadAttention"] == layers
        assert report["fused_operators"][UNMASKED_BRANCH] == layers
        assert graph_attention(onnx.load(str(fused_path)))["kind"] == FUSED_MHA
    assert report["fused_operators"]["SkipLayerNormalization"] >= layers  # fused either way

    for layout, ids, mask in _batches(np.random.default_rng(0)):
        feed = {"input_ids": ids, "attention_mask": mask}
        got = fused.run(None, feed)[0]
        np.testing.assert_allclose(got, traced.run(None, feed)[0], rtol=0, atol=1e-6, err_msg=f"{model_type} {layout}")
        with torch.no_grad():
            reference = encoder(torch.tensor(ids), torch.tensor(mask)).numpy()
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5, err_msg=f"{model_type} {layout} vs torch")


def test_minilm_export_is_fused_and_its_rows_do_not_depend_on_the_batch(minilm_export: Path) -> None:
    """The session-wide MiniLM export (real weights; validated against sentence-transformers by the exporter)."""
    report = json.loads((minilm_export / "report.json").read_text())
    assert report["passed"]
    assert report["graph"]["attention"] == {"kind": FUSED_MHA, "nodes": 6}
    assert report["graph"]["fused_operators"] == {"MultiHeadAttention": 6, "BiasGelu": 6, "LayerNormalization": 1,
                                                  "SkipLayerNormalization": 12, UNMASKED_BRANCH: 6}
    assert report["validation"]["fp32_vs_reference"]["batched_right_padding"]["min_cosine"] >= 0.99999

    # the memory model finds the layers and heads inside the If branches, and prices a padded batch's scores once
    priced = model_shape(minilm_export / "model.onnx", 384, "fp32")
    assert (priced.layers, priced.heads, priced.intermediate_size, priced.attention) == (6, 12, 1536, FUSED_MASKED)

    session = _session(minilm_export / "model.onnx")
    rng = np.random.default_rng(1)
    lengths = [3, 256, 17, 128]
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1000, 30000, n)
        mask[row, :n] = 1
    batched = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    for row, n in enumerate(lengths):
        alone = session.run(None, {"input_ids": ids[row:row + 1, :n], "attention_mask": mask[row:row + 1, :n]})[0]
        np.testing.assert_allclose(batched[row], alone[0], rtol=0, atol=1e-6, err_msg=f"row of {n} tokens")


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantized_minilm_keeps_the_fused_node(precision: str, tmp_path: Path) -> None:
    """fp16 types the contrib ops' outputs before converting (casts in front of the float32 pooling); int8 and int4
    still see the q / k / v projections as MatMuls, and keep the bias the If branches read. The exporter checks
    each against float32 (report.json)."""
    out = tmp_path / precision
    done = subprocess.run([sys.executable, "-m", "tritonembed.cli", "export", "sentence-transformers/all-MiniLM-L6-v2",
                           "--precision", precision, "--output", str(out), "--skip-stsb"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["graph"]["attention"]["kind"] == FUSED_MHA
    model = onnx.load(str(out / "model.onnx"))
    assert graph_attention(model) == {"kind": FUSED_MHA, "nodes": 6}
    if precision == "int8":
        # q, k, v, o, up, down per layer; the first layer's down projection stays float32
        assert report["quantization"]["settings"]["quantized_matmuls"] == 6 * 6 - 1
