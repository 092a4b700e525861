// S-LoRA's LoRA kernels over the unified page pool, for adapters of mixed ranks
// (README.md, "Unified pool on the device"):
//   shrink  v[t, i]  = sum_j x[t, j] * A[i, j]                 i < rank of t's adapter
//   expand  y[t, o] += scale * sum_i v[t, i] * B^T[i, o]
// Row i of A lives on the K side and row i of B^T on the V side of the pages
// adapter_pages[page_offset + i*slots + s], s = j / W (or o / W), column j % W (or o % W).
//
// MBGMV (decode, one token per request) is memory bound: every adapter row is read once, so
// the kernels are built around 16-byte coalesced loads with several in flight. It exists as
// two kernels (shrink, expand: the default) and, from sm_90, as one kernel over thread-block
// clusters (lora_mbgmv_fused; see DecodePath in src/ops/lora.rs for which is faster where).
// lora_mbgmv_shrink_multi / lora_mbgmv_expand_multi run the two-kernel path for up to three
// modules that share x (q, k, v of a layer) in one launch each.
// At small batches both are bound by launch and latency chains (tables -> page indices ->
// rows), not bandwidth, which is why table-independent loads (x, y) are issued first. MBGMM (prefill,
// a segment of tokens per adapter) is a gather GEMM: a tile of adapter rows is fetched once
// into shared memory and reused by every token of a token tile. It exists twice: on the CUDA
// cores in fp32 (lora_mbgmm_shrink / _expand, the baseline) and on tensor cores
// (lora_mbgmm_shrink_tc / _expand_tc, mma.sync, the executor's default; PrefillPath in
// src/ops/lora.rs). Both split the shrink's reduction into chunks whose partial sums
// lora_mbgmm_reduce adds in a fixed order: no kernel here uses float atomics, so a run's bits
// do not depend on the order blocks finish.
//
// No kernel pads compute to the largest rank of the batch: blocks whose rank rows do not exist
// exit at once, and inside a block only 16-row groups (prefill shrink) or 16-row chunks
// (prefill expand) that hold rows < rank are computed.
//
// Contract (src/ops/lora.rs): W, in and out are multiples of 8 (checked by the launch plans)
// and every pointer is 16-byte aligned (documented; a misaligned one faults), so a chunk of 8 fp16 starting at a multiple of 8 never
// crosses a page row and loads as one uint4; every product of the int index math below fits
// in int. The tables themselves are not trusted: an entry that would index out of bounds
// (rank > max_rank, page list past the end, page outside the pool, bad segment bounds) makes
// the kernel skip that request, segment or row instead of reading or writing out of bounds.

#define LORA_VEC 8  // fp16 elements per 16-byte load
#define LORA_MAX_MODULES 3  // modules of one multi-module MBGMV launch (q, k, v of a layer)

// MBGMV shrink: one block per (request, group of DS_ROWS rank rows); the block's threads split
// the `in` dimension in 8-element chunks, each thread loading one x chunk and reusing it for
// the DS_ROWS rows; two chunks per iteration put 2 * (DS_ROWS + 1) loads in flight per thread.
#define DS_ROWS 4
#define DS_THREADS 256
#define DS_WARPS (DS_THREADS / 32)

// MBGMV expand: one block per (request, tile of DE_TILE outputs). Lane l of every warp owns
// outputs [8l, 8l + 8) of the tile; warp w takes rank rows w, w + DE_WARPS, ... so that ranks
// up to DE_WARPS rows give every warp work; DE_UNROLL rows per warp are loaded before use.
#define DE_WARPS 4
#define DE_THREADS (DE_WARPS * 32)
#define DE_TILE (32 * LORA_VEC)
#define DE_UNROLL 4
#define DE_OUT_PER_THREAD (DE_TILE / DE_THREADS)  // outputs each thread adds to y at the end

// MBGMV fused (sm_90+): one thread-block cluster of DF_CLUSTER blocks per request. Block k of
// the cluster computes the partial shrink over its slice of `in` for every rank row, the
// partials are summed through distributed shared memory, and block k then computes the expand
// for output tiles k, k + DF_CLUSTER, ... One launch instead of two, and the B rows and y it
// will need are prefetched into L2 before the cluster barrier, so a small decode batch pays
// one latency chain (tables -> page indices -> rows) instead of two.
#define DF_CLUSTER 8
#define DF_WARPS 8
#define DF_THREADS (DF_WARPS * 32)
#define DF_TILE (32 * LORA_VEC)
#define DF_ROWS_PER_WARP 4  // rank rows a warp accumulates in one pass over its in-slice
#define DF_UNROLL 4

// MBGMM shrink: block = (token tiles, tile of PS_TR rank rows, segment). Thread (tm, tr),
// tm = tid / 16, tr = tid % 16, computes tokens 2tm, 2tm + 1 and rank rows tr + 16g, g < 4, so a
// 16-row group with no row < rank is skipped by the whole block.
#define PS_TM 32
#define PS_TR 64
#define PS_TK 64
#define PS_THREADS 256

// MBGMM expand: block = (token tiles, tile of PE_TN outputs, segment). Thread (ty, tx),
// ty = tid / 32 (one warp), tx = tid % 32, computes tokens 4ty.. 4ty + 3 and outputs
// 4tx.. 4tx + 3 of the tile; the rank dimension is walked in chunks of PE_TK rows, stopping at
// the segment's rank.
#define PE_TM 32
#define PE_TN 128
#define PE_TK 16
#define PE_THREADS 256

static_assert(DE_TILE % DE_THREADS == 0, "the expand epilogue splits the tile evenly");
static_assert(DF_THREADS == DF_TILE, "the fused epilogue gives one output per thread");
static_assert(PS_THREADS == PS_TM * (PS_TK / LORA_VEC), "one x chunk per thread per k tile");
static_assert(PS_THREADS == 16 * (PS_TM / 2), "16 rank lanes x PS_TM / 2 token pairs");
static_assert(PS_TR == 64, "four 16-row groups per rank tile");
static_assert(PE_THREADS == PE_TK * (PE_TN / LORA_VEC), "one B^T chunk per thread per k tile");
static_assert(PE_THREADS == 32 * (PE_TM / 4) && PE_TN == 32 * 4, "warp ty: 4 tokens, lane tx: 4 outputs");

