"""``tritonembed embed --engine ray``: the bulk job on Ray Data, resumable per input shard.

INPUT is a JSONL / Parquet file or a folder of them; each file is a *shard*. For each shard not done yet:
``read_json`` / ``read_parquet`` -> ``map_batches`` with :class:`RayEmbedder` (a callable class: one
:class:`~tritonembed.client.bulk.UrlPool`, i.e. one AsyncEmbeddingClient per URL, per actor; each batch goes to
the least-loaded URL and moves to another on failure) -> ``write_parquet`` into ``OUT/.tmp-shard-<name>-<uuid>/``,
then that folder is renamed to ``OUT/shard-<name>/``. The rename is the commit: a rerun skips every shard whose
folder exists (checking that its recorded input fingerprint still matches) and redoes an interrupted shard from
its start (its temp folder is removed). So each row is written exactly once per completed shard; the unit of
resumption is a whole shard (split a large file into several to resume at a finer grain). The rename needs a
POSIX file system shared by the driver and the workers (a local disk for a local cluster; NFS and the like for
a multi-node one): object stores have no atomic folder rename.

``ray`` and ``pyarrow`` are imported lazily; a missing one raises :class:`~tritonembed.client.bulk.BulkError`
naming the ``bulk`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from tritonembed.client.bulk import (
    INPUT_SUFFIXES,
    MANIFEST_VERSION,
    SUCCESS,
    TMP_PREFIX,
    BulkError,
    BulkInputError,
    BulkJob,
    BulkReport,
    OutputMismatch,
    UrlPool,
    _check_text,
    check_manifest,
    embedding_array,
    fingerprint,
    locked_output,
    require_pyarrow,
    write_atomic,
)
from tritonembed.client.errors import InvalidArgument

logger = logging.getLogger("tritonembed.bulk")

SHARD_PREFIX = "shard-"
SHARD_INFO = "_input.json"
# The actors wait on Triton, not on their own CPU: a quarter CPU each leaves room for the read and write tasks.
ACTOR_CPUS = 0.25


def require_ray() -> Any:
    """Import ray (and ray.data).

    Raises:
        BulkError: ray is not installed (it comes with the ``bulk`` extra).
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise BulkError(f"`tritonembed embed --engine ray` needs ray[data]: pip install 'tritonembed[bulk]' ({exc})") from exc
    return ray


def input_shards(path: Path) -> list[Path]:
    """The input files: ``path`` itself, or the JSONL / Parquet files in the folder ``path`` (sorted, names that
    start with ``.`` or ``_`` skipped).

    Raises:
        BulkInputError: no such file or folder, or a folder without input files.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BulkInputError(f"input {path} is neither a file nor a folder")
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                    and not p.name.startswith((".", "_")))
    if not shards:
        raise BulkInputError(f"input folder {path} holds no {', '.join(sorted(INPUT_SUFFIXES))} file")
    return shards


def shard_folder_name(shard: Path) -> str:
    """``shard-<file name>`` with anything but letters, digits, ``-``, ``_`` and ``.`` replaced (and no ``=``,
    which Hive-style readers would take for a partition column)."""
    return SHARD_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", shard.name)


class RayEmbedder:
    """The ``map_batches`` callable: embeds a pyarrow batch, returns ``id`` and ``embedding`` (list<float32>)."""

    def __init__(self, urls: list[str], model: str | None, dimensions: int | None, input_type: str | None,
                 text_field: str, id_field: str, deadline: float, timeout: float, protocol: str | None) -> None:
        self.text_field, self.id_field = text_field, id_field
        self.loop = asyncio.new_event_loop()  # the clients live on this loop for the actor's lifetime
        self.pool = UrlPool(urls, model=model, dimensions=dimensions, input_type=input_type, in_flight_per_url=1,
                            deadline=deadline, timeout=timeout, protocol=protocol)

    def __call__(self, batch: Any) -> Any:
        pa = require_pyarrow()
        ids = batch.column(self.id_field)
        texts = batch.column(self.text_field).to_pylist()
        for i, text in enumerate(texts):
            _check_text(text, i, f" of a batch (id {ids[i].as_py()!r})", self.text_field)
        try:
            vectors = self.loop.run_until_complete(self.pool.embed(texts))
        except InvalidArgument as error:
            m = re.fullmatch(r"texts\[(\d+)\]", error.param or "")
            which = f"id {ids[int(m.group(1))].as_py()!r}: " if m else ""
            raise BulkInputError(f"{which}{error}") from error
        return pa.table({"id": ids, "embedding": embedding_array(vectors)})

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: best effort
            self.loop.run_until_complete(self.pool.close())
            self.loop.close()


def _bulk_error_in(exc: BaseException) -> BulkError | None:
    """Our error inside Ray's wrappers (RayTaskError and Ray Data's own), if any."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BulkError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def _read_shard(ray: Any, shard: Path, job: BulkJob) -> Any:
    if INPUT_SUFFIXES[shard.suffix.lower()] == "parquet":
        return ray.data.read_parquet(str(shard), columns=[job.id_field, job.text_field], partitioning=None)
    return ray.data.read_json(str(shard), lines=True, partitioning=None)


