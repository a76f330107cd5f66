// scores.cu: block importance scores from composite tokens (SPEC section 4), in one pass.
// Version 4 (us_scores_mma, tensor cores, the default) is described in its own section below;
// this header describes the algorithm both versions share, as version 3 (us_scores_onepass) runs it.
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
// Both versions read the composite keys centred first (us_center_keys, below: Kc[c] - kbar, the
// same softmax, smaller float32 logits). Nothing of size [R, C] is ever stored. Every sum is taken in a fixed order (no atomics):
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
// | (version 3, fp32    |                      |         | logits tile) + dynamic (below)         |
// | FMA; for S/c_q >    |                      |         |                                        |
// | 128 or D > 160)     |                      |         |                                        |
// | us_center_keys      | (segments * ceil(W / | 32 x 8  | static 1 KiB (8 partial sums per d)    |
// | (both versions)     | 256), ceil(D/32))    |         |                                        |
// | us_split_rows       | (ceil(rows/4))       | 128     | none (one warp per composite row)      |
// | us_scores_mma<NW,   | (slots): persistent, | 32*NW   | dynamic: Q tile + 1-2 K tiles of split |
// | VAR, P> (version 4, | items from a counter |         | rows + factors (version 4 section;     |
// | tensor cores,       | (batch), or from a   |         | scores.py mma_launch_config, and       |
// | default P = 2)      | packed work list     |         | packed_launch_config: the same bytes)  |
// Version 3's dynamic shared memory (floats): TR*(TC+1) + TR*16 + TR*NKS + 2*TR + 2*RG (one TR
// of them int), computed by unisparse_ref/cupy_backend/scores.py (launch_config).
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

// Step 0 of both versions: the composite keys, centred (us_center_keys; scores.py center_keys).
// The row softmax is unchanged when every logit of row r moves by the same amount, and
//   scale * Qh[r] . (Kc[c] - kbar) = x[r, c] - scale * Qh[r] . kbar      for ANY vector kbar,
// so subtracting one vector per (sequence, KV head) from all its composite keys leaves SPEC 4's
// A[r, c] and the scores unchanged in exact arithmetic. In float32 it matters: a logit of
// magnitude 64-128 carries a rounding error up to ulp(x)/2 = 3.8e-6 (the dot product's own
// roundings come on top), and dA = A (1 - A) dx then reaches score_eps = 1e-6 for a row split
// between two keys. Keys with a large common component (real models' keys, the structured
// workloads' shared direction) make exactly such logits; subtracting their mean removes the
// common part before any rounding (SageAttention's "smooth K"). On the shared battery this takes
// the largest score error of float32 logits from 1.4e-6 to 5e-7 (docs/gpu_results/estimator.md).
// kbar = the mean of the first min(W, US_KREF) columns (every column is shifted): columns past
// the first US_KREF do not change it, so scoring a prefix of the keys (a chunk of a chunked
// prefill, a rank of context parallelism) centres with the same kbar as the whole.
// Sums in a fixed order (each thread its rows ascending, then the 8 partial sums ascending), so
// repeated runs are bit-identical; every block recomputes kbar (at most US_KREF rows) instead of
// waiting for another block.
// Layouts: batch (cu null): k [B, Hkv, W, D], segment s = b*Hkv + h, column c at (s*W + c)*D.
// Packed (cu = composite-key offsets, int32 [nseq + 1]; W = the longest sequence's columns):
// k [total_c, Hkv, D], segment s = i*Hkv + h, W_i = cu[i+1] - cu[i], column c at
// ((cu[i] + c)*Hkv + h)*D. out has k's layout (it may not alias k).
// grid (segments * ceil(W/US_KC_ROWS), ceil(D/32)), block (32, 8): thread (x, y) owns
// d = 32*blockIdx.y + x; the block writes columns [chunk*US_KC_ROWS, +US_KC_ROWS) of its segment.
#ifndef US_KREF
#define US_KREF 64
#endif
#ifndef US_KC_ROWS
#define US_KC_ROWS 256
#endif
__global__ void __launch_bounds__(256)
us_center_keys(const float* __restrict__ k, float* __restrict__ out, const int* __restrict__ cu, int Hkv, int W,
               int D) {
    __shared__ float partial[8][32];
    const int nchunk = max(1, us::cdiv(W, US_KC_ROWS));  // the grid is never empty (W = 0: one idle chunk)
    const int s = blockIdx.x / nchunk, chunk = blockIdx.x % nchunk;
    const int x = threadIdx.x, y = threadIdx.y, d = blockIdx.y * 32 + x;
    long long base, stride;
    int n;
    if (cu == nullptr) {
        base = (long long)s * W * D;
        stride = D;
        n = W;
    } else {
        const int i = s / Hkv, h = s % Hkv;
        base = ((long long)cu[i] * Hkv + h) * D;
        stride = (long long)Hkv * D;
        n = cu[i + 1] - cu[i];
    }
    const int c0 = chunk * US_KC_ROWS, c1 = min(n, c0 + US_KC_ROWS);
    if (c0 >= c1) return;  // block-uniform: a packed sequence shorter than this chunk
    const int nref = min(n, US_KREF);
    float acc = 0.0f;
    if (d < D)
        for (int c = y; c < nref; c += 8) acc += k[base + c * stride + d];
    partial[y][x] = acc;
    __syncthreads();  // the 8 partial sums of every d are in shared memory before each thread adds them
    float kbar = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) kbar += partial[j][x];
    kbar /= (float)nref;
    if (d < D)
