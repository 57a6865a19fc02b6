#!/usr/bin/env bash
# hybridinfer installer: makes .venv, installs the package, builds the engines: llama.cpp (llama-server,
# llama-bench, rpc-server) and ik_llama.cpp (ik-llama-server, ik-llama-bench).
#
#   ./install.sh            # runtime install
#   ./install.sh --dev      # + test dependencies (pytest, openai client, ...)
#   ./install.sh --no-engine  # skip the engine builds
#   ./install.sh --no-ik    # skip the ik_llama.cpp build
#   ./install.sh --llama-cpp-python  # + the in-process engine (serve --engine llama-cpp-python); --dev implies it
#
# Engine builds (~10-20 min each on 2 cores) are cached outside the checkout in
# ${HYBRIDINFER_CACHE:-~/.cache/hybridinfer}/<engine>/<version>-<hash of flags, CPU ISA, patches>/ so a reinstall
# is instant; a missing cache simply rebuilds. HYBRIDINFER_CMAKE_ARGS overrides the cmake flags.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
IK_LLAMA_CPP_PYTHON_VERSION=0.1.5
here=$(cd "$(dirname "$0")" && pwd)
cache=${HYBRIDINFER_CACHE:-$HOME/.cache/hybridinfer}
dev=0
engine=1
lcp=0
ik=1
for a in "$@"; do
  case "$a" in
    --dev) dev=1; lcp=1 ;;
    --llama-cpp-python) lcp=1 ;;
    --no-engine) engine=0; ik=0 ;;
    --no-ik) ik=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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

# --- engines: llama.cpp and ik_llama.cpp -----------------------------------------------------------------
# Both are built from the trees vendored in PyPI sdists (llama-cpp-python, ik-llama-cpp-python), for the CPU
# they are installed on (GGML_NATIVE: AVX-512/VNNI where the CPU has them; the cache key includes the CPU's
# ISA flags), with our patches from patches/<engine>/ applied (their contents are part of the key too).

cpu_isa() {  # the instruction-set flags -march=native looks at, so a cache never serves another CPU's build
  # $1: a cpuinfo file other than this box's (tests/test_cpu_flags.py runs it on recorded CPUs)
  grep -m1 '^flags' "${1:-/proc/cpuinfo}" 2>/dev/null | tr ' ' '\n' | grep -E '^(avx|fma|f16c|bmi|sse4|amx|vnni)' | sort | tr '\n' ' '
}

