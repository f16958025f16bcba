#!/usr/bin/env bash
# The whole test suite: lint and type check, then every test on SQLite and again on PostgreSQL.
# PostgreSQL is required: an unreachable server is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
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
echo "== pytest on SQLite"
DATABASE_URL=sqlite://:memory: "$VENV/bin/pytest" "$@" || status=1
echo "== pytest on PostgreSQL (tests that do not depend on DATABASE_URL ran above)"
DATABASE_URL=${PG_URL/postgresql:/postgres:} AGENT_LEDGER_TEST_PASS=again "$VENV/bin/pytest" "$@" || status=1
exit $status
