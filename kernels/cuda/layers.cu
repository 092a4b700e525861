// Per-token layers of the Llama forward pass: embedding lookup, RMSNorm (plain and fused with
// the residual add), rotary position embedding, SiLU-gated MLP activation, residual add.
//
// Numerics follow HF transformers' Llama in fp16 exactly where it rounds: every point where
// PyTorch materialises an fp16 tensor we round with f2h (round to nearest even), everything in
// between is f32. The CPU references in src/ops/layers.rs mirror each rounding step.
//
// All kernels are memory-bound. Rows are read with 16-byte (8 x fp16) loads when the row
// length is a multiple of 8 and every pointer is 16-byte aligned; the check is done in the
// kernel because a CudaView may start at any element offset. The scalar path is the fallback.
//
// Launch shapes come from the plans in src/ops/layers.rs: block sizes are multiples of 32 and
// at most 1024 (block_sum relies on both).

#define LAYERS_CHUNK_THREADS 256
// Elements handled by one block of the elementwise kernels: 256 threads x 8 fp16.
#define LAYERS_CHUNK (LAYERS_CHUNK_THREADS * 8)

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// 8 consecutive fp16 values as one 16-byte transaction. Element 0 is the low half of .x
// (little-endian), matching the memory order.
__device__ __forceinline__ void load8(const half_t* p, half_t h[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    h[0] = (half_t)(u.x & 0xffffu); h[1] = (half_t)(u.x >> 16);
    h[2] = (half_t)(u.y & 0xffffu); h[3] = (half_t)(u.y >> 16);
    h[4] = (half_t)(u.z & 0xffffu); h[5] = (half_t)(u.z >> 16);
    h[6] = (half_t)(u.w & 0xffffu); h[7] = (half_t)(u.w >> 16);
}

__device__ __forceinline__ void store8(half_t* p, const half_t h[8]) {
    uint4 u;
    u.x = (unsigned)h[0] | ((unsigned)h[1] << 16);
    u.y = (unsigned)h[2] | ((unsigned)h[3] << 16);
    u.z = (unsigned)h[4] | ((unsigned)h[5] << 16);
    u.w = (unsigned)h[6] | ((unsigned)h[7] << 16);
    *reinterpret_cast<uint4*>(p) = u;
}

// Sum over the block; every thread gets the result. blockDim.x: a multiple of 32, <= 1024.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        float w = lane < warps ? partial[lane] : 0.0f;
        w = warp_sum(w);
        // Lane 0 overwrites partial[0] only after every lane of warp 0 has read its entry
        // (warp_sum's shuffles synchronise the warp).
        if (lane == 0) partial[0] = w;
    }
    __syncthreads();
    const float total = partial[0];
    // A later call must not overwrite partial[] before every thread has read the total.
    __syncthreads();
    return total;
}

// HF LlamaRMSNorm's last two steps: `weight * (h * rsqrt(var + eps)).to(fp16)`: the normalised
// value is rounded to fp16 before the fp16 multiply, whose exact product is rounded again.
__device__ __forceinline__ half_t norm_scale(half_t x, half_t w, float inv_rms) {
    return f2h(h2f(f2h(h2f(x) * inv_rms)) * h2f(w));
}

// Second pass of both norms: `src` is the row to normalise (x, or the updated residual).
__device__ __forceinline__ void write_normalised(const half_t* src, const half_t* __restrict__ w,
                                                 half_t* __restrict__ out, int hidden,
                                                 float inv_rms, bool vec) {
    if (vec) {
        for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
            half_t xs[8], ws[8], os[8];
            load8(src + i, xs);
            load8(w + i, ws);
#pragma unroll
            for (int k = 0; k < 8; ++k) os[k] = norm_scale(xs[k], ws[k], inv_rms);
            store8(out + i, os);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            out[i] = norm_scale(src[i], w[i], inv_rms);
        }
    }
}

