"""Pure helpers of the benchmark: percentiles, ratios, /proc and Prometheus parsing, goal checks.

Nothing here starts a process or opens a socket, so all of it is unit-tested without a server.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 95, 99)
ENCODER_COUNTERS = ("encoder_real_tokens", "encoder_padded_tokens", "encoder_rows", "encoder_batches")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's default).

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside 0..100.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """``{"p50_ms", "p95_ms", "p99_ms", "mean_ms"}`` rounded to µs; raises ValueError when empty."""
    out = {f"p{q}_ms": round(percentile(latencies_ms, q), 3) for q in PERCENTILES}
    out["mean_ms"] = round(sum(latencies_ms) / len(latencies_ms), 3)
    return out


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, digits)


@dataclass(frozen=True)
class Throughput:
    """Texts and tokens completed over a measured interval, with per-request latencies summarized."""

    texts: int
    tokens: int
    seconds: float
    requests: int
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def texts_per_s(self) -> float:
        return round(self.texts / self.seconds, 3) if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return round(self.tokens / self.seconds, 3) if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(texts_per_s=self.texts_per_s, tokens_per_s=self.tokens_per_s, seconds=round(self.seconds, 3))
        return data


def throughput(latencies_ms: Sequence[float], texts: int, tokens: int, seconds: float) -> Throughput:
    """Raises: ValueError when no request completed."""
    return Throughput(texts=texts, tokens=tokens, seconds=seconds, requests=len(latencies_ms),
                      latency=latency_summary(latencies_ms))


# --- /proc ------------------------------------------------------------------------------------

_KB = re.compile(r"^(\w+):\s+(\d+)\s*kB\s*$")


def parse_proc_status(text: str) -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` (and every other ``kB`` field) of ``/proc/PID/status``, in bytes."""
    out = {}
    for line in text.splitlines():
        m = _KB.match(line.strip())
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


def parse_proc_stat_ppid(text: str) -> int:
    """The parent pid from ``/proc/PID/stat`` (the command name may hold spaces and parentheses).

    Raises:
        ValueError: the line is not a stat line.
    """
    close = text.rfind(")")
    if close < 0:
        raise ValueError("not a /proc/PID/stat line")
    fields = text[close + 2:].split()
    return int(fields[1])


def descendants(parents: Mapping[int, int], root: int) -> set[int]:
    """``root`` and every process whose chain of parents leads to it (``parents``: pid -> ppid)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


# --- Prometheus / Triton statistics ---------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+([-+0-9.eEinfINFNa]+)(?:\s+\d+)?$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: ``(name, labels, value)``; comments are skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(m.group(2) or "")}
        try:
            samples.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            continue
    return samples


def encoder_counters(text: str, encoder_model: str) -> dict[str, float]:
    """Our encoder's counters (``tritonembed_encoder_*``, label ``model=encoder_model``); missing ones are 0."""
    out = dict.fromkeys(ENCODER_COUNTERS, 0.0)
    for name, labels, value in parse_prometheus(text):
        key = name.removeprefix("tritonembed_")
        if key in out and labels.get("model") == encoder_model:
            out[key] += value
    return out


def counter_delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def padding_waste(real_tokens: float, padded_tokens: float) -> float | None:
    """Share of the encoder's tokens that were padding: ``1 - real / padded`` (None when nothing ran)."""
    if padded_tokens <= 0:
        return None
    return round(1.0 - real_tokens / padded_tokens, 4)


def model_stats(stats_json: Mapping[str, Any]) -> dict[str, float]:
    """Counts and cumulative times (ns) of one model from Triton's statistics API answer."""
    entries = stats_json.get("model_stats") or []
    if not entries:
        return {}
    entry = entries[0]
    out = {"inference_count": float(entry.get("inference_count", 0)),
           "execution_count": float(entry.get("execution_count", 0))}
    for part, value in (entry.get("inference_stats") or {}).items():
        out[f"{part}_count"] = float(value.get("count", 0))
        out[f"{part}_ns"] = float(value.get("ns", 0))
    return out


def stats_breakdown(delta: Mapping[str, float]) -> dict[str, float | None]:
    """Average batch size and per-request microseconds of queue and compute from a stats delta."""
    def per_request_us(part: str) -> float | None:
        n = delta.get("success_count", 0.0)
        return round(delta.get(f"{part}_ns", 0.0) / n / 1000, 1) if n > 0 else None

    return {
        "requests": delta.get("success_count"),
        "avg_batch": ratio(delta.get("inference_count"), delta.get("execution_count"), 2),
        "queue_us": per_request_us("queue"),
        "compute_input_us": per_request_us("compute_input"),
        "compute_infer_us": per_request_us("compute_infer"),
        "compute_output_us": per_request_us("compute_output"),
    }


# --- goals ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    """One target of issue 5 with the measured value; ``met`` is None when it could not be measured."""

    name: str
    target: str
    measured: float | None
    met: bool | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def at_least(name: str, target: float, measured: float | None, detail: str = "") -> Goal:
    return Goal(name, f">= {target}", measured, None if measured is None else measured >= target, detail)


def below(name: str, target: float, measured: float | None, detail: str = "") -> Goal:
    return Goal(name, f"< {target}", measured, None if measured is None else measured < target, detail)


def best(values: Iterable[float | None]) -> float | None:
    """The largest of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return max(present) if present else None
