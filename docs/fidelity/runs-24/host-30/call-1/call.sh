#!/usr/bin/env bash
# Session 24, call 1. First bench-gpu with its new table: the decode rows' LoRA beside the
# q/k/v and o GEMMs at the greatest stream priority, and/or with those GEMMs planned for fewer
# SMs (cuBLASLt's SM-count target), against the batch-32 adapter overhead (+12.5%, issue 4).
# Then session 23's call 3: the reference check with mha-qv, calibrate with the spread LoRA
# check (7B, 3-8B; on an H200 also 13B), host 28's S1 n=100 85% cell replayed recorded and without adapters.
#   BUDGET=560 bash docs/fidelity/runs-24/host-30/call-1/call.sh $OUT   (.devx as in runs-21's calls)
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-560}
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
B=.dev/slora-plan
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.csv
cat $OUT/gpu.csv
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
finish() {
  stage end
  (cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$\|\.csv\.gz$'))
  echo "call done in $(($(date +%s) - start)) s"
}
stage bench-gpu
timeout 240 $B bench-gpu > $OUT/bench-gpu.log 2>&1; echo "bench-gpu rc $?"
grep -A 40 "^The decode rows' LoRA beside" $OUT/bench-gpu.log | grep -E "^\| (1|16|32|48) " | cut -d'|' -f2-7
grep -E "^\| 32 \|" $OUT/bench-gpu.log | head -1 | cut -c1-80
stage reference
timeout 120 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 90 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; echo "doctor --reference rc $?"
grep -E "^(mha|gqa|mha-qv) \(run|FAIL|-> " $OUT/reference.log | cut -c1-150 | tail -n 20
# An H200 calibrates the three preset models of the embedded profiles instead (the replay is
# of an H100's recorded steps, so it runs on an H100 only).
models="llama-7b llama-3-8b"; h200=0
grep -q H200 $OUT/gpu.csv && { models="llama-7b llama-3-8b llama-13b"; h200=1; }
for m in $models; do
  [ "$(left)" -gt 130 ] || { echo "no time to calibrate $m"; break; }
  stage calibrate $m
  timeout $(($(left) - 10)) $B calibrate --model $m --reps 4 --out /tmp/profiles > $OUT/calibrate-$m.log 2>&1; echo "calibrate $m rc $?"
  f=$(ls /tmp/profiles/*-$m.md 2>/dev/null | head -1)
  [ -n "$f" ] && grep -A 90 "^## Decode LoRA at spread" $f | grep -E "^- ranks"
  tar czf $OUT/profiles-$m.tgz -C /tmp profiles
  if [ $h200 = 0 ] && [ $m = llama-7b ] && [ "$(left)" -gt 150 ]; then
    run=docs/fidelity/runs-21/host-28/call-2/fid-j/s1-n100/load85
    stage replay s1-n100
    python3 -c "import sys; sys.path.insert(0, 'scripts'); from fidelity import retarget; print(retarget('$run.yaml', '.dev'), end='')" > /tmp/s1.yaml
    timeout 150 $B replay /tmp/s1.yaml --steps $run/executed --execute --passes recorded,no-lora \
        --out $OUT/replay-s1-n100-load85.csv > $OUT/replay-s1-n100.log 2>&1; echo "replay s1-n100 rc $?"; tail -n 4 $OUT/replay-s1-n100.log
    [ -f $OUT/replay-s1-n100-load85.csv ] && gzip -f $OUT/replay-s1-n100-load85.csv
  fi
done
finish
