"""``tritonembed embed``: embed a whole corpus (JSONL or Parquet) into a folder of Parquet parts, resumably.

The output folder is its own checkpoint. Rows are numbered by their position in the input (JSONL: the
non-blank lines; Parquet: the rows), and each part file is named by the range of rows it holds:
``part-000000004096-000000008192.parquet`` holds rows 4096..8191. A part is written to a ``.tmp-`` name, fsynced
and renamed, so a part name that exists is a complete part; a rerun reads the covered ranges back from the names
and embeds only the rows no part holds. Hence after a crash or SIGKILL at any moment the same command continues
and the output holds every input row exactly once. ``_job.json`` (written once, before any part) records what
the vectors depend on (the input's size and a hash of its ends, the model, dimensions, input type, fields) so a
rerun with other arguments is refused instead of mixing vectors; ``_SUCCESS`` is written when every row is
covered. Readers that skip ``_`` and ``.`` names (pyarrow, pandas, Spark, Ray) see only the parts.

The job embeds rows, not ids: an id that appears twice in the input appears twice in the output (checking
uniqueness would take memory that grows with the corpus).

Work is spread over several Triton URLs by :class:`UrlPool`: one
:class:`~tritonembed.client.AsyncEmbeddingClient` per URL, a bounded number of batches in flight on each, and a
batch whose URL fails is sent to another (embedding is idempotent). The job fails with :class:`AllUrlsDown` only
when every URL's last attempt failed and none has answered for ``deadline`` seconds; what was written stays.

Memory is bounded: at most ``max_parts_in_flight`` parts (their texts and vectors) are held at a time, the input
is read in chunks, and nothing grows with the corpus. pyarrow and tqdm are imported lazily (the ``bulk`` extra).

One module because the checkpoint format (part names, ``_job.json``, ``_SUCCESS``) is one contract that the
reader, the writer, the resume scan and the URL pool all obey; the Ray engine (:mod:`.bulk_ray`) reuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tritonembed.client.aio import AsyncEmbeddingClient
from tritonembed.client.core import RetryPolicy
from tritonembed.client.errors import EmbeddingError, InvalidArgument, ModelNotFound
from tritonembed.client.replicas import Replica, ReplicaPolicy
from tritonembed.errors import TritonEmbedError
from tritonembed.text_rules import is_blank

logger = logging.getLogger("tritonembed.bulk")

PART_RE = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
TMP_PREFIX = ".tmp-"
MANIFEST = "_job.json"
SUCCESS = "_SUCCESS"
LOCK = "_lock"
MANIFEST_VERSION = 1
FINGERPRINT_BYTES = 1 << 20
INPUT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class BulkError(TritonEmbedError):
    """A bulk embedding job cannot start or continue."""


class BulkInputError(BulkError):
    """The input is malformed: a missing field, a blank text, an id of the wrong type, an unknown format."""


class OutputMismatch(BulkError):
    """The output folder belongs to another job (other input or arguments), or is not a job's folder at all."""


class AllUrlsDown(BulkError):
    """Every URL failed and none answered before the deadline; the parts written so far are kept."""


def require_pyarrow() -> Any:
    """Import pyarrow.

    Raises:
        BulkError: pyarrow is not installed (it comes with the ``bulk`` extra).
    """
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise BulkError(f"`tritonembed embed` needs pyarrow: pip install 'tritonembed[bulk]' ({exc})") from exc
    return pyarrow


