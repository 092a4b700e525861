// Token selection from f32 logits: greedy argmax and nucleus (top-p) sampling, one block per
// row.
//
// sample_top_p is written so that the CPU reference (src/ops/sampling.rs) reproduces its ids
// bit for bit, whatever the summation order:
//  * every per-token value uses only IEEE-rounded basic operations (__fdiv_rn, __fmul_rn, ...,
//    which the compiler never contracts into FMAs), including a polynomial exp (det_exp)
//    instead of expf, whose last bit differs between CUDA and libm;
//  * probabilities become integer weights w = rint(e * 2^40) (e = exp(z - max z) in (0, 1]),
//    and every sum is a u64 sum, which is exact and so independent of order.
// Rule (documented in sampling.rs): z = logit / temperature, e = det_exp(z - max z), key = the
// f32 bits of e (ordered like e, as e >= 0), W = sum of w, need = clamp(ceil(top_p * W), 1, W).
// tau = the largest key such that the mass of the tokens with key >= tau is >= need; every token
// with key >= tau is kept (ties at the threshold are all kept), K = their mass. The draw is
// r = min(floor(u * K), K - 1) and the chosen token is the kept token, in index order, whose
// cumulative weight first exceeds r. If W = 0 (all logits -inf/NaN, or max z infinite) the
// result is argmax of the raw logits.
//
// tau is found without sorting by a radix select over the 31 value bits of the key in three
// passes (11 + 10 + 10 bits): each pass histograms the weights of the tokens still matching
// the prefix chosen so far into shared memory, then picks the bucket where the mass counted
// from the top crosses `need`. Tokens of weight 0 are skipped: they can never be drawn and
// never hold the threshold, and skipping them removes most of the shared-memory atomics of a
// peaked distribution.

#define SAMPLE_THREADS 512
// NVRTC without the toolkit headers has no INFINITY macro.
#define NEG_INF __int_as_float(0xff800000)
#define WEIGHT_SCALE 1099511627776.0f  // 2^40: w = rint(e * 2^40), e in [0, 1]

// Ordering of argmax: NaN counts as the largest value (torch.argmax returns the first NaN),
// equal values go to the lower index. A strict total order on (value, index) pairs, so any
// reduction order gives the same winner.
__device__ __forceinline__ bool arg_better(float v, int i, float bv, int bi) {
    const bool vn = v != v;
    const bool bn = bv != bv;
    if (vn || bn) return vn && bn ? i < bi : vn;
    return v > bv || (v == bv && i < bi);
}

// Calls f(index, value) for every element of a row of `vocab` floats, threads striding over
// it (float4 loads when the row is 16-byte aligned and vocab % 4 == 0).
template <class F>
__device__ __forceinline__ void for_each_logit(const float* row, int vocab, F& f) {
    if ((vocab & 3) == 0 && (reinterpret_cast<unsigned long long>(row) & 15ull) == 0) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const int n4 = vocab >> 2;
        for (int v = threadIdx.x; v < n4; v += blockDim.x) {
            const float4 q = row4[v];
            f(4 * v, q.x);
            f(4 * v + 1, q.y);
            f(4 * v + 2, q.z);
            f(4 * v + 3, q.w);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) f(j, row[j]);
    }
}

// The block's best (value, index) under arg_better; every thread gets it.
__device__ __forceinline__ void block_argmax(float& v, int& i) {
    __shared__ float vals[32];
    __shared__ int idxs[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (arg_better(ov, oi, v, i)) { v = ov; i = oi; }
    }
    if (lane == 0) { vals[warp] = v; idxs[warp] = i; }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = vals[0];
    i = idxs[0];
    for (int w = 1; w < warps; ++w) {
        if (arg_better(vals[w], idxs[w], v, i)) { v = vals[w]; i = idxs[w]; }
    }
    __syncthreads();
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    v = partial[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) v = fmaxf(v, partial[w]);
    __syncthreads();
    return v;
}

// Sum over the threads with a higher index than this one (exclusive suffix sum).
__device__ __forceinline__ unsigned long long block_sum_above(unsigned long long v) {
    __shared__ unsigned long long warp_total[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    unsigned long long s = v;  // becomes the sum over lanes >= lane
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_down_sync(0xffffffffu, s, o);
        if (lane + o < 32) s += t;
    }
    if (lane == 0) warp_total[warp] = s;
    __syncthreads();
    unsigned long long higher = 0;
    for (int w = warp + 1; w < (int)(blockDim.x >> 5); ++w) higher += warp_total[w];
    __syncthreads();
    return s - v + higher;
}

