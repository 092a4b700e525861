#!/usr/bin/env bash
# `gpu_session.sh j` on whichever GPU the device tool lent: a call for an H200 may land on an
# H100, and the two want different work (an H200 calibrates the embedded profiles and serves
# the runs-3/host-2 cells again; an H100 serves new cells at fractions of its own capacity).
#
#   H200_MODELS=... H200_RUNS=... H200_CHECKS=0|1 H200_RECALIBRATE=... H200_OWN=0|1 \
#   H100_MODELS=... H100_RUNS=... H100_CHECKS=0|1 BUDGET=565 \
#       scripts/gpu_session_any.sh BIN TRACES OUT
#
# Each *_MODELS, *_RUNS and *_CHECKS is gpu_session.sh's J_MODELS, J_RUNS and J_CHECKS for that
# GPU; an H100 also gets J_GPU=h100-sxm. Give " " for an empty model list (nothing to calibrate).
set -u
bin=$1 traces=$2 out=$3
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "GPU: $name"
export BUDGET_S=${BUDGET:-560}
if echo "$name" | grep -q H200; then
    export J_MODELS="${H200_MODELS:-}" J_RUNS="${H200_RUNS:-}" J_CHECKS="${H200_CHECKS:-0}" J_RECALIBRATE="${H200_RECALIBRATE:-}"
    # H200_OWN=1: the runs are new cells at fractions of the capacity this machine's own
    # profiles give (as on an H100), priced by those profiles, instead of session 3's cells
    # again with the embedded ones.
    [ "${H200_OWN:-0}" = 1 ] && export J_GPU=h200
else
    export J_MODELS="${H100_MODELS:-}" J_RUNS="${H100_RUNS:-}" J_CHECKS="${H100_CHECKS:-0}" J_RECALIBRATE="${H100_RECALIBRATE:-}" J_GPU=h100-sxm
fi
echo "models: $J_MODELS | runs: $J_RUNS | checks: $J_CHECKS | again: $J_RECALIBRATE"
exec bash "$(dirname "$0")/gpu_session.sh" j "$bin" "$traces" "$out"
