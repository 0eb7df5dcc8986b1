"""Peer servers started on loopback for side-by-side numbers: Infinity (``infinity-emb``), in its own venv.

Infinity pulls its own torch/transformers/optimum, so it never goes into the project venv. Create its
venv once (CPU torch from the local wheel; about 1.7 GB):

    python3 -m venv .cache/peer-venvs/infinity
    .cache/peer-venvs/infinity/bin/pip install torch==2.13.0 "infinity-emb[server,torch,optimum]==0.0.78"

``TRITONEMBED_INFINITY_VENV`` points elsewhere. Without the venv the bench skips the peer with a note.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tritonembed.errors import LaunchError
from tritonembed.launcher import free_port

log = logging.getLogger(__name__)

DEFAULT_INFINITY_VENV = Path(".cache") / "peer-venvs" / "infinity"


class PeerUnavailable(LaunchError):
    """The peer is not installed, or cannot serve this model; the message says why (for the report)."""


def infinity_binary(venv: Path | None = None) -> Path:
    """Raises: PeerUnavailable when no Infinity venv is found."""
    root = Path(venv or os.environ.get("TRITONEMBED_INFINITY_VENV", DEFAULT_INFINITY_VENV))
    binary = root / "bin" / "infinity_emb"
    if not binary.is_file():
        raise PeerUnavailable(f"Infinity is not installed ({binary} missing); see tritonembed.benchmarks.peers")
    return binary


def optimum_model_dir(source: Path, onnx_file: Path, target: Path) -> Path:
    """A copy of the checkpoint folder with our exported ONNX file inside (Infinity's optimum engine
    looks for ``*.onnx`` in the model folder)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    shutil.copy2(onnx_file, target / "model.onnx")
    return target


class InfinityServer:
    """``infinity_emb v2`` on 127.0.0.1 for one model; a context manager like :class:`TritonServer`.

    Raises (on start):
        PeerUnavailable: not installed, or the process died / never answered an embedding request.
    """

    def __init__(self, model_dir: Path, served_name: str, *, engine: str = "torch", batch_size: int = 32,
                 log_file: Path, startup_timeout: float = 240.0, venv: Path | None = None) -> None:
        self.binary = infinity_binary(venv)
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.engine = engine
        self.batch_size = batch_size
        self.port = free_port()
        self.log_file = Path(log_file)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(self.binary), "v2", "--model-id", str(self.model_dir), "--served-model-name", self.served_name,
                "--engine", self.engine, "--device", "cpu", "--batch-size", str(self.batch_size),
                "--host", "127.0.0.1", "--port", str(self.port), "--no-vector-disk-cache", "--log-level", "warning"]

    def _probe(self) -> bool:
        body = json.dumps({"model": self.served_name, "input": ["warm up"]}).encode()
        request = urllib.request.Request(self.url + "/embeddings", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> InfinityServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
                   DO_NOT_TRACK="1")
        env.pop("VIRTUAL_ENV", None)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting Infinity (%s engine) on port %d, log %s", self.engine, self.port, self.log_file)
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerUnavailable(f"Infinity ({self.engine}) exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._probe():
                return self
            time.sleep(1.0)
        self.stop()
        raise PeerUnavailable(f"Infinity ({self.engine}) did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> InfinityServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