// Sum over the threads with a lower index than this one (exclusive prefix sum).
__device__ __forceinline__ unsigned long long block_sum_below(unsigned long long v) {
    __shared__ unsigned long long warp_total[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    unsigned long long s = v;  // becomes the sum over lanes <= lane
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += t;
    }
    if (lane == 31) warp_total[warp] = s;
    __syncthreads();
    unsigned long long lower = 0;
    for (int w = 0; w < warp; ++w) lower += warp_total[w];
    __syncthreads();
    return s - v + lower;
}

// exp(x) for x <= 0 from IEEE-rounded +, -, * only, so the Rust reference (det_exp in
// sampling.rs) gets the same bits: x = n ln2 + r (Cody-Waite, ln2 split so n * LN2_HI is
// exact), e^r by a degree-7 Taylor polynomial (|r| <= 0.35: truncation < 1e-8 relative),
// times 2^n built from the exponent bits. Below -87 (and for NaN) the result is 0: such a
// token's weight rounds to 0 anyway.
__device__ __forceinline__ float det_exp(float x) {
    if (!(x >= -87.0f)) return 0.0f;
    x = fminf(x, 0.0f);
    const float n = rintf(__fmul_rn(x, __uint_as_float(0x3fb8aa3bu)));  // x * log2(e)
    float r = __fsub_rn(x, __fmul_rn(n, __uint_as_float(0x3f317200u)));  // LN2_HI
    r = __fsub_rn(r, __fmul_rn(n, __uint_as_float(0x35bfbe8eu)));        // LN2_LO
    float p = __uint_as_float(0x39500d01u);                               // 1/5040
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3ab60b61u));         // 1/720
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c088889u));         // 1/120
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aaaabu));         // 1/24
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaaabu));         // 1/6
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    const int ni = (int)n;  // in [-126, 0]: 2^n is a normal float
    return __fmul_rn(p, __int_as_float((ni + 127) << 23));
}

struct TokenWeight {
    unsigned key;            // f32 bits of e: ordered like e
    unsigned long long w;    // rint(e * 2^40)
};

__device__ __forceinline__ TokenWeight token_weight(float logit, float temperature, float zmax) {
    const float e = det_exp(__fsub_rn(__fdiv_rn(logit, temperature), zmax));
    TokenWeight t;
    t.key = __float_as_uint(e);
    t.w = (unsigned long long)rintf(__fmul_rn(e, WEIGHT_SCALE));
    return t;
}

// The radix-select step. hist[0..nb) holds the mass per digit of the tokens matching the prefix;
// `above` is the mass of the tokens whose key is above every key with that prefix, and
// above < need <= above + sum(hist). Finds the largest digit d with
// above + sum(hist[d..nb)) >= need, then sets above += sum(hist[d+1..nb)) and returns d;
// `bucket` gets hist[d]. nb is a multiple of blockDim.x. Exactly one thread sees the crossing
// inside its run of buckets, because the runs' mass intervals partition (above, above + sum].
__device__ __forceinline__ int select_digit(const unsigned long long* hist, int nb,
                                            unsigned long long& above, unsigned long long need,
                                            unsigned long long& bucket) {
    __shared__ int s_digit;
    __shared__ unsigned long long s_above, s_bucket;
    const int per = nb / (int)blockDim.x;
    const int lo = threadIdx.x * per;
    unsigned long long mine = 0;
    for (int d = lo; d < lo + per; ++d) mine += hist[d];
    const unsigned long long base = above + block_sum_above(mine);
    if (base < need && base + mine >= need) {
        unsigned long long cum = base;
        for (int d = lo + per - 1; d >= lo; --d) {
            if (cum + hist[d] >= need) {
                s_digit = d;
                s_above = cum;
                s_bucket = hist[d];
                break;
            }
            cum += hist[d];
        }
    }
    __syncthreads();
    const int digit = s_digit;
    above = s_above;
    bucket = s_bucket;
    __syncthreads();
    return digit;
}

// ids[row] = the first index of the row's largest logit (NaN counts as largest).
// grid.x = rows, block = SAMPLE_THREADS.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
argmax(const float* __restrict__ logits, int* __restrict__ ids, int vocab) {
    const float* row = logits + (long long)blockIdx.x * vocab;
    float bv = NEG_INF;
    int bi = 0x7fffffff;  // loses to every real element, including -inf ones
    auto visit = [&](int j, float v) {
        if (arg_better(v, j, bv, bi)) { bv = v; bi = j; }
    };
    for_each_logit(row, vocab, visit);
    block_argmax(bv, bi);
    if (threadIdx.x == 0) ids[blockIdx.x] = bi;
}