__device__ __forceinline__ uint4 lora_ld16(const half_t* p) {
    // Read-only for the kernel's lifetime (pool, x, v): the non-coherent path is safe.
    return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ float lora_lo(unsigned int w) { return h2f((half_t)(w & 0xffffu)); }
__device__ __forceinline__ float lora_hi(unsigned int w) { return h2f((half_t)(w >> 16)); }

__device__ __forceinline__ unsigned int lora_pack(float lo, float hi) {
    return (unsigned int)f2h(lo) | ((unsigned int)f2h(hi) << 16);
}

__device__ __forceinline__ void lora_unpack8(uint4 d, float f[8]) {
    f[0] = lora_lo(d.x); f[1] = lora_hi(d.x);
    f[2] = lora_lo(d.y); f[3] = lora_hi(d.y);
    f[4] = lora_lo(d.z); f[5] = lora_hi(d.z);
    f[6] = lora_lo(d.w); f[7] = lora_hi(d.w);
}

__device__ __forceinline__ float lora_dot8(uint4 a, uint4 b, float acc) {
    acc = fmaf(lora_lo(a.x), lora_lo(b.x), acc); acc = fmaf(lora_hi(a.x), lora_hi(b.x), acc);
    acc = fmaf(lora_lo(a.y), lora_lo(b.y), acc); acc = fmaf(lora_hi(a.y), lora_hi(b.y), acc);
    acc = fmaf(lora_lo(a.z), lora_lo(b.z), acc); acc = fmaf(lora_hi(a.z), lora_hi(b.z), acc);
    acc = fmaf(lora_lo(a.w), lora_lo(b.w), acc); acc = fmaf(lora_hi(a.w), lora_hi(b.w), acc);
    return acc;
}

// Programmatic dependent launch (sm_90+; no-ops on older devices and when a kernel was launched
// without the attribute). The MBGMV expand is launched as the shrink's dependent: it may start
// once every shrink block has called lora_launch_dependents, and before lora_wait_prerequisite
// it reads only what was complete before the shrink started (the step's tables, the pool and an
// fp16 y), so its page lookups and first B rows are in flight while the shrink's last
// blocks run. v is read, and y written, only after the wait, which returns once the shrink has
// finished and its writes are visible. Every expand thread waits, also on its early exits, so
// the expand never finishes before the shrink and the next kernel of the stream sees both.
// The arithmetic is the classic launch's, so both give the same bits.
__device__ __forceinline__ void lora_launch_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void lora_wait_prerequisite() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The rank to use for table entry `idx` and, through `po`, where its page list starts; 0 for
// "no adapter" (page_offset -1) and for entries that would index out of bounds.
__device__ __forceinline__ int lora_entry(const int* __restrict__ page_offset,
                                          const int* __restrict__ rank, int idx, int max_rank,
                                          int slots, int num_adapter_pages, int* po) {
    const int p = page_offset[idx];
    const int r = rank[idx];
    if (p < 0 || r <= 0 || r > max_rank) return 0;
    // r * slots <= max_rank * slots, which the plan checked fits in int.
    if (p > num_adapter_pages - r * slots) return 0;
    *po = p;
    return r;
}

// Page index at adapter_pages[idx] (idx in bounds by lora_entry), or -1 when it names no page
// of the pool; a -1 row contributes zeros.
__device__ __forceinline__ int lora_page(const int* __restrict__ adapter_pages, int idx,
                                         int num_pages) {
    const int p = adapter_pages[idx];
    return (p >= 0 && p < num_pages) ? p : -1;
}

// ---------------------------------------------------------------------------------------------
// MBGMV (decode). The shrink and expand bodies are device functions of (request b, rank row
// group row0 / output tile tile0) so that the single-module kernels and the multi-module ones
// (q, k, v of a layer in one launch each) run the same code.
//
// Shrink body: rank rows [row0, row0 + DS_ROWS) of request b; block DS_THREADS, dynamic
// shared memory DS_ROWS * slots ints.
__device__ __forceinline__ void
lora_mbgmv_shrink_block(const half_t* __restrict__ x,            // [n, in]
                        const half_t* __restrict__ k_pool,       // [num_pages, W], K side
                        const int* __restrict__ adapter_pages,   // [num_adapter_pages]
                        const int* __restrict__ page_offset,     // [n]
                        const int* __restrict__ rank,            // [n]
                        float* __restrict__ v,                   // [n, max_rank]
                        int b, int row0,
                        int n, int in_features, int max_rank, int slots, int page_width,
                        int num_pages, int num_adapter_pages) {
    extern __shared__ int s_pages[];  // [DS_ROWS][slots]: this block's rows' page indices
    __shared__ float s_red[DS_WARPS][DS_ROWS];

    // The expand reads nothing this kernel writes before its own wait, so it may launch now.
    lora_launch_dependents();
    if (b >= n) return;
    const half_t* xb = x + b * in_features;
    const int chunks = in_features / LORA_VEC;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    // The first x chunks depend on nothing: issuing them before the table reads overlaps the
    // latencies (a decode batch is small enough for latency chains to dominate).
    uint4 x0 = threadIdx.x < chunks ? lora_ld16(xb + threadIdx.x * LORA_VEC) : zero;
    uint4 x1 = threadIdx.x + DS_THREADS < chunks ? lora_ld16(xb + (threadIdx.x + DS_THREADS) * LORA_VEC) : zero;
    int po = 0;
    const int r = lora_entry(page_offset, rank, b, max_rank, slots, num_adapter_pages, &po);
    if (row0 >= r) return;  // block-uniform: rows past this request's rank are not computed
    const int nrows = min(DS_ROWS, r - row0);

    // The page indices are fetched once per block, so the hot loop's loads depend on shared
    // memory rather than on a global load.
    for (int k = threadIdx.x; k < DS_ROWS * slots; k += DS_THREADS) {
        const int q = k / slots;
        const int s = k - q * slots;
        s_pages[k] = q < nrows ? lora_page(adapter_pages, po + (row0 + q) * slots + s, num_pages) : -1;
    }
    __syncthreads();

    const int page_chunks = page_width / LORA_VEC;
    float acc[DS_ROWS];
#pragma unroll
    for (int q = 0; q < DS_ROWS; ++q) acc[q] = 0.f;

    for (int c0 = threadIdx.x; c0 < chunks; c0 += 2 * DS_THREADS) {
        const int c1 = c0 + DS_THREADS;
        const bool has1 = c1 < chunks;
        const int s0 = c0 / page_chunks;
        const int col0 = (c0 - s0 * page_chunks) * LORA_VEC;
        const int s1 = c1 / page_chunks;
        const int col1 = (c1 - s1 * page_chunks) * LORA_VEC;
        if (c0 != (int)threadIdx.x) {  // the first pair was prefetched
            x0 = lora_ld16(xb + c0 * LORA_VEC);
            x1 = has1 ? lora_ld16(xb + c1 * LORA_VEC) : zero;
        }
        uint4 a0[DS_ROWS], a1[DS_ROWS];
#pragma unroll
        for (int q = 0; q < DS_ROWS; ++q) {
            a0[q] = zero;
            a1[q] = zero;
            if (q < nrows) {
                const int p0 = s_pages[q * slots + s0];
                if (p0 >= 0) a0[q] = lora_ld16(k_pool + p0 * page_width + col0);
                if (has1) {
                    const int p1 = s_pages[q * slots + s1];
                    if (p1 >= 0) a1[q] = lora_ld16(k_pool + p1 * page_width + col1);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < DS_ROWS; ++q) {
            acc[q] = lora_dot8(x0, a0[q], acc[q]);
            acc[q] = lora_dot8(x1, a1[q], acc[q]);
        }
    }

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int q = 0; q < DS_ROWS; ++q) {
        const float t = warp_sum(acc[q]);
        if (lane == 0) s_red[warp][q] = t;
    }
    __syncthreads();
    if (threadIdx.x < nrows) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < DS_WARPS; ++w) t += s_red[w][threadIdx.x];
        v[b * max_rank + row0 + threadIdx.x] = t;
    }
}

// Where the expand puts its result. Into fp16 y (the in-line path): y += scale * t, in place,
// rounded once. Into an f32 delta (the LoRA stream's; added later by split_qkv / add_rms_norm):
// delta = scale * t, written whole, zeros for a row without an adapter for the module, so the
// delta needs no zeroing before (a memset node on the LoRA stream's critical path every layer)
// and a stale value can never leak in. The multiply and the add are not fused, so the two paths
// give the same bits: f2h(y + (scale * t)) either way.
template <typename OutT> struct LoraOutMode;
template <> struct LoraOutMode<half_t> { static constexpr bool overwrite = false; };
template <> struct LoraOutMode<float> { static constexpr bool overwrite = true; };
__device__ __forceinline__ float lora_out_load(const half_t* p) { return h2f(*p); }
__device__ __forceinline__ void lora_out_store(half_t* p, float old, float add) {
    *p = f2h(__fadd_rn(old, add));
}
__device__ __forceinline__ void lora_out_store(float* p, float, float add) { *p = add; }

// One round of the expand's loads for a warp: rank rows i0 + u * DE_WARPS (u < DE_UNROLL) of
// the lane's output chunk (slot, col): their page indices (-1 past the rank or for a bad page)
// and B rows (zeros where the page is -1).
__device__ __forceinline__ void lora_expand_round(const half_t* __restrict__ v_pool,
                                                  const int* __restrict__ adapter_pages, int po,
                                                  int slots, int slot, int col, int page_width,
                                                  int num_pages, int r, int i0,
                                                  int p[DE_UNROLL], uint4 d[DE_UNROLL]) {
#pragma unroll
    for (int u = 0; u < DE_UNROLL; ++u) {
        const int i = i0 + u * DE_WARPS;
        p[u] = i < r ? lora_page(adapter_pages, po + i * slots + slot, num_pages) : -1;
    }
#pragma unroll
    for (int u = 0; u < DE_UNROLL; ++u)
        d[u] = p[u] >= 0 ? lora_ld16(v_pool + p[u] * page_width + col) : make_uint4(0u, 0u, 0u, 0u);
}

