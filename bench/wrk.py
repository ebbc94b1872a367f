"""Load from a second process: wrk (C, one thread) with small Lua scripts, its summary read back as JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Every script ends with this: wrk's own summary, as one JSON line the harness can parse.
DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

# Each connection's refresh token is one-time: a queue of live tokens, refilled with each successor.
REFRESH = r"""
local queue, first, last = {}, 1, 0
function init(args)
  for line in io.lines(args[1]) do last = last + 1; queue[last] = line end
end
function request()
  local token = "exhausted-token-exhausted-token-exhausted-to"
  if first <= last then token = queue[first]; queue[first] = nil; first = first + 1 end
  return wrk.format("POST", "/auth/refresh", {["Content-Type"] = "application/json"},
                    '{"refresh_token":"' .. token .. '"}')
end
function response(status, headers, body)
  local token = body:match('"refresh_token"%s*:%s*"([^"]+)"')
  if token then last = last + 1; queue[last] = token end
end
"""

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
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx responses plus socket errors

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "errors": self.errors,
            "requests": self.requests,
        }


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
) -> LoadResult:
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
    # A fixed tool on fixed arguments built here; nothing comes from outside the harness.
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)  # noqa: S603
    line = next(line for line in out.stdout.splitlines() if line.startswith("BENCH_JSON "))
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds_run = data["duration_us"] / 1e6
    return LoadResult(
        requests=data["requests"],
        rps=data["requests"] / seconds_run,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=data["non_2xx"] + data["socket_errors"],
    )
