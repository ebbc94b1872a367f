"""Schema migrations through Alembic, from code (``issuer migrate``) and from the tests.

The migration scripts live once, in the repository's ``migrations/`` next to ``alembic.ini`` (where developers
run ``alembic``). The wheel ships that directory inside the package as ``issuer/migrations`` (see
``[tool.setuptools]`` in pyproject.toml), and an installed issuer has no ``alembic.ini``: so the Alembic
configuration is built here, in code, pointing at whichever copy exists. It is not found by importing
``issuer.migrations``: setuptools' editable installs cannot import a package without ``__init__.py`` that is
mapped to another directory, so an editable install (``make``) finds the checkout's directory instead.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config


def script_location() -> Path:
    """The directory holding ``env.py`` and ``versions/``: inside the installed package, else the checkout's."""
    package = Path(str(files("issuer")))
    installed = package / "migrations"  # a wheel (or sdist) install
    if (installed / "env.py").is_file():
        return installed
    checkout = package.parent / "migrations"  # the repository: a plain or an editable install
    if (checkout / "env.py").is_file() and (package.parent / "alembic.ini").is_file():
        return checkout
    # Not an OSError: `issuer` reports those as an unreachable database.
    raise RuntimeError(f"no Alembic migrations in {installed} or {checkout}: a broken installation")


def alembic_config(database_url: str) -> Config:
    config = Config()
    # set_main_option interpolates '%'; a directory's name may contain one.
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str) -> None:
    """Bring the schema to the newest revision; a no-op when it is already there. Blocking: call from sync code."""
    command.upgrade(alembic_config(database_url), "head")
