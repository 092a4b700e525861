#!/usr/bin/env bash
# Session 19: the H100 cells of sessions 17-19 simulated again with every step time x 0.98..1.02
# (simulate --step-time-scale), each with its own host's profile. Prints fidelity.py summary rows
# prefixed with the host/call and the factor. Needs `cargo build --release` first.
set -e
cd "$(dirname "$0")/../../.."
mkdir -p ${OUT:-/tmp/sens}
run() { # name runsdir profiles
  for f in 0.98 0.99 1.0 1.01 1.02; do
    o=${OUT:-/tmp/sens}/$1/$f
    python3 scripts/fidelity.py --bin target/release/slora-plan --out $o --resimulate $2 --profiles $3 --step-time-scale $f >/dev/null 2>&1
    grep "^| s" $o/summary.md | grep -v scenario | sed "s/^/$1 $f /"
  done
}
run h25 docs/fidelity/runs-19/host-25/call-1/fid-j docs/fidelity/runs-19/host-25/call-1/profiles &
run h23c2 docs/fidelity/runs-18/host-23/call-2/fid-j docs/fidelity/runs-18/host-23/call-2/profiles > ${OUT:-/tmp/sens}/h23c2.txt &
run h23c3 docs/fidelity/runs-18/host-23/call-3/fid-j docs/fidelity/runs-18/host-23/call-2/profiles > ${OUT:-/tmp/sens}/h23c3.txt &
run h22 docs/fidelity/runs-17/host-22/fid-j docs/fidelity/runs-17/host-22/profiles > ${OUT:-/tmp/sens}/h22.txt &
wait
cat ${OUT:-/tmp/sens}/h23c2.txt ${OUT:-/tmp/sens}/h23c3.txt ${OUT:-/tmp/sens}/h22.txt
