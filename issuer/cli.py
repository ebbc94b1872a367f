"""The ``issuer`` command: parse arguments, call the same functions the server uses, print one line on error."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# A resource service installs the package without the server's dependencies; `issuer` then says so in one line.
SERVER_DEPENDENCIES = (
    "sqlalchemy",
    "asyncpg",
    "alembic",
    "argon2",
    "prometheus_client",
    "starlette",
    "email_validator",
)
_missing_server_dependency: str | None = None
try:
    from sqlalchemy.exc import DBAPIError

    from issuer.accounts.lockout import LockoutPolicy
    from issuer.clock import system_clock
    from issuer.errors import InvalidRequest
    from issuer.events.feed import event_retention
    from issuer.keys.importing import KeyImportError, load_rsa_private_key
    from issuer.keys.manager import KeyManager
    from issuer.keys.material import KeyDecryptionError
    from issuer.keys.policy import KeyPlan, RotationRefused
    from issuer.keys.records import key_state
    from issuer.logs import uvicorn_log_config
    from issuer.oauth.clients import ClientRegistry, parse_scopes
    from issuer.settings import ConfigError, Settings
    from issuer.storage.cleanup import cleanup
    from issuer.storage.database import Database, DatabaseUnavailable
    from issuer.storage.embedded import EmbeddedPostgres, EmbeddedPostgresError, ensure_database
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] not in SERVER_DEPENDENCIES:
        raise
    _missing_server_dependency = exc.name


GRACEFUL_SHUTDOWN_SECONDS = 5


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    if _missing_server_dependency is not None:
        print(
            f"issuer: the issuer server needs: pip install 'issuer[server]' ({_missing_server_dependency} is missing)",
            file=sys.stderr,
        )
        return 1
    parser = _parser()
    args = parser.parse_args(_protect_kid(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        with contextlib.ExitStack() as stack:
            if args.command == "dev" and not os.environ.get("DATABASE_URL"):
                os.environ["DATABASE_URL"] = stack.enter_context(_embedded_database(args.data_dir))
            if args.command == "dev":
                # In the environment, not only in these settings: each uvicorn worker reads its own.
                os.environ.setdefault("ACCOUNT_PAGE", "true")
                # The issuer is where it listens, unless told otherwise (`issuer dev --port 8411`).
                os.environ.setdefault("ISSUER_URL", f"http://{_url_host(args.host)}:{args.port}")
            settings = Settings.from_environ()
            return args.handler(settings, args) or 0
    except (ConfigError, CommandError, KeyDecryptionError, RotationRefused, EmbeddedPostgresError) as exc:
        print(f"issuer: {exc}", file=sys.stderr)
        return 1
    except (DatabaseUnavailable, DBAPIError, OSError, TimeoutError) as exc:  # DBAPIError: from Alembic
        print(f"issuer: cannot reach the database ({_short(exc)})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _protect_kid(argv: list[str]) -> list[str]:
    """A kid is base64url and one in 64 starts with '-', which argparse would take for an option."""
    if (
        argv[:2] == ["keys", "revoke"]
        and len(argv) == 3
        and argv[2].startswith("-")
        and argv[2] not in ("-h", "--help")
    ):
        return [*argv[:2], "--", argv[2]]
    return argv


def _short(exc: BaseException) -> str:
    """The driver's own first line: DatabaseUnavailable and SQLAlchemy's DBAPIError wrap it."""
    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else getattr(exc, "orig", None)
    text = str(cause or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="issuer", description="RS256 token issuer. Configured by environment.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the issuer with uvicorn", description="Run the issuer with uvicorn.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(handler=_serve)

    dev = commands.add_parser(
        "dev",
        help="development: embedded PostgreSQL (if DATABASE_URL is unset), migrate, serve",
        description="For a laptop (`make run`): with DATABASE_URL unset, start an embedded PostgreSQL keeping its "
        "data in --data-dir (pip install 'issuer[embedded]'), stopped when the issuer stops; then migrate and serve.",
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--data-dir", type=Path, default=Path(".pgdata"), help="the embedded database's folder")
    dev.set_defaults(handler=_dev, workers=1)

    migrate = commands.add_parser(
        "migrate", help="bring the schema to the latest version", description="Apply Alembic migrations (idempotent)."
    )
    migrate.set_defaults(handler=_migrate)

    clean = commands.add_parser(
        "cleanup",
        help="delete expired refresh tokens and ended sessions",
        description="Delete refresh tokens and families that ended more than CLEANUP_RETENTION seconds ago, and "
        "stale login-failure counters, in small batches.",
    )
    clean.set_defaults(handler=_cleanup)

    keys = commands.add_parser("keys", help="manage signing keys", description="Manage signing keys.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    listing = key_commands.add_parser(
        "list",
        help="show every key with its state and timestamps",
        description="Show every signing key, its state and timestamps.",
    )
    listing.set_defaults(handler=_keys_list)
    rotate = key_commands.add_parser(
        "rotate",
        help="publish a new key now; it signs after KEY_PUBLISH_LEAD",
        description="Generate a new key, publish it in the JWKS now, and let it sign after KEY_PUBLISH_LEAD "
        "(caches learn it first). The current key keeps being published until its tokens have expired.",
    )
    rotate.add_argument("--now", action="store_true", help="sign with the new key at once (caches may not know it)")
    rotate.set_defaults(handler=_keys_rotate)
    revoke = key_commands.add_parser(
        "revoke",
        help="compromise: remove a key from the JWKS now; another key signs now",
        description="For a compromised key: it leaves the JWKS at once, tokens it signed stop verifying, and "
        "another key (already published if there is one, else a new one) signs at once.",
    )
    revoke.add_argument("kid")
    revoke.set_defaults(handler=_keys_revoke)
    importing = key_commands.add_parser(
        "import",
        help="publish an operator-provided RSA key (PEM); it signs after KEY_PUBLISH_LEAD",
        description="Import an unencrypted PEM RSA private key (PKCS#8 or PKCS#1, >= 2048 bits) and schedule it "
        "like `rotate`.",
    )
    importing.add_argument("path", type=Path)
    importing.add_argument("--now", action="store_true", help="sign with it at once (caches may not know it)")
    importing.set_defaults(handler=_keys_import)
    prune = key_commands.add_parser(
        "prune",
        help="delete keys that are gone",
        description="Delete keys past their retiring window. Revoked keys are kept, so they cannot be imported again.",
    )
    prune.set_defaults(handler=_keys_prune)

    clients = commands.add_parser(
        "clients",
        help="manage resource servers' and gateways' credentials",
        description="Manage the credentials of resource servers and gateways (introspection, revocation, "
        "the security-event feed).",
    )
    client_commands = clients.add_subparsers(dest="clients_command", required=True, metavar="ACTION")
    adding = client_commands.add_parser(
        "add",
        help="register a client; prints its id and secret once, as one JSON line",
        description="Register a client. Prints one JSON line with client_id, client_secret and scope; the "
        "secret is shown only now (only its hash is stored).",
    )
    adding.add_argument("name", help="who this is, for `issuer clients list` (e.g. edge-gateway)")
    adding.add_argument(
        "--scope",
        required=True,
        help="comma-separated, of: introspect (POST /oauth2/introspect), revoke (POST /oauth2/revoke), "
        "events (POST /events/poll)",
    )
    adding.set_defaults(handler=_clients_add)
    client_list = client_commands.add_parser(
        "list", help="list registered clients", description="List registered clients (never their secrets)."
    )
    client_list.set_defaults(handler=_clients_list)
    removing = client_commands.add_parser(
        "remove", help="remove a client; its secret stops working at once", description="Remove a client."
    )
    removing.add_argument("client_id")
    removing.set_defaults(handler=_clients_remove)
    return parser


def _run(factory: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    return asyncio.run(factory()) or 0


# ---------------------------------------------------------------- serve / migrate


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    _run(lambda: _preflight(settings))
    print(f"issuer: listening on http://{args.host}:{args.port} (iss {settings.issuer_url})", flush=True)
    uvicorn.run(
        "issuer.http.app:create_served_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=False,  # X-Forwarded-For is judged by TRUSTED_PROXIES in the app, not by uvicorn
        server_header=False,
        log_config=uvicorn_log_config(),
        # Off by default: a line per request costs more than serving the JWKS; the audit events (logins,
        # refreshes, reuse, logouts, key changes) are logged either way, and gateways log requests.
        access_log=settings.access_log,
        # On SIGTERM uvicorn waits for open requests; a feed long poll would hold a deploy up to 25 s. After
        # this many seconds the rest are cancelled: a verifier just polls again (on another replica).
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0


async def _preflight(settings: Settings) -> None:
    """Fail before uvicorn starts, with one line: unreachable database, missing schema, wrong KEK."""
    db = Database(settings.database_url, size=1)
    try:
        if not await db.has_table("signing_keys"):
            raise CommandError("the database has no schema; run `issuer migrate` first")
        await KeyManager(db, settings, system_clock).ensure_signing_key()
    finally:
        await db.close()


@contextlib.contextmanager
def _embedded_database(data_dir: Path) -> Iterator[str]:
    """The URL of database ``issuer`` on an embedded PostgreSQL, running until the block ends."""
    with EmbeddedPostgres(data_dir.resolve()) as server:
        url = ensure_database(server.dsn(), "issuer")
        print(f"issuer: embedded PostgreSQL on {urlsplit(url).hostname}:{urlsplit(url).port}, data in {data_dir}")
        yield url


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    _migrate(settings, args)
    return _serve(settings, args)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from issuer.storage.migrations import upgrade

    upgrade(settings.database_url)
    print("issuer: schema is up to date")
    return 0


def _cleanup(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        db = Database(settings.database_url, size=1)
        try:
            report = await cleanup(
                db,
                now=system_clock(),
                retention=timedelta(seconds=settings.cleanup_retention),
                failure_window=LockoutPolicy(threshold=settings.login_lockout_threshold).window,
                event_retention=event_retention(settings),
            )
        finally:
            await db.close()
        print(
            f"deleted {report.tokens} refresh token(s), {report.families} session(s), "
            f"{report.login_failures} login-failure counter(s), {report.events} security event(s)"
        )

    return _run(run)


# ---------------------------------------------------------------- keys


@contextlib.asynccontextmanager
async def _key_manager(settings: Settings) -> AsyncIterator[KeyManager]:
    db = Database(settings.database_url, size=1)
    try:
        manager = KeyManager(db, settings, system_clock)
        await manager.reload()  # proves the KEK opens the stored keys before anything is written
        yield manager
    finally:
        await db.close()


def _print_plan(plan: KeyPlan) -> None:
    for warning in plan.warnings:
        print(f"issuer: WARNING: {warning}", file=sys.stderr)
    if plan.insert is not None:
        print(f"published {plan.insert.kid}; signs from {_ts(plan.insert.activate_at)}")
    for kid, values in plan.updates.items():
        changes = ", ".join(f"{name} {_ts(value)}" for name, value in values.items())
        print(f"{kid}: {changes}")


def _keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _key_manager(settings) as keys:
            _print_plan(await keys.rotate(immediate=args.now))

    return _run(run)


def _keys_import(settings: Settings, args: argparse.Namespace) -> int:
    try:
        private_key = load_rsa_private_key(args.path)
    except KeyImportError as exc:
        raise CommandError(str(exc)) from None

    async def run() -> None:
        async with _key_manager(settings) as keys:
            _print_plan(await keys.rotate(immediate=args.now, private_key=private_key))

    return _run(run)


def _keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _key_manager(settings) as keys:
            _print_plan(await keys.revoke(args.kid))

    return _run(run)


def _keys_prune(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _key_manager(settings) as keys:
            kids = await keys.prune()
        print(f"pruned {len(kids)} key(s)" + (": " + ", ".join(kids) if kids else ""))

    return _run(run)


def _keys_list(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _key_manager(settings) as keys:
            records = await keys.records()
        now = system_clock()
        grace = KeyManager.retire_grace(settings)
        rows = [("KID", "STATE", "BITS", "PUBLISH_AT", "ACTIVATE_AT", "RETIRE_AT", "REVOKED_AT")]
        for r in records:
            rows.append(
                (
                    r.kid,
                    key_state(r, now, grace).value,
                    str(r.key_bits),
                    _ts(r.publish_at),
                    _ts(r.activate_at),
                    _ts(r.retire_at),
                    _ts(r.revoked_at),
                )
            )
        _print_table(rows)

    return _run(run)


# ---------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def _client_registry(settings: Settings) -> AsyncIterator[ClientRegistry]:
    db = Database(settings.database_url, size=1)
    try:
        yield ClientRegistry(db, system_clock)
    finally:
        await db.close()


def _clients_add(settings: Settings, args: argparse.Namespace) -> int:
    try:
        scopes = parse_scopes(args.scope)
    except InvalidRequest as exc:
        raise CommandError(f"--scope: {exc.detail}") from None

    async def run() -> None:
        async with _client_registry(settings) as registry:
            try:
                created = await registry.add(args.name, scopes)
            except InvalidRequest as exc:
                raise CommandError(exc.detail) from None
        print(json.dumps(created.as_json()))

    return _run(run)


def _clients_list(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _client_registry(settings) as registry:
            registered = await registry.list()
        rows = [("CLIENT_ID", "SCOPE", "CREATED_AT", "NAME")]
        rows += [(c.client_id, ",".join(sorted(c.scopes)), _ts(c.created_at), c.name) for c in registered]
        _print_table(rows)

    return _run(run)


def _clients_remove(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _client_registry(settings) as registry:
            if not await registry.remove(args.client_id):
                raise CommandError(f"no client {args.client_id!r}")
        print(f"removed {args.client_id}")

    return _run(run)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _ts(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    raise SystemExit(main())
