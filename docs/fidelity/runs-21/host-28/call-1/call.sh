#!/usr/bin/env bash
# Session 21, call 1: the LoRA stream's f32 deltas written whole by the expand (no memset
# nodes): doctor, the reference check, bench-gpu, then the three models calibrated with this
# build into /tmp/profiles, then bench-gpu again with what time is left (median of runs).
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-575}
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
B=.dev/slora-plan
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.csv
cat $OUT/gpu.csv
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv -l 5 >> $OUT/clocks.csv 2>&1 &
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
finish() {
  stage end
  kill %1 2>/dev/null
  [ -d /tmp/profiles ] && tar czf $OUT/profiles.tgz -C /tmp profiles
  (cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$'))
  echo "call done in $(($(date +%s) - start)) s"
}
stage doctor
timeout 90 $B doctor > $OUT/doctor.log 2>&1; rc=$?
echo "doctor rc $rc: $(grep -cE ' pass$' $OUT/doctor.log) pass, $(grep -cE ' FAIL$' $OUT/doctor.log) fail"
grep -E "_f32|FAIL" $OUT/doctor.log | head -20
[ $rc = 0 ] || { tail -n 30 $OUT/doctor.log; finish; exit 1; }
stage reference
timeout 200 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 120 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; rc=$?; echo "doctor --reference rc $rc"
grep -E "FAIL|greedy|identical|differ" $OUT/reference.log | tail -n 12
[ $rc = 0 ] || { finish; exit 1; }
stage bench-gpu-1
timeout 150 $B bench-gpu > $OUT/bench-gpu-1.log 2>&1; echo "bench-gpu rc $?"
grep -E "^\| (1|8|32|64|128|256) \|" $OUT/bench-gpu-1.log | head -n 12
for m in llama-7b llama-3-8b llama-13b; do
  [ "$(left)" -gt 150 ] || { echo "no time to calibrate $m"; break; }
  stage calibrate $m
  timeout $(($(left) - 15)) $B calibrate --model $m --reps 4 --out /tmp/profiles > $OUT/calibrate-$m.log 2>&1; echo "calibrate $m rc $?"
  grep -E "^Measured in" $OUT/calibrate-$m.log | head -3
done
for k in 2 3; do
  [ "$(left)" -gt 75 ] || break
  stage bench-gpu-$k
  timeout $(($(left) - 10)) $B bench-gpu > $OUT/bench-gpu-$k.log 2>&1; echo "bench-gpu $k rc $?"
done
grep -h "overhead" $OUT/bench-gpu-*.log | head -n 6
finish
