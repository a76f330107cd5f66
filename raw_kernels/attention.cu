// Block-sparse attention forward (SPEC section 6) for the CuPy backend.
//
// What every kernel here computes
// -------------------------------
// Inputs q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] (C-contiguous, element type T), and the
// block mask in FlexAttention's index form: kv_counts [B, Hm, nQb] and kv_indices
// [B, Hm, nQb, idx_stride] (ascending block indices, padded with -1). Query head h reads
// mask head h / c_h and KV head h / G (G = Hq / Hkv). Query row t (absolute position
// p(t) = t + Nk - Nq, bottom-right alignment) of query block i = t / S attends key s iff
// block s / S is listed for (b, h / c_h, i) and, when causal, s <= p(t). Then
//     out[t] = sum_s softmax(scale * q_t . k_s) v_s,   lse[t] = log(sum_s exp(scale * q_t . k_s))
// in float32 (natural log). A row with no allowed key gets out = 0 and lse = -inf (never
// NaN). Dense attention is the same kernel given every visible block.
//
// Every kernel walks the FlashAttention-2 way (paper notation): a CTA owns Br query rows
// (a slice of one query block, so one mask row), streams the selected key blocks through
// shared memory in tiles of Bc keys, and keeps per row the running maximum m_i, the
// running denominator l_i and the unnormalised output O_i (online softmax); at the end
// O_i / l_i is written in T and lse = m_i + log(l_i). Scores are carried in the base-2
// domain (scale * log2(e) folded in, exp2f), lse converted back to natural log.
// Accumulation is float32 throughout.
//
// Version table (the "kernel ladder"; unisparse_ref/cupy_backend/attention.py has the registry)
// ----------------------------------------------------------------------------------------------
// | ver | kernel                    | Br  | Bc | warps | what it adds                          |
// |-----|---------------------------|-----|----|-------|---------------------------------------|
// | v1  | us_attn_fwd_v1<T, D>      | <=64| 16 | 2     | one thread per query row, scalar FMA, |
// |     |                           |     |    |       | K/V tiles as float in shared memory;  |
// |     |                           |     |    |       | any S (multiple of 16), fp32/fp16/bf16|
// | v6  | us_attn_fwd_mma<T, D,     | 128 | 64 | 4     | tensor cores: mma.sync m16n8k16 (fp32 |
// |     |   4, 2, 64>               |     |    |       | accumulate), ldmatrix, XOR-swizzled   |
// |     |                           |     |    |       | smem (no bank conflicts), K/V double- |
// |     |                           |     |    |       | buffered by cp.async, causal/ragged   |
// |     |                           |     |    |       | mask only on boundary tiles; 32 rows  |
// |     |                           |     |    |       | per warp, so every K/V fragment read  |
// |     |                           |     |    |       | from smem feeds two MMAs (half the    |
// |     |                           |     |    |       | smem traffic per FLOP); Q fragments   |
// |     |                           |     |    |       | re-read from smem every k-step; 1-D   |
// |     |                           |     |    |       | longest-first grid. The fallback off  |
// |     |                           |     |    |       | Hopper                                |
// | v7  | us_attn_fwd_wgmma<T, D>   | 128 | 64 | 8     | Hopper wgmma (sm_90a): Q, K, V^T from |
// |     |                           |     |    |       | 128B-swizzled smem via descriptors,   |
// |     |                           |     |    |       | P from registers, V transposed in     |
// |     |                           |     |    |       | smem while S computes; <= 128 regs so |
// |     |                           |     |    |       | 2 CTAs/SM overlap softmax and MMA.    |
// |     |                           |     |    |       | DEFAULT on Hopper                     |
// Measured on an H200 (bf16, B=1, Hq=32, Hkv=8, causal, 32K, D=128; docs/performance.md):
// v6 274, v7 340 TFLOP/s; SDPA-FlashAttention-2 333-348. The rungs between them (v2-v5: Br 64
// or 128 with Q in registers, Bc 32, 8 warps, a 3-D grid; v8: v7 with one warpgroup per CTA)
// were slower and are retired; their timings are in docs/performance.md ("Retired kernels").
// v6 and v7 run a 1-D grid whose CTAs go in the order "batch, query tiles last-first, heads
// fastest" (longest causal rows first, GQA siblings together, sharing K/V tiles through L2), or
// from a work list sorted by mask-row length when the launcher is asked to (sort_work=True).
// float32 inputs always run v1 (tensor-core versions are fp16/bf16 only). The tensor-core
// versions need D in {64, 128} and S a multiple of Br and Bc; the launcher refuses others
// with a clear error (or falls back to v1 when asked for the default version).
//
// Kernel arguments (identical for every version, so the launcher builds one tuple):
//   q, k, v, kv_counts, kv_indices, work, out, lse,
//   Hq, Hkv, Hm, Nq, Nk, nQb, idx_stride, S, c_h, causal, n_qtiles, scale_log2
// `work` is an optional list of packed CTA tasks ((b * Hq + h) * n_qtiles + qtile), sorted by
// row length, for v6 and v7; nullptr gives the fixed order "batch, query tiles last-first,
// heads fastest" (causal rows grow with the tile index, so this is longest-first for causal
// masks without a sort). v1 ignores it and runs the 3-D grid (h, qtile, b).
//
// Element conversions (us::to_float, us::from_float, us::pack2) come from common.cuh.

