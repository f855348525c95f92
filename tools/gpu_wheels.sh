#!/usr/bin/env bash
# Prepare, on a machine with a package registry, the wheel folder .whl/ that tools/gpu_suite.sh installs from offline
# on the GPU machine (Python 3.12, x86-64, no registry reachable). Only what that machine's image lacks: it already has
# torch, triton, numpy, scipy, h5py, pyyaml, msgpack, einops, ninja, psutil, py-cpuinfo, packaging, tqdm, mpi4py,
# matplotlib, tensorboard, pillow, pytest (/work/.library/device/KINDS.md's package list). Versions: requirements.txt's
# pins and the dependency versions they ran with here. Also writes .whl/COMMIT (the tree travels without .git).
#
#   tools/gpu_wheels.sh            # then carry .whl with the working tree (the carry limit is 64 MiB in all)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
OUT="${1:-.whl}"
BUILD=(deepspeed==0.19.8)  # published as an sdist only: built here into a pure-Python wheel (its ops JIT-build there)
WHEELS=(
  hjson==3.1.0                                                      # DeepSpeed's one other dependency not in the image
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5   # DeepSpeed's config model
  omegaconf==2.4.0                                                  # configs (needs PyYAML only)
  rdkit==2026.9.1                                                   # symdiff eval (about 32 MB)
)
tmp="$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${WHEELS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "${BUILD[@]}"
n=$(ls "$tmp"/*.whl | wc -l)
want=$(( ${#WHEELS[@]} + ${#BUILD[@]} ))
if [[ "$n" -ne "$want" ]]; then echo "gpu_wheels: expected $want wheels, got $n" >&2; exit 1; fi
for w in "$tmp"/*.whl; do  # a wheel built for another Python or machine would fail there, offline, too late
  case "$(basename "$w")" in *-py3-none-any.whl|*-cp312-*x86_64*.whl) ;; *) echo "gpu_wheels: $w is not for CPython 3.12 x86-64" >&2; exit 1;; esac
done
{ git rev-parse HEAD 2>/dev/null || echo unknown; } | tr -d '\n' > "$tmp/COMMIT"
[[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] || printf '+dirty' >> "$tmp/COMMIT"
rm -rf "$OUT"
mv "$tmp" "$OUT"
trap - EXIT
size=$(du -sm "$OUT" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1)
echo "gpu_wheels: $n wheels, ${size} MiB in $OUT (+ ${tree} MiB of tracked files; the carry limit is 64 MiB in all)"
echo "on the GPU machine: carry $OUT, then run: bash tools/gpu_suite.sh"
