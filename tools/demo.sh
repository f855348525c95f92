#!/usr/bin/env bash
# Quick-start command 1: set up (idempotent) and run the embedded default end to end on CPU with the
# bundled QM9 subset: build shards -> train a small SymDiff -> sample -> evaluate -> report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
# One ninja for every DeepSpeed JIT build (the venv's): a different ninja treats the cache as stale and rebuilds.
export PATH="$ROOT/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
exec .venv/bin/symdiff demo --out "${SYMDIFF_DEMO_OUT:-runs/demo}" "$@"
