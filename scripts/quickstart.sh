#!/usr/bin/env bash
# One command from a fresh Debian machine: install dependencies, build, serve the embedded demo
# model on a unix socket (as the LoRAX router would reach it), show one generation through that
# socket, then keep serving until Ctrl-C. QUICKSTART_EXIT=1 stops after the generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
BIN=${BUILD_DIR:-build}/bin
UDS=${UDS_PATH:-/tmp/phishard-demo}
"$BIN/phishard" serve models/tiny-phi-code --uds-path "$UDS" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 600); do
  [[ -S "$UDS-0" ]] && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited before it was ready" >&2; exit 1; }
  sleep 0.1
done
[[ -S "$UDS-0" ]] || { echo "server did not become ready" >&2; exit 1; }
echo "== shard ready on unix://$UDS-0; generating through the socket =="
"$BIN/phishard" client generate --uds-path "$UDS" --prompt $'def fibonacci(n):\n' --max-new-tokens 48
if [[ "${QUICKSTART_EXIT:-0}" == "1" ]]; then exit 0; fi
echo "== serving unix://$UDS-0 (Ctrl-C to stop) =="
wait $SERVER
