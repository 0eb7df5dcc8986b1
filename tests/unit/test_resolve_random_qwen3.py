"""``random-qwen3:<shape>`` builds its checkpoint once, in the cache, and never serves a half-built one."""

from __future__ import annotations

import pytest

from tritonembed.errors import ModelResolutionError
from tritonembed.export.resolve import resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONEMBED_CACHE", str(tmp_path))
    return tmp_path / "random-models" / "qwen3-tiny"


def test_the_checkpoint_is_built_whole_and_reused(cache):
    path = resolve_model("random-qwen3:tiny").path
    assert path == cache
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert not list(cache.parent.glob(".*tmp-*"))  # the staging directory was renamed, not left behind
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_model("random-qwen3:tiny").path == cache
    assert (path / "config.json").stat().st_mtime_ns == stamp  # not rebuilt


def test_a_directory_left_without_its_tokenizer_is_rebuilt(cache):
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")  # what a build killed before the tokenizer files leaves
    path = resolve_model("random-qwen3:tiny").path
    assert (path / "tokenizer.json").is_file()
    assert '"model_type": "qwen3"' in (path / "config.json").read_text()


def test_an_unknown_shape_is_a_typed_error(cache):
    with pytest.raises(ModelResolutionError, match="unknown random Qwen3 shape"):
        resolve_model("random-qwen3:enormous")
