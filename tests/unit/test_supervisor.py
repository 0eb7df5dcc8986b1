"""The supervisor's pieces: restart policy (backoff, cap), log rotation, the reaping of a process group
(real processes and a real /dev/shm file), and the restart loop over a stand-in server."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tritonembed.errors import LaunchError
from tritonembed.supervisor import (
    SHM_DIR,
    SHM_PREFIX,
    ProcessGroup,
    ReapReport,
    RestartPolicy,
    Supervisor,
    SupervisorGaveUp,
    describe_exit,
    live_pids,
    rotate_logs,
)

# -- RestartPolicy --------------------------------------------------------------------------------------------

def test_backoff_doubles_per_restart_within_the_window_up_to_the_maximum():
    policy = RestartPolicy(max_restarts=10, window_s=60, backoff_s=1, max_backoff_s=5)
    assert [policy.on_crash(t) for t in (0, 1, 2, 3, 4)] == [1, 2, 4, 5, 5]


def test_cap_reached_gives_up():
    policy = RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.5)
    assert [policy.on_crash(t) for t in (0, 10, 20)] == [0.5, 1.0, 2.0]
    assert policy.on_crash(30) is None
    assert policy.on_crash(31) is None  # stays given up while the window holds three restarts


def test_restarts_older_than_the_window_are_forgotten():
    policy = RestartPolicy(max_restarts=2, window_s=60, backoff_s=1)
    assert policy.on_crash(0) == 1
    assert policy.on_crash(30) == 2
    assert policy.on_crash(59) is None
    assert policy.recent_restarts(60) == 1  # the one at 0 left the window
    assert policy.on_crash(61) == 2  # one restart still within the window (at 30)
    assert policy.on_crash(200) == 1  # a long healthy run: back to the first delay


def test_zero_restarts_never_restarts():
    assert RestartPolicy(max_restarts=0).on_crash(0) is None


@pytest.mark.parametrize("kwargs", [dict(max_restarts=-1), dict(window_s=0), dict(backoff_s=-1),
                                    dict(backoff_s=10, max_backoff_s=5)])
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ValueError, match="invalid restart policy"):
        RestartPolicy(**kwargs)


# -- logs -----------------------------------------------------------------------------------------------------

def test_rotate_logs_keeps_a_bounded_number(tmp_path):
    log = tmp_path / "tritonserver-8000.log"
    for n in range(5):
        rotate_logs(log, keep=3)
        log.write_text(f"start {n}\n")
    assert log.read_text() == "start 4\n"
    assert [(tmp_path / f"{log.name}.{i}").read_text() for i in (1, 2, 3)] == ["start 3\n", "start 2\n", "start 1\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [log.name, log.name + ".1", log.name + ".2", log.name + ".3"]


def test_rotate_logs_with_keep_zero_only_clears(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("old")
    rotate_logs(log, keep=0)
    assert list(tmp_path.iterdir()) == []


def test_describe_exit():
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(3) == "code 3"
    assert describe_exit(None) == "still running"


# -- ProcessGroup with real processes -------------------------------------------------------------------------

# A process that ignores SIGTERM (like a busy backend stub), maps a /dev/shm file (name in argv[1]) and spawns a
# child that inherits its group; it prints "ready" when all of that is in place.
_DEAF = """
import mmap, os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open('/dev/shm/' + sys.argv[1], os.O_RDWR)
region = mmap.mmap(fd, 4096)
os.close(fd)
deaf = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'
child = subprocess.Popen([sys.executable, '-c', deaf])
print('ready', child.pid, flush=True)
time.sleep(600)
"""


def _shm_file(tag: str) -> Path:
    path = SHM_DIR / f"{SHM_PREFIX}_{tag}-{uuid.uuid4()}"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    return path


@pytest.fixture
def deaf_group():
    """A new session whose leader and its child ignore SIGTERM (like the stubs of a SIGKILLed server)."""
    mine = _shm_file("unit")
    other = _shm_file("unit-other")  # another server's region: must survive
    leader = subprocess.Popen([sys.executable, "-c", _DEAF, mine.name], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    ready = leader.stdout.readline().split()
    assert ready[0] == "ready", ready
    yield leader, int(ready[1]), mine, other
    for pid in (leader.pid, int(ready[1])):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leader.wait()
    mine.unlink(missing_ok=True)
    other.unlink(missing_ok=True)


def test_reap_kills_deaf_processes_and_removes_only_the_group_shm(deaf_group):
    leader, child, mine, other = deaf_group
    group = ProcessGroup(leader.pid)
    assert group.pids() == sorted([leader.pid, child])
    assert group.remember_shm() == {mine.name}  # read from /proc/PID/maps of the group's processes
    report = group.reap(grace_s=0.5)
    leader.wait(5)
    assert report.terminated == [] and report.killed == sorted([leader.pid, child])  # SIGTERM was ignored
    assert live_pids([leader.pid, child]) == [] and group.pids() == []
    assert report.removed_shm == [mine.name] and not mine.exists()
    assert other.exists()


def test_reap_of_an_empty_group_does_nothing():
    report = ProcessGroup(2 ** 22 + 12345).reap(grace_s=0.1)  # above pid_max's default: no such group
    assert report == ReapReport()


def test_shm_regions_of_reads_a_live_mapping(tmp_path):
    path = _shm_file("self")
    try:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            from tritonembed.supervisor import shm_regions_of

            assert path.name in shm_regions_of(os.getpid())
    finally:
        path.unlink()


# -- Supervisor over a stand-in server ------------------------------------------------------------------------

class _Process:
    def __init__(self, pid: int, returncode: int) -> None:
        self.pid, self.returncode = pid, returncode


class FakeServer:
    """Dies after ``lives[i]`` polls of start i; ``fail_starts`` start attempts raise."""

    def __init__(self, lives: list[int], fail_starts: set[int] = frozenset(), log_file: Path = Path("x.log")) -> None:
        self.lives = list(lives)
        self.fail_starts = set(fail_starts)
        self.log_file = log_file
        self.starts = 0
        self.cleanups = 0
        self.polls = 0
        self.process = _Process(100, -9)
        self.log = "start 0 log"

    def is_alive(self) -> bool:
        self.polls += 1
        if self.polls > self.lives[0]:
            self.process.returncode = -9
            return False
        return True

    def start(self) -> FakeServer:
        self.starts += 1
        if self.starts in self.fail_starts:
            raise LaunchError(f"tritonserver exited with code 1 during startup:\nlog of attempt {self.starts}")
        self.lives.pop(0)
        self.polls = 0
        self.process = _Process(100 + self.starts, None)
        self.log = f"start {self.starts} log"
        return self

    def log_tail(self) -> str:
        return self.log

    def remember_shm(self) -> set[str]:
        return set()

    def cleanup(self) -> ReapReport:
        self.cleanups += 1
        return ReapReport()


def _supervisor(server: FakeServer, policy: RestartPolicy):
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    return Supervisor(server, policy, poll_s=1.0, sleep=sleep, clock=lambda: clock[0]), sleeps


def test_supervisor_restarts_then_gives_up_with_the_last_crash_log():
    server = FakeServer(lives=[2, 2, 2, 2])
    sup, sleeps = _supervisor(server, RestartPolicy(max_restarts=2, window_s=1000, backoff_s=3))
    with pytest.raises(SupervisorGaveUp, match="died 3 time.*2 restart.*pid 102, signal SIGKILL.*x.log:\nstart 2 log"):
        sup.run()
    assert server.starts == 2 and sup.restarts == 2
    assert server.cleanups == 3  # every dead server is reaped, the last one too
    assert [s for s in sleeps if s != 1.0] == [3, 6]  # backoff between the poll sleeps


def test_supervisor_counts_a_failed_restart_as_a_crash_and_reports_its_own_message():
    server = FakeServer(lives=[1, 1], fail_starts={1, 2})
    sup, _ = _supervisor(server, RestartPolicy(max_restarts=2, window_s=1000, backoff_s=0))
    with pytest.raises(SupervisorGaveUp, match="log of attempt 2"):
        sup.run()
    assert server.starts == 2 and sup.restarts == 0


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Stop


def test_supervisor_run_is_interrupted_by_a_signal_handler_that_raises():
    sup = Supervisor(FakeServer(lives=[10 ** 9]), RestartPolicy(), poll_s=0.05)
    previous = signal.signal(signal.SIGALRM, _raise_stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Stop):
            sup.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- serve's flags --------------------------------------------------------------------------------------------

def test_serve_restart_flags_default_and_read_the_environment(monkeypatch):
    from tritonembed.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.max_restarts, args.restart_window, args.restart_backoff, args.keep_logs) == (5, 60.0, 1.0, 5)
    for name, value in (("MAX_RESTARTS", "2"), ("RESTART_WINDOW", "30"), ("RESTART_BACKOFF", "0.5"), ("KEEP_LOGS", "9")):
        monkeypatch.setenv(f"TRITONEMBED_{name}", value)
    args = build_parser().parse_args(["serve"])
    assert (args.max_restarts, args.restart_window, args.restart_backoff, args.keep_logs) == (2, 30.0, 0.5, 9)
    assert build_parser().parse_args(["serve", "--max-restarts", "0"]).max_restarts == 0


def test_serve_refuses_an_invalid_restart_policy_before_starting_anything(capsys):
    from tritonembed.cli import main

    assert main(["serve", "--restart-window", "0", "--http-port", "1"]) == 2
    err = capsys.readouterr().err
    assert "invalid restart policy" in err and "--restart-window" in err
