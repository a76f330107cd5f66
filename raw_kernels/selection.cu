// selection.cu: top-P block selection with forced sink and local blocks (SPEC section 5).
//
// For every row (b, g, i) of scores [B, Hm, nQb, nKb] (T = float or double, >= 0):
//   visible(j)  = causal ? j*S <= p_last(i) : true,   p_last(i) = p(min((i+1)*S, Nq) - 1)
//   d(i)        = p_last(i) / S                         (the diagonal block)
//   F           = ({0 .. n_sink-1} U {d-n_local+1 .. d}) ∩ visible     (forced, always kept)
//   m           = sum of scores[j] for j in F, added in ascending j, in double
//   candidates  = visible \ F, ordered by score descending, ties by lower j first
//   while m < P: take the next candidate, m += its score  (the one carrying m past P is kept)
//   P >= 1 keeps every visible block.
// This is exactly the reference's selection (unisparse_ref/reference/selection.py): the same
// order of additions, in float64, so the mask equals the reference's bit for bit on the same
// scores.
// Outputs: mask bool [B, Hm, nQb, nKb]; optionally (non-null pointers) the FlexAttention
// index form kv_counts int32 [B, Hm, nQb] and kv_indices int32 [B, Hm, nQb, nKb]
// (ascending, padded with -1).
//
// Version table
// | kernel                 | T             | grid         | block          | dynamic shared      |
// |------------------------|---------------|--------------|----------------|---------------------|
// | us_select_topp<T>      | float, double | (rows, 1, 1) | US_SEL_THREADS | NP*(sizeof(T)+8)    |
// | us_mask_to_indices     | -             | (rows, 1, 1) | US_SEL_THREADS | nKb*4               |
// rows = B*Hm*nQb, NP = next power of two >= nKb (bitonic sort of (score, j) pairs).
#include "common.cuh"

#ifndef US_SEL_THREADS
#define US_SEL_THREADS 256
#endif

// Write kv_counts[row] and kv_indices[row, :] from keep[0..nKb) (block-wide scan; every
// thread owns a contiguous chunk of j so the indices come out ascending).
__device__ __forceinline__ void us_write_indices(const int* keep, int nKb, long long row, int* kv_counts,
                                                 int* kv_indices) {
    __shared__ int chunk_count[US_SEL_THREADS];
    const int tid = threadIdx.x;
    const int per = us::cdiv(nKb, US_SEL_THREADS);
    const int j0 = min(tid * per, nKb), j1 = min(j0 + per, nKb);
    int cnt = 0;
    for (int j = j0; j < j1; ++j) cnt += keep[j] ? 1 : 0;
    chunk_count[tid] = cnt;
    __syncthreads();  // every chunk count is visible before the scan
    if (tid == 0) {   // exclusive scan, sequential over US_SEL_THREADS entries
        int run = 0;
        for (int t = 0; t < US_SEL_THREADS; ++t) {
            const int c = chunk_count[t];
            chunk_count[t] = run;
            run += c;
        }
        kv_counts[row] = run;
    }
    __syncthreads();  // the scanned offsets are visible before the indices are written
    int pos = chunk_count[tid];
    int* out = kv_indices + row * nKb;
    for (int j = j0; j < j1; ++j)
        if (keep[j]) out[pos++] = j;
    const int total = (tid == US_SEL_THREADS - 1) ? pos : -1;  // last thread knows the total
    __shared__ int total_s;
    if (tid == US_SEL_THREADS - 1) total_s = total;
    __syncthreads();  // the total count is visible before the -1 padding is written
    for (int j = total_s + tid; j < nKb; j += US_SEL_THREADS) out[j] = -1;
}

