#!/usr/bin/env bash
# The one GPU command of issue 17 (docs/performance.md): speed table, time to accuracy, EMA overhead.
#
#   bash benchmarks/device_suite.sh           # on the GPU machine, from the checkout's root: ends within 9.5 min
#   bash benchmarks/device_suite.sh --smoke   # the same pipeline on CPU with tiny budgets (tests/test_device_suite.py)
#   bash benchmarks/device_suite.sh --detection   # queued (issue 20), its own call: the coco128 semi-supervised rows
#
# Installs the wheels carried in .whl/ (pure-Python packages the GPU machine lacks) into a folder of their own on
# PYTHONPATH, unpacks the CIFAR-10
# tarballs carried in .data/cifar10/ (or ../shared/data/cifar10) under /tmp, runs every step with a time limit
# and writes under $OUT (at most 8 files): suite.log, speed.md, speed.json, profile.txt, tta.md, tta.json,
# ema_overhead.md. A step that fails or runs out of time is logged and the next one still runs.
set -uo pipefail
SMOKE=0 DETECTION=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
[[ "${1:-}" == "--detection" ]] && DETECTION=1
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

if (( DETECTION )); then
  # Queued, not yet run: Detector, UnbiasedTeacher and SoftTeacher on the same 32 labeled coco128 images (80
  # unlabeled), Faster R-CNN MobileNetV3 FPN from random weights, one row per step so a row that runs out of time
  # costs only itself; writes det_<row>.md (3 files). Needs coco128 carried in .data/coco128 (22 MB; or
  # ../shared/data/coco128) and faster-coco-eval importable (the mAP backend; a C extension pack_carry.py cannot
  # rebuild). lr 0.005: torchvision's 0.00125 per image. 1500 steps of 4 (+ 4 unlabeled) images is a guess at
  # what fits 170 s per row: unmeasured on a GPU.
  COCO=.data/coco128; [[ -d $COCO ]] || COCO=../shared/data/coco128
  python -c "import faster_coco_eval" || echo "faster-coco-eval is missing: the rows cannot score mAP" >&2
  for row in mobilenet_32_labels unbiased_teacher_32_labels soft_teacher_32_labels; do
    step 180 "coco128 $row" python benchmarks/det_coco128.py --rows "$row" --steps 1500 --batch-size 4 \
      --lr 0.005 --ema-decay 0.99 --shared "$(dirname "$COCO")" --output "$OUT/det_$row.md"
  done
  for table in "$OUT"/det_*.md; do echo "-- $table"; cat "$table"; done
  exit 0
fi

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