fetch_sdist() {  # $1 package, $2 version -> path of the cached sdist
  local file="$cache/src/$(printf '%s' "$1" | tr '-' '_')-$2.tar.gz"
  if [ ! -s "$file" ]; then
    log "downloading $1==$2 sdist (vendors the engine's source)" >&2
    mkdir -p "$cache/src"
    local tmpd; tmpd=$(mktemp -d)
    "$vpy" -m pip download -q --no-deps --no-binary :all: "$1==$2" -d "$tmpd" >&2
    mv "$tmpd"/*.tar.gz "$file"; rm -rf "$tmpd"
  fi
  printf '%s' "$file"
}

# build_engine NAME PACKAGE VERSION TREE "TARGETS" "BIN:LINK ..." CMAKE_ARGS
build_engine() {
  local name=$1 pkg=$2 ver=$3 tree=$4 targets=$5 links=$6 cmake_args=$7
  local patches=("$here"/patches/"$name"/*.patch)
  [ -e "${patches[0]}" ] || patches=()
  local key
  key=$( { printf '%s\n%s\n' "$cmake_args" "$(cpu_isa)"; cat ${patches[@]+"${patches[@]}"}; } | sha256sum | cut -c1-12)
  local dest="$cache/$name/$ver-$key"
  local first_bin=${links%%:*}
  if [ -x "$dest/bin/$first_bin" ]; then
    log "$name $ver cached at $dest"
  else
    local sdist; sdist=$(fetch_sdist "$pkg" "$ver")
    local work; work=$(mktemp -d "$cache/build.XXXXXX")
    log "building $name $ver ($targets; ~10-20 min on 2 cores) with: $cmake_args"
    tar xzf "$sdist" -C "$work" "$tree"
    local src="$work/$tree"
    local p
    for p in ${patches[@]+"${patches[@]}"}; do
      patch -s -p1 -d "$src" <"$p" || { echo "install.sh: patch $p does not apply to $name $ver" >&2; exit 1; }
    done
    if [ ! -e "$src/common/cmake/build-info-gen-cpp.cmake" ] && grep -q build-info-gen-cpp "$src/common/CMakeLists.txt"; then
      # the sdist leaves out the script that writes build-info.cpp when there is no .git: supply it
      mkdir -p "$src/common/cmake"
      cat >"$src/common/cmake/build-info-gen-cpp.cmake" <<CMAKE
include(\${CMAKE_CURRENT_SOURCE_DIR}/cmake/build-info.cmake)
set(BUILD_COMMIT "$pkg-$ver")
configure_file(\${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in \${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp)
CMAKE
    fi
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$work/build" -G Ninja $cmake_args >"$work/cmake.log" 2>&1 \
      || { tail -20 "$work/cmake.log"; echo "install.sh: $name cmake configure failed (log: $work/cmake.log)" >&2; exit 1; }
    # shellcheck disable=SC2086
    cmake --build "$work/build" --target $targets -j "$(nproc)" 2>&1 \
      | awk '/^\[[0-9]+\/[0-9]+\]/ { n++; if (n % 25 == 0) { print "  " $1; fflush() } } /error/ { print }'
    # Publish atomically: a half-finished build never looks like a cache hit.
    rm -rf "$dest.tmp"; mkdir -p "$dest.tmp/bin"
    local l
    for l in $links; do
      [ -x "$work/build/bin/${l%%:*}" ] || { echo "install.sh: $name build failed: no ${l%%:*} (see $work)" >&2; exit 1; }
      cp "$work/build/bin/${l%%:*}" "$dest.tmp/bin/"
    done
    printf '%s\n' "$cmake_args" >"$dest.tmp/cmake-args.txt"
    printf '%s %s\n' "$pkg" "$ver" >"$dest.tmp/source.txt"
    rm -rf "$dest"; mv "$dest.tmp" "$dest"; rm -rf "$work"
    log "$name built into $dest"
  fi
  for l in $links; do
    ln -sf "$dest/bin/${l%%:*}" "$here/.venv/bin/${l##*:}"
  done
}

engine_cmake_args() {
  if [ -n "${HYBRIDINFER_CMAKE_ARGS:-}" ]; then
    printf '%s' "$HYBRIDINFER_CMAKE_ARGS"; return
  fi
  local a="-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON"
  if command -v nvcc >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    a="$a -DGGML_CUDA=ON"
  fi
  printf '%s' "$a"
}

if [ "$engine" = 1 ]; then
  # mainline: llama-server, llama-bench and rpc-server (a remote ggml device: multi-node, and GPU placement
  # verified without a GPU)
  build_engine llama.cpp llama-cpp-python "$LLAMA_CPP_PYTHON_VERSION" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "llama-server llama-bench ggml-rpc-server" \
    "llama-server:llama-server llama-bench:llama-bench ggml-rpc-server:rpc-server" \
    "$(engine_cmake_args) -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_RPC=ON"
fi
if [ "$ik" = 1 ]; then
  build_engine ik_llama.cpp ik-llama-cpp-python "$IK_LLAMA_CPP_PYTHON_VERSION" \
    "ik_llama_cpp_python-$IK_LLAMA_CPP_PYTHON_VERSION/vendor/ik_llama.cpp" "llama-server llama-bench" \
    "llama-server:ik-llama-server llama-bench:ik-llama-bench" \
    "$(engine_cmake_args) -DLLAMA_BUILD_EXAMPLES=ON"
fi

# --- llama-cpp-python (in-process engine) -----------------------------------------------------------
# Built from the same sdist; the wheel is cached like the binaries (version + flags), so only the first
# install pays the ~10 min compile.
install_llama_cpp_python() {
  local args="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON"
  if command -v nvcc >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    args="$args -DGGML_CUDA=ON"
  fi
  [ -n "${HYBRIDINFER_CMAKE_ARGS:-}" ] && args="-DLLAVA_BUILD=OFF $HYBRIDINFER_CMAKE_ARGS"
  local patches=("$here"/patches/llama.cpp/*.patch)
  local key; key=$( { printf '%s\n%s\n' "$args" "$(cpu_isa)"; cat "${patches[@]}"; } | sha256sum | cut -c1-12)
  local dest="$cache/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$key"
  if ! ls "$dest"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    local sdist; sdist=$(fetch_sdist llama-cpp-python "$LLAMA_CPP_PYTHON_VERSION")
    local work; work=$(mktemp -d "$cache/build.XXXXXX")
    tar xzf "$sdist" -C "$work"
    local p
    for p in "${patches[@]}"; do
      patch -s -p1 -d "$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" <"$p"
    done
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (~10 min on 2 cores) with: $args"
    rm -rf "$dest.tmp"; mkdir -p "$dest.tmp"
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$vpy" -m pip wheel -q --no-deps -w "$dest.tmp" "$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" \
      || { echo "install.sh: llama-cpp-python build failed" >&2; exit 1; }
    rm -rf "$dest"; mv "$dest.tmp" "$dest"; rm -rf "$work"
  else
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION cached at $dest"
  fi
  "$vpy" -m pip install -q "$dest"/llama_cpp_python-*.whl
}

if [ "$lcp" = 1 ]; then
  install_llama_cpp_python
fi

log "done. Try: .venv/bin/hybridinfer probe"
