"""What the benchmark reads from the machine: process-tree memory, load average, CPU description."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

from tritonembed.benchmarks.stats import descendants, parse_proc_stat_ppid, parse_proc_status

log = logging.getLogger(__name__)


def process_parents() -> dict[int, int]:
    """pid -> ppid of every process visible in /proc (processes that vanish meanwhile are skipped)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = parse_proc_stat_ppid((entry / "stat").read_text())
        except (OSError, ValueError):
            continue
    return parents


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants now (0 when it is gone)."""
    total = 0
    for pid in descendants(process_parents(), root):
        try:
            total += parse_proc_status(Path(f"/proc/{pid}/status").read_text()).get("VmRSS", 0)
        except OSError:
            continue
    return total


def own_peak_rss_bytes() -> int:
    """This process's high-water mark of resident memory (VmHWM)."""
    return parse_proc_status(Path("/proc/self/status").read_text()).get("VmHWM", 0)


class RssSampler:
    """Samples the resident memory of a process tree in a thread; ``peak_bytes`` is the largest sum seen.

    Sampling (not VmHWM) because the tree's processes peak at different moments.
    """

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = tree_rss_bytes(self.root_pid)
        self.peak_bytes = max(self.peak_bytes, rss)
        self.samples += 1
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()
        return self.peak_bytes

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_description() -> dict[str, object]:
    """CPU model, cores, memory and OS, plus the raw ``lscpu`` output where available."""
    info: dict[str, object] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                               "python": platform.python_version()}
    try:
        meminfo = parse_proc_status(Path("/proc/meminfo").read_text())
        info["mem_total_gib"] = round(meminfo.get("MemTotal", 0) / 2**30, 1)
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["lscpu"] = lscpu
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L3 cache",
                               "Flags"):
                info[key.strip()] = value.strip() if key.strip() != "Flags" else " ".join(
                    f for f in value.split() if f.startswith(("avx", "amx", "fma", "vnni")))
    except (OSError, subprocess.SubprocessError):
        log.info("lscpu unavailable")
    return info


def wait_for_quiet(max_load: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until the 1-minute load average is at most ``max_load``; returns it."""
    deadline = time.monotonic() + timeout
    load = load_average()[0]
    while load > max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = load_average()[0]
    return load
