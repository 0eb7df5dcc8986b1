"""Memory of a long export: per-stage RSS logging and a check, before starting, that RAM and disk suffice.

A traced export holds, at its worst moment, the model in float32 twice (the PyTorch module and the graph
``torch.onnx.export`` builds from it); every later stage holds one float32 copy at most. A streamed one (a
Qwen3 embedder in safetensors: the graph built one weight at a time, the reference run one layer at a time,
the checks run on the checkpoint's own bf16 weights) holds about one copy of the 16-bit checkpoint. What it
needs is planned from the checkpoint's parameter count, not from its file size (a bf16 checkpoint is half
its float32 graph). Linux only for the RSS
figures (``/proc/self/status``); elsewhere they read 0 and the stage lines still give elapsed time.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tritonembed.artifact import PROTOBUF_LIMIT_BYTES
from tritonembed.errors import ExportError
from tritonembed.export.checkpoint_tensors import safetensors_header

log = logging.getLogger(__name__)

GIB = 1024**3
# Python, torch, onnx and onnxruntime loaded, plus what does not scale with the model: planned high.
BASE_OVERHEAD_BYTES = int(1.5 * GIB)
# Peak RSS in float32 weight-copies, measured: the trace holds the PyTorch module and the ModelProto torch
# builds from it (0.6B shape: 4.7 GiB for 2.2 GiB of weights). Planned high.
PEAK_FP32_COPIES = 2.5
# Below protobuf's 2 GiB limit torch keeps the weights inside the proto and serializes it in memory: the
# module, the C++ proto and its serialized bytes at once (``small``: 2.9 GiB for 0.6 GiB of weights, 3.4 GiB
# seen in CI: about 3.7 copies over the interpreter's own 0.5 GiB).
PEAK_FP32_COPIES_IN_MEMORY_PROTO = 4.0
# A streamed export (Qwen3 built node by node, checked with bf16 weights): peak RSS in copies of the 16-bit
# checkpoint over the base (0.6B shape, measured: docs/export.md). The bound, and what was measured under it.
STREAMED_PEAK_CHECKPOINT_COPIES = 1.25
# Disk: the fp32 graph, a quantized copy beside it, and the staging files torch writes (about 3 copies).
DISK_FP32_COPIES = 3.0
# A streamed export's disk: the fp32 graph (the quantizer's input), its bf16 check form and the output, at most
# one fp32 + two 16-bit copies (0.6B fp16: 4.4 GiB during for 2.2 GiB of fp32 weights). Planned with a margin.
STREAMED_DISK_FP32_COPIES = 2.25


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS so far) of this process in bytes; (0, 0) where /proc is missing."""
    return _status_kib("VmRSS") * 1024, _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``VmHWM`` restarts at the current RSS); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc's mallopt parameter number for the mmap threshold, and the value the export pins it to.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Pin glibc's mmap threshold at 1 MiB for this process, so every freed block above it leaves the RSS.

    By default glibc raises the threshold to the size of each large block freed (up to 32 MiB), after which
    weight-sized blocks (a 0.6B layer's are 4-12 MiB) come from the heap, and the heap keeps what is freed:
    ONNX Runtime sessions that cast one weight at a time then grew by ~2 GiB per export stage. Pinning
    the threshold also turns that adjustment off. Returns False where there is no glibc.
    """
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def _libc_function(name: str):
    """A function of the C library (glibc), or None where there is none or it lacks ``name``."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name, None) if library else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed, so a model's mid-sized weights (12 MB each in
    the 0.6B shape) end up on the heap, and freeing them leaves the RSS where it was: measured 4.45 GiB after
    the PyTorch reference of the 0.6B shape, with nothing alive but the 2 GiB ONNX Runtime session to come.
    """
    import gc

    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


class StageLog:
    """Logs one INFO line per export stage: its name, elapsed seconds, RSS now and the peak so far."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.perf_counter()
        self.stages: list[dict[str, float | str]] = []
        self.peak_bytes = 0
        reset_peak_rss()  # the first stage's peak is its own, not this process's history

    def stage(self, name: str) -> None:
        """Log that ``name`` is done: RSS now and the peak since the previous stage (which stage holds what)."""
        now, peak = rss_bytes()
        self.peak_bytes = max(self.peak_bytes, peak)
        elapsed = time.perf_counter() - self.started
        self.stages.append({"stage": name, "seconds": round(elapsed, 1), "rss_gib": round(now / GIB, 2),
                            "peak_rss_gib": round(peak / GIB, 2)})
        log.info("%s: %s at %.1fs, RSS %.2f GiB (peak in this stage %.2f GiB)", self.label, name, elapsed,
                 now / GIB, peak / GIB)
        reset_peak_rss()

    @property
    def peak_rss_gib(self) -> float:
        """The whole export's peak so far (the largest of the stages' peaks)."""
        return round(self.peak_bytes / GIB, 2)