#pragma unroll 4
        for (int c = c0 + y; c < c1; c += 8) out[base + c * stride + d] = k[base + c * stride + d] - kbar;
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

// ===================================================================================== version 4
// us_scores_mma<NW, VAR, P>: the same one-pass algorithm (online row softmax, per-(row, tile)
// key-block piece sums e[r, t, k] and tile maxima M[r, t], rescaled by w[r, t] after the walk) with
// the logits on the tensor cores (mma.sync.m16n8k16, f16 inputs, f32 accumulation; sm_80 and later).
//
// Precision split (P fp16 parts). us_split_rows writes every composite row x (Qh rows and Kc rows) as
//   x = 2^-e * (x1 + x2 [+ x3]),  x1 = fp16(2^e x),  x2 = fp16(2^e x - x1),  x3 = fp16(2^e x - x1 - x2),
// with one power of two 2^e per row chosen so that max_d |2^e x_d| lies in [2^14, 2^15): the parts
// stay in fp16's normal range except for elements far below the row maximum, whose absolute error
// (2^-25 in scaled units) is 2^-39 of the row maximum. Each residual is exact in float32.
//   P = 3: x1 + x2 + x3 holds a float32 x exactly (33 >= 24 significant bits); the logit
//     scale * 2^-(e_r + e_c) * sum_{i+j<=2} q_i . k_j takes six products per k-step (the dropped
//     ones are below 2^-33 relative). Each 32-wide chunk of d is summed from zero in a partial
//     (twelve mma, smallest terms first) and added to the accumulator with one float32 add, so no
//     chain of tensor-core sums (whose rounding the hardware does not promise to be to nearest)
//     is longer than twelve. One m16 tile (16 rows) per warp.
//   P = 2 (default): x1 + x2 carries 22 significant bits (error <= 2^-22 |x|); three products per
//     k-step (q1.k1 + q1.k2 + q2.k1), half the products; two m16 tiles (32 rows) per warp. On the
//     raw keys its scores were off by up to 1.5e-6 on structured D = 16 cases (logits up to 72);
//     on the centred keys (us_center_keys) the largest error over the GPU test cases is 4.9e-7
//     (three parts: 3.1e-7; H200, docs/gpu_results/estimator.md), within score_eps = 1e-6.
// The powers of two are exact. Logits are kept in base 2 (scale * log2(e) folded into the row
// factor) and exponentiated with ex2.approx (relative error about 2^-22). The backend's
// score_eps and the measured errors: docs/gpu_results/estimator.md.
//
// Operand layout (written by us_split_rows, copied unchanged to shared memory with cp.async): a
// row of D elements is padded with zeros to Dp = 32 * ceil(D/32) and stored as Dp*P/2 32-bit
// words; for each 32-wide chunk kc of d and each lane quarter q = lane % 4 there are 4P words:
// 4 of each part in turn, each word a pair of halves at d = kc*32 + {2q, 2q+8, 16+2q, 24+2q}
// (+0, +1). Those are exactly the d a thread of mma.m16n8k16 needs for its A row (registers
// a0/a2, then the next k-step's) and for its B column (b0/b1), so one 16-byte shared load gives a
// thread one part's fragment of two k-steps, for A as for B (the k order is permuted identically
// in Q and K, which leaves the dot product unchanged). Shared rows are padded (us_sm_row_bytes)
// so that the 8 lanes of each quarter-warp phase hit 8 different 16-byte bank groups.
//
// Work: a persistent grid of `slots` thread blocks, NW warps each; a work item is RG = 16*MT*NW
// composite rows (MT = 1 with P = 3, 2 with P = 2; whole query blocks: RB = S/c_q <= RG) of one
// mask head, taken longest first (causal: the last row tiles first) from an atomic counter. Warp
// w owns rows WR*w .. WR*w + WR-1 of the item (WR = 16*MT) and all TC = 64 columns of a tile
// (eight n8 tiles). A warp skips a column tile none of its rows can see. The scratch is per slot
// ([slots, ntiles, RG, NKS] and [slots, ntiles, RG]), reused by each item the slot takes: at
// 131072 tokens (P = 3: 132 slots) 74 MiB instead of version 3's 1.1 GiB.
// Every sum is taken in a fixed order and no item depends on another: which slot runs an item
// changes nothing, and repeated runs are bit-identical.
//
// Packed mode (serving layouts, docs/layers/serving.md; unisparse_ref/cupy_backend/scores.py
// packed_launch_config builds both tables on the host, launch_scores_packed launches): a batch of
// sequences i = 0 .. nseq-1 packed along the token axis, sequence i with N_q,i queries and N_k,i keys
// (bottom-right causal per sequence), R_i = ceil(N_q,i / c_q) composite queries at rows
// cu_r[i] .. cu_r[i+1]-1 of q_c [total_r, Hm, D], C_i = ceil(N_k,i / c_k) composite keys at rows
// cu_c[i] .. of k_c [total_c, Hkv, D] (centred per (sequence, KV head) by us_center_keys), and
// nQb_i = ceil(N_q,i / S) score rows from cu_qb[i] in scores [Hm, total_qb, sW]. Each sequence is
// its own SPEC 4 problem with B = 1. One launch covers them all:
//   descriptor table desc int32 [nseq][8]:  {R_i, W_i = C_i, N_q,i, N_k,i, cu_r[i], cu_c[i], cu_qb[i], 0}
//   work list        wlist int32 [nwork][2]: {i, x} for every row tile x < ceil(R_i / RG) of every
//                    sequence, sorted longest first ACROSS the sequences: by the column tiles the
//                    tile's last row walks, ntg = last_col(min((x+1) RG, R_i) - 1) / TC + 1,
//                    descending (ties: sequence ascending, then x descending);
//   work item        item = e * Hm + g: entry e = item / Hm, mask head g = item % Hm (the heads of
//                    one row tile together, as in the batch mode).
// Item (i, x, g) is the batch mode's item (row tile x, head g) of sequence i run alone: the same
// rows, columns, visibility (SPEC 4 with N_q,i, N_k,i), the same sums in the same order; only the
// addresses differ (Q row r: split row (cu_r[i] + r) Hm + g; key column c: (cu_c[i] + c) Hkv + h;
// score (qi, j): (g total_qb + cu_qb[i] + qi) sW + j). So each sequence's packed scores are bit for
// bit those of the batch launch on that sequence's composite tokens (tests/test_cupy_scores.py).
// The per-slot scratch is sized for the widest sequence (ntiles = ceil(max_i C_i / TC)). A
// sequence without queries has no entry; score entries past nKb_i are never written (zeros).
// The mode is a run-time switch on wlist (a null pointer: batch), uniform over the launch; it adds
// no barrier.
//
// VAR = true (research variants, not SPEC; unisparse_ref/reference/scores.py variant_log_weights):
// column j of the walk is key column j of k_c, whose first T = sink_tokens columns are the un-pooled
// sink keys; the logit gets an additive log-weight (base e)
//   lw[r, j] = colw[j] + (j - j0[r] in [0, NB) ? band[r, j - j0[r]] : 0)
// (colw: log of the keys a column stands for; band: the diagonal correction of row r, NB columns
// from j0[r]; -inf makes a column invisible). Key block of column j: 0 for j < T, else
// (j - T) * c_k / S: key blocks are no longer aligned with the tiles, so VAR uses one piece per
// column (KBe = 1) and the block sums map pieces to key blocks through that formula.
#ifndef US_SM_TC
#define US_SM_TC 64
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define US_SM_DEVICE 1
#endif

