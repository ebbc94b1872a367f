"""`issuer keys ...`: rotate, revoke, import, list, prune, and refusals that write nothing.

The CLI runs in-process (``issuer.cli.main``) against the test database, configured through the environment
exactly like the test app, and on the same FakeClock so key states are deterministic.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import update

from issuer.keys import importing, material
from issuer.keys.manager import KeyManager
from issuer.keys.material import encrypt_private_key, new_key_record
from issuer.keys.records import KeyState
from issuer.settings import Secret, Settings
from issuer.storage.schema import signing_keys
from issuer.verifier import jwks
from tests.support.clock import FakeClock
from tests.support.http import bearer, login, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import kid_of, token_kid
from tests.support.keys import Cli, assert_refused, by_kid, insert_key, jwks_kids, key_rows, only_new


def ts(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, fmt: str) -> bytes:
    formats = {"pkcs8": serialization.PrivateFormat.PKCS8, "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL}
    return key.private_bytes(serialization.Encoding.PEM, formats[fmt], serialization.NoEncryption())


# ---------------------------------------------------------------- rotate


async def test_rotate_now_signs_at_once_and_warns(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, client: httpx.AsyncClient, cli: Cli
) -> None:
    await register(client)
    before = await key_rows(settings.database_url)
    (old,) = [r.kid for r in before]
    old_token = (await login(client))["access_token"]

    clock.advance(42)
    result = await cli("keys", "rotate", "--now")
    assert result.code == 0, result
    assert "WARNING" in result.err
    assert "kid" in result.err.lower() or "cache" in result.err.lower()
    rows = await key_rows(settings.database_url)
    new = only_new(rows, before)
    assert new.kid in result.out
    assert new.publish_at == new.activate_at == clock.now
    assert by_kid(rows)[old].retire_at == clock.now

    await issuer.services.keys.reload()
    assert token_kid((await login(client))["access_token"]) == new.kid
    assert await jwks_kids(client) == {old, new.kid}  # the old key stays published while its tokens live
    assert (await client.get("/auth/me", headers=bearer(old_token))).status_code == 200


async def test_second_rotate_while_a_key_waits_is_refused_and_writes_nothing(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, cli: Cli
) -> None:
    first = await cli("keys", "rotate")
    assert first.code == 0, first
    assert "WARNING" not in first.err
    before = await key_rows(settings.database_url)
    assert len(before) == 2
    waiting = max(before, key=lambda r: r.generation)
    assert waiting.activate_at == clock.now + timedelta(seconds=settings.key_publish_lead)

    clock.advance(settings.key_publish_lead - 1)
    assert_refused(await cli("keys", "rotate"), waiting.kid, "--now")
    assert await key_rows(settings.database_url) == before

    clock.advance(1)  # once the waiting key signs, rotating is allowed again
    again = await cli("keys", "rotate")
    assert again.code == 0, again
    assert len(await key_rows(settings.database_url)) == 3


# ---------------------------------------------------------------- revoke


async def test_revoke_unknown_or_already_revoked_kid_is_refused(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, cli: Cli
) -> None:
    before = await key_rows(settings.database_url)
    assert_refused(await cli("keys", "revoke", "no-such-kid"), "no-such-kid")
    assert await key_rows(settings.database_url) == before

    (active,) = [r.kid for r in before]
    assert (await cli("keys", "revoke", active)).code == 0
    after_first = await key_rows(settings.database_url)
    clock.advance(5)
    assert_refused(await cli("keys", "revoke", active), active, "revoked")
    assert await key_rows(settings.database_url) == after_first


async def test_revoke_takes_a_kid_that_starts_with_a_dash(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, cli: Cli
) -> None:
    """One kid in 64 starts with '-' (base64url); argparse must not read it as an option."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "-dash" + "A" * 38
    record = replace(
        new_key_record(settings.kek, now=clock(), activate_at=clock(), private_key=private),
        kid=kid,
        private_key_enc=encrypt_private_key(settings.kek, kid, private),
        generation=1000,
    )
    await insert_key(settings.database_url, record)
    result = await cli("keys", "revoke", kid)
    assert result.code == 0, result
    assert by_kid(await key_rows(settings.database_url))[kid].revoked_at == clock.now
    assert (await cli("keys", "revoke", "-no-such-kid")).err_lines == ["issuer: no key with kid -no-such-kid"]


# ---------------------------------------------------------------- import


