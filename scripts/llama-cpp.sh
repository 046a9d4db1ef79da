#!/usr/bin/env bash
# Builds llama.cpp tools (llama-quantize, llama-server, the shared libllama) once, from the
# llama.cpp vendored in the llama-cpp-python 0.3.36 source package, into target/llama.cpp/,
# and prints the path of the bin/ folder. Reference tooling for scripts/requantize.sh, the
# fixture scripts and scripts/bench_gguf.py; nothing of it ships.
#
#   scripts/llama-cpp.sh llama-quantize llama-server
#
# The build is pinned to AVX2/FMA/F16C rather than the host's own features, so the files it
# quantizes are the same on every x86-64-v3 machine (the reference test checks their hash).
# Needs cmake (Debian package, or `pip install cmake`) and a C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
LLAMA=target/llama.cpp
src="$LLAMA/src"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-quantize)

if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  command -v cmake >/dev/null || python3 -m pip install -q cmake
  echo "[llama.cpp] fetching the llama-cpp-python $VERSION source package" >&2
  rm -rf "$LLAMA/download" "$src" && mkdir -p "$LLAMA/download" "$src"
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$LLAMA/download" >&2
  tar xzf "$LLAMA/download/llama_cpp_python-$VERSION.tar.gz" -C "$src" --strip-components=1
fi
missing=()
for t in "${targets[@]}"; do
  [ -x "$LLAMA/build/bin/$t" ] || [ -e "$LLAMA/build/bin/lib$t.so" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[llama.cpp] building ${missing[*]} (once; minutes on two cores)" >&2
  cmake -S "$src/vendor/llama.cpp" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_BMI2=ON >/dev/null
  cmake --build "$LLAMA/build" -j "${LLAMA_JOBS:-$(nproc)}" --target "${missing[@]}" >/dev/null
fi
echo "$(pwd)/$LLAMA/build/bin"