#include "common.cuh"
// the wgmma wrappers of rung v7 (WgmmaSS, WgmmaRS, fence/commit/wait), shared with attention_hopper.cu
#include "wgmma.cuh"

namespace us_attn {

#define US_NEG_INF (__int_as_float(0xff800000))
#define US_LN2 0.6931471805599453f

// The block row of the mask for (b, h, query block i) and its visible prefix.
// kv_indices is ascending, so the blocks that start at or past key_lim (above the causal
// diagonal of this CTA's last row, or past Nk) form a suffix: a binary search finds how
// many blocks are visible.
__device__ __forceinline__ int visible_prefix(const int* idx, int cnt, int S, int key_lim) {
  int lo = 0, hi = cnt;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (idx[mid] * S < key_lim) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace us_attn

// =============================================================================== v1
// One CTA per (query tile of Br = blockDim.x rows, head h, batch b); thread r owns query
// row t = q0 + r: q_t (pre-scaled by scale*log2 e) and O_i in registers, m_i, l_i scalars.
// For each selected key block, tiles of V1_BC keys are staged in shared memory as float
// and every thread runs the online softmax over them with scalar FMAs. Obviously correct,
// slow; also the float32 path.
#define V1_BC 16

template <typename T, int D>
__global__ void __launch_bounds__(64) us_attn_fwd_v1(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ kv_counts, const int* __restrict__ kv_indices, const int* __restrict__ work,
    T* __restrict__ out, float* __restrict__ lse,
    int Hq, int Hkv, int Hm, int Nq, int Nk, int nQb, int idx_stride, int S, int c_h, int causal,
    int n_qtiles, float scale_log2) {
  __shared__ float Ks[V1_BC][D];  // K tile: Bc keys x D
  __shared__ float Vs[V1_BC][D];  // V tile
  const int Br = blockDim.x;
  const int h = blockIdx.x, qt = blockIdx.y, b = blockIdx.z;
  const int q0 = qt * Br;           // first query row of this CTA
  const int i = q0 / S;             // its query block (Br divides S)
  const int G = Hq / Hkv;
  const int hm = h / c_h, hkv = h / G;
  const int shift = Nk - Nq;        // p(t) = t + shift
  const int t = q0 + threadIdx.x;   // this thread's query row
  const bool row_ok = t < Nq;

  const size_t bh = (size_t)b * Hq + h;
  const T* kb = k + ((size_t)b * Hkv + hkv) * (size_t)Nk * D;
  const T* vb = v + ((size_t)b * Hkv + hkv) * (size_t)Nk * D;

  float qr[D], o[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = row_ok ? us::to_float(q[(bh * Nq + t) * D + d]) * scale_log2 : 0.f;
    o[d] = 0.f;
  }
  float m_i = US_NEG_INF, l_i = 0.f;

  const size_t row = ((size_t)b * Hm + hm) * nQb + i;
  const int* idx = kv_indices + row * idx_stride;
  const int cnt = kv_counts[row];
  // Keys at or past key_lim are invisible to every row of this CTA.
  const int last_row = min(q0 + Br, Nq) - 1;
  const int key_lim = causal ? min(Nk, last_row + shift + 1) : Nk;
  const int nvis = us_attn::visible_prefix(idx, cnt, S, key_lim);

  for (int sl = 0; sl < nvis; ++sl) {
    const int kb0 = idx[sl] * S;
    const int kb1 = min(kb0 + S, key_lim);
    for (int n0 = kb0; n0 < kb1; n0 += V1_BC) {
      __syncthreads();  // every thread is done reading the previous K/V tile before it is overwritten
      for (int e = threadIdx.x; e < V1_BC * D; e += Br) {
        const int c = e / D, d = e % D, s = n0 + c;
        Ks[c][d] = s < kb1 ? us::to_float(kb[(size_t)s * D + d]) : 0.f;
        Vs[c][d] = s < kb1 ? us::to_float(vb[(size_t)s * D + d]) : 0.f;
      }
      __syncthreads();  // the whole tile is in shared memory before any thread reads it
      if (!row_ok) continue;
      float sc[V1_BC];
      float mt = US_NEG_INF;
#pragma unroll
      for (int c = 0; c < V1_BC; ++c) {
        const int s = n0 + c;
        const bool allowed = s < kb1 && (!causal || s <= t + shift);
        float acc = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) acc = fmaf(qr[d], Ks[c][d], acc);
        sc[c] = allowed ? acc : US_NEG_INF;
        mt = fmaxf(mt, sc[c]);
      }
      const float m_new = fmaxf(m_i, mt);
      if (m_new == US_NEG_INF) continue;  // nothing allowed yet for this row
      const float alpha = exp2f(m_i - m_new);  // m_i = -inf -> 0
      l_i *= alpha;
#pragma unroll
      for (int d = 0; d < D; ++d) o[d] *= alpha;
#pragma unroll
      for (int c = 0; c < V1_BC; ++c) {
        const float p = exp2f(sc[c] - m_new);  // masked keys: exp2(-inf) = 0
        l_i += p;
#pragma unroll
        for (int d = 0; d < D; ++d) o[d] = fmaf(p, Vs[c][d], o[d]);
      }
      m_i = m_new;
    }
  }
  if (!row_ok) return;
  const float inv = l_i > 0.f ? 1.f / l_i : 0.f;  // empty row: out = 0
#pragma unroll
  for (int d = 0; d < D; ++d) out[(bh * Nq + t) * D + d] = us::from_float<T>(o[d] * inv);
  lse[bh * Nq + t] = l_i > 0.f ? m_i * US_LN2 + logf(l_i) : US_NEG_INF;
}

// =============================================================================== v6 (mma.sync)
// Tensor-core kernel. A CTA of NW warps owns Br = NW * MT * 16 query rows; warp w owns rows
// [w * MT * 16, (w + 1) * MT * 16) as MT m16 tiles (v6: NW = 4, MT = 2, Bc = 64, so each K/V
// fragment read from shared memory feeds MT = 2 MMAs). Per key tile of Bc keys:
//   S_ij = Q_i K_j^T          mma.sync m16n8k16, A = Q (ldmatrix), B = K (ldmatrix, K rows
//                             are the MMA's columns, so no transpose)
//   m_i' = max(m_i, rowmax S) (quad shuffles: a row lives in the 4 lanes of a quad)
//   P = exp2(S - m_i'), l_i = l_i * exp2(m_i - m_i') + rowsum P (per-lane partial sums,
//                             reduced over the quad once at the end)
//   O_i = O_i * exp2(m_i - m_i') + P V_j   P re-packed from the S accumulators into A
//                             fragments in registers (rounded to T, as FlashAttention),
//                             V by ldmatrix.trans
// Shared memory rows hold D elements = D/8 chunks of 16 bytes; chunk c of row r is stored
// at chunk c ^ (r & 7), so the 8 rows one ldmatrix phase reads fall in 8 different bank
// groups (no conflicts), and cp.async writes whole 16-byte chunks.
namespace us_attn {

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy that bypasses L1; src-size 0 writes zeros (ragged rows).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// 2^x by the special function unit (MUFU.EX2); exp2(-inf) = +0, the masked-score case.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Element offset of (row, 16-byte chunk c) in a swizzled [rows][D] tile.
template <int D> __device__ __forceinline__ int swz(int row, int c) {
  return row * D + ((c ^ (row & 7)) << 3);
}

// Copy `rows` rows of D elements starting at global row r0 (of n valid rows) into a
// swizzled shared tile, 16 bytes per thread per step; rows >= n are zero-filled.
template <typename T, int D, int NT>
__device__ __forceinline__ void load_tile(T* sm, const T* g, int r0, int rows, int n) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < rows * CPR; e += NT) {
    const int r = e / CPR, c = e % CPR;
    const bool ok = r0 + r < n;
    const T* src = ok ? g + (size_t)(r0 + r) * D + c * 8 : g;
    cp_async16(sm + swz<D>(r, c), src, ok);
  }
}

}  // namespace us_attn