@pytest.mark.parametrize(("fmt", "now"), [("pkcs8", False), ("pkcs1", False), ("pkcs8", True), ("pkcs1", True)])
async def test_import_publishes_the_operators_key_under_its_thumbprint(
    settings: Settings,
    clock: FakeClock,
    issuer: IssuerHarness,
    client: httpx.AsyncClient,
    cli: Cli,
    tmp_path: Path,
    fmt: str,
    now: bool,
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = pem(private, fmt)
    assert (b"BEGIN RSA PRIVATE KEY" in data) == (fmt == "pkcs1")
    path = tmp_path / "signing.pem"
    path.write_bytes(data)
    expected_kid = kid_of(private)

    before = await key_rows(settings.database_url)
    result = await cli("keys", "import", str(path), *(["--now"] if now else []))
    assert result.code == 0, result
    record = only_new(await key_rows(settings.database_url), before)
    assert record.kid == expected_kid
    assert expected_kid in result.out
    assert record.key_bits == 2048
    assert record.publish_at == clock.now
    lead = timedelta(0) if now else timedelta(seconds=settings.key_publish_lead)
    assert record.activate_at == clock.now + lead
    assert ("WARNING" in result.err) == now
    assert data not in record.private_key_enc

    await register(client)
    await issuer.services.keys.reload()
    assert expected_kid in await jwks_kids(client)
    clock.advance(lead.total_seconds())
    token = (await login(client))["access_token"]
    assert token_kid(token) == expected_kid
    # Signed with the imported private key itself, not with a key that merely carries its kid.
    claims = jwt.decode(
        token,
        key=private.public_key(),
        algorithms=["RS256"],
        audience=settings.audience,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["iss"] == settings.issuer_url


async def test_importing_a_key_already_in_the_set_is_refused(
    settings: Settings, issuer: IssuerHarness, cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048), "pkcs8"))
    assert (await cli("keys", "import", str(path), "--now")).code == 0
    before = await key_rows(settings.database_url)
    assert_refused(await cli("keys", "import", str(path), "--now"), "already")
    assert await key_rows(settings.database_url) == before


async def test_a_revoked_key_cannot_be_imported_again_even_after_prune(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "leaked.pem"
    path.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048), "pkcs8"))
    assert (await cli("keys", "import", str(path), "--now")).code == 0
    leaked = (await key_rows(settings.database_url))[-1].kid
    assert (await cli("keys", "revoke", leaked)).code == 0
    clock.advance(KeyManager.retire_grace(settings).total_seconds() + 1)
    assert (await cli("keys", "prune")).code == 0
    before = await key_rows(settings.database_url)
    assert leaked in {r.kid for r in before}
    assert_refused(await cli("keys", "import", str(path), "--now"), "already")
    assert await key_rows(settings.database_url) == before


def weak_rsa_key() -> rsa.RSAPrivateKey:
    """A 1024-bit key: exactly what import must refuse."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


def _write(data: bytes) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "key.pem"
        path.write_bytes(data)
        return path

    return make


def _key_file(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> Callable[[Path], Path]:
    return _write(pem(key, "pkcs8"))


def _encrypted(fmt: serialization.PrivateFormat) -> Callable[[Path], Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _write(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"hunter2-hunter2"))
    )


_RSA_PUBLIC_ONLY = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)

REFUSED_IMPORTS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "rsa-1024": (_key_file(weak_rsa_key()), ("1024", "2048")),
    "ec-p256": (_key_file(ec.generate_private_key(ec.SECP256R1())), ("EC", "not RSA")),
    "ed25519": (_key_file(ed25519.Ed25519PrivateKey.generate()), ("Ed25519", "not RSA")),
    "garbage": (_write(secrets.token_bytes(700)), ("PEM",)),
    "garbage-text": (_write(b"this is not a key\n"), ("PEM",)),
    "garbage-in-pem-armour": (
        _write(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n"),
        ("private key",),
    ),
    "public-key-only": (_write(_RSA_PUBLIC_ONLY), ("private key",)),
    "encrypted-pkcs8": (_encrypted(serialization.PrivateFormat.PKCS8), ("encrypted",)),
    "encrypted-pkcs1": (_encrypted(serialization.PrivateFormat.TraditionalOpenSSL), ("encrypted",)),
    "empty": (_write(b""), ("PEM",)),
    "missing": (lambda directory: directory / "does-not-exist.pem", ("cannot read",)),
    "directory": (lambda directory: directory, ("cannot read",)),
}


@pytest.mark.parametrize("case", sorted(REFUSED_IMPORTS))
@pytest.mark.parametrize("now", [False, True])
async def test_import_refuses_unusable_files_and_writes_nothing(
    settings: Settings, issuer: IssuerHarness, cli: Cli, tmp_path: Path, case: str, now: bool
) -> None:
    make, needles = REFUSED_IMPORTS[case]
    path = make(tmp_path)
    before = await key_rows(settings.database_url)
    assert len(before) == 1
    line = assert_refused(await cli("keys", "import", str(path), *(["--now"] if now else [])), *needles)
    assert str(path) in line
    assert await key_rows(settings.database_url) == before


async def test_import_into_an_empty_table_refuses_a_small_key_and_writes_nothing(
    settings: Settings, cli: Cli, tmp_path: Path
) -> None:
    path = _key_file(weak_rsa_key())(tmp_path)
    assert_refused(await cli("keys", "import", str(path)), "1024")
    assert await key_rows(settings.database_url) == []


async def test_import_refuses_a_key_larger_than_verifiers_accept(
    settings: Settings, issuer: IssuerHarness, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every gateway running issuer.verifier drops keys over its maximum, so such a key must never sign.

    A key over the real maximum (16384 bits) takes minutes to generate: the limit is lowered instead, and the
    test below pins that the issuer's limit is the verifier's."""
    monkeypatch.setattr(importing, "MAX_RSA_BITS", 2048)
    path = _key_file(rsa.generate_private_key(public_exponent=65537, key_size=3072))(tmp_path)
    before = await key_rows(settings.database_url)
    assert_refused(await cli("keys", "import", str(path), "--now"), "3072", "at most 2048")
    assert await key_rows(settings.database_url) == before


