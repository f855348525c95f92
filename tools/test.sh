#!/usr/bin/env bash
# Quick-start command 2: set up (idempotent) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
export TRITON_INTERPRET=1
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
exec .venv/bin/python -m pytest -q -ra --durations=15 tests "$@"
