"""Where the box's CPU goes during one load run, read from ``/proc``.

On this box the issuer, PostgreSQL and the load generator share two cores, so a figure can be limited by
the server's own CPU, by what the others take, or by the box being full. Each run records the CPU-seconds
spent by the server under load (its process group), by PostgreSQL (every ``postgres`` process), by wrk
(the harness's only child reaped during the run), and by the whole box (``/proc/stat``).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Use:
    """CPU-seconds used during ``seconds`` of wall time."""

    seconds: float
    box: float  # all processes on all cores (user, nice, system, irq, softirq)
    server: float
    postgres: float
    load: float

    @classmethod
    def total(cls, uses: Sequence[Use]) -> Use:
        return cls(**{field.name: sum(getattr(use, field.name) for use in uses) for field in fields(cls)})

    @property
    def busy(self) -> float:
        """The box's CPU use as a share of every core's time."""
        return self.box / (self.seconds * CORES) if self.seconds else 0.0

    def as_dict(self, requests: int) -> dict[str, Any]:
        """Shares of the box, and milliseconds of CPU per request for each part."""
        per = 1000 / requests if requests else 0.0
        rest = self.box - self.server - self.postgres - self.load
        return {
            "box_busy": round(self.busy, 3),
            "ms_per_request": {
                "server": round(self.server * per, 3),
                "postgres": round(self.postgres * per, 3),
                "wrk": round(self.load * per, 3),
                "rest": round(rest * per, 3),
                "box": round(self.box * per, 3),
            },
            # Requests per second if every core did nothing but this, at this CPU cost per request.
            "ceiling_rps": round(CORES * requests / self.box, 1) if self.box else None,
        }


@dataclass(frozen=True)
class Snapshot:
    server_group: int
    at: float
    box: float
    server: float
    postgres: float
    load: float

    @classmethod
    def take(cls, server_group: int) -> Snapshot:
        server = postgres = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # the process ended between the listing and the read
                continue
            # "pid (comm) state ppid pgrp ... utime stime ...": comm may hold spaces and parentheses.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            used = (int(fields[11]) + int(fields[12])) / TICK
            if int(fields[2]) == server_group:
                server += used
            elif comm == "postgres":
                postgres += used
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(server_group, time.monotonic(), _box_busy(), server, postgres, children.ru_utime + children.ru_stime)

    def until(self, later: Snapshot) -> Use:
        return Use(
            seconds=later.at - self.at,
            box=later.box - self.box,
            server=later.server - self.server,
            postgres=later.postgres - self.postgres,
            load=later.load - self.load,
        )


def settle(server_group: int, *, window: float = 0.1, quiet: float = 0.02, limit: float = 10.0) -> None:
    """Return once the server's process group has used less than ``quiet`` of one core over ``window``
    seconds (or after ``limit`` seconds). wrk stops sending, not the server working: a login server still
    has every queued login to hash, about 100-200 ms of both cores, and a measurement started at once (the
    next round, or argon2 alone between login rounds) would share the box with it."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = Snapshot.take(server_group)
        time.sleep(window)
        use = before.until(Snapshot.take(server_group))
        if use.server < quiet * use.seconds:
            return


def _box_busy() -> float:
    """CPU-seconds every core has spent busy since boot: user, nice, system, irq and softirq."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
    return (user + nice + system + irq + softirq) / TICK
