"""Signing keys at rest: only public members are served, the database alone does not give the private key away,
and a KEK that does not open the stored keys stops start-up before anything is written."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.http.app import create_app
from issuer.keys.material import KeyDecryptionError, decrypt_private_key, new_key_record
from issuer.settings import Secret, Settings
from issuer.storage.database import connect_arguments
from issuer.storage.schema import signing_keys
from tests.support.clock import FakeClock
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import b64url
from tests.support.keys import insert_key, key_rows

PUBLIC_MEMBERS = {"kty", "kid", "use", "alg", "n", "e"}
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8")


def secret_fragments(private_key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    """Every form in which the private key could have been stored in clear."""
    numbers = private_key.private_numbers()
    fragments: dict[str, bytes] = {}
    for encoding_name, encoding in (("der", serialization.Encoding.DER), ("pem", serialization.Encoding.PEM)):
        for format_name, private_format in (
            ("pkcs8", serialization.PrivateFormat.PKCS8),
            ("pkcs1", serialization.PrivateFormat.TraditionalOpenSSL),
        ):
            blob = private_key.private_bytes(encoding, private_format, serialization.NoEncryption())
            fragments[f"{encoding_name}-{format_name}"] = blob
            if encoding_name == "pem":
                lines = blob.decode("ascii").strip().splitlines()[1:-1]
                fragments[f"pem-body-{format_name}"] = "".join(lines).encode("ascii")
                # A single base64 line is enough to prove the PEM leaked (guards against re-wrapping).
                fragments[f"pem-line-{format_name}"] = lines[len(lines) // 2].encode("ascii")
    for name in ("d", "p", "q", "dmp1", "dmq1", "iqmp"):
        raw = int_bytes(getattr(numbers, name))
        fragments[f"{name}-bytes"] = raw
        fragments[f"{name}-base64url"] = b64url(raw).encode("ascii")
        fragments[f"{name}-hex"] = raw.hex().encode("ascii")
        fragments[f"{name}-decimal"] = str(getattr(numbers, name)).encode("ascii")
    return fragments


async def table_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    """The signing_keys table's cells as the database holds them (SQLAlchemy Core, not the issuer's statements)."""
    async with engine.connect() as conn:
        result = await conn.execute(select(signing_keys).order_by(signing_keys.c.generation))
        return [dict(row._mapping) for row in result]


async def refused_startup(settings: Settings, clock: FakeClock) -> KeyDecryptionError:
    """Run the app's start-up as ``running_issuer`` does; it must fail on the stored keys."""
    app = create_app(settings, clock=clock)
    with pytest.raises(KeyDecryptionError) as caught:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started with a KEK that does not open its keys")
    return caught.value


