// attention_hopper.cu: a FlashAttention-3-class block-sparse attention forward for Hopper
// (sm_90a), in plain CUDA C++ with inline PTX, compiled by NVRTC through CuPy.
//
// Version table (rung v9 of the attention ladder; v1, v6 and v7 are in attention.cu,
// unisparse_ref/cupy_backend/attention.py has the registry, docs/performance.md the timings)
// -------------------------------------------------------------------------------------------
// | ver | kernel                              | Br  | Bc  | warps | what it adds              |
// |-----|-------------------------------------|-----|-----|-------|---------------------------|
// | v9  | us_fa3_fwd<T, D, Bc, STAGES>        | 128 | 128 | 12    | v7's wgmma, warp-         |
// |     |   D = 64, 128 (Bc 128), 256 (Bc 64) |     | (64)|       | specialised: TMA producer |
// |     |                                     |     |     |       | + 2 ping-pong consumers,  |
// |     |                                     |     |     |       | persistent grid. DEFAULT  |
// |     |                                     |     |     |       | on Hopper                 |
// | v9  | us_fa3_fwd_varlen<T, D, Bc, STAGES> | 128 | 128 | 12    | the same body on a packed |
// |     |   (issue 16, serving layouts)       |     | (64)|       | ragged batch (cu_seqlens) |
// |     |                                     |     |     |       | or a paged KV cache: a    |
// |     |                                     |     |     |       | tile list with offsets,   |
// |     |                                     |     |     |       | lengths, block table      |
//
// What it computes (identical to attention.cu, SPEC section 6)
// ------------------------------------------------------------
// q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] (C-contiguous, T = __half or __nv_bfloat16) and
// the block mask in FlexAttention's index form: kv_counts [B, Hm, nQb] and kv_indices
// [B, Hm, nQb, idx_stride] (ascending key-block indices, -1 padded). Query head h reads mask
// head h / c_h and KV head h / G (G = Hq / Hkv). Query row t has absolute position
// p(t) = t + Nk - Nq (bottom-right alignment); in query block i = t / S it attends key s iff
// block s / S is listed for (b, h / c_h, i) and, when causal, s <= p(t). Then
//     out[t] = sum_s softmax(scale * q_t . k_s) v_s,   lse[t] = ln(sum_s exp(scale * q_t . k_s))
// with float32 accumulation; a row with no allowed key gets out = 0 and lse = -inf.
//
// How (FlashAttention-3, arXiv 2407.08608, section 3; notation Q_i, K_j, V_j, S_ij, P_ij,
// m_i, l_i, O_i of the paper)
// -----------------------------------------------------------------------------------------
// A task is Br = 128 query rows Q_i of one (b, h) (a slice of one query block, so one mask
// row); the CTA walks the key tiles K_j, V_j (Bc keys each) of its selected key blocks. The
// CTA has three warpgroups (3 x 128 threads) with different jobs:
//
//   warpgroup 0, the PRODUCER. Gives most of its registers away (setmaxnreg.dec: 40 per
//     thread) and, from one thread, issues the Tensor Memory Accelerator (TMA) copies: Q_i
//     once, then K_j and V_j of every selected tile into a ring of STAGES shared-memory
//     slots. kv_indices gives the key block of each tile, i.e. the TMA coordinates. Each
//     slot has a FULL mbarrier (the copy engine counts the bytes in; consumers wait on it)
//     and an EMPTY mbarrier (the consumers' 8 warps arrive when their tensor-core reads of
//     the slot are complete; the producer waits on it before refilling the slot).
//
//   warpgroups 1 and 2, the CONSUMERS. Take the registers (setmaxnreg.inc: 232 per thread);
//     consumer c owns query rows [64c, 64c + 64) of the tile. Per key tile j:
//       S_ij = Q_i K_j^T          wgmma m64n{Bc}k16, Q and K read by the tensor cores straight
//                                 from the TMA tiles (K-major, 128-byte swizzle)
//       m_i' = max(m_i, rowmax S_ij), P_ij = exp2(S_ij * c - m_i' * c), c = scale * log2(e)
//       l_i  = l_i * exp2((m_i - m_i') c) + rowsum P_ij
//       O_i  = O_i * exp2((m_i - m_i') c) + P_ij V_j
//                                 wgmma m64n{D}k16, P from registers, V read as an MN-major
//                                 ("transposed") operand straight from the TMA tile: no
//                                 transpose through shared memory
//     and at the end O_i / l_i goes to out, m_i c ln2 + ln l_i to lse.
//
// Two overlaps keep the tensor cores busy while the special-function unit does the exps:
//   * intra-warpgroup pipelining: S_i,j+1 = Q_i K_j+1^T is issued (asynchronously) before the
//     softmax of tile j+1 is needed, together with O_i += P_ij V_j, and the warpgroup waits
//     (wgmma.wait_group 1) only for S_i,j+1; so P_ij V_j runs on the tensor cores while the
//     warpgroup computes the softmax of S_i,j+1.
//   * ping-pong between the two consumers: two named barriers make the consumers take turns
//     at issuing their GEMMs, so that consumer 0's softmax overlaps consumer 1's GEMMs and
//     the other way round.
//
// Scores are carried unscaled (the raw S_ij, m_i in score units); c = scale * log2(e) is
// folded into one FFMA before exp2, and lse is converted back to natural log.
//
// The work: n_tasks = B * Hq * n_qtiles tasks (b, h, 128-row query tile), ordered "batch,
// query tiles last-first (longest causal rows first), heads fastest" (GQA siblings share K/V
// tiles through L2), or read from a work list of packed tasks ((b * Hq + h) * n_qtiles +
// qtile) sorted by row length. The grid is persistent: about one CTA per SM; CTA c starts with
// task c and takes the next from a global atomic counter (tasks leave the list in order, as
// CTAs free up), and its producer loads the next task's Q_i and first K/V tiles while the
// consumers finish the current one. The producer announces each task (its index in the CTA's
// slot of the global array sched, then the Q barrier); the ring positions, the barrier phases and the ping-pong turns
// simply continue from task to task. (A grid of n_tasks CTAs, one task each, is the same code.)
// Requirements (the launcher checks): D in {64, 128, 256}; S a multiple of 128 (a 128-row
// CTA stays inside one query block) and of Bc.
//
// Kernel arguments, in order:
//   tmap_q, tmap_k, tmap_v   128-byte CUtensorMaps, by value as __grid_constant__ parameters:
//                            3-D views (D, N, B*H) with box (64, rows, 1) and 128-byte swizzle
//   kv_counts, kv_indices, work, out, lse,
//   Hq, Hkv, Hm, Nq, Nk, nQb, idx_stride, S, c_h, causal, n_qtiles, scale_log2, n_tasks,
//   sched, dynamic
// attention.cu's, with q, k, v replaced by the three tensor maps, plus the task count, an int32
// array sched of 1 + gridDim.x entries in device memory (sched[0] zeroed: the dynamic
// schedule's counter; sched[1 + c]: CTA c's task slot) and dynamic (1: take tasks from the
// counter; 0: static stride).

