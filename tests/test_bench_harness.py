"""The bench's own arithmetic: a wrong merge or percentile would print a wrong ratio with no error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import cpu, wrk


def _result(requests: int, seconds: float, latency_us: dict[int, int], errors: int = 0) -> wrk.LoadResult:
    return wrk.LoadResult(requests, seconds, errors, latency_us, (requests / seconds,))


def test_percentiles_follow_wrks_definition() -> None:
    # 100 requests of 1..100 µs: wrk's rank for p50 is round(50 + 0.5) = 51, for p99 round(99.5) = 100.
    result = _result(100, 1.0, {value: 1 for value in range(1, 101)})
    assert result.percentile_ms(50) == 0.051
    assert result.percentile_ms(99) == 0.100
    assert result.percentile_ms(0) == 0.001


def test_rounds_merge_into_one_figure_with_exact_percentiles() -> None:
    fast = _result(900, 1.0, {1_000: 900})
    slow = _result(100, 1.0, {50_000: 100}, errors=2)
    merged = wrk.LoadResult.merge([fast, slow])
    assert merged.requests == 1000
    assert merged.rps == 500.0  # all requests over all the time, not the mean of the rounds' rates
    assert merged.errors == 2
    assert merged.rounds_rps == (900.0, 100.0)
    assert merged.percentile_ms(50) == 1.0
    assert merged.percentile_ms(99) == 50.0  # from the merged histogram: neither round's own p99 average


def test_interleaved_rounds_alternate_in_mirrored_order() -> None:
    calls: list[tuple[str, int]] = []

    def contender(name: str) -> Callable[[int], wrk.LoadResult]:
        def run_once(seconds: int) -> wrk.LoadResult:
            calls.append((name, seconds))
            return _result(10 * seconds, seconds, {100: 10 * seconds})

        return run_once

    results = wrk.interleaved({"a": contender("a"), "b": contender("b")}, warmup=5, seconds=2, rounds=4)
    assert calls == [("a", 5), ("b", 5), ("a", 2), ("b", 2), ("b", 2), ("a", 2), ("a", 2), ("b", 2), ("b", 2), ("a", 2)]
    assert results["a"].requests == 80  # the warm-up is not counted
    assert results["a"].rounds_rps == (10.0, 10.0, 10.0, 10.0)


def test_cpu_snapshot_counts_the_server_group_and_the_box() -> None:
    group = os.getpgid(0)
    before = cpu.Snapshot.take(group)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    use = before.until(cpu.Snapshot.take(group))
    assert use.server >= 0.2  # this process is in its own group: the busy loop is counted as the server's
    assert use.box >= use.server - 0.05  # the box's count includes it (ticks are coarse)
    shares = use.as_dict(requests=100)
    assert shares["ms_per_request"]["server"] >= 2.0
    assert shares["ceiling_rps"] is not None


def test_between_runs_before_the_first_round_and_after_every_round() -> None:
    calls: list[str] = []

    def contender(name: str) -> Callable[[int], wrk.LoadResult]:
        def run_once(seconds: int) -> wrk.LoadResult:
            calls.append(name)
            return _result(10, 1.0, {100: 10})

        return run_once

    wrk.interleaved(
        {"a": contender("a"), "b": contender("b")}, warmup=1, seconds=1, rounds=3, between=lambda: calls.append("|")
    )
    assert calls == ["a", "b", "|", "a", "b", "|", "b", "a", "|", "a", "b", "|"]


def test_settle_waits_for_the_server_to_finish_its_work(tmp_path: Path) -> None:
    """A server still busy after wrk stops (queued logins) must be done before the next measurement."""
    done = tmp_path / "done"
    spin = (
        "import sys, time\n"
        "end = time.process_time() + 0.5\n"
        "while time.process_time() < end:\n"
        "    pass\n"
        "open(sys.argv[1], 'w').close()\n"
        "time.sleep(60)\n"
    )
    # The test's own interpreter on a fixed script.
    busy = subprocess.Popen([sys.executable, "-c", spin, str(done)], start_new_session=True)  # noqa: S603
    try:
        cpu.settle(busy.pid)
        assert done.exists(), "settle returned while the server group was still using a core"
        assert busy.poll() is None  # it is idle now, not gone
    finally:
        busy.kill()
        busy.wait()
