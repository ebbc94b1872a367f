"""The shipped verifier is importable by a resource service without pulling in the server side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULES = ("sqlalchemy", "asyncpg", "argon2", "aiosqlite", "alembic", "issuer.app", "issuer.store")

CHECK = (
    "import issuer.verifier, sys; "
    f"bad=[m for m in {SERVER_MODULES!r} if m in sys.modules]; "
    "assert not bad, bad; "
    "assert callable(issuer.verifier.verify_access_token); "
    "print('verifier-ok')"
)


def run(code: str) -> subprocess.CompletedProcess[str]:
    # Fixed code, run with this interpreter in a fresh process: no untrusted input reaches the command line.
    return subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_verifier_imports_no_server_modules() -> None:
    result = run(CHECK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "verifier-ok"


def test_the_check_can_fail() -> None:
    """Control: importing the server side in the same way is detected."""
    result = run(CHECK.replace("import issuer.verifier,", "import issuer.verifier, issuer.store,"))
    assert result.returncode != 0
    assert "issuer.store" in result.stderr