// Expand body: outputs [tile0, tile0 + DE_TILE) of request b; block DE_THREADS, no dynamic
// shared memory. OutT: half_t (y in place) or float (an f32 delta, overwritten: LoraOutMode).
template <typename OutT>
__device__ __forceinline__ void
lora_mbgmv_expand_block(const float* __restrict__ v,             // [n, max_rank], from the shrink
                        const half_t* __restrict__ v_pool,       // [num_pages, W], V side
                        const int* __restrict__ adapter_pages,
                        const int* __restrict__ page_offset,
                        const int* __restrict__ rank,
                        const float* __restrict__ scale,         // [n]
                        OutT* __restrict__ y,                    // [n, out], added to / overwritten
                        int b, int tile0,
                        int n, int out_features, int max_rank, int slots, int page_width,
                        int num_pages, int num_adapter_pages) {
    __shared__ __align__(16) float s_red[DE_WARPS][DE_TILE];

    if (b >= n) {
        lora_wait_prerequisite();
        return;
    }
    constexpr bool overwrite = LoraOutMode<OutT>::overwrite;
    // An fp16 y is read before the tables so that its latency overlaps theirs (and before the
    // wait: it was written before the shrink started). An f32 delta is not read at all.
    OutT* yb = y + b * out_features;
    float y_old[DE_OUT_PER_THREAD];
#pragma unroll
    for (int k = 0; k < DE_OUT_PER_THREAD; ++k) {
        const int o = tile0 + threadIdx.x + k * DE_THREADS;
        y_old[k] = 0.f;
        if constexpr (!overwrite) {
            if (o < out_features) y_old[k] = lora_out_load(yb + o);
        }
    }
    int po = 0;
    const int r = lora_entry(page_offset, rank, b, max_rank, slots, num_adapter_pages, &po);
    if (r == 0) {  // block-uniform: no adapter; y stays the base output, a delta is zero
        lora_wait_prerequisite();
        if constexpr (overwrite) {
#pragma unroll
            for (int k = 0; k < DE_OUT_PER_THREAD; ++k) {
                const int o = tile0 + threadIdx.x + k * DE_THREADS;
                if (o < out_features) yb[o] = 0.f;
            }
        }
        return;
    }
    const float sc = scale[b];

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int o0 = tile0 + lane * LORA_VEC;
    float acc[LORA_VEC];
#pragma unroll
    for (int e = 0; e < LORA_VEC; ++e) acc[e] = 0.f;

    // All 8 outputs of a lane's chunk lie in one slot (W % 8 == 0, o0 % 8 == 0).
    const bool active = o0 < out_features;
    const int slot = o0 / page_width;
    const int col = o0 - slot * page_width;
    int p[DE_UNROLL];
    uint4 d[DE_UNROLL];
    // The first round's page indices and B rows depend only on the tables and the pool, so
    // they are requested before the wait for v.
    if (active) lora_expand_round(v_pool, adapter_pages, po, slots, slot, col, page_width,
                                  num_pages, r, warp, p, d);
    lora_wait_prerequisite();
    if (active) {
        const float* vb = v + b * max_rank;
        for (int i0 = warp; i0 < r; i0 += DE_WARPS * DE_UNROLL) {
            if (i0 != warp)
                lora_expand_round(v_pool, adapter_pages, po, slots, slot, col, page_width,
                                  num_pages, r, i0, p, d);
            float vi[DE_UNROLL];
#pragma unroll
            for (int u = 0; u < DE_UNROLL; ++u) {
                const int i = i0 + u * DE_WARPS;
                vi[u] = i < r ? vb[i] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < DE_UNROLL; ++u) {
                if (p[u] < 0) continue;  // also keeps a poisoned v of a skipped row out
                float f[LORA_VEC];
                lora_unpack8(d[u], f);
#pragma unroll
                for (int e = 0; e < LORA_VEC; ++e) acc[e] = fmaf(vi[u], f[e], acc[e]);
            }
        }
    }

    float4* dst = reinterpret_cast<float4*>(&s_red[warp][lane * LORA_VEC]);
    dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    __syncthreads();

#pragma unroll
    for (int k = 0; k < DE_OUT_PER_THREAD; ++k) {
        const int ol = threadIdx.x + k * DE_THREADS;
        if (tile0 + ol < out_features) {
            float t = 0.f;
#pragma unroll
            for (int w = 0; w < DE_WARPS; ++w) t += s_red[w][ol];
            lora_out_store(yb + tile0 + ol, y_old[k], __fmul_rn(sc, t));
        }
    }
}

// Which (request b, rank-row group) this shrink block computes. Without a work list
// (work == nullptr) the grid is every request's ceil(max_rank / DS_ROWS) groups and block x is
// group x % groups of request x / groups. With one, the grid is the list's length and block x
// computes entry work[x] = b * groups + g: the host lists only the groups below each row's
// own rank, so a batch of mixed ranks launches no block that would exit at once (in a rank
// 8..64 batch about half of the full grid's). An entry out of range computes nothing.
__device__ __forceinline__ void lora_shrink_item(const int* __restrict__ work, int n, int groups,
                                                 int* b, int* row0) {
    const int e = work ? work[blockIdx.x] : (int)blockIdx.x;
    if (e < 0 || e >= n * groups) {  // n * groups: the full grid, which the plan fit in int
        *b = n;
        *row0 = 0;
        return;
    }
    *b = e / groups;
    *row0 = (e - *b * groups) * DS_ROWS;
}

// grid.x = n * ceil(max_rank / DS_ROWS), or the length of `work` (lora_shrink_item), block
// DS_THREADS, dynamic shared memory DS_ROWS * slots ints.
extern "C" __global__ void __launch_bounds__(DS_THREADS)
lora_mbgmv_shrink(const half_t* __restrict__ x,            // [n, in]
                  const half_t* __restrict__ k_pool,       // [num_pages, W], K side of the layer
                  const int* __restrict__ adapter_pages,   // [num_adapter_pages]
                  const int* __restrict__ page_offset,     // [n]
                  const int* __restrict__ rank,            // [n]
                  float* __restrict__ v,                   // [n, max_rank]
                  int n, int in_features, int max_rank, int slots, int page_width,
                  int num_pages, int num_adapter_pages,
                  const int* __restrict__ work) {          // [grid.x] or null
    const int groups = (max_rank + DS_ROWS - 1) / DS_ROWS;
    int b, row0;
    lora_shrink_item(work, n, groups, &b, &row0);
    lora_mbgmv_shrink_block(x, k_pool, adapter_pages, page_offset, rank, v, b, row0, n,
                            in_features, max_rank, slots, page_width, num_pages,
                            num_adapter_pages);
}

// grid.x = n * ceil(out / DE_TILE), block DE_THREADS, no dynamic shared memory.
template <typename OutT>
__device__ __forceinline__ void
lora_mbgmv_expand_grid(const float* __restrict__ v, const half_t* __restrict__ v_pool,
                       const int* __restrict__ adapter_pages, const int* __restrict__ page_offset,
                       const int* __restrict__ rank, const float* __restrict__ scale,
                       OutT* __restrict__ y, int n, int out_features, int max_rank, int slots,
                       int page_width, int num_pages, int num_adapter_pages) {
    const int tiles = (out_features + DE_TILE - 1) / DE_TILE;
    const int b = blockIdx.x / tiles;
    const int tile0 = (blockIdx.x - b * tiles) * DE_TILE;
    lora_mbgmv_expand_block(v, v_pool, adapter_pages, page_offset, rank, scale, y, b, tile0, n,
                            out_features, max_rank, slots, page_width, num_pages,
                            num_adapter_pages);
}

extern "C" __global__ void __launch_bounds__(DE_THREADS)
lora_mbgmv_expand(const float* __restrict__ v,             // [n, max_rank], from the shrink
                  const half_t* __restrict__ v_pool,       // [num_pages, W], V side of the layer
                  const int* __restrict__ adapter_pages,
                  const int* __restrict__ page_offset,
                  const int* __restrict__ rank,
                  const float* __restrict__ scale,         // [n]
                  half_t* __restrict__ y,                  // [n, out], added to in place
                  int n, int out_features, int max_rank, int slots, int page_width,
                  int num_pages, int num_adapter_pages) {
    lora_mbgmv_expand_grid(v, v_pool, adapter_pages, page_offset, rank, scale, y, n,
                           out_features, max_rank, slots, page_width, num_pages,
                           num_adapter_pages);
}

