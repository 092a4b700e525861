#!/usr/bin/env bash
# Session 21, call 2: on call 1's machine, with its three profiles of this build: GQA
# (Llama-3-8B, S2 n=100), S4 (Llama-13B, n=100), S2 and S1 with 100 adapters, each at 85% of
# the capacity those profiles give, live beside its simulation.
set -u
OUT=$1
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
key=h100-sxm; echo "$name" | grep -q H200 && key=h200
mkdir -p /tmp/gpu-session
if compgen -G "/tmp/profiles/$key-llama-7b.json" > /dev/null; then
    mkdir -p /tmp/gpu-session/profiles && cp /tmp/profiles/$key-*.json /tmp/gpu-session/profiles/
    echo "using call 1's $key profiles (same machine): $(ls /tmp/gpu-session/profiles | tr '\n' ' ')"
fi
RUNS=gqa-llama3-8b-s2-n100:0.85,s4-llama13b-n100:0.85,s2-n100:0.85,s1-n100:0.85
H100_MODELS="llama-7b llama-3-8b llama-13b" H100_RUNS=$RUNS \
H200_MODELS="llama-7b llama-3-8b llama-13b" H200_RUNS=$RUNS H200_OWN=1 BUDGET=${BUDGET:-540} \
    bash scripts/gpu_session_any.sh .dev/slora-plan .dev $OUT
