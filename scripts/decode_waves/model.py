"""The wave term: a physical decode-attention model (list scheduling of the kernel's blocks onto
W slots) used only for the grid's interpolation error:

    attention(S) = grid_part(S) + lam * (M(S) - I_M(S)) + excess'(S)

M(S) = K + h * makespan(S) + beta * rows(S); I_M = the same bucket/suffix/longest
interpolation the cost model applies to the grid, applied to M's values at the grid's nodes.
At a grid node the term is zero.  excess' is decode_spread_excess refitted after the term."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from common import *
from sched import makespan


class Phys:
    def __init__(self, kv, W=792, eps=0.0, mk=None):
        self.kv, self.W, self.eps = kv, W, eps
        self.mk = mk or (lambda ctx: makespan(ctx, kv, W, eps))
        self.coef = None

    def feats(self, ctx):
        return [1.0, self.mk(ctx), sum(c + 1 for c in ctx) / 1000]

    def fit(self, shapes):
        X = np.array([self.feats(c) for c, _ in shapes]); y = np.array([t * 1e3 for _, t in shapes])
        self.coef, *_ = np.linalg.lstsq(X / y[:, None], np.ones(len(y)), rcond=None)
        return self

    def __call__(self, ctx):
        return float(np.dot(self.coef, self.feats(ctx))) * 1e-3


class Waves:
    def __init__(self, prof, phys, lam=1.0):
        self.prof, self.phys, self.lam = prof, phys, lam
        tab = {(b, c): phys([int(c)] * int(b)) for (b, c) in prof.table}
        self.mgrid = Grid2(prof.batches, prof.contexts, tab)
        self.mtab = tab

    def term(self, ctx):
        return self.lam * (self.phys(ctx) - self.prof.grid_part(ctx, self.mgrid))


def grid_shapes(prof):
    return [([int(c)] * int(b), t) for (b, c), t in prof.table.items()]


def loo(prof, corr=None):
    """Leave-one-out in the batch direction (as attention_waves.py): each inner batch at each
    grid context from its neighbours, linear; with corr(b, c, lo, hi) added (a Waves)."""
    errs = []
    B = prof.batches
    for c in prof.contexts:
        for i in range(1, len(B) - 1):
            b, lo, hi = B[i], B[i - 1], B[i + 1]
            t = prof.table
            w = (b - lo) / (hi - lo)
            lin = t[(lo, c)] + w * (t[(hi, c)] - t[(lo, c)])
            if corr is not None:
                m = corr.mtab
                lin += corr.lam * (m[(b, c)] - (m[(lo, c)] + w * (m[(hi, c)] - m[(lo, c)])))
            errs.append(lin / t[(b, c)] - 1)
    return np.array(errs)
