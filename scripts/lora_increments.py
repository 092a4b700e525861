#!/usr/bin/env python3
"""What the adapters add to live decode steps, against what cost models price, without a GPU.

    cargo build --release
    python3 scripts/lora_increments.py RUN --live REPLAY.csv[.gz] [--profiles DIR ...]

RUN: a fidelity run, `<scenario>/loadNN` (its `loadNN.yaml` beside the folder, its
`loadNN/executed/steps.csv[.gz]` inside). REPLAY: the table `slora-plan replay RUN.yaml --steps
RUN/executed --execute --passes recorded,no-lora --out REPLAY.csv` wrote on a GPU (with
`scripts/gpu_session.sh`'s J_REPLAYS): each step's time as recorded and without adapters,
measured back to back on that machine.

Each `--profiles DIR` (default: the binary's embedded profiles) prices the same steps
(`slora-plan replay`, no GPU). For decode-only steps by decode rows, medians of: the step
without adapters (live) against the priced step less its LoRA; what the adapters add (live:
recorded − without) against the priced LoRA (shrink + expand); the recorded step against the
priced step. Then, over all steps and over decode-only steps, the time-weighted error of the
priced step (summed priced over summed recorded, − 1).

A model whose base prices match the pass without adapters but whose LoRA does not has its
error in the LoRA grid (docs/FIDELITY.md, sessions 18 and 19).
"""

import argparse
import csv
import gzip
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay_fidelity import model_parts, priced_steps  # noqa: E402

LIVE = ["executed_recorded_s", "executed_no_lora_s"]
ROWS = [(1, 16), (16, 32), (32, 64), (64, 96), (96, 128), (128, 160), (160, 200), (200, 257)]


def read_table(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"lora_increments: {path}: {e.strerror or e}")


def priced(args, profiles, work):
    """The run's steps priced by `profiles` (None: the embedded profiles), one dict a step."""
    rows = priced_steps(args.bin, args.run + ".yaml", os.path.join(args.run, "executed"), args.traces, profiles, work)
    if isinstance(rows, str):
        sys.exit(f"lora_increments: pricing {args.run} with {profiles or 'the embedded profiles'}: {rows}")
    return rows


def total(step):
    return sum(float(step[k]) for k in model_parts(step))


def lora(step):
    return float(step["lora_shrink_s"]) + float(step["lora_expand_s"])


def signed(x, ref):
    return f"{x * 1e3:.3f} ({x / ref - 1:+.1%})" if ref > 0 else f"{x * 1e3:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the run folder, e.g. docs/fidelity/runs-19/host-25/call-1/fid-j/s1-n5/load85")
    ap.add_argument("--live", required=True, help="the replay table with the recorded and no-lora passes")
    ap.add_argument("--profiles", action="append", default=[], help="a folder of <gpu>-<model>.json profiles (repeat to compare)")
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "slora-plan"))
    ap.add_argument("--traces", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces"))
    args = ap.parse_args()
    if not os.path.isfile(args.run + ".yaml"):
        sys.exit(f"lora_increments: {args.run}.yaml: no such scenario file (RUN is the run folder, without .yaml)")
    live = read_table(args.live)
    missing = [c for c in LIVE if live and c not in live[0]]
    if not live or missing:
        sys.exit(f"lora_increments: {args.live}: no column {', '.join(missing) or 'rows'} (replay it with --passes recorded,no-lora)")
    models = []
    with tempfile.TemporaryDirectory() as work:
        for profiles in args.profiles or [None]:
            steps = priced(args, profiles, work)
            if len(steps) != len(live):
                sys.exit(f"lora_increments: {args.live} has {len(live)} steps, {args.run} replays {len(steps)}: not the same run")
            models.append((profiles or "embedded", steps))
    names = [f"({i + 1})" for i in range(len(models))]
    for i, (name, _) in enumerate(models):
        print(f"{names[i]} {name}")
    print()
    header = ["decode rows", "steps", "without adapters, live (ms)"]
    header += [f"priced base {n}" for n in names]
    header.append("adapters add, live (ms)")
    header += [f"priced LoRA {n}" for n in names]
    header.append("step, live (ms)")
    header += [f"priced step {n}" for n in names]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|" + "---|" * len(models) + "---|" + "---|" * len(models) + "---|" + "---|" * len(models))
    first = models[0][1]
    for lo, hi in ROWS:
        idx = [i for i, s in enumerate(first) if int(s["prefill_tokens"]) == 0 and lo <= int(s["decode_requests"]) < hi]
        if not idx:
            continue
        med = statistics.median
        recorded = med(float(live[i]["executed_recorded_s"]) for i in idx)
        without = med(float(live[i]["executed_no_lora_s"]) for i in idx)
        added = med(float(live[i]["executed_recorded_s"]) - float(live[i]["executed_no_lora_s"]) for i in idx)
        cells = [f"{lo}-{hi - 1}", str(len(idx)), f"{without * 1e3:.3f}"]
        cells += [signed(med(total(s[i]) - lora(s[i]) for i in idx), without) for _, s in models]
        cells.append(f"{added * 1e3:.3f}")
        cells += [signed(med(lora(s[i]) for i in idx), added) for _, s in models]
        cells.append(f"{recorded * 1e3:.3f}")
        cells += [signed(med(total(s[i]) for i in idx), recorded) for _, s in models]
        print("| " + " | ".join(cells) + " |")
    print()
    for (name, steps), label in zip(models, names):
        for kind, keep in [("all steps", lambda s: True), ("decode-only steps", lambda s: int(s["prefill_tokens"]) == 0)]:
            idx = [i for i, s in enumerate(steps) if keep(s)]
            measured = sum(float(live[i]["executed_recorded_s"]) for i in idx)
            model = sum(total(steps[i]) for i in idx)
            print(f"{label} {kind}: time-weighted error {model / measured - 1:+.2%} over {len(idx)} steps")


if __name__ == "__main__":
    main()