namespace usm {
#ifdef US_SM_DEVICE
__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31; }
// D (4 floats) += A (16x16, f16, 4 registers) * B (16x8, f16, 2 registers)
__device__ __forceinline__ void mma(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                    unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// 16 bytes global -> shared, asynchronously; zeros when !valid (src-size 0 reads nothing).
__device__ __forceinline__ void cp16(void* smem, const void* gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ unsigned half_bits(float x) { return (unsigned)__half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ float half_value(unsigned bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }
__device__ __forceinline__ int next_item(int* counter) { return atomicAdd(counter, 1); }
#else
// Host emulation (tests/test_cupy_compile.py builds this file with g++, one std::thread per CUDA
// thread): warp-collective operations exchange through per-warp buffers between two warp barriers.
}  // namespace usm
#include <condition_variable>
#include <mutex>
struct uint4 { unsigned x, y, z, w; };
namespace usm {
struct WarpBarrier {
    std::mutex mu;
    std::condition_variable cv;
    int count = 0;
    unsigned long gen = 0;
    void wait() {
        std::unique_lock<std::mutex> lk(mu);
        const unsigned long g = gen;
        if (++count == 32) { count = 0; ++gen; cv.notify_all(); }
        else cv.wait(lk, [&] { return gen != g; });
    }
};
static WarpBarrier warp_bar[32];
static unsigned xa[1024][6];
static float xf[1024];
inline unsigned flat_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline unsigned lane_id() { return flat_tid() & 31; }
inline void warp_sync() { warp_bar[flat_tid() / 32].wait(); }
inline float half_value(unsigned h) {
    const unsigned s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? std::ldexp((float)m, -24) : std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline unsigned half_bits(float x) {  // round to nearest even; |x| < 65520 here
    const unsigned s = std::signbit(x) ? 0x8000u : 0u;
    const double a = std::fabs((double)x);
    if (a == 0.0) return s;
    int ex;
    std::frexp(a, &ex);                                   // a = f * 2^ex, f in [0.5, 1)
    const int q = std::max(ex - 11, -24);                 // quantum: 2^(ex-11) normal, 2^-24 subnormal
    const double n = std::nearbyint(std::ldexp(a, -q));   // the current rounding mode is to-nearest-even
    const double v = std::ldexp(n, q);
    int e2;
    std::frexp(v, &e2);
    if (e2 - 1 < -14) return s | (unsigned)std::ldexp(v, 24);                          // subnormal
    return s | (unsigned)((e2 - 1 + 15) << 10) | ((unsigned)std::ldexp(v, 11 - e2) & 1023u);
}
inline void mma(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    const unsigned t = flat_tid(), lane = t & 31, w0 = t - lane;
    xa[t][0] = a0; xa[t][1] = a1; xa[t][2] = a2; xa[t][3] = a3; xa[t][4] = b0; xa[t][5] = b1;
    warp_sync();
    const unsigned g = lane >> 2, q = lane & 3;
    auto A = [&](unsigned row, unsigned k) {  // a0: (g, 2q..), a1: (g+8, 2q..), a2: (g, 2q+8..), a3: (g+8, 2q+8..)
        const unsigned src = w0 + (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
        return half_value((xa[src][reg] >> (16 * (k & 1))) & 0xffffu);
    };
    auto B = [&](unsigned k, unsigned col) {  // b0: (k 2q.., col g), b1: (k 2q+8.., col g)
        const unsigned src = w0 + col * 4 + (k % 8) / 2, reg = 4 + (k >= 8);
        return half_value((xa[src][reg] >> (16 * (k & 1))) & 0xffffu);
    };
    float out[4];
    for (unsigned e = 0; e < 4; ++e) {
        const unsigned row = g + 8 * (e >= 2), col = 2 * q + (e & 1);
        double s = 0.0;
        for (unsigned k = 0; k < 16; ++k) s += (double)A(row, k) * (double)B(k, col);
        out[e] = (float)((double)c[e] + s);
    }
    warp_sync();
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}
inline float shfl_xor(float v, int m) {
    const unsigned t = flat_tid();
    xf[t] = v;
    warp_sync();
    const float r = xf[t ^ (unsigned)m];
    warp_sync();
    return r;
}
inline float ex2(float x) { return std::exp2(x); }
inline void cp16(void* smem, const void* gmem, bool valid) {
    if (valid) memcpy(smem, gmem, 16); else memset(smem, 0, 16);
}
inline void cp_commit() {}
template <int N> inline void cp_wait() {}
inline int next_item(int* counter) { return (*counter)++; }  // one thread of one block at a time
#endif

// Last composite key visible to composite query r (SPEC 4), as us_last_visible_key.
__device__ __forceinline__ int last_key(int r, int R, int C, int nq, int nk, int c_q, int c_k, int causal) {
    return us_last_visible_key(r, R, C, nq, nk, c_q, c_k, causal);
}
}  // namespace usm

// Split rows of x (float32 [rows, D]) into P fragment-ordered fp16 parts (see the header; out:
// uint32 [rows, Dp*P/2]) and the row factor fac[row] = 2^-e. One warp per row; block 128.
// Parts: v = 2^e x, h1 = fp16(v), h2 = fp16(v - h1), h3 = fp16(v - h1 - h2); each residual is
// exact in float32 (it has at most 13, then 2, significant bits).
__global__ void __launch_bounds__(128)
us_split_rows(const float* __restrict__ x, unsigned* __restrict__ out, float* __restrict__ fac, int rows, int D,
              int Dp, int P) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 4 + warp;
    const bool valid = row < rows;  // warp-uniform (the host emulation's shuffles need the whole warp)
    const float* xr = x + (valid ? row : 0) * D;
    float amax = 0.0f;
    if (valid)
        for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(xr[d]));
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) amax = fmaxf(amax, usm::shfl_xor(amax, m));
    if (!valid) return;
    int ex = 0;
    if (amax > 0.0f && amax <= 3.4e38f) frexpf(amax, &ex);   // amax = f * 2^ex, f in [0.5, 1)
    const int e = (amax > 0.0f && amax <= 3.4e38f) ? max(-60, min(60, 15 - ex)) : 0;  // 2^e amax in [2^14, 2^15)
    if (lane == 0) fac[row] = ldexpf(1.0f, -e);
    // 2^e as a float (|e| <= 60: a normal number): x * p is ldexpf(x, e) bit for bit (a product
    // with a power of two is exact, or correctly rounded where it lands below the normal range,
    // as ldexpf's is), without ldexpf's software path for every element.
    const float p = ldexpf(1.0f, e);
    const int words = Dp * P / 2;  // per row: Dp/32 chunks x 4 lane quarters x 4P words
    unsigned* o = out + row * words;
    for (int w = lane; w < words; w += 32) {
        const int kc = w / (16 * P), within = w % (16 * P), q = within / (4 * P), part = (within / 4) % P;
        const int j = within & 3;
        const int d = kc * 32 + (j >> 1) * 16 + (j & 1) * 8 + 2 * q;
        float v0 = d < D ? xr[d] * p : 0.0f, v1 = d + 1 < D ? xr[d + 1] * p : 0.0f;
        unsigned h0 = usm::half_bits(v0), h1 = usm::half_bits(v1);
        for (int i = 0; i < part; ++i) {  // the residuals down to this part
            v0 -= usm::half_value(h0);
            v1 -= usm::half_value(h1);
            h0 = usm::half_bits(v0);
            h1 = usm::half_bits(v1);
        }
        o[w] = h0 | (h1 << 16);
    }
}

// Bytes of one row in shared memory: the P parts' 2*P*Dp bytes, padded so that the 8 lanes of a
// quarter-warp phase (rows g, g+1; lane quarters q = 0..3 at 16*P bytes apart) hit 8 different
// 16-byte bank groups: the row stride is 16 (P = 2) or 64 (P = 3) modulo 128 bytes.
__device__ __forceinline__ int us_sm_row_bytes(int Dp, int P) {
    return P == 2 ? 4 * Dp + 16 : 6 * Dp + ((64 - (6 * Dp) % 128) & 127);
}

// Dynamic shared memory of us_scores_mma (bytes), laid out in this order:
//   Q tile  RG rows x rowb bytes;  K tiles  stages x TC rows x rowb bytes (rowb: us_sm_row_bytes);
//   qf[RG], kf[stages][TC], kw[stages][TC], rm[RG], rl[RG] (floats); item (int, 16 bytes).
// unisparse_ref/cupy_backend/scores.py (mma_launch_config) computes the same number.

// The one-pass scores on the tensor cores (see the header of version 4). grid (slots), block
// (32*NW). Two modes, switched at run time by wlist (the same body, the same arithmetic per item):
// * batch (wlist null): qs/ks, qf/kf: us_split_rows of Qh [B*Hm*R, D] and of Kc [B*Hkv*W, D]
//   (W = C columns, or T + C with the sink variant); the geometry R, W, nq, nk is the arguments'.
//   scores: float32 [B, Hm, nQb, nKb], zero-initialised.
// * packed (wlist not null; VAR = false only, no sinks): qs/qf split rows of Qh = q_c
//   [total_r, Hm, D] and ks/kf of the centred Kc = k_c [total_c, Hkv, D] in memory order (row
//   (cu_r[i] + r)*Hm + g, column (cu_c[i] + c)*Hkv + h: no copy); each item reads its geometry
//   from the descriptor table (see "Packed mode" above); R, W, nq, nk are unused. scores:
//   float32 [Hm, total_qb, sW] (the packed layout, row stride sW = max(1, max_i nKb_i)),
//   zero-initialised; entries past nKb_i stay 0.
// part/tmax: per-slot scratch [slots, ntiles, RG, NKS] / [slots, ntiles, RG] (ntiles of the widest
// sequence in the packed mode). counter: int32, zero. colw/j0/band: VAR only (see the header),
// else null.
template <int NW, bool VAR, int P>
__global__ void __launch_bounds__(32 * NW, 1)
us_scores_mma(const unsigned* __restrict__ qs, const float* __restrict__ qfac, const unsigned* __restrict__ ks,
              const float* __restrict__ kfac, float* __restrict__ scores, float* __restrict__ part,
              float* __restrict__ tmax, int* __restrict__ counter, int BH, int Hm, int Hkv, int R_b, int W_b,
              int Dp, int nq_b, int nk_b, int c_q, int c_k, int c_h, int G, int S, int causal, float scale_log2, int stages,
              int ntiles, int T, const float* __restrict__ colw, const int* __restrict__ j0,
              const float* __restrict__ band, int NB, const int* __restrict__ desc, const int* __restrict__ wlist,
              int nwork, int total_qb, int sW) {
    static_assert(P == 2 || P == 3, "two or three fp16 parts");
    constexpr int MT = P == 2 ? 2 : 1;  // m16 tiles per warp (registers: three parts hold more fragments)
    constexpr int TC = US_SM_TC, NT = TC / 8, WR = 16 * MT, RG = WR * NW, THREADS = 32 * NW;
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ __align__(16) unsigned char us_sm_dyn[];
    const int rowb = us_sm_row_bytes(Dp, P), KC = Dp / 32, rwords = Dp * P / 2;  // shared row bytes, global row words
    unsigned char* Qs = us_sm_dyn;
    unsigned char* Ks = Qs + RG * rowb;
    float* qf = reinterpret_cast<float*>(Ks + stages * TC * rowb);  // [RG] scale*log2(e)*2^-e_r
    float* kf = qf + RG;                                              // [stages][TC] 2^-e_c
    float* kw = kf + stages * TC;                                     // [stages][TC] VAR: colw of the tile
    float* rm = kw + stages * TC;                                     // [RG] final m_r (base 2)
    float* rl = rm + RG;                                              // [RG] final l_r
    int* item_s = reinterpret_cast<int*>(rl + RG);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31, g = lane >> 2, q = lane & 3;
    const int RB = S / c_q, KB = S / c_k;
    const int KBe = VAR ? 1 : min(KB, TC), NKS = TC / KBe, SPB = VAR ? 1 : KB / KBe;
    const bool packed = wlist != nullptr;                      // uniform: the mode of the whole launch
    const int nrt_b = us::cdiv(R_b, RG);                       // batch: row tiles per head
    const int nitems = packed ? nwork * Hm : BH * nrt_b;
    float* pe = part + (long long)blockIdx.x * ntiles * RG * NKS;  // this slot's e [ntiles][RG][NKS]
    float* tm = tmax + (long long)blockIdx.x * ntiles * RG;        // this slot's M, then w [ntiles][RG]

    for (;;) {
        if (tid == 0) *item_s = usm::next_item(counter);
        __syncthreads();  // (1) the item index is in shared memory before every thread reads it
        const int item = *item_s;
        if (item >= nitems) break;
        // The item's geometry: its row tile x of mask head gh of sequence (batch: b) with R composite
        // queries, W key columns, nq queries and nk keys; Q row r is split row qrow + r*qstr, key
        // column c is split row krow + c*kstr, score (i, j) is scores[sbase + i*sstr + j].
        int x, gh, kvh, R, W, nq, nk, qstr, kstr, sstr;
        long long qrow, krow, sbase;
        if (!packed) {  // longest items (last row tiles) first; a row tile's BH heads together
            x = nrt_b - 1 - item / BH;
            const int bh = item % BH, b = bh / Hm;
            gh = bh % Hm;
            kvh = (gh * c_h) / G;
            R = R_b, W = W_b, nq = nq_b, nk = nk_b;
            qrow = (long long)bh * R, qstr = 1;
            krow = ((long long)b * Hkv + kvh) * W, kstr = 1;
            sstr = us::cdiv(nk, S), sbase = (long long)bh * us::cdiv(nq, S) * sstr;
        } else {  // work-list entry item / Hm (already longest first), head item % Hm
            const int* wk = wlist + 2 * (item / Hm);
            const int* dsc = desc + 8 * wk[0];
            x = wk[1];
            gh = item % Hm;
            kvh = (gh * c_h) / G;
            R = dsc[0], W = dsc[1], nq = dsc[2], nk = dsc[3];
            qrow = (long long)dsc[4] * Hm + gh, qstr = Hm;
            krow = (long long)dsc[5] * Hkv + kvh, kstr = Hkv;
            sstr = sW, sbase = ((long long)gh * total_qb + dsc[6]) * sW;
        }
        const int C = W - T;  // composite key columns
        const int nQb = us::cdiv(nq, S), nKb = us::cdiv(nk, S);
        // Last key column (of the W) visible to row r: composite rule of SPEC 4, shifted by the T sinks
        // (a sink s is visible when s <= p(last(r)), always true for s < T <= c_k when composite 0 is).
        auto last_col = [&](int r) { return T + usm::last_key(r, R, C, nq, nk, c_q, c_k, causal); };
        const int r0 = x * RG;
        const long long qstep = (long long)qstr * rwords, kstep = (long long)kstr * rwords;  // words per row
        const unsigned char* qsrc = reinterpret_cast<const unsigned char*>(qs + qrow * rwords);
        const unsigned char* ksrc = reinterpret_cast<const unsigned char*>(ks + krow * rwords);
        const float* kfh = kfac + krow;
        const int cmax = last_col(min(r0 + RG, R) - 1);
        const int ntg = cmax / TC + 1;  // column tiles of this item
        const int wlast = last_col(min(r0 + WR * warp + WR - 1, R - 1));  // this warp's last visible column

        // Q tile (and its factors), then K tile 0: one cp.async group.
        const int chunks = rwords / 4;  // 16-byte chunks per row
        for (int e = tid; e < RG * chunks; e += THREADS) {
            const int row = e / chunks, ch = e % chunks, r = r0 + row;
            usm::cp16(Qs + row * rowb + ch * 16, qsrc + ((long long)min(r, R - 1) * qstep + ch * 4) * 4, r < R);
        }
        for (int e = tid; e < RG; e += THREADS) {
            const int r = r0 + e;
            qf[e] = r < R ? scale_log2 * qfac[qrow + (long long)r * qstr] : 0.0f;
        }
        auto load_k = [&](int t, int st) {
            unsigned char* dst = Ks + st * TC * rowb;
            for (int e = tid; e < TC * chunks; e += THREADS) {
                const int col = e / chunks, ch = e % chunks, c = t * TC + col;
                usm::cp16(dst + col * rowb + ch * 16, ksrc + ((long long)min(c, W - 1) * kstep + ch * 4) * 4, c < W);
            }
            for (int e = tid; e < TC; e += THREADS) {
                const int c = t * TC + e;
                kf[st * TC + e] = c < W ? kfh[(long long)c * kstr] : 0.0f;
                if (VAR) kw[st * TC + e] = c < W ? colw[c] : 0.0f;
            }
            usm::cp_commit();
        };
        load_k(0, 0);

        // This thread's rows: (mt, h) -> local row 32*warp + 16*mt + 8*h + g.
        float m_run[MT][2], l_run[MT][2];
        int lastc[MT][2];
        long long plast[MT][2];  // VAR: p(last(r)), the sinks' visibility
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + WR * warp + 16 * mt + 8 * h + g;
                m_run[mt][h] = -INFINITY;
                l_run[mt][h] = 0.0f;
                lastc[mt][h] = r < R ? last_col(r) : -1;
                plast[mt][h] = us::qpos(min((long long)(min(r, R - 1) + 1) * c_q, (long long)nq) - 1, nq, nk);
            }

        for (int t = 0; t < ntg; ++t) {
            const int st = stages == 2 ? (t & 1) : 0;
            if (stages == 2) {
                if (t + 1 < ntg) load_k(t + 1, (t + 1) & 1);
                else usm::cp_commit();  // an empty group keeps the count of pending groups uniform
                usm::cp_wait<1>();      // this thread's copies of tile t (and of Q) have landed
            } else {
                usm::cp_wait<0>();
            }
            __syncthreads();  // (2) tile t, its factors (and Q, qf) are complete for every thread
            const int c0 = t * TC;
            if (c0 <= wlast) {  // warp-uniform: some row of this warp sees a column of tile t
                float acc[MT][NT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NT; ++n)
#pragma unroll
                        for (int i = 0; i < 4; ++i) acc[mt][n][i] = 0.0f;
                const unsigned char* Kt = Ks + st * TC * rowb;
                for (int kc = 0; kc < KC; ++kc) {
                    uint4 a[MT][2][P];  // [mt][h][part]: rows g and g+8, words x, y (k-step 0) and z, w (k-step 1)
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const uint4* pa = reinterpret_cast<const uint4*>(
                                Qs + (WR * warp + 16 * mt + 8 * h + g) * rowb + kc * 64 * P + q * 16 * P);
#pragma unroll
                            for (int i = 0; i < P; ++i) a[mt][h][i] = pa[i];
                        }
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        const uint4* pb = reinterpret_cast<const uint4*>(Kt + (n * 8 + g) * rowb + kc * 64 * P + q * 16 * P);
                        uint4 bw[P];
#pragma unroll
                        for (int i = 0; i < P; ++i) bw[i] = pb[i];
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            // P = 3: the chunk's 32 d in a zeroed partial, added to the accumulator once
                            // (a float32 add), so that no chain of tensor-core sums is longer than 12.
                            // P = 2 accumulates in place (its registers are spent; its error is the
                            // 2^-22 representation's anyway).
                            float t4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                            float* tgt = P == 3 ? t4 : acc[mt][n];
#pragma unroll
                            for (int ks = 0; ks < 2; ++ks)
#pragma unroll
                                for (int o = P - 1; o >= 0; --o)  // parts of order o: i + j = o, small terms first
#pragma unroll
                                    for (int i = 0; i <= o; ++i) {
                                        const int jj = o - i;
                                        const uint4 &a0 = a[mt][0][i], &a1 = a[mt][1][i], &bb = bw[jj];
                                        usm::mma(tgt, ks ? a0.z : a0.x, ks ? a1.z : a1.x, ks ? a0.w : a0.y,
                                                 ks ? a1.w : a1.y, ks ? bb.z : bb.x, ks ? bb.w : bb.y);
                                    }
                            if (P == 3)
#pragma unroll
                                for (int i = 0; i < 4; ++i) acc[mt][n][i] += t4[i];
                        }
                    }
                }
                const float* kft = kf + st * TC;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int lr = WR * warp + 16 * mt + 8 * h + g, r = r0 + lr;
                        const float rf = qf[lr];
                        const int cm = lastc[mt][h] - c0;  // last visible column, relative to the tile
                        float mx = -INFINITY;
#pragma unroll
                        for (int n = 0; n < NT; ++n)
#pragma unroll
                            for (int j = 0; j < 2; ++j) {
                                const int col = n * 8 + 2 * q + j;
                                float xv = acc[mt][n][2 * h + j] * rf * kft[col];  // base-2 logit
                                bool vis = col <= cm;
                                if (VAR) {  // sinks: visible when s <= p(last(r)); log-weights, -inf: not visible
                                    const int c = c0 + col;
                                    // rows past R see nothing (their j0, band entries do not exist)
                                    if (c < T) vis = r < R && (!causal || c <= plast[mt][h]);
                                    if (vis) {
                                        const int jb = c - j0[r];
                                        const float lw = kw[st * TC + col] + ((jb >= 0 && jb < NB) ? band[(long long)r * NB + jb] : 0.0f);
                                        xv += lw * LOG2E;
                                        vis = xv != -INFINITY;
                                    }
                                }
                                xv = vis ? xv : -INFINITY;
                                acc[mt][n][2 * h + j] = xv;
                                mx = fmaxf(mx, xv);
                            }
                        mx = fmaxf(mx, usm::shfl_xor(mx, 1));
                        mx = fmaxf(mx, usm::shfl_xor(mx, 2));
                        const float mold = m_run[mt][h], mnew = fmaxf(mold, mx);
                        if (mnew != mold) {  // mold = -inf only before the row's first visible key: l = 0 then
                            l_run[mt][h] *= usm::ex2(mold - mnew);
                            m_run[mt][h] = mnew;
                        }
                        // p = 2^(x - M[r, t]) of the visible columns, pair sums s[n] (columns 2q, 2q+1 of n8 tile n)
                        float s[NT], p[NT][2];
#pragma unroll
                        for (int n = 0; n < NT; ++n) {
#pragma unroll
                            for (int j = 0; j < 2; ++j) {
                                const float xv = acc[mt][n][2 * h + j];
                                p[n][j] = xv == -INFINITY ? 0.0f : usm::ex2(xv - mnew);
                            }
                            s[n] = p[n][0] + p[n][1];
                        }
                        float tot = 0.0f;  // the row's sum over the tile: thread's pairs ascending, then the quad
#pragma unroll
                        for (int n = 0; n < NT; ++n) tot += s[n];
                        tot += usm::shfl_xor(tot, 1);
                        tot += usm::shfl_xor(tot, 2);
                        l_run[mt][h] += tot;
                        float* per = pe + ((long long)t * RG + lr) * NKS;  // e[r, t, 0 .. NKS-1]
                        if (KBe == 1) {
                            if (r < R)
#pragma unroll
                                for (int n = 0; n < NT; ++n) {
                                    per[n * 8 + 2 * q] = p[n][0];
                                    per[n * 8 + 2 * q + 1] = p[n][1];
                                }
                        } else if (KBe == 2) {
                            if (r < R)
#pragma unroll
                                for (int n = 0; n < NT; ++n) per[n * 4 + q] = s[n];
                        } else if (KBe == 4) {
#pragma unroll
                            for (int n = 0; n < NT; ++n) {
                                const float v = s[n] + usm::shfl_xor(s[n], 1);
                                if (r < R && (q & 1) == 0) per[n * 2 + (q >> 1)] = v;
                            }
                        } else {  // KBe >= 8: piece k = n8 tiles [k*npt, (k+1)*npt), summed as a tree
                            const int npt = max(1, KBe / 8);
#pragma unroll
                            for (int lev = 1; lev < NT; lev *= 2)
                                if (npt > lev)  // block-uniform
#pragma unroll
                                    for (int n = 0; n + lev < NT; n += 2 * lev) s[n] += s[n + lev];
#pragma unroll
                            for (int n = 0; n < NT; ++n)
                                if (n % npt == 0) {  // block-uniform: s[n] holds piece n / npt of this thread
                                    float v = s[n];
                                    v += usm::shfl_xor(v, 1);
                                    v += usm::shfl_xor(v, 2);
                                    if (r < R && ((n / npt) & 3) == q) per[n / npt] = v;
                                }
                        }
                        if (r < R && q == 0) tm[(long long)t * RG + lr] = mnew;
                    }
            }
            __syncthreads();  // (3) every read of stage st is done before a later load_k refills it
            if (stages == 1 && t + 1 < ntg) load_k(t + 1, 0);
        }
        // After the walk: final m_r, l_r to shared memory (lanes q = 0 of each quad hold them).
        if (q == 0)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int lr = WR * warp + 16 * mt + 8 * h + g;
                    rm[lr] = m_run[mt][h];
                    rl[lr] = l_run[mt][h];
                }
        __syncthreads();  // (4) m_r, l_r and this block's scratch writes (global) are visible to all its threads
        for (int e = tid; e < ntg * RG; e += THREADS) {  // M[r, t] -> w[r, t] = 2^(M - m_r) / l_r, in place
            const int t = e / RG, lr = e % RG, r = r0 + lr;
            if (r < R && t * TC <= last_col(r)) {  // the tiles row r walked (a warp skips the others)
                const long long ix = (long long)t * RG + lr;
                tm[ix] = usm::ex2(tm[ix] - rm[lr]) / rl[lr];
            }
        }
        __syncthreads();  // (5) every w of this item is written before the block sums read them
        // scores[b, g, i, j] = (1/R_i) sum_{r in block i} sum_{pieces p of key block j} e[r, p] w[r, tile(p)]:
        // rows ascending, in a row pieces ascending. Pieces: KBe columns each (VAR: single columns,
        // key block of column c: 0 for c < T, else (c - T) / KB).
        const int NQ = RG / RB, wend = min(ntg * TC, W);
        const int nj = VAR ? min(nKb, (wend - 1 < T ? 0 : (wend - 1 - T) / KB) + 1)
                           : min(nKb, us::cdiv(ntg * TC, KB));
        for (int e = tid; e < NQ * nj; e += THREADS) {
            const int qq = e / nj, j = e % nj, i = r0 / RB + qq;
            if (i >= nQb) continue;
            const int ra = i * RB, rb = min(R, ra + RB);
            if (ra >= rb) continue;
            int p0, p1;
            if (VAR) {
                p0 = j == 0 ? 0 : T + j * KB;
                p1 = min(T + (j + 1) * KB, wend);
            } else {
                p0 = j * SPB;
                p1 = min(p0 + SPB, ntg * NKS);
            }
            float sacc = 0.0f;
            for (int r = ra; r < rb; ++r) {
                const int lr = r - r0, pl = min(p1, (last_col(r) / TC + 1) * NKS);
                float sr = 0.0f;
                for (int pp = p0; pp < pl; ++pp) {
                    const int t = pp / NKS, kk = pp % NKS;
                    sr += pe[((long long)t * RG + lr) * NKS + kk] * tm[(long long)t * RG + lr];
                }
                sacc += sr;
            }
            scores[sbase + (long long)i * sstr + j] = sacc / (float)(rb - ra);
        }
        __syncthreads();  // (6) the item's reads of shared memory and scratch are done before the next item
    }
}
