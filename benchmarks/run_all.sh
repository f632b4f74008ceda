#!/usr/bin/env bash
# Every measurement in benchmarks/RESULTS.md, one after another (never two at once: they share the CPU).
#   benchmarks/run_all.sh [OUT_DIR]      (default /tmp/tledge-results; ~2.5 h on 2 cores)
# Each step's output goes to OUT_DIR/<step>.log; RESULTS.md is written by hand from those logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/tledge-results}
mkdir -p "$OUT"
export TLEDGE_PROGRESS=0
DATA=data/elpv
[ -d "$DATA/train" ] || tledge data elpv "$DATA"

step() {  # step NAME COMMAND...: run, time, keep the log, go on even if it fails
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/steps.txt"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

lscpu > "$OUT/machine.txt"; pip freeze >> "$OUT/machine.txt"
# The demo from a fresh clone of this checkout (its own data folder, materialised from the pip package).
rm -rf "$OUT/clone" && git clone -q . "$OUT/clone"
step demo bash -c "cd '$OUT/clone' && tledge demo --out runs/demo"
# ELPV accuracy: ImageNet-pretrained EfficientNet-Lite0 at 224 px, and the demo recipe from scratch.
RECIPE="--epochs 20 --freeze-epochs 2 --crop-scale 0.8 --vflip --backbone-lr-scale 0.5 --adapt-bn --patience 0"
step elpv_effl0_224 tledge finetune $DATA --img-size 224 $RECIPE --out "$OUT/runs/effl0_224"
step elpv_scratch_160 tledge finetune $DATA --img-size 160 --epochs 10 --freeze-epochs 2 --crop-scale 0.8 --vflip \
  --backbone-lr-scale 0.5 --adapt-bn --patience 0 --weights none --out "$OUT/runs/scratch_160"
# ResNet-18 from scratch (no ResNet weights offline): export parity and the runtime speed model.
step r18_train tledge finetune $DATA --arch resnet18 --weights none --img-size 224 --epochs 3 --freeze-epochs 0 \
  --out "$OUT/runs/r18"
step r18_export tledge export "$OUT/runs/r18/best.pt" --fp16 --int8
step effl0_224_export tledge export "$OUT/runs/effl0_224/best.pt" --fp16 --int8 --calib-method percentile
# Speed, side by side.
step finetune_speed python benchmarks/finetune_speed.py --data $DATA --json "$OUT/finetune_speed.json"
step runtime_speed python benchmarks/runtime_speed.py --data $DATA --run "$OUT/runs/r18" --json "$OUT/runtime_speed.json"
step r18_bench tledge benchmark "$OUT/runs/r18" --data $DATA/test --backend ort-cpu,openvino --plot "$OUT/bench_r18.png"
step effl0_224_bench tledge benchmark "$OUT/runs/effl0_224" --data $DATA/test --backend ort-cpu,openvino \
  --plot "$OUT/bench_effl0_224.png"
# Robustness.
step runtime_load python benchmarks/runtime_load.py
step fuzz_long env TLEDGE_FUZZ_EXAMPLES=20000 pytest -q -p no:cacheprovider tests/runtime/test_runtime_fuzz.py
step interruptions python benchmarks/interruptions.py --json "$OUT/interruptions.json"
echo "done: $OUT"