def _shard_rows(folder: Path) -> int:
    pa = require_pyarrow()
    return sum(pa.parquet.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


def run_ray_job(job: BulkJob, *, address: str | None = None, actors: int | None = None) -> BulkReport:
    """Run (or continue) ``job`` on Ray Data; see the module's docstring for the layout and the rerun rule.

    ``address``: a running cluster (``ray://...`` or ``auto``); without it (and without ``RAY_ADDRESS``) a local
    cluster is started. ``actors``: embedding actors (default: ``in_flight_per_url`` per URL).

    Raises:
        BulkInputError: an input file is malformed or lacks a field (the message names the id when it can).
        OutputMismatch: the output folder holds another job's output, or a shard's input changed.
        AllUrlsDown: no URL answered before the deadline (rerun to continue).
        BulkError: ray is not installed, or the Ray job failed for another reason.
    """
    ray = require_ray()
    started = time.monotonic()
    shards = input_shards(job.input)
    with locked_output(job.output):
        check_manifest(job.output, {"version": MANIFEST_VERSION, "engine": "ray", **job.vector_arguments()})
        for entry in job.output.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                logger.info("removing %s, left by an interrupted run", entry.name)
                shutil.rmtree(entry)
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        embedded = already = written = 0
        for shard in shards:
            final = job.output / shard_folder_name(shard)
            info = {"shard": shard.name, **fingerprint(shard)}
            if final.is_dir():
                recorded = json.loads((final / SHARD_INFO).read_text())
                if recorded != info:
                    raise OutputMismatch(f"{final} was written from another {shard.name} ({recorded} there, {info} "
                                         f"now); remove that folder to embed the shard again")
                already += _shard_rows(final)
                logger.info("%s: done in an earlier run, skipped", shard.name)
                continue
            tmp = job.output / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
            ds = _read_shard(ray, shard, job).map_batches(
                RayEmbedder,
                fn_constructor_kwargs={"urls": list(job.urls), "model": job.model, "dimensions": job.dimensions,
                                       "input_type": job.input_type, "text_field": job.text_field,
                                       "id_field": job.id_field, "deadline": job.deadline, "timeout": job.timeout,
                                       "protocol": job.protocol},
                batch_size=job.batch_size, batch_format="pyarrow",
                concurrency=actors or job.in_flight_per_url * len(job.urls), num_cpus=ACTOR_CPUS)
            try:
                ds.write_parquet(str(tmp))
            except Exception as exc:  # Ray wraps what the actors raised; ours is unwrapped, the rest named
                found = _bulk_error_in(exc)
                shutil.rmtree(tmp, ignore_errors=True)
                if found is not None:
                    raise type(found)(f"{shard.name}: {found}") from exc
                raise BulkError(f"the Ray job failed on {shard.name}: {type(exc).__name__}: {exc}") from exc
            tmp.mkdir(exist_ok=True)  # an empty shard writes no file
            (tmp / SHARD_INFO).write_text(json.dumps(info) + "\n")
            os.replace(tmp, final)
            rows = _shard_rows(final)
            embedded += rows
            written += 1
            logger.info("%s: %d rows embedded into %s", shard.name, rows, final.name)
        write_atomic(job.output / SUCCESS,
                     lambda p: p.write_text(json.dumps({"rows": embedded + already, "shards": len(shards)}) + "\n"))
    return BulkReport(output=str(job.output), rows_total=embedded + already, rows_embedded=embedded,
                      rows_already_done=already, parts_written=written, seconds=time.monotonic() - started,
                      engine="ray")
