"""A soak run: its schedule, the orchestration of load and faults, and the report.

``python -m soak`` runs the full schedule (about 3 minutes); ``python -m soak --short`` the one the test
suite runs (about 35 s). Both exit 1 when a check fails. The faults run in threads beside the load (they
wait on processes), so the load never pauses for them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from soak import checks, report
from soak.checks import Facts, Row, Window
from soak.cluster import REPLICA_ENVIRONMENT, Cluster, running_cluster
from soak.load import PASSWORD, Client, Record, Recorder, VirtualUser, access_parts, address

BOUNCER_DOWN = 5.0  # seconds PgBouncer stays stopped (the outage)
RECOVERY_SLACK = 2.0  # seconds after a fault's recovery still counted in its window (stale pooled connections)
PROBE_INTERVAL = 0.05


@dataclass(frozen=True)
class Schedule:
    """Seconds from the start of the load."""

    kind: str
    heading: str
    duration: float
    users: int
    rotate_at: float
    revoke_at: float
    kill_at: float
    kill_for: float
    bouncer_at: float
    throttle_at: float


FULL = Schedule("full", "Full run (`make soak`)", 170, 24, 20, 40, 65, 5, 100, 140)
SHORT = Schedule("short", "Short run (`make test`, tests/soak/test_soak.py)", 36, 8, 4, 8, 12, 2, 20, 30)


@dataclass
class Outcome:
    rows: list[Row]
    records: list[Record]
    facts: Facts
    text: str

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)


async def _until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


async def _revoked_at(cluster: Cluster, kid: str) -> float:
    conn = await asyncpg.connect(cluster.direct_url, timeout=5)
    try:
        moment: datetime = await conn.fetchval("SELECT revoked_at FROM signing_keys WHERE kid = $1", kid)
        return moment.timestamp()
    finally:
        await conn.close()


class Soak:
    def __init__(self, cluster: Cluster, schedule: Schedule) -> None:
        self.cluster = cluster
        self.schedule = schedule
        self.recorder = Recorder()
        self.seed = secrets.randbelow(10**6)
        self.facts = Facts(
            started=time.time(),
            rate_limit_per_minute=int(REPLICA_ENVIRONMENT["RATE_LIMIT_PER_IP"]),
            lockout_threshold=int(REPLICA_ENVIRONMENT["LOGIN_LOCKOUT_THRESHOLD"]),
        )
        self.log: list[str] = []
        self._clients: list[Client] = []

    def note(self, text: str) -> None:
        line = f"t+{time.time() - self.facts.started:5.1f}s {text}"
        self.log.append(line)
        print(f"soak: {line}", flush=True)

    def client(self, block: int, index: int, name: str) -> Client:
        made = Client(name, address(block, index), self.cluster.issuer_url, self.recorder)
        self._clients.append(made)
        return made

    async def run(self) -> Outcome:
        s, t0 = self.schedule, self.facts.started
        until = t0 + s.duration
        users = [
            VirtualUser(i, address(1, i), self.cluster.issuer_url, self.recorder, self.seed) for i in range(s.users)
        ]
        self._clients += users
        probes = [
            VirtualUser(100 + i, address(4, i), self.cluster.issuer_url, self.recorder, self.seed) for i in range(3)
        ]
        victim = VirtualUser(200, address(5, 0), self.cluster.issuer_url, self.recorder, self.seed)
        self._clients += [*probes, victim]
        for extra in [*probes, victim]:
            await extra.retried("register", "POST", "/auth/register", body={"email": extra.email, "password": PASSWORD})
        load = [asyncio.create_task(user.run(until)) for user in users]
        self.note(f"{s.users} users on {self.cluster.issuer_url}")
        try:
            await _until(t0 + s.rotate_at)
            await self.rotate()
            await _until(t0 + s.revoke_at - 1.5)
            await self.revoke(probes)
            await _until(t0 + s.kill_at)
            await self.kill_and_restart(s.kill_for)
            await _until(t0 + s.bouncer_at)
            await self.bouncer_outage()
            await _until(t0 + s.throttle_at)
            await self.ip_burst()
            await self.lockout_burst(victim)
            await asyncio.gather(*load)
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
            for made in self._clients:
                await made.close()
        self.note(f"load stopped: {len(self.recorder.records)} requests recorded")
        database = await checks.database_facts(self.cluster.direct_url)
        rows = checks.check_all(self.recorder.records, self.facts, database)
        elapsed = time.time() - t0
        timeline = "Timeline (seconds from the start of the load):\n\n" + "\n".join(f"- {line}" for line in self.log)
        summary = report.load_summary(self.recorder.records, elapsed)
        text = report.section(s.kind, s.heading, rows, summary, timeline)
        return Outcome(rows, self.recorder.records, self.facts, text)

    # ------------------------------------------------------------ keys

    async def rotate(self) -> None:
        await asyncio.to_thread(self.cluster.issuer_command, "keys", "rotate", "--now")
        self.facts.rotated_at = time.time()
        self.facts.rotated_kid = await self.cluster.newest_kid()
        self.note(f"issuer keys rotate --now: {self.facts.rotated_kid[:8]}... signs")

    async def revoke(self, probes: list[VirtualUser]) -> None:
        """Probe users log in (their tokens are signed with the active key), then call /auth/me every 50 ms
        from before the revoke of that key until 3 s after it."""
        tokens = []
        for probe in probes:
            session = await probe.login()
            if session is not None:
                tokens.append((probe, session.access_token))
        kid = access_parts(tokens[0][1])[0] if tokens else await self.cluster.newest_kid()
        assert kid is not None
        done = asyncio.Event()

        async def hammer(probe: VirtualUser, token: str) -> None:
            while not done.is_set():
                await probe.call("probe", "GET", "/auth/me", access_token=token)
                await asyncio.sleep(PROBE_INTERVAL)

        hammering = [asyncio.create_task(hammer(p, t)) for p, t in tokens]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(self.cluster.issuer_command, "keys", "revoke", kid)
        self.facts.revoked_kid, self.facts.revoked_at = kid, await _revoked_at(self.cluster, kid)
        self.note(f"issuer keys revoke {kid[:8]}... (the active key; {len(tokens)} probes on its tokens)")
        await asyncio.sleep(3.0)
        done.set()
        await asyncio.gather(*hammering)

    # ------------------------------------------------------------ faults

    async def kill_and_restart(self, down: float) -> None:
        replica = self.cluster.replicas[1]
        start = time.time()
        await asyncio.to_thread(self.cluster.kill_replica, replica)
        self.note(f"kill -9 replica {replica.name}")
        await asyncio.sleep(down)
        await asyncio.to_thread(self.cluster.start_replica, replica)
        await self.cluster.wait_serving(replica)
        await self.cluster.wait_balanced(replica)
        end = time.time()
        self.note(f"replica {replica.name} restarted and back in the balancer after {end - start:.1f} s")
        self.facts.windows.append(Window(f"kill -9 {replica.name}", start, end + RECOVERY_SLACK))

    async def bouncer_outage(self) -> None:
        start = time.time()
        await asyncio.to_thread(self.cluster.stop_bouncer)
        self.note(f"PgBouncer stopped for {BOUNCER_DOWN:g} s")
        await asyncio.sleep(BOUNCER_DOWN)
        await asyncio.to_thread(self.cluster.start_bouncer)
        await self.cluster.wait_serving()
        end = time.time()
        self.note(f"PgBouncer restarted; /readyz 200 through the balancer {end - start:.1f} s after the stop")
        self.facts.windows.append(Window("PgBouncer down", start, end + RECOVERY_SLACK))

    # ------------------------------------------------------------ throttles

    async def ip_burst(self) -> None:
        """Logins of unknown emails from one address, 20 at a time, over every replica: 40 more than the
        bucket holds."""
        attacker = self.client(2, 0, "attacker")
        count = self.facts.rate_limit_per_minute + 40
        for batch in range(0, count, 20):
            await asyncio.gather(
                *(
                    attacker.call(
                        "attack_ip",
                        "POST",
                        "/auth/login",
                        body={"email": f"nobody{batch + i}-{self.seed}@soak.example", "password": "wrong password"},
                    )
                    for i in range(min(20, count - batch))
                )
            )
        self.note(f"{count} logins from one address")

    async def lockout_burst(self, victim: VirtualUser) -> None:
        """Wrong passwords for one account, all at once, each from an address of its own."""
        guessers = [self.client(3, i, f"guesser{i}") for i in range(16)]
        await asyncio.gather(
            *(
                g.call("attack_lockout", "POST", "/auth/login", body={"email": victim.email, "password": "wrong guess"})
                for g in guessers
            )
        )
        self.note(f"{len(guessers)} parallel wrong passwords for one account")


def run(schedule: Schedule) -> Outcome:
    with running_cluster() as cluster:
        print(f"soak: cluster up in {cluster.directory} (logs there)", flush=True)
        return asyncio.run(Soak(cluster, schedule).run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the ~35 s run of the test suite")
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave docs/operations.md")
    parser.add_argument("--records", metavar="PATH", help="also write every record there, one JSON object a line")
    options = parser.parse_args(argv)
    outcome = run(SHORT if options.short else FULL)
    print(outcome.text)
    if options.records:
        with open(options.records, "w") as output:
            for record in outcome.records:
                output.write(json.dumps(dataclasses.asdict(record)) + "\n")
    if not options.no_write:
        report.write_section((SHORT if options.short else FULL).kind, outcome.text)
        print(f"soak: written to {report.OPERATIONS}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
