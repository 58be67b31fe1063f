#!/usr/bin/env bash
# Start this hospital's part of the federation: its Flower SuperNode (TLS + SuperNode
# authentication) and, when hospital.yaml has an `inference:` section, its inference server.
# Ctrl-C (or SIGTERM, e.g. from systemd) stops both.
#
#   clients/start_hospital.sh /etc/fedllm/hospital.yaml
#
# Uses the project's virtual environment (.venv next to this repository's pyproject.toml)
# unless FEDLLM_VENV points to another one. See docs/deploy.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDLLM_VENV:-$here/.venv}"
config="${1:-$here/configs/hospital.yaml}"

if [[ ! -x "$venv/bin/fedllm" ]]; then
  echo "error: no fedllm in $venv; run 'make setup' in $here first (or set FEDLLM_VENV)" >&2
  exit 2
fi
if [[ ! -f "$config" ]]; then
  echo "error: hospital config not found: $config (start from configs/hospital.yaml)" >&2
  exit 2
fi

export PATH="$venv/bin:$PATH"
exec "$venv/bin/fedllm" hospital start --config "$config"
