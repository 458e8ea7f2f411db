#!/usr/bin/env bash
# Register the deployments in prefect.yaml (train, sweep, scheduled evaluate) with the
# Prefect server at $PREFECT_API_URL, creating the process work pool if needed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
cd "$ROOT"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
RESRL_ROOT="$ROOT" prefect --no-prompt deploy --all
