// scores.cu: block importance scores from composite tokens (SPEC section 4), in one pass.
//
// Inputs (float32, C-contiguous, from pooling.cu): Qh = q_c [B, Hm, R, D] and
// Kc = k_c [B, Hkv, C, D], Hm = Hq/c_h, composite head g reads KV head (g*c_h)/G.
// For every composite query r of head (b, g):
//
//   x[r, c]   = scale * Qh[r] . Kc[c]                       (logits, float32 FMA over D)
//   visible:    causal ? c*c_k <= p(last(r)) : true,  last(r) = min((r+1)*c_q, Nq) - 1
//   m_r, l_r  = max and sum of exp(x[r, c] - m_r) over the visible c   (global row softmax)
//   A[r, c]   = exp(x[r, c] - m_r) / l_r  (0 when not visible)
//   scores[b, g, i, j] = (1/R_i) * sum_{r in query block i} sum_{c in key block j} A[r, c]
//
// with R_i the number of composite queries in query block i (RB = S/c_q per full block;
// composite r lies in block r/RB, composite key c in key block c/KB, KB = S/c_k).
// Nothing of size [R, C] is ever stored. Every sum is taken in a fixed order (no atomics):
// repeated runs are bit-identical. Output scores are float32; each row sums to 1 up to
// float32 rounding.
//
// us_scores_onepass walks C once. A thread block owns RG = max(TR, RB) rows (NQ = RG/RB whole
// query blocks) and walks the column tiles t (c in [t*TC, (t+1)*TC)) once, up to the last key
// visible to its last row, computing each logit x[r, c] once. It keeps the running m_r, l_r
// (online softmax, in shared memory) and, per tile, writes to a global scratch
//   M[r, t]     = running max after tile t = max(m_r so far, max of the tile's visible x[r, c])
//   e[r, t, k]  = sum_{visible c of tile t in key-block piece k} exp(x[r, c] - M[r, t])
// with pieces of KBe = min(KB, TC) columns (NKS = TC/KBe pieces per tile; a key block is one
// piece when KB <= TC and KB/TC whole tiles when KB > TC). After the walk (m_r, l_r final):
//   w[r, t]     = exp(M[r, t] - m_r) / l_r                 (the flash-attention rescale; <= 1/l_r)
//   scores[b, g, i, j] = (1/R_i) * sum_{r in block i} sum_{pieces (t, k) of key block j} e[r, t, k] * w[r, t]
// which is SPEC 4, since A[r, c] = exp(x - M[r, t]) * exp(M[r, t] - m_r) / l_r. Sums in a
// fixed order: e over the piece's columns ascending; l_r = l_r * exp(m_old - M[r, t]) + (the
// tile's pieces, ascending), tile by tile; scores over r ascending of (the row's pieces of key
// block j, ascending), then / R_i. The scratch (float32, allocated by
// unisparse_ref/cupy_backend/scores.py) is part [heads, ntiles, R, NKS] and tmax [heads, ntiles, R],
// ntiles = ceil(C/TC); tmax is overwritten in place by w. At 131072 tokens (R = C = 8192,
// KB = 8) that is 32 MiB + 4 MiB per mask head, 1.1 GiB for 32 heads; the backend launches
// over chunks of heads (grid y = a slice of B*Hm starting at bh0) so the scratch stays under
// 2 GiB (at least one head per chunk, so a single head above 2 GiB, e.g. c_q = c_k = 1 at
// 131072 tokens, still gets its whole scratch: rows are not chunked).
// Barriers of us_scores_onepass, per column tile and row sub-tile (besides the two inside
// us_logits_tile): (1) the 16 partial maxima of each row are in shared memory before one
// thread per row merges them; (2) M[r, t] is in shared memory before every thread exponentiates
// with it; (3) the exp tile is complete before the piece sums read other threads' entries;
// (4) the piece sums are complete before the row's thread adds them to l_r. After the walk:
// (5) m_r, l_r are final and the block's own scratch writes are visible to all its threads
// (__syncthreads also orders a block's global memory accesses); (6) every w[r, t] is written
// before the block sums read it. No two thread blocks touch the same scratch rows or scores.
//
// Version table
// | kernel              | grid                 | block   | shared memory                          |
// |---------------------|----------------------|---------|----------------------------------------|
// | us_scores_onepass   | (ceil(R/RG), chunk)  | 16 x 16 | static ~17 KiB (the Q/K slices of the  |
// |                     |                      |         | logits tile) + dynamic (below)         |
// Dynamic shared memory (floats): TR*(TC+1) + TR*16 + TR*NKS + 2*TR + 2*RG (one TR of them
// int), computed by unisparse_ref/cupy_backend/scores.py (launch_config).
// H200, 131072 tokens, 32 heads (bf16 structured workload, D = 128): 16.2 ms, against 33.1 ms
// for the retired two-pass version (a pass for m_r, l_r, then one recomputing every logit;
// docs/performance.md, "Retired kernels").
//
// Tiles (override with -D): TR composite rows x TC composite columns per tile, TD head-dim
// slice staged in shared memory. Each of the 16 x 16 threads owns 4 x 4 logits of a tile:
// rows 4ty .. 4ty+3 and columns 4tx .. 4tx+3 (US_ROW(a), US_COL(b)). The Q and K slices are
// stored transposed, [d][row] (padded by 4 floats to keep rows 16-byte aligned), so one
// float4 load brings a thread's 4 rows and one its 4 columns: 2 vector shared loads per 16 FMA
// (the retired scalar layout, rows ty + 16a, needed 8 scalar loads and was 9-13 % slower).
#include "common.cuh"