template <typename T, int D, int NW, int MT, int BC>
__global__ void __launch_bounds__(NW * 32) us_attn_fwd_mma(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ kv_counts, const int* __restrict__ kv_indices, const int* __restrict__ work,
    T* __restrict__ out, float* __restrict__ lse,
    int Hq, int Hkv, int Hm, int Nq, int Nk, int nQb, int idx_stride, int S, int c_h, int causal,
    int n_qtiles, float scale_log2) {
  using namespace us_attn;
  constexpr int NT = NW * 32;          // threads
  constexpr int BR = NW * MT * 16;     // Br, query rows per CTA
  constexpr int KD = D / 16;           // k-steps of S = Q K^T
  constexpr int NS = BC / 8;           // n8 tiles of S (keys)
  constexpr int NO = D / 8;            // n8 tiles of O (head dim)
  static_assert(D % 64 == 0, "swizzle needs D/8 >= 8 chunks per row");
  static_assert(BC % 16 == 0, "Bc must be a multiple of 16");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [Br][D]
  T* Ks = Qs + BR * D;                     // [2][Bc][D] double buffer
  T* Vs = Ks + 2 * BC * D;                 // [2][Bc][D]

  // ---- which (b, h, query tile) this CTA computes (1-D grid): from the sorted work list, or
  // (work == nullptr) in the fixed order batch, then query tiles last-first (longest causal
  // rows first), heads fastest (GQA siblings run together and share K/V tiles through L2).
  int w;
  if (work != nullptr) {
    w = work[blockIdx.x];
  } else {
    const int x = blockIdx.x, r = x / Hq;
    w = ((r / n_qtiles) * Hq + x % Hq) * n_qtiles + (n_qtiles - 1 - r % n_qtiles);
  }
  const int qt = w % n_qtiles;
  const int h = (w / n_qtiles) % Hq;
  const int b = (w / n_qtiles) / Hq;
  const int q0 = qt * BR;
  const int i = q0 / S;
  const int G = Hq / Hkv;
  const int hm = h / c_h, hkv = h / G;
  const int shift = Nk - Nq;
  const size_t bh = (size_t)b * Hq + h;
  const T* qg = q + bh * (size_t)Nq * D;
  const T* kg = k + ((size_t)b * Hkv + hkv) * (size_t)Nk * D;
  const T* vg = v + ((size_t)b * Hkv + hkv) * (size_t)Nk * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, tq = lane & 3;   // MMA fragment: row group, thread in quad
  const int wr0 = warp * MT * 16;           // warp's first row in the CTA

  // ---- the visible tiles of this mask row: tile it = sub-tile (it % SUB) of block
  // idx[it / SUB]; only the last visible block may be cut short (diagonal or Nk).
  const size_t row = ((size_t)b * Hm + hm) * nQb + i;
  const int* idx = kv_indices + row * idx_stride;
  const int cnt = kv_counts[row];
  const int last_row = min(q0 + BR, Nq) - 1;
  const int key_lim = causal ? min(Nk, last_row + shift + 1) : Nk;
  const int nvis = visible_prefix(idx, cnt, S, key_lim);
  const int SUB = S / BC;
  int T_tiles = 0;
  if (nvis > 0) {
    const int l0 = idx[nvis - 1] * S;
    T_tiles = (nvis - 1) * SUB + (min(l0 + S, key_lim) - l0 + BC - 1) / BC;
  }

  // ---- prologue: Q (group 0), then K/V tile 0 (group 1)
  load_tile<T, D, NT>(Qs, qg, q0, BR, Nq);
  cp_async_commit();
  if (T_tiles > 0) {
    const int n0 = idx[0] * S;
    load_tile<T, D, NT>(Ks, kg, n0, BC, Nk);
    load_tile<T, D, NT>(Vs, vg, n0, BC, Nk);
  }
  cp_async_commit();

  float acc_o[MT][NO][4];
  float m_i[MT][2], l_i[MT][2];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][n][e] = 0.f;
    m_i[mi][0] = m_i[mi][1] = US_NEG_INF;
    l_i[mi][0] = l_i[mi][1] = 0.f;
  }

  // ldmatrix lane addressing (see the fragment layouts of mma.m16n8k16):
  //   A (Q):  row = (lane % 8) + 8 * ((lane / 8) % 2), chunk offset = lane / 16
  //   B (K):  key = (lane % 8) + 8 * (lane / 16),      chunk offset = (lane / 8) % 2
  //   B (V^T, .trans): key = (lane % 8) + 8 * ((lane / 8) % 2), chunk offset = lane / 16
  const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_ch = lane >> 4;
  const int k_row = (lane & 7) + 8 * (lane >> 4), k_ch = (lane >> 3) & 1;

  for (int it = 0; it < T_tiles; ++it) {
    const int buf = it & 1;
    const int n0 = idx[it / SUB] * S + (it % SUB) * BC;
    if (it + 1 < T_tiles) {  // prefetch tile it+1 into the other buffer while this one computes
      const int n1 = idx[(it + 1) / SUB] * S + ((it + 1) % SUB) * BC;
      load_tile<T, D, NT>(Ks + (buf ^ 1) * BC * D, kg, n1, BC, Nk);
      load_tile<T, D, NT>(Vs + (buf ^ 1) * BC * D, vg, n1, BC, Nk);
    }
    cp_async_commit();  // (possibly empty) group, so that "all but the newest" = tile it
    cp_async_wait<1>();
    __syncthreads();  // every thread's cp.async writes of Q and tile it are visible to all warps

    const T* Kt = Ks + buf * BC * D;
    const T* Vt = Vs + buf * BC * D;

    // ---- S_ij = Q_i K_j^T (float32 accumulators)
    float acc_s[MT][NS][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mi][n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      unsigned a[MT][4];  // Q fragments of this k-step, re-read from shared memory every tile
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
        ldsm_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], smem_u32(Qs + swz<D>(wr0 + mi * 16 + a_row, kk * 2 + a_ch)));
      unsigned bk[BC / 16][4];  // all K fragments of this k-step in flight before the MMAs
