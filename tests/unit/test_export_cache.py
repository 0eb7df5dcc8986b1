"""The export cache of ``tritonembed serve`` / ``bench``: a changed export method must not be served from cache."""

from __future__ import annotations

import pytest

from tritonembed.export import pipeline
from tritonembed.launcher_cli import export_cache_dir


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONEMBED_CACHE", str(tmp_path))


def test_cache_dir_depends_on_every_export_argument():
    base = export_cache_dir("sentence-transformers/all-MiniLM-L6-v2", "int8", None, None)
    assert base.parent.name == "exports" and "int8" in base.name
    others = {export_cache_dir("sentence-transformers/all-MiniLM-L6-v2", "fp32", None, None),
              export_cache_dir("sentence-transformers/all-MiniLM-L6-v2", "int8", 128, None),
              export_cache_dir("sentence-transformers/all-MiniLM-L6-v2", "int8", None, "minilm")}
    assert base not in others and len(others) == 3


def test_a_new_export_revision_moves_the_cache(monkeypatch):
    before = export_cache_dir("random-qwen3:small", "int8", 512, None)
    monkeypatch.setattr(pipeline, "EXPORT_REVISION", pipeline.EXPORT_REVISION + 1)
    assert export_cache_dir("random-qwen3:small", "int8", 512, None) != before
