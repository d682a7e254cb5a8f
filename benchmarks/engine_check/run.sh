#!/usr/bin/env bash
# Engine v1 (commit d2be5ff, before the hooks) vs v2 (this tree) on `make bench`'s headline CPU
# cells, interleaved in one run (v1, v2, v1, v2) so that machine drift hits both alike:
#   tiny  C = 8, 32: loop, vmap, vmap@8, mesh, pmap      MiniLM size C = 8: loop, vmap@1s
# bash benchmarks/engine_check/run.sh [OUT]   (about 10 minutes on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=$(realpath -m "${1:-benchmarks/results/engine-v1-vs-v2}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, the venv's own link
V1=$(mktemp -d)/v1
git worktree add -q --detach "$V1" d2be5ff
trap 'git worktree remove --force "$V1"' EXIT
mkdir -p "$OUT"
for rep in 1 2; do
  for version in v1 v2; do
    # `python -m` puts the working directory first on sys.path (before PYTHONPATH), so each
    # version runs from its own checkout; the bench's multi-device child inherits both.
    src=$PWD; [ "$version" = v1 ] && src=$V1
    (cd "$src" && PYTHONPATH=$src $PY -m fedjax_lm.bench --model tiny --clients 8,32 \
      --backends loop,vmap,vmap@8,mesh,pmap --rounds 7 --out "$OUT/$version-tiny-$rep" &&
     PYTHONPATH=$src $PY -m fedjax_lm.bench --model mini --clients 8 \
      --backends loop,vmap@1s --rounds 3 --out "$OUT/$version-mini-$rep" &&
     $PY -c "import fedjax_lm, sys; print('$version ran', fedjax_lm.__file__)")
  done
done
$PY benchmarks/engine_check/compare.py "$OUT"