// element types, us::pack2 (two floats rounded to T in one register); the loader inlines it
#include "common.cuh"
// the wgmma wrappers (WgmmaSS, WgmmaRS with V as an MN-major operand, fence/commit/wait)
#include "wgmma.cuh"

// NVRTC has no <cuda.h>: the tensor map is an opaque 128-byte, 64-byte-aligned blob that
// the host encodes with cuTensorMapEncodeTiled.
struct alignas(64) CUtensorMap_st {
  unsigned long long opaque[16];
};

namespace us_fa3 {

#define US_FA3_NEG_INF (__int_as_float(0xff800000))
#define US_FA3_LN2 0.6931471805599453f

// Named barriers 1 and 2 order the two consumers' GEMM issue (barrier 0 is __syncthreads).
constexpr int kBarSchedBase = 1;
// 128 x 40 + 256 x 232 = 64,512 <= 65,536 registers (the 168 per thread a 384-thread CTA gets at
// launch). The producer's task loop spills at 24 (FA3's figure); the consumers use about 200.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
// The varlen producer also reads the tile entry and the block table: at 40 registers it
// spills (20 bytes at D = 64); 128 x 56 + 256 x 224 = 64,512 again, and the consumers still fit.
constexpr int kProducerRegsVarlen = 56;
constexpr int kConsumerRegsVarlen = 224;

// ----------------------------------------------------------------------------- small helpers
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 2^x on the special function unit; exp2(-inf) = +0 (the masked-score case).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The visible prefix of a mask row: kv_indices is ascending, so the blocks that start at or
// past key_lim (above the causal diagonal of the CTA's last row, or past Nk) are a suffix.
__device__ __forceinline__ int visible_prefix(const int* idx, int cnt, int S, int key_lim) {
  int lo = 0, hi = cnt;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (idx[mid] * S < key_lim) lo = mid + 1; else hi = mid;
  }
  return lo;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define US_FA3_HAVE_SM90A 1

// ----------------------------------------------------------------------------- mbarriers
// An mbarrier is a 64-bit shared-memory object with an expected arrival count and a
// transaction (byte) count; it completes a phase when both reach zero, and the phase bit
// flips. Waiters spin on try_wait.parity with the parity of the phase they wait for.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrive once and announce `bytes` that the copy engine will deliver (the TMA's complete_tx).
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred P1;\nUS_FA3_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra US_FA3_DONE;\nbra US_FA3_WAIT;\nUS_FA3_DONE:\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

// ----------------------------------------------------------------------------- TMA
// 3-D tiled bulk tensor copy global -> shared, completing `bytes` on an mbarrier.
// Coordinates are (element along D, row, batch*head); rows past the tensor's extent (ragged
// Nq / Nk tails) are filled with zeros by the copy engine.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const CUtensorMap_st* map, unsigned bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap_st* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(map)) : "memory");
}

