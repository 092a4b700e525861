#!/usr/bin/env python3
"""Main script: a wave-aware decode-attention term on top of CalibratedCost's grid, fitted on a
calibration only and checked on the grid (leave-one-out), the spread steps, and host 29's live
no-adapter replays (GQA Llama-3-8B and MHA Llama-7B S2, 85% load).

  attention(S) = grid_part(S) + [M(S) - I_M(S)] + excess'(S)

grid_part: CalibratedCost's estimate before the spread excess (bucket shares, suffix max,
longest request) -- a Python copy checked equal to the binary on every replay step.
M(S) = K + h * makespan(S) + beta * rows(S), K, h, beta fitted on the grid only (relative LS).
makespan(S): the decode kernel's blocks (KV head, request, 256-row partition) in launch order
(partition-major, then request, then head), each lasting its rows (+eps), greedily put on W
slots (the earliest free): a wave count softened by the blocks' unequal lengths.  Variants:
 A exact contexts; B contexts rebuilt from the log2 histogram (what the Rust model sees);
 C closed form: 256 * softceil((F + partial_rows/256) / (W/kv), tau), F = full partitions
   per head ~ sum over buckets >= 256 of (rows+count)/256 - count/2.
I_M(S): grid_part applied to M's values at the grid's nodes (so the term is 0 on the grid).
excess': decode_spread_excess refitted after the term, as calibrate fits it (even-16-*).

Needs numpy, and `cargo build --release` first (data.py prices the replays with
`target/release/slora-plan replay`). Work files go to $DECODE_WAVES_WORK (/tmp/decode-waves).
An analysis of session 25 (docs/FIDELITY.md); nothing here is used by the cost model.
"""
import sys, pickle, copy, statistics, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from common import *
from sched import makespan
from histapprox import mk_hist, mk_closed
from model import Phys, Waves, grid_shapes, loo

PROF = {'h29-3-8b': MAIN + '/docs/fidelity/runs-23/host-29/call-2/profiles/h100-sxm-llama-3-8b.json',
        'h30-3-8b': MAIN + '/docs/fidelity/runs-24/host-30/call-2/profiles/h100-sxm-llama-3-8b.json',
        'h29-7b': MAIN + '/docs/fidelity/runs-23/host-29/call-2/profiles/h100-sxm-llama-7b.json'}
BANDS = [(1, 16), (16, 32), (32, 64), (64, 96), (96, 128), (128, 160), (160, 200), (200, 257), (1, 257)]


def mkfn(kind, kv, W, tau=0.5):
    if kind == 'A': return lambda c: makespan(c, kv, W)
    if kind == 'B': return lambda c: mk_hist(c, kv, W, order='asc')
    if kind == 'C': return lambda c: mk_closed(c, kv, W, tau)


def build(prof, kind, W, tau=0.5, shapes=None):
    ph = Phys(prof.kv, W, mk=mkfn(kind, prof.kv, W, tau)).fit(shapes or grid_shapes(prof))
    return Waves(prof, ph)


def loo_refit(prof, kind, W, tau=0.5):
    """LOO in the batch direction; the physics refitted without the left-out batch."""
    B = prof.batches; out = []
    for i in range(1, len(B) - 1):
        sub = [s for s in grid_shapes(prof) if len(s[0]) != B[i]]
        w = build(prof, kind, W, tau, sub)
        out.append(loo(prof, w).reshape(len(prof.contexts), -1)[:, i - 1])
    return np.concatenate(out)


def s3(e):
    e = np.abs(np.asarray(e)); return f"{100*np.median(e):.1f} / {100*e.mean():.1f} / {100*e.max():.1f}"


def variants(prof, W, tau):
    V = {'current': lambda c: prof.attention(c)}
    for kind in 'ABC':
        w = build(prof, kind, W, tau)
        p2 = copy.copy(prof); p2.set_excess(fit_excess(prof, w.term))
        V[kind] = (lambda w, p2: lambda c: max(p2.grid_part(c) + w.term(c) + p2.excess(c), 0.0))(w, p2)
        V[kind + ' no excess'] = (lambda w: lambda c: max(prof.grid_part(c) + w.term(c), 0.0))(w)
    return V


def spread_rows(prof, V):
    rows = []
    for name, fn in V.items():
        fe, ce = [], []
        for pat, ctx, meas in prof.spread:
            (fe if pat.startswith('even-16-') else ce).append(fn(ctx) / meas - 1)
        rows.append(f"| {name} | {s3(fe)} | {s3(ce)} | {s3(fe + ce)} |")
    return rows


