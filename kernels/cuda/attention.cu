// Attention over the unified pool's non-contiguous pages (Llama: MHA and GQA).
//
// Layout (kernels/README.md): `layer_kv` is one layer's `[2, pages, W]` region of the pool, the
// K side first, the V side `pages * W` elements later; the KV row of a token stored at page `p`
// is `W = num_kv_heads * D` halves at `p * W`, element `kv_head * D + i`. Page offsets are
// computed in 64 bits because a side of a large pool can exceed 2^31 elements; every other
// index fits `int` (the Rust launch plans check it).
//
// All 16-byte (`uint4`) accesses rely on `D % 8 == 0` and on 16-byte aligned base pointers (the
// launch wrappers check both). Softmax runs in the log2 domain: scores are multiplied by
// `scale_log2 = log2(e) / sqrt(D)` and exponentiated with `exp2f`, which is the same softmax.
//
// The block sizes below are mirrored by constants in `src/ops/attention.rs`; a unit test there
// keeps the two in step.

#define ATTN_KV_STORE_THREADS 256
#define ATTN_DECODE_THREADS 128
#define ATTN_DECODE_WARPS (ATTN_DECODE_THREADS / 32)
#define ATTN_DECODE_PARTITION 256
#define ATTN_DECODE_GMAX 8
#define ATTN_DECODE_UNROLL 4
#define ATTN_PREFILL_THREADS 128
#define ATTN_PREFILL_BQ 64
#define ATTN_PREFILL_BK 32

__device__ __forceinline__ float attn_neg_inf() { return __int_as_float(0xff800000); }

// Eight fp16 values of one 16-byte word, in memory order (little-endian: low half first).
__device__ __forceinline__ void attn_unpack8(uint4 raw, float* f) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = h2f((half_t)(w[k] & 0xffffu));
        f[2 * k + 1] = h2f((half_t)(w[k] >> 16));
    }
}