// ----------------------------------------------------------------------------- named barriers
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// ----------------------------------------------------------------------------- wgmma
// Shared tiles use the layout that TMA's 128-byte swizzle writes and the wgmma descriptors
// read: a tile of `rows` x D elements is D/64 regions [rows][64] (each 1024-byte aligned),
// 16-byte chunk c of row r stored at chunk c ^ (r & 7).
//
// K-major descriptor (Q as A, K as B of S = Q K^T): rows are M (or N), 128-byte rows of the
// reduction dim d; 8-row groups 1024 bytes apart (SBO); LBO unused with swizzling.
__device__ __forceinline__ unsigned long long desc_kmajor(unsigned addr) {
  return ((addr & 0x3FFFFull) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}
// MN-major descriptor (V as B of O = P V, "transposed"): V_j sits as [key][d], d contiguous,
// i.e. N (= d) is the contiguous dim and K (= key) the strided one. The 128-byte swizzle atom
// is 64 d x 8 keys; atoms along K (the next 8 keys) are 1024 bytes apart (SBO) and atoms
// along N (the next 64 d) one region apart: LBO = rows * 128 bytes.
__device__ __forceinline__ unsigned long long desc_mnmajor(unsigned addr, unsigned region_bytes) {
  return ((addr & 0x3FFFFull) >> 4) | ((unsigned long long)((region_bytes >> 4) & 0x3FFF) << 16) |
         ((1024ull >> 4) << 32) | (1ull << 62);
}
// Pin accumulator registers at a point of the program: the compiler must assume the empty
// asm reads and rewrites them, so it cannot move their uses across a wgmma wait.
template <int N> __device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(unsigned* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// ----------------------------------------------------------------------------- the CTA
// Shared memory (dynamic, aligned up to 1024 bytes by the kernel; the launcher adds 1 KiB):
//   Q_i          [D/64][128][64]             BR * D elements
//   K ring       STAGES x [D/64][Bc][64]
//   V ring       STAGES x [D/64][Bc][64]
//   mbarriers    q_full, q_empty, full_k[STAGES], full_v[STAGES], empty_k[STAGES], empty_v[STAGES]
template <typename T, int D, int BC, int STAGES>
struct Smem {
  static constexpr int BR = 128;
  static constexpr int Q_ELEMS = BR * D;
  static constexpr int KV_ELEMS = BC * D;  // one stage of K (or V)
  static constexpr int TILE_BYTES = (Q_ELEMS + 2 * STAGES * KV_ELEMS) * (int)sizeof(T);
  static constexpr int BAR_BYTES = 8 * (2 + 4 * STAGES);
  static constexpr int BYTES = 1024 + TILE_BYTES + BAR_BYTES;  // what the launcher passes
};

// The key tile j of a CTA: tile j is sub-tile (j % SUB) of the j / SUB-th visible block.
__device__ __forceinline__ int tile_key0(const int* idx, int j, int SUB, int S, int BC) {
  return idx[j / SUB] * S + (j % SUB) * BC;
}

// VARLEN = false: the batch layout [B, H, N, D] (us_fa3_fwd). VARLEN = true: a packed ragged
// batch (us_fa3_fwd_varlen; the arguments after `dynamic` are used only then, see that kernel):
// every VARLEN branch is an `if constexpr` or a constant-folded ternary, so the batch
// instantiations compile to the same CUBIN as before the varlen mode existed.
template <typename T, int D, int BC, int STAGES, bool VARLEN = false>
__device__ __forceinline__ void fwd_body(
    const CUtensorMap_st* __restrict__ tm_q, const CUtensorMap_st* __restrict__ tm_k,
    const CUtensorMap_st* __restrict__ tm_v,
    const int* __restrict__ kv_counts, const int* __restrict__ kv_indices, const int* __restrict__ work,
    T* __restrict__ out, float* __restrict__ lse,
    int Hq, int Hkv, int Hm, int Nq, int Nk, int nQb, int idx_stride, int S, int c_h, int causal,
    int n_qtiles, float scale_log2, int n_tasks, int* __restrict__ sched, int dynamic,
    const int* __restrict__ vtiles = nullptr, const int* __restrict__ block_table = nullptr, int bt_stride = 0,
    int page_size = 0, int total_q = 0, int total_qb = 0) {
  using L = Smem<T, D, BC, STAGES>;
  constexpr int BR = L::BR;
  constexpr int NCH = D / 64;            // 64-element (128-byte) column regions of a tile
  constexpr int KD = D / 16;             // k16 steps of S = Q K^T
  constexpr int NS = BC / 8;             // n8 tiles of S (keys)
  constexpr int NO = D / 8;              // n8 tiles of O (head dim)
  constexpr int KV_BYTES = L::KV_ELEMS * (int)sizeof(T);
  constexpr int Q_BYTES = L::Q_ELEMS * (int)sizeof(T);
  static_assert(D == 64 || D == 128 || D == 256, "D must be 64, 128 or 256");
  static_assert(BC == 64 || BC == 128, "Bc must be 64 or 128");

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  T* Qs = reinterpret_cast<T*>(base);
  T* Ks = Qs + L::Q_ELEMS;                      // stage s at Ks + s * KV_ELEMS
  T* Vs = Ks + STAGES * L::KV_ELEMS;
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(base + L::TILE_BYTES);
  const unsigned bar_q = smem_u32(bars), bar_q_empty = bar_q + 8;
  const unsigned bar_full_k = bar_q + 16, bar_full_v = bar_full_k + 8 * STAGES;
  const unsigned bar_empty_k = bar_full_v + 8 * STAGES, bar_empty_v = bar_empty_k + 8 * STAGES;
  // The task of the current round, written by the producer before it arrives on q_full (the
  // arrive releases the store at CTA scope, the consumers' wait acquires it); rewritten only
  // after every consumer warp arrived on q_empty, after its read (the same pair, the other
  // way). The slot lives in global memory, one int per CTA, not in shared memory:
  // compute-sanitizer's racecheck checks shared memory and does not model this mbarrier
  // ordering of plain accesses, so a shared slot is reported as a race it cannot vouch for;
  // every other shared access of the kernel it then does check. One L2 round trip per task.
  volatile int* task_slot = sched + 1 + blockIdx.x;
  int* task_counter = dynamic ? sched : nullptr;

  // ---- the work: tasks (b, h, 128-row query tile). CTA c starts with task c; its producer
  // then takes the next one from the global counter (x = gridDim.x + atomicAdd(counter, 1):
  // CTAs take tasks in list order as they free up, like the hardware block scheduler, so the
  // tasks in flight stay a narrow window of the list and GQA siblings sweep the same K/V
  // through L2 together), or, without a counter, with a static stride (x += gridDim.x).
  // A grid of n_tasks CTAs runs one task each. Task x is work[x] from a sorted work list, or (work ==
  // nullptr) the fixed order: batch, then query tiles last-first (longest causal rows
  // first), heads fastest (GQA siblings run together and share K/V tiles through L2).
  const int G = Hq / Hkv;
  const int shift = Nk - Nq;             // p(t) = t + shift
  const int SUB = S / BC;                // key tiles per mask block
  struct Task {
    int b, h, q0, n_tiles;
    const int* idx;                      // the mask row's selected key blocks
    int qoff, koff, nq, nk;              // VARLEN: the sequence's offsets and lengths N_q,b, N_k,b
  };
  auto get_task = [&](int x) {
    Task tk;
    if constexpr (VARLEN) {
      // Task x = (query tile x / Hq of the longest-first tile list, head x % Hq): heads fastest,
      // so the GQA siblings of a tile run together and share its K/V tiles through L2. A
      // tile entry is 8 ints {q_off, N_q,b, k_off, N_k,b, qb_off, q0, b, 0}: the sequence's
      // first packed query row and key row (k_off unused when paged), its lengths, its
      // first packed mask row (cu_qblocks[b]), the tile's first row q0 (local) and b.
      const int4 e0 = reinterpret_cast<const int4*>(vtiles)[2 * (x / Hq)];
      const int4 e1 = reinterpret_cast<const int4*>(vtiles)[2 * (x / Hq) + 1];
      tk.h = x % Hq;
      tk.qoff = e0.x; tk.nq = e0.y; tk.koff = e0.z; tk.nk = e0.w;
      tk.q0 = e1.y;
      tk.b = e1.z;
      // Packed mask row of query block q0 / S of sequence b, mask head h / c_h.
      const size_t mrow = (size_t)(tk.h / c_h) * total_qb + e1.x + tk.q0 / S;
      tk.idx = kv_indices + mrow * idx_stride;
      const int cnt = kv_counts[mrow];
      const int last_row = min(tk.q0 + BR, tk.nq) - 1;
      // Bottom-right causal per sequence: p(t) = t + N_k,b - N_q,b.
      const int key_lim = causal ? min(tk.nk, last_row + (tk.nk - tk.nq) + 1) : tk.nk;
      const int nvis = visible_prefix(tk.idx, cnt, S, key_lim);
      tk.n_tiles = 0;
      if (nvis > 0) {
        const int l0 = tk.idx[nvis - 1] * S;
        tk.n_tiles = (nvis - 1) * SUB + (min(l0 + S, key_lim) - l0 + BC - 1) / BC;
      }
      return tk;
    }
    int w;
    if (work != nullptr) {
      w = work[x];
    } else {
      const int r = x / Hq;
      w = ((r / n_qtiles) * Hq + x % Hq) * n_qtiles + (n_qtiles - 1 - r % n_qtiles);
    }
    const int qt = w % n_qtiles;
    tk.h = (w / n_qtiles) % Hq;
    tk.b = (w / n_qtiles) / Hq;
    tk.q0 = qt * BR;
    // The task's key tiles: the visible prefix of its mask row (query block q0 / S, mask head
    // h / c_h), cut into Bc-key tiles; only the last visible block may end early (causal
    // diagonal of the task's last row, or Nk).
    const size_t mrow = ((size_t)tk.b * Hm + tk.h / c_h) * nQb + tk.q0 / S;
    tk.idx = kv_indices + mrow * idx_stride;
    const int cnt = kv_counts[mrow];
    const int last_row = min(tk.q0 + BR, Nq) - 1;
    const int key_lim = causal ? min(Nk, last_row + shift + 1) : Nk;
    const int nvis = visible_prefix(tk.idx, cnt, S, key_lim);
    tk.n_tiles = 0;
    if (nvis > 0) {
      const int l0 = tk.idx[nvis - 1] * S;
      tk.n_tiles = (nvis - 1) * SUB + (min(l0 + S, key_lim) - l0 + BC - 1) / BC;
    }
    return tk;
  };

  const int wg = threadIdx.x / 128;       // 0 producer, 1 and 2 consumers
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // ---- barriers: initialised by one thread, made visible to the copy engine
  // (fence.mbarrier_init) and to every thread (__syncthreads) before anyone uses them.
  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);        // the producer's arrive.expect_tx (+ the bytes of Q_i)
    mbar_init(bar_q_empty, 8);  // lane 0 of each consumer warp, once done with Q_i and the task slot
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_full_k + 8 * s, 1);   // the producer's arrive.expect_tx (+ the bytes)
      mbar_init(bar_full_v + 8 * s, 1);
      mbar_init(bar_empty_k + 8 * s, 8);  // lane 0 of each of the 8 consumer warps
      mbar_init(bar_empty_v + 8 * s, 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // =========================================================================== PRODUCER
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(VARLEN ? kProducerRegsVarlen : kProducerRegs));
    if (warp == 0 && lane == 0) {
      tma_prefetch_desc(tm_q);
      tma_prefetch_desc(tm_k);
      tma_prefetch_desc(tm_v);
      int tile_ctr = 0;  // K/V tiles this CTA loaded so far: ring slot and phase of the next one
      int q_ctr = 0;     // tasks announced so far: phase of the Q barriers
      int x = blockIdx.x;
      while (true) {
        // The next task may overwrite Q_i and the task slot once both consumers are done with
        // the previous task's (its last S GEMM complete).
        if (q_ctr > 0) {
          mbar_wait(bar_q_empty, (q_ctr - 1) & 1);
          x = task_counter != nullptr ? (int)gridDim.x + atomicAdd(task_counter, 1) : x + (int)gridDim.x;
        }
        *task_slot = x;
        if (x >= n_tasks) {        // no work left: tell the consumers (q_full without bytes)
          mbar_arrive(bar_q);
          break;
        }
        const Task tk = get_task(x);
        ++q_ctr;
        if (tk.n_tiles == 0) {     // an empty mask row: the consumers just write zeros
          mbar_arrive(bar_q);
          continue;
        }
        mbar_arrive_expect_tx(bar_q, Q_BYTES);
#pragma unroll
        for (int c = 0; c < NCH; ++c) {  // D/64 boxes of 64 x 128 (rows past Nq arrive as zeros)
          if constexpr (VARLEN)  // packed map (D, total_q, Hq): rows past N_q,b are the next
            // sequence's (computed, never stored) or, past total_q, zeros
            tma_load_3d(smem_u32(Qs + c * BR * 64), tm_q, bar_q, c * 64, tk.qoff + tk.q0, tk.h);
          else
            tma_load_3d(smem_u32(Qs + c * BR * 64), tm_q, bar_q, c * 64, tk.q0, tk.b * Hq + tk.h);
        }
        const int kvh = VARLEN ? tk.h / G : tk.b * Hkv + tk.h / G;
        for (int j = 0; j < tk.n_tiles; ++j) {
          const int ct = tile_ctr + j;
          const int s = ct % STAGES;
          const unsigned fill = ct / STAGES;  // how many times slot s was filled before
          int n0 = tile_key0(tk.idx, j, SUB, S, BC);
          if constexpr (VARLEN) {
            // The tile's first key row in the packed map (D, rows, Hkv): contiguous, the
            // sequence's offset; paged, its page's first row plus the slot (page_size is a
            // multiple of Bc, so a tile never straddles two pages). Keys past N_k,b (the next
            // sequence's, a page's unused slots, or zeros past the map) are masked by the
            // consumers.
            n0 = block_table != nullptr
                     ? block_table[(size_t)tk.b * bt_stride + n0 / page_size] * page_size + n0 % page_size
                     : tk.koff + n0;
          }
          // K_j into slot s once both consumers released its previous content.
          if (fill > 0) mbar_wait(bar_empty_k + 8 * s, (fill - 1) & 1);
          mbar_arrive_expect_tx(bar_full_k + 8 * s, KV_BYTES);
#pragma unroll
          for (int c = 0; c < NCH; ++c)
            tma_load_3d(smem_u32(Ks + s * L::KV_ELEMS + c * BC * 64), tm_k, bar_full_k + 8 * s, c * 64, n0, kvh);
          // V_j likewise (released later than K: P V_j runs one step behind S).
          if (fill > 0) mbar_wait(bar_empty_v + 8 * s, (fill - 1) & 1);
          mbar_arrive_expect_tx(bar_full_v + 8 * s, KV_BYTES);
#pragma unroll
          for (int c = 0; c < NCH; ++c)
            tma_load_3d(smem_u32(Vs + s * L::KV_ELEMS + c * BC * 64), tm_v, bar_full_v + 8 * s, c * 64, n0, kvh);
        }
        tile_ctr += tk.n_tiles;
      }
    }
    return;  // the CTA lives on until the consumers finish; the copies land on their barriers
  }

  // ============================================================================= CONSUMERS
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(VARLEN ? kConsumerRegsVarlen : kConsumerRegs));
  const int cw = wg - 1;                        // consumer 0 or 1
  const int wq = warp & 3;                      // warp within the warpgroup
  const int g = lane >> 2, tq = lane & 3;       // accumulator layout: row group, thread in quad
  const int row0 = cw * 64 + wq * 16;           // this warp's first row in the CTA
  const int bar_mine = kBarSchedBase + cw, bar_other = kBarSchedBase + (cw ^ 1);

  float acc_o[NO * 4];   // O_i: rows row0 + g (+8), columns 8n + 2tq (+1)
  float acc_s[NS * 4];   // S_ij, then P_ij in float
  unsigned pa[BC / 16][4];  // P_ij rounded to T, as wgmma A fragments
  float m_i[2], l_i[2];   // running row max (score units) and per-lane partial row sums
  int q0 = 0;             // the current task's first query row (read by the softmax mask)
  int cur_nk = 0, cur_shift = 0;  // VARLEN: the current task's N_k,b and N_k,b - N_q,b

  // Descriptor bases (shared-memory byte addresses).
  const unsigned q_addr = smem_u32(Qs) + cw * 64 * 128;   // this consumer's 64 rows, region 0
  const unsigned k_addr = smem_u32(Ks), v_addr = smem_u32(Vs);

  // S = Q K_j^T for slot s: KD k16-steps; step kk reads d in [16kk, 16kk + 16): region kk/4,
  // 32-byte column offset (kk % 4) inside the swizzled 128-byte rows.
  auto issue_s = [&](int s) {
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const unsigned qa = q_addr + (kk >> 2) * (BR * 128) + (kk & 3) * 32;
      const unsigned kb = k_addr + s * KV_BYTES + (kk >> 2) * (BC * 128) + (kk & 3) * 32;
      us::WgmmaSS<T, BC>::run(acc_s, desc_kmajor(qa), desc_kmajor(kb), kk > 0);
    }
  };
  // O += P V_j for slot s: BC/16 k16-steps over the keys; step kk reads keys [16kk, 16kk+16)
  // = two 8-key swizzle atoms starting at byte 16kk * 128 of every region.
  auto issue_pv = [&](int s) {
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk)
      us::WgmmaRS<T, D, 1>::run(acc_o, pa[kk], desc_mnmajor(v_addr + s * KV_BYTES + kk * 16 * 128, BC * 128));
  };
  // Online softmax of tile j (keys from n0) on acc_s; returns the O rescale factors.
  auto softmax = [&](int n0, float* alpha) {
    const int Nk_ = VARLEN ? cur_nk : Nk, shift_ = VARLEN ? cur_shift : shift;
    const bool need_mask = (n0 + BC > Nk_) || (causal && n0 + BC - 1 > q0 + row0 + shift_);
    if (need_mask) {
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + n * 8 + 2 * tq + (e & 1);
          const int t = q0 + row0 + g + 8 * (e >> 1);
          if (key >= Nk_ || (causal && key > t + shift_)) acc_s[n * 4 + e] = US_FA3_NEG_INF;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_i[r];
#pragma unroll
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(acc_s[n * 4 + 2 * r], acc_s[n * 4 + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));   // a row lives in the 4 lanes of a quad
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mref = mx == US_FA3_NEG_INF ? 0.f : mx * scale_log2;  // nothing allowed yet: P = 0
      alpha[r] = fast_exp2(m_i[r] * scale_log2 - mref);                  // m_i = -inf -> 0
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const float p0 = fast_exp2(fmaf(acc_s[n * 4 + 2 * r], scale_log2, -mref));
        const float p1 = fast_exp2(fmaf(acc_s[n * 4 + 2 * r + 1], scale_log2, -mref));
        acc_s[n * 4 + 2 * r] = p0;
        acc_s[n * 4 + 2 * r + 1] = p1;
        rs += p0 + p1;
      }
      l_i[r] = l_i[r] * alpha[r] + rs;   // per-lane partial row sums; the quad is summed at the end
      m_i[r] = mx;
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      pa[kk][0] = us::pack2<T>(acc_s[(2 * kk) * 4 + 0], acc_s[(2 * kk) * 4 + 1]);
      pa[kk][1] = us::pack2<T>(acc_s[(2 * kk) * 4 + 2], acc_s[(2 * kk) * 4 + 3]);
      pa[kk][2] = us::pack2<T>(acc_s[(2 * kk + 1) * 4 + 0], acc_s[(2 * kk + 1) * 4 + 1]);
      pa[kk][3] = us::pack2<T>(acc_s[(2 * kk + 1) * 4 + 2], acc_s[(2 * kk + 1) * 4 + 3]);
    }
  };
  // A consumer warp is done with a slot once its wgmma reads of it completed (its wait_group);
  // the slot is free when all 8 consumer warps said so.
  auto release = [&](unsigned bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  {
    // Ping-pong: the consumers take turns at issuing GEMMs. A turn (S_0; then S_ij together
    // with P_i,j-1 V_j-1; then the last P V) is bracketed by bar.sync(mine) ... bar.arrive(other).
    // A bar.sync completes after 256 arrivals: its own warpgroup's 128 and the other's 128
    // bar.arrive. Consumer 0 gives itself the first ticket here, and takes the one ticket
    // consumer 1 leaves after its last turn at the end (so both barriers end balanced; the
    // arrive itself stays unconditional: a branch around it puts the wgmma issue on a
    // "divergent" path for ptxas, which then serialises the wgmma pipeline, warning C7520).
    // Turns continue from task to task (both consumers walk the same tasks, with the same
    // numbers of tiles).
    auto turn_begin = [&]() { named_bar_sync(bar_mine, 256); };
    auto turn_end = [&]() { named_bar_arrive(bar_other, 256); };
    if (cw == 0) named_bar_arrive(bar_mine, 256);

    int tile_ctr = 0;  // K/V tiles consumed so far (the producer's count, in the same order)
    int q_ctr = 0;     // tasks so far (phase of the Q barrier)
    while (true) {
      mbar_wait(bar_q, q_ctr & 1);  // the task announced (and, if it has tiles, Q_i landed)
      const int x = *task_slot;
      ++q_ctr;
      if (x >= n_tasks) break;
      const Task tk = get_task(x);
      const int n_tiles = tk.n_tiles;
      const int* idx = tk.idx;
      q0 = tk.q0;
      if constexpr (VARLEN) {
        cur_nk = tk.nk;
        cur_shift = tk.nk - tk.nq;
      }
      m_i[0] = m_i[1] = US_FA3_NEG_INF;
      l_i[0] = l_i[1] = 0.f;
#pragma unroll
      for (int n = 0; n < NO * 4; ++n) acc_o[n] = 0.f;
      if (n_tiles == 0) release(bar_q_empty);  // nothing to compute: free the slot at once
      if (n_tiles > 0) {

        // ---- tile 0: S_i0, softmax, P_i0
        {
          const int s0 = tile_ctr % STAGES;
          turn_begin();
          mbar_wait(bar_full_k + 8 * s0, (tile_ctr / STAGES) & 1);
          us::wg_fence();
          issue_s(s0);
          us::wg_commit();
          turn_end();
          us::wg_wait<0>();
          fence_regs<NS * 4>(acc_s);
          release(bar_empty_k + 8 * s0);
        }
        {
          float alpha[2];
          softmax(tile_key0(idx, 0, SUB, S, BC), alpha);  // O_i = 0: no rescale
        }
        pack_p();

        // ---- steady state: issue S_ij and P_i,j-1 V_j-1 together, softmax S_ij while the
        // tensor cores run P V.
        for (int j = 1; j < n_tiles; ++j) {
          const int ct = tile_ctr + j;
          const int s = ct % STAGES, sp = (ct - 1) % STAGES;
          turn_begin();
          mbar_wait(bar_full_k + 8 * s, (ct / STAGES) & 1);         // K_j landed
          mbar_wait(bar_full_v + 8 * sp, ((ct - 1) / STAGES) & 1);  // V_j-1 landed (long ago, as a rule)
          us::wg_fence();
          fence_regs<BC / 16 * 4>(&pa[0][0]);
          issue_s(s);
          us::wg_commit();
          issue_pv(sp);
          us::wg_commit();
          turn_end();
          us::wg_wait<1>();               // S_ij is in registers (P V_{j-1} may still run)
          fence_regs<NS * 4>(acc_s);
          release(bar_empty_k + 8 * s);
          float alpha[2];
          softmax(tile_key0(idx, j, SUB, S, BC), alpha);
          us::wg_wait<0>();               // P_{j-1} V_{j-1} is done: O_i and pa may be touched
          fence_regs<NO * 4>(acc_o);
          release(bar_empty_v + 8 * sp);
#pragma unroll
          for (int n = 0; n < NO; ++n) {
            acc_o[n * 4 + 0] *= alpha[0];
            acc_o[n * 4 + 1] *= alpha[0];
            acc_o[n * 4 + 2] *= alpha[1];
            acc_o[n * 4 + 3] *= alpha[1];
          }
          pack_p();
        }

        // Every S GEMM of the task is complete: Q_i (and the task slot) may be overwritten.
        release(bar_q_empty);

        // ---- the last P V
        {
          const int ct = tile_ctr + n_tiles - 1;
          const int sp = ct % STAGES;
          turn_begin();
          mbar_wait(bar_full_v + 8 * sp, (ct / STAGES) & 1);
          us::wg_fence();
          fence_regs<BC / 16 * 4>(&pa[0][0]);
          issue_pv(sp);
          us::wg_commit();
          turn_end();
          us::wg_wait<0>();
          fence_regs<NO * 4>(acc_o);
          release(bar_empty_v + 8 * sp);
        }
        tile_ctr += n_tiles;
      }  // n_tiles > 0

      // ---- epilogue: O_i / l_i and lse (rows past Nq are not stored; empty rows: 0, -inf).
      // Plain stores from registers: they drain while the next task's GEMMs run.
      const size_t bh = (size_t)tk.b * Hq + tk.h;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int t = q0 + row0 + g + 8 * r;
        if (t >= (VARLEN ? tk.nq : Nq)) continue;  // VARLEN: never into the next sequence's rows
        const float inv = l > 0.f ? 1.f / l : 0.f;  // empty row: out = 0
        // out [B, Hq, Nq, D], lse [B, Hq, Nq]; VARLEN: out [total_q, Hq, D], lse [Hq, total_q].
        T* orow = VARLEN ? out + ((size_t)(tk.qoff + t) * Hq + tk.h) * D : out + (bh * Nq + t) * D;
#pragma unroll
        for (int n = 0; n < NO; ++n)
          *reinterpret_cast<unsigned*>(orow + n * 8 + 2 * tq) =
              us::pack2<T>(acc_o[n * 4 + 2 * r] * inv, acc_o[n * 4 + 2 * r + 1] * inv);
        const size_t li = VARLEN ? (size_t)tk.h * total_q + tk.qoff + t : bh * Nq + t;
        if (tq == 0) lse[li] = l > 0.f ? m_i[r] * scale_log2 * US_FA3_LN2 + logf(l) : US_FA3_NEG_INF;
      }
    }  // tasks
    if (cw == 0) named_bar_sync(bar_mine, 256);  // consume consumer 1's last ticket
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}  // namespace us_fa3

