"""`tritonembed serve` as a subprocess on free ports, and what the supervision tests read from ``/proc``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tritonembed.launcher import free_port
from tritonembed.supervisor import ProcessGroup, live_pids, shm_regions_of

BANNER_END = "Press Ctrl-C to stop."


class ServeProcess:
    """``python -m tritonembed.cli serve EXPORT`` with its output in ``workdir/serve.out``; a context manager.

    On exit it stops serve (SIGTERM, then SIGKILL) and reaps any tritonserver group it left, so a failing
    test leaves no server behind.
    """

    def __init__(self, export: Path | Sequence[Path], workdir: Path, *, gateway: bool = True,
                 extra: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.ports = {flag: free_port() for flag in ("http", "grpc", "metrics", "gateway")}
        self.repository = self.workdir / "repo"
        self.output = self.workdir / "serve.out"
        models = [str(export)] if isinstance(export, (str, Path)) else [str(e) for e in export]
        self.cmd = [sys.executable, "-m", "tritonembed.cli", "serve", *models, "--repository", str(self.repository),
                    "--threads", "1"]
        self.cmd += [f"--{flag}-port={port}" for flag, port in self.ports.items() if gateway or flag != "gateway"]
        if not gateway:
            self.cmd.append("--no-gateway")
        self.cmd += list(extra)
        self.proc: subprocess.Popen | None = None
        self._triton_pids: set[int] = set()

    @property
    def log_file(self) -> Path:
        return self.repository.parent / f"tritonserver-{self.ports['http']}.log"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}/v1"

    def start(self, timeout: float = 300.0) -> ServeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        self.wait_output(BANNER_END, timeout)
        return self

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_output(self, needle: str, timeout: float) -> None:
        """Raises: AssertionError when serve exits or ``timeout`` passes before ``needle`` is printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not printed (serve exit code {self.proc.poll()}); "
                             f"output:\n{self.text()[-4000:]}")

    def triton_pid(self) -> int | None:
        """The live tritonserver child of serve, or None (between a death and the restart)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv0 = f.read().split(b"\0")[0]
            except (OSError, IndexError, ValueError):
                continue
            if argv0.endswith(b"/tritonserver") and live_pids([int(entry)]):
                self._triton_pids.add(int(entry))
                return int(entry)
        return None

    def wait_new_triton(self, old: int, timeout: float) -> int:
        """The pid of a tritonserver other than ``old`` that answers ready, within ``timeout`` seconds.

        Raises: AssertionError when there is none in time, or when serve itself exited.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited ({self.proc.returncode}):\n{self.text()[-4000:]}"
            pid = self.triton_pid()
            if pid is not None and pid != old and triton_ready(self.ports["http"]):
                return pid
            time.sleep(0.25)
        raise AssertionError(f"no new ready tritonserver within {timeout:.0f}s; output:\n{self.text()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM serve; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.triton_pid()  # remember the current server: a SIGKILLed serve would leave it running
            self.proc.send_signal(signal.SIGTERM)  # serve stops its own tritonserver
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self._triton_pids:
            ProcessGroup(pid).reap(grace_s=0.5)


def triton_ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def group_snapshot(pid: int) -> tuple[list[int], set[str]]:
    """The processes of tritonserver ``pid``'s group and the /dev/shm regions they map, read now."""
    group = ProcessGroup(pid)
    members = group.pids()
    regions = set().union(*(shm_regions_of(p) for p in members)) if members else set()
    return members, regions


def stub_pids(pid: int) -> list[int]:
    """The Python-backend stub processes in tritonserver ``pid``'s group."""
    stubs = []
    for member in ProcessGroup(pid).pids():
        try:
            with open(f"/proc/{member}/cmdline", "rb") as f:
                if b"triton_python_backend_stub" in f.read().split(b"\0")[0]:
                    stubs.append(member)
        except OSError:
            continue
    return stubs