__device__ __forceinline__ uint4 attn_pack8(const float* f) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        w[k] = (unsigned int)f2h(f[2 * k]) | ((unsigned int)f2h(f[2 * k + 1]) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint4 attn_load16(const half_t* p) {
    return *reinterpret_cast<const uint4*>(p);
}

// ---------------------------------------------------------------------------------------------
// kv_store: copy the K and V rows of `tokens` new tokens into their pages.
// Thread mapping: one thread per 16-byte chunk of a row; it moves that chunk of K and of V.
// k, v: [tokens, width]; slot_pages: [tokens]; grid.x = ceil(tokens * width / 8 / 256).
extern "C" __global__ void __launch_bounds__(ATTN_KV_STORE_THREADS)
kv_store(const half_t* __restrict__ k, const half_t* __restrict__ v,
         const int* __restrict__ slot_pages, half_t* __restrict__ layer_kv, int tokens, int width,
         int pages) {
    const int chunks = width / 8;
    const int idx = blockIdx.x * ATTN_KV_STORE_THREADS + threadIdx.x;
    if (idx >= tokens * chunks) return;
    const int t = idx / chunks;
    const int c = idx - t * chunks;
    const long long dst = (long long)slot_pages[t] * width + c * 8;
    const int src = t * width + c * 8;
    *reinterpret_cast<uint4*>(layer_kv + dst) = attn_load16(k + src);
    *reinterpret_cast<uint4*>(layer_kv + (long long)pages * width + dst) = attn_load16(v + src);
}

// ---------------------------------------------------------------------------------------------
// Decode attention, split-K over partitions of ATTN_DECODE_PARTITION context rows.
//
// Grid (num_kv_heads, requests, max_parts); one block of 128 threads per (kv head, request,
// partition). The block reads each K and V row of its partition once and serves all `g`
// query heads of the group from it (GQA: g = num_heads / num_kv_heads).
//
// Thread mapping: a "row group" of TG = D/8 threads holds one KV row, 16 bytes per thread;
// the block holds NG = 128/TG rows at once (8 rows for D = 128), ATTN_DECODE_UNROLL times
// over per loop trip so that several loads are in flight.
//   1. scores: each thread keeps its 8 query elements of up to GMAX heads in registers, dots
//      them with its K chunk, the row group sums by shuffles; scores go to shared memory.
//   2. softmax: one warp per head: max, exp2, sum (exact within the partition).
//   3. output: each thread accumulates p * V for its rows and 8 dims of up to GMAX heads;
//      row groups are summed by shuffles within a warp, then across warps in shared memory.
// More than GMAX (at most 8) heads per group are served in passes of GMAX (re-reading K/V,
// mostly from L2).
// Output: with one partition the block writes o directly; else it writes the unnormalised
// partial output with its max and sum (log2 domain) for decode_attention_reduce.
//
// Dynamic shared memory (floats): logits [g][PARTITION], red [WARPS][min(g, GMAX)][D],
// stats [g][2]; min(g, GMAX) = min(g, 8) for the GMAX the plan picks.
extern __shared__ float attn_decode_smem[];

template <int D, int GMAX>
__device__ __forceinline__ void decode_attention(
    const half_t* __restrict__ q, const half_t* __restrict__ layer_kv, int pages,
    const int* __restrict__ kv_pages, const int* __restrict__ table_offset,
    const int* __restrict__ ctx_len, half_t* __restrict__ o, float* __restrict__ part_o,
    float* __restrict__ part_ml, int num_heads, int num_kv_heads, int max_parts,
    float scale_log2) {
    constexpr int TG = D / 8;
    constexpr int NG = ATTN_DECODE_THREADS / TG;
    constexpr int U = ATTN_DECODE_UNROLL;
    constexpr int P = ATTN_DECODE_PARTITION;
    static_assert(32 % TG == 0, "a row group must not straddle warps");
    static_assert(GMAX >= 1 && GMAX <= ATTN_DECODE_GMAX, "heads per pass");

    const int kh = blockIdx.x;
    const int b = blockIdx.y;
    const int part = blockIdx.z;
    const int ctx = ctx_len[b];
    const int start = part * P;
    // Block-uniform, before any barrier: partitions past this request's context do nothing.
    if (start >= ctx) return;
    const int len = min(P, ctx - start);
    const int nparts = (ctx + P - 1) / P;
    const int g = num_heads / num_kv_heads;
    const int gcm = min(g, GMAX);
    const int W = num_kv_heads * D;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int grp = tid / TG;
    const int lig = tid % TG;

    float* logits = attn_decode_smem;
    float* red = logits + g * P;
    float* stats = red + ATTN_DECODE_WARPS * gcm * D;

    const half_t* k_side = layer_kv + kh * D + lig * 8;
    const half_t* v_side = layer_kv + (long long)pages * W + kh * D + lig * 8;
    const int* table = kv_pages + table_offset[b] + start;
    // The group's g query heads are contiguous in q and o: heads kh*g .. kh*g+g-1.
    const int qo_row = b * num_heads * D + kh * g * D;

    // 1. scores.
    for (int j0 = 0; j0 < g; j0 += GMAX) {
        const int gc = min(GMAX, g - j0);
        float qreg[GMAX][8];
#pragma unroll
        for (int jj = 0; jj < GMAX; ++jj) {
            if (jj < gc) {
                attn_unpack8(attn_load16(q + qo_row + (j0 + jj) * D + lig * 8), qreg[jj]);
#pragma unroll
                for (int e = 0; e < 8; ++e) qreg[jj][e] *= scale_log2;
            }
        }
        // The trip count is block-uniform, so every lane reaches every shuffle.
        for (int base = 0; base < len; base += U * NG) {
            float kf[U][8];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = base + u * NG + grp;
                if (t < len) {
                    attn_unpack8(attn_load16(k_side + (long long)table[t] * W), kf[u]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) kf[u][e] = 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = base + u * NG + grp;
#pragma unroll
                for (int jj = 0; jj < GMAX; ++jj) {
                    if (jj < gc) {
                        float dot = 0.f;
#pragma unroll
                        for (int e = 0; e < 8; ++e) dot += qreg[jj][e] * kf[u][e];
#pragma unroll
                        for (int off = TG / 2; off > 0; off >>= 1)
                            dot += __shfl_xor_sync(0xffffffffu, dot, off);
                        if (t < len && lig == 0) logits[(j0 + jj) * P + t] = dot;
                    }
                }
            }
        }
    }
    __syncthreads();

    // 2. softmax within the partition, one warp per head. len >= 1, so the max is finite.
    for (int j = warp; j < g; j += ATTN_DECODE_WARPS) {
        float* row = logits + j * P;
        float mx = attn_neg_inf();
        for (int t = lane; t < len; t += 32) mx = fmaxf(mx, row[t]);
        mx = warp_max(mx);
        float sum = 0.f;
        for (int t = lane; t < len; t += 32) {
            const float e = exp2f(row[t] - mx);
            row[t] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            stats[2 * j] = mx;
            stats[2 * j + 1] = sum;
        }
    }
    __syncthreads();

    // 3. p * V.
    for (int j0 = 0; j0 < g; j0 += GMAX) {
        const int gc = min(GMAX, g - j0);
        float acc[GMAX][8];
#pragma unroll
        for (int jj = 0; jj < GMAX; ++jj)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[jj][e] = 0.f;
        for (int base = 0; base < len; base += U * NG) {
            float vf[U][8];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = base + u * NG + grp;
                if (t < len) {
                    attn_unpack8(attn_load16(v_side + (long long)table[t] * W), vf[u]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) vf[u][e] = 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = base + u * NG + grp;
                if (t < len) {
#pragma unroll
                    for (int jj = 0; jj < GMAX; ++jj) {
                        if (jj < gc) {
                            const float p = logits[(j0 + jj) * P + t];
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[jj][e] += p * vf[u][e];
                        }
                    }
                }
            }
        }
        // Sum the row groups of a warp (they differ in the lane bits at and above TG) ...
#pragma unroll
        for (int jj = 0; jj < GMAX; ++jj) {
            if (jj < gc) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
#pragma unroll
                    for (int off = TG; off < 32; off <<= 1)
                        acc[jj][e] += __shfl_xor_sync(0xffffffffu, acc[jj][e], off);
                }
            }
        }
        // ... then the warps, through shared memory.
        if (lane < TG) {
#pragma unroll
            for (int jj = 0; jj < GMAX; ++jj) {
                if (jj < gc) {
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        red[(warp * gcm + jj) * D + lig * 8 + e] = acc[jj][e];
                }
            }
        }
        __syncthreads();
        for (int idx = tid; idx < gc * D; idx += ATTN_DECODE_THREADS) {
            const int jj = idx / D;
            const int i = idx - jj * D;
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < ATTN_DECODE_WARPS; ++w) s += red[(w * gcm + jj) * D + i];
            const int j = j0 + jj;
            if (nparts == 1) {
                o[qo_row + j * D + i] = f2h(s / stats[2 * j + 1]);
            } else {
                const int slot = (b * num_heads + kh * g + j) * max_parts + part;
                part_o[slot * D + i] = s;
                if (i == 0) {
                    part_ml[2 * slot] = stats[2 * j];
                    part_ml[2 * slot + 1] = stats[2 * j + 1];
                }
            }
        }
        // `red` is rewritten by the next pass.
        __syncthreads();
    }
}