// The same into an f32 delta y [n, out] (overwritten with scale * t, unrounded; zeros for a row
// without an adapter).
extern "C" __global__ void __launch_bounds__(DE_THREADS)
lora_mbgmv_expand_f32(const float* __restrict__ v, const half_t* __restrict__ v_pool,
                      const int* __restrict__ adapter_pages, const int* __restrict__ page_offset,
                      const int* __restrict__ rank, const float* __restrict__ scale,
                      float* __restrict__ y, int n, int out_features, int max_rank, int slots,
                      int page_width, int num_pages, int num_adapter_pages) {
    lora_mbgmv_expand_grid(v, v_pool, adapter_pages, page_offset, rank, scale, y, n,
                           out_features, max_rank, slots, page_width, num_pages,
                           num_adapter_pages);
}

// Multi-module MBGMV: up to LORA_MAX_MODULES modules that share x (so `in`), the adapter page
// lists and the pool, e.g. q, k and v of a layer, in one shrink and one expand launch instead
// of one of each per module. Module m has its own tables (pom: where its rows start in the
// page lists, -1 = no adapter or an adapter that does not target it; rkm: rank; scm: scale),
// `slots` (slotsm), `out` (outm) and y (ym); modules >= count are never read (their pointers
// may be null). v is module-major, [count, n, max_rank]: module m's part [n, max_rank] is laid
// out as for the single-module kernels. Numerics are the single-module kernels' (same bodies).
//
// Shrink: grid (n * ceil(max_rank / DS_ROWS) or the length of `work`, count), block
// DS_THREADS, dynamic shared memory DS_ROWS * max(slots) ints; block (x, m) is the
// single-module shrink's block x for module m (one work list for all modules: the host lists
// each row's groups below its highest rank over the modules).
extern "C" __global__ void __launch_bounds__(DS_THREADS)
lora_mbgmv_shrink_multi(const half_t* __restrict__ x,          // [n, in]
                        const half_t* __restrict__ k_pool,     // [num_pages, W], K side
                        const int* __restrict__ adapter_pages, // [num_adapter_pages]
                        const int* __restrict__ po0,           // [n] each
                        const int* __restrict__ po1,
                        const int* __restrict__ po2,
                        const int* __restrict__ rk0,           // [n] each
                        const int* __restrict__ rk1,
                        const int* __restrict__ rk2,
                        float* __restrict__ v,                 // [count, n, max_rank]
                        int n, int in_features, int max_rank, int slots0, int slots1,
                        int slots2, int page_width, int num_pages, int num_adapter_pages,
                        int count,
                        const int* __restrict__ work) {        // [grid.x] or null
    const int m = blockIdx.y;
    if (m >= count || m >= LORA_MAX_MODULES) return;
    const int* page_offset = m == 0 ? po0 : (m == 1 ? po1 : po2);
    const int* rank = m == 0 ? rk0 : (m == 1 ? rk1 : rk2);
    const int slots = m == 0 ? slots0 : (m == 1 ? slots1 : slots2);
    const int groups = (max_rank + DS_ROWS - 1) / DS_ROWS;
    int b, row0;
    lora_shrink_item(work, n, groups, &b, &row0);
    // m * n * max_rank < count * n * max_rank, which the plan checked fits in int.
    lora_mbgmv_shrink_block(x, k_pool, adapter_pages, page_offset, rank, v + m * n * max_rank,
                            b, row0, n, in_features, max_rank, slots, page_width, num_pages,
                            num_adapter_pages);
}

// Expand: grid.x = n * (tiles0 + tiles1 + tiles2), tilesm = ceil(outm / DE_TILE) for m < count
// (0 otherwise), block DE_THREADS, no dynamic shared memory. Block b * tiles + t computes
// request b: tiles t < tiles0 are module 0's, the next tiles1 module 1's, the rest module 2's,
// so no block is launched for tiles past a narrower module's out.
template <typename OutT>
__device__ __forceinline__ void
lora_mbgmv_expand_multi_grid(const float* __restrict__ v,           // [count, n, max_rank]
                        const half_t* __restrict__ v_pool,     // [num_pages, W], V side
                        const int* __restrict__ adapter_pages,
                        const int* __restrict__ po0,           // [n] each
                        const int* __restrict__ po1,
                        const int* __restrict__ po2,
                        const int* __restrict__ rk0,           // [n] each
                        const int* __restrict__ rk1,
                        const int* __restrict__ rk2,
                        const float* __restrict__ sc0,         // [n] each
                        const float* __restrict__ sc1,
                        const float* __restrict__ sc2,
                        OutT* __restrict__ y0,                 // [n, out0], added to / overwritten
                        OutT* __restrict__ y1,                 // [n, out1]
                        OutT* __restrict__ y2,                 // [n, out2]
                        int n, int out0, int out1, int out2, int max_rank, int slots0,
                        int slots1, int slots2, int page_width, int num_pages,
                        int num_adapter_pages, int count) {
    const int tiles0 = (out0 + DE_TILE - 1) / DE_TILE;
    const int tiles1 = count > 1 ? (out1 + DE_TILE - 1) / DE_TILE : 0;
    const int tiles2 = count > 2 ? (out2 + DE_TILE - 1) / DE_TILE : 0;
    const int tiles = tiles0 + tiles1 + tiles2;
    if (tiles <= 0) return;
    const int b = blockIdx.x / tiles;
    int t = blockIdx.x - b * tiles;
    int m = 0;
    if (t >= tiles0) {
        t -= tiles0;
        m = 1;
        if (t >= tiles1) {
            t -= tiles1;
            m = 2;  // t < tiles2, so count > 2
        }
    }
    const int* page_offset = m == 0 ? po0 : (m == 1 ? po1 : po2);
    const int* rank = m == 0 ? rk0 : (m == 1 ? rk1 : rk2);
    const float* scale = m == 0 ? sc0 : (m == 1 ? sc1 : sc2);
    OutT* y = m == 0 ? y0 : (m == 1 ? y1 : y2);
    const int out_features = m == 0 ? out0 : (m == 1 ? out1 : out2);
    const int slots = m == 0 ? slots0 : (m == 1 ? slots1 : slots2);
    lora_mbgmv_expand_block(v + m * n * max_rank, v_pool, adapter_pages, page_offset, rank,
                            scale, y, b, t * DE_TILE, n, out_features, max_rank, slots,
                            page_width, num_pages, num_adapter_pages);
}


#define LORA_EXPAND_MULTI_PARAMS(OutT)                                                           \
    const float* __restrict__ v, const half_t* __restrict__ v_pool,                              \
        const int* __restrict__ adapter_pages, const int* __restrict__ po0,                      \
        const int* __restrict__ po1, const int* __restrict__ po2, const int* __restrict__ rk0,   \
        const int* __restrict__ rk1, const int* __restrict__ rk2, const float* __restrict__ sc0, \
        const float* __restrict__ sc1, const float* __restrict__ sc2, OutT* __restrict__ y0,     \
        OutT* __restrict__ y1, OutT* __restrict__ y2, int n, int out0, int out1, int out2,       \
        int max_rank, int slots0, int slots1, int slots2, int page_width, int num_pages,         \
        int num_adapter_pages, int count
#define LORA_EXPAND_MULTI_ARGS                                                                   \
    v, v_pool, adapter_pages, po0, po1, po2, rk0, rk1, rk2, sc0, sc1, sc2, y0, y1, y2, n, out0,  \
        out1, out2, max_rank, slots0, slots1, slots2, page_width, num_pages, num_adapter_pages,  \
        count

extern "C" __global__ void __launch_bounds__(DE_THREADS)
lora_mbgmv_expand_multi(LORA_EXPAND_MULTI_PARAMS(half_t)) {
    lora_mbgmv_expand_multi_grid(LORA_EXPAND_MULTI_ARGS);
}

