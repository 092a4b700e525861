#!/usr/bin/env bash
# The call that checks branch `fused-decode-lora` on any sm_90 GPU (written in session 21; not
# run in sessions 21 or 22: no machine could be started). The decode rows' LoRA in line on the
# one-launch cluster kernel (`set_decode_lora_fused`: q/k/v in one multi-module cluster launch,
# o in one):
# - doctor (the multi-module and f32 cluster kernels against the reference);
# - the reference check (a fifth and sixth run on those kernels, in line and beside the GEMMs,
#   held to the reference);
# - bench-gpu (MBGMV on the cluster kernel, and the decode step with the LoRA on it, beside the
#   default in the same run);
# - host 28's S2 n=100 and GQA (Llama-3-8B, S2 n=100) 85% cells replayed as recorded and
#   without adapters, for scripts/lora_increments.py: whether mixed ranks' LoRA costs less than
#   its mean rank live (as the calibrations measure: FIDELITY.md session 21) in both, or in
#   S2 only, which would put GQA's error in its base model;
# - bench-gpu again if time is left.
#
#   BUDGET=560 bash docs/fidelity/runs-22/next/call.sh $OUT   (with .devx as in runs-21's calls)
set -u
OUT=$1
start=$(date +%s); budget=${BUDGET:-330}
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
B=.dev/slora-plan
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.csv
cat $OUT/gpu.csv
stage() { echo "$(date -u +%FT%T) $*" >> $OUT/timeline.log; }
finish() { stage end; (cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$\|\.csv\.gz$')); echo "call done in $(($(date +%s) - start)) s"; }
bench() {
  stage bench-gpu-$1
  timeout $(($(left) - 10)) $B bench-gpu > $OUT/bench-gpu-$1.log 2>&1; echo "bench-gpu $1 rc $?"
  grep -E "^\| (8|32|64|128|256) \| [0-9.]+ \| [0-9.]+ \| [0-9]+ \|" $OUT/bench-gpu-$1.log | awk -F'|' '{print "MBGMV",$2,"graph",$7,$9,"cluster",$14,$15}'
  grep -E "^\| (1|32|64|128) \| [0-9.]+ \| [0-9.]+ \| [+-]" $OUT/bench-gpu-$1.log | awk -F'|' '{print "step",$2,"with",$3,"without",$4,$5,"inline",$6,$7,"cluster",$16,$17}'
}
stage doctor
timeout 90 $B doctor > $OUT/doctor.log 2>&1; rc=$?
echo "doctor rc $rc: $(grep -cE ' pass$' $OUT/doctor.log) pass, $(grep -cE ' FAIL$' $OUT/doctor.log) fail"
[ $rc = 0 ] || { tail -n 30 $OUT/doctor.log; finish; exit 1; }
stage reference
timeout 200 python3 tests/gpu/reference.py --out /tmp/ref > $OUT/reference.log 2>&1; echo "reference.py rc $?"
timeout 120 $B doctor --reference /tmp/ref >> $OUT/reference.log 2>&1; rc=$?; echo "doctor --reference rc $rc"
grep -E "FAIL|cluster kernel|differ" $OUT/reference.log | tail -n 8
[ $rc = 0 ] || { finish; exit 1; }
bench 1
replay() {  # replay CELL: host 28's 85% cell, as recorded and without adapters
  local run=docs/fidelity/runs-21/host-28/call-2/fid-j/$1/load85
  [ "$(left)" -gt 150 ] || { echo "no time to replay $1"; return; }
  stage replay $1
  python3 -c "import sys; sys.path.insert(0, 'scripts'); from fidelity import retarget; print(retarget('$run.yaml', '.dev'), end='')" > /tmp/$1.yaml
  timeout $(($(left) - 10)) $B replay /tmp/$1.yaml --steps $run/executed --execute --passes recorded,no-lora \
      --out $OUT/replay-$1-load85.csv > $OUT/replay-$1.log 2>&1; echo "replay $1 rc $?"; tail -n 4 $OUT/replay-$1.log
  [ -f $OUT/replay-$1-load85.csv ] && gzip -f $OUT/replay-$1-load85.csv
}
replay s2-n100
replay gqa-llama3-8b-s2-n100
[ "$(left)" -gt 80 ] && bench 2
finish