def test_the_issuers_key_size_limits_are_the_verifiers() -> None:
    importer = (importing.MIN_RSA_BITS, importing.MAX_RSA_BITS)
    generator = (material.MIN_RSA_BITS, material.MAX_RSA_BITS)
    assert importer == generator == (jwks.MIN_RSA_BITS, jwks.MAX_RSA_BITS) == (2048, 16384)
    with pytest.raises(ValueError, match="2048 to 16384"):
        new_key_record(
            Secret(secrets.token_bytes(32)),
            now=datetime.now(UTC),
            activate_at=datetime.now(UTC),
            private_key=weak_rsa_key(),
        )


# ---------------------------------------------------------------- list and prune


async def every_state(settings: Settings, clock: FakeClock, cli: Cli) -> dict[KeyState, str]:
    """Key rows in each state: gone, revoked, retiring, active, published (the issuer made the first)."""

    async def newest_after(command: tuple[str, ...]) -> str:
        before = await key_rows(settings.database_url)
        result = await cli(*command)
        assert result.code == 0, result
        return only_new(await key_rows(settings.database_url), before).kid

    (gone,) = [r.kid for r in await key_rows(settings.database_url)]
    retiring = await newest_after(("keys", "rotate", "--now"))  # `gone` starts retiring
    clock.advance(KeyManager.retire_grace(settings).total_seconds() + 1)  # ... and is gone now
    clock.advance(1)
    revoked = await newest_after(("keys", "rotate", "--now"))
    clock.advance(1)
    active = await newest_after(("keys", "rotate", "--now"))
    clock.advance(1)
    assert (await cli("keys", "revoke", revoked)).code == 0  # was retiring; `active` keeps signing
    clock.advance(1)
    published = await newest_after(("keys", "rotate"))
    # `retiring` stopped signing when `revoked` started: still inside its window.
    retire_at = by_kid(await key_rows(settings.database_url))[retiring].retire_at
    assert retire_at is not None
    assert clock.now < retire_at + KeyManager.retire_grace(settings)
    return {
        KeyState.GONE: gone,
        KeyState.REVOKED: revoked,
        KeyState.RETIRING: retiring,
        KeyState.ACTIVE: active,
        KeyState.PUBLISHED: published,
    }


async def test_list_prints_every_key_with_state_and_timestamps(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, cli: Cli
) -> None:
    kids = await every_state(settings, clock, cli)
    rows = by_kid(await key_rows(settings.database_url))
    result = await cli("keys", "list")
    assert result.code == 0, result
    assert result.err == ""
    lines = result.out.splitlines()
    header = lines[0].split()
    assert header[:2] == ["KID", "STATE"]
    for column in ("PUBLISH_AT", "ACTIVATE_AT", "RETIRE_AT", "REVOKED_AT"):
        assert column in header
    assert len(lines) == 1 + len(rows)
    table = {cells[0]: dict(zip(header, cells, strict=True)) for cells in (line.split() for line in lines[1:])}
    assert set(table) == set(rows)
    for state, kid in kids.items():
        record = rows[kid]
        assert table[kid]["STATE"] == state.value, (kid, table[kid])
        assert table[kid]["PUBLISH_AT"] == ts(record.publish_at)
        assert table[kid]["ACTIVATE_AT"] == ts(record.activate_at)
        assert table[kid]["RETIRE_AT"] == ts(record.retire_at)
        assert table[kid]["REVOKED_AT"] == ts(record.revoked_at)
    assert table[kids[KeyState.REVOKED]]["REVOKED_AT"] != "-"
    assert table[kids[KeyState.PUBLISHED]]["RETIRE_AT"] == "-"
    assert await key_rows(settings.database_url) == list(rows.values())  # listing writes nothing