// The same into f32 deltas y0..y2 (overwritten, unrounded; zeros for a row without an adapter
// for the module): the executor's LoRA stream.
extern "C" __global__ void __launch_bounds__(DE_THREADS)
lora_mbgmv_expand_multi_f32(LORA_EXPAND_MULTI_PARAMS(float)) {
    lora_mbgmv_expand_multi_grid(LORA_EXPAND_MULTI_ARGS);
}

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
// Thread-block clusters and distributed shared memory exist from sm_90 on; on older devices the
// module has no `lora_mbgmv_fused` and the host uses the two kernels above.

__device__ __forceinline__ unsigned int lora_cluster_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// Release/acquire: shared-memory writes before arrive are visible to the cluster after wait.
__device__ __forceinline__ void lora_cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}

__device__ __forceinline__ void lora_cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Reads `*p` (a shared-memory address of this block) from the same place in block `rank` of
// the cluster.
__device__ __forceinline__ float lora_ld_cluster(const float* p, unsigned int rank) {
    unsigned long long local;
    unsigned int remote;
    asm volatile("cvta.to.shared.u64 %0, %1;" : "=l"(local) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"((unsigned int)local), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

__device__ __forceinline__ void lora_prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

// grid.x = n * DF_CLUSTER (clusters of DF_CLUSTER consecutive blocks), block DF_THREADS,
// dynamic shared memory 2 * max_rank floats.
extern "C" __global__ void __cluster_dims__(DF_CLUSTER, 1, 1) __launch_bounds__(DF_THREADS)
lora_mbgmv_fused(const half_t* __restrict__ x,             // [n, in]
                 const half_t* __restrict__ k_pool,        // [num_pages, W]
                 const half_t* __restrict__ v_pool,        // [num_pages, W]
                 const int* __restrict__ adapter_pages,
                 const int* __restrict__ page_offset,      // [n]
                 const int* __restrict__ rank,             // [n]
                 const float* __restrict__ scale,          // [n]
                 float* __restrict__ v,                    // [n, max_rank]: v is also written
                 half_t* __restrict__ y,                   // [n, out], added to in place
                 int n, int in_features, int out_features, int max_rank, int slots,
                 int page_width, int num_pages, int num_adapter_pages) {
    extern __shared__ float s_dyn[];
    float* s_part = s_dyn;             // [max_rank]: this block's partial v over its in-slice
    float* s_v = s_dyn + max_rank;     // [max_rank]: the full v, summed over the cluster
    __shared__ __align__(16) float s_red[DF_WARPS][DF_TILE];

    const unsigned int crank = lora_cluster_rank();
    const int b = blockIdx.x / DF_CLUSTER;  // every block of a cluster has the same b
    if (b >= n) return;
    int po = 0;
    const int r = lora_entry(page_offset, rank, b, max_rank, slots, num_adapter_pages, &po);
    if (r == 0) return;  // cluster-uniform, so no block is left waiting at a cluster barrier
    const float sc = scale[b];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int tiles = (out_features + DF_TILE - 1) / DF_TILE;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    // Prefetch into L2 what the expand will read, so its loads overlap the shrink's.
    for (int t = crank; t < tiles; t += DF_CLUSTER) {
        const int o0 = t * DF_TILE + lane * LORA_VEC;
        if (o0 >= out_features) continue;
        const int slot = o0 / page_width;
        const int col = o0 - slot * page_width;
        if (warp == 0) lora_prefetch_l2(y + b * out_features + o0);
        for (int i = warp; i < r; i += DF_WARPS) {
            const int p = lora_page(adapter_pages, po + i * slots + slot, num_pages);
            if (p >= 0) lora_prefetch_l2(v_pool + p * page_width + col);
        }
    }

    // Shrink over this block's slice of `in`: warps split the rank rows (DF_ROWS_PER_WARP at a
    // time), lanes split the slice's 8-element chunks.
    const int chunks = in_features / LORA_VEC;
    const int per_block = (chunks + DF_CLUSTER - 1) / DF_CLUSTER;
    const int c_begin = (int)crank * per_block;
    const int c_end = min(chunks, c_begin + per_block);
    const int page_chunks = page_width / LORA_VEC;
    const half_t* xb = x + b * in_features;
    for (int i0 = warp; i0 < r; i0 += DF_WARPS * DF_ROWS_PER_WARP) {
        float acc[DF_ROWS_PER_WARP];
#pragma unroll
        for (int q = 0; q < DF_ROWS_PER_WARP; ++q) acc[q] = 0.f;
        for (int c = c_begin + lane; c < c_end; c += 32) {
            const uint4 xv = lora_ld16(xb + c * LORA_VEC);
            const int s = c / page_chunks;
            const int col = (c - s * page_chunks) * LORA_VEC;
            uint4 d[DF_ROWS_PER_WARP];
#pragma unroll
            for (int q = 0; q < DF_ROWS_PER_WARP; ++q) {
                const int i = i0 + q * DF_WARPS;
                d[q] = zero;
                if (i < r) {
                    const int p = lora_page(adapter_pages, po + i * slots + s, num_pages);
                    if (p >= 0) d[q] = lora_ld16(k_pool + p * page_width + col);
                }
            }
#pragma unroll
            for (int q = 0; q < DF_ROWS_PER_WARP; ++q) acc[q] = lora_dot8(xv, d[q], acc[q]);
        }
#pragma unroll
        for (int q = 0; q < DF_ROWS_PER_WARP; ++q) {
            const float t = warp_sum(acc[q]);
            const int i = i0 + q * DF_WARPS;
            if (lane == 0 && i < r) s_part[i] = t;  // row i belongs to warp i % DF_WARPS only
        }
    }

    lora_cluster_arrive();
    lora_cluster_wait();  // every block's s_part is complete and visible
    for (int i = threadIdx.x; i < r; i += DF_THREADS) {
        float t = 0.f;
        for (unsigned int k = 0; k < DF_CLUSTER; ++k) t += lora_ld_cluster(&s_part[i], k);
        s_v[i] = t;
        if (crank == 0) v[b * max_rank + i] = t;
    }
    // Done reading the other blocks' shared memory; the matching wait is at the very end, so
    // no block leaves (freeing its s_part) while another may still read it.
    lora_cluster_arrive();
    __syncthreads();  // s_v complete within the block

    for (int t = crank; t < tiles; t += DF_CLUSTER) {
        const int tile0 = t * DF_TILE;
        const int o0 = tile0 + lane * LORA_VEC;
        float acc[LORA_VEC];
#pragma unroll
        for (int e = 0; e < LORA_VEC; ++e) acc[e] = 0.f;
        if (o0 < out_features) {
            const int slot = o0 / page_width;
            const int col = o0 - slot * page_width;
            for (int i0 = warp; i0 < r; i0 += DF_WARPS * DF_UNROLL) {
                int p[DF_UNROLL];
#pragma unroll
                for (int u = 0; u < DF_UNROLL; ++u) {
                    const int i = i0 + u * DF_WARPS;
                    p[u] = i < r ? lora_page(adapter_pages, po + i * slots + slot, num_pages) : -1;
                }
                uint4 d[DF_UNROLL];
#pragma unroll
                for (int u = 0; u < DF_UNROLL; ++u)
                    d[u] = p[u] >= 0 ? lora_ld16(v_pool + p[u] * page_width + col) : zero;
#pragma unroll
                for (int u = 0; u < DF_UNROLL; ++u) {
                    if (p[u] < 0) continue;
                    const float vi = s_v[i0 + u * DF_WARPS];
                    float f[LORA_VEC];
                    lora_unpack8(d[u], f);
#pragma unroll
                    for (int e = 0; e < LORA_VEC; ++e) acc[e] = fmaf(vi, f[e], acc[e]);
                }
            }
        }
        float4* dst = reinterpret_cast<float4*>(&s_red[warp][lane * LORA_VEC]);
        dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        __syncthreads();
        const int o = tile0 + threadIdx.x;
        if (o < out_features) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < DF_WARPS; ++w) sum += s_red[w][threadIdx.x];
            half_t* yp = y + b * out_features + o;
            *yp = f2h(__fadd_rn(h2f(*yp), __fmul_rn(sc, sum)));
        }
        __syncthreads();  // s_red is reused by the next tile
    }
    lora_cluster_wait();
}
#endif  // __CUDA_ARCH__ >= 900

