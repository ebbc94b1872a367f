"""The soak's table: printed, and written into docs/operations.md as the section of its run kind."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from soak.checks import Row
from soak.load import Record

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

PREAMBLE = """# Operations: the cluster soak

`make soak` (about 3 minutes, loopback only) starts 3 `issuer serve` replicas behind HAProxy, with PgBouncer
in transaction mode in front of PostgreSQL on 127.0.0.1:5432 (a fresh database, dropped at the end), drives
mixed load from virtual users on their own loopback addresses (logins, refresh chains with two racing tabs,
logout, session revokes, logout-all, `/auth/me`), rotates (`issuer keys rotate --now`) and revokes
(`issuer keys revoke KID`) a key mid-run, kill -9s a replica and restarts it, stops PgBouncer for 5 s and
restarts it, bursts logins from one address and wrong passwords for one account, and then checks, from
every recorded response and from the database, the properties in the table. A shorter run with the same
checks is `tests/soak/test_soak.py` in `make test`. The code is in `soak/` (its docstrings say how each
check is computed); each run replaces its own section below.

The load balancer health-checks `/healthz`, not `/readyz` (during the PgBouncer outage every replica's
`/readyz` is 503, and the JWKS, served from memory, must stay reachable), sends `X-Forwarded-For`, and is
the replicas' `TRUSTED_PROXIES`; it retries a request whose replica died before answering
(`retry-on conn-failure empty-response`, safe for a refresh inside `REFRESH_REUSE_GRACE`).
"""


def table(rows: list[Row]) -> str:
    lines = ["| check | result | observed |", "|---|---|---|"]
    lines += [f"| {row.check} | {'PASS' if row.ok else 'FAIL'} | {row.observed} |" for row in rows]
    return "\n".join(lines)


def load_summary(records: list[Record], seconds: float) -> str:
    """Requests by kind and by replica, with the clients' latency (informational, not checked)."""
    lines = ["| requests | count | p50 ms | p99 ms | statuses |", "|---|---|---|---|---|"]
    by_kind: dict[str, list[Record]] = {}
    for record in records:
        by_kind.setdefault(record.kind, []).append(record)
    for kind in sorted(by_kind):
        group = by_kind[kind]
        latencies = sorted((r.received - r.sent) * 1000 for r in group)
        statuses = Counter(str(r.status or r.error) for r in group)
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        lines.append(
            f"| {kind} | {len(group)} | {_rank(latencies, 0.5):.0f} | {_rank(latencies, 0.99):.0f} | {shown} |"
        )
    replicas = Counter(r.replica or "none" for r in records)
    total = len(records)
    lines.append(
        f"| all | {total} ({total / max(seconds, 1e-9):.0f}/s) | | | by replica: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(replicas.items()))
        + " |"
    )
    return "\n".join(lines)


def _rank(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def section(kind: str, heading: str, rows: list[Row], summary: str, timeline: str) -> str:
    verdict = "all checks passed" if all(r.ok for r in rows) else "SOME CHECKS FAILED"
    return (
        f"<!-- soak:{kind}:start -->\n## {heading}: {verdict}\n\n{timeline}\n\n{table(rows)}\n\n"
        f"Load (each request as its client saw it, retries included):\n\n{summary}\n<!-- soak:{kind}:end -->"
    )


def write_section(kind: str, text: str, path: Path = OPERATIONS) -> None:
    """Replace this run kind's section of ``path`` (created with its preamble when missing)."""
    current = path.read_text() if path.exists() else PREAMBLE
    pattern = re.compile(rf"<!-- soak:{kind}:start -->.*?<!-- soak:{kind}:end -->", re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text, current)
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(updated if updated.endswith("\n") else updated + "\n")
