#!/bin/bash
# GPU batch for the Gemma-3-270M intervention results (notes/interv-gemma-reports.md; issue 11 "on SmolLM2
# and Gemma-3 where it applies"), modelled on notes/interv_gpu.sh. Run from the repository root on the device:
#   MODEL=<the Gemma-3-270M .gguf file (or its folder)> bash notes/interv_gemma_gpu.sh [act lofit influence kv var]
# Results: $OUT/<job>/ (tables + JSON), logs $OUT/<job>.log, $OUT/batch.log, all tables in $OUT/summary.md.
# Step prep (always, first): converts the GGUF once into GEMMA_DIR (default /tmp/gemma3-270m-hf; kept for later
# calls on a warm machine) so that every job loads a plain folder in seconds, prints the device's forward next to
# the CPU reference values and checks Triton against the chunked path (falls back to HEADSCOPE_NO_TRITON=1).
# The device's transformers (5.17) converts Gemma-3's GGUF tokenizer wrongly (one token per character, no <bos>):
# prep checks the tokenizer against ids computed with 5.24 and rebuilds it from the GGUF metadata if needed.
# The GGUF needs the gguf package: if it is missing, prep installs GGUF_WHEEL or .whl/gg/gguf-*.whl (carry it).
# A second call on the still-warm machine skips the conversion: e.g. `... bash notes/interv_gemma_gpu.sh var lofit2`.
# BUDGET (default 540 s) caps the whole batch; a job gets min(its limit, what is left) and is skipped below 20 s.
# Sizes: ACT 500 calibration / 1000 held-out / 10 random sets; LoFiT and influence as notes/interv_device.sh
# (LoFiT K = 2 heads = 3% of 72, 2 x 256 = 512 trained parameters, as SmolLM2's 8 x 64); VAR 100 / 300 / 10;
# kv sink 64 / recent 256 on NIAH 400 and 1600 haystack tokens (the needle beyond the 512-token sliding window
# at 1600) with 3 random streaming sets per fraction over all KV heads.
# Expected on an H200: prep ~60 s (60-100 s on the 2-core CPU; seconds once GEMMA_DIR exists), act ~80 s, lofit ~140 s, influence ~40 s,
# kv ~90 s, var ~90 s. Optional job lofit2 (4 epochs, lam 1e-3, seed 1: SmolLM2's second run), not default.
# SMOKE=1 shrinks every job to a few examples (CPU check of the whole batch: SMOKE=1 OUT=/tmp/x MODEL=... bash ...).
set -u
OUT=${OUT:?set OUT}
MODEL=${MODEL:?set MODEL to the Gemma-3-270M .gguf file (or a folder holding it)}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
GEMMA_DIR=${GEMMA_DIR:-/tmp/gemma3-270m-hf}
if [ "$SMOKE" = 1 ]; then DEV=${DEVICE:-cpu}; BUDGET=${BUDGET:-3000}; else DEV=${DEVICE:-cuda}; BUDGET=${BUDGET:-540}; fi
RETR=${RETR:-L5H1,L11H2,L5H2}   # REPORTS.md "Retrieval heads", Gemma-3-270M: the 3 heads scoring > 0.1
mkdir -p "$OUT" /tmp/pp-interv-gemma
ln -sfn "$PWD" /tmp/pp-interv-gemma/headscope
export PYTHONPATH=/tmp/pp-interv-gemma${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
JOBS=${*:-act lofit influence kv var}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
run() {   # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, stop at LIMIT_S or when BUDGET is spent
  local name=$1 lim=$2; shift 2
  local l=$(left); [ "$l" -lt "$lim" ] && lim=$l
  [ "$lim" -lt 20 ] && { echo "skip $name: $lim s left" | tee -a "$OUT/batch.log"; return 1; }
  echo "== $name (limit $lim s) $(date -u +%T): $*" | tee -a "$OUT/batch.log"
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/batch.log"
  grep -v "it/s\]\|s/it\]\|Warning" "$OUT/$name.log" | cut -c1-1500 | tail -25
  return $rc
}
$PY -c "import torch, transformers, headscope; print(torch.__version__, transformers.__version__, headscope.__file__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee -a "$OUT/batch.log"
echo "SMOKE=$SMOKE DEV=$DEV BUDGET=$BUDGET MODEL=$MODEL GEMMA_DIR=$GEMMA_DIR JOBS=$JOBS" | tee -a "$OUT/batch.log"
if [ ! -f "$GEMMA_DIR/config.json" ] && ! $PY -c "import gguf" 2>/dev/null; then   # transformers reads GGUF with it
  for w in ${GGUF_WHEEL:-} .whl/gg/gguf-*.whl; do [ -f "$w" ] && $PY -m pip install -q --no-deps "$w" && break; done
fi
run prep 240 $PY -u notes/interv_gemma_prep.py "$MODEL" "$GEMMA_DIR" "$DEV" || { echo "prep failed: no job can run" | tee -a "$OUT/batch.log"; exit 1; }
[ -e "$GEMMA_DIR/no_triton" ] && { export HEADSCOPE_NO_TRITON=1; echo "Triton off: $(cat "$GEMMA_DIR/no_triton")" | tee -a "$OUT/batch.log"; }
M=$GEMMA_DIR
CLI="$PY -u -m headscope.app.intervene_cli"
if [ "$SMOKE" = 1 ]; then
  ACT="--calibration 16 --heldout 16 --n-random 2 --max-heads 8 --batch-size 8 --threads 2"
  LOFIT="--k 2 --n-train 16 --n-test 16 --epochs 1 --n-random 2 --threads 2"
  LOFIT2="--k 2 --n-train 16 --n-test 16 --epochs 1 --n-random 2 --threads 2 --lam 1e-3 --seed 1"
  INFL="--per-kind 5 --max-tokens 48 --n-random 2 --threads 2"
  KVENV="LENGTHS=200 DEPTHS=50 FRACS=0,0.5 RANDOM=1 NEW=4 THREADS=2"; KVARGS="8 32"
  VAR="--calibration 6 --heldout 6 --facts 4 --passages 1 --n-random 2 --batch-size 6 --threads 2"
else
  ACT="--calibration 500 --heldout 1000 --n-random 10 --batch-size 64"
  LOFIT="--k 2 --n-train 256 --n-test 400 --epochs 2 --n-random 10"
  LOFIT2="--k 2 --n-train 256 --n-test 400 --epochs 4 --lam 1e-3 --n-random 10 --seed 1"
  INFL="--per-kind 60 --max-tokens 192 --n-random 10"
  KVENV="LENGTHS=${KV_LENGTHS:-400,1600} DEPTHS=0,50,100 FRACS=0,0.25,0.5,0.75 RANDOM=${KV_RANDOM:-3} NEW=24"; KVARGS="64 256"
  VAR="--calibration 100 --heldout 300 --facts 4 --passages 3 --n-random 10 --batch-size 16"
fi
for job in $JOBS; do
  case $job in
    act) run act 170 $PY -u experiments/act.py --model "$M" --device "$DEV" --task sentiment $ACT --out "$OUT/act" ;;
    lofit) run lofit 240 env HEADSCOPE_NO_TRITON=1 $CLI lofit --model "$M" --task sentiment --other-task harm \
             $LOFIT --device "$DEV" --out "$OUT/lofit" ;;
    lofit2) run lofit2 300 env HEADSCOPE_NO_TRITON=1 $CLI lofit --model "$M" --task sentiment --other-task harm \
             $LOFIT2 --device "$DEV" --out "$OUT/lofit2" ;;
    influence) run influence 100 env HEADSCOPE_NO_TRITON=1 $CLI influence --model "$M" --heads "$RETR" $INFL \
             --device "$DEV" --out "$OUT/influence" ;;
    kv) mkdir -p "$OUT/kv"; run kv 130 env MODEL="$M" DEVICE="$DEV" RETR="$RETR" $KVENV OUTJSON="$OUT/kv/kv.json" \
             $PY -u notes/interv_kv_bench.py $KVARGS ;;
    var) run var 150 $PY -u experiments/var.py --model "$M" --device "$DEV" --tau auto $VAR --out "$OUT/var" ;;
    prep) ;;
    *) echo "unknown job $job (act lofit lofit2 influence kv var)" | tee -a "$OUT/batch.log" ;;
  esac
done
{ echo "# Gemma-3-270M interventions, $(date -u +%F) ($DEV, SMOKE=$SMOKE)"; for f in "$OUT"/*/*.md; do
  [ -f "$f" ] && { echo; echo "## $f"; cat "$f"; }; done; } > "$OUT/summary.md"
echo "batch done in $(( $(date +%s) - T0 )) s" | tee -a "$OUT/batch.log"
