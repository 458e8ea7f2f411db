#!/usr/bin/env bash
# A Prefect server for a team: UI and API on http://127.0.0.1:4200 by default.
#   PREFECT_SERVER_HOST=0.0.0.0   expose it (then set PREFECT_SERVER_API_AUTH_STRING="user:pass"
#                                 here and PREFECT_API_AUTH_STRING on every client/worker)
#   PREFECT_SERVER_PORT=4200
#   PREFECT_UI_API_URL            the API address the UI (in the browser) calls; default: this host and port
# Clients use it with: export PREFECT_API_URL=http://HOST:PORT/api
set -euo pipefail
source "$(dirname "$0")/common.sh"
host="${PREFECT_SERVER_HOST:-127.0.0.1}"
port="${PREFECT_SERVER_PORT:-4200}"
ui_host="$host"
[ "$host" = "0.0.0.0" ] && ui_host="$(hostname)"  # a browser cannot call 0.0.0.0
# without this the UI calls Prefect's default port (4200), whatever --port says
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://${ui_host}:${port}/api}"
exec prefect server start --host "$host" --port "$port"