// out[t] = rms_norm(x[t]) * w. One block per row; grid.x = tokens.
// The row is read twice (sum of squares, then normalise); the second read hits L1/L2 (a 4096
// row is 8 KiB), which costs less than holding a variable-length row in registers.
extern "C" __global__ void rms_norm(const half_t* __restrict__ x, const half_t* __restrict__ w,
                                    half_t* __restrict__ out, int hidden, float eps) {
    const long long row = blockIdx.x;
    const half_t* xr = x + row * hidden;
    half_t* outr = out + row * hidden;
    const bool vec = (hidden & 7) == 0 && aligned16(x) && aligned16(w) && aligned16(out);
    float ss = 0.0f;
    if (vec) {
        for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
            half_t xs[8];
            load8(xr + i, xs);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float f = h2f(xs[k]);
                ss += f * f;
            }
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const float f = h2f(xr[i]);
            ss += f * f;
        }
    }
    // variance = mean(h^2) in f32, then rsqrt(variance + eps), as HF does.
    const float inv_rms = rsqrtf(block_sum(ss) / (float)hidden + eps);
    write_normalised(xr, w, outr, hidden, inv_rms, vec);
}

// residual[t] += x[t] (rounded to fp16: HF adds two fp16 tensors), then
// out[t] = rms_norm(residual[t]) * w. One block per row; grid.x = tokens.
// Each thread re-reads in pass two exactly the residual elements it wrote in pass one, so no
// synchronisation is needed between the write and the read.
//
// When delta (f32) is not null, rows t >= delta_row0 first take
// x[t] = f16(x[t] + delta[t - delta_row0]): the o projection's LoRA delta of the decode rows,
// computed on a second stream while the o GEMM runs, added where the in-line expand adds it
// (to the projection's output, before the residual) with the same operations, so the same bits.
extern "C" __global__ void add_rms_norm(half_t* __restrict__ residual, const half_t* __restrict__ x,
                                        const half_t* __restrict__ w, half_t* __restrict__ out,
                                        int hidden, float eps, const float* __restrict__ delta,
                                        int delta_row0) {
    const long long row = blockIdx.x;
    half_t* rr = residual + row * hidden;
    const half_t* xr = x + row * hidden;
    half_t* outr = out + row * hidden;
    const float* dr = delta != nullptr && row >= delta_row0
                           ? delta + (row - delta_row0) * hidden
                           : nullptr;
    const bool vec = (hidden & 7) == 0 && aligned16(residual) && aligned16(x) && aligned16(w) &&
                     aligned16(out) && (dr == nullptr || aligned16(dr));
    float ss = 0.0f;
    if (vec) {
        for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
            half_t rs[8], xs[8];
            load8(rr + i, rs);
            load8(xr + i, xs);
            if (dr != nullptr) {
                const float4 d0 = reinterpret_cast<const float4*>(dr + i)[0];
                const float4 d1 = reinterpret_cast<const float4*>(dr + i)[1];
                const float ds[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
                for (int k = 0; k < 8; ++k) xs[k] = f2h(__fadd_rn(h2f(xs[k]), ds[k]));
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                rs[k] = f2h(h2f(rs[k]) + h2f(xs[k]));
                const float f = h2f(rs[k]);
                ss += f * f;
            }
            store8(rr + i, rs);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const half_t xi = dr != nullptr ? f2h(__fadd_rn(h2f(xr[i]), dr[i])) : xr[i];
            const half_t s = f2h(h2f(rr[i]) + h2f(xi));
            rr[i] = s;
            const float f = h2f(s);
            ss += f * f;
        }
    }
    const float inv_rms = rsqrtf(block_sum(ss) / (float)hidden + eps);
    write_normalised(rr, w, outr, hidden, inv_rms, vec);
}

