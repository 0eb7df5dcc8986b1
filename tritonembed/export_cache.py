"""What ``tritonembed serve`` left in the export cache, and removing what no longer serves.

``serve`` keys each cached export on its arguments and the exporter's revision
(:func:`tritonembed.launcher_cli.export_cache_dir`), so an exporter upgrade re-exports into a new folder
and the old one stays. Each export written since revision 4 records its key in ``cache-key.json``; older
ones are recognised by their ``report.json`` (revision 4 was the first to write ``graph.static_shapes``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonembed.spec import SPEC_FILENAME

log = logging.getLogger(__name__)

CACHE_KEY_FILENAME = "cache-key.json"
_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # export_model's staging sibling


@dataclass(frozen=True)
class CachedExport:
    """One folder under ``<cache>/exports``.

    ``status``: ``current`` (the exporter's revision), ``stale`` (an older revision: ``serve`` no longer
    uses it), ``incomplete`` (no spec: not an export ``serve`` can use), ``leftover`` (the staging folder of
    an export whose process is gone) or ``in progress`` (the staging folder of a running export).
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


def record_key(export_dir: Path, fields: list[Any], revision: int) -> None:
    """Write ``cache-key.json`` into a cached export (the arguments its folder name was hashed from)."""
    (Path(export_dir) / CACHE_KEY_FILENAME).write_text(
        json.dumps({"export_revision": revision, "fields": fields}) + "\n", encoding="utf-8")


def scan(exports_dir: Path) -> list[CachedExport]:
    """Every folder under ``exports_dir`` (``<cache>/exports``), sorted by path; [] when it does not exist."""
    from tritonembed.export.pipeline import EXPORT_REVISION

    root = Path(exports_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        staging = _STAGING.match(path.name)
        info = _read_json(path / SPEC_FILENAME) or {}
        revision = _revision(path)
        if staging:
            status = "in progress" if _alive(int(staging["pid"])) else "leftover"
        elif not info:
            status = "incomplete"
        elif revision is not None and revision < EXPORT_REVISION:
            status = "stale"
        else:
            status = "current"
        found.append(CachedExport(path, str(info.get("model_id", "?")), str(info.get("precision", "?")), revision,
                                  status, _size(path)))
    return found


def prune(exports_dir: Path, *, dry_run: bool = False) -> list[CachedExport]:
    """Remove the stale, incomplete and leftover folders of :func:`scan`; returns them.

    Raises:
        OSError: a folder could not be removed (the ones before it are gone).
    """
    doomed = [entry for entry in scan(exports_dir) if entry.removable]
    for entry in doomed:
        if not dry_run:
            shutil.rmtree(entry.path)
            log.info("removed %s (%s, %.2f GB)", entry.path, entry.status, entry.size_bytes / 1e9)
    return doomed


def _revision(path: Path) -> int | None:
    key = _read_json(path / CACHE_KEY_FILENAME) or {}
    if isinstance(key.get("export_revision"), int):
        return key["export_revision"]
    report = _read_json(path / "report.json")
    if report is None:
        return None
    return 4 if "static_shapes" in (report.get("graph") or {}) else 3  # 3: revision 3 or older


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
