"""Counters of the Python-backend models: off the request's path, summed, published in declaration order."""

from __future__ import annotations

import threading
import time

import pytest

from tritonembed.model_repository import triton_adapter


class _FakeFamily:
    COUNTER = "counter"
    published: list[tuple[str, float]] = []

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels):  # noqa: N802 - the pb_utils API
        family = self

        class _Metric:
            def increment(self, value):
                if family.name.endswith("broken"):
                    raise RuntimeError("cannot publish")
                _FakeFamily.published.append((family.name, value))

        return _Metric()


class _FakeUtils:
    MetricFamily = _FakeFamily


class _NoThread:
    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        pass


def test_adds_are_summed_and_published_in_declaration_order(monkeypatch):
    monkeypatch.setattr(triton_adapter, "pb_utils", _FakeUtils)
    monkeypatch.setattr(threading, "Thread", _NoThread)  # publish by hand: flush()
    _FakeFamily.published = []
    counters = triton_adapter.Counters("m", {"padded": "p", "broken": "b", "real": "r", "unused": "u"})
    for key, value in (("real", 3), ("padded", 4), ("real", 2), ("broken", 1), ("unknown", 7), ("unused", 0)):
        counters.add(key, value)
    assert _FakeFamily.published == []  # nothing on the caller's path
    counters.flush()
    # one increment per counter, in declaration order; a failing one does not stop the rest
    assert _FakeFamily.published == [("tritonembed_padded", 4.0), ("tritonembed_real", 5.0)]
    counters.flush()
    assert len(_FakeFamily.published) == 2  # nothing pending twice


def test_the_publisher_thread_publishes_soon_after_add(monkeypatch):
    monkeypatch.setattr(triton_adapter, "pb_utils", _FakeUtils)
    _FakeFamily.published = []
    counters = triton_adapter.Counters("m", {"real": "r"})
    for _ in range(10):
        counters.add("real", 1.5)
    deadline = time.monotonic() + 5
    while sum(v for _, v in _FakeFamily.published) < 15.0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sum(v for _, v in _FakeFamily.published) == 15.0


def test_without_the_triton_stub_counters_are_no_ops(monkeypatch):
    monkeypatch.setattr(triton_adapter, "pb_utils", None)
    counters = triton_adapter.Counters("m", {"real": "r"})
    counters.add("real", 5)
    counters.flush()


def test_publishing_waits_for_a_quiet_model_but_not_forever():
    wait = triton_adapter.seconds_until_publish
    # a request 5 ms ago: wait for 20 ms of quiet
    assert wait(now=10.0, first_add=9.9, last_add=9.995, quiet_s=0.02, max_delay_s=1.0) == pytest.approx(0.015)
    # quiet long enough: publish now
    assert wait(now=10.0, first_add=9.9, last_add=9.97, quiet_s=0.02, max_delay_s=1.0) <= 0
    # steady load (a request every few ms) never goes quiet: publish once max_delay_s has passed
    assert wait(now=10.0, first_add=9.5, last_add=9.999, quiet_s=0.02, max_delay_s=1.0) == pytest.approx(0.019)
    assert wait(now=10.0, first_add=9.0, last_add=9.999, quiet_s=0.02, max_delay_s=1.0) <= 0


def test_the_publisher_waits_until_adds_stop(monkeypatch):
    monkeypatch.setattr(triton_adapter, "pb_utils", _FakeUtils)
    monkeypatch.setattr(triton_adapter.Counters, "QUIET_S", 0.5)
    _FakeFamily.published = []
    counters = triton_adapter.Counters("m", {"real": "r"})
    counters.add("real", 1.0)
    counters.add("real", 1.0)
    time.sleep(0.05)  # well inside the quiet period
    assert _FakeFamily.published == []
    deadline = time.monotonic() + 5
    while not _FakeFamily.published and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _FakeFamily.published == [("tritonembed_real", 2.0)]
