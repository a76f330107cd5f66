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
// How one thread block decides a row in parallel and still gives the sequential answer. The
// taken candidates are those whose running mass m_k (the mass before them in the order above)
// is below the target; a parallel sum adds in another order than the reference's left-to-right
// sum, but both lie within gamma_n * A of the exact sum (A = m0 + the candidates' mass, n <= NP),
// so they differ by less than tol = 8 (NP + 64) u A (u = 2^-53, a generous bound). A decision
// whose mass lies farther than tol from the target is therefore the reference's; a row where one
// does not is walked sequentially in the reference's order.
//   Fast path (float scores, nvis <= US_SEL_EMAX * blockDim.x: every row the launch gives it):
//   no sort. Each thread holds up to US_SEL_EMAX candidate scores in registers; the cutoff
//   score is found by bisection over the float bit patterns (31 steps of a float block sum),
//   then checked in double (no tie at the cutoff; mass before it below target - tol, mass
//   before the next one above target + tol). Rows that pass: done, no shared-memory traffic.
//   Exact path (double scores, longer rows, rows the fast path did not settle):
//   1. candidates are loaded as sort keys into shared memory (forced and invisible slots get
//      a pad key that sorts last) and bitonic-sorted, NP = next power of two >= nvis; for float
//      scores the key is one 64-bit word (score bits << 32 | ~j: nonnegative float bits order
//      like the values, ~j puts the lower j first on ties), for double a (bits, j) pair;
//   2. the running masses are a block-wide exclusive scan in double (each thread adds its chunk
//      in order, then a warp-shuffle scan of the chunk sums); candidates more than tol below
//      the target are taken;
//   3. if some m_k lies within tol of the target (a borderline row: practically never on real
//      scores, often on hand-made ties), thread 0 walks the sorted keys sequentially in the
//      reference's exact order of additions instead. Either way the mask is the reference's.
// Outputs: mask bool [B, Hm, nQb, nKb]; optionally (non-null pointers) the FlexAttention
// index form kv_counts int32 [B, Hm, nQb] and kv_indices int32 [B, Hm, nQb, nKb]
// (ascending, padded with -1), written with a warp-ballot scan over the kept flags.
// Packed layout (issue 16, serving): with a non-null row table `geom` the same kernel reads
// packed scores [Hm, total_qb, W] of a ragged batch (W = max over sequences of nKb_b, zero past
// each sequence's nKb_b) and writes kv_counts [Hm, total_qb], kv_indices [Hm, total_qb, W]
// (block indices local to the sequence, -1 padded to W); nQb = total_qb, nKb = W, and each row
// takes its geometry (local query block i, N_q,b, N_k,b, nKb_b) from geom[qb]; mask may be null
// (if given, [Hm, total_qb, W] with the padding false). Scores past nKb_b are never read.
//
// Version table
// | kernel                 | T             | grid         | block          | dynamic shared         |
// |------------------------|---------------|--------------|----------------|------------------------|
// | us_select_topp<T>      | float, double | (rows, 1, 1) | 32..SEL_THREADS| NP*key + nKb           |
// | us_mask_to_indices     | -             | (rows, 1, 1) | 32..SEL_THREADS| nKb                    |
// rows = B*Hm*nQb (packed: Hm*total_qb, nKb = W), NP = next power of two >= nKb, key = 8 bytes
// (float) or 16 bytes (double);
// block = clamp(NP/US_SEL_EMAX, 32, US_SEL_THREADS) threads for float scores with
// NP <= US_SEL_EMAX * US_SEL_THREADS (the fast path), else clamp(NP/4, 32, US_SEL_THREADS);
// a multiple of 32 (selection.py launch_config).
// History (H200, Hm = 32, S = 128, 8K / 32K / 128K tokens): v1 (a sort of nKb slots per row,
// then one thread walking it, a one-thread scan for the index form) 0.11 / 0.30 / 4.2 ms;
// v2 (the exact path above for every row) 0.011 / 0.065 / 1.05 ms, bound by the bitonic sort's
// shared-memory traffic; v3 adds the register fast path.
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

// Sum of x over the block, the same value in every thread, in a fixed order (deterministic):
// a butterfly inside each warp (every lane ends with the same sum: float addition commutes),
// then the warps' sums in warp order. buf holds 2 * US_SEL_WARPS slots; `par` alternates
// between its halves so that one barrier per call suffices.
template <typename V>
__device__ __forceinline__ V us_block_sum(V x, V* buf, int& par) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    const int nwarps = blockDim.x >> 5;
    if (nwarps == 1) return x;
    V* b = buf + par * US_SEL_WARPS;
    par ^= 1;
    if ((threadIdx.x & 31) == 0) b[threadIdx.x >> 5] = x;
    __syncthreads();  // every warp's sum is written before any thread adds them up
    V t = b[0];
    for (int k = 1; k < nwarps; ++k) t += b[k];
    return t;
}

template <typename T> struct us_is_float { static constexpr bool value = false; };
template <> struct us_is_float<float> { static constexpr bool value = true; };

