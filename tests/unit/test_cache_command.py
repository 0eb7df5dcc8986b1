"""``tritonembed cache list|prune``: which cached exports are current, which go, and that prune removes only those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tritonembed.cli import main
from tritonembed.export.pipeline import EXPORT_REVISION
from tritonembed.export_cache import prune, scan
from tritonembed.spec import SPEC_FILENAME

SPEC = {"model_id": "org/model", "precision": "int8"}


@pytest.fixture
def exports(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TRITONEMBED_CACHE", str(tmp_path))
    root = tmp_path / "exports"
    root.mkdir()
    return root


def _export(root: Path, name: str, *, spec: bool = True, report: dict | None = None, revision: int | None = None,
            payload: int = 1000) -> Path:
    d = root / name
    d.mkdir()
    (d / "model.onnx").write_bytes(b"\0" * payload)
    if spec:
        (d / SPEC_FILENAME).write_text(json.dumps(SPEC))
    if revision is not None:
        report = {**(report or {}), "export_revision": revision}
    if report is not None:
        (d / "report.json").write_text(json.dumps(report))
    return d


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scan_tells_current_from_stale_incomplete_and_leftover(exports: Path) -> None:
    _export(exports, "a-current-revision", revision=EXPORT_REVISION)
    _export(exports, "b-stale-revision", revision=EXPORT_REVISION - 1)
    # revision 4 wrote graph.static_shapes but no export_revision: recognised as 4, older than today's
    _export(exports, "c-revision4-report", report={"graph": {"static_shapes": {"off": True}}})
    _export(exports, "d-stale-report", report={"validation": {}})  # before revision 4: no graph section
    _export(exports, "e-incomplete", spec=False)
    _export(exports, f".f.tmp-{_dead_pid()}", spec=False)
    _export(exports, f".g.tmp-{os.getpid()}", spec=False)  # an export still running
    _export(exports, f".h.old-{_dead_pid()}", report={})  # commit_output's backup, its process gone
    _export(exports, "i.tmp-huge", spec=False)  # not a staging name: an incomplete folder
    _export(exports, ".j.tmp-99999999999999999999", spec=False)  # no such process (too large for kill)
    _export(exports, ".k.tmp-0", spec=False)  # kill(0) would be our own process group
    _export(exports, "l-revision-in-report", report={"export_revision": EXPORT_REVISION - 1,
                                                       "graph": {"static_shapes": {}}})
    (exports / "m-link").symlink_to(_export(exports.parent, "elsewhere", revision=EXPORT_REVISION - 1))
    status = {e.path.name: e.status for e in scan(exports)}
    dead = {n for n in status if n.startswith((".f.", ".h."))}
    assert status == {"a-current-revision": "current", "b-stale-revision": "stale", "c-revision4-report": "stale",
                      "d-stale-report": "stale", "e-incomplete": "incomplete", **{n: "leftover" for n in dead},
                      f".g.tmp-{os.getpid()}": "in progress", "i.tmp-huge": "incomplete",
                      ".j.tmp-99999999999999999999": "leftover", ".k.tmp-0": "leftover",
                      "l-revision-in-report": "stale", "m-link": "link"}
    assert {e.path.name: e.size_bytes for e in scan(exports)}["a-current-revision"] > 1000  # payload + spec + report


def test_prune_removes_only_what_serve_no_longer_uses(exports: Path) -> None:
    keep = [_export(exports, "current", revision=EXPORT_REVISION),
            _export(exports, f".running.tmp-{os.getpid()}", spec=False)]
    gone = [_export(exports, "stale", report={}), _export(exports, "incomplete", spec=False),
            _export(exports, f".dead.tmp-{_dead_pid()}", spec=False)]
    link = exports / "link-to-stale"
    link.symlink_to(_export(exports.parent, "stale-elsewhere", report={}))
    keep.append(link)
    assert sorted(e.path for e in prune(exports, dry_run=True)[0]) == sorted(gone)
    assert all(d.exists() for d in keep + gone)  # a dry run removes nothing
    removed, failed = prune(exports)
    assert sorted(e.path for e in removed) == sorted(gone) and failed == []
    assert all(d.exists() for d in keep) and not any(d.exists() for d in gone)
    assert (exports.parent / "stale-elsewhere").is_dir()  # a link is never followed
    assert prune(exports) == ([], [])


def test_prune_goes_on_past_a_folder_it_cannot_remove(exports: Path, monkeypatch) -> None:
    import shutil

    from tritonembed import export_cache

    stuck, other = _export(exports, "a-stuck", report={}), _export(exports, "b-other", report={})
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export_cache.shutil, "rmtree", rmtree)
    removed, failed = prune(exports)
    assert [e.path for e in removed] == [other] and [e.path for e, _ in failed] == [stuck]
    assert "Permission denied" in failed[0][1] and stuck.exists() and not other.exists()


def test_cache_command_lists_and_prunes(exports: Path, capsys) -> None:
    _export(exports, "current", revision=EXPORT_REVISION)
    stale = _export(exports, "stale", report={})
    assert main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert "current" in listed and "stale" in listed and "2 export(s)" in listed
    assert main(["cache", "prune", "--dry-run"]) == 0
    assert "would remove stale" in capsys.readouterr().out and stale.exists()
    assert main(["cache", "prune"]) == 0
    assert "removed stale" in capsys.readouterr().out and not stale.exists()
    assert main(["cache", "list"]) == 0 and "1 export(s)" in capsys.readouterr().out


def test_no_cache_yet(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRITONEMBED_CACHE", str(tmp_path / "nothing"))
    assert main(["cache", "list"]) == 0 and "0 export(s)" in capsys.readouterr().out


def test_the_export_serve_uses_is_never_pruned(exports: Path) -> None:
    from tests.unit.test_spec import make_spec
    from tritonembed.export_cache import ensure_export, export_cache_dir

    target = export_cache_dir("org/model", "int8", None, None)
    target.mkdir(parents=True)
    make_spec(precision="int8").save(target)
    (target / "report.json").write_text(json.dumps({"export_revision": EXPORT_REVISION}))
    older = _export(exports, "org-model-int8-0123456789", report={"export_revision": EXPORT_REVISION - 1})
    assert ensure_export("org/model", "int8", None, None) == target  # served from the cache
    assert [e.path for e in prune(exports)[0]] == [older]
    assert target.is_dir() and {e.path: e.status for e in scan(exports)} == {target: "current"}
