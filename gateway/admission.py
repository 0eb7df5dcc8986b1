"""Admission control: how many inputs the gateway lets wait on Triton at once.

Triton's own queue stays unbounded by default (a queue policy makes Triton 2.51's dynamic batcher
stall idle models for up to 500 ms; see ``docs/serving.md``), so the gateway is where overload is
refused: a request whose inputs would take the in-flight total over the limit gets 429 ``overloaded``
at once, with ``Retry-After``, instead of queueing behind minutes of work. Everything admitted is
answered. One event loop owns a limiter, so no lock is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tritonembed.gateway.errors import ErrorKind, GatewayError


class InputAdmission:
    """Counts inputs in flight; refuses a request that would go over ``limit``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def admit(self, inputs: int) -> Iterator[None]:
        """Hold ``inputs`` slots for the duration of the block.

        Raises:
            GatewayError: OVERLOADED when the slots are not free (nothing is held then).
        """
        if self.in_flight + inputs > self.limit:
            raise GatewayError(
                ErrorKind.OVERLOADED,
                f"the server is overloaded: {self.in_flight} inputs in flight, this request adds {inputs} "
                f"(limit {self.limit}); retry later",
            )
        self.in_flight += inputs
        try:
            yield
        finally:
            self.in_flight -= inputs