// =============================================================================== entry points
// Tensor maps by value (__grid_constant__: they stay in the kernel's parameter space, where
// the copy engine reads them without a trip to device memory).
template <typename T, int D, int BC, int STAGES>
__global__ void __launch_bounds__(384, 1) us_fa3_fwd(
    const __grid_constant__ CUtensorMap_st tm_q, const __grid_constant__ CUtensorMap_st tm_k,
    const __grid_constant__ CUtensorMap_st tm_v,
    const int* __restrict__ kv_counts, const int* __restrict__ kv_indices, const int* __restrict__ work,
    T* __restrict__ out, float* __restrict__ lse,
    int Hq, int Hkv, int Hm, int Nq, int Nk, int nQb, int idx_stride, int S, int c_h, int causal,
    int n_qtiles, float scale_log2, int n_tasks, int* __restrict__ sched, int dynamic) {
#if defined(US_FA3_HAVE_SM90A)
  us_fa3::fwd_body<T, D, BC, STAGES>(&tm_q, &tm_k, &tm_v, kv_counts, kv_indices, work, out, lse, Hq, Hkv, Hm,
                                     Nq, Nk, nQb, idx_stride, S, c_h, causal, n_qtiles, scale_log2, n_tasks,
                                     sched, dynamic);
#else
  __trap();  // built without sm_90a: the launcher never selects this kernel then
#endif
}