// out[t] = table[ids[t]]. grid = (tokens, ceil(hidden / LAYERS_CHUNK)), block = 256.
// An id outside [0, vocab) reads nothing: its row is written as zeros and *bad_ids is
// incremented once per such token, so the executor (which validates ids on the host anyway)
// can still detect it after the step.
extern "C" __global__ void embedding(const int* __restrict__ ids, const half_t* __restrict__ table,
                                     half_t* __restrict__ out, int* __restrict__ bad_ids,
                                     int hidden, int vocab) {
    const long long row = blockIdx.x;
    const int id = ids[row];
    const bool valid = id >= 0 && id < vocab;
    if (!valid && blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(bad_ids, 1);
    const half_t* src = table + (long long)(valid ? id : 0) * hidden;
    half_t* dst = out + row * hidden;
    const int begin = blockIdx.y * LAYERS_CHUNK;
    const bool vec = (hidden & 7) == 0 && aligned16(table) && aligned16(out);
    if (vec) {
        const int i = begin + threadIdx.x * 8;
        if (i < hidden) {
            if (valid) {
                *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(src + i);
            } else {
                *reinterpret_cast<uint4*>(dst + i) = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    } else {
        const int end = min(hidden, begin + LAYERS_CHUNK);
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
            dst[i] = valid ? src[i] : (half_t)0;
        }
    }
}

// In place on q [T, nh*d] and k [T, nkv*d]; one block per token (grid.x = tokens).
// HF Llama (rotate-half convention): inv_freq[i] = 1 / theta^(2i/d) in f32,
// freq = pos * inv_freq[i], cos/sin in f32 then cast to fp16 (HF casts them to the activation
// dtype), and q_embed = q*cos + rotate_half(q)*sin with every fp16 product and the sum rounded
// separately, exactly as the three fp16 tensor ops of apply_rotary_pos_emb do. For i < d/2:
//   out[i]       = f16(f16(x[i] * c) + f16(-x[i+d/2] * s))
//   out[i + d/2] = f16(f16(x[i+d/2] * c) + f16(x[i] * s))
// (emb = cat(freqs, freqs), so cos/sin at i + d/2 equal those at i.) The products of two fp16
// values are exact in f32, so each f2h is the single rounding PyTorch does. One thread owns
// the pair (i, i + d/2) of one head, reads both before writing: no race in place.
// Thread p of the block handles pair p % (d/2) of head p / (d/2) (q heads, then k heads), so
// a warp touches consecutive elements.
extern "C" __global__ void rope(half_t* __restrict__ q, half_t* __restrict__ k,
                                const int* __restrict__ positions, int num_heads,
                                int num_kv_heads, int head_dim, float theta) {
    const long long t = blockIdx.x;
    const int half_dim = head_dim >> 1;
    const float pos = (float)positions[t];
    const int pairs = (num_heads + num_kv_heads) * half_dim;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half_dim;
        const int i = p - head * half_dim;
        half_t* x = head < num_heads
                        ? q + (t * num_heads + head) * head_dim
                        : k + (t * num_kv_heads + (head - num_heads)) * head_dim;
        // Recomputed per head rather than shared: a few transcendental ops per pair are cheap
        // next to the memory traffic, and this keeps the block shape free of head_dim.
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        float s, c;
        sincosf(pos * inv_freq, &s, &c);
        const float ch = h2f(f2h(c));
        const float sh = h2f(f2h(s));
        const float x1 = h2f(x[i]);
        const float x2 = h2f(x[i + half_dim]);
        x[i] = f2h(h2f(f2h(x1 * ch)) + h2f(f2h(-x2 * sh)));
        x[i + half_dim] = f2h(h2f(f2h(x2 * ch)) + h2f(f2h(x1 * sh)));
    }
}

// HF: act_fn(gate) * up in fp16: SiLU computed in f32 (PyTorch's x / (1 + exp(-x))), rounded
// to fp16, then the fp16 product (exact in f32, rounded once).
__device__ __forceinline__ half_t silu_times(half_t g, half_t u) {
    const float gf = h2f(g);
    const half_t act = f2h(gf / (1.0f + expf(-gf)));
    return f2h(h2f(act) * h2f(u));
}

// gate_up [T, 2I] (gate = columns [0, I), up = [I, 2I) of each row) -> out [T, I].
// grid = (tokens, ceil(I / LAYERS_CHUNK)), block = 256: several blocks per row, so that decode
// batches of a few tokens still fill the GPU.
extern "C" __global__ void silu_mul(const half_t* __restrict__ gate_up, half_t* __restrict__ out,
                                    int inter) {
    const long long row = blockIdx.x;
    const half_t* g = gate_up + row * 2 * inter;
    const half_t* u = g + inter;
    half_t* o = out + row * inter;
    const int begin = blockIdx.y * LAYERS_CHUNK;
    const bool vec = (inter & 7) == 0 && aligned16(gate_up) && aligned16(out);
    if (vec) {
        const int j = begin + threadIdx.x * 8;
        if (j < inter) {
            half_t gs[8], us[8], os[8];
            load8(g + j, gs);
            load8(u + j, us);
#pragma unroll
            for (int k = 0; k < 8; ++k) os[k] = silu_times(gs[k], us[k]);
            store8(o + j, os);
        }
    } else {
        const int end = min(inter, begin + LAYERS_CHUNK);
        for (int j = begin + threadIdx.x; j < end; j += blockDim.x) o[j] = silu_times(g[j], u[j]);
    }
}

// x[i] += y[i] for i < n, rounded to fp16. grid = ceil(n / LAYERS_CHUNK), block = 256.
extern "C" __global__ void add(half_t* __restrict__ x, const half_t* __restrict__ y, int n) {
    const long long begin = (long long)blockIdx.x * LAYERS_CHUNK;
    const bool vec = (n & 7) == 0 && aligned16(x) && aligned16(y);
    if (vec) {
        const long long i = begin + threadIdx.x * 8;
        if (i < n) {
            half_t xs[8], ys[8];
            load8(x + i, xs);
            load8(y + i, ys);
#pragma unroll
            for (int k = 0; k < 8; ++k) xs[k] = f2h(h2f(xs[k]) + h2f(ys[k]));
            store8(x + i, xs);
        }
    } else {
        const long long end = min((long long)n, begin + LAYERS_CHUNK);
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
            x[i] = f2h(h2f(x[i]) + h2f(y[i]));
        }
    }
}

