// Shared by every kernel file (prepended by the Rust side before NVRTC compiles a module).
// NVRTC ships no cuda_fp16.h without the toolkit's include folder, so fp16/bf16 values travel
// as raw 16-bit patterns and are converted with single PTX instructions.
typedef unsigned short half_t;   // IEEE fp16 bits
typedef unsigned short bf16_t;   // bfloat16 bits

__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_t f2h(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
