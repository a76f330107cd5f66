// varlen.cu: the small kernels of the serving layouts in the CuPy layer (issue 16).
//
// The packed attention itself is rung v9's us_fa3_fwd_varlen (attention_hopper.cu); here,
// version table (one version of each kernel):
//
// | kernel               | T                            | what                                      |
// |----------------------|------------------------------|-------------------------------------------|
// | us_merge_states<T>   | __half, __nv_bfloat16, float | merge two partial attention states over   |
// |                      |                              | disjoint key sets (cascade, split-KV)     |
// | us_pool_varlen<T>    | __half, __nv_bfloat16, float | composite tokens (SPEC 3) of a packed     |
// |                      |                              | ragged batch, read through cu_seqlens     |
//
// us_merge_states: out_a, out_b [rows, D] (element type T), lse_a, lse_b [rows] float32; with
//   hi = max(lse_a, lse_b), lo = min(lse_a, lse_b), w = exp(lo - hi) in [0, 1]
//   out = (out_hi + w out_lo) / (1 + w),   lse = hi + log1p(w)
// (unisparse_ref/reference/merge.py; float32 arithmetic, out rounded to T). A row empty on one
// side (lse = -inf, out = 0, SPEC 6) gets w = exp(-inf) = 0: the other side's out and lse
// exactly (out_hi * 1 / 1 is out_hi bit for bit; hi + log1p(0) = hi). Both sides empty:
// out = 0, lse = -inf, without ever forming -inf - (-inf). One thread per output element
// (row, d), grid-stride; consecutive threads take consecutive d (coalesced).
//
// us_pool_varlen: x [total, H, D] packed (sequence b is rows cu[b] .. cu[b+1]-1), cu_out =
// packed_offsets(cu, c) (sequence b's composite rows start at cu_out[b]); out [cu_out[batch],
// H / c_h, D] float32:
//   out[cu_out[b] + r, g, d] = (1/c_h) sum_{h in group g} (1/n_r) sum_{t in group r of b} x[cu[b] + t, h, d]
// the arithmetic of us_pool_seq (pooling.cu) in the same order, so a sequence's composite
// tokens are bit for bit those of pooling it alone. No group crosses a sequence boundary: the
// last group of a sequence averages only its own n_r = min(c, N_b - r c) tokens. As
// us_pool_seq, one thread per V = 16/sizeof(T) outputs (composite row, g, d .. d+V-1) with one
// 16-byte load per token when D is a multiple of V and x is 16-byte aligned (us_pool_vector;
// every element's sums in the same order as one output per thread, else one output per thread);
// the sequence of a composite row is found by a binary search over cu_out. Grid-stride.
#include "common.cuh"

#ifndef US_VARLEN_THREADS
#define US_VARLEN_THREADS 256
#endif

template <typename T>
__global__ void __launch_bounds__(US_VARLEN_THREADS)
us_merge_states(const T* __restrict__ out_a, const float* __restrict__ lse_a, const T* __restrict__ out_b,
                const float* __restrict__ lse_b, T* __restrict__ out, float* __restrict__ lse, long long rows,
                int D) {
    const long long n = rows * D;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / D;
        const int d = (int)(i % D);
        const float la = lse_a[r], lb = lse_b[r];
        const float ninf = -INFINITY;
        if (la == ninf && lb == ninf) {  // no key on either side
            out[i] = us::from_float<T>(0.0f);
            if (d == 0) lse[r] = ninf;
            continue;
        }
        const bool a_hi = la >= lb;
        const float hi = a_hi ? la : lb, lo = a_hi ? lb : la;
        const float o_hi = us::to_float(a_hi ? out_a[i] : out_b[i]);
        const float o_lo = us::to_float(a_hi ? out_b[i] : out_a[i]);
        const float w = expf(lo - hi);  // 0 when lo = -inf: the other side exactly
        out[i] = us::from_float<T>((o_hi + w * o_lo) / (1.0f + w));
        if (d == 0) lse[r] = hi + log1pf(w);
    }
}

template <typename T>
__global__ void __launch_bounds__(US_VARLEN_THREADS)
us_pool_varlen(const T* __restrict__ x, const int* __restrict__ cu, const int* __restrict__ cu_out,
               float* __restrict__ out, int batch, int H, int D, int c, int c_h) {
    constexpr int V = (int)(16 / sizeof(T));  // 8 halves or 4 floats per 16-byte load
    const int per = us_pool_vector(x, D) ? V : 1;  // outputs (consecutive d) per thread
    const int Hout = H / c_h, Dv = D / per;
    const long long total_out = (long long)cu_out[batch] * Hout * Dv;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total_out;
         i += (long long)gridDim.x * blockDim.x) {
        const int d0 = (int)(i % Dv) * per;
        const int g = (int)((i / Dv) % Hout);
        const int row = (int)(i / ((long long)Dv * Hout));  // packed composite row
        // The sequence b with cu_out[b] <= row < cu_out[b + 1] (empty sequences have
        // cu_out[b] == cu_out[b + 1] and are skipped by the search).
        int lo = 0, hi = batch - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (cu_out[mid] <= row) lo = mid; else hi = mid - 1;
        }
        const int b = lo;
        const int r = row - cu_out[b];
        const int N = cu[b + 1] - cu[b];
        const int t0 = r * c;
        const int t1 = min(t0 + c, N);
        const float inv_n = 1.0f / (float)(t1 - t0);
        const long long stride = (long long)H * D;  // between consecutive tokens
        float acc[V];
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = 0.0f;
        for (int hh = 0; hh < c_h; ++hh) {
            const int h = g * c_h + hh;
            us_pool_head<T>(x + ((long long)cu[b] * H + h) * D + d0, stride, t0, t1, per, inv_n, acc);
        }
        us_pool_store<T>(out + ((long long)row * Hout + g) * D + d0, acc, per, c_h);
    }
}