// Nucleus sampling; see the top of this file for the exact rule. grid.x = rows,
// block = SAMPLE_THREADS. uniforms[row] in [0, 1) (clamped into it).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_top_p(const float* __restrict__ logits, const float* __restrict__ uniforms,
             int* __restrict__ ids, int vocab, float temperature, float top_p) {
    __shared__ unsigned long long hist[2048];
    __shared__ int s_pick;
    const float* row = logits + (long long)blockIdx.x * vocab;

    // Pass 0: max logit (NaN ignored, as fmaxf does) and the greedy fallback. Dividing by a
    // positive temperature is monotone, so max(l / T) = max(l) / T with the same rounding.
    float lmax = NEG_INF;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    auto visit_max = [&](int j, float v) {
        lmax = fmaxf(lmax, v);
        if (arg_better(v, j, bv, bi)) { bv = v; bi = j; }
    };
    for_each_logit(row, vocab, visit_max);
    lmax = block_max(lmax);
    block_argmax(bv, bi);
    const float zmax = __fdiv_rn(lmax, temperature);

    // Pass 1: digit = key bits 30..20 (bit 31 is 0: e >= 0). Also gives W.
    for (int d = threadIdx.x; d < 2048; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    auto visit1 = [&](int, float l) {
        const TokenWeight t = token_weight(l, temperature, zmax);
        if (t.w != 0) atomicAdd(&hist[t.key >> 20], t.w);
    };
    for_each_logit(row, vocab, visit1);
    __syncthreads();
    unsigned long long mine = 0;
    for (int d = threadIdx.x; d < 2048; d += blockDim.x) mine += hist[d];
    const unsigned long long total = mine + block_sum_above(mine) + block_sum_below(mine);
    if (total == 0) {  // uniform across the block: every thread returns
        if (threadIdx.x == 0) ids[blockIdx.x] = bi;
        return;
    }
    unsigned long long need =
        (unsigned long long)ceil(__dmul_rn((double)top_p, __ull2double_rn(total)));
    need = need < 1 ? 1 : (need > total ? total : need);
    unsigned long long above = 0, bucket = 0;
    const unsigned p1 = (unsigned)select_digit(hist, 2048, above, need, bucket);

    // Pass 2: tokens with key bits 30..20 == p1; digit = bits 19..10.
    for (int d = threadIdx.x; d < 1024; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    auto visit2 = [&](int, float l) {
        const TokenWeight t = token_weight(l, temperature, zmax);
        if (t.w != 0 && (t.key >> 20) == p1) atomicAdd(&hist[(t.key >> 10) & 1023u], t.w);
    };
    for_each_logit(row, vocab, visit2);
    __syncthreads();
    const unsigned p2 = (p1 << 10) | (unsigned)select_digit(hist, 1024, above, need, bucket);

    // Pass 3: tokens with key bits 30..10 == p2; digit = bits 9..0.
    for (int d = threadIdx.x; d < 1024; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    auto visit3 = [&](int, float l) {
        const TokenWeight t = token_weight(l, temperature, zmax);
        if (t.w != 0 && (t.key >> 10) == p2) atomicAdd(&hist[t.key & 1023u], t.w);
    };
    for_each_logit(row, vocab, visit3);
    __syncthreads();
    const unsigned tau = (p2 << 10) | (unsigned)select_digit(hist, 1024, above, need, bucket);
    const unsigned long long kept = above + bucket;  // mass of the tokens with key >= tau

    // Draw: r in [0, kept); each thread owns a contiguous run of indices, so an exclusive
    // prefix sum over threads orders the kept mass by index.
    float u = uniforms[blockIdx.x];
    u = fminf(fmaxf(u, 0.0f), 1.0f);  // NaN -> 0
    unsigned long long r = (unsigned long long)__dmul_rn((double)u, __ull2double_rn(kept));
    if (r >= kept) r = kept - 1;
    const int run = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int lo = min(vocab, (int)threadIdx.x * run);
    const int hi = min(vocab, lo + run);
    unsigned long long my_mass = 0;
    for (int j = lo; j < hi; ++j) {
        const TokenWeight t = token_weight(row[j], temperature, zmax);
        if (t.key >= tau) my_mass += t.w;
    }
    if (threadIdx.x == 0) s_pick = -1;
    const unsigned long long before = block_sum_below(my_mass);  // also orders s_pick's write
    if (before <= r && r < before + my_mass) {
        unsigned long long cum = before;
        for (int j = lo; j < hi; ++j) {
            const TokenWeight t = token_weight(row[j], temperature, zmax);
            if (t.key >= tau) {
                cum += t.w;
                if (cum > r) {
                    s_pick = j;
                    break;
                }
            }
        }
    }
    __syncthreads();
    // s_pick is always set (the kept mass summed here equals `kept` exactly); the greedy id is
    // a guard, not a code path.
    if (threadIdx.x == 0) ids[blockIdx.x] = s_pick >= 0 ? s_pick : bi;
}
