# Shared by scripts/test.sh and scripts/demo.sh (sourced, not run): the
# project's virtual environment and its torch.
#
# Environment: PYTHON (interpreter for a new .venv), NHGD_TORCH_SPEC (default
# torch==2.14.1).

TORCH_SPEC="${NHGD_TORCH_SPEC:-torch==2.14.1}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

make_venv() {
  if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  "$PY" --version
}

install_torch() {
  # setuptools/wheel: the --no-build-isolation build below uses the venv's own.
  "$PY" -m pip install "$TORCH_SPEC" "setuptools>=64" wheel ninja
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

