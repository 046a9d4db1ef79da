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
# LLAMA_NATIVE=1 builds for this host's own features instead (AVX-512, VNNI, ...) into
# target/llama.cpp/build-native: the fair reference for speed on such a host.
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
build="$LLAMA/build"
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
if [ "${LLAMA_NATIVE:-0}" = 1 ]; then
  build="$LLAMA/build-native"
  flags=(-DGGML_NATIVE=ON)
fi
missing=()
for t in "${targets[@]}"; do
  [ -x "$build/bin/$t" ] || [ -e "$build/bin/lib$t.so" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[llama.cpp] building ${missing[*]} (once; minutes on two cores)" >&2
  cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    "${flags[@]}" >/dev/null
  cmake --build "$build" -j "${LLAMA_JOBS:-$(nproc)}" --target "${missing[@]}" >/dev/null
fi
echo "$(pwd)/$build/bin"
