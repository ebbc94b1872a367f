"""The bench peer: a Django project as a team would write it for JWT refresh with djangorestframework-simplejwt.

Refresh tokens rotate and the presented one is blacklisted (``ROTATE_REFRESH_TOKENS``,
``BLACKLIST_AFTER_ROTATION``, the ``token_blacklist`` app), tokens are RS256, and the project keeps
``startproject``'s middleware. Persistent database connections (``CONN_MAX_AGE``), as Django's deployment
checklist advises: with the default of 0 every request would also open a PostgreSQL connection.

Configured by the bench (``bench/peers/simplejwt_bench.py``) through the environment:
``PEER_DATABASE_URL`` (``postgresql://user@host:port/name``) and ``PEER_SIGNING_KEY_FILE`` (a PEM RSA
private key).
"""

import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import serialization

_db = urlsplit(os.environ["PEER_DATABASE_URL"])
_private_pem = Path(os.environ["PEER_SIGNING_KEY_FILE"]).read_bytes()
_public_pem = (
    serialization.load_pem_private_key(_private_pem, password=None)
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)

SECRET_KEY = os.environ.get("PEER_SECRET_KEY", "bench-peer-only-never-deployed")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "peer",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "peer.urls"
WSGI_APPLICATION = "peer.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.path.lstrip("/"),
        "USER": unquote(_db.username or "postgres"),
        "PASSWORD": unquote(_db.password or ""),
        "HOST": _db.hostname or "127.0.0.1",
        "PORT": str(_db.port or 5432),
        "CONN_MAX_AGE": 600,
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework_simplejwt.authentication.JWTAuthentication"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
}

# The issuer's defaults: 15-minute access tokens, 7-day refresh tokens.
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=15),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=7),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "ALGORITHM": "RS256",
    "SIGNING_KEY": _private_pem.decode(),
    "VERIFYING_KEY": _public_pem.decode(),
    "AUDIENCE": "api",
    "ISSUER": "http://peer",
}

LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
