#!/usr/bin/env bash
# Every GPU figure of issue #16 in one command (logic and sections: benchmarks/gpu_suite.py; about 8 minutes on one
# H100/H200). `tools/gpu_suite.sh --cpu-smoke --out DIR` runs the same path at tiny sizes on CPU.
#
# On a machine whose Python lacks the project's packages (the GPU machine: no registry reachable), they are installed
# offline from the wheel folder .whl/ that tools/gpu_wheels.sh prepares, into a scratch site folder; the project is
# installed there too, because setup.py maps kernels/ to symdiff.kernels and a bare checkout on PYTHONPATH lacks it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
ready() { (cd / && "$PY" -P -c "import symdiff.kernels, deepspeed, omegaconf, rdkit, h5py" >/dev/null 2>&1); }
if ! ready; then
  SITE="${TMPDIR:-/tmp}/symdiff_suite_site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/deps" .whl/*.whl
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE/project" .
  export PYTHONPATH="$SITE/project:$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
  ready || { echo "gpu_suite: the packages are still missing after installing from .whl/ (run tools/gpu_wheels.sh" \
                  "here first and carry .whl)" >&2; exit 1; }
fi
exec "$PY" -P benchmarks/gpu_suite.py "$@"