// One kernel per head dim and per register budget: GMAX query heads per pass, the smallest
// power of two >= min(g, 8) (the plan picks it), so MHA (g = 1) does not pay registers for
// eight heads' partial sums and keeps more blocks (so more loads) in flight per SM.
#define ATTN_DECODE_KERNEL(D, G)                                                              \
    extern "C" __global__ void __launch_bounds__(ATTN_DECODE_THREADS)                         \
        decode_attention_d##D##_g##G(                                                         \
            const half_t* __restrict__ q, const half_t* __restrict__ layer_kv, int pages,     \
            const int* __restrict__ kv_pages, const int* __restrict__ table_offset,           \
            const int* __restrict__ ctx_len, half_t* __restrict__ o,                          \
            float* __restrict__ part_o, float* __restrict__ part_ml, int num_heads,           \
            int num_kv_heads, int max_parts, float scale_log2) {                              \
        decode_attention<D, G>(q, layer_kv, pages, kv_pages, table_offset, ctx_len, o,        \
                               part_o, part_ml, num_heads, num_kv_heads, max_parts,           \
                               scale_log2);                                                   \
    }

ATTN_DECODE_KERNEL(64, 1)
ATTN_DECODE_KERNEL(64, 2)
ATTN_DECODE_KERNEL(64, 4)
ATTN_DECODE_KERNEL(64, 8)
ATTN_DECODE_KERNEL(128, 1)
ATTN_DECODE_KERNEL(128, 2)
ATTN_DECODE_KERNEL(128, 4)
ATTN_DECODE_KERNEL(128, 8)

