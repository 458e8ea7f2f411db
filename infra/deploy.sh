#!/usr/bin/env bash
# Register the deployments in prefect.yaml (train, sweep, scheduled evaluate) with the
# Prefect server at $PREFECT_API_URL, creating the process work pool and the global
# concurrency limit of training slots (RESRL_TRAIN_SLOTS, default 1) if needed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
cd "$ROOT"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
# The global concurrency limit every sweep point takes a slot of while it trains (run.concurrency_limit):
# how many trainings run at once on all the machines of this server together. Size it as
# machines x (cores per machine / cores one run uses well): 1 per 2-core machine (two runs on
# 2 cores slow each other 5-10x), e.g. RESRL_TRAIN_SLOTS=8 for 4 GPUs on each of 2 machines.
# An existing limit keeps its size (change it with `prefect gcl update resrl-train --limit N`).
SLOTS="${RESRL_TRAIN_SLOTS:-1}"
LIMIT="${RESRL_CONCURRENCY_LIMIT:-resrl-train}"
prefect gcl inspect "$LIMIT" >/dev/null 2>&1 || prefect gcl create "$LIMIT" --limit "$SLOTS"
RESRL_ROOT="$ROOT" prefect --no-prompt deploy --all