@dataclass(frozen=True)
class ExportNeeds:
    """What an export of one checkpoint is planned to need."""

    fp32_weight_bytes: int
    ram_bytes: int
    disk_bytes: int


def checkpoint_fp32_bytes(path: Path) -> int:
    """The float32 size of the weights in ``path``'s safetensors files (from their headers, no data read).

    Falls back to the files' size times the dtype ratio when there is no safetensors file.

    Raises:
        ExportError: a safetensors file is not one.
    """
    total = 0
    files = sorted(Path(path).glob("*.safetensors"))
    for file in files:
        header, _ = safetensors_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += 4 * count
    if files:
        return total
    return 2 * sum(f.stat().st_size for f in Path(path).glob("*.bin"))  # unknown dtype: assume 16-bit


def plan_export(checkpoint: Path, *, streamed: bool = False) -> ExportNeeds:
    """The RAM and disk an export of ``checkpoint`` is planned to need (module docstring).

    ``streamed``: the graph is built one weight at a time (:mod:`tritonembed.export.qwen3_graph`) and checked
    with the checkpoint's own weights, so the plan is :data:`STREAMED_PEAK_CHECKPOINT_COPIES` of the 16-bit
    checkpoint instead of float32 copies.
    """
    fp32 = checkpoint_fp32_bytes(checkpoint)
    if streamed:
        ram = BASE_OVERHEAD_BYTES + int(STREAMED_PEAK_CHECKPOINT_COPIES * fp32 / 2)
    else:
        ram = BASE_OVERHEAD_BYTES + int((PEAK_FP32_COPIES_IN_MEMORY_PROTO if fp32 < PROTOBUF_LIMIT_BYTES
                                         else PEAK_FP32_COPIES) * fp32)
    return ExportNeeds(fp32, ram, int((STREAMED_DISK_FP32_COPIES if streamed else DISK_FP32_COPIES) * fp32))


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (plus a cgroup limit when lower); 0 when unknown."""
    available = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - usage)
    except (OSError, ValueError):
        pass
    return available


def check_resources(checkpoint: Path, workdir: Path, *, streamed: bool = False) -> ExportNeeds:
    """Refuse to start an export that RAM or the disk under ``workdir`` cannot hold.

    Set ``TRITONEMBED_EXPORT_SKIP_RESOURCE_CHECK=1`` to try anyway (swap, a plan that is too high).

    Raises:
        ExportError: less RAM available or less free disk than planned; the message says how much.
    """
    needs = plan_export(checkpoint, streamed=streamed)
    free_disk = shutil.disk_usage(workdir).free
    ram = available_ram_bytes()
    log.info("export plan: %.1f GiB of float32 weights, peak RAM ~%.1f GiB (%.1f available), disk ~%.1f GiB (%.1f free)",
             needs.fp32_weight_bytes / GIB, needs.ram_bytes / GIB, ram / GIB, needs.disk_bytes / GIB, free_disk / GIB)
    if os.environ.get("TRITONEMBED_EXPORT_SKIP_RESOURCE_CHECK") == "1":
        return needs
    problems = []
    if ram and ram < needs.ram_bytes:
        problems.append(f"RAM: needs ~{needs.ram_bytes / GIB:.1f} GiB, {ram / GIB:.1f} GiB available")
    if free_disk < needs.disk_bytes:
        problems.append(f"disk under {workdir}: needs ~{needs.disk_bytes / GIB:.1f} GiB, {free_disk / GIB:.1f} GiB free")
    if problems:
        raise ExportError("not enough resources to export " + str(checkpoint) + ": " + "; ".join(problems)
                          + " (TRITONEMBED_EXPORT_SKIP_RESOURCE_CHECK=1 tries anyway)")
    return needs
