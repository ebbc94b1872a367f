"""Registered clients (resource servers, gateways) of the client-authenticated endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from issuer.storage.database import ConstraintViolation, Executor, Row, Statement, rows_affected


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    secret_hash: bytes
    scopes: frozenset[str]
    created_at: datetime


class ClientExists(Exception):
    """The client id is taken (ids are random: only a bug or a retried insert gets here)."""


_COLUMNS = "client_id, name, secret_hash, scope, created_at"

INSERT = Statement(f"INSERT INTO clients ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5)")
BY_ID = Statement(f"SELECT {_COLUMNS} FROM clients WHERE client_id = $1", retry_safe=True)
ALL = Statement(f"SELECT {_COLUMNS} FROM clients ORDER BY created_at, client_id", retry_safe=True)
DELETE = Statement("DELETE FROM clients WHERE client_id = $1")


def _client(row: Row) -> Client:
    return Client(
        client_id=row["client_id"],
        name=row["name"],
        secret_hash=row["secret_hash"],
        scopes=frozenset(row["scope"].split()),
        created_at=row["created_at"],
    )


async def insert(db: Executor, client: Client) -> None:
    try:
        await db.execute(
            INSERT,
            client.client_id,
            client.name,
            client.secret_hash,
            " ".join(sorted(client.scopes)),
            client.created_at,
        )
    except ConstraintViolation as exc:
        raise ClientExists(client.client_id) from exc


async def by_id(db: Executor, client_id: str) -> Client | None:
    row = await db.fetchrow(BY_ID, client_id)
    return None if row is None else _client(row)


async def all_clients(db: Executor) -> list[Client]:
    return [_client(row) for row in await db.fetch(ALL)]


async def delete(db: Executor, client_id: str) -> bool:
    return rows_affected(await db.execute(DELETE, client_id)) == 1
