"""The cluster soak (`make soak`, and a shorter run in `make test`): three `issuer serve` replicas behind
HAProxy, PgBouncer in transaction mode in front of PostgreSQL, mixed load with faults, and checks computed
from every recorded response and from the database.

A package at the repository root rather than a module of ``bench/``: the bench measures speed against
baselines, the soak checks correctness under faults; the soak has four parts (the cluster and its faults,
the load, the checks, the report), and the test in tests/soak/ imports them without the bench's machinery.

- ``soak.cluster``: a fresh database, PgBouncer (the test suite's configuration, tests/pooler/pgbouncer.py),
  the replicas, HAProxy, and the fault actions (kill -9 and restart, PgBouncer down and up, key CLI).
- ``soak.load``: virtual users on their own loopback addresses (httpx on asyncio), every response recorded.
- ``soak.checks``: the issue's checks, each from the records and the database.
- ``soak.report``: the table, printed and written to docs/operations.md.
- ``soak.run``: the schedule of a run (full: about 3 minutes; short: about 35 s).
"""
