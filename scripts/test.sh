#!/usr/bin/env bash
# The whole test suite, from a fresh clone:
#
#   bash scripts/test.sh
#
# 1. creates .venv if missing and installs torch (and the build tools) in it;
# 2. compiles the extension ahead of time (pip install --no-build-isolation -e,
#    the build users run too), with the CUDA kernels (nvcc, no GPU needed)
#    unless NHGD_WITH_CUDA=0; setup.py finds the toolkit;
# 3. runs pytest, requiring the compiled backend (and the CUDA kernels).
#
# Environment: NHGD_WITH_CUDA (default 1), TORCH_CUDA_ARCH_LIST (default 9.0
# where no GPU is visible), MAX_JOBS (default: number of cores), PYTHON
# (interpreter for a new .venv), NHGD_TORCH_SPEC (default torch==2.14.1).
# Any failing step fails the script.
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
step "build extension (pip -e)" install_package
step "pytest" run_pytest
