#!/usr/bin/env python3
"""Saturation throughput of S-LoRA's settings and the ablations issue 5 asks about, predicted
by the calibrated simulator (no GPU): every configuration is offered far more traffic than it
can serve (early abort on, 6 s TTFT SLO, S-LoRA's convention) for `--seconds` of arrivals,
and its completed requests per second are its saturation throughput.

    python3 scripts/baselines.py --bin target/release/slora-plan --out out/baselines

These are predictions of the calibrated model, not live measurements.
"""

import argparse
import json
import os
import subprocess

BASE = """name: {name}
seed: 7
model: {model}
gpu: h200
memory:
  pool_layout: {layout}
adapters:
  count: {count}
  ranks: {ranks}
  popularity: {{ law: power, alpha: 1.0 }}
workload:
  arrivals: {{ process: gamma, rate: {rate}, cv: 1 }}
  duration_s: {seconds}
  input: {{ dist: uniform, min: 8, max: 512 }}
  output: {{ dist: uniform, min: 8, max: 512 }}
policy:
  early_abort: true
  min_time_to_first_token_s: 0.5
  clustering: {clustering}
slo:
  ttft_s: 6.0
  attainment_target: 0.9
"""

S1, S2, S4 = "[8]", "[64, 32, 16, 8]", "[64, 32, 16]"
CONFIGS = [
    # (name, model, ranks, adapters, offered rate, layout, clustering)
    ("S1 n=2000", "llama-7b", S1, 2000, 80, "unified", "false"),
    ("S2 n=2000", "llama-7b", S2, 2000, 80, "unified", "false"),
    ("S4 n=1000 (Llama-13B)", "llama-13b", S4, 1000, 50, "unified", "false"),
    ("S2 n=5", "llama-7b", S2, 5, 80, "unified", "false"),
    ("S2 n=100", "llama-7b", S2, 100, 80, "unified", "false"),
    ("S2, LoRA disabled (base model only)", "llama-7b", "[8]", 0, 80, "unified", "false"),
    ("S2 n=2000, separate adapter region (64 slots)", "llama-7b", S2, 2000, 80, "!separate { adapter_slots: 64 }", "false"),
    ("S2 n=2000, clustering on", "llama-7b", S2, 2000, 80, "unified", "true"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for i, (name, model, ranks, count, rate, layout, clustering) in enumerate(CONFIGS):
        text = BASE.format(name=f"baseline-{i}", model=model, ranks=ranks if count else "[8]",
                           count=count, rate=rate, seconds=args.seconds, layout=layout,
                           clustering=clustering)
        path = os.path.join(args.out, f"baseline-{i}.yaml")
        with open(path, "w") as f:
            f.write(text)
        out = os.path.join(args.out, f"baseline-{i}")
        subprocess.run([args.bin, "simulate", path, "--quiet", "--out", out], check=True)
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        t = m["throughput"]
        rows.append((name, t["requests_per_s"], t["output_tokens_per_s"], m["requests"]["aborted"], m["cost_model"]))
    lines = ["| configuration | req/s | output tokens/s | aborted |", "|---|---|---|---|"]
    for name, rps, tps, ab, _ in rows:
        lines.append(f"| {name} | {rps:.2f} | {tps:.0f} | {ab} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "baselines.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print("cost models:", sorted({r[4] for r in rows}))


if __name__ == "__main__":
    main()
