#!/usr/bin/env bash
# The one GPU command of issue 17 (docs/performance.md): speed table, time to accuracy, EMA overhead.
#
#   bash benchmarks/device_suite.sh           # on the GPU machine, from the checkout's root: ends within 9.5 min
#   bash benchmarks/device_suite.sh --smoke   # the same pipeline on CPU with tiny budgets (tests/test_device_suite.py)
#
# Installs the wheels carried in .whl/ (pure-Python packages the GPU machine lacks) into a folder of their own on
# PYTHONPATH, unpacks the CIFAR-10
# tarballs carried in .data/cifar10/ (or ../shared/data/cifar10) under /tmp, runs every step with a time limit
# and writes under $OUT (at most 8 files): suite.log, speed.md, speed.json, profile.txt, tta.md, tta.json,
# ema_overhead.md. A step that fails or runs out of time is logged and the next one still runs.
set -uo pipefail
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/benchmarks/.cache/device_suite}
mkdir -p "$OUT"
exec > >(tee "$OUT/suite.log") 2>&1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/labelwise-inductor-$$}  # fresh: a killed compile leaves a cache that fails the next
TMP=${TMPDIR:-/tmp}
DEADLINE=570  # seconds: 9.5 of the call's 10 minutes
if (( SMOKE )); then
  DEADLINE=290
  DATA="$TMP/labelwise-smoke-cifar10"
  SPEED=(--network wrn10_1 --batch-size 4 --uratio 2 --warmup 2 --steps 4 --window 2 --profile-steps 2 --threads 1)
  TTA=(--network wrn10_1 --batch-size 8 --uratio 2 --train-per-class 40 --test-per-class 10 --num-labeled 100
       --budgets 8 4 --eval-every 4 --probe-warmup 2 --probe-steps 3 --threads 1 --precision 32-true)
  EMA=(--device cpu --warmup 1 --repeats 3 --threads 1)
  LIMITS=(150 90 40)
else
  DATA="$TMP/labelwise-cifar10"
  SPEED=(--warmup 30 --steps 200 --window 20 --profile-steps 10)
  TTA=(--budgets 240 60 --eval-every 30 --channels-last --no-grad-weak)
  EMA=(--device cuda --warmup 10 --repeats 200)
  LIMITS=(170 340 40)
fi
left() { echo $(( DEADLINE - SECONDS )); }
step() {  # step LIMIT NAME COMMAND...: run with a time limit no later than the deadline
  local limit=$1 name=$2; shift 2
  (( limit > $(left) )) && limit=$(left)
  if (( limit < 10 )); then echo "== $name: skipped, $(left) s left" >&2; return 1; fi
  echo "== $name (limit ${limit} s, $(left) s left): $*" >&2
  timeout --signal=INT --kill-after=30 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $SECONDS s" >&2
  return $rc
}

echo "labelwise device suite; smoke=$SMOKE; $(date -u '+%Y-%m-%d %H:%M UTC'); $(hostname)"
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if compgen -G ".whl/*.whl" >/dev/null; then  # into a folder of their own: no environment is changed
  step 60 "install carried wheels" python -m pip install --no-index --no-deps --quiet --upgrade \
    --target "$TMP/labelwise-wheels" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$TMP/labelwise-wheels"  # after the checkout; installed packages come first
fi
step 60 "import check" python -c "import datamodules, lightning_modules; print('imports ok')" || exit 1

# 1. speed table (~2 min on the GPU): the best row decides the time-to-accuracy options
step "${LIMITS[0]}" "speed table" python benchmarks/speed_fixmatch.py --data "$DATA-speed" --out "$OUT" "${SPEED[@]}"
if python - "$OUT/speed.json" <<'EOF'
import json, sys
best = json.load(open(sys.argv[1]))
row = next((r for r in best["rows"] if r["row"] == best.get("best")), {"options": {}})
sys.exit(0 if row["options"].get("compile") else 1)
EOF
then TTA+=(--compile); fi

# 2. time to accuracy (~6 min on the GPU): FixMatch, then Supervised, same labels
step "${LIMITS[1]}" "time to accuracy" python benchmarks/time_to_accuracy.py --data "$DATA" --out "$OUT" "${TTA[@]}"

# 3. EMA update overhead (left open by the callbacks work), if time is left
step "${LIMITS[2]}" "EMA overhead" python benchmarks/ema_overhead.py "${EMA[@]}" > "$OUT/ema_overhead.md"
cat "$OUT/ema_overhead.md"

echo
echo "== tables (done after $SECONDS s) =="
for table in speed.md tta.md ema_overhead.md; do
  [[ -s "$OUT/$table" ]] && { echo "-- $table"; cat "$OUT/$table"; } || echo "-- $table: missing"
done
[[ -s "$OUT/speed.md" && -s "$OUT/tta.md" && -s "$OUT/ema_overhead.md" ]]
