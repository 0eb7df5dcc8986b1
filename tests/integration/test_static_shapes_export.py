"""The exporter's static shapes on real traced graphs: the same numbers as the traced graph, fewer nodes.

Both graphs come from the same module traced by torch (MiniLM's real weights, the tiny random Qwen3) and run
on batches the export's probes never use: one token, one row, rows longer than the trace example, left and
right padding in one batch. The PyTorch reference check of every export covers the rest (test_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tritonembed.export.families import ExportOptions, family_for, read_json
from tritonembed.export.onnx_export import build_pooled_encoder, export_onnx
from tritonembed.export.resolve import resolve_model

pytestmark = pytest.mark.integration


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("model_id", "attention"), [("random-qwen3:tiny", "gqa"), ("random-qwen3:tiny", "unfused"),
                                                    ("sentence-transformers/all-MiniLM-L6-v2", "unfused")])
def test_static_shapes_compute_what_the_traced_graph_computes(model_id: str, attention: str, tmp_path: Path) -> None:
    resolved = resolve_model(model_id)
    config = read_json(resolved.path / "config.json")
    family = family_for(config)
    spec = family.make_spec(resolved.path, resolved.model_id, config, ExportOptions("fp32", None, None))
    encoder = build_pooled_encoder(family.load_backbone(resolved.path), spec, attention)
    graph: dict = {}
    traced = export_onnx(encoder, tmp_path / "traced" / "model.onnx", static_shapes=False)
    static = export_onnx(encoder, tmp_path / "static" / "model.onnx", graph_report=graph)

    report = graph["static_shapes"]
    assert report["skipped"] == [] and report["frozen"] > 0
    assert report["nodes_after"] == len(onnx.load(str(static)).graph.node) < len(onnx.load(str(traced)).graph.node)

    a, b = _session(traced), _session(static)
    rng = np.random.default_rng(0)
    vocab = int(config["vocab_size"])
    for batch, length in ((1, 1), (1, 7), (2, 1), (3, 5), (4, 40), (2, 129)):
        ids = rng.integers(5, vocab, (batch, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if batch > 1:  # one row padded on the left, one on the right
            mask[0, : length // 2] = 0
            mask[-1, length - length // 3:] = 0
        feed = {"input_ids": ids, "attention_mask": mask}
        np.testing.assert_allclose(b.run(None, feed)[0], a.run(None, feed)[0], rtol=0, atol=1e-6,
                                   err_msg=f"{model_id} batch {batch} x {length}")


def _bert_like_configs() -> dict[str, object]:
    import transformers

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000,
                 max_position_embeddings=128)
    return {
        "bert": transformers.BertConfig(**small),
        "roberta": transformers.RobertaConfig(**small, pad_token_id=1),
        "xlm-roberta": transformers.XLMRobertaConfig(**small, pad_token_id=1),
        "mpnet": transformers.MPNetConfig(**small, pad_token_id=1),
        "distilbert": transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000,
                                                    max_position_embeddings=128),
        "electra": transformers.ElectraConfig(**small, embedding_size=32),
    }


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra"])
def test_static_shapes_on_every_declared_bert_like_architecture(model_type: str, tmp_path: Path) -> None:
    """The family declares these model types; their checkpoints cannot be downloaded here, so each is built
    small with random weights from its transformers config and traced the way the exporter traces it."""
    import torch
    import transformers

    from tritonembed.spec import ModelSpec

    torch.manual_seed(0)
    backbone = transformers.AutoModel.from_config(_bert_like_configs()[model_type], attn_implementation="eager")
    spec = ModelSpec(name=model_type, model_id=model_type, family="bert", pooling="mean", normalize=True,
                     hidden_size=64, max_length=120, padding_side="right", pad_token_id=0, precision="fp32")
    encoder = build_pooled_encoder(backbone.eval(), spec)
    graph: dict = {}
    traced = _session(export_onnx(encoder, tmp_path / "traced" / "model.onnx", static_shapes=False))
    static = _session(export_onnx(encoder, tmp_path / "static" / "model.onnx", graph_report=graph))
    assert graph["static_shapes"]["skipped"] == [] and graph["static_shapes"]["frozen"] > 0

    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (1, 7), (2, 1), (3, 5), (4, 40), (2, 100)):
        ids = rng.integers(5, 1000, (batch, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if batch > 1:
            mask[-1, length - length // 3:] = 0
        feed = {"input_ids": ids, "attention_mask": mask}
        got = static.run(None, feed)[0]
        np.testing.assert_allclose(got, traced.run(None, feed)[0], rtol=0, atol=1e-6)
        with torch.no_grad():
            reference = encoder(torch.tensor(ids), torch.tensor(mask)).numpy()
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5, err_msg=f"{model_type} {batch} x {length}")


def test_export_without_static_shapes_keeps_the_traced_graph(tmp_path: Path) -> None:
    from tritonembed.cli import main
    from tritonembed.export.pipeline import EXPORT_REVISION

    assert main(["export", "random-qwen3:tiny", "-o", str(tmp_path / "traced"), "--no-static-shapes"]) == 0
    assert main(["export", "random-qwen3:tiny", "-o", str(tmp_path / "static")]) == 0
    reports = {k: json.loads((tmp_path / k / "report.json").read_text()) for k in ("traced", "static")}
    assert reports["traced"]["passed"] and reports["static"]["passed"]
    assert reports["traced"]["export_revision"] == reports["static"]["export_revision"] == EXPORT_REVISION
    assert reports["traced"]["graph"]["static_shapes"] == {"off": True}
    nodes = {k: len(onnx.load(str(tmp_path / k / "model.onnx"), load_external_data=False).graph.node) for k in reports}
    assert reports["static"]["graph"]["static_shapes"]["nodes_after"] == nodes["static"] < nodes["traced"]
