"""Histogram-only versions of the makespan (what the Rust model can compute)."""
import math
from common import histogram, BUCKETS
from sched import makespan

def synth(contexts_or_hist, order='desc'):
    """Per-request contexts rebuilt from the log2 histogram (count, rows per bucket): each
    bucket's requests spread evenly and symmetrically about the bucket mean, as wide as the
    bucket allows. order: 'desc' longest buckets first, 'asc' shortest first."""
    counts, rows = contexts_or_hist
    out = []
    ks = [k for k in range(BUCKETS) if counts[k]]
    if order == 'desc': ks = ks[::-1]
    for k in ks:
        n = counts[k]; m = rows[k] / n
        lo, hi = (0 if k == 0 else 2 ** k), 2 ** (k + 1) - 1
        h = min(m - lo, hi - m)
        vals = [int(round(m + h * (2 * (j + 0.5) / n - 1))) for j in range(n)]
        out += vals[::-1] if order == 'desc' else vals
    return out

def mk_hist(ctx, kv, W=792, eps=0.0, order='desc'):
    return makespan(synth(histogram(ctx), order), kv, W, eps)

def soft_ceil(x, tau):
    """floor(x) + min(1, frac(x)/tau): tau -> 0 rounds up, tau = 1 is x itself."""
    f = math.floor(x); r = x - f
    if r <= 0: return x
    return f + min(1.0, r / tau) if tau > 0 else f + 1

def mk_closed(ctx, kv, W=792, tau=0.5, hist=True):
    """Closed form from the histogram: full partitions F (per head) and the partial ones.
    Full blocks run in soft waves of 256 rows over W/kv group slots; partial blocks (mean length
    p) fill in after them: waves(F + P * p/256) softened, floor at the longest block."""
    counts, rows = histogram(ctx)
    F = 0.0; part_rows = 0.0; longest = 0.0
    for k in range(BUCKETS):
        n = counts[k]
        if not n: continue
        r = rows[k] + n  # rows read (context + 1)
        if 2 ** k >= 256:
            f = r / 256 - n / 2     # full partitions ~ rows/256 - count/2
            F += f; part_rows += r - 256 * f
        else:
            part_rows += r
        longest = max(longest, min(256.0, r / n))
    S = W / kv
    x = (F + part_rows / 256) / S
    return max(256 * soft_ceil(x, tau), longest)
