// Small kernels the executor needs around the model: synthetic weights, adapter page
// scatter, dtype casts and row gathers.

// Uniform values in [-scale, scale) from a counter-based hash of (seed, index), so synthetic
// weights are reproducible, need no host copy, and any slice can be regenerated.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

extern "C" __global__ void fill_uniform_f16(half_t* out, long long n, unsigned long long seed,
                                            float scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        unsigned long long h = splitmix64(seed ^ (unsigned long long)i * 0xD6E8FEB86659FD93ull);
        float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 random bits in [0, 1)
        out[i] = f2h((2.0f * u - 1.0f) * scale);
    }
}

extern "C" __global__ void fill_constant_f16(half_t* out, long long n, float value) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    half_t v = f2h(value);
    for (; i < n; i += stride) out[i] = v;
}

// Copies staged adapter rows into pool pages. `staging` holds, for each layer and side
// (K = 0, V = 1), `n_pages` rows of `width` elements in page-list order; row r of (layer, side)
// goes to page `pages[r]` of that layer's side. One block per (row, layer*2+side).
extern "C" __global__ void scatter_rows(const half_t* staging, half_t* pool, const int* pages,
                                        int n_pages, int width, long long pool_pages) {
    int row = blockIdx.x;
    int layer_side = blockIdx.y;
    const half_t* src = staging + ((long long)layer_side * n_pages + row) * width;
    half_t* dst = pool + ((long long)layer_side * pool_pages + pages[row]) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void cast_f16_f32(const half_t* in, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = h2f(in[i]);
}

// out[r] = in[rows[r]] for rows of `width` elements.
extern "C" __global__ void gather_rows_f16(const half_t* in, const int* rows, half_t* out,
                                           int width) {
    const half_t* src = in + (long long)rows[blockIdx.x] * width;
    half_t* dst = out + (long long)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}
