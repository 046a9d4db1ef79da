#!/usr/bin/env bash
# Runs the whole stack on this machine: one inference worker and the gateway on the
# embedded SQLite store. Ctrl-C stops everything it started.
#
#   GATEWAY_LISTEN  consumer API address (default 127.0.0.1:8080)
#   WORKER_LISTEN   worker address (default 127.0.0.1:8081)
#   ADMIN_LISTEN    admin API and dashboard (default 127.0.0.1:8090)
#   DATA_DIR        store and demo key (default ./data)
#   MODELS_DIR      models (default ./models)
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY_LISTEN=${GATEWAY_LISTEN:-127.0.0.1:8080}
WORKER_LISTEN=${WORKER_LISTEN:-127.0.0.1:8081}
ADMIN_LISTEN=${ADMIN_LISTEN:-127.0.0.1:8090}
DATA_DIR=${DATA_DIR:-data}
export MODELS_DIR=${MODELS_DIR:-models}

say() { printf '\033[1m[run]\033[0m %s\n' "$*" >&2; }

scripts/fetch-models.sh

say "building (release; the first build takes a few minutes)"
cargo build --release -p inference-worker -p gateway

mkdir -p "$DATA_DIR"
chmod 700 "$DATA_DIR"
# The admin tokens' signing secret: made once, readable by this user only.
if [ ! -s "$DATA_DIR/admin-secret" ]; then
  (umask 077; head -c 48 /dev/urandom | base64 | tr -d '\n' > "$DATA_DIR/admin-secret")
fi
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
  --demo-key-file "$DATA_DIR/demo-key" \
  --admin-listen "$ADMIN_LISTEN" \
  --admin-jwt-secret-file "$DATA_DIR/admin-secret" &
pids+=($!)

for i in $(seq 1 100); do
  if curl -fsS "http://$GATEWAY_LISTEN/health" >/dev/null 2>&1 && [ -s "$DATA_DIR/demo-key" ]; then break; fi
  kill -0 "${pids[1]}" 2>/dev/null || { say "the gateway exited"; exit 1; }
  sleep 0.1
done

admin_token=$(target/release/gateway admin-token --role admin --subject make-run --ttl-secs 43200 \
  --admin-jwt-secret-file "$DATA_DIR/admin-secret")

cat >&2 <<BANNER

  Gateway:     http://$GATEWAY_LISTEN/v1
  Demo key:    $(cat "$DATA_DIR/demo-key")
  Dashboard:   http://$ADMIN_LISTEN/   (sign in with the admin token below; valid 12 h)
  Admin token: $admin_token
  OpenAPI:     http://$ADMIN_LISTEN/openapi.json

  curl http://$GATEWAY_LISTEN/v1/chat/completions \\
    -H "Authorization: Bearer \$(cat $DATA_DIR/demo-key)" -H 'Content-Type: application/json' \\
    -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"Hello!"}]}'

  Ctrl-C stops everything.

BANNER
wait -n "${pids[@]}" || true