// The fast path (float scores, nvis <= US_SEL_EMAX * blockDim.x): no sort. Thread tid holds the
// scores of its candidates j = tid + e * blockDim.x in registers (u[e]: the float bits, which
// order like the values since scores are >= 0). The taken candidates are an upper set of
// values: those whose bits are >= b*, b* the smallest bits value with
//   G(b) = sum of the candidates with bits > b  <  R = target - base.
// b* is found by bisection over the 2^31 bit patterns with float block sums (31 steps), then
// checked in double: the candidate at b* must be the only one with those bits (no tie at the
// cutoff), the mass before it (base + the double sum of the candidates above it) must lie below
// target - tol and the mass before the largest candidate below it above target + tol. The
// sequential reference sums lie within tol of these, so the decision is the reference's; if a
// check fails the caller runs the exact path. Returns 1 when the row is decided (keep flags set
// by each thread for its own candidates), 0 otherwise; block-uniform.
#ifndef US_SEL_EMAX
#define US_SEL_EMAX 32
#endif
__device__ __forceinline__ int us_topp_fast(const float* s, int nvis, long long d, int n_sink, int n_local,
                                            double m0, double P, int remaining, unsigned char* keep, float* fbuf,
                                            double* dbuf, int* ibuf, int& par) {
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int Erow = (nvis + nthreads - 1) / nthreads;
    unsigned u[US_SEL_EMAX];
    unsigned valid = 0;
    double dloc = 0.0;
#pragma unroll
    for (int e = 0; e < US_SEL_EMAX; ++e) {
        u[e] = 0u;
        if (e < Erow) {
            const int j = tid + e * nthreads;
            if (j < nvis && !(j < n_sink || (j <= d && j > d - n_local))) {
                const float x = us_canon(s[j]);
                u[e] = __float_as_uint(x);
                valid |= 1u << e;
                dloc += (double)x;
            }
        }
    }
    const int nc = us_block_sum<int>(__popc(valid), ibuf, par);
    if (nc == 0) return 1;  // no candidate: the forced blocks are the row
    const double dall = us_block_sum<double>(dloc, dbuf, par);
    const double target = remaining ? P * ((m0 + dall) - m0) : P;
    const double base = remaining ? 0.0 : m0;
    const double tol = 8.0 * (double)(nvis + 64) * 1.1102230246251565e-16 * (m0 + dall);
    if (base + dall < target - tol) {  // every candidate is taken: each mass before it is < target
#pragma unroll
        for (int e = 0; e < US_SEL_EMAX; ++e)
            if ((valid >> e) & 1u) keep[tid + e * nthreads] = 1;
        return 1;
    }
    if (base > target + tol) return 1;  // the forced mass alone reaches the target: none taken

    const float R = (float)(target - base);
    unsigned lo = 0u, hi = 0x7F800000u;  // G(+inf bits) = 0 < R
    while (lo < hi) {                    // block-uniform: lo, hi and the sums agree in every thread
        const unsigned mid = lo + ((hi - lo) >> 1);
        float acc = 0.0f;
#pragma unroll
        for (int e = 0; e < US_SEL_EMAX; ++e)
            if (e < Erow && u[e] > mid) acc += __uint_as_float(u[e]);
        if (us_block_sum<float>(acc, fbuf, par) < R) hi = mid; else lo = mid + 1u;
    }
    const unsigned b = lo;
    int at = 0, below = 0;
    double above = 0.0;
#pragma unroll
    for (int e = 0; e < US_SEL_EMAX; ++e) {
        if ((valid >> e) & 1u) {
            if (u[e] == b) ++at;
            else if (u[e] < b) ++below;
            else above += (double)__uint_as_float(u[e]);
        }
    }
    at = us_block_sum<int>(at, ibuf, par);
    below = us_block_sum<int>(below, ibuf, par);
    above = us_block_sum<double>(above, dbuf, par);
    if (at != 1) return 0;  // a tie at the cutoff (lower j first) or none: the exact path decides
    const double last = base + above;                                   // before the cutoff block: taken
    const double next = base + above + (double)__uint_as_float(b);      // before the next one: not taken
    if (!(last < target - tol) || (below > 0 && !(next > target + tol))) return 0;
#pragma unroll
    for (int e = 0; e < US_SEL_EMAX; ++e)
        if (((valid >> e) & 1u) && u[e] >= b) keep[tid + e * nthreads] = 1;
    return 1;
}