#ifndef US_SC_TR
#define US_SC_TR 64
#endif
#ifndef US_SC_TC
#define US_SC_TC 64
#endif
#ifndef US_SC_TD
#define US_SC_TD 32
#endif
#define US_SC_T 16
#define US_SC_THREADS (US_SC_T * US_SC_T)
#define US_SC_MR (US_SC_TR / US_SC_T)
#define US_SC_MC (US_SC_TC / US_SC_T)
static_assert(US_SC_TR % US_SC_T == 0 && US_SC_TC % US_SC_T == 0, "TR and TC must be multiples of 16");
static_assert((US_SC_TR & (US_SC_TR - 1)) == 0 && (US_SC_TC & (US_SC_TC - 1)) == 0,
              "TR and TC must be powers of two (block sizes S/c are powers of two)");

// Thread (ty, tx) owns rows 4ty + a and columns 4tx + b of a tile (a, b < 4).
#define US_ROW(a) (ty * US_SC_MR + (a))
#define US_COL(b) (tx * US_SC_MC + (b))
static_assert(US_SC_MR == 4 && US_SC_MC == 4, "the logits tile reads 4 rows and 4 columns as one float4 (TR = TC = 64)");
#ifndef US_LDS4  // a 16-byte shared-memory load (the host emulation substitutes an alignment-checked one)
#define US_LDS4(p) (*reinterpret_cast<const float4*>(p))
#endif

// Last composite key visible to composite query r (SPEC 4): max c with c*c_k <= p(last(r)).
__device__ __forceinline__ int us_last_visible_key(int r, int R, int C, int nq, int nk, int c_q, int c_k,
                                                   int causal) {
    if (!causal) return C - 1;
    r = min(r, R - 1);
    const long long last = min((long long)(r + 1) * c_q, (long long)nq) - 1;
    const long long p = us::qpos(last, nq, nk);
    return (int)min((long long)(C - 1), p / c_k);
}

// acc[a][b] = Qh[r0 + US_ROW(a)] . Kc[c0 + US_COL(b)] (rows >= R or columns >= C give 0).
// q and k point at the (b, g) and (b, kv head) slices. The staging buffers are this
// function's own shared arrays (one set per thread block).
__device__ __forceinline__ void us_logits_tile(const float* __restrict__ q, const float* __restrict__ k, int R,
                                               int C, int D, int r0, int c0, float acc[US_SC_MR][US_SC_MC]) {
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * US_SC_T + tx;
    __shared__ __align__(16) float QsT[US_SC_TD][US_SC_TR + 4];  // [d][row], +4 keeps rows 16-byte aligned
    __shared__ __align__(16) float KsT[US_SC_TD][US_SC_TC + 4];
#pragma unroll
    for (int a = 0; a < US_SC_MR; ++a)
#pragma unroll
        for (int b = 0; b < US_SC_MC; ++b) acc[a][b] = 0.0f;
    for (int d0 = 0; d0 < D; d0 += US_SC_TD) {
        for (int e = tid; e < US_SC_TR * US_SC_TD; e += US_SC_THREADS) {  // coalesced along d
            const int row = e / US_SC_TD, dd = e % US_SC_TD, r = r0 + row, d = d0 + dd;
            const float val = (r < R && d < D) ? q[(long long)r * D + d] : 0.0f;
            QsT[dd][row] = val;
        }
        for (int e = tid; e < US_SC_TC * US_SC_TD; e += US_SC_THREADS) {
            const int col = e / US_SC_TD, dd = e % US_SC_TD, c = c0 + col, d = d0 + dd;
            const float val = (c < C && d < D) ? k[(long long)c * D + d] : 0.0f;
            KsT[dd][col] = val;
        }
        __syncthreads();  // the Q and K slices are complete before any thread reads them
#pragma unroll 8
        for (int dd = 0; dd < US_SC_TD; ++dd) {
            float qa[US_SC_MR], kb[US_SC_MC];
            const float4 q4 = US_LDS4(&QsT[dd][ty * US_SC_MR]);  // rows 4ty .. 4ty+3 (broadcast in the warp)
            const float4 k4 = US_LDS4(&KsT[dd][tx * US_SC_MC]);  // columns 4tx .. 4tx+3
            qa[0] = q4.x; qa[1] = q4.y; qa[2] = q4.z; qa[3] = q4.w;
            kb[0] = k4.x; kb[1] = k4.y; kb[2] = k4.z; kb[3] = k4.w;
#pragma unroll
            for (int a = 0; a < US_SC_MR; ++a)
#pragma unroll
                for (int b = 0; b < US_SC_MC; ++b) acc[a][b] = fmaf(qa[a], kb[b], acc[a][b]);
        }
        __syncthreads();  // every thread is done reading the slices before the next ones overwrite them
    }
}

