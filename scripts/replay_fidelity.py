#!/usr/bin/env python3
"""A cost model checked step by step on earlier live runs, without a GPU.

    cargo build --release
    python3 scripts/replay_fidelity.py RUNS_DIR [--profiles DIR] [--traces DIR]

`step_fidelity.py` reads the price each step got from the cost model of the binary that
served it. This one prices the same steps with the current build and `--profiles DIR`
(default: the embedded profiles): `slora-plan replay` replays each run's arrivals
through the simulator with every step taking the time it took live, so it makes the run's
plans again and prints each step's full shape and the model's parts. Prints, over all runs
and per run, the median of model/measured - 1 (signed and absolute) and the time-weighted
error (summed model over summed measured, - 1: what moves a simulated run's latencies; a few
long steps priced low can leave it negative under a positive median); per run, how far a
step's error persists over the next steps (autocorrelation); and by kind of step:
decode-only steps by batch size, steps with a prompt by prompt tokens and by prompts.

RUNS_DIR: fidelity.py's OUT (`<scenario>/loadNN.yaml` and `loadNN/executed/steps.csv[.gz]`).
"""

import argparse
import csv
import glob
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import retarget  # noqa: E402

BATCHES = [(1, 8), (8, 32), (32, 64), (64, 96), (96, 128), (128, 160), (160, 200), (200, 257)]
PROMPTS = [(1, 64), (64, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 1 << 20)]


