#!/usr/bin/env bash
# Session 20, call 1: the step's own highest rank in the LoRA kernels and the MBGMV shrink over
# a work list: doctor, the reference check, bench-gpu (work list vs full grid in the same run),
# then calibrate llama-7b with what time is left.
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-470}
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
B=.dev/slora-plan
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.csv
cat $OUT/gpu.csv
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv -l 5 >> $OUT/clocks.csv 2>&1 &
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
stage doctor
timeout 90 $B doctor > $OUT/doctor.log 2>&1; rc=$?
echo "doctor rc $rc: $(grep -cE ' pass$' $OUT/doctor.log) pass, $(grep -cE ' FAIL$' $OUT/doctor.log) fail"
grep -E "work list|FAIL" $OUT/doctor.log | head -20
[ $rc = 0 ] || { tail -n 30 $OUT/doctor.log; exit 1; }
stage reference
timeout 200 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 120 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; rc=$?; echo "doctor --reference rc $rc"
grep -E "FAIL|greedy|identical|differ" $OUT/reference.log | tail -n 12
[ $rc = 0 ] || exit 1
stage bench-gpu
timeout 200 $B bench-gpu > $OUT/bench-gpu.log 2>&1; echo "bench-gpu rc $?"
grep -E "^\| (1|8|32|64|128|256) \|" $OUT/bench-gpu.log | head -n 12
if [ "$(left)" -gt 200 ]; then
  stage calibrate
  timeout $(($(left) - 15)) $B calibrate --model llama-7b --reps 4 --out /tmp/profiles > $OUT/calibrate.log 2>&1; echo "calibrate rc $?"
  tar czf $OUT/profiles.tgz -C /tmp profiles
  grep -E "^Measured in|leave-one-out" $OUT/calibrate.log | head
fi
stage end
kill %1 2>/dev/null
(cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$'))
echo "call done in $(($(date +%s) - start)) s"