# --- the job's description ---------------------------------------------------------------------------------------
@dataclass
class BulkJob:
    """What to embed, where to, and how hard to push the servers."""

    input: Path
    output: Path
    urls: Sequence[str]
    model: str | None = None
    text_field: str = "text"
    id_field: str = "id"
    batch_size: int = 64
    dimensions: int | None = None
    input_type: str | None = None
    part_rows: int = 8192
    in_flight_per_url: int = 2
    max_parts_in_flight: int = 3
    deadline: float = 120.0
    timeout: float = 60.0
    protocol: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        self.urls = [u.strip() for u in self.urls if u.strip()]
        if not self.urls:
            raise BulkError("no URL given: --url HOST:PORT[,HOST:PORT...]")
        for name in ("batch_size", "part_rows", "in_flight_per_url", "max_parts_in_flight"):
            if getattr(self, name) < 1:
                raise BulkError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.deadline <= 0 or self.timeout <= 0:
            raise BulkError("deadline and timeout must be positive")
        if self.input_type not in (None, "query", "document"):
            raise BulkError(f"input_type must be 'query' or 'document', got {self.input_type!r}")

    def vector_arguments(self) -> dict[str, Any]:
        """The arguments the vectors depend on (recorded in the manifest)."""
        return {"model": self.model, "dimensions": self.dimensions, "input_type": self.input_type,
                "text_field": self.text_field, "id_field": self.id_field}


@dataclass
class BulkReport:
    """What a run did."""

    output: str
    rows_total: int
    rows_embedded: int
    rows_already_done: int
    parts_written: int
    seconds: float
    rows_per_url: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    engine: str = "local"

    def summary(self) -> str:
        """One line for the terminal."""
        rate = self.rows_embedded / self.seconds if self.seconds > 0 else 0.0
        urls = ", ".join(f"{u} {n}" for u, n in self.rows_per_url.items()) or "-"
        return (f"embedded {self.rows_embedded} rows in {self.seconds:.1f} s ({rate:.0f} rows/s), "
                f"{self.rows_already_done} already done, {self.rows_total} in all, {self.parts_written} parts "
                f"written to {self.output}; rows per URL: {urls}; {self.failovers} batches retried on another URL")


# --- part names and ranges ---------------------------------------------------------------------------------------
def part_name(start: int, end: int) -> str:
    """The file name of the part holding rows ``start`` .. ``end - 1``."""
    if not 0 <= start < end:
        raise ValueError(f"bad part range {start}..{end}")
    return f"part-{start:012d}-{end:012d}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """``(start, end)`` of a part file name, None for any other name."""
    m = PART_RE.match(name)
    if not m:
        return None
    start, end = int(m.group(1)), int(m.group(2))
    return (start, end) if start < end else None


def uncovered(start: int, end: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sub-ranges of ``[start, end)`` that no range of ``covered`` (sorted, disjoint) holds."""
    gaps, cursor = [], start
    for s, e in covered:
        if e <= cursor or s >= end:
            continue
        if s > cursor:
            gaps.append((cursor, s))
        cursor = max(cursor, e)
        if cursor >= end:
            break
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


def scan_parts(folder: Path) -> list[tuple[int, int]]:
    """The ranges the complete parts in ``folder`` cover, sorted.

    Leftover ``.tmp-`` files (a run killed while writing) are removed. A part whose footer cannot be read or whose
    row count does not match its name (torn by a crash of the machine before its data reached the disk) is removed
    with a warning, so its rows are embedded again.

    Raises:
        OutputMismatch: two parts overlap (the folder was assembled by hand or by another tool).
    """
    pa = require_pyarrow()
    ranges = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(TMP_PREFIX):
            logger.info("removing %s, left by an interrupted run", entry.name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            continue
        found = parse_part_name(entry.name)
        if found is None:
            continue
        try:
            rows = pa.parquet.ParquetFile(entry.path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:  # a truncated file: ArrowInvalid / OSError
            rows, reason = None, f"unreadable ({exc})"
        else:
            reason = f"{rows} rows instead of {found[1] - found[0]}"
        if rows != found[1] - found[0]:
            logger.warning("removing torn part %s: %s; its rows are embedded again", entry.name, reason)
            os.unlink(entry.path)
            continue
        ranges.append(found)
    ranges.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(ranges):
        if s1 < e0:
            raise OutputMismatch(f"{folder}: parts {part_name(s0, e0)} and {part_name(s1, e1)} overlap")
    return ranges


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a ``.tmp-`` name beside it, fsync it, rename it into place."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def embedding_array(vectors: np.ndarray) -> Any:
    """A ``list<float32>`` arrow array from a ``[n, d]`` float32 array."""
    pa = require_pyarrow()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))


