#!/usr/bin/env bash
# The demo: a virtualenv, the example project's database, an admin login, a simulated agent's
# calls in the ledger, and the development server.
#   PORT=8001 scripts/demo.sh           another port
#   ADMIN_PASSWORD=s3cret scripts/demo.sh
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/ledger_demo scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${PORT:-8000}
export ADMIN_PASSWORD=${ADMIN_PASSWORD:-admin}
# Links in approval notifications (example_project/demo/receivers.py) point at this server.
export LEDGER_ADMIN_BASE_URL=${LEDGER_ADMIN_BASE_URL:-http://127.0.0.1:$PORT}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import agent_ledger, rest_framework, drf_spectacular, dj_database_url, psycopg" 2>/dev/null; then
  echo "== installing django-agent-ledger with its extras"
  "$VENV/bin/pip" install -q -U pip
  "$VENV/bin/pip" install -q -e '.[drf,postgres,spectacular,dev]'
fi

manage() { "$VENV/bin/python" example_project/manage.py "$@"; }

echo "== migrating (${DATABASE_URL:-sqlite example_project/db.sqlite3})"
manage migrate --noinput -v 0

echo "== admin user"
manage shell -c '
import os
from django.contrib.auth import get_user_model
user, created = get_user_model().objects.get_or_create(
    username="admin", defaults={"email": "admin@example.com"}
)
user.is_staff = user.is_superuser = True
user.set_password(os.environ["ADMIN_PASSWORD"])
user.save()
print("created" if created else "password reset")
'

echo "== the simulated agent"
manage demo
WEBHOOK_SECRET=$(manage demo --webhook-secret)

cat <<INFO

  Admin:    http://127.0.0.1:$PORT/admin/     login: admin / $ADMIN_PASSWORD
  Approval: http://127.0.0.1:$PORT/admin/agent_ledger/effect/?status=requires_approval
  API:      http://127.0.0.1:$PORT/api/ledger/effects/   (curl -u admin:$ADMIN_PASSWORD ...)
  API docs: http://127.0.0.1:$PORT/api/ledger/docs/   (the example project's Swagger UI)
  Webhook:  http://127.0.0.1:$PORT/api/ledger/webhook/
            sign with the secret $WEBHOOK_SECRET   (name "demo"; set AGENT_LEDGER_WEBHOOK_SECRET)

INFO
exec "$VENV/bin/python" example_project/manage.py runserver "127.0.0.1:$PORT"