async def test_prune_removes_only_gone_keys(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, client: httpx.AsyncClient, cli: Cli
) -> None:
    kids = await every_state(settings, clock, cli)
    before = by_kid(await key_rows(settings.database_url))
    result = await cli("keys", "prune")
    assert result.code == 0, result
    assert "pruned 1" in result.out
    after = by_kid(await key_rows(settings.database_url))
    # Revoked keys stay as tombstones so a compromised key can never be imported again.
    kept = {kids[KeyState.RETIRING], kids[KeyState.ACTIVE], kids[KeyState.PUBLISHED], kids[KeyState.REVOKED]}
    assert set(after) == kept
    assert all(after[kid] == before[kid] for kid in kept)  # untouched, not rewritten

    await issuer.services.keys.reload()
    assert await jwks_kids(client) == kept - {kids[KeyState.REVOKED]}
    await register(client)
    assert token_kid((await login(client))["access_token"]) == kids[KeyState.ACTIVE]

    # Nothing more to prune, and a retiring key survives until the very end of its window.
    assert "pruned 0" in (await cli("keys", "prune")).out
    retiring = after[kids[KeyState.RETIRING]]
    assert retiring.retire_at is not None
    clock.now = retiring.retire_at + KeyManager.retire_grace(settings) - timedelta(seconds=1)
    assert "pruned 0" in (await cli("keys", "prune")).out
    assert set(by_kid(await key_rows(settings.database_url))) == kept
    clock.advance(1)
    assert "pruned 1" in (await cli("keys", "prune")).out
    assert set(by_kid(await key_rows(settings.database_url))) == kept - {kids[KeyState.RETIRING]}


# ---------------------------------------------------------------- wrong KEK


@pytest.mark.parametrize(
    "command", [("keys", "list"), ("keys", "rotate"), ("keys", "rotate", "--now"), ("keys", "prune")]
)
async def test_a_wrong_kek_is_refused_before_anything_is_written(
    settings: Settings, issuer: IssuerHarness, cli: Cli, command: tuple[str, ...]
) -> None:
    before = await key_rows(settings.database_url)
    cli.set_kek(secrets.token_bytes(32))
    assert_refused(await cli(*command), "ISSUER_KEK")
    assert await key_rows(settings.database_url) == before


async def test_a_wrong_kek_refuses_revoke_and_import(
    settings: Settings, issuer: IssuerHarness, cli: Cli, tmp_path: Path
) -> None:
    before = await key_rows(settings.database_url)
    path = _key_file(rsa.generate_private_key(public_exponent=65537, key_size=2048))(tmp_path)
    cli.set_kek(secrets.token_bytes(32))
    assert_refused(await cli("keys", "revoke", before[0].kid), "ISSUER_KEK")
    assert_refused(await cli("keys", "import", str(path)), "ISSUER_KEK")
    assert await key_rows(settings.database_url) == before


async def test_a_wrong_kek_is_refused_even_when_every_key_is_gone(
    settings: Settings, clock: FakeClock, issuer: IssuerHarness, cli: Cli
) -> None:
    """With no key left to sign, a wrong KEK must not quietly create a new key under itself."""
    # Every key revoked (as after a KEK compromise clean-up): nothing is left for the KEK check to decrypt.
    async with issuer.engine.begin() as conn:
        await conn.execute(update(signing_keys).values(revoked_at=clock.now))
    before = await key_rows(settings.database_url)
    cli.set_kek(secrets.token_bytes(32))
    assert_refused(await cli("keys", "rotate", "--now"), "ISSUER_KEK")
    assert await key_rows(settings.database_url) == before


@pytest.mark.parametrize("kek", ["not base64 at all!", "c2hvcnQ"])
async def test_a_malformed_kek_names_the_variable(
    settings: Settings, issuer: IssuerHarness, cli: Cli, monkeypatch: pytest.MonkeyPatch, kek: str
) -> None:
    monkeypatch.setenv("ISSUER_KEK", kek)
    assert_refused(await cli("keys", "list"), "ISSUER_KEK")
