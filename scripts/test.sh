#!/usr/bin/env bash
# The whole test suite, from a fresh clone:
#
#   bash scripts/test.sh
#
# 1. creates .venv if missing and installs torch (and the build tools) in it;
# 2. compiles the extension ahead of time (pip install --no-build-isolation -e),
#    with the CUDA kernels (nvcc, no GPU needed) unless NHGD_WITH_CUDA=0;
# 3. builds the C++ core with CMake and runs the native tests (ctest);
# 4. runs pytest, requiring the compiled backend (and the CUDA kernels).
#
# Environment: NHGD_WITH_CUDA (default 1), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default: number of cores), PYTHON (interpreter for a new .venv),
# NHGD_TORCH_SPEC (default torch==2.14.1). Any failing step fails the script.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export NHGD_WITH_CUDA="${NHGD_WITH_CUDA:-1}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"  # VENV, PY, make_venv, install_torch

STEPS=()
T_START=$(date +%s)

summary() {
  local rc=$?
  echo
  echo "== timings =="
  local s
  for s in "${STEPS[@]}"; do echo "  $s"; done
  echo "  total: $(( $(date +%s) - T_START ))s"
  if [ "$rc" -ne 0 ]; then echo "scripts/test.sh: FAILED (exit $rc)"; else echo "scripts/test.sh: all steps passed"; fi
}
trap summary EXIT

# step NAME CMD...: runs CMD, prints and records its wall time.
step() {
  local name="$1"
  shift
  echo
  echo "== $name =="
  local t0
  t0=$(date +%s)
  "$@"
  local dt=$(( $(date +%s) - t0 ))
  STEPS+=("$(printf '%-28s %5ss' "$name:" "$dt")")
  echo "-- $name: ${dt}s"
}

toolchain() {
  "$PY" - "$ROOT/nhgd_ext/_toolchain.py" "$@" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_nhgd_toolchain", sys.argv[1])
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)
if sys.argv[2] == "cuda-home":
    print(tc.cuda_home() or "")
EOF
}

prepare_cuda() {
  if [ "$NHGD_WITH_CUDA" = "1" ]; then
    local home
    home="$(toolchain cuda-home)"
    if [ -z "$home" ]; then
      echo "NHGD_WITH_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH;" \
           "NHGD_WITH_CUDA=0 tests without the CUDA kernels)" >&2
      return 1
    fi
    export CUDA_HOME="$home"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  else
    echo "NHGD_WITH_CUDA=$NHGD_WITH_CUDA: the C++ operators only"
  fi
}

install_package() {
  "$PY" -m pip install --no-build-isolation -e ".[test]"
  # Fail here, with a clear line, if the compiled module did not load.
  "$PY" - <<'EOF'
import os, sys
import nhgd_ext
cpu, cuda = nhgd_ext.backend("cpu"), nhgd_ext.compiled_with_cuda()
print(f"nhgd_ext {nhgd_ext.__version__}: backend('cpu') = {cpu!r}, compiled_with_cuda() = {cuda}")
if cpu != "cpp":
    sys.exit("the compiled extension did not load")
if os.environ.get("NHGD_WITH_CUDA") == "1" and not cuda:
    sys.exit("NHGD_WITH_CUDA=1 but the loaded extension has no CUDA kernels")
EOF
}

cmake_build() {
  if ! command -v cmake >/dev/null 2>&1 && [ ! -x "$VENV/bin/cmake" ]; then "$PY" -m pip install "cmake>=3.18"; fi
  if ! command -v cmake >/dev/null 2>&1; then export PATH="$VENV/bin:$PATH"; fi
  local args=(-S . -B build/cmake -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release)
  local gen="Unix Makefiles"
  if command -v ninja >/dev/null 2>&1; then
    gen="Ninja"
  elif [ -x "$VENV/bin/ninja" ]; then
    gen="Ninja"
    args+=(-DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja")
  fi
  args+=(-G "$gen")
  # A CUDA torch's CMake config looks for the toolkit; give it the resolved root.
  if [ -n "${CUDA_HOME:-}" ]; then
    args+=(-DNHGD_CUDA_HOME="$CUDA_HOME")
  fi
  # An old build folder made with another generator cannot be reused.
  if [ -f build/cmake/CMakeCache.txt ] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$gen" build/cmake/CMakeCache.txt; then
    rm -rf build/cmake
  fi
  cmake "${args[@]}"
  cmake --build build/cmake --parallel "$MAX_JOBS"
}

run_ctest() {
  (cd build/cmake && ctest --output-on-failure)
}

run_pytest() {
  local xml="build/pytest-junit.xml"
  mkdir -p build
  NHGD_REQUIRE_COMPILED=1 NHGD_REQUIRE_CUDA_BUILD="$NHGD_WITH_CUDA" \
    "$PY" -m pytest tests -ra --junitxml="$xml"
  # pytest already fails on "no tests collected"; also fail if everything was skipped.
  "$PY" - "$xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"pytest: {total} tests, {skipped} skipped, {total - skipped} run")
sys.exit(0 if total - skipped > 0 else "pytest ran no tests")
EOF
}

step "venv" make_venv
step "install torch" install_torch
step "toolchain" prepare_cuda
step "build extension (pip -e)" install_package
step "cmake configure+build" cmake_build
step "ctest" run_ctest
step "pytest" run_pytest
