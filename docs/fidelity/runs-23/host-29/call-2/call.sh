#!/usr/bin/env bash
# Session 23, call 2 (asked for an H200; the H100 of call 1 was still held, so it ran there): doctor (health and
# correctness on this GPU), the three models calibrated with this build into /tmp/profiles,
# bench-gpu (the adapter overhead on an H200), then transformers + peft at batch 32 with the
# time that is left (never measured on an H200).
#   BUDGET=570 bash docs/fidelity/runs-23/h200-call-1/call.sh $OUT   (.devx as in runs-21's calls)
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-570}
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev
B=.dev/slora-plan
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.csv
cat $OUT/gpu.csv
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv -l 5 >> $OUT/clocks.csv 2>&1 &
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
finish() {
  stage end
  kill %1 2>/dev/null
  [ -d /tmp/profiles ] && tar czf $OUT/profiles.tgz -C /tmp profiles
  [ -d /tmp/peft32 ] && tar czf $OUT/peft32.tgz -C /tmp peft32
  (cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$'))
  echo "call done in $(($(date +%s) - start)) s"
}
stage doctor
timeout 90 $B doctor > $OUT/doctor.log 2>&1; rc=$?
echo "doctor rc $rc: $(grep -cE ' pass$' $OUT/doctor.log) pass, $(grep -cE ' FAIL$' $OUT/doctor.log) fail"
[ $rc = 0 ] || { tail -n 30 $OUT/doctor.log; finish; exit 1; }
for m in llama-7b llama-3-8b llama-13b; do
  [ "$(left)" -gt 150 ] || { echo "no time to calibrate $m"; break; }
  stage calibrate $m
  timeout $(($(left) - 15)) $B calibrate --model $m --reps 4 --out /tmp/profiles > $OUT/calibrate-$m.log 2>&1; echo "calibrate $m rc $?"
  grep -E "^Measured in" $OUT/calibrate-$m.log | head -3
done
if [ "$(left)" -gt 70 ]; then
  stage bench-gpu
  timeout $(($(left) - 10)) $B bench-gpu > $OUT/bench-gpu.log 2>&1; echo "bench-gpu rc $?"
  grep -E "^\| (1|32|64|128) \| [0-9.]+ \| [0-9.]+ \| [+-]" $OUT/bench-gpu.log | awk -F'|' '{print "step",$2,"with",$3,"without",$4,$5}'
fi
if [ "$(left)" -gt 100 ]; then
  stage peft32
  d=$(($(left) - 20))
  timeout $(($d + 10)) python3 scripts/peft_baseline.py --batch-sizes 32 --per-batch-size-s $d \
      --deadline-s $d --hard-deadline-s $(($d + 5)) --out /tmp/peft32 > $OUT/peft32.log 2>&1; echo "peft32 rc $?"
  tail -n 5 $OUT/peft32.log
fi
finish
