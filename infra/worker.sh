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
# RESRL_WORKER_CORES=0-7: run this worker and every flow run it starts on those cores only, with as
# many threads (several workers on one big machine, each owning a block, like a sweep's lanes)
cmd=(prefect worker start --pool "$POOL" --type process --limit "${RESRL_WORKER_LIMIT:-1}" "$@")
if [ -n "${RESRL_WORKER_CORES:-}" ]; then
  n="$(python -c "from resrl.cores import parse_id_list as p; print(len(p('$RESRL_WORKER_CORES')))")"
  export OMP_NUM_THREADS="$n" MKL_NUM_THREADS="$n" RESRL_CORES="$RESRL_WORKER_CORES" \
         VLLM_CPU_OMP_THREADS_BIND="$RESRL_WORKER_CORES"
  exec taskset -c "$RESRL_WORKER_CORES" "${cmd[@]}"
fi
exec "${cmd[@]}"