// qkv [T, qw + 2 kvw] (one fused q/k/v GEMM's output: q columns, then k, then v) -> q [T, qw],
// k [T, kvw], v [T, kvw]. grid = (tokens, ceil((qw + 2 kvw) / LAYERS_CHUNK)), block = 256.
// With every width a multiple of 8 a 16-byte chunk never straddles two outputs.
//
// When dq is not null, rows r >= delta_row0 also get the decode rows' LoRA deltas (f32) added:
// q[r] = f16(qkv[r, q cols] + dq[r - delta_row0]) (dk, dv alike): the very operations, so the
// very bits, of the LoRA expand adding in place (lora_out_store in lora.cu). The deltas are
// computed on a second stream while the q/k/v GEMM runs (see GpuExecutor::forward), so adding
// them here costs no launch of its own.
extern "C" __global__ void split_qkv(const half_t* __restrict__ qkv, half_t* __restrict__ q,
                                     half_t* __restrict__ k, half_t* __restrict__ v, int qw,
                                     int kvw, const float* __restrict__ dq,
                                     const float* __restrict__ dk,
                                     const float* __restrict__ dv, int delta_row0) {
    const long long row = blockIdx.x;
    const int total = qw + 2 * kvw;
    const half_t* src = qkv + row * total;
    const int begin = blockIdx.y * LAYERS_CHUNK;
    const bool with_delta = dq != nullptr && row >= delta_row0;
    const long long drow = row - delta_row0;
    const bool vec = (qw & 7) == 0 && (kvw & 7) == 0 && aligned16(qkv) && aligned16(q) &&
                     aligned16(k) && aligned16(v) &&
                     (dq == nullptr || (aligned16(dq) && aligned16(dk) && aligned16(dv)));
    if (vec) {
        const int j = begin + threadIdx.x * 8;
        if (j < total) {
            half_t* dst = j < qw ? q + row * qw + j
                        : j < qw + kvw ? k + row * kvw + (j - qw)
                                       : v + row * kvw + (j - qw - kvw);
            if (with_delta) {
                const float* d = j < qw ? dq + drow * qw + j
                               : j < qw + kvw ? dk + drow * kvw + (j - qw)
                                              : dv + drow * kvw + (j - qw - kvw);
                half_t xs[8];
                load8(src + j, xs);
                const float4 d0 = reinterpret_cast<const float4*>(d)[0];
                const float4 d1 = reinterpret_cast<const float4*>(d)[1];
                const float ds[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) xs[e] = f2h(__fadd_rn(h2f(xs[e]), ds[e]));
                store8(dst, xs);
            } else {
                *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src + j);
            }
        }
    } else {
        const int end = min(total, begin + LAYERS_CHUNK);
        for (int j = begin + threadIdx.x; j < end; j += blockDim.x) {
            half_t* dst = j < qw ? q + row * qw + j
                        : j < qw + kvw ? k + row * kvw + (j - qw)
                                       : v + row * kvw + (j - qw - kvw);
            if (with_delta) {
                const float* d = j < qw ? dq + drow * qw + j
                               : j < qw + kvw ? dk + drow * kvw + (j - qw)
                                              : dv + drow * kvw + (j - qw - kvw);
                *dst = f2h(__fadd_rn(h2f(src[j]), *d));
            } else {
                *dst = src[j];
            }
        }
    }
}