async def backends(database_url: str) -> set[int]:
    """The server processes connected to the test database now (other than the one asking)."""
    conn = await asyncpg.connect(**connect_arguments(database_url), timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


async def test_jwks_has_public_members_only(client: httpx.AsyncClient, issuer: IssuerHarness) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert set(key) == PUBLIC_MEMBERS, key
        assert not set(key) & PRIVATE_MEMBERS
        assert key["kty"] == "RSA"
        assert key["use"] == "sig"
        assert key["alg"] == "RS256"
    # Nor does any private number appear anywhere in the document.
    for loaded in issuer.services.keys.ring.keys:
        private = loaded.signing_key.private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        for name, fragment in secret_fragments(private).items():
            assert fragment not in response.content, name


async def test_private_key_is_not_stored_in_clear(issuer: IssuerHarness) -> None:
    ring = issuer.services.keys.ring
    assert ring.keys
    rows = {row["kid"]: row for row in await table_rows(issuer.engine)}
    for loaded in ring.keys:
        private = loaded.signing_key.private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        row = rows[loaded.record.kid]
        cells = {column: as_bytes(value) for column, value in row.items()}
        whole_row = b"\x00".join(cells.values())
        fragments = secret_fragments(private)
        # The search can succeed: the fragments are real key material of a realistic size.
        assert len(fragments["der-pkcs8"]) > 1000
        assert len(fragments["d-bytes"]) >= 255
        for name, fragment in fragments.items():
            for column, cell in cells.items():
                assert fragment not in cell, f"{name} found in signing_keys.{column}"
            assert fragment not in whole_row, name
        public = json.loads(row["public_jwk"])
        assert set(public) == PUBLIC_MEMBERS
        # The blob really is this key, sealed with the KEK: opening it gives the same private numbers.
        opened = decrypt_private_key(issuer.services.settings.kek, loaded.record.kid, bytes(row["private_key_enc"]))
        assert opened.private_numbers() == private.private_numbers()


async def test_another_kek_does_not_decrypt(issuer: IssuerHarness) -> None:
    (row,) = await table_rows(issuer.engine)
    blob = bytes(row["private_key_enc"])
    other = Secret(secrets.token_bytes(32))
    with pytest.raises(KeyDecryptionError):
        decrypt_private_key(other, row["kid"], blob)
    # A KEK one bit away fails just the same.
    kek = bytearray(issuer.services.settings.kek.reveal())
    kek[0] ^= 1
    with pytest.raises(KeyDecryptionError):
        decrypt_private_key(Secret(bytes(kek)), row["kid"], blob)
    # Control: the right KEK opens it.
    decrypt_private_key(issuer.services.settings.kek, row["kid"], blob)


async def test_tampered_ciphertext_does_not_decrypt(issuer: IssuerHarness) -> None:
    (row,) = await table_rows(issuer.engine)
    kek = issuer.services.settings.kek
    blob = bytearray(row["private_key_enc"])
    for position in (0, 12, len(blob) // 2, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(KeyDecryptionError):
            decrypt_private_key(kek, row["kid"], bytes(tampered))


async def test_startup_with_another_kek_fails_naming_issuer_kek_and_writes_nothing(
    settings: Settings, clock: FakeClock
) -> None:
    async with running_issuer(settings, clock) as harness:
        assert harness.services.keys.signing_key(clock()) is not None
    before = await key_rows(settings.database_url)
    assert len(before) == 1

    wrong = with_settings(settings, kek=Secret(secrets.token_bytes(32)))
    message = str(await refused_startup(wrong, clock))
    assert "ISSUER_KEK" in message
    assert "\n" not in message
    assert wrong.kek.reveal().hex() not in message
    assert b64url(wrong.kek.reveal()) not in message
    # It did not "repair" the table by creating a fresh key it can open, nor touch the one it could not.
    assert await key_rows(settings.database_url) == before

    # Control: the right KEK still starts, with the same key.
    async with running_issuer(settings, clock) as harness:
        signing = harness.services.keys.signing_key(clock())
        assert signing is not None
        assert signing.record.kid == before[0].kid
    assert await key_rows(settings.database_url) == before


async def test_ciphertext_is_bound_to_its_kid(settings: Settings, clock: FakeClock, issuer: IssuerHarness) -> None:
    (first,) = await key_rows(settings.database_url)
    # A second, published key, as a rotation would write it (generations are unique per table).
    second = new_key_record(
        settings.kek, now=clock(), activate_at=clock() + timedelta(seconds=settings.key_publish_lead)
    )
    await insert_key(settings.database_url, replace(second, generation=first.generation + 1))
    rows = await table_rows(issuer.engine)
    assert len(rows) == 2
    first_row, second_row = rows
    first_blob, second_blob = bytes(first_row["private_key_enc"]), bytes(second_row["private_key_enc"])

    # Control: each blob opens under its own kid.
    decrypt_private_key(settings.kek, first_row["kid"], first_blob)
    decrypt_private_key(settings.kek, second_row["kid"], second_blob)
    # Same KEK, but the kid is the associated data: a blob moved to another row does not open.
    with pytest.raises(KeyDecryptionError):
        decrypt_private_key(settings.kek, first_row["kid"], second_blob)
    with pytest.raises(KeyDecryptionError):
        decrypt_private_key(settings.kek, second_row["kid"], first_blob)

    # Swap the blobs in the database: the issuer refuses to start rather than sign under the wrong kid.
    async with issuer.engine.begin() as conn:
        for kid, blob in ((first_row["kid"], second_blob), (second_row["kid"], first_blob)):
            await conn.execute(update(signing_keys).where(signing_keys.c.kid == kid).values(private_key_enc=blob))
    await refused_startup(settings, clock)


def test_encryption_uses_a_fresh_nonce(settings: Settings, clock: FakeClock) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    first = new_key_record(settings.kek, now=clock(), activate_at=clock(), private_key=private)
    second = new_key_record(settings.kek, now=clock(), activate_at=clock(), private_key=private)
    assert first.kid == second.kid
    assert first.private_key_enc != second.private_key_enc
    assert first.private_key_enc[:12] != second.private_key_enc[:12]


async def test_failed_startup_closes_its_connection_pool(
    settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_issuer(settings, clock):
        pass
    before = await backends(settings.database_url)

    pools: list[asyncpg.Pool] = []
    create_pool = asyncpg.create_pool

    async def spy(*args: Any, **kwargs: Any) -> asyncpg.Pool:
        pool: asyncpg.Pool = await create_pool(*args, **kwargs)
        pools.append(pool)
        return pool

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg, "create_pool", spy)  # what issuer.storage.database calls
        await refused_startup(with_settings(settings, kek=Secret(secrets.token_bytes(32))), clock)

    assert len(pools) == 1, "the start-up read the keys through one pool"
    (pool,) = pools
    assert pool.is_closing()
    assert pool.get_size() == 0, "a connection was left open in the pool"
    # And the server agrees: no backend of the failed start-up is still connected (a closed connection's
    # backend exits a moment after the client's goodbye).
    for _ in range(50):
        lingering = await backends(settings.database_url) - before
        if not lingering:
            break
        await asyncio.sleep(0.05)
    assert not lingering, f"backends of the failed start-up still connected: {lingering}"
