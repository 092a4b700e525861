"""Shared pieces: a Python copy of CalibratedCost::attention_decode (sim/src/calibrated.rs),
profile / raw / replay loading, and the per-step priced parts from `slora-plan replay`."""

import bisect
import csv
import gzip
import io
import json
import math
import os
import statistics
import subprocess
import sys

MAIN = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
WORK = os.environ.get("DECODE_WAVES_WORK", "/tmp/decode-waves")
os.makedirs(WORK, exist_ok=True)
sys.path.insert(0, os.path.join(MAIN, "scripts"))
PARTITION = 256
BUCKETS = 16


def locate(axis, x):
    n = len(axis)
    if n < 2:
        return (0, 0, 0.0)
    lo = bisect.bisect_right(axis, x) - 1
    lo = max(0, min(lo, n - 2))
    hi = lo + 1
    return (lo, hi, (x - axis[lo]) / (axis[hi] - axis[lo]))


def lerp(a, b, w):
    if 0.0 <= w <= 1.0:
        v = a + w * (b - a)
    elif w > 1.0:
        v = b + (w - 1.0) * max(b - a, 0.0)
    else:
        v = a + w * max(b - a, 0.0)
    return max(v, 0.0)


class Grid1:
    def __init__(self, pts):
        pts = sorted(pts)
        self.x = [float(p[0]) for p in pts]
        self.v = [p[1] for p in pts]

    def __call__(self, x):
        lo, hi, w = locate(self.x, x)
        if len(self.x) < 2:
            return self.v[0]
        return lerp(self.v[lo], self.v[hi], w)


class Grid2:
    """batch x context grid, values in seconds (any callable table)."""

    def __init__(self, batches, contexts, table):
        self.b = [float(x) for x in batches]
        self.c = [float(x) for x in contexts]
        self.t = table  # dict (batch, context) -> value

    def at(self, sb, sc):
        (blo, bhi, bw), (clo, chi, cw) = sb, sc
        b, c, t = self.b, self.c, self.t
        lo = lerp(t[(b[blo], c[clo])], t[(b[blo], c[chi])], cw)
        hi = lerp(t[(b[bhi], c[clo])], t[(b[bhi], c[chi])], cw)
        return lerp(lo, hi, bw)

    def __call__(self, batch, context):
        return self.at(locate(self.b, batch), locate(self.c, context))


def bucket(rows):
    return min(int(rows | 1).bit_length() - 1, BUCKETS - 1)


def histogram(contexts):
    counts = [0] * BUCKETS
    rows = [0] * BUCKETS
    for c in contexts:
        k = bucket(c)
        counts[k] += 1
        rows[k] += c
    return counts, rows


class Profile:
    def __init__(self, path):
        p = json.load(open(path))
        self.path = path
        self.kv = int(p["model"]["num_kv_heads"])
        self.name = p["model"]["name"]
        pts = p["attention_decode"]
        self.batches = sorted({q["batch"] for q in pts})
        self.contexts = sorted({q["context"] for q in pts})
        table = {(float(q["batch"]), float(q["context"])): q["time"]["median_s"] for q in pts}
        self.table = table
        self.grid = Grid2(self.batches, self.contexts, table)
        self.set_excess(p.get("decode_spread_excess") or [])
        raw = path[:-5] + ".raw.json"
        self.spread = []
        if os.path.exists(raw):
            r = json.load(open(raw))
            for s in r.get("spread_decode_steps") or []:
                self.spread.append((s["pattern"], list(s["contexts"]), s["attention"]["median_s"]))

    def set_excess(self, points):
        """points: [{'rows','extra_s','spread'}] as in the profile."""
        self.excess_pts = points
        if points:
            self.ex_low = min(0.0, min(q["extra_s"] for q in points))
            self.ex_extra = Grid1([(q["rows"], q["extra_s"] - self.ex_low) for q in points])
            self.ex_spread = Grid1([(q["rows"], q["spread"]) for q in points])
            self.ex_first = points[0]["rows"]
            self.ex_last = points[-1]["rows"]

    def excess(self, contexts):
        if not self.excess_pts:
            return 0.0
        n = len(contexts)
        longest = max(contexts)
        if n == 0 or longest == 0:
            return 0.0
        spread = min(max(1.0 - sum(contexts) / n / longest, 0.0), 1.0)
        if spread == 0.0:
            return 0.0
        rows = min(max(n, self.ex_first), self.ex_last)
        ref = self.ex_spread(rows)
        share = min(spread / ref, 1.0) if ref > 0 else 0.0
        # Rust clamps the grid at zero via the lowest offset; same value.
        return share * (self.ex_extra(rows) + self.ex_low)

    def grid_part(self, contexts, grid=None):
        """attention_decode before the spread excess (bucket shares, suffix max, longest)."""
        g = grid or self.grid
        n = len(contexts)
        if n == 0:
            return 0.0
        counts, rows = histogram(contexts)
        ks = [k for k in range(BUCKETS) if counts[k]]
        segs = {k: locate(g.c, rows[k] / counts[k]) for k in ks}
        time = 0.0
        batch = 0
        for i in range(len(ks) - 1, -1, -1):
            batch += counts[ks[i]]
            sb = locate(g.b, batch)
            s = sum(counts[k] * g.at(sb, segs[k]) for k in ks[i:])
            time = max(time, s / batch)
        m = max(contexts)
        if m > 0:
            time = max(time, g(1, m))
        return time

    def attention(self, contexts, excess=True):
        t = self.grid_part(contexts)
        if excess:
            t = max(t + self.excess(contexts), 0.0)
        return t


def fit_excess(prof, extra_fn):
    """Refit decode_spread_excess as calibrate does (median over even-16-* of measured - model
    before excess, by rows) where the model before excess is grid_part + extra_fn(contexts)."""
    by = {}
    for pat, ctx, meas in prof.spread:
        if not pat.startswith("even-16-"):
            continue
        n = len(ctx)
        model = prof.grid_part(ctx) + extra_fn(ctx)
        longest = max(ctx)
        spread = min(max(1.0 - sum(ctx) / n / longest, 0.0), 1.0)
        e = by.setdefault(n, ([], []))
        e[0].append(meas - model)
        e[1].append(spread)
    pts = []
    for n in sorted(by):
        if n < 2:
            continue
        sp = statistics.median(by[n][1])
        if sp > 0:
            pts.append({"rows": n, "extra_s": statistics.median(by[n][0]), "spread": sp})
    return pts


def read_csv(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return list(csv.DictReader(f))


def priced_steps(run, profiles):
    """`slora-plan replay` of RUN priced by the profiles folder (the binary, read-only)."""
    from replay_fidelity import priced_steps as ps
    import tempfile
    with tempfile.TemporaryDirectory(dir=WORK) as work:
        rows = ps(os.path.join(MAIN, "target/release/slora-plan"), run + ".yaml", os.path.join(run, "executed"),
                  os.path.join(MAIN, "..", "shared", "traces"), profiles, work)
    if isinstance(rows, str):
        sys.exit(rows)
    return rows


def contexts_of(row):
    s = row.get("decode_contexts", "").strip()
    return [int(x) for x in s.split()] if s else []


def model_parts(row):
    return [k for k in row if k.endswith("_s") and k not in ("measured_s", "span_s") and not k.startswith("executed_")]
