#!/usr/bin/env python3
"""Whether decode attention's cost steps in waves of blocks, from a calibration, without a GPU.

    python3 scripts/attention_waves.py PROFILE.json [--raw PROFILE.raw.json] [--wave-size N]

Decode attention launches one block per (KV head, request, partition of 256 cached rows), and
a GPU runs a bounded number of blocks at once. With few KV heads (Llama-3-8B has 8) the blocks
of a step fit in one or a few such waves, and the cost jumps where their count crosses a wave
(docs/FIDELITY.md, session 23). The profile's `attention_decode` grid measures uniform contexts;
the cost model interpolates it linearly, which runs across those jumps.

This script prints:
1. the grid, with each point's work units (KV heads x requests x (context + 1) / 256);
2. the leave-one-out error of interpolating the grid in the batch direction, linearly and with
   the steps put at the wave crossings, for the wave size that fits best (or `--wave-size`);
3. with `--raw` (the calibration's measurement, which holds the spread steps: batches of mixed
   contexts with their attention timed), each spread step's attention against (a) the grid
   interpolated linearly over the requests' log2 context buckets, as the cost model does
   before its spread excess, and (b) a wave count from the whole step's work units, rounded up,
   between the grid contexts around the step's mean context.

Nothing here changes the cost model: it measures whether a wave-aware term would help.
"""

import argparse
import json
import math
import statistics
import sys

PARTITION = 256  # cached rows per decode block (kernels/src/ops/attention.rs, DECODE_PARTITION)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"attention_waves: {path}: {e}")


class Grid:
    def __init__(self, profile, path):
        try:
            points = profile["attention_decode"]
            self.t = {(p["batch"], p["context"]): p["time"]["median_s"] * 1e3 for p in points}
            self.kv = int(profile["model"]["num_kv_heads"])
            self.name = f"{profile['gpu_name']} x {profile['model']['name']}"
        except (KeyError, TypeError, ValueError) as e:
            sys.exit(f"attention_waves: {path}: not a calibrated profile ({type(e).__name__}: {e})")
        self.batches = sorted({k[0] for k in self.t})
        self.contexts = sorted({k[1] for k in self.t})
        missing = [(b, c) for b in self.batches for c in self.contexts if (b, c) not in self.t]
        if not self.t or missing or self.kv < 1:
            sys.exit(f"attention_waves: {path}: attention_decode is not a complete grid "
                     f"({len(self.t)} points, {len(missing)} missing; KV heads {self.kv})")

    def units(self, batch, context):
        return self.kv * batch * (context + 1) / PARTITION

    def along_batch(self, n, c, wave, batches):
        """The grid at context `c` (a grid context), batch `n`, from `batches` only."""
        lo = max((b for b in batches if b <= n), default=batches[0])
        hi = min((b for b in batches if b >= n), default=batches[-1])
        t_lo, t_hi = self.t[(lo, c)], self.t[(hi, c)]
        if lo == hi:
            return t_lo
        if wave:
            w_lo = math.ceil(self.units(lo, c) / wave)
            w_hi = math.ceil(self.units(hi, c) / wave)
            if w_hi > w_lo:
                w = math.ceil(self.units(n, c) / wave)
                return t_lo + (w - w_lo) * (t_hi - t_lo) / (w_hi - w_lo)
        return t_lo + (n - lo) / (hi - lo) * (t_hi - t_lo)

    def bracket(self, c):
        lo = max((x for x in self.contexts if x <= c), default=self.contexts[0])
        hi = min((x for x in self.contexts if x >= c), default=self.contexts[-1])
        return lo, hi

    def linear(self, n, c):
        lo, hi = self.bracket(c)
        a = self.along_batch(n, lo, None, self.batches)
        if lo == hi:
            return a
        b = self.along_batch(n, hi, None, self.batches)
        return a + (c - lo) / (hi - lo) * (b - a)

    def leave_one_out(self, wave):
        errors = []
        for c in self.contexts:
            for b in self.batches[1:-1]:
                rest = [x for x in self.batches if x != b]
                errors.append(abs(self.along_batch(b, c, wave, rest) / self.t[(b, c)] - 1))
        return errors


