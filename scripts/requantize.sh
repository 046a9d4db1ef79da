#!/usr/bin/env bash
# Makes the GGUF quantisations operators download (Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16) from the
# shipped SmolLM2 file with llama.cpp's own `llama-quantize`, for the K-quant benchmark and
# the Q4_K_M reference test. Never committed: they land in models/derived/.
#
#   scripts/requantize.sh                 # every type
#   scripts/requantize.sh Q4_K_M          # just these
#
# llama-quantize: $LLAMA_QUANTIZE if set, else built once by scripts/llama-cpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[requantize]\033[0m %s\n' "$*" >&2; }

SOURCE=models/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=models/derived
types=("$@")
[ ${#types[@]} -gt 0 ] || types=(Q4_K_M Q5_K_M Q6_K Q8_0 F16)

[ -f "$SOURCE" ] || scripts/fetch-models.sh
quantize=${LLAMA_QUANTIZE:-}
[ -n "$quantize" ] || quantize="$(scripts/llama-cpp.sh llama-quantize)/llama-quantize"

mkdir -p "$OUT"
for type in "${types[@]}"; do
  dest="$OUT/SmolLM2-135M-Instruct.$type.gguf"
  if [ -s "$dest" ]; then
    say "$dest is there"
    continue
  fi
  say "$type -> $dest"
  "$quantize" --allow-requantize "$SOURCE" "$dest.part" "$type" 2 >"$dest.log" 2>&1 \
    || { cat "$dest.log" >&2; exit 1; }
  mv "$dest.part" "$dest"
done
