#!/bin/bash
# GPU batch for notes/interv2-reports.md: ACT (properly powered), VAR on context QA, KV decode bench.
# Run from the repository root on the device machine; results go to $OUT (one folder per job + logs).
#   MODEL=<smollm2 | a SmolLM2 folder or .gguf on the device> bash notes/interv_gpu.sh [act var kv]
# Default jobs, in priority order: var check kv act10 (the main ACT run, job act, was measured already:
# notes/interv2-reports.md). BUDGET (default 240 s) caps the batch; jobs that no longer fit are skipped.
# check (~30 s): plain HF vs headscope hidden states of the GGUF model given as MODEL (a .gguf or its
# folder); on the 2-core CPU machine both peak at 20.207 at layer 2 -- the H200 machine gave 13.99.
# Expected on an H200: var ~60-90 s, check ~30 s, kv ~60 s, act10 ~90 s (each includes a ~20 s GGUF load).
set -u
OUT=${OUT:?set OUT}
MODEL=${MODEL:-smollm2}
PY=${PY:-python3}
mkdir -p "$OUT" /tmp/pp-interv-gpu
ln -sfn "$PWD" /tmp/pp-interv-gpu/headscope
export PYTHONPATH=/tmp/pp-interv-gpu${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
JOBS=${*:-var check kv act10}
T0=$(date +%s)
BUDGET=${BUDGET:-240}    # seconds for the whole batch (jobs that do not fit are skipped)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
run() {   # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, stop at LIMIT_S or when BUDGET is spent
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
    check) [ -e "$MODEL" ] && run check 120 env GGUF="$MODEL" $PY -u notes/interv_plainhf.py ;;
    act) run act 200 $PY -u experiments/act.py --model "$MODEL" --device cuda --task sentiment-chat \
           --calibration 500 --heldout 1000 --n-random 10 --batch-size 64 --out "$OUT/act_smollm2" ;;
    act10) run act10 100 $PY -u experiments/act.py --model "$MODEL" --device cuda --task sentiment-chat \
           --calibration 500 --heldout 1000 --n-random 10 --batch-size 64 --top-k 10 --out "$OUT/act_top10_smollm2" ;;
    var) run var 150 $PY -u experiments/var.py --model "$MODEL" --device cuda --calibration 100 --heldout 300 \
           --facts 4 --passages 3 --tau auto --n-random 10 --batch-size 16 --out "$OUT/var_smollm2" ;;
    lofit) run lofit 90 env HEADSCOPE_NO_TRITON=1 $PY -u -m headscope.app.intervene_cli lofit --model "$MODEL" --task sentiment \
           --other-task harm --k 8 --n-train 256 --n-test 400 --epochs 2 --n-random 10 --device cuda --out "$OUT/lofit_smollm2" ;;
    lofit2) run lofit2 110 env HEADSCOPE_NO_TRITON=1 $PY -u -m headscope.app.intervene_cli lofit --model "$MODEL" --task sentiment \
           --other-task harm --k 8 --n-train 256 --n-test 400 --epochs 4 --lam 1e-3 --n-random 10 --seed 1 --device cuda \
           --out "$OUT/lofit2_smollm2" ;;
    influence) run influence 110 env HEADSCOPE_NO_TRITON=1 $PY -u -m headscope.app.intervene_cli influence --model "$MODEL" \
           --heads L18H6,L17H3,L18H7,L23H2,L17H4,L20H6,L23H7,L21H5,L21H8,L22H7,L23H1,L23H8,L24H4,L19H5,L22H4,L21H7 \
           --per-kind 60 --max-tokens 192 --n-random 10 --device cuda --out "$OUT/influence_smollm2" ;;
    kv) run kv 100 env MODEL="$MODEL" DEVICE=cuda COMPENSATE=1 $PY -u notes/interv_kv_bench.py 64 256 ;;
  esac
done
echo "batch done in $(( $(date +%s) - T0 )) s" | tee -a "$OUT/batch.log"
