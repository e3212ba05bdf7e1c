#!/usr/bin/env bash
# `make run`: a Pulse server (embedded PostgreSQL unless PULSE_DATABASE_URL is set) and one local
# agent that profiles the server process itself with py-spy. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
LISTEN="${1:-127.0.0.1:50051}"
BIN=.venv/bin
mkdir -p .pulse

"$BIN/pulse-server" --listen "$LISTEN" --data-dir .pulse &
SERVER=$!
trap 'kill -TERM $SERVER ${AGENT:-} 2>/dev/null || true; wait' EXIT INT TERM

for _ in $(seq 1 120); do
  if "$BIN/grpcurl" -plaintext -max-time 1 "$LISTEN" grpc.health.v1.Health/Check >/dev/null 2>&1; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { echo "pulse-server exited" >&2; exit 1; }
  sleep 0.5
done

"$BIN/pulse-agent" --server "$LISTEN" --service demo --hostname "$(hostname)" \
  --state-dir .pulse/agent --output-dir .pulse/profiles --target-pid $SERVER &
AGENT=$!

cat <<MSG

Pulse is running on $LISTEN with one agent (service "demo", profiling the server's own process).
In another terminal:

  $BIN/pulsectl --server $LISTEN agents
  $BIN/pulsectl --server $LISTEN submit --service demo --duration 10 --wait
  $BIN/grpcurl -plaintext -d '{"service_name": "demo", "duration_seconds": 10}' \\
      $LISTEN pulse.v1.ProfilingService/SubmitProfileRequest

Profiles land in .pulse/profiles/. Ctrl-C stops the server and the agent.

MSG
wait $SERVER