#pragma unroll
      for (int nj = 0; nj < BC / 16; ++nj)
        ldsm_x4(bk[nj][0], bk[nj][1], bk[nj][2], bk[nj][3],
                smem_u32(Kt + swz<D>(nj * 16 + k_row, kk * 2 + k_ch)));
#pragma unroll
      for (int nj = 0; nj < BC / 16; ++nj)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          Mma<T>::run(acc_s[mi][2 * nj], a[mi], bk[nj][0], bk[nj][1]);
          Mma<T>::run(acc_s[mi][2 * nj + 1], a[mi], bk[nj][2], bk[nj][3]);
        }
    }

    // ---- mask only tiles that cross Nk or the diagonal of this warp's first row
    // (warp-uniform test); scores stay raw (scale folded into the exponent below).
    const bool need_mask = (n0 + BC > Nk) || (causal && n0 + BC - 1 > q0 + wr0 + shift);
    if (need_mask) {
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n0 + n * 8 + 2 * tq + (e & 1);
            const int t = q0 + wr0 + mi * 16 + g + 8 * (e >> 1);
            if (key >= Nk || (causal && key > t + shift)) acc_s[mi][n][e] = US_NEG_INF;
          }
    }

    // ---- online softmax: m_i (raw score units), l_i, rescale O_i. In base 2:
    // p = exp2(s * scale_log2 - m_i' * scale_log2), one FFMA + one MUFU.EX2 per score.
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_i[mi][r];
#pragma unroll
        for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(acc_s[mi][n][2 * r], acc_s[mi][n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // All keys masked so far: use 0 as the reference so exp2(-inf - 0) = 0, never NaN.
        const float mref = mx == US_NEG_INF ? 0.f : mx * scale_log2;
        const float alpha = fast_exp2(m_i[mi][r] * scale_log2 - mref);  // m_i = -inf -> 0
        float rs = 0.f;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          const float p0 = fast_exp2(fmaf(acc_s[mi][n][2 * r], scale_log2, -mref));
          const float p1 = fast_exp2(fmaf(acc_s[mi][n][2 * r + 1], scale_log2, -mref));
          acc_s[mi][n][2 * r] = p0;
          acc_s[mi][n][2 * r + 1] = p1;
          rs += p0 + p1;
        }
        l_i[mi][r] = l_i[mi][r] * alpha + rs;
        m_i[mi][r] = mx;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          acc_o[mi][n][2 * r] *= alpha;
          acc_o[mi][n][2 * r + 1] *= alpha;
        }
      }
    }

    // ---- P (rounded to T, as FlashAttention) packed into MMA A fragments first, so the
    // float scores are dead before the P V product (fewer live registers).
    unsigned pa[MT][BC / 16][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) {
        pa[mi][kk][0] = us::pack2<T>(acc_s[mi][2 * kk][0], acc_s[mi][2 * kk][1]);
        pa[mi][kk][1] = us::pack2<T>(acc_s[mi][2 * kk][2], acc_s[mi][2 * kk][3]);
        pa[mi][kk][2] = us::pack2<T>(acc_s[mi][2 * kk + 1][0], acc_s[mi][2 * kk + 1][1]);
        pa[mi][kk][3] = us::pack2<T>(acc_s[mi][2 * kk + 1][2], acc_s[mi][2 * kk + 1][3]);
      }

    // ---- O_i += P V_j, V fragments by ldmatrix.trans, VG of them in flight per batch
    constexpr int VG = (D / 16) < 4 ? (D / 16) : 4;
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
#pragma unroll
      for (int dg = 0; dg < D / 16; dg += VG) {
        unsigned bv[VG][4];
#pragma unroll
        for (int x = 0; x < VG; ++x)
          ldsm_x4_t(bv[x][0], bv[x][1], bv[x][2], bv[x][3],
                    smem_u32(Vt + swz<D>(kk * 16 + a_row, (dg + x) * 2 + a_ch)));
#pragma unroll
        for (int x = 0; x < VG; ++x)
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            Mma<T>::run(acc_o[mi][2 * (dg + x)], pa[mi][kk], bv[x][0], bv[x][1]);
            Mma<T>::run(acc_o[mi][2 * (dg + x) + 1], pa[mi][kk], bv[x][2], bv[x][3]);
          }
      }
    }
    __syncthreads();  // all warps are done with buffer `buf` before iteration it+1 refills it
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  // ---- epilogue: O_i / l_i in T, lse = m_i ln 2 + log l_i; empty rows: 0 and -inf
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_i[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int t = q0 + wr0 + mi * 16 + g + 8 * r;
      if (t >= Nq) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* orow = out + (bh * Nq + t) * D;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        const unsigned pk = us::pack2<T>(acc_o[mi][n][2 * r] * inv, acc_o[mi][n][2 * r + 1] * inv);
        *reinterpret_cast<unsigned*>(orow + n * 8 + 2 * tq) = pk;
      }
      // m_i is in raw score units: lse = scale * m_i + log(l_i) = m_i * scale_log2 * ln 2 + log(l_i)
      if (tq == 0) lse[bh * Nq + t] = l > 0.f ? m_i[mi][r] * scale_log2 * US_LN2 + logf(l) : US_NEG_INF;
    }
  }
}