def bucket_top(t):
    """The top of the executor's GEMM token bucket of `t` rows (`gemm::bucket_top`): powers of
    two up to 16, then four buckets per octave."""
    octave = 1 << (t - 1).bit_length()
    if octave <= 16:
        return octave
    step = octave // 8
    return -(-t // step) * step


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def autocorrelation(xs, lag):
    """Sample autocorrelation of `xs` at `lag` steps (nan for too short or constant series)."""
    if len(xs) <= lag + 1:
        return float("nan")
    mean = statistics.fmean(xs)
    d = [x - mean for x in xs]
    var = sum(x * x for x in d)
    return sum(d[i] * d[i + lag] for i in range(len(d) - lag)) / var if var > 0 else float("nan")


def weighted(steps):
    """Summed model time over summed measured time, - 1."""
    measured = sum(g[5] for g in steps)
    return sum(g[1] for g in steps) / measured if measured > 0 else float("nan")


def model_parts(row):
    """The cost model's part columns of a `slora-plan replay` row: every `*_s` but the
    measured time, the span and the GPU passes' `executed_*` columns."""
    return [k for k in row if k.endswith("_s") and k not in ("measured_s", "span_s") and not k.startswith("executed_")]


def priced_steps(bin_path, yaml_path, steps_path, traces, profiles, work):
    """A recorded run's steps made again by `slora-plan replay` and priced by `profiles` (None:
    the embedded profiles): one dict a step, or an error text."""
    scenario = os.path.join(work, "scenario.yaml")
    with open(scenario, "w") as f:
        f.write(retarget(yaml_path, traces, profiles))
    r = subprocess.run([bin_path, "replay", scenario, "--steps", steps_path], capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr.strip()
    return list(csv.DictReader(io.StringIO(r.stdout)))


def replay(args, yaml_path, steps_path, work):
    rows = priced_steps(args.bin, yaml_path, steps_path, args.traces, args.profiles, work)
    if isinstance(rows, str):
        sys.stderr.write(f"{yaml_path}: replay failed: {rows}\n")
        return None
    parts = model_parts(rows[0])
    out = []
    for row in rows:
        measured = float(row["measured_s"])
        if measured <= 0:
            continue
        model_s = sum(float(row[k]) for k in parts)
        chunks = len(row.get("prefill_chunks", "").split())
        out.append((model_s / measured - 1, model_s - measured, int(row["prefill_tokens"]), int(row["decode_requests"]), chunks, measured))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs")
    ap.add_argument("--profiles", help="folder of h200-<model>.json (default: the embedded profiles)")
    ap.add_argument("--traces", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces"))
    ap.add_argument("--bin", default="target/release/slora-plan")
    # A fresh folder by default: two runs at once must not overwrite each other's scenario files.
    ap.add_argument("--work", default=None, help="scratch folder (default: a fresh temporary one)")
    args = ap.parse_args()
    if args.work is None:
        args.work = tempfile.mkdtemp(prefix="replay_fidelity-")
    os.makedirs(args.work, exist_ok=True)
    everything = []
    serial = []  # (run, sd, lag-1, lag-20) of each run's log error, in step order
    print("| run | steps | median error | median abs error | decode-only | with a prompt | time-weighted: all | decode-only | with a prompt |")
    print("|---|---|---|---|---|---|---|---|---|")
    for yaml_path in sorted(glob.glob(os.path.join(args.runs, "*", "load*.yaml"))):
        label = os.path.basename(yaml_path)[:-5]
        executed = os.path.join(os.path.dirname(yaml_path), label, "executed")
        steps = [p for p in (os.path.join(executed, "steps.csv"), os.path.join(executed, "steps.csv.gz")) if os.path.exists(p)]
        if not steps:
            continue
        got = replay(args, yaml_path, steps[0], args.work)
        if not got:
            continue
        everything.extend(got)
        e = [g[0] for g in got]
        dec = [g for g in got if g[2] == 0]
        pre = [g for g in got if g[2] > 0]
        name = f"{os.path.basename(os.path.dirname(yaml_path))} {label}"
        log_error = [math.log1p(x) for x in e]
        serial.append((name, statistics.pstdev(log_error), autocorrelation(log_error, 1), autocorrelation(log_error, 20)))
        print(
            f"| {name} | {len(got)} | {100 * median(e):+.1f}% | {100 * median([abs(x) for x in e]):.1f}% "
            f"| {100 * median([g[0] for g in dec]):+.1f}% | {100 * median([g[0] for g in pre]):+.1f}% "
            f"| {100 * weighted(got):+.1f}% | {100 * weighted(dec):+.1f}% | {100 * weighted(pre):+.1f}% |"
        )
    if not everything:
        sys.exit("no replayable runs")
    e = [g[0] for g in everything]
    print(
        f"\nAll {len(e)} steps: median error {100 * median(e):+.2f}%, median absolute error "
        f"{100 * median([abs(x) for x in e]):.2f}%, time-weighted error {100 * weighted(everything):+.2f}%.\n"
    )
    # Whether a run's step errors vary from step to step or follow the steps' shapes:
    # consecutive steps share most of their shape (rows, contexts, adapters), so an error that
    # belongs to the shape persists for tens of steps (docs/FIDELITY.md, session 22). A request
    # waits through many steps, so it is the persistent part that moves its latency.
    print("| run | spread of the step error (sd of log) | autocorrelation, lag 1 | lag 20 |")
    print("|---|---|---|---|")
    for name, sd, lag1, lag20 in serial:
        print(f"| {name} | {100 * sd:.1f}% | {lag1:.2f} | {lag20:.2f} |")
    print()
    print("| steps | count | median error | median difference (ms) | time-weighted error |")
    print("|---|---|---|---|---|")
    for lo, hi in BATCHES:
        sel = [g for g in everything if g[2] == 0 and lo <= g[3] < hi]
        if sel:
            print(f"| decode only, batch {lo}-{hi - 1} | {len(sel)} | {100 * median([g[0] for g in sel]):+.1f}% | {1e3 * median([g[1] for g in sel]):+.3f} | {100 * weighted(sel):+.1f}% |")
    # By the GEMM token bucket of the rows: the executor runs one cuBLASLt algorithm per
    # bucket, and errors that change at a bucket's first row point at the base GEMMs
    # (docs/FIDELITY.md, session 16). Buckets of fewer than 30 steps are left out.
    tops = sorted({bucket_top(g[3]) for g in everything if g[2] == 0 and g[3] > 0})
    below = 0
    for top in tops:
        sel = [g for g in everything if g[2] == 0 and g[3] > 0 and bucket_top(g[3]) == top]
        if len(sel) >= 30:
            print(f"| decode only, GEMM bucket {below + 1}-{top} | {len(sel)} | {100 * median([g[0] for g in sel]):+.1f}% | {1e3 * median([g[1] for g in sel]):+.3f} | {100 * weighted(sel):+.1f}% |")
        below = top
    for lo, hi in PROMPTS:
        sel = [g for g in everything if lo <= g[2] < hi]
        if sel:
            top = f"{hi - 1}" if hi < 1 << 20 else "+"
            print(f"| prompt tokens {lo}-{top} | {len(sel)} | {100 * median([g[0] for g in sel]):+.1f}% | {1e3 * median([g[1] for g in sel]):+.3f} | {100 * weighted(sel):+.1f}% |")
    # Steps with several prompts: what each prompt after the first adds (the profile's
    # `prefill_extra_chunks`, docs/FIDELITY.md, session 15).
    for n in range(1, 6):
        sel = [g for g in everything if g[2] > 0 and (g[4] == n or (n == 5 and g[4] >= 5))]
        if sel:
            label = {1: "1 prompt", 5: "5+ prompts"}.get(n, f"{n} prompts")
            print(f"| steps with {label} | {len(sel)} | {100 * median([g[0] for g in sel]):+.1f}% | {1e3 * median([g[1] for g in sel]):+.3f} | {100 * weighted(sel):+.1f}% |")


if __name__ == "__main__":
    main()
