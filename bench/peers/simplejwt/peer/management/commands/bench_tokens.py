"""``manage.py bench_tokens EMAIL COUNT PATH``: COUNT fresh refresh tokens of the user, one per line, in PATH.

Each is issued as simplejwt's login view issues one (``RefreshToken.for_user``, which records it as an
outstanding token), without the password hash the login view would spend on each.
"""

from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from rest_framework_simplejwt.tokens import RefreshToken


class Command(BaseCommand):
    help = "Write fresh refresh tokens of a user to a file, one per line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("count", type=int)
        parser.add_argument("path", type=Path)

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.get(username=options["email"])
        tokens = [str(RefreshToken.for_user(user)) for _ in range(options["count"])]
        options["path"].write_text("\n".join(tokens) + "\n")
