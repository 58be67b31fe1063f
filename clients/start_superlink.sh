#!/usr/bin/env bash
# Start the federation's Flower SuperLink (operator): TLS with the consortium certificate,
# SuperNode authentication on, every hospital's public key in the credentials directory
# registered and recorded in the node registry. flower-superlink listens on 127.0.0.1
# (--control-port, 9093: Control API for flwr run / register, this host or ssh -L only); the
# public port (--port, 9092) is fedllm's TLS front, which forwards SuperNodes' Fleet API only.
# Ctrl-C (or SIGTERM) stops both.
#
#   clients/start_superlink.sh /etc/fedllm/credentials [extra `fedllm superlink start` options]
#   e.g. clients/start_superlink.sh credentials --port 9092 --control-port 9093 \
#          --state-dir /var/lib/fedllm-superlink
#
# Uses the project's virtual environment unless FEDLLM_VENV points to another one.
# See docs/deploy.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDLLM_VENV:-$here/.venv}"
credentials="${1:-$here/credentials}"
shift || true

if [[ ! -x "$venv/bin/fedllm" ]]; then
  echo "error: no fedllm in $venv; run 'make setup' in $here first (or set FEDLLM_VENV)" >&2
  exit 2
fi
if [[ ! -d "$credentials" ]]; then
  echo "error: credentials directory not found: $credentials (create it with: fedllm certs init)" >&2
  exit 2
fi

export PATH="$venv/bin:$PATH"
exec "$venv/bin/fedllm" superlink start --credentials "$credentials" "$@"
