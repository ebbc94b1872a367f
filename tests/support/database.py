"""Which PostgreSQL server the tests use, as an admin DSN (a superuser on its ``postgres`` database).

1. ``TEST_DATABASE_ADMIN_DSN``, when set to a DSN;
2. else PostgreSQL on 127.0.0.1:5432, when it lets user ``postgres`` in;
3. else an embedded server (:mod:`issuer.storage.embedded`; the ``[embedded]`` extra), started once per test
   process in a temporary directory and stopped, and the directory removed, at interpreter exit.

``TEST_DATABASE_ADMIN_DSN=embedded`` skips step 2: the suite then runs as on a laptop without PostgreSQL.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from issuer.storage.embedded import EmbeddedPostgres

ENV = "TEST_DATABASE_ADMIN_DSN"
EMBEDDED = "embedded"
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROBE_TIMEOUT = 2.0  # seconds; a local server answers in milliseconds


@functools.cache
def admin_dsn() -> str:
    """The admin DSN for this test process (the embedded server, if chosen, starts on the first call)."""
    return choose(os.environ, answers) or _start_embedded()


def choose(environ: Mapping[str, str], probe: Callable[[str], bool]) -> str | None:
    """The configured or local server's DSN, or None for the embedded one."""
    configured = environ.get(ENV, "").strip()
    if configured == EMBEDDED:
        return None
    if configured:
        return configured
    return LOCAL_DSN if probe(LOCAL_DSN) else None


def answers(dsn: str) -> bool:
    """Whether a server at ``dsn`` accepts a connection within PROBE_TIMEOUT (safe inside an event loop)."""
    import asyncpg  # type: ignore[import-untyped,unused-ignore]

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=PROBE_TIMEOUT)
        await conn.close()

    ok: list[bool] = []

    def target() -> None:
        try:
            asyncio.run(probe())
        except Exception:  # refused, timed out, rejected the user: any failure means "no"
            return
        ok.append(True)

    thread = threading.Thread(target=target, name="database-probe")
    thread.start()
    thread.join()
    return bool(ok)


def _start_embedded() -> str:
    root = Path(tempfile.mkdtemp(prefix="issuer-tests-pg-"))
    root.chmod(0o711)  # as root, the server's unprivileged account must reach root/data
    server = EmbeddedPostgres(root / "data", durable=False)
    atexit.register(_discard, server, root)
    return server.start()


def _discard(server: EmbeddedPostgres, root: Path) -> None:
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
