#!/usr/bin/env bash
# An MLflow tracking server that every run and sweep point logs to (set
# MLFLOW_TRACKING_URI=http://HOST:PORT on the machines that train).
#   MLFLOW_HOST=127.0.0.1  MLFLOW_PORT=5000
#   MLFLOW_BACKEND_STORE_URI   default sqlite:///<repo>/outputs/mlflow-server.db (postgresql://... for a team)
#   MLFLOW_ARTIFACTS_DESTINATION  default <repo>/outputs/mlflow-server-artifacts (s3://... for a team)
#   MLFLOW_AUTH=1              basic auth: needs `pip install "mlflow[auth]"` and, on the first start,
#                              MLFLOW_AUTH_ADMIN_PASSWORD (the admin user's password; MLflow ships none);
#                              clients then set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
set -euo pipefail
source "$(dirname "$0")/common.sh"
mkdir -p "$ROOT/outputs"
args=(--host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}"
      --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$ROOT/outputs/mlflow-server.db}"
      --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$ROOT/outputs/mlflow-server-artifacts}"
      --serve-artifacts)
if [ "${MLFLOW_AUTH:-0}" = "1" ]; then
  : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD on the first start}"
  args+=(--app-name basic-auth)
fi
exec mlflow server "${args[@]}"
