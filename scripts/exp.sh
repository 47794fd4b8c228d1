#!/usr/bin/env bash
# Experiment driver for one device call (not part of CI): build, GPU suite, focused decode
# benchmark points; optional variant rebuilds via sed patches given as VARIANTS.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
POINTS=${POINTS:-"fp8 128x2048,grid 128x2048"}
T0=$(date +%s)
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  bash scripts/gpu_check.sh build >"$OUT/check.log" 2>&1
else
  SHARDS=8 bash scripts/gpu_check.sh build tests >"$OUT/check.log" 2>&1
fi
grep -E "FAILED|Error|error:" "$OUT/gpu_tests.log" 2>/dev/null | head -30 >>"$OUT/check.log"
echo "check done $(( $(date +%s) - T0 ))s" >>"$OUT/check.log"
python3 benchmarks/bench_decode.py --extra --impls ${IMPLS:-ours,cudnn} --reps 20 \
  --only "$POINTS" --out "$OUT/b0" >"$OUT/bench0.log" 2>&1
i=1
# ENV_VARIANTS: ';'-separated env settings, each a rerun of the points with them (no rebuild).
IFS=';' read -r -a envs <<<"${ENV_VARIANTS:-}"
for ev in "${envs[@]}"; do
  env $ev python3 benchmarks/bench_decode.py --extra --impls ours --reps 20 --only "$POINTS" \
    --out "$OUT/b$i" >"$OUT/bench$i.log" 2>&1
  echo "bench$i: $ev" >>"$OUT/check.log"
  i=$((i+1))
done
# VARIANTS: ';'-separated "file|sed-expression" patches, each rebuilt and rerun.
IFS=';' read -r -a vars <<<"${VARIANTS:-}"
# Each patch is undone before the next one and on any exit, so no tracked source stays
# edited (the pristine copies live outside the tree).
BACKUP=$(mktemp -d)
restore() { [ -n "${patched:-}" ] && cp "$BACKUP/orig" "$patched"; patched=; }
trap 'restore; rm -rf "$BACKUP"' EXIT
for v in "${vars[@]}"; do
  f=${v%%|*}; e=${v#*|}
  cp "$f" "$BACKUP/orig"; patched=$f
  sed -i "$e" "$f"
  bash scripts/gpu_check.sh build >>"$OUT/check.log" 2>&1
  python3 benchmarks/bench_decode.py --extra --impls ours --reps 20 --only "$POINTS" \
    --out "$OUT/b$i" >"$OUT/bench$i.log" 2>&1
  echo "bench$i: $v" >>"$OUT/check.log"
  restore
  i=$((i+1))
done
# Rebuild the unpatched sources so a later call does not run the last variant's objects.
[ "${#vars[@]}" -gt 0 ] && bash scripts/gpu_check.sh build >>"$OUT/check.log" 2>&1
for f in "$OUT"/bench*.log; do echo "== $f"; grep -E "^\| (grid|fp8|D64|ragged|latency|D256|page64|Hq64|qlen4)" "$f"; done
echo "total $(( $(date +%s) - T0 ))s"
