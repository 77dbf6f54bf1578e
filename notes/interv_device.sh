#!/bin/bash
# Device run for notes/interv-reports.md: LoFiT and AttentionInfluence on SmolLM2 (H200, chunked path,
# HEADSCOPE_NO_TRITON=1). Run from the session checkout's root with this worktree's files carried in
# runs/interv-dev/code and the SmolLM2 GGUF split in two parts (carried in two calls, kept in $HOME).
#   bash runs/interv-dev/code/notes/interv_device.sh stage          (first call: part aa)
#   bash runs/interv-dev/code/notes/interv_device.sh run lofit influence
set -e
D=$PWD/runs/interv-dev
mkdir -p $HOME/smol /tmp/pp
for p in aa ab; do [ -f $D/smol.gguf.part.$p ] && cp $D/smol.gguf.part.$p $HOME/smol/; done
[ "$1" = "stage" ] && { ls -la $HOME/smol; exit 0; }
[ -f $HOME/smol/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat $HOME/smol/smol.gguf.part.aa $HOME/smol/smol.gguf.part.ab > $HOME/smol/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-deps $D/gguf-0.19.0-py3-none-any.whl 2>&1 | tail -1
ln -sfn $D/code /tmp/pp/headscope
export PYTHONPATH=/tmp/pp HEADSCOPE_NO_TRITON=1 HF_HUB_OFFLINE=1
RETR=L18H6,L17H3,L18H7,L23H2,L17H4,L20H6,L23H7,L21H5,L21H8,L22H7,L23H1,L23H8,L24H4,L19H5,L22H4,L21H7
shift
for job in "$@"; do
  case $job in
    lofit) python3 -u -m headscope.app.intervene_cli lofit --model $HOME/smol --task sentiment --other-task harm \
             --k 8 --n-train 256 --n-test 400 --epochs 2 --n-random 10 --device cuda --out $OUT/lofit_smollm2 ;;
    influence) python3 -u -m headscope.app.intervene_cli influence --model $HOME/smol --heads $RETR \
             --per-kind 60 --max-tokens 192 --n-random 10 --device cuda --out $OUT/influence_smollm2 ;;
    lofit2) python3 -u -m headscope.app.intervene_cli lofit --model $HOME/smol --task sentiment --other-task harm \
             --k 8 --n-train 256 --n-test 400 --epochs 4 --lam 1e-3 --n-random 10 --seed 1 --device cuda --out $OUT/lofit2_smollm2 ;;
  esac
done
