"""The bulk job's checkpoint: part names, ranges, torn writes, SIGKILL at chosen moments, manifest checks.

The embedder is a deterministic fake (a vector from the text's hash) so these tests need no server; the
integration test (tests/integration/test_bulk_embed.py) runs the same job against real tritonservers.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tritonembed.client import bulk
from tritonembed.client.bulk import (
    BulkError,
    BulkInputError,
    BulkJob,
    OutputMismatch,
    parse_part_name,
    part_name,
    read_output,
    run_local_job,
    scan_parts,
    uncovered,
)

REPO = Path(__file__).resolve().parents[2]
DIM = 8


def fake_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEmbedder:
    """Stands in for UrlPool: the same interface, vectors from the text alone."""

    def __init__(self) -> None:
        self.failovers = 0
        self.rows = 0

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.rows += len(texts)
        return np.stack([fake_vector(t) for t in texts])

    def rows_per_url(self) -> dict[str, int]:
        return {"fake": self.rows}

    async def close(self) -> None:
        pass


def write_jsonl(path: Path, n: int, *, id_of=lambda i: f"doc-{i}") -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": id_of(i), "text": f"sentence number {i} " + "x" * (i % 13)}) + "\n")
            if i % 97 == 0:
                f.write("\n")  # blank lines are not rows
    return path


def job(tmp_path: Path, source: Path, **kw) -> BulkJob:
    kw.setdefault("part_rows", 100)
    kw.setdefault("batch_size", 16)
    return BulkJob(input=source, output=tmp_path / "out", urls=["fake:1"], progress=False, **kw)


def check_exactly_once(out: Path, n: int) -> None:
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert ids == [f"doc-{i}" for i in range(n)], "each row once, in input order"
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    texts = [f"sentence number {i} " + "x" * (i % 13) for i in range(n)]
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t) for t in texts]), rtol=0, atol=0)
    assert (out / bulk.SUCCESS).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(bulk.TMP_PREFIX)]


# --- names and ranges -----------------------------------------------------------------------------------------------
def test_part_names_round_trip_and_sort_by_start():
    assert part_name(0, 4096) == "part-000000000000-000000004096.parquet"
    assert parse_part_name(part_name(123, 456)) == (123, 456)
    names = [part_name(s, s + 10) for s in (1000, 20, 300)]
    assert [parse_part_name(n)[0] for n in sorted(names)] == [20, 300, 1000]
    for other in ("part-1-2.parquet", "_job.json", ".tmp-part-000000000000-000000000010.parquet-1-ab",
                  "part-000000000010-000000000010.parquet", "part-000000000000-000000000010.parquet.tmp"):
        assert parse_part_name(other) is None, other
    with pytest.raises(ValueError):
        part_name(5, 5)


@pytest.mark.parametrize(("covered", "expected"), [
    ([], [(0, 100)]),
    ([(0, 100)], []),
    ([(0, 30), (60, 100)], [(30, 60)]),
    ([(10, 20), (40, 50)], [(0, 10), (20, 40), (50, 100)]),
    ([(-50, 5), (95, 200)], [(5, 95)]),
    ([(200, 300)], [(0, 100)]),
])
def test_uncovered(covered, expected):
    assert uncovered(0, 100, covered) == expected


# --- torn and leftover files ------------------------------------------------------------------------------------------
def test_scan_removes_temp_files_and_torn_parts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ids = pa.array([f"doc-{i}" for i in range(10)])
    bulk.write_part(out, 0, ids, np.ones((10, DIM), np.float32))
    bulk.write_part(out, 10, ids, np.ones((10, DIM), np.float32))
    good = (out / part_name(10, 20)).read_bytes()
    (out / part_name(20, 30)).write_bytes(good[: len(good) // 2])  # a part cut short (crash before data hit disk)
    (out / part_name(30, 40)).write_bytes(good)  # 10 rows, as its name says: kept
    (out / part_name(40, 55)).write_bytes(good)  # 10 rows under a 15-row name: torn
    (out / f"{bulk.TMP_PREFIX}{part_name(55, 65)}-123-abcd").write_bytes(good[:100])
    assert scan_parts(out) == [(0, 10), (10, 20), (30, 40)]
    assert sorted(p.name for p in out.iterdir()) == [part_name(0, 10), part_name(10, 20), part_name(30, 40)]


def test_scan_refuses_overlapping_parts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bulk.write_part(out, 0, pa.array(list("abcd")), np.ones((4, DIM), np.float32))
    bulk.write_part(out, 2, pa.array(list("cdef")), np.ones((4, DIM), np.float32))
    with pytest.raises(OutputMismatch, match="overlap"):
        scan_parts(out)


# --- the whole job with the fake embedder -------------------------------------------------------------------------------
def test_job_writes_each_row_once_and_a_rerun_does_nothing(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", 1050)
    fake = FakeEmbedder()
    report = run_local_job(job(tmp_path, source), fake)
    assert (report.rows_total, report.rows_embedded, report.rows_already_done, report.parts_written) == (1050, 1050, 0, 11)
    check_exactly_once(tmp_path / "out", 1050)
    assert pq.read_table(tmp_path / "out").schema.field("embedding").type == pa.list_(pa.float32())
    again = run_local_job(job(tmp_path, source), FakeEmbedder())
    assert (again.rows_embedded, again.rows_already_done, again.parts_written) == (0, 1050, 0)
    check_exactly_once(tmp_path / "out", 1050)


def test_rerun_fills_only_the_missing_ranges(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", 1000)
    run_local_job(job(tmp_path, source), FakeEmbedder())
    out = tmp_path / "out"
    for name in (part_name(300, 400), part_name(900, 1000)):
        (out / name).unlink()
    (out / bulk.SUCCESS).unlink()
    kept = {p.name: p.stat().st_ino for p in out.iterdir() if parse_part_name(p.name)}
    fake = FakeEmbedder()
    report = run_local_job(job(tmp_path, source, part_rows=64), fake)  # another part size: ranges, not indices
    assert fake.rows == 200 and report.rows_already_done == 800
    check_exactly_once(out, 1000)
    assert all((out / n).stat().st_ino == ino for n, ino in kept.items()), "finished parts are left alone"
    new = sorted(parse_part_name(p.name) for p in out.iterdir() if parse_part_name(p.name) and p.name not in kept)
    assert new == [(300, 320), (320, 384), (384, 400), (900, 960), (960, 1000)]  # the gaps, cut at multiples of 64


CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import pyarrow.parquet as pq
from tritonembed.client import bulk
from tests.unit.test_bulk_resume import FakeEmbedder
where, k = sys.argv[1], int(sys.argv[2])
count = {{"n": 0}}
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_write, real_fsync_dir = os.replace, pq.write_table, bulk._fsync_dir
def replace(src, dst):
    is_part = bulk.parse_part_name(Path(dst).name) is not None
    if is_part:
        count["n"] += 1
    if where == "before-rename" and is_part and count["n"] == k:
        kill()
    if where == "before-success" and Path(dst).name == bulk.SUCCESS:
        kill()
    real_replace(src, dst)
    if where == "after-rename" and is_part and count["n"] == k:
        kill()
def write_table(table, path, **kw):
    if where == "mid-write" and count["n"] == k - 1:
        real_write(table, path, **kw)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        kill()
    real_write(table, path, **kw)
bulk.os.replace, pq.write_table = replace, write_table
job = bulk.BulkJob(input=Path(sys.argv[3]), output=Path(sys.argv[4]), urls=["fake:1"], part_rows=100,
                   batch_size=16, progress=False, max_parts_in_flight=1)
bulk.run_local_job(job, FakeEmbedder())
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename", "after-rename", "before-success"])
def test_sigkill_at_any_step_then_rerun_gives_each_row_once(tmp_path, where):
    source = write_jsonl(tmp_path / "in.jsonl", 700)
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), where, "4", str(source), str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (out / bulk.SUCCESS).exists()
    left = sorted(p.name for p in out.iterdir())
    if where in ("mid-write", "before-rename"):
        assert any(n.startswith(bulk.TMP_PREFIX) for n in left), left  # the torn temp file a real kill leaves
    fake = FakeEmbedder()
    report = run_local_job(job(tmp_path, source), fake)
    done_before = {"mid-write": 300, "before-rename": 300, "after-rename": 400, "before-success": 700}[where]
    assert report.rows_already_done == done_before and fake.rows == 700 - done_before
    check_exactly_once(out, 700)


# --- what the job refuses ------------------------------------------------------------------------------------------------
def test_duplicate_ids_are_kept_by_position(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", 250, id_of=lambda i: f"doc-{i % 200}")
    run_local_job(job(tmp_path, source), FakeEmbedder())
    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert len(ids) == 250 and ids[200:] == [f"doc-{i}" for i in range(50)]


def test_rerun_with_other_arguments_or_input_is_refused(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", 120)
    run_local_job(job(tmp_path, source), FakeEmbedder())
    with pytest.raises(OutputMismatch, match="dimensions"):
        run_local_job(job(tmp_path, source, dimensions=4), FakeEmbedder())
    write_jsonl(source, 121)
    with pytest.raises(OutputMismatch, match="input"):
        run_local_job(job(tmp_path, source), FakeEmbedder())


def test_a_folder_that_is_not_a_jobs_output_is_refused(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", 10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputMismatch, match="notes.txt"):
        run_local_job(job(tmp_path, source), FakeEmbedder())


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", 10)
    with bulk.locked_output(tmp_path / "out"), pytest.raises(BulkError, match="another"):
        run_local_job(job(tmp_path, source), FakeEmbedder())


@pytest.mark.parametrize(("line", "message"), [
    ({"id": "a", "text": "  \u200b "}, r"row 2 \(line 3\): 'text' is blank"),
    ({"id": "a"}, r"row 2 \(line 3\): no 'text' field"),
    ({"text": "hello"}, r"row 2 \(line 3\): no 'id' field"),
    ({"id": 7, "text": "hello"}, r"row 2 \(line 3\): id 7 is not of the first row's type"),
    ({"id": "a", "text": 5}, r"row 2 \(line 3\): 'text' is int"),
])
def test_bad_rows_are_named(tmp_path, line, message):
    source = tmp_path / "in.jsonl"
    rows = [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}, line]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(BulkInputError, match=message):
        run_local_job(job(tmp_path, source), FakeEmbedder())


def test_parquet_input_keeps_the_id_type_and_recuts_row_groups(tmp_path):
    n = 530
    table = pa.table({"id": pa.array(range(1000, 1000 + n), pa.int64()),
                      "body": [f"sentence number {i}" for i in range(n)]})
    source = tmp_path / "in.parquet"
    pq.write_table(table, source, row_group_size=77)
    report = run_local_job(job(tmp_path, source, text_field="body"), FakeEmbedder())
    assert report.parts_written == 6
    out = read_output(tmp_path / "out")
    assert out.schema.field("id").type == pa.int64()
    assert out.column("id").to_pylist() == list(range(1000, 1000 + n))
    assert max(p.name for p in (tmp_path / "out").glob("part-*")) == part_name(500, 530)
    with pytest.raises(BulkInputError, match="no column 'text'"):
        run_local_job(job(tmp_path, source), FakeEmbedder())


def test_unknown_input_format_is_refused(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("id,text\n1,a\n")
    with pytest.raises(BulkInputError, match="unknown format"):
        run_local_job(job(tmp_path, source), FakeEmbedder())
