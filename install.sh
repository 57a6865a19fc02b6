#!/usr/bin/env bash
# hybridinfer installer: makes .venv, installs the package, builds llama.cpp's llama-server + llama-bench.
#
#   ./install.sh            # runtime install
#   ./install.sh --dev      # + test dependencies (pytest, openai client, ...)
#   ./install.sh --no-engine  # skip the llama.cpp build
#   ./install.sh --llama-cpp-python  # + the in-process engine (serve --engine llama-cpp-python); --dev implies it
#
# The llama.cpp build (~10 min on 2 cores) is cached outside the checkout in
# ${HYBRIDINFER_CACHE:-~/.cache/hybridinfer}/llama.cpp/<version>-<flags hash>/ so a reinstall is instant;
# a missing cache simply rebuilds. HYBRIDINFER_CMAKE_ARGS overrides the cmake flags.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
here=$(cd "$(dirname "$0")" && pwd)
cache=${HYBRIDINFER_CACHE:-$HOME/.cache/hybridinfer}
dev=0
engine=1
lcp=0
for a in "$@"; do
  case "$a" in
    --dev) dev=1; lcp=1 ;;
    --llama-cpp-python) lcp=1 ;;
    --no-engine) engine=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$a' (try --help)" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

# --- Python environment -------------------------------------------------------------------------
py=${PYTHON:-python3}
if [ ! -x "$here/.venv/bin/python" ]; then
  log "creating .venv with $($py --version)"
  "$py" -m venv "$here/.venv"
fi
vpy="$here/.venv/bin/python"
"$vpy" -m pip install -q --upgrade pip >/dev/null
if [ "$dev" = 1 ]; then
  # torch for the IQ dequantizers and their tests: the CPU build (a plain `torch` would pull a multi-GB CUDA
  # build); set HYBRIDINFER_TORCH to choose another, e.g. a CUDA wheel on a GPU box.
  if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
    log "installing ${HYBRIDINFER_TORCH:-torch==2.13.0}"
    "$vpy" -m pip install -q "${HYBRIDINFER_TORCH:-torch==2.13.0}"
  fi
  log "installing hybridinfer[dev]"
  "$vpy" -m pip install -q -e "$here[dev]"
else
  log "installing hybridinfer"
  "$vpy" -m pip install -q -e "$here"
fi

# --- llama.cpp engine -----------------------------------------------------------------------------
build_llama_cpp() {
  local cmake_args
  if [ -n "${HYBRIDINFER_CMAKE_ARGS:-}" ]; then
    cmake_args=$HYBRIDINFER_CMAKE_ARGS
  else
    cmake_args="-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF"
    # A portable x86 build still gets the wide kernels; ggml picks them at run time.
    case "$(uname -m)" in
      x86_64) cmake_args="$cmake_args -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
    esac
    if command -v nvcc >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      cmake_args="$cmake_args -DGGML_CUDA=ON"
    fi
  fi
  local key
  key=$(printf '%s' "$cmake_args" | sha256sum | cut -c1-12)
  local dest="$cache/llama.cpp/$LLAMA_CPP_PYTHON_VERSION-$key"
  if [ -x "$dest/bin/llama-server" ] && [ -x "$dest/bin/llama-bench" ]; then
    log "llama.cpp $LLAMA_CPP_PYTHON_VERSION cached at $dest"
  else
    local sdist="$cache/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    if [ ! -s "$sdist" ]; then
      log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist (vendors llama.cpp)"
      mkdir -p "$cache/src"
      local tmpd; tmpd=$(mktemp -d)
      "$vpy" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmpd" \
        || "$vpy" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmpd"
      mv "$tmpd"/llama_cpp_python-*.tar.gz "$sdist"; rm -rf "$tmpd"
    fi
    local work; work=$(mktemp -d "$cache/build.XXXXXX")
    log "building llama-server + llama-bench (~10 min on 2 cores) with: $cmake_args"
    tar xzf "$sdist" -C "$work" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    local src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$work/build" -G Ninja $cmake_args >"$work/cmake.log" 2>&1 \
      || { tail -20 "$work/cmake.log"; echo "install.sh: cmake configure failed (log: $work/cmake.log)" >&2; exit 1; }
    cmake --build "$work/build" --target llama-server llama-bench -j "$(nproc)" 2>&1 \
      | awk '/^\[[0-9]+\/[0-9]+\]/ { n++; if (n % 25 == 0) { print "  " $1; fflush() } } /error/ { print }'
    [ -x "$work/build/bin/llama-server" ] || { echo "install.sh: llama.cpp build failed (see $work)" >&2; exit 1; }
    # Publish atomically: a half-finished build never looks like a cache hit.
    mkdir -p "$dest.tmp/bin"
    cp "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$dest.tmp/bin/"
    printf '%s\n' "$cmake_args" >"$dest.tmp/cmake-args.txt"
    rm -rf "$dest"; mv "$dest.tmp" "$dest"; rm -rf "$work"
    log "llama.cpp built into $dest"
  fi
  ln -sf "$dest/bin/llama-server" "$here/.venv/bin/llama-server"
  ln -sf "$dest/bin/llama-bench" "$here/.venv/bin/llama-bench"
}

if [ "$engine" = 1 ]; then
  build_llama_cpp
fi

# --- llama-cpp-python (in-process engine) -----------------------------------------------------------
# Built from the same sdist; the wheel is cached like the binaries (version + flags), so only the first
# install pays the ~10 min compile.
install_llama_cpp_python() {
  local args="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF"
  case "$(uname -m)" in
    x86_64) args="$args -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
  esac
  if command -v nvcc >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    args="$args -DGGML_CUDA=ON"
  fi
  [ -n "${HYBRIDINFER_CMAKE_ARGS:-}" ] && args="-DLLAVA_BUILD=OFF $HYBRIDINFER_CMAKE_ARGS"
  local key; key=$(printf '%s' "$args" | sha256sum | cut -c1-12)
  local dest="$cache/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$key"
  if ! ls "$dest"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    local sdist="$cache/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    if [ ! -s "$sdist" ]; then
      mkdir -p "$cache/src"
      local tmpd; tmpd=$(mktemp -d)
      "$vpy" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmpd"
      mv "$tmpd"/llama_cpp_python-*.tar.gz "$sdist"; rm -rf "$tmpd"
    fi
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (~10 min on 2 cores) with: $args"
    rm -rf "$dest.tmp"; mkdir -p "$dest.tmp"
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$vpy" -m pip wheel -q --no-deps -w "$dest.tmp" "$sdist" \
      || { echo "install.sh: llama-cpp-python build failed" >&2; exit 1; }
    rm -rf "$dest"; mv "$dest.tmp" "$dest"
  else
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION cached at $dest"
  fi
  "$vpy" -m pip install -q "$dest"/llama_cpp_python-*.whl
}

if [ "$lcp" = 1 ]; then
  install_llama_cpp_python
fi

log "done. Try: .venv/bin/hybridinfer probe"
