# Shared by the infra scripts: project root, the venv's tools, loopback defaults.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
POOL="${RESRL_WORK_POOL:-resrl-pool}"
