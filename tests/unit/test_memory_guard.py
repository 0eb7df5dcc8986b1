"""The memory guard on this machine's real readings; only the configured limit (a file) is moved."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonembed.model_repository.memory_guard import MemoryGuard, cgroup_memory, meminfo, parse_size


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("text", "expected"), [("4096", 4096), ("4G", 4 * 1024**3), ("4GiB", 4 * 1024**3),
                                                ("512m", 512 * 1024**2), (" 1.5K\n", 1536), ("", None)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("half of it")


def test_reading_is_the_host_or_cgroup_usage_and_the_limit_follows_the_file(tmp_path: Path):
    limit_file = tmp_path / "limit"
    clock = Clock()
    guard = MemoryGuard(0.9, limit_file=limit_file, clock=clock)
    first = guard.reading()
    total, _ = meminfo()
    assert 0 < first.used <= first.limit <= total and "configured" not in first.source
    assert guard.over() is None or first.fraction >= 0.9  # the real machine decides, nothing is faked

    limit_file.write_text("1M")  # below any real usage: shed
    clock.now += 1.0
    low = guard.over()
    assert low is not None and low.limit == 1024**2 and low.source.endswith("+ configured")

    limit_file.write_text(str(100 * total))  # above the physical limit: the physical one applies again
    assert guard.over() is low  # cached for READING_TTL_S: no re-read inside a burst
    clock.now += 1.0
    assert guard.reading().limit == first.limit


def test_a_bad_limit_file_is_ignored_not_fatal(tmp_path: Path, caplog):
    limit_file = tmp_path / "limit"
    limit_file.write_text("a lot")
    guard = MemoryGuard(0.9, limit_file=limit_file, ttl_s=0)
    assert guard.configured_limit() is None
    assert "ignoring" in caplog.text
    assert guard.reading().limit > 1024**2


def test_cgroup_reading_needs_a_limit(tmp_path: Path):
    assert cgroup_memory(tmp_path) is None  # no cgroup v2 files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cgroup_memory(tmp_path) is None  # unlimited
    (tmp_path / "memory.max").write_text("4000\n")
    assert cgroup_memory(tmp_path) == (1000, 4000)  # the file format; the guard itself reads the real cgroup


def test_threshold_is_checked():
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            MemoryGuard(bad)