// ---------------------------------------------------------------------------------------------
// MBGMM (prefill). Segment s covers token rows seg_start[s] .. seg_start[s + 1].
// Shrink: grid (token-tile workers, ceil(max_rank / PS_TR) * k_splits, segments), block
// PS_THREADS. Token tiles are walked with a grid stride, so grid.x (from the longest segment)
// is only a degree of parallelism, never a bound on the tokens computed. The reduction over
// `in` is split into chunks of `k_chunk` (blockIdx.y / rank tiles picks one): a prompt of a
// few hundred tokens is otherwise only a dozen blocks, each streaming all of `in`. Chunk c's
// partial sums are stored (not added: no atomics, so a run's bits never depend on the order
// blocks finish) to part[c, token, rank]; with one chunk `part` is v itself, else
// lora_mbgmm_reduce sums the chunks in order into v.
extern "C" __global__ void __launch_bounds__(PS_THREADS)
lora_mbgmm_shrink(const half_t* __restrict__ x,            // [num_tokens, in]
                  const half_t* __restrict__ k_pool,
                  const int* __restrict__ adapter_pages,
                  const int* __restrict__ seg_start,       // [num_segments + 1]
                  const int* __restrict__ page_offset,     // [num_segments]
                  const int* __restrict__ rank,            // [num_segments]
                  float* __restrict__ part,                // [k_splits, num_tokens, max_rank]
                  int num_segments, int num_tokens, int in_features, int max_rank, int slots,
                  int page_width, int num_pages, int num_adapter_pages, int k_chunk) {
    // +1 column: thread tr reads row tr + 16g at one k, so rows must fall in distinct banks.
    __shared__ float s_x[PS_TM][PS_TK + 1];
    __shared__ float s_a[PS_TR][PS_TK + 1];

    const int seg = blockIdx.z;
    if (seg >= num_segments) return;
    int po = 0;
    const int r = lora_entry(page_offset, rank, seg, max_rank, slots, num_adapter_pages, &po);
    const int rank_tiles = (max_rank + PS_TR - 1) / PS_TR;
    const int rank0 = (blockIdx.y % rank_tiles) * PS_TR;
    if (rank0 >= r) return;
    const int split = blockIdx.y / rank_tiles;
    const int k_begin = split * k_chunk;
    const int k_end = min(in_features, k_begin + k_chunk);
    if (k_begin >= k_end) return;
    const int start = seg_start[seg];
    const int end = seg_start[seg + 1];
    if (start < 0 || end > num_tokens || end <= start) return;
    const int len = end - start;
    const int rows = min(PS_TR, r - rank0);  // rank rows of this tile that exist
    // (split + 1) * num_tokens * max_rank <= (k_splits + 1) * ..., which the plan checked fits.
    float* __restrict__ v = part + split * num_tokens * max_rank;
    const int groups = (rows + 15) / 16;     // 16-row groups computed; later ones are skipped

    const int tr = threadIdx.x & 15;
    const int tm = threadIdx.x >> 4;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    for (int tile = blockIdx.x; tile * PS_TM < len; tile += gridDim.x) {
        const int t0 = start + tile * PS_TM;
        const int tcount = min(PS_TM, end - t0);
        float acc[2][4];
#pragma unroll
        for (int q = 0; q < 2; ++q)
#pragma unroll
            for (int g = 0; g < 4; ++g) acc[q][g] = 0.f;

        for (int k0 = k_begin; k0 < k_end; k0 += PS_TK) {
            {
                // x tile: PS_TM rows x 8 chunks, one chunk per thread; 8 consecutive threads
                // read one row's 128 contiguous bytes.
                const int row = threadIdx.x >> 3;
                const int kc = (threadIdx.x & 7) * LORA_VEC;
                uint4 d = zero;
                if (row < tcount && k0 + kc < k_end)
                    d = lora_ld16(x + (t0 + row) * in_features + k0 + kc);
                float f[LORA_VEC];
                lora_unpack8(d, f);
#pragma unroll
                for (int e = 0; e < LORA_VEC; ++e) s_x[row][kc + e] = f[e];
            }
            // A tile: PS_TR rank rows x 8 chunks gathered from the pool; rows >= rank are
            // zeros (only their 16-row group's remainder is ever computed).
            for (int c = threadIdx.x; c < PS_TR * (PS_TK / LORA_VEC); c += PS_THREADS) {
                const int row = c >> 3;
                const int kc = (c & 7) * LORA_VEC;
                const int j = k0 + kc;
                uint4 d = zero;
                if (row < rows && j < k_end) {
                    const int s = j / page_width;
                    const int p = lora_page(adapter_pages, po + (rank0 + row) * slots + s, num_pages);
                    if (p >= 0) d = lora_ld16(k_pool + p * page_width + (j - s * page_width));
                }
                float f[LORA_VEC];
                lora_unpack8(d, f);
#pragma unroll
                for (int e = 0; e < LORA_VEC; ++e) s_a[row][kc + e] = f[e];
            }
            __syncthreads();
#pragma unroll 8
            for (int k = 0; k < PS_TK; ++k) {
                const float x0 = s_x[2 * tm][k];
                const float x1 = s_x[2 * tm + 1][k];
#pragma unroll
                for (int g = 0; g < 4; ++g) {
                    if (g < groups) {
                        const float a = s_a[tr + 16 * g][k];
                        acc[0][g] = fmaf(x0, a, acc[0][g]);
                        acc[1][g] = fmaf(x1, a, acc[1][g]);
                    }
                }
            }
            __syncthreads();
        }

#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int t = 2 * tm + q;
            if (t >= tcount) continue;
#pragma unroll
            for (int g = 0; g < 4; ++g) {
                const int i = tr + 16 * g;
                if (i < rows) v[(t0 + t) * max_rank + rank0 + i] = acc[q][g];
            }
        }
    }
}

