// pooling.cu: composite tokens (SPEC section 3), the first stage of the CuPy layer.
//
// Computes, in float32 with float32 accumulation, for an input x [B, H, N, D] (C-contiguous,
// element type T) and pooling factors c (sequence) and c_h (heads):
//
//   out[b, g, r, d] = (1/c_h) * sum_{h = g*c_h}^{(g+1)*c_h - 1}
//                       (1/n_r) * sum_{t = r*c}^{min((r+1)*c, N) - 1} x[b, h, t, d]
//
// with n_r = min((r+1)*c, N) - r*c tokens in group r (the last group averages only the
// tokens that exist), r < R = ceil(N/c), g < H/c_h. Queries use (c, c_h) = (c_q, c_h) and
// give Qh [B, Hq/c_h, R, D]; keys use (c_k, 1) and give Kc [B, Hkv, C, D]. Sequence means
// are taken first, then the head mean, as in the reference (the two means commute).
//
// Version table
// | kernel          | T                               | thread mapping                         |
// |-----------------|---------------------------------|----------------------------------------|
// | us_pool_seq<T>  | __half, __nv_bfloat16, float    | one thread per V = 16/sizeof(T)        |
// |                 |                                 | outputs (r, d..d+V-1), one 16-byte     |
// |                 |                                 | load per token (when D % V == 0 and x  |
// |                 |                                 | is 16-byte aligned; else one output    |
// |                 |                                 | per thread); grid.y = b*(H/c_h) + g    |
// | us_pool_keys_   | __half, __nv_bfloat16, float    | as us_pool_seq (c_h = 1), over the     |
// | sinks<T>        |                                 | t + C output columns                   |
//
// us_pool_keys_sinks<T> (research variant sink_tokens = t > 0, not SPEC; the reference's
// pool_keys_with_sinks): keys [B, Hkv, Nk, D] -> [B, Hkv, t + C, D], columns 0 .. t-1 the keys
// 0 .. t-1 themselves (zeros past Nk), column t + c the mean of keys [lo_c, min((c+1)*c_k, Nk))
// with lo_0 = t and lo_c = c*c_k otherwise (zeros when composite 0 is empty). With t = 0 the
// backend launches us_pool_seq instead (no extra cost on the SPEC path).
//
// Tile defaults (override with -D): US_POOL_THREADS threads per block.
#include "common.cuh"

#ifndef US_POOL_THREADS
#define US_POOL_THREADS 256
#endif

// us_pool_v16, us_pool_elem and us_pool_vector (the 16-byte loads) are in common.cuh: varlen.cu's
// us_pool_varlen shares them.
template <typename T>
__global__ void __launch_bounds__(US_POOL_THREADS)
us_pool_seq(const T* __restrict__ x, float* __restrict__ out, int H, int N, int D, int c, int c_h) {
    constexpr int V = (int)(16 / sizeof(T));  // 8 halves or 4 floats per 16-byte load
    const int per = us_pool_vector(x, D) ? V : 1;  // outputs (consecutive d) per thread
    const int R = us::cdiv(N, c);
    const int Hout = H / c_h;
    const int bg = blockIdx.y;              // b * Hout + g
    const int b = bg / Hout, g = bg % Hout;
    const int Dv = D / per;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // r * Dv + d / per
    if (idx >= (long long)R * Dv) return;
    const int r = (int)(idx / Dv), d0 = (int)(idx % Dv) * per;
    const int t0 = r * c;
    const int t1 = min(t0 + c, N);
    const float inv_n = 1.0f / (float)(t1 - t0);
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.0f;
    for (int hh = 0; hh < c_h; ++hh) {
        const int h = g * c_h + hh;
        us_pool_head<T>(x + (((long long)b * H + h) * N) * D + d0, D, t0, t1, per, inv_n, acc);  // tokens D apart
    }
    us_pool_store<T>(out + ((long long)bg * R + r) * D + d0, acc, per, c_h);
}

template <typename T>
__global__ void __launch_bounds__(US_POOL_THREADS)
us_pool_keys_sinks(const T* __restrict__ x, float* __restrict__ out, int N, int D, int c, int t) {
    const int W = t + us::cdiv(N, c);
    const int bh = blockIdx.y;              // b * H + h
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // j * D + d
    if (idx >= (long long)W * D) return;
    const int j = (int)(idx / D), d = (int)(idx % D);
    const T* col = x + ((long long)bh * N) * D + d;
    float v = 0.0f;
    if (j < t) {
        v = j < N ? us::to_float(col[(long long)j * D]) : 0.0f;   // a sink key, un-pooled
    } else {
        const int cc = j - t;
        const int t0 = cc == 0 ? t : cc * c, t1 = min((cc + 1) * c, N);
        float s = 0.0f;
        for (int u = t0; u < t1; ++u) s += us::to_float(col[(long long)u * D]);
        v = t1 > t0 ? s * (1.0f / (float)(t1 - t0)) : 0.0f;
    }
    out[((long long)bh * W + j) * D + d] = v;
}
