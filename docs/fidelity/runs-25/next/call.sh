#!/usr/bin/env bash
# Session 25's call, for the next GPU (none could be started in session 25; any sm_90 GPU).
# It measures the change of session 25, decode rows grouped by adapter
# (`GpuExecutor::set_decode_rows_by_adapter`, off by default), and session 24's open items:
#   1. `bench-gpu --only lora-sharing`: rows sharing an adapter round robin, adjacent, and
#      round robin with the executor grouping them; Zipf(1) adjacent, interleaved, grouped.
#   2. The reference check: run 5 is run 2 with rows grouped by adapter (held to transformers
#      + peft; its bits against run 2 are printed).
#   3. Host 28's S2 n=100 85% cell replayed as recorded and with rows grouped by adapter
#      (the live run's own steps: what grouping saves where S2's LoRA is priced high).
#   4. `bench-gpu --only lora-beside` (session 24's fixed variant table, never run).
#   5. Llama-7B calibrated (the spread check's shared-adapter steps, round robin vs
#      adjacent; and each whole decode step's host preparation beside what it costs over
#      the parts, GQA's lead), while the budget lasts.
#   BUDGET=560 bash docs/fidelity/runs-25/next/call.sh $OUT   (.devx as in runs-24's calls)
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-560}
left() { echo $((budget - ($(date +%s) - start))); }
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
B=$PWD/.dev/slora-plan
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.csv
cat $OUT/gpu.csv
stage lora-sharing
timeout 180 $B bench-gpu --only lora-sharing > $OUT/lora-sharing.log 2>&1; echo "lora-sharing rc $?"
grep -E "^\| (32|64|128|256) \|" $OUT/lora-sharing.log | cut -c1-220
stage reference
timeout 120 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 120 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; echo "doctor --reference rc $?"
grep -E "^(mha|gqa|mha-qv) \(run 5|-> FAIL|differ in some bit from the run in" $OUT/reference.log | cut -c1-160
run=docs/fidelity/runs-21/host-28/call-2/fid-j/s2-n100/load85
if [ "$(left)" -gt 200 ]; then
  stage replay s2-n100
  python3 -c "import sys; sys.path.insert(0, 'scripts'); from fidelity import retarget; print(retarget('$run.yaml', '.dev'), end='')" > /tmp/s2.yaml
  timeout 170 $B replay /tmp/s2.yaml --steps $run/executed --execute --passes recorded,by-adapter \
      --out $OUT/replay-s2-n100-load85.csv > $OUT/replay-s2-n100.log 2>&1; echo "replay s2-n100 rc $?"; tail -n 4 $OUT/replay-s2-n100.log
  [ -f $OUT/replay-s2-n100-load85.csv ] && python3 - $OUT/replay-s2-n100-load85.csv <<'PY'
import csv, sys, statistics
rows = list(csv.DictReader(open(sys.argv[1])))
for lo, hi in [(1, 64), (64, 128), (128, 192), (192, 257)]:
    r = [x for x in rows if x["prefill_tokens"] == "0" and lo <= int(x["decode_requests"]) < hi]
    if r:
        a = sum(float(x["executed_recorded_s"]) for x in r); b = sum(float(x["executed_by_adapter_s"]) for x in r)
        prep = statistics.median(float(x["executed_recorded_host_prep_s"]) for x in r)
        print(f"decode rows {lo}-{hi - 1}: {len(r)} steps, grouped/recorded - 1 = {100 * (b / a - 1):+.2f}%, host preparation {prep * 1e3:.3f} ms")
a = sum(float(x["executed_recorded_s"]) for x in rows); b = sum(float(x["executed_by_adapter_s"]) for x in rows)
print(f"all {len(rows)} steps: {100 * (b / a - 1):+.2f}%")
PY
  [ -f $OUT/replay-s2-n100-load85.csv ] && gzip -f $OUT/replay-s2-n100-load85.csv
fi
if [ "$(left)" -gt 100 ]; then
  stage lora-beside
  timeout $(($(left) - 10)) $B bench-gpu --only lora-beside > $OUT/lora-beside.log 2>&1; echo "lora-beside rc $?"
  grep -E "^\| (16|32|48) \|" $OUT/lora-beside.log | cut -d'|' -f2-9
fi
if [ "$(left)" -gt 140 ]; then
  stage calibrate llama-7b
  timeout $(($(left) - 10)) $B calibrate --model llama-7b --reps 4 --out /tmp/profiles > $OUT/calibrate-llama-7b.log 2>&1; echo "calibrate rc $?"
  f=$(ls /tmp/profiles/*-llama-7b.md 2>/dev/null | head -1)
  [ -n "$f" ] && grep -E "shared" $f | cut -d"|" -f2-11 | head -24
  [ -n "$f" ] && grep -A 80 "^## Whole decode steps: host preparation" $f | grep -E "^\| [0-9]+ \| (1024|2048) \|"
  tar czf $OUT/profiles.tgz -C /tmp profiles
fi
stage end
(cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$\|\.csv\.gz$'))
echo "call done in $(($(date +%s) - start)) s"
