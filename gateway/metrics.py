"""Prometheus metrics, written in the text exposition format (no prometheus_client dependency).

- ``tritonembed_gateway_requests_total{route,status}``: counter
- ``tritonembed_gateway_errors_total{code}``: counter, by the error envelope's ``code``
- ``tritonembed_gateway_request_duration_seconds{route}``: histogram
- ``tritonembed_gateway_requests_in_flight``: gauge
- ``tritonembed_gateway_inputs_in_flight``: gauge of admitted inputs (see :mod:`.admission`)
- ``tritonembed_gateway_tokens_total{model}``: counter of usage.prompt_tokens
- ``tritonembed_gateway_inputs_total{model}``: counter of embedded inputs
- ``tritonembed_gateway_backend_requests_total{backend}``: requests sent to each Triton replica (``host:port``)
- ``tritonembed_gateway_backend_failures_total{backend}``: of those, failed before an answer (then retried elsewhere)
- ``tritonembed_gateway_backend_requests_in_flight{backend}``: gauge
- ``tritonembed_gateway_backend_healthy{backend}``: 1 while the replica gets traffic, 0 while down or resting
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "tritonembed_gateway_"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))


class Metrics:
    """Thread-safe counters for one gateway process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._errors: dict[str, int] = defaultdict(int)
        self._tokens: dict[str, int] = defaultdict(int)
        self._inputs: dict[str, int] = defaultdict(int)
        self._histograms: dict[str, list[int]] = {}
        self._sums: dict[str, float] = defaultdict(float)
        self._in_flight = 0
        self.inputs_in_flight = lambda: 0  # the app points this at its admission limiter
        self.backends: Callable[[], list[dict[str, Any]]] = list  # the app points this at its client's backend_stats

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def finished(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._in_flight -= 1
            self._requests[(route, str(status))] += 1
            counts = self._histograms.setdefault(route, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sums[route] += seconds

    def error(self, code: str) -> None:
        with self._lock:
            self._errors[code] += 1

    def usage(self, model: str, inputs: int, tokens: int) -> None:
        with self._lock:
            self._inputs[model] += inputs
            self._tokens[model] += tokens

    def render(self) -> str:
        """The exposition text."""
        with self._lock:
            lines: list[str] = []

            def family(name: str, kind: str, help_text: str) -> str:
                full = PREFIX + name
                lines.append(f"# HELP {full} {help_text}")
                lines.append(f"# TYPE {full} {kind}")
                return full

            name = family("requests_total", "counter", "HTTP requests handled, by route and status.")
            for (route, status), count in sorted(self._requests.items()):
                lines.append(f"{name}{_labels(route=route, status=status)} {count}")
            name = family("errors_total", "counter", "Error responses, by error code.")
            for code, count in sorted(self._errors.items()):
                lines.append(f"{name}{_labels(code=code)} {count}")
            name = family("request_duration_seconds", "histogram", "Request latency in seconds, by route.")
            for route, counts in sorted(self._histograms.items()):
                cumulative = 0
                for bound, count in zip(BUCKETS, counts, strict=False):
                    cumulative += count
                    lines.append(f"{name}_bucket{_labels(route=route, le=_number(bound))} {cumulative}")
                cumulative += counts[-1]
                lines.append(f"{name}_bucket{_labels(route=route, le='+Inf')} {cumulative}")
                lines.append(f"{name}_sum{_labels(route=route)} {self._sums[route]!r}")
                lines.append(f"{name}_count{_labels(route=route)} {cumulative}")
            name = family("requests_in_flight", "gauge", "Requests being handled now.")
            lines.append(f"{name} {self._in_flight}")
            name = family("inputs_in_flight", "gauge", "Inputs admitted and not yet answered.")
            lines.append(f"{name} {self.inputs_in_flight()}")
            name = family("tokens_total", "counter", "Tokens embedded (usage.prompt_tokens), by model.")
            for model, count in sorted(self._tokens.items()):
                lines.append(f"{name}{_labels(model=model)} {count}")
            name = family("inputs_total", "counter", "Inputs embedded, by model.")
            for model, count in sorted(self._inputs.items()):
                lines.append(f"{name}{_labels(model=model)} {count}")
            backends = self.backends()
            for key, suffix, kind, help_text in (
                ("requests", "requests_total", "counter", "Requests sent to each Triton replica."),
                ("failures", "failures_total", "counter",
                 "Requests that failed on a replica before an answer (retried on another)."),
                ("in_flight", "requests_in_flight", "gauge", "Requests in flight on each Triton replica."),
                ("healthy", "healthy", "gauge", "1 while a Triton replica gets traffic, 0 while it is down or resting."),
            ):
                name = family(f"backend_{suffix}", kind, help_text)
                for stat in backends:
                    lines.append(f"{name}{_labels(backend=stat['backend'])} {stat[key]}")
            return "\n".join(lines) + "\n"
