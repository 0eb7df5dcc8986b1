"""Qwen3-Reranker export against the model card's own usage code, on a random-weight look-alike.

The checkpoint is shaped like the released ones: Qwen3ForCausalLM in bfloat16, lm_head tied to the
embedding (as in the 0.6B), the plain Qwen3 tokenizer, no sentence-transformers files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tritonembed.errors import ValidationError
from tritonembed.export.families import Qwen3RerankerFamily
from tritonembed.export.rerank import (
    OnnxReranker,
    export_reranker,
    long_document,
    official_scores,
    sigmoid,
)
from tritonembed.export.testmodels import create_random_qwen3_reranker
from tritonembed.spec import ModelSpec

UNSEEN = [  # (query, document): not among the export's probes
    ("Was kostet ein Ticket?", "Ein Ticket kostet zwölf Euro, ermäßigt acht."),
    ("東京の人口は？", "東京都の人口は約1400万人です。"),
    ("¿Dónde está el museo?", "El museo está junto a la catedral, en la plaza mayor."),
    ("best pizza dough", "Use 00 flour, 65 % hydration and a 48-hour cold ferment."),
    ("emoji 🙂 {query} braces", "a document with {document} and {instruction} in it"),
    ("long", long_document(3000)),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return create_random_qwen3_reranker(tmp_path_factory.mktemp("ckpt") / "Qwen3-Reranker-tiny", "tiny")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "reranker"
    proc = subprocess.run([sys.executable, "-m", "tritonembed.cli", "export", str(checkpoint), "--output", str(out)],
                          capture_output=True, text=True, timeout=900, check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_auto_task_exports_one_score_output_validated_on_p_yes(exported):
    spec = ModelSpec.load(exported)
    assert (spec.task, spec.family, spec.max_length, spec.padding_side) == ("rerank", "qwen3-reranker", 8192, "left")
    assert [t.name for t in spec.encoder_outputs] == ["score"] and spec.encoder_outputs[0].dims == (1,)
    report = json.loads((exported / "report.json").read_text())
    assert report["passed"] and report["graph"]["attention"]["nodes"] == 2  # one GroupQueryAttention per layer
    assert report["validation"]["long_document_tokens"] == 8192
    for padding in ("left", "right", "mixed"):
        assert report["validation"][f"p_yes_max_abs_diff_{padding}"] <= 1e-4
    onnx = OnnxReranker(exported)
    assert [o.name for o in onnx.session.get_outputs()] == ["score"]
    ids, mask = onnx.tokenizer.pad(onnx.tokenizer.encode_pairs(["q", "a query"], ["d", "a document"]).ids)
    assert onnx.run_ids(ids, mask).shape == (2, 1)  # one logit per pair, never vocabulary-sized


@pytest.mark.parametrize("instruction", [None, "Given a question, find the passage in any language that answers it"])
def test_unseen_pairs_match_the_official_code_in_any_padding_and_batch(exported, checkpoint, instruction):
    queries, documents = [q for q, _ in UNSEEN], [d for _, d in UNSEEN]
    want = np.concatenate([official_scores(checkpoint, queries[:-1], documents[:-1], instruction),
                           official_scores(checkpoint, queries[-1:], documents[-1:], instruction)])
    assert np.ptp(want) > 1e-3  # the pairs score differently: a constant output would not pass
    onnx = OnnxReranker(exported)
    for padding in ("left", "right", "mixed"):
        got = sigmoid(onnx.scores(queries, documents, instruction, padding))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    alone = np.concatenate([onnx.scores([q], [d], instruction) for q, d in UNSEEN])
    np.testing.assert_allclose(alone, onnx.scores(queries, documents, instruction), atol=1e-5, rtol=0)


def test_a_wrong_template_fails_validation_and_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(Qwen3RerankerFamily, "SUFFIX", "<|im_end|>\n<|im_start|>assistant\n")  # no empty think block
    out = tmp_path / "bad"
    with pytest.raises(ValidationError) as info:
        export_reranker(str(checkpoint), out, max_length=1024)
    assert any("P(yes)" in f for f in info.value.failures)
    assert not out.exists()
