"""Keep a ``tritonserver`` running: restart it when it dies, clean up what a dead one leaves behind.

Three pieces, each usable alone:

- :class:`RestartPolicy`: pure bookkeeping of crashes -> the delay before the next restart (exponential
  backoff) or ``None`` once ``max_restarts`` restarts happened within ``window_s`` seconds.
- :class:`ProcessGroup`: the processes of one server (it starts with ``start_new_session=True``, so its
  Python-backend stubs share its process group) and the shared-memory regions they map in ``/dev/shm``;
  :meth:`ProcessGroup.reap` kills what is left (SIGTERM, then SIGKILL: stubs may ignore SIGTERM) and removes
  those regions, and only those: the names come from this group's own ``/proc/PID/maps``, never a glob.
- :class:`Supervisor`: waits for the server to die, reaps it, keeps its log and restarts it on the same
  ports per the policy; raises :class:`SupervisorGaveUp` with the tail of the last crash's log.

Linux only (``/proc``), like the ``tritonserver`` it supervises.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tritonembed.errors import LaunchError

if TYPE_CHECKING:
    from tritonembed.launcher import TritonServer

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# The Python backend names each stub's region triton_python_backend_shm_region_<uuid> (tritonserver 2.51).
SHM_PREFIX = "triton_python_backend_shm_region"


class SupervisorGaveUp(LaunchError):
    """tritonserver kept dying: more restarts within the window than the policy allows."""


class RestartPolicy:
    """When to restart a crashed server: exponential backoff and a cap on restarts per window.

    The n-th restart within the last ``window_s`` seconds waits ``backoff_s * 2**(n-1)`` seconds (at most
    ``max_backoff_s``); when ``max_restarts`` restarts already happened within the window, :meth:`on_crash`
    returns ``None``: give up. Crashes older than the window are forgotten, so a server that runs for a
    while starts again from ``backoff_s``. Time is passed in (``time.monotonic()`` values) so this is pure.

    Raises (on construction):
        ValueError: a negative count or a non-positive window / negative backoff.
    """

    def __init__(self, max_restarts: int = 5, window_s: float = 60.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        if max_restarts < 0 or window_s <= 0 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError(f"invalid restart policy: max_restarts={max_restarts}, window_s={window_s}, "
                             f"backoff_s={backoff_s}, max_backoff_s={max_backoff_s}")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._restarts: deque[float] = deque()

    def recent_restarts(self, now: float) -> int:
        """Restarts granted within ``window_s`` seconds before ``now``."""
        while self._restarts and self._restarts[0] <= now - self.window_s:
            self._restarts.popleft()
        return len(self._restarts)

    def on_crash(self, now: float) -> float | None:
        """A crash at ``now``: the seconds to wait before restarting, or ``None`` when the cap is reached."""
        recent = self.recent_restarts(now)
        if recent >= self.max_restarts:
            return None
        self._restarts.append(now)
        return min(self.max_backoff_s, self.backoff_s * 2 ** recent)


def rotate_logs(path: Path, keep: int) -> None:
    """Shift ``path`` -> ``path.1`` -> ``path.2`` ...; the oldest beyond ``keep`` old logs is deleted.

    ``keep`` = 0 keeps no old log. Missing files are skipped; the caller then writes a fresh ``path``.
    """
    path = Path(path)
    if keep <= 0:
        path.unlink(missing_ok=True)
        return
    path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.rename(path.with_name(f"{path.name}.{n + 1}"))
    if path.exists():
        path.rename(path.with_name(f"{path.name}.1"))


def _stat_fields(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, session) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name in parentheses may hold spaces; the fields after the last ')' do not.
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return rest[0], int(rest[2]), int(rest[3])


def shm_regions_of(pid: int) -> set[str]:
    """Names of the Python-backend shared-memory regions in ``/dev/shm`` that ``pid`` maps (or is told of).

    Reads ``/proc/PID/maps`` and, for stubs, their command line (the region name is an argument).
    Returns an empty set for a process that is gone or not readable.
    """
    names: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith(f"{SHM_DIR}/{SHM_PREFIX}") and not path.endswith(" (deleted)"):
                    names.add(path[len(str(SHM_DIR)) + 1:])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            for arg in f.read().split(b"\0"):
                name = arg.decode(errors="replace").lstrip("/")
                if name.startswith(SHM_PREFIX) and "/" not in name:
                    names.add(name)
    except OSError:
        pass
    return names


@dataclass
class ReapReport:
    """What :meth:`ProcessGroup.reap` found and did."""

    terminated: list[int] = field(default_factory=list)  # exited after SIGTERM
    killed: list[int] = field(default_factory=list)  # needed SIGKILL
    removed_shm: list[str] = field(default_factory=list)
    failed_shm: list[str] = field(default_factory=list)  # could not be removed (reason logged)

    def __str__(self) -> str:
        return (f"{len(self.terminated)} process(es) stopped by SIGTERM {self.terminated}, "
                f"{len(self.killed)} by SIGKILL {self.killed}, {len(self.removed_shm)} /dev/shm region(s) removed")


class ProcessGroup:
    """The processes of one server's process group / session (``pgid`` = the server's pid) and their shm.

    :meth:`remember_shm` records the regions the group maps while it runs (the main server maps every
    stub's region), so they can be removed after a crash even when no stub is left to read them from.
    """

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.shm: set[str] = set()

    def pids(self) -> list[int]:
        """Live (non-zombie) processes whose process group or session is ``pgid``."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z" and self.pgid in (fields[1], fields[2]):
                found.append(int(entry))
        return sorted(found)

    def remember_shm(self) -> set[str]:
        """Add the regions every live member maps to :attr:`shm`; returns :attr:`shm`."""
        for pid in self.pids():
            self.shm |= shm_regions_of(pid)
        return self.shm

    def reap(self, grace_s: float = 3.0) -> ReapReport:
        """Stop every process left in the group (SIGTERM, SIGKILL after ``grace_s``), then remove its shm.

        Never raises for processes or files that vanish meanwhile; a region that cannot be removed is
        logged and listed in :attr:`ReapReport.failed_shm`.
        """
        report = ReapReport()
        pids = self.pids()
        for pid in pids:
            self.shm |= shm_regions_of(pid)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        alive = set(pids)
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive &= set(self.pids())
        report.terminated = sorted(set(pids) - alive)
        for pid in sorted(alive):
            log.warning("process %d of the dead tritonserver ignored SIGTERM for %.0fs: SIGKILL", pid, grace_s)
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive &= set(self.pids())
        report.killed = sorted(set(pids) - set(report.terminated))
        if alive:
            log.error("processes %s of tritonserver group %d survived SIGKILL", sorted(alive), self.pgid)
        for name in sorted(self.shm):
            try:
                (SHM_DIR / name).unlink()
                report.removed_shm.append(name)
            except FileNotFoundError:
                pass  # its owner unlinked it on a clean exit
            except OSError as exc:
                log.error("cannot remove %s: %s", SHM_DIR / name, exc)
                report.failed_shm.append(name)
        self.shm.clear()
        return report


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def describe_exit(returncode: int | None) -> str:
    """``code 3`` / ``signal SIGKILL`` (Popen reports a signal as a negative code)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


@dataclass(frozen=True)
class Crash:
    """One death of the server: how it ended and the end of its own log (read before any restart)."""

    pid: int
    how: str
    log_file: Path
    log_tail: str


class Supervisor:
    """Restart ``server`` on its ports whenever it dies, per ``policy``; blocks in :meth:`run`.

    ``sleep`` and ``clock`` are injectable for tests. Signals (SIGTERM/SIGINT handlers that raise) interrupt
    :meth:`run` wherever it waits; the caller then stops the server as usual.
    """

    def __init__(self, server: TritonServer, policy: RestartPolicy, *, poll_s: float = 0.5,
                 shm_refresh_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.policy = policy
        self.poll_s = poll_s
        self.shm_refresh_s = shm_refresh_s
        self._sleep = sleep
        self._clock = clock
        self.crashes: list[Crash] = []
        self.restarts = 0

    def run(self) -> None:
        """Watch forever; returns never.

        Raises:
            SupervisorGaveUp: the server died more often than the policy allows; the message holds the last
                crash's exit status, log file and log tail.
        """
        while True:
            self._wait_for_exit()
            crash = self._reap("exited", describe_exit(self.server.process.returncode))
            while True:
                delay = self.policy.on_crash(self._clock())
                if delay is None:
                    raise SupervisorGaveUp(
                        f"tritonserver died {len(self.crashes)} time(s), {self.policy.max_restarts} restart(s) "
                        f"within {self.policy.window_s:.0f}s allowed; giving up. Last crash (pid {crash.pid}, "
                        f"{crash.how}), log {crash.log_file}:\n{crash.log_tail}")
                log.warning("restarting tritonserver in %.1fs on the same ports (restart %d within %.0fs, at most %d)",
                            delay, self.policy.recent_restarts(self._clock()), self.policy.window_s,
                            self.policy.max_restarts)
                self._sleep(delay)
                try:
                    self.server.start()
                except LaunchError as exc:  # its message holds that attempt's own log tail (or the taken port)
                    crash = self._reap("failed to restart", str(exc).split("\n", 1)[0], tail=str(exc))
                    continue
                self.restarts += 1
                log.info("tritonserver restarted (pid %d); previous log kept as %s.1", self.server.process.pid,
                         self.server.log_file)
                break

    def _wait_for_exit(self) -> None:
        last_refresh = self._clock()
        while self.server.is_alive():
            self._sleep(self.poll_s)
            if self._clock() - last_refresh >= self.shm_refresh_s:
                self.server.remember_shm()  # stubs the backend restarted get new regions
                last_refresh = self._clock()

    def _reap(self, what: str, how: str, tail: str | None = None) -> Crash:
        report = self.server.cleanup()  # first: the stubs' last words land in the log while they stop
        crash = Crash(self.server.process.pid, how, self.server.log_file,
                      self.server.log_tail() if tail is None else tail)
        self.crashes.append(crash)
        short = "\n".join(crash.log_tail.splitlines()[-10:])  # the full tail goes into the final error only
        log.error("tritonserver (pid %d) %s (%s); cleanup: %s; its log %s ends with:\n%s", crash.pid, what, how,
                  report, crash.log_file, short)
        return crash


def live_pids(pids: Iterable[int]) -> list[int]:
    """The ``pids`` that still exist and are not zombies (for tests and diagnostics)."""
    return [pid for pid in pids if (fields := _stat_fields(pid)) is not None and fields[0] != "Z"]
