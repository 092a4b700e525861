#!/usr/bin/env bash
# Session 21, call 3: the same machine: bench-gpu twice more (issue 4's overhead as a median
# of call 1's runs and these), then GQA and S4 at 50% with call 1's profiles.
set -u
OUT=$1
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
for k in 3 4; do
  timeout 100 .dev/slora-plan bench-gpu > $OUT/bench-gpu-$k.log 2>&1; echo "bench-gpu $k rc $?"
  grep -E "^\| 32 \| [0-9.]+ \| [0-9.]+ \| \+" $OUT/bench-gpu-$k.log
done
(cd $OUT && tar czf bench.tgz --remove-files bench-gpu-*.log)
RUNS=gqa-llama3-8b-s2-n100:0.5,s4-llama13b-n100:0.5
H100_MODELS="llama-7b llama-3-8b llama-13b" H100_RUNS=$RUNS \
H200_MODELS="llama-7b llama-3-8b llama-13b" H200_RUNS=$RUNS H200_OWN=1 BUDGET=${BUDGET:-300} \
    bash scripts/gpu_session_any.sh .dev/slora-plan .dev $OUT
