#!/usr/bin/env bash
# The whole test suite: lint and type check (once), then every test on SQLite and again on
# PostgreSQL, in each leg: Django 5.2 on Python 3.11 ($VENV) and Django 6.1 on Python 3.12
# ($VENV_DJ61); `make test` builds both virtualenvs.
# PostgreSQL is required: an unreachable server is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV_DJ61=${VENV_DJ61:-.venv-dj61}
PG_URL=${TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}
export TEST_POSTGRES_URL=$PG_URL

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is needed for the admin browser tests: apt-get install chromium" >&2
    exit 1
  fi
fi

# The Celery adapter's tests run real workers on Redis (127.0.0.1:6379): start it if it is down.
if ! (command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1); then
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "== installing Debian's redis-server for the Celery tests"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "Redis is needed for the Celery tests: apt-get install redis-server" >&2
      exit 1
    fi
  fi
  echo "== starting Redis"
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

if ! "$VENV/bin/python" - "$PG_URL" <<'PY'
import sys, psycopg
try:
    psycopg.connect(sys.argv[1], connect_timeout=5).close()
except Exception as exc:
    sys.exit(f"PostgreSQL is unreachable at {sys.argv[1]}: {exc}")
PY
then
  echo "The suite runs on PostgreSQL too; start it (see README, 'Running the tests')." >&2
  exit 1
fi

echo "== ruff"
"$VENV/bin/ruff" check agent_ledger tests example_project
"$VENV/bin/ruff" format --check agent_ledger tests example_project
echo "== mypy"
"$VENV/bin/mypy"

status=0
for leg in "$VENV" "$VENV_DJ61"; do
  if [ ! -x "$leg/bin/pytest" ]; then
    echo "$leg is missing: run 'make test', which builds both virtualenvs." >&2
    exit 1
  fi
  versions=$("$leg/bin/python" -c 'import django, sys; print(f"Django {django.get_version()}, Python {sys.version.split()[0]}")')
  echo "== pytest on SQLite ($versions)"
  DATABASE_URL=sqlite://:memory: "$leg/bin/pytest" "$@" || status=1
  echo "== pytest on PostgreSQL ($versions; tests that do not depend on DATABASE_URL ran above)"
  DATABASE_URL=${PG_URL/postgresql:/postgres:} AGENT_LEDGER_TEST_PASS=again \
    "$leg/bin/pytest" "$@" || status=1
done
exit $status