// Combines the partitions of requests whose context spans more than one: the usual
// rescale by exp2(m_p - M). Grid (num_heads, requests), block head_dim threads, one per dim.
// Requests with one partition were finished by decode_attention and are skipped.
extern "C" __global__ void decode_attention_reduce(const float* __restrict__ part_o,
                                                   const float* __restrict__ part_ml,
                                                   const int* __restrict__ ctx_len,
                                                   half_t* __restrict__ o, int num_heads,
                                                   int head_dim, int max_parts) {
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int nparts = (ctx_len[b] + ATTN_DECODE_PARTITION - 1) / ATTN_DECODE_PARTITION;
    if (nparts <= 1) return;
    const int slot0 = (b * num_heads + h) * max_parts;
    float mx = attn_neg_inf();
    for (int p = 0; p < nparts; ++p) mx = fmaxf(mx, part_ml[2 * (slot0 + p)]);
    float sum = 0.f;
    for (int p = 0; p < nparts; ++p)
        sum += part_ml[2 * (slot0 + p) + 1] * exp2f(part_ml[2 * (slot0 + p)] - mx);
    const float inv = 1.f / sum;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.f;
        for (int p = 0; p < nparts; ++p)
            acc += part_o[(slot0 + p) * head_dim + i] * exp2f(part_ml[2 * (slot0 + p)] - mx);
        o[(b * num_heads + h) * head_dim + i] = f2h(acc * inv);
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill attention (causal, variable-length segments, chunked prefill), flash-attention style.
//
// Grid (num_heads, max_tiles, segments): one block of 128 threads per (query head, tile of
// BQ = 64 queries, segment). Heads are the fastest grid dimension so that the heads of one KV
// group run side by side and share K/V tiles in L2; tiles run last-first because the last
// tile of a segment attends the most keys (shorter tail).
//
// The block keeps its Q tile in shared memory and streams the segment's KV rows
// 0..=last position in tiles of BK = 32 rows (each row gathered through the page table,
// 16 bytes per thread). Thread t owns query rows 4*(t/8) .. +4 and, for the scores, key columns
// (t%8) + 8*jj; for the output, dims chunks (t%8) + 8*k of 8 dims. The 8 threads of a row
// group are 8 consecutive lanes, so row max and sum are 3 shuffles. Per row an online softmax
// (running max m, sum l, output rescaled by exp2(m_old - m_new)); p goes through shared memory
// to the P·V product. Every query row attends key 0, so m is finite after the first tile.
//
// Shared rows are padded by 8 halves (16 bytes) so that the 8 rows read together by a quarter
// warp fall in distinct banks. Static shared memory for D = 128: 43,264 bytes.
template <int D>
__device__ __forceinline__ void prefill_attention(
    const half_t* __restrict__ q, const half_t* __restrict__ layer_kv, int pages,
    const int* __restrict__ kv_pages, const int* __restrict__ seg_start,
    const int* __restrict__ context_start, const int* __restrict__ table_offset,
    half_t* __restrict__ o, int num_heads, int num_kv_heads, int max_tiles, float scale_log2) {
    constexpr int BQ = ATTN_PREFILL_BQ;
    constexpr int BK = ATTN_PREFILL_BK;
    constexpr int NT = ATTN_PREFILL_THREADS;
    constexpr int C = D / 8;     // 16-byte chunks per row
    constexpr int LD = D + 8;    // padded shared row, in halves
    constexpr int LDP = BK + 1;  // padded row of p
    constexpr int RPT = 4;       // query rows per thread
    constexpr int CPT = BK / 8;  // key columns per thread
    constexpr int DCH = C / 8;   // output chunks per thread
    static_assert(NT == 128 && BQ == (NT / 8) * RPT, "thread mapping: 16 row groups of 8");
    static_assert(D % 64 == 0, "each of the 8 threads of a row group owns D/64 chunks");

    __shared__ __align__(16) half_t q_s[BQ * LD];
    __shared__ __align__(16) half_t k_s[BK * LD];
    __shared__ __align__(16) half_t v_s[BK * LD];
    __shared__ float p_s[BQ * LDP];

    const int h = blockIdx.x;
    const int tile = max_tiles - 1 - (int)blockIdx.y;
    const int s = blockIdx.z;
    const int s0 = seg_start[s];
    const int len = seg_start[s + 1] - s0;
    const int q0 = tile * BQ;
    // Block-uniform, before any barrier: tiles past this segment's chunk do nothing.
    if (q0 >= len) return;
    const int qn = min(BQ, len - q0);
    const int g = num_heads / num_kv_heads;
    const int kh = h / g;
    const int W = num_kv_heads * D;
    const int QW = num_heads * D;
    const int ctx0 = context_start[s];
    const int* table = kv_pages + table_offset[s];
    const half_t* k_side = layer_kv + kh * D;
    const half_t* v_side = layer_kv + (long long)pages * W + kh * D;
    // The last KV row any query of this tile attends (its own position).
    const int last_pos = ctx0 + q0 + qn - 1;
    const int tid = threadIdx.x;
    const int rg = tid >> 3;
    const int cg = tid & 7;

    // Q tile; rows past the chunk are zero (their results are never written).
    for (int idx = tid; idx < BQ * C; idx += NT) {
        const int r = idx / C;
        const int c = idx - r * C;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (r < qn) val = attn_load16(q + (s0 + q0 + r) * QW + h * D + c * 8);
        *reinterpret_cast<uint4*>(q_s + r * LD + c * 8) = val;
    }

    float m[RPT], l[RPT], acc[RPT][DCH * 8];
    int pos[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        m[i] = attn_neg_inf();
        l[i] = 0.f;
        // Padding rows copy the last real row's position, so they never see an all-masked
        // row (no NaN); they are not written.
        pos[i] = ctx0 + q0 + min(rg * RPT + i, qn - 1);
#pragma unroll
        for (int e = 0; e < DCH * 8; ++e) acc[i][e] = 0.f;
    }

    for (int kb = 0; kb <= last_pos; kb += BK) {
        // The previous tile's readers are done with k_s, v_s (and, first time, q_s is written).
        __syncthreads();
        for (int idx = tid; idx < BK * C; idx += NT) {
            const int r = idx / C;
            const int c = idx - r * C;
            const int j = kb + r;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u);
            uint4 vv = kv;
            // Rows past last_pos are zero, not garbage: p = 0 there, but 0 * NaN would be NaN.
            if (j <= last_pos) {
                const long long off = (long long)table[j] * W + c * 8;
                kv = attn_load16(k_side + off);
                vv = attn_load16(v_side + off);
            }
            *reinterpret_cast<uint4*>(k_s + r * LD + c * 8) = kv;
            *reinterpret_cast<uint4*>(v_s + r * LD + c * 8) = vv;
        }
        __syncthreads();

        // Scores: rows rg*4+i, key columns cg + 8*jj.
        float sc[RPT][CPT];
#pragma unroll
        for (int i = 0; i < RPT; ++i)
#pragma unroll
            for (int jj = 0; jj < CPT; ++jj) sc[i][jj] = 0.f;
#pragma unroll 2
        for (int c = 0; c < C; ++c) {
            float qf[RPT][8];
#pragma unroll
            for (int i = 0; i < RPT; ++i)
                attn_unpack8(attn_load16(q_s + (rg * RPT + i) * LD + c * 8), qf[i]);
#pragma unroll
            for (int jj = 0; jj < CPT; ++jj) {
                float kf[8];
                attn_unpack8(attn_load16(k_s + (cg + 8 * jj) * LD + c * 8), kf);
#pragma unroll
                for (int i = 0; i < RPT; ++i)
#pragma unroll
                    for (int e = 0; e < 8; ++e) sc[i][jj] += qf[i][e] * kf[e];
            }
        }

        // Online softmax per row; all lanes run the shuffles.
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            float tmax = attn_neg_inf();
#pragma unroll
            for (int jj = 0; jj < CPT; ++jj) {
                const int key = kb + cg + 8 * jj;
                sc[i][jj] = key <= pos[i] ? sc[i][jj] * scale_log2 : attn_neg_inf();
                tmax = fmaxf(tmax, sc[i][jj]);
            }
#pragma unroll
            for (int off = 1; off < 8; off <<= 1)
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
            const float m_new = fmaxf(m[i], tmax);
            const float alpha = exp2f(m[i] - m_new);
            float psum = 0.f;
#pragma unroll
            for (int jj = 0; jj < CPT; ++jj) {
                const float p = exp2f(sc[i][jj] - m_new);
                p_s[(rg * RPT + i) * LDP + cg + 8 * jj] = p;
                psum += p;
            }
#pragma unroll
            for (int off = 1; off < 8; off <<= 1)
                psum += __shfl_xor_sync(0xffffffffu, psum, off);
            l[i] = l[i] * alpha + psum;
            m[i] = m_new;
#pragma unroll
            for (int e = 0; e < DCH * 8; ++e) acc[i][e] *= alpha;
        }
        __syncthreads();

        // acc += P · V for rows rg*4+i, dims chunks cg + 8*k.
#pragma unroll 4
        for (int j = 0; j < BK; ++j) {
            float pj[RPT];
#pragma unroll
            for (int i = 0; i < RPT; ++i) pj[i] = p_s[(rg * RPT + i) * LDP + j];
#pragma unroll
            for (int k = 0; k < DCH; ++k) {
                float vf[8];
                attn_unpack8(attn_load16(v_s + j * LD + (cg + 8 * k) * 8), vf);
#pragma unroll
                for (int i = 0; i < RPT; ++i)
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[i][k * 8 + e] += pj[i] * vf[e];
            }
        }
    }

