#!/usr/bin/env python3
"""The cost model checked step by step on live runs: every executed step's measured duration
against the cost model's price of that very step (`steps.csv`: `duration_s`, `model_s`).

    python3 scripts/step_fidelity.py RUNS_DIR [RUNS_DIR ...] [--out FILE.md]

RUNS_DIR: folders holding `<scenario>/loadNN/executed/steps.csv` (fidelity.py's OUT; or
`steps.csv.gz`, as committed in docs/fidelity) or `baseline-N/executed/steps.csv`
(baselines.py's OUT). Per run and step kind (decode only,
with a prompt, with adapter loads), the median and p10/p90 of model/measured - 1 and the
share of GPU time: where a scenario's latencies miss, this says which kind of step the model
gets wrong. Runs recorded before `model_s` existed are skipped.
"""

import argparse
import csv
import glob
import gzip
import os
import statistics


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def kind(row):
    if int(row["loads"]) > 0:
        return "with loads"
    if int(row["prefill_tokens"]) > 0:
        return "with a prompt"
    return "decode only"


def runs(dirs):
    for d in dirs:
        found = glob.glob(os.path.join(d, "**", "executed", "steps.csv"), recursive=True)
        found += glob.glob(os.path.join(d, "**", "executed", "steps.csv.gz"), recursive=True)
        for path in sorted(found):
            rel = os.path.relpath(os.path.dirname(os.path.dirname(path)), d)
            yield rel, path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [
        "| run | kind | steps | share of GPU time | median model/measured - 1 | p10 | p90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, path in runs(args.dirs):
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            rows = list(csv.DictReader(f))
        if not rows or "model_s" not in rows[0]:
            continue
        rows = [r for r in rows if float(r["duration_s"]) > 0 and float(r["model_s"]) > 0]
        total = sum(float(r["duration_s"]) for r in rows) or 1.0
        groups = {}
        for r in rows:
            groups.setdefault(kind(r), []).append(r)
        groups["all"] = rows
        for k in ("decode only", "with a prompt", "with loads", "all"):
            g = groups.get(k, [])
            if not g:
                continue
            err = [float(r["model_s"]) / float(r["duration_s"]) - 1 for r in g]
            share = sum(float(r["duration_s"]) for r in g) / total
            weighted = sum(float(r["model_s"]) for r in g) / sum(float(r["duration_s"]) for r in g) - 1
            lines.append(
                f"| {name} | {k} | {len(g)} | {100 * share:.0f}% | {100 * statistics.median(err):+.1f}% "
                f"(time-weighted {100 * weighted:+.1f}%) | {100 * quantile(err, 0.1):+.1f}% | {100 * quantile(err, 0.9):+.1f}% |"
            )
    table = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
