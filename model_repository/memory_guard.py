"""The encoder's memory guard: above a threshold of its limit, new work is shed with a retryable error.

The reading is the memory the encoder competes for: on GPU the device's used memory (NVML, ``nvidia-ml-py``,
optional), on CPU the cgroup v2 usage (``memory.current`` against ``memory.max``) or, outside a limited cgroup,
the host's ``MemTotal - MemAvailable``. The limit is ``min(device / cgroup / physical limit, configured limit)``;
the configured limit is re-read from an operator's file (``memory_limit_file``: bytes, or a number with a
``K``/``M``/``G`` suffix; empty or absent = none), so it can be lowered at runtime without a restart. Readings are
cached for :data:`READING_TTL_S` so a burst of execute() calls costs one read. Usage is always measured, never
taken from configuration.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.9
READING_TTL_S = 0.1
CGROUP_DIR = Path("/sys/fs/cgroup")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int | None:
    """Bytes from ``"4294967296"``, ``"4G"``, ``"4GiB"``, ``"512M"``; None for an empty text.

    Raises:
        ValueError: anything else.
    """
    if not text.strip():
        return None
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text.strip()!r} (bytes, or a number with K/M/G/T)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from ``/proc/meminfo``.

    Raises:
        OSError: the file cannot be read.
    """
    values: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


def cgroup_memory(directory: Path = CGROUP_DIR) -> tuple[int, int] | None:
    """(memory.current, memory.max) of this process's cgroup v2, or None without a limit or a cgroup v2."""
    try:
        limit = (directory / "memory.max").read_text().strip()
        current = int((directory / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return current, int(limit)


@dataclass(frozen=True)
class MemoryReading:
    """One measurement: ``used`` of ``limit`` bytes, and where they came from."""

    used: int
    limit: int
    source: str  # "gpu:N", "cgroup" or "host", "+ configured" when the file's limit is the lower one

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit > 0 else float("inf")

    def describe(self) -> str:
        return f"{self.used / 1024**3:.2f} GiB used of a {self.limit / 1024**3:.2f} GiB limit ({self.source})"


def gpu_reader(device_id: int) -> Callable[[], tuple[int, int] | None]:
    """A reader of (used, total) bytes of CUDA device ``device_id`` via NVML; it returns None where NVML is missing."""
    state: dict[str, object] = {}

    def read() -> tuple[int, int] | None:
        if "handle" not in state:
            try:
                import pynvml

                pynvml.nvmlInit()
                state["handle"], state["nvml"] = pynvml.nvmlDeviceGetHandleByIndex(device_id), pynvml
            except Exception as exc:  # optional: no nvidia-ml-py, or no driver; the host reading still applies
                log.warning("memory guard: no NVML reading for GPU %d (%s); watching host memory only", device_id, exc)
                state["handle"] = None
        if state["handle"] is None:
            return None
        info = state["nvml"].nvmlDeviceGetMemoryInfo(state["handle"])  # type: ignore[attr-defined]
        return int(info.used), int(info.total)

    return read


def host_reader(cgroup_dir: Path = CGROUP_DIR) -> Callable[[], tuple[int, int, str]]:
    """A reader of (used, limit, source) for this process on the host: its cgroup v2 when limited, else the host."""

    def read() -> tuple[int, int, str]:
        cgroup = cgroup_memory(cgroup_dir)
        if cgroup is not None:
            return cgroup[0], cgroup[1], "cgroup"
        total, available = meminfo()
        return total - available, total, "host"

    return read


class MemoryGuard:
    """Says whether new work should be shed: the latest reading at or above ``threshold`` of its limit.

    Raises:
        ValueError: a threshold outside (0, 1].
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, *, limit_file: str | Path | None = None,
                 device: str = "cpu", device_id: int = 0, ttl_s: float = READING_TTL_S,
                 clock: Callable[[], float] = time.monotonic, cgroup_dir: Path = CGROUP_DIR) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"memory threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.limit_file = Path(limit_file) if limit_file else None
        self._host = host_reader(cgroup_dir)
        self._gpu = gpu_reader(device_id) if device == "cuda" else None
        self._device_id = device_id
        self._ttl = ttl_s
        self._clock = clock
        self._cached: tuple[float, MemoryReading] | None = None
        self._bad_file: str | None = None

    def configured_limit(self) -> int | None:
        """The limit in :attr:`limit_file` now (None: no file, empty, or unreadable -- logged once)."""
        if self.limit_file is None:
            return None
        try:
            value = parse_size(self.limit_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if str(exc) != self._bad_file:  # once per distinct problem, not once per execute
                log.warning("memory guard: ignoring %s: %s", self.limit_file, exc)
                self._bad_file = str(exc)
            return None
        self._bad_file = None
        return value

    def reading(self) -> MemoryReading:
        """The current reading, at most ``ttl_s`` old.

        Raises:
            OSError: host memory cannot be read (not Linux).
        """
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < self._ttl:
            return self._cached[1]
        gpu = self._gpu() if self._gpu is not None else None
        if gpu is not None:
            used, limit, source = gpu[0], gpu[1], f"gpu:{self._device_id}"
        else:
            used, limit, source = self._host()
        configured = self.configured_limit()
        if configured is not None and configured < limit:
            limit, source = configured, f"{source} + configured"
        reading = MemoryReading(used, limit, source)
        self._cached = (now, reading)
        return reading

    def over(self) -> MemoryReading | None:
        """The reading when it is at or above the threshold (shed new work), else None."""
        reading = self.reading()
        return reading if reading.fraction >= self.threshold else None
