#!/usr/bin/env bash
# Session 23, call 3 (not run: no machine could be started): calibrate's new check, decode LoRA
# at spread contexts (`lora_spread_steps`: ranks 8-64 mixed, 8 alone, 64 alone), on Llama-7B and
# Llama-3-8B: does the grid's context (16) price the LoRA of live-like batches, which host 29's
# replays found adding 10-34% less from 96 rows and up to 12% more below?
# First the reference check with the new mha-qv config; then host 28's S1 n=100 85% cell
# replayed as recorded and without adapters (rank 8 only).
#   BUDGET=560 bash docs/fidelity/runs-23/call-3/call.sh $OUT   (.devx as in runs-21's calls)
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
# The reference check first: its new config mha-qv (adapters on q and v only) has not met the
# GPU executor yet.
stage reference
timeout 120 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 90 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; echo "doctor --reference rc $?"
grep -E "^(mha|gqa|mha-qv) \(run|FAIL|-> " $OUT/reference.log | cut -c1-150 | tail -n 12
for m in llama-7b llama-3-8b; do
  [ "$(left)" -gt 130 ] || { echo "no time to calibrate $m"; break; }
  stage calibrate $m
  timeout $(($(left) - 10)) $B calibrate --model $m --reps 4 --out /tmp/profiles > $OUT/calibrate-$m.log 2>&1; echo "calibrate $m rc $?"
  f=$(ls /tmp/profiles/*-$m.md 2>/dev/null | head -1)
  [ -n "$f" ] && grep -A 90 "^## Decode LoRA at spread" $f | grep -E "^- ranks"
  # Each model's profile comes back even if the call is cut short after it.
  tar czf $OUT/profiles-$m.tgz -C /tmp profiles
done
run=docs/fidelity/runs-21/host-28/call-2/fid-j/s1-n100/load85
if [ "$(left)" -gt 150 ]; then
  stage replay s1-n100
  python3 -c "import sys; sys.path.insert(0, 'scripts'); from fidelity import retarget; print(retarget('$run.yaml', '.dev'), end='')" > /tmp/s1.yaml
  timeout $(($(left) - 10)) $B replay /tmp/s1.yaml --steps $run/executed --execute --passes recorded,no-lora \
      --out $OUT/replay-s1-n100-load85.csv > $OUT/replay-s1-n100.log 2>&1; echo "replay s1-n100 rc $?"; tail -n 4 $OUT/replay-s1-n100.log
  [ -f $OUT/replay-s1-n100-load85.csv ] && gzip -f $OUT/replay-s1-n100-load85.csv
fi
finish