// =============================================================================== v7 (sm_90a)
// Hopper warpgroup MMA (wgmma.mma_async, the instruction FlashAttention-3 and cuDNN use).
// A CTA of NWG = 2 warpgroups owns Br = 128 query rows, warpgroup w rows [64w, 64w+64);
// __launch_bounds__ keeps registers low enough (<= 128) for 2 CTAs per SM, so
// one CTA's softmax overlaps another's tensor-core work.
// Per key tile of Bc = 64 keys:
//   S_ij = Q_i K_j^T   wgmma m64n64k16, A = Q and B = K both read by the tensor cores from
//                      shared memory through matrix descriptors (K-major, 128-byte swizzle)
//   online softmax     exactly as in v6: the wgmma accumulator of a warp is the mma.sync
//                      m16n8 C layout repeated along N, so m_i, l_i and the masks are the same
//   O_i += P V_j       wgmma m64n{D}k16, A = P from registers (the mma.sync A-fragment layout),
//                      B = V^T: V arrives as [key][d] by cp.async and is transposed into
//                      shared memory as [d][key] (K-major) with ldmatrix.trans + 32-bit stores
//                      while the tensor cores compute S_ij.
// Shared tiles use the layout the 128-byte swizzle of the descriptors expects: [D/64][rows][64]
// (each region 1024-byte aligned), 16-byte chunk c of row r at chunk c ^ (r & 7).
// Compiled only for sm_90a (wgmma); elsewhere the body traps.
namespace us_attn {
constexpr int WG_NWG = 2;  // warpgroups per CTA (one warpgroup per CTA, 3 CTAs/SM, was the slower v8)
__device__ __forceinline__ int swz128(int rows, int row, int c) {  // element offset, chunk c = d / 8
  return (c >> 3) * rows * 64 + row * 64 + (((c & 7) ^ (row & 7)) << 3);
}
// Matrix descriptor: start address, LBO (unused with swizzling: 1), SBO = 1024 B between
// 8-row groups, swizzle mode 1 = 128 B.
__device__ __forceinline__ unsigned long long wg_desc(const void* p) {
  const unsigned long long a = smem_u32(p);
  return ((a & 0x3FFFFull) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
template <typename T, int D, int NT>
__device__ __forceinline__ void load_tile128(T* sm, const T* g, int r0, int rows, int n) {
  constexpr int CPR = D / 8;
  for (int e = threadIdx.x; e < rows * CPR; e += NT) {
    const int r = e / CPR, c = e % CPR;
    const bool ok = r0 + r < n;
    const T* src = ok ? g + (size_t)(r0 + r) * D + c * 8 : g;
    cp_async16(sm + swz128(rows, r, c), src, ok);
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define US_HAVE_WGMMA 1  // the wrappers of wgmma.cuh exist
#endif
}  // namespace us_attn

template <typename T, int D>
__global__ void __launch_bounds__(us_attn::WG_NWG * 128, 2) us_attn_fwd_wgmma(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ kv_counts, const int* __restrict__ kv_indices, const int* __restrict__ work,
    T* __restrict__ out, float* __restrict__ lse,
    int Hq, int Hkv, int Hm, int Nq, int Nk, int nQb, int idx_stride, int S, int c_h, int causal,
    int n_qtiles, float scale_log2) {
#if defined(US_HAVE_WGMMA)
  using namespace us_attn;
  constexpr int NWG = WG_NWG;
  constexpr int NT = NWG * 128, BR = NWG * 64, BC = 64;
  constexpr int KD = D / 16, NS = BC / 8, NO = D / 8;
  static_assert(D % 64 == 0, "D must be 64 or 128");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Swizzle atoms are 1024 bytes: align the tiles to 1024 (the launcher adds 1 KiB).
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  T* Qs = reinterpret_cast<T*>(base);      // [D/64][Br][64]
  T* Ks = Qs + BR * D;                     // [2][D/64][Bc][64] double buffer
  T* Vs = Ks + 2 * BC * D;                 // [D/64][Bc][64]    (staging, [key][d]; single buffer)
  T* Vt = Vs + BC * D;                     // [1][D][64]        (V^T, [d][key])

  // Task of this CTA: from the sorted work list, or (work == nullptr) in the fixed order
  // batch, then query tiles last-first (longest causal rows first), heads fastest (GQA
  // siblings run together and share K/V tiles through L2).
  int w;
  if (work != nullptr) {
    w = work[blockIdx.x];
  } else {
    const int x = blockIdx.x, r = x / Hq;
    w = ((r / n_qtiles) * Hq + x % Hq) * n_qtiles + (n_qtiles - 1 - r % n_qtiles);
  }
  const int qt = w % n_qtiles;
  const int h = (w / n_qtiles) % Hq;
  const int b = (w / n_qtiles) / Hq;
  const int q0 = qt * BR;
  const int i = q0 / S;
  const int G = Hq / Hkv;
  const int hm = h / c_h, hkv = h / G;
  const int shift = Nk - Nq;
  const size_t bh = (size_t)b * Hq + h;
  const T* qg = q + bh * (size_t)Nq * D;
  const T* kg = k + ((size_t)b * Hkv + hkv) * (size_t)Nk * D;
  const T* vg = v + ((size_t)b * Hkv + hkv) * (size_t)Nk * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, tq = lane & 3;
  const int wg = warp / 4;        // warpgroup
  const int wr0 = warp * 16;      // this warp's first row (warpgroup rows 64wg + 16 * (warp % 4))

  const size_t row = ((size_t)b * Hm + hm) * nQb + i;
  const int* idx = kv_indices + row * idx_stride;
  const int cnt = kv_counts[row];
  const int last_row = min(q0 + BR, Nq) - 1;
  const int key_lim = causal ? min(Nk, last_row + shift + 1) : Nk;
  const int nvis = visible_prefix(idx, cnt, S, key_lim);
  const int SUB = S / BC;
  int T_tiles = 0;
  if (nvis > 0) {
    const int l0 = idx[nvis - 1] * S;
    T_tiles = (nvis - 1) * SUB + (min(l0 + S, key_lim) - l0 + BC - 1) / BC;
  }

  // cp.async groups, in issue order: {Q, K_0}, {V_0}, then per tile it: {K_it+1} at the top,
  // {V_it+1} once V_it has been transposed (each possibly empty, so the counts below hold).
  load_tile128<T, D, NT>(Qs, qg, q0, BR, Nq);
  if (T_tiles > 0) load_tile128<T, D, NT>(Ks, kg, idx[0] * S, BC, Nk);
  cp_async_commit();
  if (T_tiles > 0) load_tile128<T, D, NT>(Vs, vg, idx[0] * S, BC, Nk);
  cp_async_commit();

  float acc_o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[n][e] = 0.f;
  float m_i[2] = {US_NEG_INF, US_NEG_INF}, l_i[2] = {0.f, 0.f};

  for (int it = 0; it < T_tiles; ++it) {
    const int buf = it & 1;
    const int n0 = idx[it / SUB] * S + (it % SUB) * BC;
    const int n1 = it + 1 < T_tiles ? idx[(it + 1) / SUB] * S + ((it + 1) % SUB) * BC : -1;
    if (n1 >= 0) load_tile128<T, D, NT>(Ks + (buf ^ 1) * BC * D, kg, n1, BC, Nk);  // prefetch K_it+1
    cp_async_commit();
    cp_async_wait<2>();  // all but the 2 newest groups ({V_it}, {K_it+1}): K_it (and Q) landed
    fence_async_smem();  // this thread's cp.async writes, seen by the tensor cores' async proxy
    __syncthreads();     // every thread's part of Q and K_it has landed
    const T* Kt = Ks + buf * BC * D;
    const T* Vst = Vs;

    // ---- S_ij = Q_i K_j^T, issued asynchronously (KD chained k-steps)
    float acc_s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[n][e] = 0.f;
    us::wg_fence();
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const T* qa = Qs + (kk >> 2) * BR * 64 + (wg * 64) * 64 + (kk & 3) * 16;
      const T* kb = Kt + (kk >> 2) * BC * 64 + (kk & 3) * 16;
      us::WgmmaSS<T, BC>::run(&acc_s[0][0], wg_desc(qa), wg_desc(kb), kk > 0);
    }
    us::wg_commit();

    cp_async_wait<1>();  // all but {K_it+1}: V_it landed (this thread's part)
    __syncthreads();     // ... and every other thread's part, before the transpose reads it

    // ---- meanwhile: V_j [key][d] -> V^T [d][key] (8x8 blocks: ldmatrix.trans, 32-bit stores)
    {
      constexpr int NBLK = (BC / 8) * (D / 8);       // 8x8 blocks of the tile
      constexpr int PER_WARP = NBLK / (NT / 32);     // per warp
#pragma unroll
      for (int x = 0; x < PER_WARP / 4; ++x) {
        const int blk = warp * PER_WARP + x * 4 + (lane >> 3);  // this lane's address block
        const int kb8 = blk % (BC / 8), db8 = blk / (BC / 8);
        unsigned r[4];
        ldsm_x4_t(r[0], r[1], r[2], r[3], smem_u32(Vst + swz128(BC, kb8 * 8 + (lane & 7), db8)));
#pragma unroll
        for (int m = 0; m < 4; ++m) {  // matrix m of the x4: block warp*PER_WARP + x*4 + m
          const int bm = warp * PER_WARP + x * 4 + m;
          const int kbm = bm % (BC / 8), dbm = bm / (BC / 8);
          // thread holds keys 8kbm + 2tq, +1 of head-dim row 8dbm + g
          *reinterpret_cast<unsigned*>(Vt + swz128(D, dbm * 8 + g, kbm) + 2 * tq) = r[m];
        }
      }
    }
    fence_async_smem();  // the V^T stores, seen by the tensor cores' async proxy
    us::wg_wait<0>();          // S_ij is in registers

    const bool need_mask = (n0 + BC > Nk) || (causal && n0 + BC - 1 > q0 + wr0 + shift);
    if (need_mask) {
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + n * 8 + 2 * tq + (e & 1);
          const int t = q0 + wr0 + g + 8 * (e >> 1);
          if (key >= Nk || (causal && key > t + shift)) acc_s[n][e] = US_NEG_INF;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_i[r];
#pragma unroll
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(acc_s[n][2 * r], acc_s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mref = mx == US_NEG_INF ? 0.f : mx * scale_log2;
      const float alpha = fast_exp2(m_i[r] * scale_log2 - mref);
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const float p0 = fast_exp2(fmaf(acc_s[n][2 * r], scale_log2, -mref));
        const float p1 = fast_exp2(fmaf(acc_s[n][2 * r + 1], scale_log2, -mref));
        acc_s[n][2 * r] = p0;
        acc_s[n][2 * r + 1] = p1;
        rs += p0 + p1;
      }
      l_i[r] = l_i[r] * alpha + rs;
      m_i[r] = mx;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        acc_o[n][2 * r] *= alpha;
        acc_o[n][2 * r + 1] *= alpha;
      }
    }
    unsigned pa[BC / 16][4];
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      pa[kk][0] = us::pack2<T>(acc_s[2 * kk][0], acc_s[2 * kk][1]);
      pa[kk][1] = us::pack2<T>(acc_s[2 * kk][2], acc_s[2 * kk][3]);
      pa[kk][2] = us::pack2<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
      pa[kk][3] = us::pack2<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
    }
    __syncthreads();  // V^T is complete (every warp's stores, fenced above) and V_it fully read
    if (n1 >= 0) load_tile128<T, D, NT>(Vs, vg, n1, BC, Nk);  // prefetch V_it+1 into the free staging tile
    cp_async_commit();

    // ---- O_i += P V_j
    us::wg_fence();
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) us::WgmmaRS<T, D, 0>::run(&acc_o[0][0], pa[kk], wg_desc(Vt + kk * 16));
    us::wg_commit();
    us::wg_wait<0>();
    __syncthreads();  // all warps are done with K/V buffer `buf` and V^T before they are refilled
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int t = q0 + wr0 + g + 8 * r;
    if (t >= Nq) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + (bh * Nq + t) * D;
#pragma unroll
    for (int n = 0; n < NO; ++n)
      *reinterpret_cast<unsigned*>(orow + n * 8 + 2 * tq) = us::pack2<T>(acc_o[n][2 * r] * inv, acc_o[n][2 * r + 1] * inv);
    if (tq == 0) lse[bh * Nq + t] = l > 0.f ? m_i[r] * scale_log2 * US_LN2 + logf(l) : US_NEG_INF;
  }
#else
  __trap();  // built without sm_90a: the launcher never selects this kernel then
#endif
}
