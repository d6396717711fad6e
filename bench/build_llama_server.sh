#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (and `llama-batched-bench`) from the source that the installed
# llama-cpp-python vendors, so the embedded-engine benchmark compares against the same llama.cpp.
# Once, cached under bench/.llama-server/; never part of CI. Usage: bench/build_llama_server.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$root/.venv/bin/python}"
version="$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
cache="$here/.llama-server/$version"
if [[ -x "$cache/bin/llama-server" ]]; then
  echo "$cache/bin/llama-server"; exit 0
fi
mkdir -p "$cache/src"
cd "$cache"
if [[ ! -f src/.unpacked ]]; then
  "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d dl
  tar -xzf dl/llama_cpp_python-"$version".tar.gz -C src --strip-components=1
  touch src/.unpacked
fi
# Same CPU build as the wheel: native ISA, no CURL, release.
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF >build.log 2>&1
cmake --build build --target llama-server llama-batched-bench llama-quantize -j "$(nproc)" >>build.log 2>&1
mkdir -p bin
cp build/bin/llama-server build/bin/llama-batched-bench build/bin/llama-quantize bin/
echo "$cache/bin/llama-server"
