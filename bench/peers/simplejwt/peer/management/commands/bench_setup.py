"""``manage.py bench_setup EMAIL --history N``: the bench user, and a past like the issuer's.

Run after ``manage.py migrate``. The issuer's database gets 20,000 past sessions of the bench user, each
with four consumed refresh tokens and a live one, before anything is measured (``bench.run``); this gives
the peer's tables the same shape: five outstanding tokens per past session, four of them blacklisted.
"""

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, transaction

HISTORY_SQL = """
WITH g AS (SELECT n, md5('history:' || n) AS jti FROM generate_series(1, %s) AS n),
o AS (
    INSERT INTO token_blacklist_outstandingtoken (user_id, jti, token, created_at, expires_at)
    SELECT %s, g.jti, repeat('h', %s), now(), now() + interval '7 days' FROM g
    RETURNING id, jti
)
INSERT INTO token_blacklist_blacklistedtoken (token_id, blacklisted_at)
SELECT o.id, now() FROM o JOIN g USING (jti) WHERE g.n %% 5 <> 0
"""


class Command(BaseCommand):
    help = "Create the bench user (once) and a history of refresh tokens like the issuer bench's."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("--password", default="correct horse battery staple")
        parser.add_argument("--history", type=int, default=0, help="past sessions (five tokens each)")
        parser.add_argument("--token-length", type=int, default=520, help="characters of a stored token")

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model()
        with transaction.atomic():
            user = users.objects.filter(username=options["email"]).first()
            if user is None:
                user = users.objects.create_user(options["email"], options["email"], options["password"])
            if options["history"]:
                with connection.cursor() as cursor:
                    cursor.execute(HISTORY_SQL, [options["history"] * 5, user.pk, options["token_length"]])