def replay_rows(steps, V, names, gap=None):
    def base(s): p = s['parts']; return sum(p.values()) - p['lora_shrink_s'] - p['lora_expand_s'] - p['attention_decode_s']
    priced = {n: [base(s) + V[n](s['ctx']) + (gap(s['ctx']) if gap and n.endswith('+gap') else 0) for s in steps] for n in names}
    out = []
    for lo, hi in BANDS:
        idx = [i for i, s in enumerate(steps) if lo <= s['n'] < hi]
        if not idx: continue
        L = [steps[i]['live'] for i in idx]
        cells = []
        for n in names:
            P = [priced[n][i] for i in idx]
            cells.append(f"{100*(statistics.median(P)/statistics.median(L)-1):+.1f} / {100*(sum(P)/sum(L)-1):+.1f}")
        out.append(f"| {lo}-{hi-1} | {len(idx)} | " + " | ".join(cells) + " |")
    return out


def gap_slope(prof):
    """calibrate's whole decode steps (host-timed) minus their phases (gemm, lm head, attention,
    sampling), against KV rows, below 140k rows (beyond, jumps of 1.5-2 ms); seconds."""
    import json
    r = json.load(open(prof.path[:-5] + '.raw.json'))
    g = {t: s['median_s'] for t, s in r['base_gemm']}; l = {t: s['median_s'] for t, s in r['lm_head']}
    a = {(b, c): s['median_s'] for b, c, s in r['attention_decode']}
    samp = r['sampling_per_token']['median_s']
    pts = [(b * (c + 1) / 1e5, s['median_s'] - g[b] - l[b] - a[(b, c)] - samp * b) for b, c, s in r['decode_steps'] if b * (c + 1) < 140000]
    X = np.array([[1, x] for x, _ in pts]); y = np.array([v for _, v in pts])
    return np.linalg.lstsq(X, y, rcond=None)[0]


def main():
    steps = pickle.load(open(os.path.join(WORK, 'steps.pkl'), 'rb'))
    fitted = {}
    for key, P in PROF.items():
        prof = Profile(P); kv = prof.kv
        cands = range(640, 1025, 8) if kv == 8 else range(512, 2049, 32)
        W = min(cands, key=lambda W: np.abs(loo(prof, build(prof, 'A', W))).mean())
        # tau of the closed form: fitted on the spread steps (grid + term, before the excess)
        def sp_err(tau):
            w = build(prof, 'C', W, tau)
            return np.mean([abs((prof.grid_part(c) + w.term(c)) / m - 1) for _, c, m in prof.spread])
        tau = min([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], key=sp_err)
        fitted[key] = (prof, W, tau)
        print(f"\n## {key} ({prof.name}, {kv} KV heads): W = {W} block slots (grid LOO), tau (closed form C) = {tau}")
        for kind in 'ABC':
            print(f"  {kind}: K, h, beta (ms, ms/row of makespan, ms/1000 KV rows) = {np.round(build(prof, kind, W, tau).phys.coef, 5)}")
        print("\n(a) grid leave-one-out, batch direction, |err| median / mean / max %:")
        print(f"| linear (current) | {s3(loo(prof))} |")
        for kind in 'ABC':
            print(f"| + term {kind} (physics refit without the left-out batch) | {s3(loo_refit(prof, kind, W, tau))} |")
        V = variants(prof, W, tau)
        print("\n(b) spread steps' attention, |err| median / mean / max %: | variant | even-16-* (excess fitted) | check patterns | all |")
        print("\n".join(spread_rows(prof, V)))
        fitted[key] = (prof, W, tau, V)
    # (c) GQA replay, host-29 profile (and host-30 profile)
    gap29 = None
    for key, skey in [('h29-3-8b', 'gqa'), ('h30-3-8b', 'gqa'), ('h29-7b', 'mha')]:
        prof, W, tau, V = fitted[key]
        names = ['current', 'A', 'B', 'C', 'B no excess', 'current+gap', 'B+gap']
        g = gap_slope(prof)
        V['current+gap'] = V['current']; V['B+gap'] = V['B']
        print(f"\ngap term: whole decode step - phases in {key}'s calibration = {g[0]*1e3:+.3f} ms + {g[1]*1e3:.3f} ms per 100k KV rows")
        print(f"\n(c/d) live replay {skey} (host 29) priced with {key}: base priced / live - 1, % (ratio of medians / time-weighted)")
        print("| rows | steps | " + " | ".join(names) + " |")
        print("\n".join(replay_rows(steps[skey], V, names, gap=lambda c, g=g: g[1] * sum(x + 1 for x in c) / 1e5)))


if __name__ == '__main__':
    main()