// The packed ragged batch (FlashAttention's varlen layout) and the paged KV cache, in one
// kernel: the body above with VARLEN = true.
//   tmap_q     packed q [total_q, Hq, D] as the 3-D view (D, total_q, Hq), box (64, 128, 1)
//   tmap_k, v  packed k, v [total_k, Hkv, D] as (D, total_k, Hkv); paged: the pages
//              [num_pages, page_size, Hkv, D] as (D, num_pages * page_size, Hkv), box (64, Bc, 1)
//   kv_counts  [Hm, total_qb], kv_indices [Hm, total_qb, idx_stride]: the packed index form
//              (row cu_qblocks[b] + i is query block i of sequence b; indices local to it)
//   tiles      int32 [n_tiles, 8] {q_off, N_q,b, k_off, N_k,b, cu_qblocks[b], q0, b, 0}: every
//              128-row query tile of every sequence, longest first across the batch (the
//              launcher builds it); task x is tile x / Hq, head x % Hq; n_tasks = n_tiles * Hq
//   out        [total_q, Hq, D], lse [Hq, total_q] (float32): rows of sequence b only
//   block_table int32 [batch, bt_stride] (nullptr: contiguous k, v), page_size a multiple of Bc
template <typename T, int D, int BC, int STAGES>
__global__ void __launch_bounds__(384, 1) us_fa3_fwd_varlen(
    const __grid_constant__ CUtensorMap_st tm_q, const __grid_constant__ CUtensorMap_st tm_k,
    const __grid_constant__ CUtensorMap_st tm_v,
    const int* __restrict__ kv_counts, const int* __restrict__ kv_indices, const int* __restrict__ tiles,
    T* __restrict__ out, float* __restrict__ lse,
    int Hq, int Hkv, int Hm, int total_q, int total_qb, int idx_stride, int S, int c_h, int causal,
    float scale_log2, int n_tasks, int* __restrict__ sched, int dynamic,
    const int* __restrict__ block_table, int bt_stride, int page_size) {
#if defined(US_FA3_HAVE_SM90A)
  us_fa3::fwd_body<T, D, BC, STAGES, true>(&tm_q, &tm_k, &tm_v, kv_counts, kv_indices, nullptr, out, lse, Hq, Hkv,
                                           Hm, 0, 0, 0, idx_stride, S, c_h, causal, 1, scale_log2, n_tasks, sched,
                                           dynamic, tiles, block_table, bt_stride, page_size, total_q, total_qb);
#else
  __trap();  // built without sm_90a: the launcher never selects this kernel then
#endif
}
