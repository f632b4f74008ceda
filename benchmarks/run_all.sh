#!/usr/bin/env bash
# Every measurement in benchmarks/RESULTS.md (and the README's demo table), one after another: never two at
# once, they share the CPU.
#   benchmarks/run_all.sh [OUT_DIR]      (default /tmp/tledge-results; ~6 h on 2 cores)
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
DEMO="$OUT/clone/runs/demo"
# The demo's table again on a quiet machine (the demo's own wall time and latencies are those of its run).
step demo_benchmark bash -c "cd '$OUT/clone' && tledge benchmark runs/demo --data data/elpv/test"
# The export gate (issue 25): refusal rate of the old and new rule as k answers of the demo's verification set are
# flipped (in the clone: the demo's split.json names its images relative to it); the verdicts recorded before the
# paired rule, re-judged from their counts.
step gate_simulation bash -c "cd '$OUT/clone' && python benchmarks/gate_simulation.py runs/demo \
  --json '$OUT/gate_simulation.json' --plot '$OUT/gate_simulation.png'"
step gate_history python benchmarks/gate_history.py --json "$OUT/gate_history.json"
# int8 weights (RESULTS §11): 7-bit u8xs8 against 8-bit u8xs8, u8xu8 and s8xs8 on the demo's model.
step int8_weights bash -c "cd '$OUT/clone' && python benchmarks/int8_weights.py runs/demo"
# "unknown" (issue 20, RESULTS §13): calibration, conformal sets, four OOD detectors at fp32 and int8, cost.
step ood_protocol bash -c "cd '$OUT/clone' && python benchmarks/ood_protocol.py runs/demo --data data/elpv \
  --export runs/demo/export --json '$OUT/ood_protocol.json'"
# What a fine-tuning epoch of the demo costs by input size and by how much of the network trains (RESULTS §12).
for cfg in "160 all" "160 3" "128 all" "192 3"; do
  set -- $cfg
  step "partial_$1_$2" tledge finetune "$DATA" --img-size "$1" $([ "$2" = all ] || echo --unfreeze "$2") \
    --epochs 3 --freeze-epochs 2 --crop-scale 0.8 --vflip --patience 0 --out "$OUT/partial-$1-$2"
done
# One preprocessing path (issue 11): camera-frame speed, end-to-end parity of `tledge evaluate --predictions`.
step preprocess_speed python benchmarks/preprocess_speed.py --json "$OUT/preprocess_speed.json"
step predictions_parity python benchmarks/predictions_parity.py "$DEMO/best.pt" "$OUT/clone/data/elpv/test"
# The on-device check and device="auto" on the demo's export (issue 12).
step device_check python benchmarks/device_check.py "$DEMO/export" --json "$OUT/device_check.json"
step model_swap python benchmarks/model_swap.py --work "$OUT/model_swap"
# Accuracy (issue 13): the default recipe over three ELPV splits, int8 (with QAT when needed) for each;
# the default on a second dataset (digits).
step elpv_default python benchmarks/recipe_elpv.py --seeds 0 1 2 --export --out "$OUT/elpv-default" \
  --json "$OUT/elpv_default.json"
step digits python benchmarks/recipe_digits.py --seed 0 --out "$OUT/digits" --json "$OUT/digits.json"
for s in 1 2; do  # issue 23: the default is chosen on three digits splits, not one
  step "digits_$s" python benchmarks/recipe_digits.py --seed "$s" --out "$OUT/digits-$s" --json "$OUT/digits_$s.json"
done
# "unknown" on the second pair: the digits model, with ELPV's test images and the photos outside.
step ood_digits python benchmarks/ood_protocol.py "$OUT/digits/run-0" --data "$OUT/digits/data-0" --no-digits \
  --outside-folder "$DATA/test" --json "$OUT/ood_digits.json"
# Lite1 and Lite2 rows (RESULTS §2b): the default recipe at each architecture's own size on split seed 0, int8
# export, then accuracy against latency for Lite0 (seed 0 above), Lite1 and Lite2; Lite2 again with a longer QAT.
for arch in lite1 lite2; do
  step "${arch}_train" tledge finetune "$OUT/elpv-default/data-0" --arch "efficientnet_$arch" --out "$OUT/$arch"
  step "${arch}_export" tledge export "$OUT/$arch/best.pt" --int8
done
for run in "$OUT/elpv-default/run-0" "$OUT/lite1" "$OUT/lite2"; do
  name=$(basename "$run")
  step "bench_$name" tledge benchmark "$run" --data "$OUT/elpv-default/data-0" --backend ort-cpu,openvino \
    --plot "$OUT/bench_$name.png"
done
step lite2_qat6 tledge export "$OUT/lite2/best.pt" --int8 --qat on --qat-epochs 6 --out "$OUT/lite2/export-qat6"
# The best architecture on seed 0 (Lite1) on the other two splits (RESULTS §2; seed 0 is the lite1 run above).
mkdir -p "$OUT/elpv-lite1"
for s in 1 2; do ln -sfn "$OUT/elpv-default/data-$s" "$OUT/elpv-lite1/data-$s"; done
step elpv_lite1_seeds12 python benchmarks/recipe_elpv.py --seeds 1 2 --extra "--arch efficientnet_lite1" --export \
  --out "$OUT/elpv-lite1" --json "$OUT/elpv_lite1_seeds12.json"
step qat_elpv python benchmarks/qat_elpv.py "$OUT/elpv-default/run-0/best.pt" --steps 40 --lr 1e-5 --train-images 320 \
  --out "$OUT/qat_elpv.json"
# Speed, side by side.
step finetune_speed python benchmarks/finetune_speed.py --data $DATA --json "$OUT/finetune_speed.json"
# Faster CPU fine-tuning (issue 23): today's loop vs the probe's fast path, interleaved; ablations, profile, paired runs.
step train_speed python benchmarks/train_speed.py --data $DATA --ablate --profile --paired --work "$OUT/train_speed" \
  --json "$OUT/train_speed.json"
step r18_train tledge finetune $DATA --arch resnet18 --weights none --img-size 224 --epochs 3 --freeze-epochs 0 \
  --out "$OUT/runs/r18"
step runtime_speed python benchmarks/runtime_speed.py --data $DATA --run "$OUT/runs/r18" --json "$OUT/runtime_speed.json"
# Robustness: hostile inputs before/after (runtime-only installs), load, long fuzzing, interruptions.
python -m venv "$OUT/venv-rt-before" && "$OUT/venv-rt-before/bin/pip" -q install "$OUT/clone-before/runtime" 2>/dev/null \
  || { rm -rf "$OUT/clone-before"; git worktree add -f "$OUT/clone-before" a5d733c >/dev/null 2>&1;
       "$OUT/venv-rt-before/bin/pip" -q install "$OUT/clone-before/runtime"; }
python -m venv "$OUT/venv-rt-after" && "$OUT/venv-rt-after/bin/pip" -q install ./runtime
step attacks python benchmarks/attacks.py --before "$OUT/venv-rt-before/bin/python" \
  --after "$OUT/venv-rt-after/bin/python" --json "$OUT/attacks.json"
step runtime_load python benchmarks/runtime_load.py
step fuzz_long env TLEDGE_FUZZ_EXAMPLES=20000 pytest -q -p no:cacheprovider --timeout 0 tests/runtime/test_runtime_fuzz.py
step interruptions python benchmarks/interruptions.py --json "$OUT/interruptions.json"
echo "done: $OUT"
