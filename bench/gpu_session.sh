#!/usr/bin/env bash
# One GPU session in one command (the device machine runs commands <= 10 min):
# compile the extension with the CUDA kernels for the local GPU, run the whole
# test suite on the CUDA backend (GPU tests included), then the op benchmarks
# the pipeline benchmark and the paper's cleaning and heat tables on the GPU.
# Logs go to $OUT (default /tmp/nhgd_gpu). Usage: bash bench/gpu_session.sh [pytest args]
set -uo pipefail
OUT="${OUT:-/tmp/nhgd_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export NHGD_WITH_CUDA=1 PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/machine.txt"

t0=$(date +%s)
"$PY" -c "import nhgd_ext; print('backend', nhgd_ext.backend(), 'cuda kernels', nhgd_ext.compiled_with_cuda())" \
  2>&1 | tee "$OUT/build.log"
echo "build: $(( $(date +%s) - t0 ))s" | tee -a "$OUT/build.log"

NHGD_REQUIRE_COMPILED=1 NHGD_REQUIRE_CUDA_BUILD=1 "$PY" -m pytest tests -q -rs -p no:cacheprovider "$@" \
  2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

if [ -z "${NHGD_SKIP_BENCH:-}" ]; then
  "$PY" -m pytest bench/bench_ops.py --benchmark-only -q -p no:cacheprovider -k "${NHGD_BENCH_K:-cuda}" \
    --benchmark-columns=min,median,mean,rounds --benchmark-sort=name \
    --benchmark-json="$OUT/bench_ops.json" 2>&1 | tee "$OUT/bench_ops.log"
  # The pipeline on one GPU (the consumer on its own stream).
  "$PY" bench/bench_pipeline.py --device cuda --repeats 5 2>&1 | tee "$OUT/bench_pipeline.log"
  # The paper's cleaning and heat tables on the GPU, NHGD synchronous and pipelined (second stream).
  "$PY" bench/paper_tables.py cleaning --device cuda --seeds "${NHGD_TABLE_SEEDS:-1}" --out "$OUT/table_cleaning" \
    --methods nhgd,nhgd-pipelined,cg10,neumann10,none 2>&1 | tee "$OUT/table_cleaning.log"
  "$PY" bench/paper_tables.py heat --device cuda --seeds "${NHGD_TABLE_SEEDS:-1}" --out "$OUT/table_heat" \
    2>&1 | tee "$OUT/table_heat.log"
fi
exit "$test_rc"