#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int r = rg * RPT + i;
        if (r < qn) {
            const float inv = 1.f / l[i];
#pragma unroll
            for (int k = 0; k < DCH; ++k) {
                float outv[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) outv[e] = acc[i][k * 8 + e] * inv;
                *reinterpret_cast<uint4*>(o + (s0 + q0 + r) * QW + h * D + (cg + 8 * k) * 8) =
                    attn_pack8(outv);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_PREFILL_THREADS)
prefill_attention_d64(const half_t* __restrict__ q, const half_t* __restrict__ layer_kv,
                      int pages, const int* __restrict__ kv_pages,
                      const int* __restrict__ seg_start, const int* __restrict__ context_start,
                      const int* __restrict__ table_offset, half_t* __restrict__ o,
                      int num_heads, int num_kv_heads, int max_tiles, float scale_log2) {
    prefill_attention<64>(q, layer_kv, pages, kv_pages, seg_start, context_start, table_offset,
                          o, num_heads, num_kv_heads, max_tiles, scale_log2);
}

extern "C" __global__ void __launch_bounds__(ATTN_PREFILL_THREADS)
prefill_attention_d128(const half_t* __restrict__ q, const half_t* __restrict__ layer_kv,
                       int pages, const int* __restrict__ kv_pages,
                       const int* __restrict__ seg_start, const int* __restrict__ context_start,
                       const int* __restrict__ table_offset, half_t* __restrict__ o,
                       int num_heads, int num_kv_heads, int max_tiles, float scale_log2) {
    prefill_attention<128>(q, layer_kv, pages, kv_pages, seg_start, context_start, table_offset,
                           o, num_heads, num_kv_heads, max_tiles, scale_log2);
}
