"""Load from a second process: wrk (C, one thread) with small Lua scripts, its summary read back as JSON."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cpu
from bench.rounds import mirrored

# Every script ends with this: wrk's own summary, and its whole latency histogram (each distinct latency in
# microseconds with its count), as one JSON line the harness can parse. With the histogram, the rounds of
# one figure merge into exact percentiles rather than an average of per-round percentiles.
DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  local pairs = {}
  for i = 1, #latency do
    local value, count = latency(i)
    pairs[i] = string.format('[%d,%d]', value, count)
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,"latency_us":[%s]}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    table.concat(pairs, ',')))
end
"""


def refresh_script(path: str, field: str, exhausted: str = "exhausted") -> str:
    """A wrk script for a refresh endpoint whose one-time token travels in the JSON member ``field``: a queue
    of live tokens (the file given to wrk), refilled with each answer's successor. Once the queue runs dry it
    sends ``exhausted``, which the server refuses."""
    return (
        r"""
local queue, first, last = {}, 1, 0
function init(args)
  for line in io.lines(args[1]) do last = last + 1; queue[last] = line end
end
function request()
  local token = "EXHAUSTED"
  if first <= last then token = queue[first]; queue[first] = nil; first = first + 1 end
  return wrk.format("POST", "PATH", {["Content-Type"] = "application/json"},
                    '{"FIELD":"' .. token .. '"}')
end
function response(status, headers, body)
  local token = body:match('"FIELD"%s*:%s*"([^"]+)"')
  if token then last = last + 1; queue[last] = token end
end
""".replace("EXHAUSTED", exhausted)
        .replace("PATH", path)
        .replace("FIELD", field)
    )


REFRESH = refresh_script("/auth/refresh", "refresh_token", "exhausted-token-exhausted-token-exhausted-to")

# Login bodies of several accounts in turn: parallel logins of one account would trip its lock-out.
LOGIN = r"""
local bodies, n = {}, 0
function init(args)
  for line in io.lines(args[1]) do n = n + 1; bodies[n] = line end
end
function request()
  n = n % #bodies + 1
  return wrk.format("POST", "/auth/login", {["Content-Type"] = "application/json"}, bodies[n])
end
"""

BEARER = r"""
function init(args)
  local f = io.open(args[1]); wrk.headers["Authorization"] = "Bearer " .. f:read("*l"); f:close()
end
"""

PLAIN = ""


@dataclass(frozen=True)
class LoadResult:
    """One figure: one wrk run, or the merged rounds of one (see ``merge``)."""

    requests: int
    seconds: float
    errors: int  # non-2xx/3xx responses plus socket errors
    latency_us: Mapping[int, int]  # latency in microseconds -> requests that took it
    rounds_rps: tuple[float, ...]
    cpu: cpu.Use | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, p: float) -> float:
        """wrk's own definition (``stats_percentile``): the smallest latency with at least ``rank`` requests
        at or below it, where rank = round(p% of the count + 0.5), C's round (half away from zero)."""
        count = sum(self.latency_us.values())
        if count == 0:
            return 0.0
        rank, seen = math.floor(p / 100 * count + 0.5 + 0.5), 0
        for value in sorted(self.latency_us):
            seen += self.latency_us[value]
            if seen >= rank:
                return value / 1000
        return max(self.latency_us) / 1000

    @classmethod
    def merge(cls, rounds: Sequence[LoadResult]) -> LoadResult:
        """The rounds of one figure as one: their requests over their time, their histograms added."""
        latency: Counter[int] = Counter()
        for one in rounds:
            latency.update(one.latency_us)
        uses = [one.cpu for one in rounds if one.cpu is not None]
        return cls(
            requests=sum(one.requests for one in rounds),
            seconds=sum(one.seconds for one in rounds),
            errors=sum(one.errors for one in rounds),
            latency_us=dict(latency),
            rounds_rps=tuple(rps for one in rounds for rps in one.rounds_rps),
            cpu=cpu.Use.total(uses) if len(uses) == len(rounds) and uses else None,
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "errors": self.errors,
            "requests": self.requests,
            "rounds_rps": [round(rps, 1) for rps in self.rounds_rps],
        }
        if self.cpu is not None:
            out["cpu"] = self.cpu.as_dict(self.requests)
        return out


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    return found


def run(
    url: str,
    script: str,
    workdir: Path,
    *,
    arg: str | None = None,
    seconds: int,
    connections: int,
    server_group: int | None = None,
) -> LoadResult:
    """One wrk run. With ``server_group`` (the process group of the server under load), it also records
    where the box's CPU went meanwhile (``bench.cpu``), and returns once the server has finished what
    wrk left in flight."""
    lua = workdir / f"script-{abs(hash(script))}.lua"
    lua.write_text(script + DONE)
    command = [
        wrk_path(),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url,
    ]
    if arg is not None:
        command += ["--", arg]
    before = None if server_group is None else cpu.Snapshot.take(server_group)
    # A fixed tool on fixed arguments built here; nothing comes from outside the harness.
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)  # noqa: S603
    use = None
    if before is not None:
        use = before.until(cpu.Snapshot.take(before.server_group))
        cpu.settle(before.server_group)  # the requests still in flight, before anything else is measured
    line = next(line for line in out.stdout.splitlines() if line.startswith("BENCH_JSON "))
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds_run = data["duration_us"] / 1e6
    return LoadResult(
        requests=data["requests"],
        seconds=seconds_run,
        errors=data["non_2xx"] + data["socket_errors"],
        latency_us={value: count for value, count in data["latency_us"]},
        rounds_rps=(data["requests"] / seconds_run,),
        cpu=use,
    )


def interleaved(
    contenders: Mapping[str, Callable[[int], LoadResult]],
    *,
    warmup: int,
    seconds: int,
    rounds: int,
    between: Callable[[], object] | None = None,
) -> dict[str, LoadResult]:
    """Each contender's figure, measured in ``rounds`` rounds of ``seconds`` taken in turn in mirrored order
    (``bench.rounds.mirrored``), after one warm-up run each; the per-round figures show how much the box
    moved. ``between``, when given, runs before the first round and after every round (the login measures
    its baseline there)."""
    for run_once in contenders.values():
        run_once(warmup)
    taken: dict[str, list[LoadResult]] = {name: [] for name in contenders}
    order = list(contenders)
    for number, name in enumerate(mirrored(order, rounds)):
        if between is not None and number % len(order) == 0:
            between()
        taken[name].append(contenders[name](seconds))
    if between is not None:
        between()
    return {name: LoadResult.merge(results) for name, results in taken.items()}