// One thread block per row (b, g, i). row = (b*Hm + g)*nQb + i.
template <typename T>
__global__ void __launch_bounds__(US_SEL_THREADS)
us_select_topp(const T* __restrict__ scores, bool* __restrict__ mask, int* __restrict__ kv_counts,
               int* __restrict__ kv_indices, int nQb, int nKb, int nq, int nk, int S, int n_sink, int n_local,
               int causal, double P) {
    extern __shared__ __align__(16) unsigned char dyn_raw[];  // 16-aligned: holds double keys
    int NP = 1;
    while (NP < nKb) NP <<= 1;
    T* key = reinterpret_cast<T*>(dyn_raw);                          // [NP] score, or -1 for non-candidates
    int* id = reinterpret_cast<int*>(dyn_raw + (size_t)NP * sizeof(T));   // [NP] block index j
    int* keep = id + NP;                                               // [NP] 1 = selected
    const int tid = threadIdx.x;
    const long long row = blockIdx.x;
    const int i = (int)(row % nQb);
    const T* s = scores + row * nKb;

    const long long p_last = us::qpos(min((long long)(i + 1) * S, (long long)nq) - 1, nq, nk);
    // floor division (p_last < 0 happens only when non-causal with Nq > Nk), as Python's //
    const long long d = p_last >= 0 ? p_last / S : -((-p_last + S - 1) / S);
    for (int j = tid; j < NP; j += US_SEL_THREADS) {
        const bool vis = j < nKb && (!causal || (long long)j * S <= p_last);
        const bool forced = vis && (j < n_sink || (j <= d && j > d - n_local));
        const bool cand = vis && !forced;
        key[j] = cand ? s[j] : T(-1);
        id[j] = j;
        keep[j] = (P >= 1.0) ? (vis ? 1 : 0) : (forced ? 1 : 0);
    }
    __syncthreads();  // keys, ids and forced flags are complete before the sort reads them

    if (P < 1.0) {
        // Bitonic sort of (key, id): "a before b" iff key_a > key_b or (key_a == key_b and id_a < id_b).
        for (int kk = 2; kk <= NP; kk <<= 1) {
            for (int jj = kk >> 1; jj > 0; jj >>= 1) {
                for (int t = tid; t < NP; t += US_SEL_THREADS) {
                    const int u = t ^ jj;
                    if (u > t) {
                        const bool u_before_t = key[u] > key[t] || (key[u] == key[t] && id[u] < id[t]);
                        const bool t_before_u = key[t] > key[u] || (key[t] == key[u] && id[t] < id[u]);
                        const bool ascending = (t & kk) == 0;  // this half sorts "before" first
                        if (ascending ? u_before_t : t_before_u) {
                            const T tk = key[t]; key[t] = key[u]; key[u] = tk;
                            const int ti = id[t]; id[t] = id[u]; id[u] = ti;
                        }
                    }
                }
                __syncthreads();  // one compare-exchange stage finishes before the next reads its pairs
            }
        }
        if (tid == 0) {  // the sequential top-P walk, additions in the reference's order
            double m = 0.0;
            for (int j = 0; j < nKb; ++j)
                if (keep[j]) m += us::to_double(s[j]);
            for (int t = 0; t < NP && key[t] >= T(0) && m < P; ++t) {
                keep[id[t]] = 1;
                m += us::to_double(key[t]);
            }
        }
        __syncthreads();  // the selection made by thread 0 is visible to every thread
    }
    bool* mrow = mask + row * nKb;
    for (int j = tid; j < nKb; j += US_SEL_THREADS) mrow[j] = keep[j] != 0;
    if (kv_counts != nullptr) us_write_indices(keep, nKb, row, kv_counts, kv_indices);
}

// Index form of an arbitrary bool mask [rows, nKb] (e.g. a user's BlockMask): one block per row.
__global__ void __launch_bounds__(US_SEL_THREADS)
us_mask_to_indices(const bool* __restrict__ mask, int* __restrict__ kv_counts, int* __restrict__ kv_indices,
                   int nKb) {
    extern __shared__ int keep[];  // [nKb] flags; dynamic shared memory nKb * 4 bytes
    const long long row = blockIdx.x;
    for (int j = threadIdx.x; j < nKb; j += US_SEL_THREADS) keep[j] = mask[row * nKb + j] ? 1 : 0;
    __syncthreads();  // the row's flags are complete before the scan reads them
    us_write_indices(keep, nKb, row, kv_counts, kv_indices);
}
