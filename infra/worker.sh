#!/usr/bin/env bash
# A worker that runs the deployments' flow runs as local processes. Start one per
# machine (or more); all of them poll the same work pool of the same Prefect server.
#   PREFECT_API_URL=http://HOST:4200/api   (required: the server from infra/prefect-server.sh)
#   MLFLOW_TRACKING_URI=http://HOST:5000    (so every machine logs to one tracking server)
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
# RESRL_WORKER_LIMIT: flow runs (sweep points, training runs) this worker runs at once; 1 suits a
# machine whose cores one training run uses (2 runs on 2 cores slow each other 5-10x)
exec prefect worker start --pool "$POOL" --type process --limit "${RESRL_WORKER_LIMIT:-1}"