// One thread block per row (b, g, i), row = (b*Hm + g)*nQb + i; blockDim.x a multiple of 32,
// at most US_SEL_THREADS. threshold_mode: 0 "total" (SPEC), 1 "remaining".
// geom: null for the batch layout (every row has the arguments' nq, nk and nKb). Packed layout
// (B = 1, nQb = total_qb, nKb = W, row = g*total_qb + qb): int32 [total_qb, 4], built on the
// host from cu_seqlens, geom[4*qb .. 4*qb+3] = {i, N_q,b, N_k,b, nKb_b} of the sequence b that
// packed query block qb belongs to (i its query block inside b). The row's scores, flags and
// outputs keep the row stride nKb = W; only the geometry of SPEC 5 is the sequence's. Every
// thread reads the row's entry itself (read-only global memory, no shared copy: no barrier).
template <typename T>
__global__ void __launch_bounds__(US_SEL_THREADS)
us_select_topp(const T* __restrict__ scores, bool* __restrict__ mask, int* __restrict__ kv_counts,
               int* __restrict__ kv_indices, const int* __restrict__ geom, int nQb, int nKb, int nq, int nk, int S,
               int n_sink, int n_local, int causal, double P, int threshold_mode) {
    typedef SelKey<T> SK;
    typedef typename SK::K K;
    extern __shared__ __align__(16) unsigned char dyn_raw[];
    const int NPmax = us_next_pow2(nKb);
    K* key = reinterpret_cast<K*>(dyn_raw);                                 // [NPmax] sort keys
    unsigned char* keep = dyn_raw + (size_t)NPmax * sizeof(K);              // [nKb] 1 = selected
    __shared__ double warp_sum[US_SEL_WARPS];
    __shared__ double m0_s;
    __shared__ float fbuf[2 * US_SEL_WARPS];
    __shared__ double dbuf[2 * US_SEL_WARPS];
    __shared__ int ibuf[2 * US_SEL_WARPS];

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int nthreads = blockDim.x, nwarps = nthreads >> 5;
    const long long row = blockIdx.x;
    int i = (int)(row % nQb);
    int nkr = nKb;  // key blocks of this row's sequence (the row stride stays nKb)
    if (geom != nullptr) {
        const int* gq = geom + 4LL * i;  // i is the packed query block qb here
        i = gq[0];
        nq = gq[1];
        nk = gq[2];
        nkr = gq[3];
    }
    const T* s = scores + row * nKb;

    const long long p_last = us::qpos(min((long long)(i + 1) * S, (long long)nq) - 1, nq, nk);
    // floor division (p_last < 0 happens only when non-causal with Nq > Nk), as Python's //
    const long long d = p_last >= 0 ? p_last / S : -((-p_last + S - 1) / S);
    // Visible blocks are the prefix j < nvis.
    const int nvis = !causal ? nkr : (p_last < 0 ? 0 : (int)min((long long)nkr, p_last / S + 1));
    const bool all = P >= 1.0;
    const int NP = us_next_pow2(max(nvis, 1));
    const bool remaining = threshold_mode == 1;

    for (int j = tid; j < nKb; j += nthreads) {  // (packed: j >= nkr >= nvis is padding, flag 0)
        const bool vis = j < nvis;
        const bool forced = vis && (j < n_sink || (j <= d && j > d - n_local));
        keep[j] = all ? (vis ? 1 : 0) : (forced ? 1 : 0);
    }
    if (!all && tid == 0) {
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
    __syncthreads();  // keep flags and m0 are complete before either path reads them
    const double m0 = all ? 0.0 : m0_s;  // (not written when P >= 1)

    int decided = all ? 1 : 0;
    int par = 0;
    if constexpr (us_is_float<T>::value) {
        if (!decided && nvis <= US_SEL_EMAX * nthreads)
            decided = us_topp_fast(reinterpret_cast<const float*>(s), nvis, d, n_sink, n_local, m0, P,
                                   remaining ? 1 : 0, keep, fbuf, dbuf, ibuf, par);
    }
    if (!decided) {
        // The exact path (double scores, long rows, and rows the fast path could not decide).
        for (int j = tid; j < NP; j += nthreads) {
            const bool cand = j < nvis && !(j < n_sink || (j <= d && j > d - n_local));
            key[j] = cand ? SK::make(us_canon(s[j]), j) : SK::pad();
        }
        __syncthreads();  // every key is in place before the sort reads it

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
        // __syncthreads_or: also the barrier after which every keep flag of the scan is set.
        if (__syncthreads_or(border)) {
            // Borderline row: redo it with the reference's sequential additions.
            for (int j = tid; j < nvis; j += nthreads) {
                const bool forced = j < n_sink || (j <= d && j > d - n_local);
                keep[j] = forced ? 1 : 0;
            }
            __syncthreads();  // the scan's flags are cleared before thread 0 sets the exact ones
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
        }
    }
    __syncthreads();  // every keep flag (either path, or the exact walk of thread 0) is set

    if (mask != nullptr) {
        bool* mrow = mask + row * nKb;
        if ((nKb & 3) == 0) {  // 4 flags per store (row * nKb and the keep array are 4-aligned)
            const uchar4* k4 = reinterpret_cast<const uchar4*>(keep);
            uchar4* m4 = reinterpret_cast<uchar4*>(mrow);
            for (int j = tid; j < (nKb >> 2); j += nthreads) m4[j] = k4[j];
        } else {
            for (int j = tid; j < nKb; j += nthreads) mrow[j] = keep[j] != 0;
        }
    }
    // Kept blocks are visible (j < nvis <= nkr); indices padded with -1 up to the stride nKb.
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
