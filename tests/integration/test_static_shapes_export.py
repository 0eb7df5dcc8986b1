"""The exporter's static shapes on real traced graphs: the same numbers as the traced graph, fewer nodes.

Both graphs come from the same module traced by torch (MiniLM's real weights, the tiny random Qwen3) and run
on batches the export's probes never use: one token, one row, rows longer than the trace example, left and
right padding in one batch. The PyTorch reference check of every export covers the rest (test_export.py).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("model_id", ["random-qwen3:tiny", "sentence-transformers/all-MiniLM-L6-v2"])
def test_static_shapes_compute_what_the_traced_graph_computes(model_id: str, tmp_path: Path) -> None:
    resolved = resolve_model(model_id)
    config = read_json(resolved.path / "config.json")
    family = family_for(config)
    spec = family.make_spec(resolved.path, resolved.model_id, config, ExportOptions("fp32", None, None))
    encoder = build_pooled_encoder(family.load_backbone(resolved.path), spec)
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
