"""Test settings. ``DATABASE_URL`` picks the database (a temporary SQLite file by default)."""

import os
import tempfile

import dj_database_url

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": dj_database_url.parse(os.environ.get("DATABASE_URL", "sqlite://:memory:")),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: DjangoStore's async methods query from worker threads, each with its
    # own connection, and they must all see the test's rows. IMMEDIATE transactions take the
    # write lock up front, so concurrent writers wait (up to timeout) instead of failing with
    # "database is locked" when a read lock cannot be upgraded.
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get("SQLITE_TEST_NAME")
        or os.path.join(tempfile.gettempdir(), f"agent_ledger_test_{os.getpid()}.sqlite3")
    }
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    if DATABASES["default"]["NAME"] in ("", ":memory:"):
        # Never opened (tests use TEST NAME); a file name keeps agent_ledger.W001 quiet.
        DATABASES["default"]["NAME"] = DATABASES["default"]["TEST"]["NAME"]
else:
    # One test database per run, so runs side by side on one server do not drop each other's.
    DATABASES["default"]["TEST"] = {"NAME": f"test_agent_ledger_{os.getpid()}"}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "agent_ledger",
]
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

# django.tasks (Django 6; the django-tasks backport on 5.2): "default" runs tasks inline, "db" is
# django-tasks-db's queue, worked by ``manage.py db_worker --backend db``.
try:
    import django.tasks  # noqa: F401

    _TASKS = "django.tasks"
except ImportError:
    _TASKS = "django_tasks"
INSTALLED_APPS += ["django_tasks_db"]
TASKS = {
    "default": {"BACKEND": f"{_TASKS}.backends.immediate.ImmediateBackend"},
    "db": {"BACKEND": "django_tasks_db.DatabaseBackend"},
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
AGENT_LEDGER = {
    "WEBHOOK_SECRETS": {"primary": "test-secret-0123456789", "old": "old-secret-0123456789"}
}
