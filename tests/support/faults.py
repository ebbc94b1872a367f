"""A TCP proxy between the issuer and the test PostgreSQL server: it counts round trips on the wire and breaks
connections on demand (not collected: no ``test_`` prefix).

Counting. The proxy reads the frontend protocol (the client's messages) and records every exchange that makes
the server answer and the client wait: a ``Sync`` (which ends an extended-protocol batch: how asyncpg prepares
and runs a statement) and a ``Query`` (a simple-protocol statement such as ``BEGIN``, ``COMMIT`` or a pool's
reset). That is the number of round trips whatever library sends them, so a hidden BEGIN/COMMIT, a ping on
checkout or a second statement all show up; each :class:`RoundTrip` names the statements it ran, for the
failure message. The proxy answers the client's SSL and GSSAPI encryption requests itself with "no", so the
connection stays readable whatever the server supports.

Faults:

- :meth:`PostgresProxy.cut`: every connection is dropped and new ones are refused (the server is down, a
  reset network);
- :meth:`PostgresProxy.stall`: a partition; nothing moves on open connections, and new ones are accepted but
  never answered;
- :meth:`PostgresProxy.drop_at`: one connection dies at a chosen statement, either before the statement
  reaches the server or after the server has run it and answered (the answer is lost);
- :meth:`PostgresProxy.restore` ends a cut or a stall.

The upstream server is the one the suite uses (:func:`tests.support.database.admin_dsn`, so the embedded server
too); :meth:`PostgresProxy.url` turns a database URL on that server into the same URL through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx

from tests.support.database import admin_dsn
from tests.support.http import assert_error, retry_after

# Start-up packets carry no type byte: a length, then one of these codes (or a protocol version).
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
# The server's ReadyForQuery: the end of its answer to a Sync or a Query.
READY_FOR_QUERY = b"Z"


@dataclass(frozen=True)
class RoundTrip:
    """One exchange that made the server answer and the client wait.

    ``statements``: what it ran, whitespace-collapsed and shortened (``PREPARE ...`` for a statement being
    prepared); ``simple``: a simple-protocol Query (a BEGIN, a COMMIT, a reset) rather than a Sync.
    """

    statements: tuple[str, ...]
    simple: bool = False

    def __str__(self) -> str:
        return ("QUERY " if self.simple else "") + " | ".join(self.statements or ("(sync)",))


@dataclass
class _Fault:
    """A connection dies when it next runs a statement whose SQL contains ``sql``."""

    sql: str
    after_answer: bool


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    # Prepared statements by name, from the client's Parse messages (names are per connection).
    prepared: dict[str, str] = field(default_factory=dict)
    # The statements bound since the last Sync.
    batch: list[str] = field(default_factory=list)
    # Set when the statement now running is to have its answer lost: the server's messages are dropped and
    # the connection is aborted at the answer's end.
    losing_answer: bool = False

    def transports(self) -> list[asyncio.Transport]:
        writers = [self.client] if self.upstream is None else [self.client, self.upstream]
        return [cast(asyncio.Transport, writer.transport) for writer in writers]

    def abort(self) -> None:
        for transport in self.transports():
            transport.abort()

    def pause(self) -> None:
        """Read nothing more from either side (what was read is already forwarded)."""
        for transport in self.transports():
            transport.pause_reading()

    def resume(self) -> None:
        for transport in self.transports():
            transport.resume_reading()


def _short(sql: str, limit: int = 100) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _cstrings(body: bytes, count: int) -> list[str]:
    """The first ``count`` NUL-terminated strings of a message body."""
    return [part.decode("utf-8", "replace") for part in body.split(b"\0", count)[:count]]


class PostgresProxy:
    """A loopback forwarder to PostgreSQL that counts round trips and breaks connections (module docstring)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.round_trips: list[RoundTrip] = []
        # Every message type the clients sent after start-up, by type byte ("S" Sync, "Q" Query, "B" Bind...).
        self.sent: Counter[str] = Counter()
        self.refused = 0  # connection attempts refused while cut
        self.held = 0  # connection attempts accepted and never answered while stalled
        self.dropped = 0  # connections killed by a drop_at fault
        self._server: asyncio.Server | None = None
        self._up = True
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._fault: _Fault | None = None

    # ------------------------------------------------------------ set-up

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, database_url: str) -> str:
        """``database_url`` (a URL on the upstream server) through the proxy."""
        parts = urlsplit(database_url)
        assert (parts.hostname, parts.port or 5432) == self.upstream, (
            f"{parts.hostname}:{parts.port} is not the server this proxy forwards to ({self.upstream})"
        )
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def close(self) -> None:
        self.cut()
        self._flowing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:
            _, pending = await asyncio.wait(self._handlers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------ counting

    def mark(self) -> int:
        """A point in the record of round trips, for :meth:`since`."""
        return len(self.round_trips)

    def since(self, mark: int) -> list[RoundTrip]:
        """The round trips made after ``mark``."""
        return self.round_trips[mark:]

    # ------------------------------------------------------------ faults

    def cut(self) -> None:
        """Drop every connection and refuse new ones, until :meth:`restore`."""
        self._up = False
        for link in list(self._links):
            link.abort()

    def stall(self) -> None:
        """Let nothing through on open connections, and accept new ones without answering, until
        :meth:`restore`."""
        self._flowing.clear()
        for link in list(self._links):
            link.pause()

    def restore(self) -> None:
        self._up = True
        self._flowing.set()
        for link in list(self._links):
            link.resume()

    def drop_at(self, sql: str, *, after_answer: bool) -> None:
        """Kill the next connection that runs a statement containing ``sql``, once: before the statement
        reaches the server (``after_answer`` False: the server never sees it), or after the server has run
        it, committed and answered (``after_answer`` True: the answer never reaches the client).
        :attr:`dropped` counts the kills."""
        self._fault = _Fault(sql, after_answer)

    # ------------------------------------------------------------ forwarding

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if not self._up:
                self.refused += 1
                writer.transport.abort()
                return
            if not self._flowing.is_set():
                # Accepted, never answered; when the partition ends the client has long given up on it.
                self.held += 1
                await self._flowing.wait()
                writer.transport.abort()
                return
            link = _Link(writer)
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            self._links.add(link)
            if not self._up:  # cut while this connection was being opened
                link.abort()
            elif not self._flowing.is_set():  # stalled meanwhile: this one stalls too
                link.pause()
            try:
                await asyncio.gather(self._from_client(reader, link), self._from_server(up_reader, link))
            finally:
                self._links.discard(link)
                link.abort()
        finally:
            self._handlers.discard(task)

    async def _from_client(self, reader: asyncio.StreamReader, link: _Link) -> None:
        upstream = link.upstream
        assert upstream is not None
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:  # start-up packets: a length, then a code (encryption requests come first)
                head = await reader.readexactly(8)
                length, code = struct.unpack("!II", head)
                body = await reader.readexactly(length - 8)
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    link.client.write(b"N")  # "not supported": the client goes on in plain text
                    continue
                upstream.write(head + body)
                await upstream.drain()
                break
            while True:
                head = await reader.readexactly(5)
                kind, length = head[:1].decode("ascii", "replace"), struct.unpack("!I", head[1:])[0]
                body = await reader.readexactly(length - 4)
                if self._observe(link, kind, body):
                    self.dropped += 1
                    link.abort()
                    return
                upstream.write(head + body)
                await upstream.drain()
        link.abort()

    def _observe(self, link: _Link, kind: str, body: bytes) -> bool:
        """Record a client message; True when it must not reach the server (a fault kills the connection)."""
        self.sent[kind] += 1
        statement: str | None = None
        if kind == "P":  # Parse: statement name, query
            name, query = _cstrings(body, 2)
            link.prepared[name] = query
            link.batch.append("PREPARE " + _short(query))
        elif kind == "B":  # Bind: portal name, statement name
            _, name = _cstrings(body, 2)
            statement = link.prepared.get(name, name)
            link.batch.append(_short(statement))
        elif kind == "S":  # Sync
            self.round_trips.append(RoundTrip(tuple(link.batch)))
            link.batch.clear()
        elif kind == "Q":  # a simple-protocol Query
            (statement,) = _cstrings(body, 1)
            self.round_trips.append(RoundTrip((_short(statement),), simple=True))
        fault = self._fault
        if statement is None or fault is None or fault.sql not in statement:
            return False
        self._fault = None
        if fault.after_answer:
            link.losing_answer = True
            return False
        return True

    async def _from_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        # Every server message is typed (the proxy answered the encryption requests itself).
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
                if link.losing_answer:
                    if head[:1] == READY_FOR_QUERY:  # the statement ran to its end; the client never hears
                        self.dropped += 1
                        link.abort()
                        return
                    continue
                link.client.write(head + body)
                await link.client.drain()
        link.abort()


def assert_unavailable(response: httpx.Response) -> None:
    """The answer to a database fault: 503 ``temporarily_unavailable`` with ``Retry-After``, never cached, and no
    token or cookie in it (the client's refresh token stays the one it holds)."""
    assert_error(response, 503, "temporarily_unavailable")
    retry_after(response)
    assert response.headers["cache-control"] == "no-store"
    assert "set-cookie" not in response.headers
    assert "access_token" not in response.text
    assert "refresh_token" not in response.text


def upstream_address() -> tuple[str, int]:
    """The host and port of the PostgreSQL server the suite uses."""
    parts = urlsplit(admin_dsn())
    assert parts.hostname, f"the test server is not reachable over TCP ({admin_dsn()!r}): the proxy needs a host"
    return parts.hostname, parts.port or 5432


@contextlib.asynccontextmanager
async def postgres_proxy() -> AsyncIterator[PostgresProxy]:
    """A started :class:`PostgresProxy` in front of the test server, closed (every connection dropped) after."""
    proxy = PostgresProxy(*upstream_address())
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
