#!/usr/bin/env bash
# Session 25's second call, for the segmented MBGMV kernels (each run of up to 4 decode rows
# on one adapter reads it once): the patch segmented-mbgmv.patch beside this script (session
# 25's branch `segmented-mbgmv`, one commit on main at b5c6be4; branches do not survive from
# one session to the next, so it is kept as a patch). Run it on the machine of call.sh (main's
# binary), with the patched binary in .devx/bins-seg.tar.xz:
#   git switch -c segmented-mbgmv && git am docs/fidelity/runs-25/next/segmented-mbgmv.patch && \
#     cargo build --release --features cuda && strip -o .dev/slora-plan target/release/slora-plan && \
#     tar cJf .devx/bins-seg.tar.xz -C .dev slora-plan
#   (then main's binary into .devx/bins.tar.xz, as for call.sh)
#   BUDGET=560 bash docs/fidelity/runs-25/next/call-seg.sh $OUT
# 1. doctor: every kernel check, the segmented kernels on grouped rows among them (stop if any
#    fails); 2. the reference check with runs 5 (grouped) and 6 (grouped, segmented);
# 3. bench-gpu --only lora-sharing (its "grouped, segmented" columns; the other columns run
#    the branch's templated split kernels, to set beside call.sh's run of main's);
# 4. host 28's S2 n=100 85% cell replayed as recorded, grouped, and grouped + segmented.
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-560}
left() { echo $((budget - ($(date +%s) - start))); }
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
mkdir -p .dev/seg && tar xJf .devx/bins-seg.tar.xz -C .dev/seg && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
B=$PWD/.dev/seg/slora-plan
nvidia-smi --query-gpu=name,uuid --format=csv,noheader | tee $OUT/gpu.csv
stage doctor
timeout 120 $B doctor > $OUT/doctor.log 2>&1 || { grep -E "FAIL|seg" $OUT/doctor.log | head -40; echo "kernel checks failed: stopping"; exit 1; }
echo "doctor: $(grep -cE ' pass$' $OUT/doctor.log) pass, $(grep -cE ' FAIL$' $OUT/doctor.log) fail"; grep -E "_seg" $OUT/doctor.log | head -12
stage reference
timeout 120 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 150 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; echo "doctor --reference rc $?"
grep -E "^(mha|gqa|mha-qv) \(run (5|6)|-> FAIL|differ in some bit from the run in" $OUT/reference.log | cut -c1-160
stage lora-sharing
timeout 200 $B bench-gpu --only lora-sharing > $OUT/lora-sharing-seg.log 2>&1; echo "lora-sharing rc $?"
grep -E "^\| (32|64|128|256) \|" $OUT/lora-sharing-seg.log | cut -c1-260
run=docs/fidelity/runs-21/host-28/call-2/fid-j/s2-n100/load85
if [ "$(left)" -gt 220 ]; then
  stage replay s2-n100
  python3 -c "import sys; sys.path.insert(0, 'scripts'); from fidelity import retarget; print(retarget('$run.yaml', '.dev'), end='')" > /tmp/s2.yaml
  timeout $(($(left) - 15)) $B replay /tmp/s2.yaml --steps $run/executed --execute --passes recorded,by-adapter,segmented \
      --out $OUT/replay-s2-n100-load85-seg.csv > $OUT/replay-s2-n100-seg.log 2>&1; echo "replay rc $?"; tail -n 4 $OUT/replay-s2-n100-seg.log
  [ -f $OUT/replay-s2-n100-load85-seg.csv ] && python3 - $OUT/replay-s2-n100-load85-seg.csv <<'PY'
import csv, sys
rows = [x for x in csv.DictReader(open(sys.argv[1])) if x["prefill_tokens"] == "0"]
for lo, hi in [(1, 64), (64, 128), (128, 192), (192, 257), (1, 257)]:
    r = [x for x in rows if lo <= int(x["decode_requests"]) < hi]
    if r:
        t = {p: sum(float(x[f"executed_{p}_s"]) for x in r) for p in ("recorded", "by_adapter", "segmented")}
        print(f"decode rows {lo}-{hi - 1}: {len(r)} steps; grouped {100 * (t['by_adapter'] / t['recorded'] - 1):+.2f}%, segmented {100 * (t['segmented'] / t['recorded'] - 1):+.2f}%")
PY
  [ -f $OUT/replay-s2-n100-load85-seg.csv ] && gzip -f $OUT/replay-s2-n100-load85-seg.csv
fi
stage end
(cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$\|\.csv\.gz$'))
echo "call done in $(($(date +%s) - start)) s"