// Expand: grid (token-tile workers, ceil(out / PE_TN), segments), block PE_THREADS.
extern "C" __global__ void __launch_bounds__(PE_THREADS)
lora_mbgmm_expand(const float* __restrict__ v,             // [num_tokens, max_rank]
                  const half_t* __restrict__ v_pool,
                  const int* __restrict__ adapter_pages,
                  const int* __restrict__ seg_start,
                  const int* __restrict__ page_offset,
                  const int* __restrict__ rank,
                  const float* __restrict__ scale,         // [num_segments]
                  half_t* __restrict__ y,                  // [num_tokens, out], added to in place
                  int num_segments, int num_tokens, int out_features, int max_rank, int slots,
                  int page_width, int num_pages, int num_adapter_pages) {
    __shared__ __align__(16) float s_b[PE_TK][PE_TN];
    __shared__ float s_v[PE_TM][PE_TK + 1];

    const int seg = blockIdx.z;
    if (seg >= num_segments) return;
    int po = 0;
    const int r = lora_entry(page_offset, rank, seg, max_rank, slots, num_adapter_pages, &po);
    if (r == 0) return;
    const int n0 = blockIdx.y * PE_TN;
    if (n0 >= out_features) return;
    const int start = seg_start[seg];
    const int end = seg_start[seg + 1];
    if (start < 0 || end > num_tokens || end <= start) return;
    const int len = end - start;
    const float sc = scale[seg];

    const int tx = threadIdx.x & 31;
    const int ty = threadIdx.x >> 5;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    for (int tile = blockIdx.x; tile * PE_TM < len; tile += gridDim.x) {
        const int t0 = start + tile * PE_TM;
        const int tcount = min(PE_TM, end - t0);
        float acc[4][4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[q][e] = 0.f;

        for (int k0 = 0; k0 < r; k0 += PE_TK) {
            {
                // B^T tile: PE_TK rank rows x PE_TN outputs, one 8-output chunk per thread;
                // 16 consecutive threads read one row's 256 contiguous bytes (within a page
                // when W >= 128 and aligned, else split at page boundaries, still 16-byte).
                const int kr = threadIdx.x >> 4;
                const int oc = (threadIdx.x & 15) * LORA_VEC;
                const int i = k0 + kr;
                const int o = n0 + oc;
                uint4 d = zero;
                if (i < r && o < out_features) {
                    const int s = o / page_width;
                    const int p = lora_page(adapter_pages, po + i * slots + s, num_pages);
                    if (p >= 0) d = lora_ld16(v_pool + p * page_width + (o - s * page_width));
                }
                float f[LORA_VEC];
                lora_unpack8(d, f);
                float4* dst = reinterpret_cast<float4*>(&s_b[kr][oc]);
                dst[0] = make_float4(f[0], f[1], f[2], f[3]);
                dst[1] = make_float4(f[4], f[5], f[6], f[7]);
            }
            for (int c = threadIdx.x; c < PE_TM * PE_TK; c += PE_THREADS) {
                const int tt = c / PE_TK;
                const int kk = c - tt * PE_TK;
                const int i = k0 + kk;
                s_v[tt][kk] = (tt < tcount && i < r) ? v[(t0 + tt) * max_rank + i] : 0.f;
            }
            __syncthreads();
            const int kmax = min(PE_TK, r - k0);  // block-uniform: no rows past the rank
            for (int k = 0; k < kmax; ++k) {
                const float4 bb = *reinterpret_cast<const float4*>(&s_b[k][4 * tx]);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float vv = s_v[4 * ty + q][k];  // one address per warp: broadcast
                    acc[q][0] = fmaf(vv, bb.x, acc[q][0]);
                    acc[q][1] = fmaf(vv, bb.y, acc[q][1]);
                    acc[q][2] = fmaf(vv, bb.z, acc[q][2]);
                    acc[q][3] = fmaf(vv, bb.w, acc[q][3]);
                }
            }
            __syncthreads();
        }

        const int o = n0 + 4 * tx;
        if (o < out_features) {  // out % 8 == 0: the 4 outputs exist together
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int t = 4 * ty + q;
                if (t >= tcount) continue;
                uint2* yp = reinterpret_cast<uint2*>(y + (t0 + t) * out_features + o);
                uint2 yy = *yp;
                yy.x = lora_pack(lora_lo(yy.x) + sc * acc[q][0], lora_hi(yy.x) + sc * acc[q][1]);
                yy.y = lora_pack(lora_lo(yy.y) + sc * acc[q][2], lora_hi(yy.y) + sc * acc[q][3]);
                *yp = yy;
            }
        }
    }
}

// v[e] = sum over chunks c < k_splits of part[c * count + e], in the order of c, for the
// count = num_tokens * max_rank entries of v: the split-K shrinks' partial sums, added the same
// way every run. Entries no shrink wrote (rank rows past a segment's rank, tokens without an
// adapter) come out as whatever the scratch held; no expand reads them. grid ceil(count / 256),
// block 256.
extern "C" __global__ void __launch_bounds__(256)
lora_mbgmm_reduce(const float* __restrict__ part, float* __restrict__ v, int count,
                  int k_splits) {
    const int e = blockIdx.x * 256 + threadIdx.x;
    if (e >= count) return;
    float sum = part[e];
    for (int c = 1; c < k_splits; ++c) sum += part[c * count + e];  // c * count < k_splits * count: checked
    v[e] = sum;
}

// ---------------------------------------------------------------------------------------------
// MBGMM on tensor cores (sm_80+): the same two products as above with mma.sync m16n8k16 (fp16
// inputs, f32 accumulation). The SIMT kernels above are bound by their shared-memory loads (one
// per two FMAs) at about 8 TFLOP/s; these stage the same tiles and feed them to tensor cores.
// Warp w of a block computes 16 tokens (rows 16w..16w+15 of the block's token tile); n-tiles of
// 8 rank rows (shrink) past the segment's rank are not computed.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), g = lane / 4, q = lane % 4, each register two
// fp16 (lower k in the low half): a0 = A[g][2q..], a1 = A[g+8][2q..], a2 = A[g][2q+8..],
// a3 = A[g+8][2q+8..]; b0 = B[2q..][g], b1 = B[2q+8..][g]; c0, c1 = C[g][2q, 2q+1],
// c2, c3 = C[g+8][2q, 2q+1].
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)

#define TS_TM 64                 // tokens per shrink tile (4 warps x 16)
#define TS_TR 64                 // rank rows per shrink tile (8 n-tiles)
#define TS_TK 64                 // inputs per shared-memory stage
#define TS_THREADS 128
#define TS_LD (TS_TK + 8)        // row stride in halves: 144 bytes, so the fragment loads of a
                                 // warp (8 rows x 4 words) hit 32 distinct banks
#define TS_CHUNKS (TS_TM * (TS_TK / LORA_VEC) / TS_THREADS)  // 16-byte loads per thread per stage

#define TE_TM 64                 // tokens per expand tile
#define TE_TN 64                 // outputs per expand tile (8 n-tiles)
#define TE_TK 64                 // rank rows staged at a time
#define TE_THREADS 128
#define TE_LDB (TE_TN + 8)
#define TE_LDV (TE_TK + 8)

static_assert(TS_TM == TS_TR, "x and A tiles are staged by the same loop");
static_assert(TS_CHUNKS * TS_THREADS == TS_TM * (TS_TK / LORA_VEC), "stages split evenly");
static_assert(TE_THREADS / 32 * 16 == TE_TM && TS_THREADS / 32 * 16 == TS_TM, "16 tokens a warp");

