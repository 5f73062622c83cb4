#!/usr/bin/env bash
# Kernel durations under Nsight Compute (see kernel_times.py). GPU machine, repo root, wheels
# installed (PYTHONPATH=/tmp/site:$PWD as in scripts/gpu_check.sh).
#   bash benchmarks/kernel_times.sh CASES [IMPLS] [CONFIGS_JSON] [REPS]
# IMPLS: ours, flaggems, ours-strided (our kernel on a strided cache), ours-cont2x (that strided
# storage read as a contiguous cache: same addresses, contiguous addressing).
# Clocks are left as the GPU runs them (--clock-control none); caches are flushed between kernels
# (ncu's default), so every figure reads its inputs from HBM. Prints one KERNEL_US line per block.
cases=${1:-seed1_prefill512,seed2_small_mixed,seed3_mixed55}
impls=${2:-ours,flaggems}
configs=${3:-"[{}]"}
reps=${4:-5}
out=${OUT:-/tmp}
for case in ${cases//,/ }; do
  for impl in ${impls//,/ }; do
    tag=${case}_${impl}
    extra=""
    if [ "$impl" = ours-strided ]; then impl=ours; extra=--strided; fi
    if [ "$impl" = ours-cont2x ]; then impl=ours; extra=--contiguous-2x; fi
    ncu --profile-from-start off --clock-control none --print-units base --csv \
      --metrics gpu__time_duration.sum --log-file "$out/ncu_$tag.csv" \
      python3 benchmarks/kernel_times.py --case "$case" --impl "$impl" --configs "$configs" \
      --reps "$reps" $extra > "$out/kt_$tag.log" 2>&1 || { echo "$tag failed:"; tail -5 "$out/kt_$tag.log"; continue; }
    grep "^SKIP" "$out/kt_$tag.log"
    python3 benchmarks/kernel_times.py --summarize "$out/ncu_$tag.csv" "$out/kt_$tag.log" --reps "$reps" \
      | tee -a "$out/kernel_us.txt"
  done
done
