// selection.cu: top-P block selection with forced sink and local blocks (SPEC section 5).
//
// For every row (b, g, i) of scores [B, Hm, nQb, nKb] (T = float or double, >= 0):
//   visible(j)  = causal ? j*S <= p_last(i) : true,   p_last(i) = p(min((i+1)*S, Nq) - 1)
//               (a prefix j < nvis of the row: nvis = floor(p_last/S) + 1 when causal)
//   d(i)        = p_last(i) / S                         (the diagonal block)
//   F           = ({0 .. n_sink-1} U {d-n_local+1 .. d}) ∩ visible     (forced, always kept)
//   m0          = sum of scores[j] for j in F, added in ascending j, in double
//   candidates  = visible \ F, ordered by score descending, ties by lower j first
//   mode 0 ("total", SPEC):   m = m0; while m < P: take the next candidate, m += its score
//   mode 1 ("remaining", research variant of issue 15): target = P * (T - m0), T the sum of
//               the visible scores in ascending j; m = 0; while m < target: take, m += score
//   (the candidate carrying m past the target is kept). P >= 1 keeps every visible block.
// This is the reference's selection (unisparse_ref/reference/selection.py) with its float64
// additions in its order, so the mask equals the reference's bit for bit on the same scores.
//
// How one thread block does a row in parallel and still gives the sequential answer:
//   1. the visible candidates are loaded as sort keys into shared memory (forced and invisible
//      slots get a pad key that sorts last) and bitonic-sorted, NP = next power of two >= nvis;
//      for float scores the key is one 64-bit word (score bits << 32 | ~j: nonnegative float
//      bits order like the values, ~j puts the lower j first on ties), for double a (bits, j)
//      pair;
//   2. the running masses before each sorted candidate, m_k = base + s_1 + ... + s_(k-1), are
//      a block-wide exclusive scan in double (each thread adds its chunk in order, then a
//      warp-shuffle scan of the chunk sums). The scan adds in another order than the reference,
//      so a computed m_k may differ from the reference's sequential m_k by rounding: both are
//      within gamma_n * A of the exact sum (A = m0 + the candidates' mass, n <= NP), so the two
//      differ by less than tol = 8 (NP + 64) u A (u = 2^-53, a generous bound). A candidate
//      whose m_k lies farther than tol from the target is decided the same way by both;
//   3. if some m_k lies within tol of the target (a borderline row: practically never on real
//      scores, often on hand-made ties), thread 0 walks the sorted keys sequentially in the
//      reference's exact order of additions instead. Either way the mask is the reference's.
// Outputs: mask bool [B, Hm, nQb, nKb]; optionally (non-null pointers) the FlexAttention
// index form kv_counts int32 [B, Hm, nQb] and kv_indices int32 [B, Hm, nQb, nKb]
// (ascending, padded with -1), written with a warp-ballot scan over the kept flags.
//
// Version table
// | kernel                 | T             | grid         | block          | dynamic shared         |
// |------------------------|---------------|--------------|----------------|------------------------|
// | us_select_topp<T>      | float, double | (rows, 1, 1) | 32..SEL_THREADS| NP*key + nKb (+pad)    |
// | us_mask_to_indices     | -             | (rows, 1, 1) | 32..SEL_THREADS| nKb                    |
// rows = B*Hm*nQb, NP = next power of two >= nKb, key = 8 bytes (float) or 16 bytes (double);
// block = clamp(NP/4, 32, US_SEL_THREADS) threads, a multiple of 32 (selection.py
// launch_config). Version 1 (one thread walking every row sequentially after the sort, and a
// sequential scan over 256 chunk counts for the index form) took 0.11 / 0.30 / 4.2 ms at
// 8K / 32K / 128K tokens (Hm = 32, S = 128) on the H200.
#include "common.cuh"

#ifndef US_SEL_THREADS
#define US_SEL_THREADS 256
#endif
#define US_SEL_WARPS (US_SEL_THREADS / 32)