// One pass over C (see the header). grid (ceil(R/RG), heads in this chunk), block
// (16, 16); thread block (x, y) owns rows [x*RG, x*RG + RG) of head bh = bh0 + y. part and tmax
// are this chunk's scratch ([chunk heads, ntiles, R, NKS] and [chunk heads, ntiles, R], indexed
// by y). scores: float32 [B, Hm, nQb, nKb], zero-initialised by the caller (blocks no row of
// the thread block sees are never written). Dynamic shared memory: see scores.launch_config (Python).
__global__ void __launch_bounds__(US_SC_THREADS)
us_scores_onepass(const float* __restrict__ qc, const float* __restrict__ kc, float* __restrict__ scores,
                  float* __restrict__ part, float* __restrict__ tmax, int bh0, int Hm, int Hkv, int R, int C,
                  int D, int nq, int nk, int c_q, int c_k, int c_h, int G, int S, int causal, float scale) {
    extern __shared__ float dyn[];
    const int RB = S / c_q, KB = S / c_k;                // composite rows / columns per block
    const int RG = max(US_SC_TR, RB), NQ = RG / RB;      // rows and query blocks per thread block
    const int KBe = min(KB, US_SC_TC);                   // columns per key-block piece
    const int NKS = US_SC_TC / KBe;                      // pieces per column tile
    const int SPB = KB / KBe;                            // pieces per key block (whole tiles if KB > TC)
    float(*ptile)[US_SC_TC + 1] = reinterpret_cast<float(*)[US_SC_TC + 1]>(dyn);  // [TR][TC+1]: exp(x - M)
    float* red = dyn + US_SC_TR * (US_SC_TC + 1);        // [TR][16]: per-thread maxima of a tile row
    float* esum = red + US_SC_TR * US_SC_T;              // [TR][NKS]: e of the current sub-tile
    float* mcur = esum + US_SC_TR * NKS;                 // [TR]: M[r, t] of the current sub-tile
    float* rm = mcur + US_SC_TR;                         // [RG]: running m_r
    float* rl = rm + RG;                                 // [RG]: running l_r
    int* vis = reinterpret_cast<int*>(rl + RG);          // [TR]: last visible column - c0 per row

    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * US_SC_T + tx;
    const int hl = blockIdx.y, bh = bh0 + hl, b = bh / Hm, g = bh % Hm, kvh = (g * c_h) / G;
    const float* q = qc + (long long)bh * R * D;
    const float* k = kc + ((long long)b * Hkv + kvh) * C * D;
    const int ntiles = us::cdiv(C, US_SC_TC);
    float* ph = part + (long long)hl * ntiles * R * NKS;  // this head's e:  [ntiles][R][NKS]
    float* th = tmax + (long long)hl * ntiles * R;        // this head's M, then w: [ntiles][R]
    const int nQb = us::cdiv(nq, S), nKb = us::cdiv(nk, S);
    const int rg0 = blockIdx.x * RG;
    if (rg0 >= R) return;
    const int cmax_group = us_last_visible_key(min(rg0 + RG, R) - 1, R, C, nq, nk, c_q, c_k, causal);
    const int ntg = cmax_group / US_SC_TC + 1;           // column tiles this thread block walks

    for (int e = tid; e < RG; e += US_SC_THREADS) {
        rm[e] = -INFINITY;
        rl[e] = 0.0f;
    }
    // (No barrier here: us_logits_tile's first __syncthreads orders these before any read.)
    float acc[US_SC_MR][US_SC_MC];
    for (int t = 0; t < ntg; ++t) {
        const int c0 = t * US_SC_TC;
        for (int r0 = rg0; r0 < rg0 + RG; r0 += US_SC_TR) {
            if (tid < US_SC_TR) {  // last visible column of each row, relative to the tile
                const int r = r0 + tid;
                vis[tid] = (r < R) ? us_last_visible_key(r, R, C, nq, nk, c_q, c_k, causal) - c0 : -1;
            }
            us_logits_tile(q, k, R, C, D, r0, c0, acc);  // its barriers also publish vis
#pragma unroll
            for (int a = 0; a < US_SC_MR; ++a) {
                const int cm = vis[US_ROW(a)];
                float mt = -INFINITY;  // max of this thread's visible logits of row a in the tile
#pragma unroll
                for (int bb = 0; bb < US_SC_MC; ++bb)
                    if (US_COL(bb) <= cm) mt = fmaxf(mt, scale * acc[a][bb]);
                red[US_ROW(a) * US_SC_T + tx] = mt;
            }
            __syncthreads();  // (1) the 16 partial maxima of every row are in red before the merge
            if (tid < US_SC_TR) {  // one thread per row: M[r, t], and l_r rescaled to it
                const int lr = r0 - rg0 + tid, r = r0 + tid;
                float mx = -INFINITY;
                for (int u = 0; u < US_SC_T; ++u) mx = fmaxf(mx, red[tid * US_SC_T + u]);
                const float mold = rm[lr], mnew = fmaxf(mold, mx);
                if (mnew != mold) {  // mold = -inf only before the row's first visible key: l_r = 0 then
                    rl[lr] *= expf(mold - mnew);
                    rm[lr] = mnew;
                }
                mcur[tid] = mnew;
                if (r < R) th[(long long)t * R + r] = mnew;
            }
            __syncthreads();  // (2) mcur is complete before every thread exponentiates with it
#pragma unroll
            for (int a = 0; a < US_SC_MR; ++a) {
                const float mr = mcur[US_ROW(a)];
                const int cm = vis[US_ROW(a)];
#pragma unroll
                for (int bb = 0; bb < US_SC_MC; ++bb)
                    ptile[US_ROW(a)][US_COL(bb)] = (US_COL(bb) <= cm) ? expf(scale * acc[a][bb] - mr) : 0.0f;
            }
            __syncthreads();  // (3) the exp tile is complete before the piece sums read other threads' entries
            for (int e = tid; e < US_SC_TR * NKS; e += US_SC_THREADS) {
                const int row = e / NKS, kk = e % NKS, r = r0 + row;
                float s = 0.0f;
                for (int u = 0; u < KBe; ++u) s += ptile[row][kk * KBe + u];  // fixed order
                esum[e] = s;
                if (r < R) ph[((long long)t * R + r) * NKS + kk] = s;
            }
            __syncthreads();  // (4) esum is complete before the row sums read it
            if (tid < US_SC_TR) {
                const int lr = r0 - rg0 + tid;
                float s = 0.0f;
                for (int kk = 0; kk < NKS; ++kk) s += esum[tid * NKS + kk];
                rl[lr] += s;
            }
            // No barrier needed here: vis is next written by a thread past (4), after every read
            // of it (before (3)); red, mcur, ptile and esum only after the next us_logits_tile's
            // barriers, and esum after the next (1)-(3) as well.
        }
    }
    __syncthreads();  // (5) m_r, l_r are final, and this block's scratch writes (global memory) are
                      // visible to all its threads
    for (int e = tid; e < ntg * RG; e += US_SC_THREADS) {  // M[r, t] -> w[r, t], in place
        const int t = e / RG, lr = e % RG, r = rg0 + lr;
        if (r < R) {
            const long long ix = (long long)t * R + r;
            th[ix] = expf(th[ix] - rm[lr]) / rl[lr];
        }
    }
    __syncthreads();  // (6) every w of this thread block is written before the block sums read them
    const int nj = min(nKb, us::cdiv(ntg * US_SC_TC, KB));  // key blocks the walk reached
    const int npieces = ntg * NKS;
    for (int e = tid; e < NQ * nj; e += US_SC_THREADS) {
        const int qq = e / nj, j = e % nj, i = rg0 / RB + qq;
        if (i >= nQb) continue;
        const int ra = i * RB, rb = min(R, ra + RB);
        const int p0 = j * SPB, p1 = min(p0 + SPB, npieces);
        float s = 0.0f;
        for (int r = ra; r < rb; ++r) {  // fixed order: rows ascending; in a row, pieces ascending
            float sr = 0.0f;
            for (int p = p0; p < p1; ++p) {
                const int t = p / NKS, kk = p % NKS;
                sr += ph[((long long)t * R + r) * NKS + kk] * th[(long long)t * R + r];
            }
            s += sr;
        }
        scores[((long long)bh * nQb + i) * nKb + j] = s / (float)(rb - ra);
    }
}
