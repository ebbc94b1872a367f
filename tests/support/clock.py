"""The tests' one clock: time that moves only when a test moves it.

It answers every way the code reads time: called, as the issuer's ``Clock`` (an aware UTC datetime);
``wall()``, as the verifier's wall clock (epoch seconds); ``monotonic()``, for the per-process rate
limiter and the verifier's cache ages (seconds that only go forward when ``advance`` is called).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """Starts at the real time (whole seconds), so that outside libraries accept the tokens it dates."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)
        self._monotonic = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def wall(self) -> float:
        return self.now.timestamp()

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self._monotonic += seconds
