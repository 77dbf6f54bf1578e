#!/bin/bash
# The kernel measurements of notes/kernels-benchmarks.md, as run on the lent H200 (device tool).
# Usage (inside the repo copy on the GPU machine): bash benchmarks/h200_kernels.sh STEP...
#   fa4     install FlashAttention-4 from the wheels in $WHEELS (default .whl) into /tmp/fa4site
#   tests   GPU tests of the Triton kernels (decode + general) and the probe check
#   decode  decode sweep + decode table;  sweep  prefill tile sweep (16k);  e2e  census vs SDPA at 32k
#           ($E2E_SHAPE: llama3-8b (default), qwen2.5-7b, smollm2 or d256; $E2E_LAYERS, default 8)
#   compare FA4/cuDNN/flash/Flex/ours table, with the FA4 backend's columns (after fa4)
#   fa4check  the FA4 backend's tests (tests/test_kernels_fa4.py: GPU tests against the reference; a pytest -k
#             expression in $FA4CHECK_K, e.g. "in_kernel or received") (after fa4)
#   masses  e2e at 32k: SDPA vs the sink/recent/window masses record vs headscope plain (after fa4)
#   decodehost  per-call decode time, eager vs CUDA graph: SDPA, split-key path, query-block forward
#               ($DECODE_MIN_K: the split-key column's threshold, 0 to force it at every K)
#   decodetargets  issue 13's decode grid (Llama-3-8B, B 1 and 8, K 8k/32k/128k, argmax and all rows),
#               eager and graph ratios to default SDPA ($DECODE_ARGS for decodehost and decodetargets, e.g.
#               "--merge fused,kernel --rounds 3": both merges of the key splits, in turns)
#   decodee2e   benchmarks/decode_e2e_gpu.py: a whole model's eager decode step, SDPA vs headscope with nothing,
#               argmax or every row statistic recorded ($DECODE_E2E_ARGS: its options, e.g. "--grid 1:8192")
#   retrieval   the retrieval analyzer with and without the split-key path (MODEL=path to SmolLM2's GGUF
#               or folder; needs rouge_score on PYTHONPATH, e.g. the .whl/pydeps folder)
#   rowsab      benchmarks/rows_ab.py for this tree's kernels/flash_stats.py (label "tree"); with $BASELINE (a
#               kernels/ folder of another commit, as for launch) that one too ("base"), in turns, twice
#   fa4stats    benchmarks/fa4_stats_gpu.py: in-kernel row statistics and column sums, checks + timing (after fa4)
#   long        fa4_stats_gpu.py timing at long context: $SHAPES (default the two d128 ones) at $LONG_SIZES
#               (default 65536,131072), 2 s of calls per column; all rows, rows + column sums, the pass (after fa4)
#   decodefloor benchmarks/decode_floor.py: the whole eager decode call against the floor of a Python launch
#               (result buffers, addresses, one launcher call, the statistics dict)
#   decodeprof  benchmarks/decode_host_profile.py: where an eager decode step's host time goes (cProfile)
#   colsum      benchmarks/colsum_ab.py: the transposed column-sum pass's variants (after fa4)
#   colsumbest  the same with the variant colsum_ab.py found fastest (the BEST line of
#               $OUT/colsum_ab.md; after colsum)
#   abtest      the experimental switches of kernels/fa4_stats (each setting of $AB, "+" joining
#               VAR=value pairs; "-" is the defaults): the FA4 GPU tests of the in-kernel statistics and
#               column sums, and fa4_stats_gpu.py --check-only, with each non-default setting (after fa4)
#   abtime      fa4_stats_gpu.py timing of every setting of $AB, $AB_ROUNDS rounds (default 2), interleaved,
#               shapes $SHAPES (default the two d128 ones; add SmolLM2,Gemma-3 for the d64/d256 tiles)
#               (e.g. AB="HEADSCOPE_FA4S_PARTIALS=1 HEADSCOPE_FA4S_PARTIALS=4" for the partial-sums A/B);
#               $AB_ONLY: the columns (default "ours: all rows,transposed pass alone"), $AB_REP: ms of calls per column
#   launch      benchmarks/launch_overhead.py: an eager decode step's host cost taken apart ($BASELINE: a
#               kernels/ folder of another commit, e.g. .baseline/kernels_7547907 from `git archive`,
#               carried to the device, timed in turns with this tree's)
#   hosttests   the GPU tests of the decode path and the compiled-kernel launch alone (quick)
#   ncu         Nsight Compute over benchmarks/ncu_rows.py's sets in $NCU_SETS (default "split cols"):
#               $OUT/ncu_SET.csv and its table (benchmarks/ncu_summary.py); with NCU_SASS=1 also the
#               per-SASS-instruction stall samples of FA4 and of the all-rows kernel (ncu_sass_*.csv.gz) (after fa4)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/headscope
export PYTHONPATH=/tmp/pp:$PWD PYTHONUNBUFFERED=1
SITE=/tmp/fa4site
# the experimental switches of kernels/fa4_stats (see abtest/abtime)
# (row-kernel and column-pass switches paired: the two kernels are timed in separate columns)
# (controls for the tile defaults of 2026-12-02: FA4's d64/d256 row tiles, the column pass at 128 for d64)
AB_DEFAULT="- HEADSCOPE_FA4S_TILES=64:192x128,256:128x80+HEADSCOPE_FA4S_COLSUM_TILE_N=128"
export KERNELS_BEST=${KERNELS_BEST:-$HOME/kernels_best.json}
if [ -d $SITE/nvidia_cutlass_dsl ]; then export PYTHONPATH=$PYTHONPATH:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages; fi
# pytest maps the repo root (it has an __init__.py) to a package named after its folder: tests run in a copy
copy_tree() { rm -rf /tmp/hs && mkdir -p /tmp/hs && cp -r "$PWD" /tmp/hs/headscope; }
for step in "$@"; do
  case $step in
    fa4)
      mkdir -p $SITE
      for w in ${WHEELS:-.whl}/*.whl; do python3 -m zipfile -e "$w" $SITE; done
      export PYTHONPATH=$PYTHONPATH:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages
      python3 -c "from flash_attn.cute import flash_attn_func; print('FA4 import ok')" 2>&1 | tail -3 ;;
    tests)
      copy_tree
      (cd /tmp/hs/headscope && PYTHONPATH=/tmp/hs:$PYTHONPATH python3 -m pytest -q -p no:cacheprovider \
         tests/test_kernels_decode.py tests/test_triton_kernels.py 2>&1 | tee $OUT/tests.log | tail -15)
      python3 benchmarks/cuda_probe_check.py 2>&1 | tee $OUT/probe_check.log | tail -15 ;;
    decode)
      python3 benchmarks/attention_bench.py --decode-sweep --decode 2>&1 | tee $OUT/decode.log | grep -v "^$" | tail -30 ;;
    sweep)
      python3 benchmarks/attention_bench.py --sweep --sweep-sizes 16384 2>&1 | tee $OUT/sweep.log | tail -30 ;;
    e2e)
      python3 benchmarks/e2e_gpu.py --n 32768 --layers ${E2E_LAYERS:-8} --shape ${E2E_SHAPE:-llama3-8b} --no-eager 2>&1 \
        | tee -a $OUT/e2e.log | tail -3 ;;
    fa4check)
      copy_tree
      (cd /tmp/hs/headscope && PYTHONPATH=/tmp/hs:$PYTHONPATH python3 -m pytest -q -p no:cacheprovider -rs \
         tests/test_kernels_fa4.py ${FA4CHECK_K:+-k "$FA4CHECK_K"} 2>&1 | tee $OUT/fa4check.log | tail -25) ;;
    masses)
      mkdir -p $OUT/masses
      python3 benchmarks/e2e_gpu.py --n 32768 --layers ${E2E_LAYERS:-8} --no-eager --masses-only --out $OUT/masses 2>&1 \
        | tee $OUT/e2e_masses.log | tail -8 ;;
    decodehost)
      python3 benchmarks/decode_host.py ${DECODE_MIN_K:+--min-k $DECODE_MIN_K} ${DECODE_ARGS:-} 2>&1 | tee $OUT/decode_host.md | tail -16 ;;
    decodee2e)
      python3 benchmarks/decode_e2e_gpu.py ${DECODE_E2E_ARGS:-} 2>&1 | tee -a $OUT/decode_e2e.log | tail -10 ;;
    decodetargets)
      python3 benchmarks/decode_host.py --targets ${DECODE_ARGS:-} 2>&1 | tee $OUT/decode_targets.md | tail -14 ;;
    retrieval)
      python3 -u benchmarks/retrieval_gpu.py --model "${MODEL:?set MODEL}" --repeats 2 2>&1 | grep -v "it/s\]" \
        | tee $OUT/retrieval_gpu.log | tail -8 ;;
    rowsab)
      if [ -n "${BASELINE:-}" ]; then      # this tree and $BASELINE's kernels/, in turns, twice
        rm -rf /tmp/bb && mkdir -p /tmp/bb && cp -r "$PWD" /tmp/bb/headscope && rm -rf /tmp/bb/headscope/kernels \
          && cp -r "$BASELINE" /tmp/bb/headscope/kernels
        for r in 1 2; do
          python3 benchmarks/rows_ab.py tree ${ROWS_AB_SIZES:-16384 65536} 2>&1 | tee -a $OUT/rows_ab.md | tail -2
          PYTHONPATH=/tmp/bb:$PWD python3 benchmarks/rows_ab.py base ${ROWS_AB_SIZES:-16384 65536} 2>&1 \
            | tee -a $OUT/rows_ab.md | tail -2
        done
      else
        python3 benchmarks/rows_ab.py tree 16384 65536 2>&1 | tee $OUT/rows_ab.md | tail -4
      fi ;;
    fa4stats)
      python3 benchmarks/fa4_stats_gpu.py --shapes ${SHAPES:-Llama-3-8B,Qwen2.5-7B,Gemma-3} --sizes ${SIZES:-16384,32768} \
        2>&1 | grep -v "Warn\|exe_args" | tee $OUT/fa4_stats.md | grep -v "^check" | tail -10 ;;
    long)
      python3 benchmarks/fa4_stats_gpu.py --shapes ${SHAPES:-Llama-3-8B,Qwen2.5-7B} --sizes ${LONG_SIZES:-65536,131072} \
        --no-check --rep 2000 --only "cuDNN SDPA,ours: all rows,all rows + column sums,transposed pass alone,masses,entropy+distance+argmax" \
        2>&1 | grep -v "Warn\|exe_args" | tee -a $OUT/fa4_stats_long.md | tail -12 ;;
    launch)
      python3 benchmarks/launch_overhead.py ${BASELINE:+--baseline "$BASELINE"} 2>&1 | tee $OUT/launch_overhead.md | tail -8 ;;
    decodefloor)
      python3 benchmarks/decode_floor.py 2>&1 | tee $OUT/decode_floor.md | tail -8 ;;
    hosttests)
      copy_tree
      (cd /tmp/hs/headscope && PYTHONPATH=/tmp/hs:$PYTHONPATH python3 -m pytest -q -p no:cacheprovider \
         tests/test_kernels_decode.py tests/test_triton_launch.py 2>&1 | tee $OUT/hosttests.log | tail -6) ;;
    decodeprof)
      python3 benchmarks/decode_host_profile.py 2>&1 | tee $OUT/decode_host_profile.md | grep "^##" ;;
    colsum)
      python3 benchmarks/colsum_ab.py 2>&1 | grep -v "Warn\|exe_args" | tee $OUT/colsum_ab.md | tail -12 ;;
    colsumbest)
      best=$(grep "^BEST" $OUT/colsum_ab.md | cut -d" " -f2-)
      echo "variant: $best" | tee $OUT/colsum_best.txt
      copy_tree
      (cd /tmp/hs/headscope && env $best PYTHONPATH=/tmp/hs:$PYTHONPATH python3 -m pytest -q \
         -p no:cacheprovider tests/test_kernels_fa4.py 2>&1 | tee $OUT/fa4check_best.log | tail -3)
      env $best python3 benchmarks/fa4_stats_gpu.py --check-only 2>&1 | grep "^worst" | tee $OUT/fa4_stats_best_check.md ;;
    abtest)
      copy_tree
      for setting in ${AB:-$AB_DEFAULT}; do
        [ "$setting" = "-" ] && continue
        echo "== $setting" | tee -a $OUT/abtest.log
        (cd /tmp/hs/headscope && env ${setting//+/ } PYTHONPATH=/tmp/hs:$PYTHONPATH python3 -m pytest -q -p no:cacheprovider \
           tests/test_kernels_fa4.py -k "in_kernel or ties or received" 2>&1 | tee -a $OUT/abtest.log | tail -1)
        env ${setting//+/ } python3 benchmarks/fa4_stats_gpu.py --check-only 2>&1 | grep "^worst" | tee -a $OUT/abtest.log
      done ;;
    abtime)
      for round in $(seq ${AB_ROUNDS:-2}); do
        for setting in ${AB:-$AB_DEFAULT}; do
          echo "== $setting" | tee -a $OUT/abtime.md
          vars=${setting//+/ }; [ "$setting" = "-" ] && vars=      # "-": the defaults ("env -" would empty the env)
          env $vars python3 benchmarks/fa4_stats_gpu.py --shapes ${SHAPES:-Llama-3-8B,Qwen2.5-7B} \
            --sizes ${SIZES:-16384,32768} --no-check --only "${AB_ONLY:-ours: all rows,transposed pass alone}" \
            --rep ${AB_REP:-100} 2>&1 \
            | grep -v "Warn\|exe_args" | tee -a $OUT/abtime.md | grep "^| [LQG]"
        done
      done ;;
    ncu)
      NCU=${NCU:-/usr/local/cuda/bin/ncu}
      SECT="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis"
      METR="--metrics regex:sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_(xu|fma|alu).avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
      for s in ${NCU_SETS:-split cols}; do
        case $s in rows|split) skip=5; n=5 ;; cols) skip=4; n=3 ;; esac
        $NCU --kernel-name regex:Sm90 --launch-skip $skip --launch-count $n $SECT $METR --csv --page details \
          python3 benchmarks/ncu_rows.py --set $s > $OUT/ncu_$s.csv 2> $OUT/ncu_$s.err
        grep "^ncu:" $OUT/ncu_$s.csv
        python3 benchmarks/ncu_summary.py $OUT/ncu_$s.csv | tee $OUT/ncu_$s.md
      done
      if [ "${NCU_SASS:-0}" = 1 ]; then       # rows set: launch 5 is FA4's profiled one, 9 the all-rows kernel
        for sk in 5 9; do
          $NCU --kernel-name regex:Sm90 --launch-skip $sk --launch-count 1 --section SourceCounters --csv --page source \
            --print-source sass python3 benchmarks/ncu_rows.py --set rows 2> $OUT/ncu_sass_$sk.err | gzip > $OUT/ncu_sass_$sk.csv.gz
          ls -la $OUT/ncu_sass_$sk.csv.gz
        done
      fi ;;
    compare)
      python3 benchmarks/attention_bench.py --compare 2>&1 | tee $OUT/compare.log | tail -30 ;;
  esac
done