def write_part(folder: Path, start: int, ids: Any, vectors: np.ndarray) -> Path:
    """Write rows ``start`` .. ``start + len(ids) - 1`` as one part (atomically). ``ids`` is an arrow array."""
    pa = require_pyarrow()
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    table = pa.table({"id": ids, "embedding": embedding_array(vectors)})
    path = folder / part_name(start, start + len(ids))
    write_atomic(path, lambda tmp: pa.parquet.write_table(table, tmp))
    return path


# --- the input -----------------------------------------------------------------------------------------------------
def input_format(path: Path) -> str:
    """``jsonl`` or ``parquet``, from the file name.

    Raises:
        BulkInputError: another suffix, or not a file.
    """
    if not path.is_file():
        raise BulkInputError(f"input {path} is not a file")
    fmt = INPUT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BulkInputError(f"input {path}: unknown format (want one of {', '.join(sorted(INPUT_SUFFIXES))})")
    return fmt


def fingerprint(path: Path) -> dict[str, Any]:
    """Size and a hash of the first and last MiB: what a rerun checks to be sure the rows are the same rows."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return {"size": size, "ends_sha256": h.hexdigest()}


@dataclass
class Chunk:
    """Rows ``start`` .. ``start + len(texts) - 1`` of the input."""

    start: int
    ids: Any  # an arrow array
    texts: list[str]

    @property
    def end(self) -> int:
        return self.start + len(self.texts)


def _check_text(text: Any, row: int, where: str, field_name: str) -> str:
    if not isinstance(text, str):
        raise BulkInputError(f"row {row}{where}: {field_name!r} is {type(text).__name__}, not a string")
    if is_blank(text):
        raise BulkInputError(f"row {row}{where}: {field_name!r} is blank (nothing to embed)")
    return text


class JsonlInput:
    """A JSONL file: one JSON object per non-blank line."""

    def __init__(self, path: Path, text_field: str, id_field: str) -> None:
        self.path, self.text_field, self.id_field = path, text_field, id_field
        self.id_type = self._first_id_type()

    def _first_id_type(self) -> str:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = self._parse(line, 0, number)
                    return self._id_kind(record, 0, number)
        raise BulkInputError(f"input {self.path} holds no rows")

    def _parse(self, line: bytes, row: int, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise BulkInputError(f"row {row} (line {number}): not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise BulkInputError(f"row {row} (line {number}): not a JSON object")
        return record

    def _id_kind(self, record: dict[str, Any], row: int, number: int) -> str:
        if self.id_field not in record:
            raise BulkInputError(f"row {row} (line {number}): no {self.id_field!r} field (choose it with --id-field)")
        value = record[self.id_field]
        if isinstance(value, str):
            return "string"
        if isinstance(value, int) and not isinstance(value, bool):
            return "int64"
        raise BulkInputError(f"row {row} (line {number}): id {value!r} is neither a string nor an integer")

    def count_rows(self) -> int:
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def chunks(self, rows: int, wanted: Callable[[int, int], list[tuple[int, int]]]) -> Iterator[Chunk]:
        """Chunks of at most ``rows`` rows holding only the sub-ranges ``wanted(start, end)`` asks for; lines
        outside them are counted, not parsed."""
        pa = require_pyarrow()
        arrow_type = pa.string() if self.id_type == "string" else pa.int64()
        with open(self.path, "rb") as f:
            row, block = 0, []
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                block.append((number, line))
                row += 1
                if len(block) == rows:
                    yield from self._emit(row - len(block), block, wanted, arrow_type)
                    block = []
            if block:
                yield from self._emit(row - len(block), block, wanted, arrow_type)

    def _emit(self, start: int, block: list[tuple[int, bytes]], wanted, arrow_type) -> Iterator[Chunk]:
        pa = require_pyarrow()
        for s, e in wanted(start, start + len(block)):
            ids, texts = [], []
            for row in range(s, e):
                number, line = block[row - start]
                record = self._parse(line, row, number)
                where = f" (line {number})"
                if self._id_kind(record, row, number) != self.id_type:
                    raise BulkInputError(f"row {row}{where}: id {record[self.id_field]!r} is not of the first row's "
                                         f"type ({self.id_type}); ids must be all strings or all integers")
                if self.text_field not in record:
                    raise BulkInputError(f"row {row}{where}: no {self.text_field!r} field (choose it with --text-field)")
                ids.append(record[self.id_field])
                texts.append(_check_text(record[self.text_field], row, where, self.text_field))
            yield Chunk(s, pa.array(ids, type=arrow_type), texts)


class ParquetInput:
    """A Parquet file, read in record batches of the two columns it needs."""

    def __init__(self, path: Path, text_field: str, id_field: str) -> None:
        pa = require_pyarrow()
        self.path, self.text_field, self.id_field = path, text_field, id_field
        self.file = pa.parquet.ParquetFile(path)
        names = self.file.schema_arrow.names
        for name, flag in ((text_field, "--text-field"), (id_field, "--id-field")):
            if name not in names:
                raise BulkInputError(f"input {path} has no column {name!r} (columns: {', '.join(names)}; "
                                     f"choose it with {flag})")
        self.id_type = str(self.file.schema_arrow.field(id_field).type)

    def count_rows(self) -> int:
        return self.file.metadata.num_rows

    def chunks(self, rows: int, wanted: Callable[[int, int], list[tuple[int, int]]]) -> Iterator[Chunk]:
        pa = require_pyarrow()
        pending: list[Any] = []
        held, start = 0, 0

        def emit(table: Any) -> Iterator[Chunk]:
            base = start
            for s, e in wanted(base, base + table.num_rows):
                part = table.slice(s - base, e - s)
                ids = part.column(self.id_field).combine_chunks()
                if ids.null_count:
                    raise BulkInputError(f"row {s + _first_null(ids)}: {self.id_field!r} is null")
                texts = part.column(self.text_field).to_pylist()
                yield Chunk(s, ids, [_check_text(t, s + i, "", self.text_field) for i, t in enumerate(texts)])

        for batch in self.file.iter_batches(batch_size=rows, columns=[self.id_field, self.text_field]):
            pending.append(batch)
            held += batch.num_rows
            while held >= rows:  # re-cut to exactly `rows`, whatever the row groups' sizes
                table = pa.Table.from_batches(pending)
                yield from emit(table.slice(0, rows))
                start += rows
                rest = table.slice(rows)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            yield from emit(pa.Table.from_batches(pending))


def _first_null(array: Any) -> int:
    return next(i for i, v in enumerate(array.is_null().to_pylist()) if v)


def open_input(path: Path, text_field: str, id_field: str) -> JsonlInput | ParquetInput:
    """The reader for ``path`` (JSONL or Parquet, from its suffix).

    Raises:
        BulkInputError: unknown format, no rows, a missing column.
    """
    fmt = input_format(path)
    return JsonlInput(path, text_field, id_field) if fmt == "jsonl" else ParquetInput(path, text_field, id_field)


# --- the output folder -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def locked_output(folder: Path) -> Iterator[None]:
    """Hold ``folder/_lock`` for the run (released by the OS even on SIGKILL).

    Raises:
        BulkError: another run holds it.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BulkError(f"another `tritonembed embed` is writing to {folder}") from exc
        yield


