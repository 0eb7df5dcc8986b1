"""Start, watch and stop a real ``tritonserver``.

On this kind of machine the binary comes from the ``nvidia-pytriton`` wheel (tritonserver 2.51 with the
Python backend); in the NGC container set ``TRITONEMBED_TRITONSERVER=/opt/tritonserver/bin/tritonserver``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tritonembed.cache import cache_dir
from tritonembed.errors import LaunchError
from tritonembed.supervisor import ProcessGroup, ReapReport, rotate_logs

log = logging.getLogger(__name__)


class PortInUseError(LaunchError):
    """A requested port is already taken."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_port_free(port: int, what: str) -> None:
    """Raises: PortInUseError when something listens on ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            raise PortInUseError(f"{what} port {port} is already in use ({exc.strerror}); pick another with --{what}-port") from exc


def find_triton() -> TritonInstall:
    """Locate tritonserver and a backend directory whose Python backend has a stub for this Python.

    Raises:
        LaunchError: no tritonserver found (install with ``pip install 'tritonembed[serve]'``).
    """
    override = os.environ.get("TRITONEMBED_TRITONSERVER")
    if override:
        binary = Path(override)
        backends = Path(os.environ.get("TRITONEMBED_BACKEND_DIR", binary.parent.parent / "backends"))
        if not binary.is_file():
            raise LaunchError(f"TRITONEMBED_TRITONSERVER={override} does not exist")
        return TritonInstall(binary, backends)
    try:
        import pytriton  # type: ignore[import-not-found]
    except ImportError as exc:
        raise LaunchError("no tritonserver: install the serve extra (pip install 'tritonembed[serve]') "
                          "or set TRITONEMBED_TRITONSERVER") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise LaunchError(f"incomplete tritonserver in {root} (binary or Python {version} stub missing)")
    # The stub must sit beside libtriton_python.so; build that layout in our cache, not in site-packages.
    backend_dir = cache_dir() / "triton-backends" / version
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (root / "backends" / "python").iterdir():
        target = python_dir / item.name
        if item.is_file() and not target.exists():
            target.symlink_to(item)
    stub_target = python_dir / stub.name
    if not stub_target.exists():
        # A symlink, not a copy: the stub finds its bundled libraries through an $ORIGIN-relative RPATH.
        stub_target.symlink_to(stub)
    return TritonInstall(binary, backend_dir)


class TritonServer:
    """A tritonserver process: started on given (or free) ports, ready-checked, stopped cleanly.

    Use as a context manager. ``start()`` raises :class:`LaunchError` with the last log lines when the
    server dies or is not ready before the deadline. Each start writes a fresh ``log_file``; the logs of
    earlier starts are kept as ``log_file.1`` (the previous) ... ``log_file.<keep_logs>``. ``stop()`` and
    ``cleanup()`` leave no process of the server's group and none of its ``/dev/shm`` regions behind, also
    when the main process already died.
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        startup_timeout: float = 180.0,
        extra_args: tuple[str, ...] = (),
        gpu: bool = False,
        host: str = "127.0.0.1",
        keep_logs: int = 5,
    ) -> None:
        self.repository = Path(repository)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_file = Path(log_file) if log_file else self.repository.parent / f"tritonserver-{self.http_port}.log"
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.gpu = gpu
        self.host = host
        self.keep_logs = keep_logs
        self.process: subprocess.Popen | None = None
        self.group: ProcessGroup | None = None
        self.starts = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        install = find_triton()
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backend_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
            "--backend-config=python,shm-default-byte-size=8388608",
            "--backend-config=python,shm-growth-byte-size=8388608",
        ]
        if not self.gpu:
            cmd += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The Python-backend stub picks up the packages of the Python first on PATH (our venv).
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("TOKENIZERS_PARALLELISM", "true")
        return env

    def start(self) -> TritonServer:
        """Raises: PortInUseError, LaunchError (died or not ready in time, with the log tail)."""
        for port, what in ((self.http_port, "http"), (self.grpc_port, "grpc"), (self.metrics_port, "metrics")):
            ensure_port_free(port, what)
        cmd = self.command()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        rotate_logs(self.log_file, self.keep_logs)  # a crash's log survives the next start
        log.info("starting tritonserver (http %d, grpc %d, metrics %d), log %s", self.http_port, self.grpc_port,
                 self.metrics_port, self.log_file)
        self.starts += 1
        with open(self.log_file, "wb") as out:
            # Which start wrote this log, so a kept crash log can be told from the logs of other starts.
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
            out.write(f"== tritonembed: tritonserver start #{self.starts} at {stamp}, http port {self.http_port} ==\n"
                      .encode())
            out.flush()
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.environment(),
                                            start_new_session=True)
        self.group = ProcessGroup(self.process.pid)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.cleanup()  # first: what its stubs write while they stop belongs to the tail
                tail = self.log_tail()
                raise LaunchError(f"tritonserver exited with code {self.process.returncode} during startup "
                                  f"(log {self.log_file}):\n{tail}")
            if self.is_ready():
                self.remember_shm()
                log.info("tritonserver ready (pid %d)", self.process.pid)
                return self
            time.sleep(0.25)
        self.stop()
        raise LaunchError(f"tritonserver not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 50) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def remember_shm(self) -> set[str]:
        """Record the ``/dev/shm`` regions the server's processes map now (removed by :meth:`cleanup`)."""
        return self.group.remember_shm() if self.group is not None else set()

    def cleanup(self) -> ReapReport:
        """Kill what is left of the server's process group and remove its shm regions (see ProcessGroup.reap).

        Call after the main process exited; a no-op report when the server never started.
        """
        if self.group is None:
            return ReapReport()
        return self.group.reap()

    def stop(self, timeout: float = 20.0) -> None:
        """terminate -> wait -> kill the whole process group, then :meth:`cleanup` (also after a crash:
        the Python-backend stubs of a killed server outlive it)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0fs; killing", timeout)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        report = self.cleanup()
        if report.killed or report.removed_shm:
            log.info("tritonserver leftovers cleaned up: %s", report)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
