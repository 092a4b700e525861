"""List-scheduling makespan of decode attention blocks (physical reference model)."""
import heapq
from functools import lru_cache

def makespan(contexts, kv, W=792, eps=0.0, part=256, idle=0.0):
    """Blocks in launch order (z, request, head); duration eps + rows of the partition;
    blocks past a request's rows take `idle`. Greedy onto W slots (the earliest free).
    Returns row-units. With W % kv == 0 the kv heads of a (request, partition) move together
    (W / kv slots of groups): the same schedule, kv times fewer events."""
    return _makespan(tuple(contexts), kv, W, eps, part, idle)

@lru_cache(maxsize=None)
def _makespan(ctx, kv, W, eps, part, idle):
    ctx = [c + 1 for c in ctx]
    zmax = max(-(-c // part) for c in ctx)
    rep = kv
    if W % kv == 0:
        W //= kv; rep = 1
    if rep * len(ctx) * zmax <= W:
        return max(min(part, c) for c in ctx) + eps
    heap = [0.0] * W
    pop, push = heapq.heappop, heapq.heappush
    for z in range(zmax):
        s = z * part
        for c in ctx:
            d = (eps + min(part, c - s)) if c > s else idle
            for _ in range(rep):
                push(heap, pop(heap) + d)
    return max(heap)