def check_manifest(folder: Path, wanted: dict[str, Any]) -> None:
    """Write ``_job.json`` on the first run; on a rerun check that it matches ``wanted``.

    Raises:
        OutputMismatch: the folder holds another job's output, or files and no manifest.
    """
    path = folder / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if differ:
            detail = "; ".join(f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
            raise OutputMismatch(f"{folder} holds the output of another job ({detail}); use another --output "
                                 f"or remove it")
        return
    foreign = [e.name for e in os.scandir(folder) if e.name not in (LOCK,) and not e.name.startswith(TMP_PREFIX)]
    if foreign:
        raise OutputMismatch(f"{folder} is not empty and holds no {MANIFEST} ({', '.join(sorted(foreign)[:5])}); "
                             f"use an empty or new --output")
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(wanted, indent=2) + "\n"))


def finish_output(folder: Path, total: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Check that ``ranges`` cover exactly ``[0, total)`` and write ``_SUCCESS``.

    Raises:
        OutputMismatch: a part reaches past the input's end (the input shrank) or rows are missing.
    """
    if ranges and ranges[-1][1] > total:
        raise OutputMismatch(f"{folder}: part {part_name(*ranges[-1])} reaches past the input's {total} rows")
    gaps = uncovered(0, total, ranges)
    if gaps:
        raise OutputMismatch(f"{folder}: rows {gaps[:3]} are in no part")
    write_atomic(folder / SUCCESS, lambda tmp: tmp.write_text(json.dumps({"rows": total, "parts": len(ranges)}) + "\n"))


# --- spreading batches over URLs --------------------------------------------------------------------------------------
class Embedder(Protocol):
    """What the job needs from :class:`UrlPool` (tests pass a fake)."""

    async def embed(self, texts: list[str]) -> np.ndarray: ...

    def rows_per_url(self) -> dict[str, int]: ...

    failovers: int

    async def close(self) -> None: ...


@dataclass
class _Backend:
    url: str
    client: AsyncEmbeddingClient
    replica: Replica
    lacks_model: bool = False  # its last answer: the model is not served there


class UrlPool:
    """Batches spread over URLs by :class:`~tritonembed.client.replicas.ReplicaPolicy`: least-loaded first, a
    failed URL rested, its batch retried elsewhere.

    Each URL gets one :class:`AsyncEmbeddingClient` (retries off: a failure moves the batch to another URL at
    once) and at most ``in_flight_per_url`` batches at a time. A URL that fails rests for 0.5 s, doubling per
    consecutive failure up to 10 s, then competes for batches again; one success puts it back in full.
    """

    def __init__(self, urls: Sequence[str], *, model: str | None = None, dimensions: int | None = None,
                 input_type: str | None = None, in_flight_per_url: int = 2, deadline: float = 120.0,
                 timeout: float = 60.0, protocol: str | None = None) -> None:
        self.dimensions, self.input_type = dimensions, input_type
        self.in_flight_per_url, self.deadline = in_flight_per_url, deadline
        self.policy = ReplicaPolicy(list(urls))
        self.backends = [_Backend(r.address, AsyncEmbeddingClient(r.address, model, protocol=protocol, timeout=timeout,
                                                                  max_concurrency=1, retry=RetryPolicy(max_retries=0)),
                                  r)
                         for r in self.policy.replicas]
        self.failovers = 0
        self._last_success = time.monotonic()
        self._changed: asyncio.Condition | None = None

    def rows_per_url(self) -> dict[str, int]:
        return {b.url: b.replica.rows for b in sorted(self.backends, key=lambda b: b.url)}

    async def close(self) -> None:
        for b in self.backends:
            await b.client.close()

    def _check_deadline(self, now: float) -> None:
        if self.policy.all_failing() and now - self._last_success > self.deadline:
            errors = "; ".join(f"{b.url}: {b.replica.last_error}" for b in self.backends)
            raise AllUrlsDown(f"no URL answered for {self.deadline:.0f} s ({errors}); the parts written so far are "
                              f"kept: run the same command again to continue")

    async def _acquire(self) -> _Backend:
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            while True:
                now = time.monotonic()
                # a rested URL competes like the others (ties round-robin): that first batch is how it rejoins
                best = self.policy.choose(now, capacity=self.in_flight_per_url, fallback=False)
                if best is not None:
                    self.policy.start(best)
                    return self.backends[best.index]
                self._check_deadline(now)
                rest_end = self.policy.next_rest_end(now)
                wait = rest_end - now if rest_end is not None else self.deadline
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(0.01, min(wait, 1.0)))

    async def _release(self, backend: _Backend, error: str | None, rows: int) -> bool:
        assert self._changed is not None
        async with self._changed:
            came_back = self.policy.finish(backend.replica, time.monotonic(), error=error, rows=rows)
            self._changed.notify_all()
            return came_back

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embed one batch on the best URL, moving to another on failure.

        Raises:
            AllUrlsDown: every URL failed and none answered for ``deadline`` seconds.
            BulkError: every URL answered that it does not serve the model.
            InvalidArgument: the server (or the client) refused the texts or the arguments; retrying elsewhere
                cannot help. ``param`` names the batch index (``texts[3]``) when the server said which text.
        """
        tried_elsewhere = False
        while True:
            backend = await self._acquire()
            try:
                vectors = await backend.client.embed(texts, dimensions=self.dimensions, input_type=self.input_type)
            except InvalidArgument:
                await self._release(backend, None, 0)
                raise
            except EmbeddingError as error:  # down, overloaded, timed out, model not loaded yet: try another
                await self._release(backend, f"{type(error).__name__}: {error}", 0)
                backend.lacks_model = isinstance(error, ModelNotFound)
                if all(b.lacks_model for b in self.backends):  # a wrong --model, not an outage: no point waiting
                    raise BulkError("no URL serves the model: " + "; ".join(f"{b.url}: {b.replica.last_error}"
                                                                            for b in self.backends)) from error
                logger.warning("%s failed a batch of %d (%s); retrying it on another URL", backend.url, len(texts),
                               backend.replica.last_error)
                if not tried_elsewhere:
                    self.failovers += 1
                    tried_elsewhere = True
                self._check_deadline(time.monotonic())
                continue
            except BaseException:
                await self._release(backend, None, 0)
                raise
            backend.lacks_model = False
            if await self._release(backend, None, len(texts)):
                logger.info("%s answers again", backend.url)
            self._last_success = time.monotonic()
            return vectors


# --- the local engine --------------------------------------------------------------------------------------------------
def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of similar UTF-8 length (the server pads a batch to its longest text)."""
    order = np.argsort([-len(t.encode("utf-8", "surrogatepass")) for t in texts], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


async def _embed_chunk(chunk: Chunk, embedder: Embedder, batch_size: int) -> np.ndarray:
    batches = length_sorted_batches(chunk.texts, batch_size)

    async def one(rows: np.ndarray) -> np.ndarray:
        try:
            return await embedder.embed([chunk.texts[i] for i in rows])
        except InvalidArgument as error:
            m = re.fullmatch(r"texts\[(\d+)\]", error.param or "")
            row = f"row {chunk.start + int(rows[int(m.group(1))])}: " if m else ""
            raise BulkInputError(f"{row}{error}") from error

    parts = await asyncio.gather(*(one(rows) for rows in batches))
    out = np.empty((len(chunk.texts), parts[0].shape[1]), dtype=np.float32)
    for rows, vectors in zip(batches, parts):
        out[rows] = vectors
    return out


def _progress_bar(job: BulkJob, total: int | None, initial: int) -> Any:
    if not job.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; the summary line still comes
        logger.info("tqdm is not installed: no progress bar (pip install 'tritonembed[bulk]')")
        return None
    return tqdm(total=total, initial=initial, unit="rows", unit_scale=True, file=sys.stderr, mininterval=1.0,
                smoothing=0.1, desc="embedding")


async def _run_local(job: BulkJob, source: JsonlInput | ParquetInput, covered: list[tuple[int, int]],
                     embedder: Embedder, bar: Any) -> tuple[int, int]:
    """Embed every row no part covers; returns (rows embedded, parts written)."""
    slots = asyncio.Semaphore(job.max_parts_in_flight)
    tasks: set[asyncio.Task] = set()
    done = {"rows": 0, "parts": 0}

    async def process(chunk: Chunk) -> None:
        try:
            vectors = await _embed_chunk(chunk, embedder, job.batch_size)
            await asyncio.to_thread(write_part, job.output, chunk.start, chunk.ids, vectors)
            done["rows"] += len(chunk.texts)
            done["parts"] += 1
            if bar is not None:
                bar.update(len(chunk.texts))
        finally:
            slots.release()

    def forget_if_ok(task: asyncio.Task) -> None:  # failed tasks stay in the set, to be raised below
        if not task.cancelled() and task.exception() is None:
            tasks.discard(task)

    chunks = source.chunks(job.part_rows, lambda s, e: uncovered(s, e, covered))
    try:
        while True:
            await slots.acquire()  # bounded memory: read a chunk only when a part slot is free
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                slots.release()
                break
            task = asyncio.create_task(process(chunk))
            tasks.add(task)
            task.add_done_callback(forget_if_ok)
            failed = [t for t in list(tasks) if t.done() and t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return done["rows"], done["parts"]


def prepare_output(job: BulkJob, source: JsonlInput | ParquetInput, engine: str) -> None:
    """Create the output folder and check or write its manifest (call with the lock held)."""
    wanted = {"version": MANIFEST_VERSION, "engine": engine, "input": fingerprint(job.input),
              "id_type": source.id_type, **job.vector_arguments()}
    check_manifest(job.output, wanted)


def run_local_job(job: BulkJob, embedder: Embedder | None = None) -> BulkReport:
    """Run (or continue) ``job`` in this process. ``embedder`` defaults to a :class:`UrlPool` over ``job.urls``.

    Raises:
        BulkInputError: the input is malformed (the message names the row).
        OutputMismatch: the output folder holds another job's output.
        AllUrlsDown: no URL answered before the deadline (rerun to continue).
        BulkError: another run holds the output folder.
    """
    started = time.monotonic()
    source = open_input(job.input, job.text_field, job.id_field)
    with locked_output(job.output):
        prepare_output(job, source, "local")
        covered = scan_parts(job.output)
        total = source.count_rows()
        already = sum(e - s for s, e in covered if e <= total)
        pool = embedder or UrlPool(job.urls, model=job.model, dimensions=job.dimensions, input_type=job.input_type,
                                   in_flight_per_url=job.in_flight_per_url, deadline=job.deadline,
                                   timeout=job.timeout, protocol=job.protocol)
        bar = _progress_bar(job, total, already)

        async def main() -> tuple[int, int]:
            try:
                return await _run_local(job, source, covered, pool, bar)
            finally:
                await pool.close()

        try:
            rows, parts = asyncio.run(main())
        finally:
            if bar is not None:
                bar.close()
        finish_output(job.output, total, scan_parts(job.output))
    return BulkReport(output=str(job.output), rows_total=total, rows_embedded=rows, rows_already_done=already,
                      parts_written=parts, seconds=time.monotonic() - started, rows_per_url=pool.rows_per_url(),
                      failovers=pool.failovers)


def read_output(folder: Path) -> Any:
    """The whole output of the local engine as one arrow table (``id``, ``embedding``), parts in row order.
    For checks and tests: it holds the corpus in memory.

    Raises:
        BulkError: the folder holds no part.
    """
    pa = require_pyarrow()
    parts = sorted((parse_part_name(p.name), p) for p in folder.iterdir() if parse_part_name(p.name))
    if not parts:
        raise BulkError(f"{folder} holds no part")
    return pa.concat_tables([pa.parquet.read_table(p) for _, p in parts])


__all__ = [
    "AllUrlsDown",
    "BulkError",
    "BulkInputError",
    "BulkJob",
    "BulkReport",
    "OutputMismatch",
    "UrlPool",
    "parse_part_name",
    "part_name",
    "read_output",
    "run_local_job",
    "scan_parts",
    "uncovered",
    "write_part",
]
