#!/usr/bin/env python3
"""Saturation throughput of S-LoRA's settings and the ablations issue 5 asks about: every
configuration is offered far more traffic than it can serve (early abort on, 6 s TTFT SLO,
S-LoRA's convention) for `--seconds` of arrivals, and its completed requests per second are
its saturation throughput.

    # predictions of the calibrated simulator (no GPU):
    python3 scripts/baselines.py --bin target/release/slora-plan --out out/baselines
    # live on the GPU(s), each beside the simulation of the same arrivals:
    python3 scripts/baselines.py --bin slora-plan --out out/baselines --execute \
        --seconds 60 [--gpus 0,1,2,3] [--deadline-s 540]

With `--execute` every configuration runs `slora-plan simulate --compare` (served live with
the identical policy, and simulated on the same arrivals with the engine pool capped at what
the GPU holds); the table gives both, and the ratios the issue asks for are computed from
the live figures. Writes OUT/baselines.md and OUT/baselines.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_pool import parse_gpus, run_jobs  # noqa: E402

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
    ("S1 n=5", "llama-7b", S1, 5, 80, "unified", "false"),
    ("S2 n=2000", "llama-7b", S2, 2000, 80, "unified", "false"),
    ("S4 n=1000 (Llama-13B)", "llama-13b", S4, 1000, 50, "unified", "false"),
    ("S2 n=5", "llama-7b", S2, 5, 80, "unified", "false"),
    ("S2 n=100", "llama-7b", S2, 100, 80, "unified", "false"),
    ("S2, LoRA disabled (base model only)", "llama-7b", "[8]", 0, 80, "unified", "false"),
    ("S2 n=2000, separate adapter region (64 slots)", "llama-7b", S2, 2000, 80, "!separate { adapter_slots: 64 }", "false"),
    ("S2 n=2000, clustering on", "llama-7b", S2, 2000, 80, "unified", "true"),
]


def metrics(path):
    with open(path) as f:
        m = json.load(f)
    t = m["throughput"]
    return {
        "req_s": t["requests_per_s"],
        "output_tok_s": t["output_tokens_per_s"],
        "aborted": m["requests"]["aborted"],
        "completed": m["requests"]["completed"],
        "cost_model": m["cost_model"],
    }


RATIOS = [
    # (label, numerator, denominator)
    ("S1: n=2000 / n=5 (target >= 95%; S-LoRA 94.5%)", "S1 n=2000", "S1 n=5"),
    ("S2: n=2000 / n=5 (target >= 95%; S-LoRA 90%)", "S2 n=2000", "S2 n=5"),
    ("S2: n=2000 / LoRA disabled (target >= 90%; S-LoRA loses 4-27%)", "S2 n=2000", "S2, LoRA disabled (base model only)"),
    ("S2 n=2000: unified pool / separate adapter region", "S2 n=2000", "S2 n=2000, separate adapter region (64 slots)"),
    ("S2 n=2000: clustering on / off", "S2 n=2000, clustering on", "S2 n=2000"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--execute", action="store_true", help="serve each configuration live (and simulate the same arrivals)")
    ap.add_argument("--only", help="configuration names, separated by ';' (or ',' when no name has one), run in this order")
    ap.add_argument("--gpus", help="GPU indices to run live configurations on at once, e.g. 0,1,2,3")
    ap.add_argument("--deadline-s", type=float, help="start no live run that would end later than this")
    ap.add_argument("--busy-dir", help="while DIR/gpu<N>.busy exists, start nothing on GPU N")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # Names hold commas, so a list with ';' is split on ';' (in the order given).
    only = args.only.split(";" if ";" in (args.only or "") else ",") if args.only else None
    chosen = [(i, c) for i, c in enumerate(CONFIGS) if not only or c[0] in only]
    if only:
        chosen.sort(key=lambda job: only.index(job[1][0]))
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None

    def one(job, env):
        i, (name, model, ranks, count, rate, layout, clustering) = job
        text = BASE.format(name=f"baseline-{i}", model=model, ranks=ranks if count else "[8]",
                           count=count, rate=rate, seconds=args.seconds, layout=layout,
                           clustering=clustering)
        path = os.path.join(args.out, f"baseline-{i}.yaml")
        with open(path, "w") as f:
            f.write(text)
        out = os.path.join(args.out, f"baseline-{i}")
        started = time.monotonic()
        cmd = [args.bin, "simulate", path, "--quiet", "--out", out]
        if args.execute:
            cmd.insert(3, "--compare")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.stderr.write(f"{name}: failed ({r.returncode}): {r.stderr}\n")
            return {"name": name, "ok": False}
        row = {"name": name, "ok": True, "gpu": env.get("CUDA_VISIBLE_DEVICES"),
               "wall_s": round(time.monotonic() - started, 1)}
        if args.execute:
            row["executed"] = metrics(os.path.join(out, "executed", "metrics.json"))
            row["simulated"] = metrics(os.path.join(out, "simulated", "metrics.json"))
            for sub in ("executed", "simulated"):
                d = os.path.join(out, sub)
                for fname in os.listdir(d):
                    if fname not in ("metrics.json", "steps.csv", "requests.csv") and os.path.isfile(os.path.join(d, fname)):
                        os.remove(os.path.join(d, fname))
        else:
            row["simulated"] = metrics(os.path.join(out, "metrics.json"))
        print(json.dumps(row), flush=True)
        return row

    def estimate(job):
        return args.seconds * 1.2 + (30 if job[1][1] == "llama-13b" else 20)

    gpus = parse_gpus(args.gpus) if args.execute else [None] * (os.cpu_count() or 1)
    rows, skipped = run_jobs(chosen, gpus, one, deadline, estimate, args.busy_dir)
    rows = [r for r in rows if r is not None]
    for _, c in skipped:
        print(f"not run (deadline): {c[0]}", flush=True)
    ok = {r["name"]: r for r in rows if r["ok"]}
    if args.execute:
        lines = ["| configuration | executed req/s | executed output tokens/s | aborted (executed) | simulated req/s | error of the simulation |",
                 "|---|---|---|---|---|---|"]
    else:
        lines = ["| configuration | req/s | output tokens/s | aborted |", "|---|---|---|---|"]
    for name, *_ in CONFIGS:
        r = ok.get(name)
        if r is None:
            continue
        sim = r["simulated"]
        if args.execute:
            ex = r["executed"]
            err = sim["req_s"] / ex["req_s"] - 1 if ex["req_s"] else float("nan")
            lines.append(f"| {name} | {ex['req_s']:.2f} | {ex['output_tok_s']:.0f} | {ex['aborted']} | {sim['req_s']:.2f} | {100 * err:+.1f}% |")
        else:
            lines.append(f"| {name} | {sim['req_s']:.2f} | {sim['output_tok_s']:.0f} | {sim['aborted']} |")
    lines += ["", "| ratio | " + ("executed | simulated |" if args.execute else "simulated |"), "|---|---|" + ("---|" if args.execute else "")]
    ratios = {}
    for label, a, b in RATIOS:
        if a in ok and b in ok:
            cells = []
            for side in (["executed", "simulated"] if args.execute else ["simulated"]):
                x = ok[a][side]["req_s"] / ok[b][side]["req_s"]
                ratios.setdefault(label, {})[side] = x
                cells.append(f"{100 * x:.1f}%")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "baselines.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "baselines.json"), "w") as f:
        json.dump({"seconds": args.seconds, "executed": args.execute, "rows": rows, "ratios": ratios,
                   "not_run": [c[0] for _, c in skipped]}, f, indent=1)
    print(table)
    print("cost models:", sorted({r["simulated"]["cost_model"] for r in ok.values()}))


if __name__ == "__main__":
    main()
