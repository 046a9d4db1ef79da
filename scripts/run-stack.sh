#!/usr/bin/env bash
# Runs the whole stack on this machine: one inference worker and the gateway on the
# embedded SQLite store. Ctrl-C stops everything it started.
#
#   GATEWAY_LISTEN  consumer API address (default 127.0.0.1:8080)
#   WORKER_LISTEN   worker address (default 127.0.0.1:8081)
#   DATA_DIR        store and demo key (default ./data)
#   MODELS_DIR      models (default ./models)
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY_LISTEN=${GATEWAY_LISTEN:-127.0.0.1:8080}
WORKER_LISTEN=${WORKER_LISTEN:-127.0.0.1:8081}
DATA_DIR=${DATA_DIR:-data}
export MODELS_DIR=${MODELS_DIR:-models}

say() { printf '\033[1m[run]\033[0m %s\n' "$*" >&2; }

scripts/fetch-models.sh

say "building (release; the first build takes a few minutes)"
cargo build --release -p inference-worker -p gateway

mkdir -p "$DATA_DIR"
chmod 700 "$DATA_DIR"
pids=()
stop() {
  trap - INT TERM EXIT
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  say "stopped"
}
trap stop INT TERM EXIT

target/release/inference-worker \
  --listen "$WORKER_LISTEN" \
  --chat-model "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --embedding-model "$MODELS_DIR/all-MiniLM-L6-v2" &
pids+=($!)

say "waiting for the worker to load its models"
for i in $(seq 1 120); do
  if curl -fsS "http://$WORKER_LISTEN/health" >/dev/null 2>&1; then break; fi
  kill -0 "${pids[0]}" 2>/dev/null || { say "the worker exited"; exit 1; }
  printf '.' >&2
  sleep 0.5
done
echo >&2

target/release/gateway serve \
  --listen "$GATEWAY_LISTEN" \
  --database-url "sqlite://$DATA_DIR/gateway.db" \
  --spool-dir "$DATA_DIR/spool" \
  --worker "http://$WORKER_LISTEN" \
  --demo-key-file "$DATA_DIR/demo-key" &
pids+=($!)

for i in $(seq 1 100); do
  if curl -fsS "http://$GATEWAY_LISTEN/health" >/dev/null 2>&1 && [ -s "$DATA_DIR/demo-key" ]; then break; fi
  kill -0 "${pids[1]}" 2>/dev/null || { say "the gateway exited"; exit 1; }
  sleep 0.1
done

cat >&2 <<BANNER

  Gateway:   http://$GATEWAY_LISTEN/v1
  Demo key:  $(cat "$DATA_DIR/demo-key")

  curl http://$GATEWAY_LISTEN/v1/chat/completions \\
    -H "Authorization: Bearer \$(cat $DATA_DIR/demo-key)" -H 'Content-Type: application/json' \\
    -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"Hello!"}]}'

  Ctrl-C stops everything.

BANNER
wait -n "${pids[@]}" || true
