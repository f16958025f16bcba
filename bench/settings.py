"""Django settings for the benchmark: ``agent_ledger`` on the bench database, admin and API.

``bench/run.py``, ``bench/soak.py`` and ``bench/audit_scale.py`` set the environment below before
``django.setup()``; nothing else should import this module.

- ``AGENT_LEDGER_BENCH_URL``: the database (default ``postgresql://postgres@127.0.0.1:5432/
  agent_ledger_bench``).
- ``AGENT_LEDGER_BENCH_SCHEMA``: the schema (search_path) the Django tables live in.
- ``AGENT_LEDGER_BENCH_POOL``: connections for DjangoStore: the size of Django's psycopg pool and
  ``AGENT_LEDGER["ASYNC_THREADS"]`` (the store's worker threads), the same size as the other
  targets' pools.
- ``AGENT_LEDGER_BENCH_HEALTH_CHECKS=1``: ``CONN_HEALTH_CHECKS`` (``run.py --pool-check``).
- ``AGENT_LEDGER_BENCH_DJANGO_CONN``: how Django holds connections:
  ``pool`` (default): Django's psycopg pool (``OPTIONS["pool"]``, ``CONN_MAX_AGE`` 0); every store
  call borrows a connection and gives it back.
  ``persistent``: no pool, ``CONN_MAX_AGE=None``: each worker thread keeps its own connection.
  ``close``: no pool, ``CONN_MAX_AGE=0`` (Django's default): a new connection per store call.
"""

import importlib.util
import os

from bench.common import APP_PREFIX, bench_url, url_parts

_db = url_parts(bench_url())
_schema = os.environ.get("AGENT_LEDGER_BENCH_SCHEMA", "bench_ours")
_pool = int(os.environ.get("AGENT_LEDGER_BENCH_POOL", "16"))
_conn = os.environ.get("AGENT_LEDGER_BENCH_DJANGO_CONN", "pool")
if _conn not in ("pool", "persistent", "close"):
    raise ValueError(f"AGENT_LEDGER_BENCH_DJANGO_CONN must be pool, persistent or close: {_conn!r}")

SECRET_KEY = "bench-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "bench.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db["dbname"],
        "USER": _db["user"],
        "PASSWORD": _db["password"],
        "HOST": _db["host"],
        "PORT": _db["port"],
        "CONN_MAX_AGE": None if _conn == "persistent" else 0,
        "CONN_HEALTH_CHECKS": os.environ.get("AGENT_LEDGER_BENCH_HEALTH_CHECKS") == "1",
        "OPTIONS": {
            "sslmode": "disable",
            "gssencmode": "disable",
            "application_name": f"{APP_PREFIX}:ours-django",
            "options": f"-c search_path={_schema}",
        },
    }
}
if _conn == "pool":
    DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": _pool, "max_size": _pool, "timeout": 30}
if os.environ.get("AGENT_LEDGER_BENCH_SERVER_BINDING") == "1":
    # Django's own knobs: bind parameters on the server, and let psycopg prepare statements a
    # connection runs often (Django leaves prepare_threshold None, so nothing is prepared).
    DATABASES["default"]["OPTIONS"]["server_side_binding"] = True
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = 2

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "agent_ledger",
]
if importlib.util.find_spec("rest_framework") is not None:
    INSTALLED_APPS.insert(-1, "rest_framework")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
AGENT_LEDGER = {"ASYNC_THREADS": _pool}
