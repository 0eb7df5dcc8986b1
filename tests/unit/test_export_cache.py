"""The export cache of ``tritonembed serve`` / ``bench``: a changed export method must not be served from cache."""

from __future__ import annotations

import pytest

from tritonembed.export import pipeline
from tritonembed.export_cache import export_cache_dir, other_cached_exports


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


def test_int4_with_float16_activations_has_its_own_cache():
    model = "sentence-transformers/all-MiniLM-L6-v2"
    plain = export_cache_dir(model, "int4", None, None)
    assert export_cache_dir(model, "int4", None, None, "float32") == plain  # existing caches keep their keys
    assert export_cache_dir(model, "int4", None, None, "float16") != plain
    assert export_cache_dir(model, "fp16", None, None, "float16") == export_cache_dir(model, "fp16", None, None)


def test_the_gpu_profile_asks_for_float16_int4(monkeypatch):
    import argparse

    from tritonembed import launcher_cli

    asked = []
    monkeypatch.setattr(launcher_cli, "ensure_export", lambda *a, **kw: asked.append(a) or a[0])
    parser = argparse.ArgumentParser()
    launcher_cli.register(parser.add_subparsers(dest="command"))
    for profile in ("gpu", "cpu"):
        launcher_cli._exports(parser.parse_args(["repo", "m", "--precision", "int4", "--profile", profile, "-o", "x"]))
    assert [a[4] for a in asked] == ["float16", "float32"]


def test_other_cached_exports_of_the_same_model_and_precision_are_found():
    model = "sentence-transformers/all-MiniLM-L6-v2"
    target = export_cache_dir(model, "int8", None, None)
    older = target.with_name(target.name[:-10] + "0123456789")  # another key: older revision, other args
    for d in (target, older, export_cache_dir(model, "fp32", None, None), export_cache_dir("random-qwen3:small", "int8", None, None)):
        d.mkdir(parents=True)
    (target.parent / (target.name + ".tmp")).write_text("")  # not a directory
    assert other_cached_exports(target) == [older]


def test_the_traced_graph_has_its_own_cache():
    model = "random-qwen3:small"
    static = export_cache_dir(model, "fp16", None, None)
    assert export_cache_dir(model, "fp16", None, None, static_shapes=True) == static  # existing caches keep their keys
    assert export_cache_dir(model, "fp16", None, None, static_shapes=False) != static


def test_no_static_shapes_reaches_the_export(monkeypatch):
    import argparse

    from tritonembed import launcher_cli

    asked = []
    monkeypatch.setattr(launcher_cli, "ensure_export", lambda *a, **kw: asked.append(a) or a[0])
    parser = argparse.ArgumentParser()
    launcher_cli.register(parser.add_subparsers(dest="command"))
    launcher_cli._exports(parser.parse_args(["repo", "m", "--profile", "gpu", "-o", "x"]))
    launcher_cli._exports(parser.parse_args(["repo", "m", "--profile", "gpu", "--no-static-shapes", "-o", "x"]))
    monkeypatch.setenv("TRITONEMBED_NO_STATIC_SHAPES", "1")  # the env default is read when the parser is built
    parser = argparse.ArgumentParser()
    launcher_cli.register(parser.add_subparsers(dest="command"))
    launcher_cli._exports(parser.parse_args(["serve", "m"]))
    assert [a[-1] for a in asked] == [True, False, False]
