#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, the store tests on SQLite and Postgres,
# and the end-to-end tests with real worker processes and the real models.
#
# Postgres: TEST_DATABASE_URL (or DATABASE_URL) if set; else the local server on
# 127.0.0.1:5432 if it answers; else a throwaway cluster made with initdb under target/.
# Each test creates and drops its own database there. PG_TEST_THROWAWAY=1 forces the
# throwaway cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }

scripts/fetch-models.sh
# The Q4_K_M file of the K-quant reference test, made by llama.cpp's own quantizer (built
# once under target/llama.cpp/).
scripts/requantize.sh Q4_K_M

pg_bin() { # name -> path of a Postgres server binary, or nothing
  command -v "$1" 2>/dev/null && return
  ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n1
}

throwaway_pg() {
  local initdb pg_ctl dir port owner
  initdb=$(pg_bin initdb); pg_ctl=$(pg_bin pg_ctl)
  if [ -z "$initdb" ] || [ -z "$pg_ctl" ]; then
    say "PostgreSQL server binaries (initdb, pg_ctl) were not found."
    say "Install them (Debian: apt-get install postgresql) or set TEST_DATABASE_URL."
    exit 1
  fi
  dir=$(pwd)/target/pg-test
  port=${PG_TEST_PORT:-55432}
  rm -rf "$dir"; mkdir -p "$dir"
  owner=$(id -un)
  run_pg() { "$@"; }
  if [ "$(id -u)" = 0 ]; then
    # The server refuses to run as root.
    owner=postgres
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$dir"
    run_pg() { runuser -u postgres -- "$@"; }
  fi
  say "starting a throwaway PostgreSQL cluster on port $port"
  run_pg "$initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
  run_pg "$pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -w start >/dev/null
  # Expanded now: the function's locals are gone by the time the trap runs.
  trap "run_pg '$pg_ctl' -D '$dir/data' -m fast stop >/dev/null 2>&1 || true" EXIT
  export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

if [ -n "${PG_TEST_THROWAWAY:-}" ]; then
  throwaway_pg
elif [ -n "${TEST_DATABASE_URL:-}" ]; then
  :
elif [ -n "${DATABASE_URL:-}" ] && [[ "$DATABASE_URL" == postgres* ]]; then
  export TEST_DATABASE_URL=$DATABASE_URL
elif command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432 \
  && psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
else
  throwaway_pg
fi
say "Postgres for tests: ${TEST_DATABASE_URL}"

# The official openai SDK, for the compatibility test; the Kubernetes schemas and hadolint,
# for the manifests and the Containerfiles.
if ! target/sdk-venv/bin/python -c 'import openai, openapi_spec_validator, jsonschema, kubernetes_validate, yaml' 2>/dev/null \
  || [ ! -x target/sdk-venv/bin/hadolint ]; then
  say "creating target/sdk-venv with the openai SDK and the Kubernetes schemas"
  mkdir -p target
  python3 -m venv target/sdk-venv
  target/sdk-venv/bin/pip install -q -r tests/sdk/requirements.txt
fi

# Playwright's driver for the dashboard test (it drives the system's Chromium).
if [ ! -d tests/dashboard/node_modules/playwright-core ]; then
  say "installing the dashboard test's browser driver (npm ci)"
  (cd tests/dashboard && npm ci --no-audit --no-fund --silent)
fi
command -v chromium >/dev/null || { say "chromium is missing (Debian: apt-get install chromium)"; exit 1; }

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
say "building the binaries the end-to-end tests start"
cargo build --workspace --bins
export MODELS_DIR=$(pwd)/${MODELS_DIR:-models}
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