// Sort keys: "before" is the selection order (score descending, lower j first on ties).
template <typename T> struct SelKey;

template <> struct SelKey<float> {
    typedef unsigned long long K;
    static __device__ __forceinline__ K make(float s, int j) {
        return ((K)__float_as_uint(s) << 32) | (K)(0xFFFFFFFFu - (unsigned)j);
    }
    static __device__ __forceinline__ K pad() { return 0ull; }  // below every (score >= 0, j) key
    static __device__ __forceinline__ bool before(K a, K b) { return a > b; }
    static __device__ __forceinline__ bool is_pad(K a) { return a == 0ull; }
    static __device__ __forceinline__ double score(K a) { return (double)__uint_as_float((unsigned)(a >> 32)); }
    static __device__ __forceinline__ int id(K a) { return (int)(0xFFFFFFFFu - (unsigned)(a & 0xFFFFFFFFull)); }
};

struct SelKeyD {
    unsigned long long b;  // bits of a nonnegative double: ordered like the values
    int j;
};

template <> struct SelKey<double> {
    typedef SelKeyD K;
    static __device__ __forceinline__ K make(double s, int j) {
        K k;
        k.b = (unsigned long long)__double_as_longlong(s);
        k.j = j;
        return k;
    }
    static __device__ __forceinline__ K pad() {
        K k;
        k.b = 0ull;
        k.j = 0x7FFFFFFF;  // after every real j on the tie with a 0.0 score
        return k;
    }
    static __device__ __forceinline__ bool before(K a, K b) { return a.b > b.b || (a.b == b.b && a.j < b.j); }
    static __device__ __forceinline__ bool is_pad(K a) { return a.j == 0x7FFFFFFF; }
    static __device__ __forceinline__ double score(K a) { return __longlong_as_double((long long)a.b); }
    static __device__ __forceinline__ int id(K a) { return a.j; }
};

// -0.0 has the sign bit set and would sort first as bits; it is the same score as +0.0.
__device__ __forceinline__ float us_canon(float s) { return s == 0.0f ? 0.0f : s; }
__device__ __forceinline__ double us_canon(double s) { return s == 0.0 ? 0.0 : s; }

__device__ __forceinline__ int us_next_pow2(int n) {
    int p = 1;
    while (p < n) p <<= 1;
    return p;
}

