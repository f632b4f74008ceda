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
# ELPV accuracy: ImageNet-pretrained EfficientNet-Lite0 at 224 and at 160 px, and from scratch (same recipe).
RECIPE="--epochs 20 --freeze-epochs 2 --crop-scale 0.8 --vflip --backbone-lr-scale 0.5 --adapt-bn --patience 0"
step elpv_effl0_224 tledge finetune $DATA --img-size 224 $RECIPE --out "$OUT/runs/effl0_224"
step elpv_effl0_160 tledge finetune $DATA --img-size 160 $RECIPE --out "$OUT/runs/effl0_160"
step elpv_scratch_160 tledge finetune $DATA --img-size 160 $RECIPE --weights none --out "$OUT/runs/scratch_160"
# Export parity of the fine-tuned model (fp32, fp16, int8 CPU flavour and TensorRT flavour).
step export_effl0 tledge export "$OUT/runs/effl0_160/best.pt" --fp16 --int8
step export_effl0_trt tledge export "$OUT/runs/effl0_160/best.pt" --int8 --target tensorrt --out "$OUT/runs/effl0_160/export-trt"
# Speed, side by side.
step finetune_speed python benchmarks/finetune_speed.py --data $DATA --json "$OUT/finetune_speed.json"
step runtime_speed python benchmarks/runtime_speed.py --data $DATA --json "$OUT/runtime_speed.json"
step benchmark_effl0 tledge benchmark "$OUT/runs/effl0_160" --data $DATA/test --backend ort-cpu,openvino --plot "$OUT/benchmark_effl0.png"
step runtime_load python benchmarks/runtime_load.py
step fuzz_long env TLEDGE_FUZZ_EXAMPLES=20000 pytest -q -p no:cacheprovider tests/runtime/test_runtime_fuzz.py
step demo tledge demo --out "$OUT/runs/demo"
echo "done: $OUT"
