#!/usr/bin/env bash
# Quick-start command 2: set up (idempotent) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
export TRITON_INTERPRET=1
# One ninja for every DeepSpeed JIT build (the venv's): a different ninja treats the cache as stale and rebuilds.
export PATH="$ROOT/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
exec .venv/bin/python -m pytest -q -ra --durations=15 tests "$@"
