"""`tritonembed export` end to end: reference agreement on unseen texts, padding layouts, typed errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tritonembed.errors import ExportError, ModelResolutionError, OutputExistsError, UnsupportedModelError, ValidationError
from tritonembed.export.families import Qwen3Family, family_by_name
from tritonembed.export.pipeline import export_model
from tritonembed.export.resolve import resolve_model
from tritonembed.export.validate import OnnxEncoder, mixed_padding_run
from tritonembed.model_repository.tokenization import SpecTokenizer
from tritonembed.spec import ModelSpec

pytestmark = pytest.mark.integration

# Never part of the exporter's probe set.
UNSEEN = [
    "Graph neural networks propagate messages along edges.",
    "上海的天气今天很好，适合散步。",
    "SELECT count(*) FROM t;",
    "ok",
    "Las redes neuronales aprenden representaciones. " * 8,
    "🍕 + 🍺 = 🎉",
    "class A:\n    def __init__(self):\n        self.x = [i ** 2 for i in range(10)]",
]


def onnx_encoder(export_dir: Path) -> OnnxEncoder:
    spec = ModelSpec.load(export_dir)
    return OnnxEncoder(export_dir / spec.onnx_file, SpecTokenizer(export_dir / spec.tokenizer_file, spec))


def test_cli_exports_minilm_offline_and_matches_sentence_transformers(tmp_path):
    out = tmp_path / "minilm"
    proc = subprocess.run([sys.executable, "-m", "tritonembed.cli", "export", "sentence-transformers/all-MiniLM-L6-v2",
                           "--precision", "fp32", "--output", str(out), "--skip-stsb"],
                          capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"model.onnx", "tokenizer.json", "tritonembed.json", "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["family"] == "bert" and report["files"]["model.onnx"] > 80e6

    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(resolve_model("sentence-transformers/all-MiniLM-L6-v2").path), device="cpu").encode(
        UNSEEN, normalize_embeddings=True)
    got = onnx_encoder(out).embed(UNSEEN)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
    spec = ModelSpec.load(out)
    assert (spec.pooling, spec.max_length, spec.padding_side, spec.hidden_size) == ("mean", 256, "right", 384)


def test_qwen3_export_matches_official_usage_for_every_padding(qwen_export):
    spec = ModelSpec.load(qwen_export)
    family = family_by_name("qwen3")
    source = resolve_model("random-qwen3:small").path
    texts = [spec.format_text(t, "Given a query, find code") if i % 2 else t for i, t in enumerate(UNSEEN)]
    want = family.reference_embed(source, texts, spec)
    enc = onnx_encoder(qwen_export)
    runs = {
        "left": enc.embed(texts, padding_side="left", batch_size=len(texts)),
        "right": enc.embed(texts, padding_side="right", batch_size=len(texts)),
        "mixed": mixed_padding_run(enc, texts),
        "single": np.concatenate([enc.embed([t]) for t in texts]),
    }
    for name, got in runs.items():
        cos = (got * want).sum(1)
        assert cos.min() >= 0.99999, name
    assert np.abs(runs["single"] - runs["left"]).max() <= 1e-5, "batch invariance"
    assert (spec.pooling, spec.padding_side, spec.pad_token_id, spec.dimension_range) == ("last_token", "left", 151643, (32, 1024))
    assert spec.query_template == Qwen3Family.QUERY_TEMPLATE and spec.append_eos


def test_qwen3_defaults_follow_the_family():
    family = Qwen3Family()
    source = resolve_model("random-qwen3:tiny").path
    config = json.loads((source / "config.json").read_text())
    from tritonembed.export.families import ExportOptions

    spec = family.make_spec(source, "Qwen/Qwen3-Embedding-4B", config, ExportOptions())
    assert spec.name == "Qwen3-Embedding-4B" and spec.max_length == 8192 and spec.matryoshka
    assert family.make_spec(source, "x", config, ExportOptions(max_length=32768)).max_length == 32768
    with pytest.raises(ExportError, match="exceeds"):
        family.make_spec(source, "x", config, ExportOptions(max_length=40000))


def _copy_model(tmp_path: Path, model: str = "random-qwen3:tiny") -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(resolve_model(model).path, target)
    return target


def test_unknown_architecture_lists_supported_families(tmp_path):
    ckpt = _copy_model(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaModel"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"supported families: qwen3 .*bert"):
        export_model(str(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_files_are_typed_errors(tmp_path):
    with pytest.raises(ModelResolutionError, match="tried"):
        export_model(str(tmp_path / "nope"), tmp_path / "out")
    ckpt = _copy_model(tmp_path)
    (ckpt / "config.json").write_text("{broken")
    with pytest.raises(ExportError, match="corrupt JSON"):
        export_model(str(ckpt), tmp_path / "out")
    ckpt2 = _copy_model(tmp_path / "b")
    (ckpt2 / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_model(str(ckpt2), tmp_path / "out")
    ckpt3 = _copy_model(tmp_path / "c")
    (ckpt3 / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="cannot load weights"):
        export_model(str(ckpt3), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_needs_overwrite_and_failed_validation_leaves_it_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_model("random-qwen3:tiny", out)
    monkeypatch.setattr(Qwen3Family, "fp32_min_cosine", 1.5)  # impossible: forces a validation failure
    with pytest.raises(ValidationError, match="min cosine"):
        export_model("random-qwen3:tiny", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    report = export_model("random-qwen3:tiny", out, overwrite=True)
    assert report.passed and (out / "model.onnx").is_file() and not (out / "keep.txt").exists()
    assert json.loads((out / "report.json").read_text())["stsb"]["skipped"].startswith("random weights")
