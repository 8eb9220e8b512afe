#!/usr/bin/env bash
# llama.cpp for `make bench` (issue 17): the llama.cpp that PyPI's llama-cpp-python sdist
# vendors, built from source here (GGML_NATIVE=ON: compiled for this CPU's instruction
# set), plus .venv-llamacpp for its GGUF converter (transformers < 5). About 8.5 minutes
# on 2 cores; on disk: build 45 MB, sdist + source 290 MB, venv 1.2 GB.
#
#   tools/peers/setup_llamacpp.sh        # idempotent: a stamp skips work already done
#
# Results (all git-ignored):
#   bench/.cache/peers/llama_cpp_python-$VERSION/   the unpacked sdist
#   bench/.cache/peers/llamacpp-build/bin/          llama-quantize, llama-bench,
#                                                   llama-batched-bench, gen_ids, libs
#   .venv-llamacpp/                                 transformers<5, torch (CPU), gguf-py
# Environment: LLAMACPP_PY_VERSION (sdist version), PYTHON (for the venv), JOBS.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
PEERS="$REPO/bench/.cache/peers"
SDIST_DIR="$PEERS/llama_cpp_python-$VERSION"
SRC="$SDIST_DIR/vendor/llama.cpp"
BUILD="$PEERS/llamacpp-build"
VENV="$REPO/.venv-llamacpp"
OURS="$REPO/tools/peers/llamacpp"
STAMP="$BUILD/.built"

log() { echo "[setup_llamacpp] $*" >&2; }

# What the build depends on: a changed program, CMake file or this script rebuilds.
want="$VERSION $(cat "$OURS/gen_ids.cpp" "$OURS/CMakeLists.txt" "${BASH_SOURCE[0]}" \
  | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" \
      && -f "$VENV/.installed" ]]; then
  log "up to date ($STAMP)"
  exit 0
fi

mkdir -p "$PEERS"

# 1. The venv: the converter needs transformers < 5 (it reads GPT-2 configs the 4.x way);
#    torch is the CPU build by exact version (a plain `torch` would pull CUDA wheels).
if [[ ! -f "$VENV/.installed" ]]; then
  log "venv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "transformers>=4.57,<5" "numpy>=2.2.6" sentencepiece \
    "protobuf>=4.21,<5" tqdm pyyaml requests
  command -v cmake >/dev/null && command -v ninja >/dev/null \
    || "$VENV/bin/pip" install -q cmake ninja
  touch "$VENV/.installed"
fi
export PATH="$PATH:$VENV/bin"  # cmake/ninja from the venv only where the system lacks them

# 2. The sdist: source only (--no-binary), no dependencies; unpacked once.
if [[ ! -f "$SRC/include/llama.h" ]]; then
  log "download llama-cpp-python==$VERSION (sdist)"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
    -d "$PEERS"
  tar -xzf "$PEERS/llama_cpp_python-$VERSION.tar.gz" -C "$PEERS"
fi
# The converter's gguf-py, from the same source tree (it must match its converter).
"$VENV/bin/python" -c "import gguf" 2>/dev/null \
  || "$VENV/bin/pip" install -q -e "$SRC/gguf-py"

# 3. Configure and build: only the library, the three tools and gen_ids.
log "configure ($BUILD)"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$OURS" -B "$BUILD" "${gen[@]}" -DLLAMA_CPP_DIR="$SRC" \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >"$BUILD.configure.log" 2>&1 \
  || { tail -30 "$BUILD.configure.log" >&2; log "cmake configure failed: see $BUILD.configure.log"; exit 1; }
log "build with $JOBS jobs"
t0=$(date +%s)
cmake --build "$BUILD" -j "$JOBS" --target llama-quantize llama-bench llama-batched-bench \
  gen_ids >"$BUILD.build.log" 2>&1 \
  || { tail -30 "$BUILD.build.log" >&2; log "build failed: see $BUILD.build.log"; exit 1; }
log "built in $(( $(date +%s) - t0 )) s: $(ls "$BUILD/bin" | tr '\n' ' ')"
echo "$want" >"$STAMP"
