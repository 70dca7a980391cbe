# Sourced by scripts/serve and scripts/test: make .venv with everything the project needs.
# torch is pinned to 2.13.0 (the release the tests use) and installed first, so the
# package's own `torch>=2.6` range is already met and pip never downloads a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.bootstrap-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "==> setting up $VENV (first run takes a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" numpy
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
  rm -f "$VENV"/.bootstrap-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
