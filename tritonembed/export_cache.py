"""The export cache of ``tritonembed serve``: where an export goes, reusing it, listing and pruning it.

``serve`` keys each cached export on its arguments and the exporter's revision (:func:`export_cache_dir`;
:func:`ensure_export` exports on first use), so an exporter upgrade re-exports into a new folder
and the old one stays. An export's revision is read from its ``report.json`` (``export_revision``, written
before the export is committed), else recognised: revision 4 was the first to write ``graph.static_shapes``
into the report. Symbolic links are left alone (listed, never removed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonembed.cache import cache_dir
from tritonembed.errors import CacheError, SpecError
from tritonembed.spec import SPEC_FILENAME, ModelSpec

log = logging.getLogger(__name__)

# export_model's staging folder, and the backup commit_output keeps while it swaps a folder in
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def export_cache_dir(model: str, precision: str, max_length: int | None, name: str | None,
                     int4_activations: str = "float32", static_shapes: bool = True) -> Path:
    """The cache folder of one ``serve`` export: its arguments and the exporter's revision, hashed."""
    from tritonembed.export.pipeline import EXPORT_REVISION

    fields = [model, precision, max_length, name, EXPORT_REVISION]
    if precision == "int4" and int4_activations != "float32":  # the defaults keep the keys of existing caches
        fields.append(int4_activations)
    if not static_shapes:
        fields.append("traced")
    key = json.dumps(fields)
    slug = "".join(c if c.isalnum() or c in "-._" else "-" for c in model)[-60:]
    return cache_dir() / "exports" / f"{slug}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def other_cached_exports(target: Path) -> list[Path]:
    """Cached exports of the same model and precision as ``target`` (same name up to the key's hash), but not it."""
    prefix = target.name.rsplit("-", 1)[0] + "-"
    return sorted(d for d in target.parent.glob(prefix + "*")
                  if d != target and d.is_dir() and len(d.name) == len(target.name))


def ensure_export(model: str, precision: str, max_length: int | None, name: str | None,
                  int4_activations: str = "float32", static_shapes: bool = True, task: str = "auto") -> Path:
    """An exported directory for ``model``: ``model`` itself when it is one, else a cached export.

    ``int4_activations`` (``float32`` / ``float16``) is passed to the exporter for ``int4``; the GPU
    profile asks for ``float16``. ``static_shapes=False`` exports the graph as traced (its own cache entry).

    Raises:
        the errors of :func:`tritonembed.export.pipeline.export_model`.
    """
    if (Path(model) / SPEC_FILENAME).is_file():
        return Path(model)
    target = export_cache_dir(model, precision, max_length, name, int4_activations, static_shapes)
    try:
        if task in ("auto", ModelSpec.load(target).task):
            log.info("using cached export %s", target)
            return target
    except SpecError:
        pass
    from tritonembed.export.pipeline import export_model
    from tritonembed.export.rerank import export_reranker, resolve_task

    if resolve_task(model, task) == "rerank":  # rerankers: docs/rerank.md
        log.info("exporting reranker %s on first use into %s", model, target)
        export_reranker(model, target, precision=precision, max_length=max_length, name=name, overwrite=True,
                        static_shapes=static_shapes)
        return target

    log.info("exporting %s (%s) on first use into %s", model, precision, target)
    others = other_cached_exports(target)
    if others:  # an exporter upgrade re-exports; what it superseded stays until the user removes it
        size = sum(folder_bytes(d) for d in others)
        log.info("%d other cached export(s) of %s (%s), %.1f GB: an older exporter revision or other "
                 "arguments; `tritonembed cache prune` removes the older revisions: %s", len(others), model,
                 precision, size / 1e9, " ".join(str(d) for d in others))
    # STS-B is skipped here to start fast; `tritonembed export` measures it (see report.json there).
    export_model(model, target, precision=precision, max_length=max_length, name=name, overwrite=True, run_stsb=False,
                 int4_activations=int4_activations, static_shapes=static_shapes)
    return target


@dataclass(frozen=True)
class CachedExport:
    """One folder under ``<cache>/exports``.

    ``status``: ``current`` (the exporter's revision), ``stale`` (an older revision: ``serve`` no longer
    uses it), ``incomplete`` (no spec: not an export ``serve`` can use), ``leftover`` (the staging or backup
    folder of an export whose process is gone), ``in progress`` (that of a running export; the process is
    looked up on this machine only) or ``link`` (a symbolic link: never removed).
    """

    path: Path
    model_id: str
    precision: str
    revision: int | None
    status: str
    size_bytes: int

    @property
    def removable(self) -> bool:
        return self.status in ("stale", "incomplete", "leftover")


def scan(exports_dir: Path) -> list[CachedExport]:
    """Every folder under ``exports_dir`` (``<cache>/exports``), sorted by path; [] when it does not exist.

    Raises:
        CacheError: ``exports_dir`` cannot be read.
    """
    from tritonembed.export.pipeline import EXPORT_REVISION

    root = Path(exports_dir)
    if not root.is_dir():
        return []
    try:
        paths = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        raise CacheError(f"cannot read the export cache {root}: {exc}") from exc
    found = []
    for path in paths:
        staging = _STAGING.match(path.name)
        info = _read_json(path / SPEC_FILENAME) or {}
        revision = _revision(path)
        if path.is_symlink():
            status = "link"
        elif staging:
            status = "in progress" if _alive(int(staging["pid"])) else "leftover"
        elif not info:
            status = "incomplete"
        elif revision is not None and revision < EXPORT_REVISION:
            status = "stale"
        else:
            status = "current"
        found.append(CachedExport(path, str(info.get("model_id", "?")), str(info.get("precision", "?")), revision,
                                  status, 0 if status == "link" else folder_bytes(path)))
    return found


def prune(exports_dir: Path, *, dry_run: bool = False) -> tuple[list[CachedExport], list[tuple[CachedExport, str]]]:
    """Remove the stale, incomplete and leftover folders of :func:`scan`.

    Returns ``(removed, failed)``: what was (with ``dry_run``: would be) removed, and what could not be,
    with the reason; a failure does not stop the others.

    Raises:
        CacheError: the cache cannot be read.
    """
    removed: list[CachedExport] = []
    failed: list[tuple[CachedExport, str]] = []
    for entry in (e for e in scan(exports_dir) if e.removable):
        if not dry_run:
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                log.warning("could not remove %s: %s", entry.path, exc)
                failed.append((entry, str(exc)))
                continue
            log.info("removed %s (%s, %.2f GB)", entry.path, entry.status, entry.size_bytes / 1e9)
        removed.append(entry)
    return removed, failed


def _revision(path: Path) -> int | None:
    report = _read_json(path / "report.json")
    if report is None:
        return None
    if isinstance(report.get("export_revision"), int):
        return report["export_revision"]
    return 4 if "static_shapes" in (report.get("graph") or {}) else 3  # 3: revision 3 or older


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_bytes(path: Path) -> int:
    """The bytes of every file under ``path`` (links not followed; a file counts once per folder it is in)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total


def _alive(pid: int) -> bool:
    if pid <= 0:  # kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True
