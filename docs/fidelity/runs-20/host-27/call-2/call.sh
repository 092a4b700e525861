#!/usr/bin/env bash
# Session 20, call 2: with the executor of call 1 (own highest rank; shrink over a work list)
# and, where call 1 ran on the same kind of GPU, its llama-7b profile: host 25's S1 and S2 n5
# 85% cells replayed (recorded, no-lora), then S1 and S2 n5 at 85% live, each beside its
# simulation.
set -u
OUT=$1
mkdir -p .dev && tar xJf .devx/bins.tar.xz -C .dev && cp .devx/AzureLLMInferenceTrace_conv.csv .dev/
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
key=h100-sxm; echo "$name" | grep -q H200 && key=h200
mkdir -p /tmp/gpu-session
if compgen -G "/tmp/profiles/$key-llama-7b.json" > /dev/null; then
    mkdir -p /tmp/gpu-session/profiles && cp /tmp/profiles/$key-*.json /tmp/gpu-session/profiles/
    echo "using call 1's $key profile (same machine)"
fi
R=docs/fidelity/runs-19/host-25/call-1/fid-j
J_REPLAYS="$R/s1-n5/load85:recorded,no-lora" \
H100_MODELS=llama-7b H100_RUNS=s1-n5:0.85,s2-n5:0.85 \
H200_MODELS=llama-7b H200_RUNS=s1-n5:0.85,s2-n5:0.85 H200_OWN=1 BUDGET=${BUDGET:-350} \
    bash scripts/gpu_session_any.sh .dev/slora-plan .dev $OUT
