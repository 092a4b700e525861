#!/usr/bin/env python3
"""How far two live runs of the same arrivals differ: the floor under the simulator's errors.

    cargo build --release
    python3 scripts/live_vs_live.py RUNS_A RUNS_B [RUNS_C ...] --out OUT

Each RUNS is fidelity.py's OUT of an earlier session (`<scenario>/loadNN.yaml` beside
`loadNN/executed/`). For every cell that two of them served from the same scenario file
(compared without comments and the trace's path, which differ between machines), `slora-plan
compare` sets the first folder's run as the reference and the other as the prediction, and the
same table and target counts as fidelity.py's summary are written to OUT/summary.md: what
issue 5's targets would say of a second live run used as the prediction.
"""

import argparse
import glob
import itertools
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import read_compare, write_summary  # noqa: E402


def scenario_text(path):
    # Comments and the trace's location are the machine's, not the scenario's.
    with open(path) as f:
        return "".join(line for line in f if not line.lstrip().startswith(("#", "path:")))


def cells(runs):
    found = {}
    for yaml_path in glob.glob(os.path.join(runs, "*", "load*.yaml")):
        label = os.path.basename(yaml_path)[:-5]
        executed = os.path.join(os.path.dirname(yaml_path), label, "executed")
        if os.path.isdir(executed):
            scenario = os.path.basename(os.path.dirname(yaml_path))
            found[(scenario, label)] = (yaml_path, executed)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="two or more fidelity.py OUT folders")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bin", default="target/release/slora-plan")
    args = ap.parse_args()
    if len(args.runs) < 2:
        sys.exit("live_vs_live.py: give at least two run folders")
    by_folder = {runs: cells(runs) for runs in args.runs}
    results = []
    for a, b in itertools.combinations(args.runs, 2):
        for key in sorted(set(by_folder[a]) & set(by_folder[b])):
            (yaml_a, exec_a), (yaml_b, exec_b) = by_folder[a][key], by_folder[b][key]
            if scenario_text(yaml_a) != scenario_text(yaml_b):
                print(f"skipped {key[0]}/{key[1]}: the scenario files differ", file=sys.stderr)
                continue
            scenario, label = key
            pair = f"{os.path.basename(a.rstrip('/'))}-vs-{os.path.basename(b.rstrip('/'))}"
            cmp_out = os.path.join(args.out, pair, scenario, label)
            code = subprocess.call([args.bin, "compare", exec_a, exec_b, "--quiet", "--out", cmp_out])
            load = int(label[4:].split("-")[0]) / 100
            capacity = float("nan")
            saved = os.path.join(a, scenario, "capacity.json")
            if os.path.exists(saved):
                with open(saved) as f:
                    capacity = json.load(f)["capacity_req_s"]
            row = {"scenario": f"{scenario} ({pair})", "load": load, "capacity": capacity,
                   "rate": load * capacity, "ok": code == 0}
            if code == 0:
                row.update(read_compare(os.path.join(cmp_out, "compare.json")))
            results.append(row)
    os.makedirs(args.out, exist_ok=True)
    write_summary(args.out, results)


if __name__ == "__main__":
    main()