// Write kv_counts[row] and kv_indices[row, :] from keep[0..n) (n <= nKb; flags past n are 0):
// rounds of blockDim.x consecutive j, a warp ballot gives each kept j its place inside the
// warp, the warps' counts (shared memory) its place in the round. Coalesced writes, ascending.
__device__ __forceinline__ void us_write_indices(const unsigned char* keep, int n, int nKb, long long row,
                                                 int* kv_counts, int* kv_indices) {
    __shared__ int warp_cnt[US_SEL_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int nthreads = blockDim.x, nwarps = nthreads >> 5;
    int* out = kv_indices + row * nKb;
    int base = 0;
    for (int j0 = 0; j0 < n; j0 += nthreads) {
        const int j = j0 + tid;
        const bool f = j < n && keep[j] != 0;
        const unsigned bal = __ballot_sync(0xffffffffu, f);
        if (lane == 0) warp_cnt[w] = __popc(bal);
        __syncthreads();  // every warp's count of this round is visible before the offsets are summed
        int off = base, tot = 0;
        for (int x = 0; x < nwarps; ++x) {
            const int c = warp_cnt[x];
            off += x < w ? c : 0;
            tot += c;
        }
        if (f) out[off + __popc(bal & ((1u << lane) - 1u))] = j;
        base += tot;
        __syncthreads();  // warp_cnt is rewritten by the next round
    }
    if (tid == 0) kv_counts[row] = base;
    for (int j = base + tid; j < nKb; j += nthreads) out[j] = -1;
}

// One thread block per row (b, g, i), row = (b*Hm + g)*nQb + i; blockDim.x a multiple of 32,
// at most US_SEL_THREADS. threshold_mode: 0 "total" (SPEC), 1 "remaining".
template <typename T>
__global__ void __launch_bounds__(US_SEL_THREADS)
us_select_topp(const T* __restrict__ scores, bool* __restrict__ mask, int* __restrict__ kv_counts,
               int* __restrict__ kv_indices, int nQb, int nKb, int nq, int nk, int S, int n_sink, int n_local,
               int causal, double P, int threshold_mode) {
    typedef SelKey<T> SK;
    typedef typename SK::K K;
    extern __shared__ __align__(16) unsigned char dyn_raw[];
    const int NPmax = us_next_pow2(nKb);
    K* key = reinterpret_cast<K*>(dyn_raw);                                 // [NPmax] sort keys
    unsigned char* keep = dyn_raw + (size_t)NPmax * sizeof(K);              // [nKb] 1 = selected
    __shared__ double warp_sum[US_SEL_WARPS];
    __shared__ double m0_s;

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int nthreads = blockDim.x, nwarps = nthreads >> 5;
    const long long row = blockIdx.x;
    const int i = (int)(row % nQb);
    const T* s = scores + row * nKb;

    const long long p_last = us::qpos(min((long long)(i + 1) * S, (long long)nq) - 1, nq, nk);
    // floor division (p_last < 0 happens only when non-causal with Nq > Nk), as Python's //
    const long long d = p_last >= 0 ? p_last / S : -((-p_last + S - 1) / S);
    // Visible blocks are the prefix j < nvis.
    const int nvis = !causal ? nKb : (p_last < 0 ? 0 : (int)min((long long)nKb, p_last / S + 1));
    const bool all = P >= 1.0;
    const int NP = us_next_pow2(max(nvis, 1));

    for (int j = tid; j < nKb; j += nthreads) {
        const bool vis = j < nvis;
        const bool forced = vis && (j < n_sink || (j <= d && j > d - n_local));
        keep[j] = all ? (vis ? 1 : 0) : (forced ? 1 : 0);
        if (!all && j < NP) key[j] = (vis && !forced) ? SK::make(us_canon(s[j]), j) : SK::pad();
    }
    if (!all) {
        for (int j = nKb + tid; j < NP; j += nthreads) key[j] = SK::pad();  // (NP <= NPmax, nKb < NP)
        if (tid == 0) {
            // m0: the forced scores added in ascending j (the sink range, then the local range
            // from where the sink range ended), as the reference's cumsum over the row.
            double m0 = 0.0;
            const int js = min(n_sink, nvis);
            for (int j = 0; j < js; ++j) m0 += us::to_double(s[j]);
            const long long jl0 = max(max(d - n_local + 1, 0LL), (long long)js);
            const long long jl1 = min(d, (long long)nvis - 1);
            for (long long j = jl0; j <= jl1; ++j) m0 += us::to_double(s[j]);
            m0_s = m0;
        }
    }
    __syncthreads();  // keys, keep flags and m0 are complete before the sort reads them

    if (!all) {
        // Bitonic sort of key[0..NP) into "before" order; p enumerates the NP/2 pairs (t, t + jj).
        for (int kk = 2; kk <= NP; kk <<= 1) {
            for (int jj = kk >> 1; jj > 0; jj >>= 1) {
                for (int p = tid; p < (NP >> 1); p += nthreads) {
                    const int t = 2 * p - (p & (jj - 1));
                    const int u = t + jj;
                    const K a = key[t], b = key[u];
                    const bool up = (t & kk) == 0;  // this run ends in "before" order
                    if (up ? SK::before(b, a) : SK::before(a, b)) {
                        key[t] = b;
                        key[u] = a;
                    }
                }
                __syncthreads();  // one compare-exchange stage finishes before the next reads its pairs
            }
        }

        // Exclusive scan of the sorted scores: thread tid owns positions [t0, t1).
        const int E = max(1, NP / nthreads);
        const int t0 = min(tid * E, NP), t1 = min(t0 + E, NP);
        double local = 0.0;
        for (int t = t0; t < t1; ++t) {
            const K k = key[t];
            if (!SK::is_pad(k)) local += SK::score(k);
        }
        double incl = local;  // inclusive scan of the chunk sums inside the warp
        for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) warp_sum[w] = incl;
        __syncthreads();  // every warp's total is visible before the offsets are summed
        double off = 0.0, cand_total = 0.0;
        for (int x = 0; x < nwarps; ++x) {
            const double c = warp_sum[x];
            off += x < w ? c : 0.0;
            cand_total += c;
        }
        const double m0 = m0_s;
        const bool remaining = threshold_mode == 1;
        // Mode 1: T (the visible mass) is m0 + the candidates' mass, up to rounding within tol.
        const double target = remaining ? P * ((m0 + cand_total) - m0) : P;
        const double base = remaining ? 0.0 : m0;
        const double tol = 8.0 * (double)(NP + 64) * 1.1102230246251565e-16 * (m0 + cand_total);

        double run = base + (off + (incl - local));  // the mass before position t0
        int border = 0;
        for (int t = t0; t < t1; ++t) {
            const K k = key[t];
            if (SK::is_pad(k)) break;  // pads sort last
            border |= fabs(run - target) <= tol ? 1 : 0;
            if (run < target) keep[SK::id(k)] = 1;
            run += SK::score(k);
        }
        // __syncthreads_or: also the barrier after which every keep flag of the fast path is set.
        if (__syncthreads_or(border)) {
            // Borderline row: redo it with the reference's sequential additions.
            for (int j = tid; j < nvis; j += nthreads) {
                const bool forced = j < n_sink || (j <= d && j > d - n_local);
                keep[j] = forced ? 1 : 0;
            }
            __syncthreads();  // the fast path's flags are cleared before thread 0 sets the exact ones
            if (tid == 0) {
                double m = m0, tgt = P;
                if (remaining) {
                    double tot = 0.0;
                    for (int j = 0; j < nvis; ++j) tot += us::to_double(s[j]);
                    tgt = P * (tot - m0);
                    m = 0.0;
                }
                for (int t = 0; t < NP; ++t) {
                    const K k = key[t];
                    if (SK::is_pad(k) || !(m < tgt)) break;
                    keep[SK::id(k)] = 1;
                    m += SK::score(k);
                }
            }
            __syncthreads();  // thread 0's selection is visible to every thread
        }
    }

    bool* mrow = mask + row * nKb;
    if ((nKb & 3) == 0) {  // 4 flags per store (row * nKb and the keep array are 4-aligned)
        const uchar4* k4 = reinterpret_cast<const uchar4*>(keep);
        uchar4* m4 = reinterpret_cast<uchar4*>(mrow);
        for (int j = tid; j < (nKb >> 2); j += nthreads) m4[j] = k4[j];
    } else {
        for (int j = tid; j < nKb; j += nthreads) mrow[j] = keep[j] != 0;
    }
    if (kv_counts != nullptr) us_write_indices(keep, nvis, nKb, row, kv_counts, kv_indices);
}

// Index form of an arbitrary bool mask [rows, nKb] (e.g. a user's BlockMask): one block per row.
__global__ void __launch_bounds__(US_SEL_THREADS)
us_mask_to_indices(const bool* __restrict__ mask, int* __restrict__ kv_counts, int* __restrict__ kv_indices,
                   int nKb) {
    extern __shared__ __align__(16) unsigned char keep_raw[];  // [nKb] flags; dynamic shared memory nKb bytes
    const long long row = blockIdx.x;
    const unsigned char* m = reinterpret_cast<const unsigned char*>(mask) + row * nKb;
    for (int j = threadIdx.x; j < nKb; j += blockDim.x) keep_raw[j] = m[j] ? 1 : 0;
    __syncthreads();  // the row's flags are complete before the scan reads them
    us_write_indices(keep_raw, nKb, nKb, row, kv_counts, kv_indices);
}