__device__ __forceinline__ void lora_mma16816(float c[4], const unsigned int a[4],
                                              const unsigned int b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned int lora_ld_s32(const half_t* p) {
    return *reinterpret_cast<const unsigned int*>(p);
}

// Shrink: grid, split-K chunks and outputs as lora_mbgmm_shrink (token tiles of TS_TM, rank
// tiles of TS_TR), block TS_THREADS, no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(TS_THREADS)
lora_mbgmm_shrink_tc(const half_t* __restrict__ x,            // [num_tokens, in]
                     const half_t* __restrict__ k_pool,
                     const int* __restrict__ adapter_pages,
                     const int* __restrict__ seg_start,       // [num_segments + 1]
                     const int* __restrict__ page_offset,     // [num_segments]
                     const int* __restrict__ rank,            // [num_segments]
                     float* __restrict__ part,                // [k_splits, num_tokens, max_rank]
                     int num_segments, int num_tokens, int in_features, int max_rank,
                     int slots, int page_width, int num_pages, int num_adapter_pages,
                     int k_chunk) {
    __shared__ __align__(16) half_t s_x[TS_TM * TS_LD];
    __shared__ __align__(16) half_t s_a[TS_TR * TS_LD];

    const int seg = blockIdx.z;
    if (seg >= num_segments) return;
    int po = 0;
    const int r = lora_entry(page_offset, rank, seg, max_rank, slots, num_adapter_pages, &po);
    const int rank_tiles = (max_rank + TS_TR - 1) / TS_TR;
    const int rank0 = (blockIdx.y % rank_tiles) * TS_TR;
    if (rank0 >= r) return;
    const int split = blockIdx.y / rank_tiles;
    const int k_begin = split * k_chunk;
    const int k_end = min(in_features, k_begin + k_chunk);
    if (k_begin >= k_end) return;
    const int start = seg_start[seg];
    const int end = seg_start[seg + 1];
    if (start < 0 || end > num_tokens || end <= start) return;
    const int len = end - start;
    const int rows = min(TS_TR, r - rank0);
    const int ntiles = (rows + 7) / 8;  // block-uniform: n-tiles holding rank rows < r
    float* __restrict__ v = part + split * num_tokens * max_rank;

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int q = lane & 3;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    for (int tile = blockIdx.x; tile * TS_TM < len; tile += gridDim.x) {
        const int t0 = start + tile * TS_TM;
        const int tcount = min(TS_TM, end - t0);

        // One stage = TS_CHUNKS 16-byte chunks of x and of A per thread; the next stage's are
        // loaded into registers while the tensor cores work on this one.
        uint4 rx[TS_CHUNKS], ra[TS_CHUNKS];
        auto load_stage = [&](int k0) {
#pragma unroll
            for (int u = 0; u < TS_CHUNKS; ++u) {
                const int c = threadIdx.x + u * TS_THREADS;
                const int row = c >> 3;
                const int j = k0 + (c & 7) * LORA_VEC;
                rx[u] = zero;
                ra[u] = zero;
                if (j < k_end) {
                    if (row < tcount) rx[u] = lora_ld16(x + (t0 + row) * in_features + j);
                    if (row < rows) {
                        const int s = j / page_width;
                        const int p = lora_page(adapter_pages, po + (rank0 + row) * slots + s, num_pages);
                        if (p >= 0) ra[u] = lora_ld16(k_pool + p * page_width + (j - s * page_width));
                    }
                }
            }
        };

        float acc[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

        load_stage(k_begin);
        for (int k0 = k_begin; k0 < k_end; k0 += TS_TK) {
            __syncthreads();  // the previous stage's fragments have been read
#pragma unroll
            for (int u = 0; u < TS_CHUNKS; ++u) {
                const int c = threadIdx.x + u * TS_THREADS;
                const int off = (c >> 3) * TS_LD + (c & 7) * LORA_VEC;
                *reinterpret_cast<uint4*>(&s_x[off]) = rx[u];
                *reinterpret_cast<uint4*>(&s_a[off]) = ra[u];
            }
            __syncthreads();
            if (k0 + TS_TK < k_end) load_stage(k0 + TS_TK);
            const half_t* xw = s_x + warp * 16 * TS_LD;
#pragma unroll
            for (int kk = 0; kk < TS_TK; kk += 16) {
                unsigned int a[4];
                a[0] = lora_ld_s32(xw + g * TS_LD + kk + 2 * q);
                a[1] = lora_ld_s32(xw + (g + 8) * TS_LD + kk + 2 * q);
                a[2] = lora_ld_s32(xw + g * TS_LD + kk + 2 * q + 8);
                a[3] = lora_ld_s32(xw + (g + 8) * TS_LD + kk + 2 * q + 8);
#pragma unroll
                for (int n = 0; n < 8; ++n) {
                    if (n < ntiles) {
                        // B[k][i] = A[i][k]: column i of B is row i of A, contiguous in k.
                        const half_t* an = s_a + (n * 8 + g) * TS_LD + kk + 2 * q;
                        const unsigned int b[2] = {lora_ld_s32(an), lora_ld_s32(an + 8)};
                        lora_mma16816(acc[n], a, b);
                    }
                }
            }
        }

#pragma unroll
        for (int n = 0; n < 8; ++n) {
            const int i = n * 8 + 2 * q;  // rank row within the tile of c0 / c2
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int t = warp * 16 + g + 8 * h;
                if (n >= ntiles || t >= tcount) continue;
                float* vt = v + (t0 + t) * max_rank + rank0;
                if (i < rows) vt[i] = acc[n][2 * h];
                if (i + 1 < rows) vt[i + 1] = acc[n][2 * h + 1];
            }
        }
    }
}

// Expand: grid (token-tile workers, ceil(out / TE_TN), segments), block TE_THREADS, no dynamic
// shared memory. v is rounded to fp16 for the tensor cores (as transformers + peft compute the
// whole product in fp16); the sum is scaled and added to y with the same two operations as the
// MBGMV expand.
extern "C" __global__ void __launch_bounds__(TE_THREADS)
lora_mbgmm_expand_tc(const float* __restrict__ v,             // [num_tokens, max_rank]
                     const half_t* __restrict__ v_pool,
                     const int* __restrict__ adapter_pages,
                     const int* __restrict__ seg_start,
                     const int* __restrict__ page_offset,
                     const int* __restrict__ rank,
                     const float* __restrict__ scale,         // [num_segments]
                     half_t* __restrict__ y,                  // [num_tokens, out], added to
                     int num_segments, int num_tokens, int out_features, int max_rank,
                     int slots, int page_width, int num_pages, int num_adapter_pages) {
    __shared__ __align__(16) half_t s_b[TE_TK * TE_LDB];  // [rank row][output]
    __shared__ __align__(16) half_t s_v[TE_TM * TE_LDV];  // [token][rank row]

    const int seg = blockIdx.z;
    if (seg >= num_segments) return;
    int po = 0;
    const int r = lora_entry(page_offset, rank, seg, max_rank, slots, num_adapter_pages, &po);
    if (r == 0) return;
    const int n0 = blockIdx.y * TE_TN;
    if (n0 >= out_features) return;
    const int start = seg_start[seg];
    const int end = seg_start[seg + 1];
    if (start < 0 || end > num_tokens || end <= start) return;
    const int len = end - start;
    const float sc = scale[seg];

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int q = lane & 3;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    for (int tile = blockIdx.x; tile * TE_TM < len; tile += gridDim.x) {
        const int t0 = start + tile * TE_TM;
        const int tcount = min(TE_TM, end - t0);
        float acc[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

        for (int k0 = 0; k0 < r; k0 += TE_TK) {
            const int kr = min(TE_TK, r - k0);  // rank rows of this stage; the rest are zeros
            __syncthreads();  // the previous stage's fragments have been read
            for (int c = threadIdx.x; c < TE_TK * (TE_TN / LORA_VEC); c += TE_THREADS) {
                const int row = c >> 3;
                const int oc = (c & 7) * LORA_VEC;
                const int o = n0 + oc;
                uint4 d = zero;
                if (row < kr && o < out_features) {
                    const int s = o / page_width;
                    const int p = lora_page(adapter_pages, po + (k0 + row) * slots + s, num_pages);
                    if (p >= 0) d = lora_ld16(v_pool + p * page_width + (o - s * page_width));
                }
                *reinterpret_cast<uint4*>(&s_b[row * TE_LDB + oc]) = d;
            }
            for (int c = threadIdx.x; c < TE_TM * TE_TK; c += TE_THREADS) {
                const int tt = c / TE_TK;
                const int kk = c - tt * TE_TK;
                const float e = (tt < tcount && kk < kr) ? v[(t0 + tt) * max_rank + k0 + kk] : 0.f;
                s_v[tt * TE_LDV + kk] = f2h(e);
            }
            __syncthreads();
            const half_t* vw = s_v + warp * 16 * TE_LDV;
            const int ksteps = (kr + 15) / 16;
            for (int ks = 0; ks < ksteps; ++ks) {
                const int kk = ks * 16;
                unsigned int a[4];
                a[0] = lora_ld_s32(vw + g * TE_LDV + kk + 2 * q);
                a[1] = lora_ld_s32(vw + (g + 8) * TE_LDV + kk + 2 * q);
                a[2] = lora_ld_s32(vw + g * TE_LDV + kk + 2 * q + 8);
                a[3] = lora_ld_s32(vw + (g + 8) * TE_LDV + kk + 2 * q + 8);
                const half_t* b0 = s_b + (kk + 2 * q) * TE_LDB + g;
#pragma unroll
                for (int n = 0; n < 8; ++n) {
                    // B[k][o] = B^T row k, column o: two rows per register, so two 16-bit loads.
                    const half_t* bn = b0 + n * 8;
                    const unsigned int b[2] = {
                        (unsigned int)bn[0] | ((unsigned int)bn[TE_LDB] << 16),
                        (unsigned int)bn[8 * TE_LDB] | ((unsigned int)bn[9 * TE_LDB] << 16)};
                    lora_mma16816(acc[n], a, b);
                }
            }
        }

#pragma unroll
        for (int n = 0; n < 8; ++n) {
            const int o = n0 + n * 8 + 2 * q;  // out % 8 == 0: o and o + 1 exist together
            if (o >= out_features) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int t = warp * 16 + g + 8 * h;
                if (t >= tcount) continue;
                unsigned int* yp = reinterpret_cast<unsigned int*>(y + (t0 + t) * out_features + o);
                const unsigned int yy = *yp;
                const unsigned int lo = f2h(__fadd_rn(lora_lo(yy), __fmul_rn(sc, acc[n][2 * h])));
                const unsigned int hi = f2h(__fadd_rn(lora_hi(yy), __fmul_rn(sc, acc[n][2 * h + 1])));
                *yp = lo | (hi << 16);
            }
        }
    }
}
#endif  // __CUDA_ARCH__ >= 800
