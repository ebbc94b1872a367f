"""The JWKS document across replicas: its Cache-Control leaves room for key changes, its ETag follows the key set.

Several app instances share one PostgreSQL database (and here one FakeClock); the tests call ``reload()``
where a replica would have re-read the key table by itself.
"""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest

from issuer.keys.manager import KeyManager
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.issuer import running_issuer, with_settings, without_listen
from tests.support.keys import JWKS, jwks_kids, reload_all, replicas


def max_age(response: httpx.Response) -> int:
    match = re.fullmatch(r"public, max-age=(\d+)", response.headers["cache-control"])
    assert match, response.headers["cache-control"]
    return int(match.group(1))


@pytest.mark.parametrize(
    ("jwks_max_age", "publish_lead", "reload_interval"),
    [(300, 600, 10), (300, 300, 10), (300, 305, 10), (3600, 3600, 60), (60, 600, 1), (0, 0, 1)],
)
async def test_jwks_max_age_leaves_room_for_replicas_that_have_not_reloaded(
    settings: Settings, clock: FakeClock, jwks_max_age: int, publish_lead: int, reload_interval: int
) -> None:
    tuned = with_settings(
        settings, jwks_max_age=jwks_max_age, key_publish_lead=publish_lead, key_reload_interval=reload_interval
    )
    async with running_issuer(tuned, clock) as harness, harness.client() as c:
        response = await c.get(JWKS)
        assert response.status_code == 200
        served = max_age(response)
        assert served == KeyManager.jwks_max_age(tuned)
        assert served <= jwks_max_age
        assert served <= max(0, publish_lead - reload_interval)
        # The 304 carries the same caching instructions.
        again = await c.get(JWKS, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304
        assert max_age(again) == served


async def test_a_gateway_cache_filled_by_a_stale_replica_expires_before_the_new_key_signs(
    settings: Settings, clock: FakeClock
) -> None:
    # b hears no notification (its LISTEN connection is down), the worst case the reload interval covers.
    async with (
        running_issuer(settings, clock) as a,
        running_issuer(without_listen(settings), clock) as b,
        b.client() as cb,
    ):
        plan = await a.services.keys.rotate()
        assert plan.insert is not None
        new = plan.insert.kid
        # Worst case: b re-reads the table a full reload interval later; a gateway fetches from b just before.
        clock.advance(settings.key_reload_interval - 1)
        stale = await cb.get(JWKS)
        assert new not in {k["kid"] for k in stale.json()["keys"]}
        cached_until = clock.now + timedelta(seconds=max_age(stale))
        clock.advance(1)
        await b.services.keys.reload()
        assert new in await jwks_kids(cb)
        assert cached_until < plan.insert.activate_at, "the gateway would meet the new kid before refetching"


async def test_jwks_etag_follows_the_key_set(settings: Settings, clock: FakeClock) -> None:
    async with replicas(settings, clock, 2) as (a, b), a.client() as ca, b.client() as cb:
        first = await ca.get(JWKS)
        etag1 = first.headers["etag"]
        assert (await cb.get(JWKS)).headers["etag"] == etag1  # replicas agree, so revalidation works behind a balancer

        not_modified = await ca.get(JWKS, headers={"If-None-Match": etag1})
        assert not_modified.status_code == 304
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag1
        assert (await ca.get(JWKS, headers={"If-None-Match": '"something-else"'})).status_code == 200

        clock.advance(120)  # time alone changes nothing
        assert (await ca.get(JWKS)).headers["etag"] == etag1

        plan = await a.services.keys.rotate()
        assert plan.insert is not None
        await reload_all([a, b])
        second = await ca.get(JWKS)
        etag2 = second.headers["etag"]
        assert etag2 != etag1
        assert plan.insert.kid in {k["kid"] for k in second.json()["keys"]}
        assert (await cb.get(JWKS)).headers["etag"] == etag2

        stale = await ca.get(JWKS, headers={"If-None-Match": etag1})
        assert stale.status_code == 200, "a 304 for an outdated ETag would hide the new key"
        assert stale.content == second.content
        assert (await ca.get(JWKS, headers={"If-None-Match": etag2})).status_code == 304
        assert (await ca.get(JWKS, headers={"If-None-Match": f"W/{etag2}"})).status_code == 304
        assert (await ca.get(JWKS, headers={"If-None-Match": f"{etag1}, {etag2}"})).status_code == 304

        clock.advance(settings.key_publish_lead)  # the new key signs; the set of published keys is the same
        assert (await ca.get(JWKS)).headers["etag"] == etag2

        clock.advance(KeyManager.retire_grace(settings).total_seconds())  # the old key leaves
        third = await cb.get(JWKS)
        assert third.headers["etag"] not in {etag1, etag2}
        assert {k["kid"] for k in third.json()["keys"]} == {plan.insert.kid}
        assert (await cb.get(JWKS, headers={"If-None-Match": etag2})).status_code == 200
