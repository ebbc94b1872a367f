"""In-process micro-benchmarks: token verification, the argon2id bound of the login path, an audit line."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc import jwt
from joserfc.jwk import RSAKey
from joserfc.util import urlsafe_b64decode

from bench.rounds import mirrored
from issuer.accounts.passwords import argon2id
from issuer.audit import AuditLog
from issuer.logs import JsonStreamHandler
from issuer.settings import Argon2Params
from issuer.verifier import AccessTokenVerifier, JWKSCache

ISSUER = "https://issuer.bench"
AUDIENCE = "api"
# The argon2 bound hashes on one thread per core, as the issuer does.
HASH_THREADS = os.cpu_count() or 1


def per_second(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` in a tight loop, after a short warm-up."""
    for _ in range(200):
        fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(100):
            fn()
        calls += 100
    return calls / elapsed


def verification(seconds: float, rounds: int = 6) -> dict[str, float]:
    """Verifications per second of one RS256 access token: raw cryptography, PyJWT, and our verifier.

    Each gets ``seconds`` in all, in ``rounds`` slices taken in turn in mirrored order (raw, PyJWT, ours,
    ours, PyJWT, raw, ...), so that the box's drift (up to 25% within a minute) falls on all three alike."""
    key = RSAKey.generate_key(2048, parameters={"kid": "bench", "alg": "RS256"})
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "exp": now + 900,
        "jti": "j",
        "sid": "s",
        "tokenVersion": 0,
        "email": "a@example.com",
        "role": "user",
    }
    token = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": "bench"}, claims, key)
    public = RSAKey.import_key(key.as_dict(private=False))
    prepared = public.get_op_key("verify")  # a cryptography RSAPublicKey, parsed once

    def raw() -> None:
        signing_input, _, signature = token.rpartition(".")
        prepared.verify(
            urlsafe_b64decode(signature.encode()), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )

    def with_pyjwt() -> None:
        pyjwt.decode(token, prepared, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)

    contenders = {"raw": raw, "pyjwt": with_pyjwt, "ours": _our_verifier(public, token)}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for name in mirrored(list(contenders), rounds):
        rates[name].append(per_second(contenders[name], seconds / rounds))
    return {name: sum(taken) / rounds for name, taken in rates.items()}


def _our_verifier(public: RSAKey, token: str) -> Callable[[], Any]:
    """The shipped verifier with a warm key cache, driven synchronously (one coroutine step per call)."""
    jwks = {"keys": [public.as_dict()]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=jwks))
    cache = JWKSCache(jwks_uri=f"{ISSUER}/jwks", http_client=httpx.AsyncClient(transport=transport))
    checker = AccessTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=cache)
    asyncio.run(checker.verify(token))  # warms the cache

    def ours() -> None:
        coroutine = checker.verify(token)
        try:
            coroutine.send(None)
        except StopIteration:
            return
        coroutine.close()
        raise RuntimeError("the verifier awaited on a warm cache")

    return ours


def argon2_bound(params: Argon2Params, seconds: float) -> float:
    """argon2id verifications per second with the configured parameters on every core (the login ceiling)."""
    hasher = argon2id(params)
    stored = hasher.hash("correct horse battery staple")
    deadline = time.perf_counter() + seconds

    def worker() -> int:
        done = 0
        while time.perf_counter() < deadline:
            hasher.verify(stored, "correct horse battery staple")
            done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        total = sum(pool.map(lambda _: worker(), range(HASH_THREADS)))
    return total / (time.perf_counter() - started)


def audit_line_cpu(log: Path, seconds: float) -> float:
    """CPU seconds (user and system, so the write to the file counts) of one audit line of a successful
    refresh, as ``issuer serve`` writes it: ``issuer.audit.audit`` into a ``JsonStreamHandler`` on a file, like
    the bench server's stderr. A private logger, so the process's logging configuration is left alone."""
    logger = logging.getLogger("bench.audit")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    with log.open("a") as sink:
        handler = JsonStreamHandler(sink)
        logger.addHandler(handler)
        try:
            line = AuditLog(logger)

            def one() -> None:
                line(
                    "refresh",
                    "success",
                    user_id="0b6f7d1e-3c52-4d6e-9a43-5f0c6a1d2e77",
                    ip="203.0.113.7",
                    user_agent="Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0",
                    session_id="8d1e0c4b-7a2f-4e9b-b1d3-2c6f5e8a9b10",
                    replayed=False,
                )

            for _ in range(1000):
                one()
            calls, started = 0, time.process_time()
            while (elapsed := time.process_time() - started) < seconds:
                for _ in range(1000):
                    one()
                calls += 1000
        finally:
            logger.removeHandler(handler)
    return elapsed / calls
