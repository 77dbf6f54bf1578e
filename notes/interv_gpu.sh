#!/bin/bash
# GPU batch for notes/interv2-reports.md: ACT (properly powered), VAR on context QA, KV decode bench.
# Run from the repository root on the device machine; results go to $OUT (one folder per job + logs).
#   MODEL=<smollm2 | a SmolLM2 folder or .gguf on the device> bash notes/interv_gpu.sh [act var kv]
# Default jobs: check var act10 kv (the main ACT run, job act, was measured already: notes/interv2-reports.md).
# check (~30 s): plain HF vs headscope hidden states of the GGUF model given as MODEL (a .gguf or its
# folder); on the 2-core CPU machine both peak at 20.207 at layer 2 -- the H200 machine gave 13.99.
# Every job has its own time limit; the whole batch stays under 7.5 minutes
# (ACT ~1-2 min, VAR ~1-2 min, KV ~1 min on an H200; model loads ~10 s each).
set -u
OUT=${OUT:?set OUT}
MODEL=${MODEL:-smollm2}
PY=${PY:-python3}
mkdir -p "$OUT" /tmp/pp-interv-gpu
ln -sfn "$PWD" /tmp/pp-interv-gpu/headscope
export PYTHONPATH=/tmp/pp-interv-gpu${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
JOBS=${*:-check var act10 kv}
T0=$(date +%s)
left() { echo $(( 450 - ($(date +%s) - T0) )); }
run() {   # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, stop at LIMIT_S or at the batch's 450 s
  local name=$1 lim=$2; shift 2
  local l=$(left); [ "$l" -lt "$lim" ] && lim=$l
  [ "$lim" -lt 20 ] && { echo "skip $name: $lim s left" | tee -a "$OUT/batch.log"; return; }
  echo "== $name (limit $lim s) $(date -u +%T): $*" | tee -a "$OUT/batch.log"
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/batch.log"
  grep -v "it/s\]\|s/it\]" "$OUT/$name.log" | tail -25
}
$PY -c "import torch, transformers, headscope; print(torch.__version__, transformers.__version__, headscope.__file__, torch.cuda.get_device_name())" | tee -a "$OUT/batch.log"
for job in $JOBS; do
  case $job in
    check) [ -e "$MODEL" ] && run check 90 env GGUF="$MODEL" $PY -u notes/interv_plainhf.py ;;
    act) run act 200 $PY -u experiments/act.py --model "$MODEL" --device cuda --task sentiment-chat \
           --calibration 500 --heldout 1000 --n-random 10 --batch-size 64 --out "$OUT/act_smollm2" ;;
    act10) run act10 120 $PY -u experiments/act.py --model "$MODEL" --device cuda --task sentiment-chat \
           --calibration 500 --heldout 1000 --n-random 10 --batch-size 64 --top-k 10 --out "$OUT/act_top10_smollm2" ;;
    var) run var 200 $PY -u experiments/var.py --model "$MODEL" --device cuda --calibration 100 --heldout 300 \
           --facts 4 --passages 3 --tau auto --n-random 10 --batch-size 16 --out "$OUT/var_smollm2" ;;
    kv) run kv 120 env MODEL="$MODEL" DEVICE=cuda COMPENSATE=1 $PY -u notes/interv_kv_bench.py 64 256 ;;
  esac
done
echo "batch done in $(( $(date +%s) - T0 )) s" | tee -a "$OUT/batch.log"