def summary(errors):
    return (f"median {100 * statistics.median(errors):.1f}%, mean {100 * statistics.fmean(errors):.1f}%, "
            f"largest {100 * max(errors):.1f}%")


def spread_prices(grid, contexts, wave):
    """(linear over log2 buckets, wave count from the step's work) for one spread step, ms."""
    n = len(contexts)
    buckets = {}
    for c in contexts:
        buckets.setdefault(int(math.log2((c + 1) | 1)), []).append(c + 1)
    linear = sum(len(v) * grid.linear(n, statistics.fmean(v)) for v in buckets.values()) / n
    longest = grid.linear(1, max(contexts) + 1)
    mean = statistics.fmean(contexts) + 1
    lo, hi = grid.bracket(mean)
    a = grid.along_batch(n, lo, None, grid.batches)
    waves = a
    if lo != hi:
        b = grid.along_batch(n, hi, None, grid.batches)
        w_lo = math.ceil(grid.units(n, lo) / wave)
        w_hi = math.ceil(grid.units(n, hi) / wave)
        if w_hi > w_lo:
            w = math.ceil(grid.kv * sum((c + 1) / PARTITION for c in contexts) / wave)
            waves = a + (min(max(w, w_lo), w_hi) - w_lo) * (b - a) / (w_hi - w_lo)
        else:
            waves = a + (mean - lo) / (hi - lo) * (b - a)
    return max(linear, longest), max(waves, longest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="a calibrated profile, <gpu>-<model>.json")
    ap.add_argument("--raw", help="its measurement, <gpu>-<model>.raw.json (for the spread steps)")
    ap.add_argument("--wave-size", type=float, help="work units a wave (default: the best leave-one-out fit)")
    args = ap.parse_args()
    if args.wave_size is not None and not args.wave_size > 0:
        sys.exit(f"attention_waves: --wave-size must be positive, got {args.wave_size:g}")
    grid = Grid(load(args.profile), args.profile)
    print(f"{grid.name}: {grid.kv} KV heads")
    print("\n| batch | " + " | ".join(f"context {c} (ms, units)" for c in grid.contexts) + " |")
    print("|---|" + "---|" * len(grid.contexts))
    for b in grid.batches:
        cells = [f"{grid.t[(b, c)]:.2f} ({grid.units(b, c):.0f})" for c in grid.contexts]
        print(f"| {b} | " + " | ".join(cells) + " |")
    wave = args.wave_size
    if wave is None:
        wave = min(range(64, 4096, 8), key=lambda s: statistics.fmean(grid.leave_one_out(s)))
    print("\nLeave-one-out over the grid, in the batch direction:")
    print(f"- linear: {summary(grid.leave_one_out(None))}")
    print(f"- steps at wave crossings, {wave:g} units a wave: {summary(grid.leave_one_out(wave))}")
    if not args.raw:
        return
    raw = load(args.raw)
    steps = raw.get("spread_decode_steps") if isinstance(raw, dict) else None
    if steps is None:
        sys.exit(f"attention_waves: {args.raw}: not a calibration's measurement (no spread_decode_steps)")
    if not steps:
        print("\nThe measurement has no spread steps.")
        return
    print(f"\nSpread steps' attention against the grid ({len(steps)} steps; priced / measured - 1):")
    print("\n| pattern | batch | measured (ms) | linear | waves |")
    print("|---|---|---|---|---|")
    errors = ([], [])
    for i, s in enumerate(steps):
        try:
            measured = s["attention"]["median_s"] * 1e3
            if not s["contexts"]:
                raise ValueError("no contexts (a step decodes at least one request)")
            prices = spread_prices(grid, s["contexts"], wave)
            if not measured > 0:
                raise ValueError(f"attention {measured} ms")
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            sys.exit(f"attention_waves: {args.raw}: spread_decode_steps[{i}]: {type(e).__name__}: {e}")
        e = [p / measured - 1 for p in prices]
        for k in range(2):
            errors[k].append(abs(e[k]))
        print(f"| {s['pattern']} | {len(s['contexts'])} | {measured:.3f} | {100 * e[0]:+.1f}% | {100 * e[1]:+.1f}% |")
    print(f"\nlinear: {summary(errors[0])}; waves: {summary(errors[1])}")


if __name__ == "__main__":
    main()
