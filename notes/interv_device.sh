#!/bin/bash
# Device run for notes/interv-reports.md: LoFiT and AttentionInfluence on SmolLM2 (GPU, chunked path).
# Needs the SmolLM2 GGUF in $HOME/smol (two carried parts) and the gguf wheel.
set -e
REPO=$PWD
mkdir -p $HOME/smol /tmp/pp
[ -f runs/devdata/smol.gguf.part.aa ] && cp runs/devdata/smol.gguf.part.aa $HOME/smol/
[ -f runs/devdata/smol.gguf.part.ab ] && cp runs/devdata/smol.gguf.part.ab $HOME/smol/
[ "$1" = "stage" ] && { ls -la $HOME/smol; exit 0; }
cat $HOME/smol/smol.gguf.part.aa $HOME/smol/smol.gguf.part.ab > $HOME/smol/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-deps runs/devdata/gguf-0.19.0-py3-none-any.whl 2>&1 | tail -1
ln -sfn $REPO /tmp/pp/headscope
export PYTHONPATH=/tmp/pp HEADSCOPE_NO_TRITON=1 HF_HUB_OFFLINE=1
shift || true
for job in "$@"; do
  case $job in
    lofit) python3 -u -m headscope.app.intervene_cli lofit --model $HOME/smol --task sentiment --other-task harm \
             --k 8 --n-train 256 --n-test 400 --epochs 3 --n-random 10 --device cuda --out $OUT/lofit_smollm2 ;;
    influence) python3 -u -m headscope.app.intervene_cli influence --model $HOME/smol --n-heads 16 --per-kind 60 \
             --max-tokens 192 --n-random 10 --device cuda --out $OUT/influence_smollm2 ;;
  esac
done
