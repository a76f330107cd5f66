"""Every CUDA kernel instantiation of the CuPy layer compiles with NVRTC, without a GPU.

The list comes from :func:`unisparse_ref.cupy_backend.all_instantiations` (the lists of the
stage modules pooling, scores, selection and attention, each instantiation with the NVRTC
options its stage launches it with). Instantiations sharing a file and options
are compiled by :func:`unisparse_ref.cupy_backend.compile_offline` in one NVRTC program per
target, to CUBIN, with ``--ptxas-options=-v``; the
ptxas log gives registers, static shared memory and spills of every entry function, which the
tests check and print (``pytest -s`` shows the table). No driver or GPU is needed: only
``cuda-bindings`` (``from cuda.bindings import nvrtc``), the pip ``nvidia-cuda-nvrtc``
library, and the CUDA headers from the pip ``nvidia-cuda-runtime`` (``cuda_fp16.h``,
``cuda_bf16.h``) and ``nvidia-cuda-cccl`` (``nv/target``) wheels.

Further down, still without a GPU: the same sources of pooling, scores and selection are built
with g++ under a host emulation of the CUDA execution model and checked against the NumPy
reference, and ``CupyBackend``'s Python glue runs on a NumPy stand-in for CuPy that launches
those emulated kernels with the backend's own grid, block and arguments.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
from collections import defaultdict

import pytest

from unisparse_ref.cupy_backend import _loader, all_instantiations, compile_offline
from unisparse_ref.cupy_backend._nvrtc import NvrtcUnavailable, check_available, own_arch, parse_ptxas

#: Targets every kernel must build for (an instantiation whose options name its own
#: architecture, such as the sm_90a wgmma kernels, builds for that one only).
ARCHS = ("sm_80", "sm_90")
#: Registers per thread above which a kernel cannot launch at all.
MAX_REGISTERS = 255
#: Static shared memory a kernel may declare (dynamic shared memory comes on top).
MAX_STATIC_SHARED = 48 * 1024


def _groups() -> dict[tuple[str, tuple[str, ...], str], list[str]]:
    groups: dict[tuple[str, tuple[str, ...], str], list[str]] = defaultdict(list)
    for spec in all_instantiations():
        own = own_arch(spec.options)
        extra = tuple(o for o in spec.options if own_arch((o,)) is None)
        for arch in (own,) if own else ARCHS:
            groups[(spec.file, extra, arch)].append(spec.name_expression)
    return groups


GROUPS = _groups()


def test_instantiation_list_is_complete() -> None:
    """The list holds every stage's kernels, each with a file that ships."""
    specs = all_instantiations()
    files = {s.file for s in specs}
    assert {"pooling.cu", "scores.cu", "selection.cu", "attention.cu"} <= files
    for s in specs:
        assert s.file in _loader.source_files(), f"{s.file} is not shipped in raw_kernels/"
        assert isinstance(s.options, tuple)
    for t in _loader.CTYPES.values():
        assert any(s.name_expression == f"us_pool_seq<{t}>" for s in specs)
    assert len({(s.file, s.name_expression, s.options) for s in specs}) == len(specs), "duplicate instantiations"


def test_each_stage_lists_its_kernels_with_its_options() -> None:
    """Each stage module writes its NVRTC options once; its list uses them (the launches too,
    checked by ``test_backend_glue_on_host_emulation``, which records every kernel the backend asks for)."""
    from unisparse_ref.cupy_backend import attention, pooling, scores, selection

    for stage in (pooling, scores, selection):
        assert stage.INSTANTIATIONS and all(s.options == stage.OPTIONS for s in stage.INSTANTIATIONS)
    assert scores.KERNEL in scores.INSTANTIATIONS and scores.SPLIT_KERNEL in scores.INSTANTIATIONS
    for ver in attention.KERNEL_VERSIONS.values():
        mine = [s for s in attention.INSTANTIATIONS if s.name_expression.startswith(ver.kernel + "<")]
        assert mine and all(s.options == ver.options and s.file == ver.file for s in mine)
    from unisparse_ref.cupy_backend import varlen

    assert all_instantiations() == [*pooling.INSTANTIATIONS, *scores.INSTANTIATIONS, *selection.INSTANTIATIONS,
                                    *attention.INSTANTIATIONS, *varlen.INSTANTIATIONS]


def test_sources_start_with_a_version_table() -> None:
    """House rule: every .cu opens with what it computes and a version table of its kernels."""
    for name in _loader.source_files():
        if not name.endswith(".cu"):
            continue
        text = _loader.read_source(name)
        assert text.lstrip().startswith("//"), f"{name} must open with a comment"
        assert "version" in text[:6000].lower(), f"{name} must have a version table near the top"


_POOL: dict[tuple[str, tuple[str, ...], str], concurrent.futures.Future] = {}


def _compile(group: tuple[str, tuple[str, ...], str]):
    """The :func:`compile_offline` result of ``group``; the first call starts every group on a pool.

    NVRTC holds the GIL, so the groups build in forked worker processes, one per core.
    """
    try:
        check_available()
    except NvrtcUnavailable as e:
        pytest.skip(str(e))
    if not _POOL:
        ctx = multiprocessing.get_context("fork")  # no CUDA context exists here: fork is safe
        ex = concurrent.futures.ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1), mp_context=ctx)
        # Largest sources first, so the long attention builds do not finish last.
        for g in sorted(GROUPS, key=lambda g: -len(_loader.read_source(g[0]))):
            file, extra, arch = g
            _POOL[g] = ex.submit(compile_offline, file, GROUPS[g], extra, arch)
        ex.shutdown(wait=False)
    return _POOL[group].result()


@pytest.mark.nvrtc
@pytest.mark.parametrize(
    "group", sorted(GROUPS), ids=[f"{f}-{a}{'-' + '-'.join(o) if o else ''}" for f, o, a in sorted(GROUPS)]
)
def test_nvrtc_compiles(group: tuple[str, tuple[str, ...], str]) -> None:
    """Each group builds to CUBIN; every instantiation fits registers and static shared memory."""
    file, extra, arch = group
    ok, log, cubin_size, lowered, _ = _compile(group)
    assert ok, f"{file} for {arch} failed:\n{log[-4000:]}"
    assert cubin_size > 0, f"{file}: NVRTC produced no CUBIN for {arch}"
    info = parse_ptxas(log)
    print(f"\n{file} [{arch}{' ' + ' '.join(extra) if extra else ''}]")
    for n in GROUPS[group]:
        assert lowered[n] in info, f"ptxas reported nothing for {n} ({lowered[n]}); log:\n{log[-2000:]}"
        r = info[lowered[n]]
        assert 0 < r["registers"] <= MAX_REGISTERS, f"{n}: {r['registers']} registers"
        assert r["smem"] <= MAX_STATIC_SHARED, f"{n}: {r['smem']} bytes of static shared memory"
        print(f"  {n:72s} regs {r['registers']:3d}  smem {r['smem']:6d} B  "
              f"spill st/ld {r['spill_stores']}/{r['spill_loads']} B")


_LAYER_SM90 = sorted(g for g in GROUPS if g[0] in ("pooling.cu", "scores.cu", "selection.cu") and g[2] == "sm_90")


@pytest.mark.nvrtc
@pytest.mark.parametrize("group", _LAYER_SM90, ids=[f"{g[0]}-{'-'.join(g[1])}" for g in _LAYER_SM90])
def test_layer_kernels_do_not_spill_on_sm90(group) -> None:
    """Pooling, scores and selection fit in registers on Hopper (no local-memory spills)."""
    file = group[0]
    ok, log, _, lowered, _ = _compile(group)
    assert ok
    info = parse_ptxas(log)
    for n, low in lowered.items():
        r = info[low]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{file}: {n} spills {r}"


# ---------------------------------------------------------------------------- host emulation
# The kernels of pooling.cu, scores.cu and selection.cu also run on the CPU: a small
# emulation of the CUDA execution model (one thread block at a time, one std::thread per
# CUDA thread, __syncthreads() as a std::barrier, __shared__ as block-wide statics) lets g++
# build the very same source, which is then checked against the NumPy reference. This
# checks the kernels' arithmetic and indexing without a GPU (not their speed, and not
# races that real hardware could expose: compute-sanitizer's racecheck does that on a GPU).
_PRELUDE = r"""// Host emulation of the CUDA execution model: one block at a time, one std::thread per CUDA
// thread, __syncthreads() = std::barrier. __shared__ -> static (shared by the block's threads).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
struct dim3_ { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3_ threadIdx;
static dim3_ blockIdx, blockDim, gridDim;
static std::barrier<>* g_bar = nullptr;
alignas(16) static unsigned char g_dyn[256 * 1024];
inline void __syncthreads() { g_bar->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
template <class A, class B> inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) -> decltype(a + b) { return a < b ? b : a; }
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.x) << 16; float f; memcpy(&f, &u, 4); return f; }
inline float __half2float(__half h) {
  uint32_t s = (h.x >> 15) & 1, e = (h.x >> 10) & 31, m = h.x & 1023; float v;
  if (e == 0) v = std::ldexp((float)m, -24); else if (e == 31) v = m ? NAN : INFINITY; else v = std::ldexp((float)(m | 1024), (int)e - 25);
  return s ? -v : v; }
inline __half __float2half_rn(float) { return __half{0}; }
inline __nv_bfloat16 __float2bfloat16_rn(float) { return __nv_bfloat16{0}; }
struct __half2 { __half x, y; };  // common.cuh's us::pack2 names them; no emulated kernel calls it
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __half2 __floats2half2_rn(float, float) { return __half2{}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float, float) { return __nv_bfloat162{}; }
struct float4 { float x, y, z, w; };
inline float4 us_checked_lds4(const float* p) {  // a misaligned vector load faults on a GPU: abort here too
  if (reinterpret_cast<uintptr_t>(p) & 15) { fprintf(stderr, "misaligned float4 load\\n"); abort(); }
  float4 r; memcpy(&r, p, 16); return r; }
#define US_LDS4(p) us_checked_lds4(p)
// Warp intrinsics for 1-D blocks whose threads all call them together (selection.cu does):
// each thread posts its value, a block barrier, reads its warp's values, another barrier.
struct uchar4 { unsigned char x, y, z, w; };
static uint32_t g_vote[1024];
static double g_xchg[1024];
inline unsigned __popc(unsigned x) { return (unsigned)__builtin_popcount(x); }
inline unsigned __ballot_sync(unsigned, bool p) {
  unsigned t = threadIdx.x, w0 = t & ~31u, r = 0; g_vote[t] = p ? 1u : 0u; __syncthreads();
  for (unsigned l = 0; l < 32 && w0 + l < blockDim.x; ++l) r |= g_vote[w0 + l] << l;
  __syncthreads(); return r; }
inline int __syncthreads_or(int p) {
  g_vote[threadIdx.x] = p ? 1u : 0u; __syncthreads(); int r = 0;
  for (unsigned l = 0; l < blockDim.x; ++l) r |= (int)g_vote[l];
  __syncthreads(); return r; }
inline double __shfl_up_sync(unsigned, double v, int o) {
  unsigned t = threadIdx.x, lane = t & 31u; g_xchg[t] = v; __syncthreads();
  double r = lane >= (unsigned)o ? g_xchg[t - o] : v; __syncthreads(); return r; }
template <class V> inline V __shfl_xor_sync(unsigned, V v, int m) {
  static V x[1024]; unsigned t = threadIdx.x; x[t] = v; __syncthreads();
  V r = x[t ^ (unsigned)m]; __syncthreads(); return r; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long u; memcpy(&u, &d, 8); return u; }
inline double __longlong_as_double(long long u) { double d; memcpy(&d, &u, 8); return d; }
template <class F> void emu_launch(dim3_ grid, dim3_ block, F kernel) {
  gridDim = grid; blockDim = block;
  unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    blockIdx = {bx, by, bz};
    std::barrier<> bar(n); g_bar = &bar;
    memset(g_dyn, 0xCD, sizeof g_dyn);  // garbage, like real shared memory
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < n; ++t) ts.emplace_back([&, t] {
      threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      kernel(); });
    for (auto& th : ts) th.join();
  }
}
"""

_WRAPPERS = {
"pooling.cu": '''
#define US_G dim3_{gx, gy, 1}
#define US_B dim3_{bx, by, 1}
extern "C" void emk_pool_f(unsigned gx, unsigned gy, unsigned bx, unsigned by, const float* x, float* o, int H, int N, int D, int c, int ch) {
  emu_launch(US_G, US_B, [&] { us_pool_seq<float>(x, o, H, N, D, c, ch); }); }
extern "C" void emk_pool_h(unsigned gx, unsigned gy, unsigned bx, unsigned by, const __half* x, float* o, int H, int N, int D, int c, int ch) {
  emu_launch(US_G, US_B, [&] { us_pool_seq<__half>(x, o, H, N, D, c, ch); }); }
extern "C" void emk_pool_bf(unsigned gx, unsigned gy, unsigned bx, unsigned by, const __nv_bfloat16* x, float* o, int H, int N, int D, int c, int ch) {
  emu_launch(US_G, US_B, [&] { us_pool_seq<__nv_bfloat16>(x, o, H, N, D, c, ch); }); }
extern "C" void emu_pool_f(const float* x, float* out, int B, int H, int N, int D, int c, int ch, int thr) {
  int R = (N + c - 1) / c; int Ho = H / ch;
  emu_launch({(unsigned)((R * D + thr - 1) / thr), (unsigned)(B * Ho), 1}, {(unsigned)thr, 1, 1}, [&] { us_pool_seq<float>(x, out, H, N, D, c, ch); }); }
extern "C" void emu_pool_bf(const __nv_bfloat16* x, float* out, int B, int H, int N, int D, int c, int ch, int thr) {
  int R = (N + c - 1) / c; int Ho = H / ch;
  emu_launch({(unsigned)((R * D + thr - 1) / thr), (unsigned)(B * Ho), 1}, {(unsigned)thr, 1, 1}, [&] { us_pool_seq<__nv_bfloat16>(x, out, H, N, D, c, ch); }); }
extern "C" void emu_pool_h(const __half* x, float* out, int B, int H, int N, int D, int c, int ch, int thr) {
  int R = (N + c - 1) / c; int Ho = H / ch;
  emu_launch({(unsigned)((R * D + thr - 1) / thr), (unsigned)(B * Ho), 1}, {(unsigned)thr, 1, 1}, [&] { us_pool_seq<__half>(x, out, H, N, D, c, ch); }); }
''',
"scores.cu": '''
#define US_G dim3_{gx, gy, 1}
#define US_B dim3_{bx, by, 1}
extern "C" void emk_onepass(unsigned gx, unsigned gy, unsigned bx, unsigned by, const float* qc, const float* kc, float* sc, float* part, float* tmax, int bh0, int Hm, int Hkv, int R, int C, int D, int nq, int nk, int cq, int ck, int ch, int G, int S, int causal, float scale) {
  emu_launch(US_G, US_B, [&] { us_scores_onepass(qc, kc, sc, part, tmax, bh0, Hm, Hkv, R, C, D, nq, nk, cq, ck, ch, G, S, causal, scale); }); }
extern "C" void emk_split(unsigned gx, unsigned gy, unsigned bx, unsigned by, const float* x, unsigned* out, float* fac, int rows, int D, int Dp, int P) {
  emu_launch(US_G, US_B, [&] { us_split_rows(x, out, fac, rows, D, Dp, P); }); }
extern "C" void emk_center(unsigned gx, unsigned gy, unsigned bx, unsigned by, const float* k, float* out, const int* cu, int Hkv, int W, int D) {
  emu_launch(US_G, US_B, [&] { us_center_keys(k, out, cu, Hkv, W, D); }); }
#define US_MMA_ARGS const unsigned* qs, const float* qf, const unsigned* ks, const float* kf, float* sc, float* part, float* tmax, int* counter, int BH, int Hm, int Hkv, int R, int W, int Dp, int nq, int nk, int cq, int ck, int ch, int G, int S, int causal, float sl2, int stages, int ntiles, int T, const float* colw, const int* j0, const float* band, int NB, const int* desc, const int* wlist, int nwork, int total_qb, int sW
#define US_MMA_PASS qs, qf, ks, kf, sc, part, tmax, counter, BH, Hm, Hkv, R, W, Dp, nq, nk, cq, ck, ch, G, S, causal, sl2, stages, ntiles, T, colw, j0, band, NB, desc, wlist, nwork, total_qb, sW
#define US_MMA_EMK(NAME, NW, VAR, P) extern "C" void NAME(unsigned gx, unsigned gy, unsigned bx, unsigned by, US_MMA_ARGS) { emu_launch(US_G, US_B, [&] { us_scores_mma<NW, VAR, P>(US_MMA_PASS); }); }
US_MMA_EMK(emk_mma8_3, 8, false, 3) US_MMA_EMK(emk_mma8v_3, 8, true, 3)
US_MMA_EMK(emk_mma4_2, 4, false, 2) US_MMA_EMK(emk_mma8_2, 8, false, 2)
US_MMA_EMK(emk_mma4v_2, 4, true, 2) US_MMA_EMK(emk_mma8v_2, 8, true, 2)
''',
"selection.cu": '''
#define US_G dim3_{gx, gy, 1}
#define US_B dim3_{bx, by, 1}
extern "C" void emk_select_f(unsigned gx, unsigned gy, unsigned bx, unsigned by, const float* s, bool* mask, int* cnt, int* idx, const int* geom, int nQb, int nKb, int nq, int nk, int S, int ns, int nl, int causal, double P, int mode) {
  emu_launch(US_G, US_B, [&] { us_select_topp<float>(s, mask, cnt, idx, geom, nQb, nKb, nq, nk, S, ns, nl, causal, P, mode); }); }
extern "C" void emk_select_d(unsigned gx, unsigned gy, unsigned bx, unsigned by, const double* s, bool* mask, int* cnt, int* idx, const int* geom, int nQb, int nKb, int nq, int nk, int S, int ns, int nl, int causal, double P, int mode) {
  emu_launch(US_G, US_B, [&] { us_select_topp<double>(s, mask, cnt, idx, geom, nQb, nKb, nq, nk, S, ns, nl, causal, P, mode); }); }
extern "C" void emk_m2i(unsigned gx, unsigned gy, unsigned bx, unsigned by, const bool* mask, int* cnt, int* idx, int nKb) {
  emu_launch(US_G, US_B, [&] { us_mask_to_indices(mask, cnt, idx, nKb); }); }
extern "C" void emu_select_d(const double* s, bool* mask, int* cnt, int* idx, unsigned rows, int nQb, int nKb, int nq, int nk, int S, int ns, int nl, int causal, double P) {
  emu_launch({rows, 1, 1}, {US_SEL_THREADS, 1, 1}, [&] { us_select_topp<double>(s, mask, cnt, idx, nullptr, nQb, nKb, nq, nk, S, ns, nl, causal, P, 0); }); }
extern "C" void emu_select_f(const float* s, bool* mask, int* cnt, int* idx, unsigned rows, int nQb, int nKb, int nq, int nk, int S, int ns, int nl, int causal, double P) {
  emu_launch({rows, 1, 1}, {US_SEL_THREADS, 1, 1}, [&] { us_select_topp<float>(s, mask, cnt, idx, nullptr, nQb, nKb, nq, nk, S, ns, nl, causal, P, 0); }); }
extern "C" void emu_m2i(const bool* mask, int* cnt, int* idx, unsigned rows, int nKb) {
  emu_launch({rows, 1, 1}, {US_SEL_THREADS, 1, 1}, [&] { us_mask_to_indices(mask, cnt, idx, nKb); }); }
''',
}


def _host_source(file: str) -> str:
    s = _loader.read_source(file)
    s = re.sub(r"#include <cuda_(fp16|bf16)\.h>", "", s).replace("#pragma once", "")
    # extern dynamic shared arrays -> a pointer into the emulator's buffer
    s = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];",
               r"\1* \2 = reinterpret_cast<\1*>(g_dyn);", s)
    return _PRELUDE + s + _WRAPPERS[file]


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory):
    """The three files built as host shared libraries with g++ (skipped without a C++20 g++)."""
    import ctypes
    import shutil
    import subprocess

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels is skipped")
    d = tmp_path_factory.mktemp("hostemu")
    libs = {}
    for file in ("pooling.cu", "scores.cu", "selection.cu"):
        stem = file.replace(".cu", "")
        cpp = d / f"{stem}.cpp"
        cpp.write_text(_host_source(file))
        so = d / f"lib{stem}.so"
        # The stage's own -D options, except that 32 threads per selection block keep the emulation quick.
        flags = [o for s in all_instantiations() if s.file == file for o in s.options if o.startswith("-D")]
        flags = sorted(set(flags) - {"-DUS_SEL_THREADS=256"})
        r = subprocess.run([gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-DUS_SEL_THREADS=32",
                            *flags, str(cpp), "-o", str(so)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
            pytest.skip("g++ lacks C++20 <barrier>")
        assert r.returncode == 0, f"g++ failed on {file}:\n{r.stderr[-3000:]}"
        libs[file] = ctypes.CDLL(str(so))
    return libs


def _ptr(a):
    import ctypes

    return a.ctypes.data_as(ctypes.c_void_p)


def test_host_emulated_pooling(host_kernels) -> None:
    import ctypes

    import numpy as np

    from unisparse_ref import BFLOAT16
    from unisparse_ref import reference as ref
    from unisparse_ref.tolerance import attention_tolerance

    lib = host_kernels["pooling.cu"]
    rng = np.random.default_rng(0)
    for dt, fn in ((np.float32, lib.emu_pool_f), (BFLOAT16, lib.emu_pool_bf), (np.float16, lib.emu_pool_h)):
        for B, H, N, D, c, ch in [(2, 4, 77, 32, 16, 2), (1, 6, 33, 16, 4, 3)]:
            x = rng.standard_normal((B, H, N, D)).astype(dt)
            out = np.zeros((B, H // ch, -(-N // c), D), np.float32)
            xin = np.ascontiguousarray(x if dt == np.float32 else x.view(np.uint16))
            fn(_ptr(xin), _ptr(out), *(ctypes.c_int(v) for v in (B, H, N, D, c, ch, 64)))
            want = ref.pool_heads(ref.pool_sequence(x, c), ch)
            tol, _ = attention_tolerance(want, None, np.float32)
            assert np.abs(out - want).max() <= tol, (np.dtype(dt), B, H, N, D, c, ch)


# The same cases as the GPU test of the scores (tests/test_cupy_layer.py).
_SCORE_CASES = [
    (1, 4, 4, 1, 512, 512, 64, 128, 16, 16, True), (2, 8, 2, 2, 300, 1000, 32, 64, 16, 8, True),
    (1, 2, 1, 1, 260, 260, 64, 128, 1, 1, True), (1, 2, 2, 1, 200, 333, 16, 16, 16, 16, False),
    (1, 3, 1, 1, 129, 700, 40, 32, 2, 32, True), (1, 2, 1, 1, 1000, 300, 32, 64, 8, 4, False),
]


def _emu_scores(lib, qc, kc, cfg, Nq, Nk, G, scratch_bytes=None, fill=0.0):
    """Launch ``us_scores_onepass`` in the host emulation as the backend does (chunks of heads)."""
    import ctypes

    import numpy as np

    from unisparse_ref import geometry
    from unisparse_ref.cupy_backend import scores

    B, Hm, R, D = qc.shape
    Hkv, C = kc.shape[1], kc.shape[2]
    S = cfg.block_size
    lc = scores.launch_config(B, Hm, R, cfg, C, scratch_bytes=scratch_bytes)
    assert lc["shared_mem"] <= 256 * 1024 and lc["block"] == (16, 16, 1)
    got = np.zeros((B, Hm, geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)), np.float32)
    ints = [ctypes.c_int(v) for v in (Hm, Hkv, R, C, D, Nq, Nk, cfg.c_q, cfg.c_k, cfg.c_h, G)]
    scale = ctypes.c_float(cfg.scale_for(D))
    causal = ctypes.c_int(int(cfg.causal))
    chunk = lc["heads_per_chunk"]
    # scratch filled with garbage (NaN or a value): every entry read must have been written
    part = np.full((chunk, lc["ntiles"], R, lc["NKS"]), fill, np.float32)
    tmax = np.full((chunk, lc["ntiles"], R), fill, np.float32)
    assert part.nbytes + tmax.nbytes == chunk * lc["scratch_per_head"]
    for bh0 in range(0, B * Hm, chunk):
        lib.emk_onepass(*(ctypes.c_uint(v) for v in (lc["grid"][0], min(chunk, B * Hm - bh0), 16, 16)),
                        _ptr(qc), _ptr(kc), _ptr(got), _ptr(part), _ptr(tmax), ctypes.c_int(bh0), *ints,
                        ctypes.c_int(S), causal, scale)
    return got, lc


@pytest.mark.parametrize("case", _SCORE_CASES, ids=[f"case{i}" for i in range(len(_SCORE_CASES))])
def test_host_emulated_scores(host_kernels, case) -> None:
    """scores.cu launched with the backend's launch configuration, within ``score_eps`` of the
    reference; also in chunks of one head, twice (bit-identical), with NaN and finite garbage in
    its scratch."""
    import numpy as np

    from unisparse_ref import UniSparseConfig
    from unisparse_ref import reference as ref
    from unisparse_ref.cupy_backend import CupyBackend

    B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal = case
    lib = host_kernels["scores.cu"]
    rng = np.random.default_rng(1)
    q = 1.5 * rng.standard_normal((B, Hq, Nq, D))
    k = 1.5 * rng.standard_normal((B, Hkv, Nk, D))
    cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, causal=causal)
    rq, rk = ref.compress(q, k, cfg)
    want = ref.block_scores(rq, rk, cfg, Nq, Nk)
    qc, kc = np.ascontiguousarray(rq, np.float32), np.ascontiguousarray(rk, np.float32)
    got, lc = _emu_scores(lib, qc, kc, cfg, Nq, Nk, Hq // Hkv, fill=np.nan)
    err = float(np.abs(got - want).max())
    print(f"\nscores case {case}: max |scores - ref| = {err:.2e}")
    assert err <= CupyBackend.score_eps, f"max |scores - ref| = {err:.2e}"
    heads = B * qc.shape[1]
    assert lc["heads_per_chunk"] == heads  # these shapes fit the default budget in one launch
    again, lc1 = _emu_scores(lib, qc, kc, cfg, Nq, Nk, Hq // Hkv, scratch_bytes=1, fill=7.0)
    assert lc1["heads_per_chunk"] == 1 and lc1["grid"][1] == 1
    assert np.array_equal(again, got), "the scores are not bit-identical across runs and chunkings"


@pytest.mark.parametrize("score_dtype", ["float64", "float32"])
def test_host_emulated_selection(host_kernels, score_dtype) -> None:
    """selection.cu gives the reference's mask and index form on the same scores (ties included)."""
    import ctypes

    import numpy as np

    from unisparse_ref import BlockMask, UniSparseConfig, geometry
    from unisparse_ref import reference as ref

    lib = host_kernels["selection.cu"]
    fn = lib.emu_select_d if score_dtype == "float64" else lib.emu_select_f
    rng = np.random.default_rng(2)
    for Nq, Nk, S, P, ns, nl, causal in [(1024, 1024, 64, 0.9, 1, 1, True), (500, 2000, 32, 0.5, 2, 3, True),
                                          (300, 300, 16, 1.0, 1, 1, True), (700, 200, 32, 0.7, 1, 2, False),
                                          (2000, 2000, 16, 0.95, 0, 0, True)]:
        cfg = UniSparseConfig(block_size=S, c_q=S // 4, c_k=S // 4, threshold=P, n_sink_blocks=ns,
                              n_local_blocks=nl, causal=causal)
        nqb, nkb = geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)
        raw = rng.exponential(size=(1, 2, nqb, nkb)) ** 3
        raw[0, 0] = np.round(raw[0, 0], 1) + 0.1  # many exact ties
        raw = np.where(geometry.visible_blocks(Nq, Nk, S, causal), raw, 0.0)
        scores = np.ascontiguousarray((raw / raw.sum(-1, keepdims=True)).astype(score_dtype))
        want = ref.select_blocks(scores, cfg, Nq, Nk)
        mask = np.zeros(scores.shape, np.bool_)
        cnt = np.zeros(scores.shape[:3], np.int32)
        idx = np.zeros(scores.shape, np.int32)
        fn(_ptr(scores), _ptr(mask), _ptr(cnt), _ptr(idx), ctypes.c_uint(2 * nqb),
           *(ctypes.c_int(v) for v in (nqb, nkb, Nq, Nk, S, ns, nl, int(causal))), ctypes.c_double(P))
        assert np.array_equal(mask, want.mask), (Nq, Nk, S, P, causal)
        wc, wi = want.to_indices()
        assert np.array_equal(cnt, wc) and np.array_equal(idx, wi)
    m = rng.random((2, 3, 5, 300)) < 0.3
    cnt = np.zeros((2, 3, 5), np.int32)
    idx = np.zeros((2, 3, 5, 300), np.int32)
    lib.emu_m2i(_ptr(m), _ptr(cnt), _ptr(idx), ctypes.c_uint(30), ctypes.c_int(300))
    wc, wi = BlockMask(m, 16, 1, 80, 4800, causal=False).to_indices()
    assert np.array_equal(cnt, wc) and np.array_equal(idx, wi)


# ---------------------------------------------------------------------------- backend glue
# CupyBackend's Python (input conversion, bf16 carriage, launch configuration, argument lists,
# BlockMask and index form, error messages) run against a stand-in "cupy" made of NumPy whose
# kernels are the host-emulated ones above, launched with the grid and block the backend
# computes; the attention launcher is replaced by the reference (its kernels need a GPU).
_KERNEL_TABLE = {
    ("pooling.cu", "us_pool_seq<float>"): "emk_pool_f", ("pooling.cu", "us_pool_seq<__half>"): "emk_pool_h",
    ("pooling.cu", "us_pool_seq<__nv_bfloat16>"): "emk_pool_bf",
    ("scores.cu", "us_scores_onepass"): "emk_onepass", ("scores.cu", "us_split_rows"): "emk_split",
    ("scores.cu", "us_center_keys"): "emk_center",
    **{("scores.cu", f"us_scores_mma<{w}, {'true' if v else 'false'}, {p}>"): f"emk_mma{w}{'v' if v else ''}_{p}"
       for p, ws in ((3, (8,)), (2, (4, 8))) for w in ws for v in (False, True)},
    ("selection.cu", "us_select_topp<float>"): "emk_select_f", ("selection.cu", "us_select_topp<double>"): "emk_select_d",
    ("selection.cu", "us_mask_to_indices"): "emk_m2i",
}


def _fake_cupy(host_kernels):
    import ctypes
    import types

    import numpy as np

    fake = types.ModuleType("cupy")

    class ndarray(np.ndarray):
        def get(self):
            return np.array(self.view(np.ndarray))

        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

    ndarray.__module__ = "cupy"

    def asarray(x, dtype=None):
        return np.array(np.asarray(x), dtype=dtype, copy=True, order="C").view(ndarray)

    def wrap(fn):
        return lambda *a, **k: np.asarray(fn(*a, **k)).view(ndarray)

    for name in ("float16", "float32", "float64", "uint16", "uint32", "uint64", "int32", "int64", "bool_", "uintp"):
        setattr(fake, name, getattr(np, name))
    fake.ndarray = ndarray
    fake.asarray = asarray
    fake.empty = wrap(np.empty)
    fake.zeros = wrap(np.zeros)
    fake.ascontiguousarray = wrap(np.ascontiguousarray)
    fake.pad = wrap(np.pad)
    fake.isfinite = wrap(np.isfinite)
    fake.where, fake.sort, fake.arange = wrap(np.where), wrap(np.sort), wrap(np.arange)
    fake.from_dlpack = lambda x: np.from_dlpack(x).view(ndarray)

    class ReductionKernel:  # only the backend's non-finite counter
        def __init__(self, in_params, out_params, map_expr, *rest):
            self.expr = map_expr
            self.name = rest[-1] if rest else ""

        #: the counters on 8-byte words (unisparse_ref.cupy_backend._device): lane type, exponent mask
        WORDS = {"us_bad_bf16x4": (np.uint16, 32640), "us_bad_halfx4": (np.uint16, 31744),
                 "us_bad_floatx2": (np.uint32, 2139095040)}

        def __call__(self, a, out=None):
            a = np.asarray(a)
            if self.name in self.WORDS:
                lane, mask = self.WORDS[self.name]
                assert a.dtype == np.uint64
                n = int(((a.view(lane) & mask) == mask).sum())
            elif "32640" in self.expr:
                n = int(((a & 32640) == 32640).sum())
            elif "v < 0" in self.expr:
                n = int(((a < 0) | ~np.isfinite(a)).sum())
            else:
                n = int((~np.isfinite(a)).sum())
            if out is not None:  # the backend's counts array: one slot per checked input
                out[...] = n
                return out
            return n

    fake.ReductionKernel = ReductionKernel

    class Device:
        id = 0
        attributes = {"MaxSharedMemoryPerBlockOptin": 227 * 1024}

        def __init__(self, *a):
            pass

    fake.cuda = types.SimpleNamespace(Device=Device)

    class Kernel:
        """``_loader.get_function(spec)``'s stand-in: the emulated kernel; records every spec asked for."""

        def __init__(self, spec):
            Kernel.specs.add(spec)
            self.lib = host_kernels[spec.file]
            self.fn = getattr(self.lib, _KERNEL_TABLE[(spec.file, spec.name_expression)])
            self.name = spec.name_expression
            self.max_dynamic_shared_size_bytes = 0

        launched: set[str] = set()
        specs: set = set()

        def __call__(self, grid, block, args, shared_mem=0):
            assert shared_mem <= 256 * 1024
            Kernel.launched.add(self.fn.__name__)
            conv = []
            for a in args:
                if isinstance(a, np.ndarray):
                    assert a.flags.c_contiguous
                    conv.append(ctypes.c_void_p(a.ctypes.data))
                elif isinstance(a, np.float64):
                    conv.append(ctypes.c_double(a))
                elif isinstance(a, np.float32):
                    conv.append(ctypes.c_float(a))
                elif isinstance(a, np.uint64):
                    conv.append(ctypes.c_void_p(int(a) or None))
                elif isinstance(a, np.int32):
                    conv.append(ctypes.c_int(int(a)))
                else:
                    raise TypeError(f"unexpected kernel argument {a!r} ({type(a)})")
            self.fn(*(ctypes.c_uint(int(x)) for x in (grid[0], grid[1], block[0], block[1])), *conv)

    return fake, Kernel


def _reference_attention_forward():
    """A stand-in for ``cupy_backend.attention.attention_forward`` computing with the reference."""
    import numpy as np

    from unisparse_ref import BFLOAT16, BlockMask
    from unisparse_ref import reference as ref

    def attention_forward(q, k, v, kv_counts, kv_indices, *, nq, nk, block_size, heads_per_mask, causal,
                          softmax_scale):
        import cupy as cp  # the stand-in

        for x in (q, k, v, kv_counts, kv_indices):
            assert isinstance(x, cp.ndarray) and x.flags.c_contiguous
        # the real launcher's argument checks (unisparse_ref/cupy_backend/attention.py)
        G = q.shape[1] // k.shape[1]
        assert heads_per_mask >= 1 and G % heads_per_mask == 0, "heads_per_mask must divide G"
        assert kv_counts.dtype == np.int32 and kv_indices.dtype == np.int32
        assert kv_counts.shape == (q.shape[0], q.shape[1] // heads_per_mask, -(-nq // block_size))
        assert q.dtype == k.dtype == v.dtype and q.dtype in (np.float16, np.float32, np.uint16)
        assert q.shape[3] in (32, 64, 128, 256), "the kernels are built for head dims 32, 64, 128, 256"
        bf16 = q.dtype == np.uint16
        host = [x.get().view(BFLOAT16) if bf16 else x.get() for x in (q, k, v)]
        bm = BlockMask.from_indices(kv_counts.get(), kv_indices.get(), block_size=block_size, nq=nq, nk=nk,
                                    heads_per_mask=heads_per_mask, causal=causal)
        cfg = us_config(block_size, causal, softmax_scale)
        dt = host[0].dtype
        out, lse = ref.block_sparse_attention(*host, bm, cfg, precision=dt)
        out = out.astype(dt)
        return cp.asarray(out.view(np.uint16) if bf16 else out), cp.asarray(lse)

    def us_config(S, causal, scale):
        from unisparse_ref import UniSparseConfig

        return UniSparseConfig(block_size=S, c_q=S, c_k=S, causal=causal, softmax_scale=scale)

    return attention_forward


@pytest.mark.parametrize("bf16_native", [True, False], ids=["cupy-bf16", "BFloat16Array"])
def test_backend_glue_on_host_emulation(host_kernels, monkeypatch, bf16_native) -> None:
    import sys
    import types

    import numpy as np

    import unisparse_ref as us
    from unisparse_ref import BFLOAT16, BlockMask, UniSparseConfig
    from unisparse_ref import cupy_backend as cb
    from unisparse_ref import reference as ref
    from unisparse_ref.cupy_backend import _device, attention, scores, selection
    from unisparse_ref.tolerance import check_attention, eps_valid_rows

    fake, Kernel = _fake_cupy(host_kernels)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(attention, "attention_forward", _reference_attention_forward())
    monkeypatch.setattr(_device, "_BF16_NATIVE", bf16_native)
    monkeypatch.setattr(_device, "_NONFINITE", {})
    monkeypatch.setattr(selection, "THREADS", 32)  # the emulator was built with -DUS_SEL_THREADS=32
    monkeypatch.setattr(_loader, "_SHARED_OPTIN", {})
    monkeypatch.setattr(_loader, "get_function", Kernel)
    be = cb.CupyBackend("host emulation")
    rng = np.random.default_rng(9)
    for dt in (np.float16, BFLOAT16, np.float32):
        B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 150, 200, 32
        q = rng.standard_normal((B, Hq, Nq, D)).astype(dt)
        k = rng.standard_normal((B, Hkv, Nk, D)).astype(dt)
        v = rng.standard_normal((B, Hkv, Nk, D)).astype(dt)
        cfg = UniSparseConfig(block_size=32, c_q=8, c_k=4, c_h=2, threshold=0.8)
        res = us.unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
        # the backend's own pipeline gives the bits of the four stage calls
        qc_s, kc_s = be.compress(q, k, cfg)
        sc_s = be.block_scores(qc_s, kc_s, cfg, Nq, Nk)
        bm_s = be.select_blocks(sc_s, cfg, Nq, Nk)
        out_s, lse_s = be.block_sparse_attention(q, k, v, bm_s, cfg)
        for a_, b_ in ((res.q_c, qc_s), (res.k_c, kc_s), (res.scores, sc_s), (res.block_mask.mask, bm_s.mask),
                       (res.out, out_s), (res.lse, lse_s)):
            assert np.array_equal(us.to_numpy(a_), us.to_numpy(b_), equal_nan=False)
        rq, rk = ref.compress(q, k, cfg)
        assert np.abs(us.to_numpy(res.q_c) - rq).max() < 1e-5 and np.abs(us.to_numpy(res.k_c) - rk).max() < 1e-5
        want_scores = ref.block_scores(rq, rk, cfg, Nq, Nk)
        assert np.abs(us.to_numpy(res.scores) - want_scores).max() <= be.score_eps
        with monkeypatch.context() as mp:  # in chunks of one mask head: the same bits
            mp.setattr(scores, "SCRATCH_BYTES", 1)
            s1 = be.block_scores(res.q_c, res.k_c, cfg, Nq, Nk)
        assert np.array_equal(us.to_numpy(s1), us.to_numpy(res.scores))
        assert eps_valid_rows(res.block_mask, want_scores, cfg, Nq, Nk, be.score_eps).all()
        assert np.array_equal(us.to_numpy(res.block_mask.mask), ref.select_blocks(res.scores.get(), cfg, Nq, Nk).mask)
        out = us.to_numpy(res.out)
        assert out.dtype == np.dtype(dt), (out.dtype, dt)
        if dt == BFLOAT16:
            assert isinstance(res.out, cb.BFloat16Array) != bf16_native
        bm = res.block_mask.numpy()
        ref64, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
        lp, _ = ref.block_sparse_attention(q, k, v, bm, cfg, precision=dt) if dt != np.float32 else (None, None)
        assert check_attention(out, ref64, lp, dt).ok
        sel64 = be.select_blocks(want_scores, cfg, Nq, Nk)  # float64 scores: the double instantiation
        assert np.array_equal(us.to_numpy(sel64.mask), ref.select_blocks(want_scores, cfg, Nq, Nk).mask)
        bm2, counts, idx = be.select_blocks_indices(res.scores, cfg, Nq, Nk)
        wc, wi = bm.to_indices()
        assert np.array_equal(us.to_numpy(counts), wc) and np.array_equal(us.to_numpy(idx), wi)
        # dense attention: every visible block, one mask head per KV head
        out_d, lse_d = be.dense_attention(q, k, v, causal=True)
        full = BlockMask.full(B, Hq, Nq, Nk, block_size=32)
        r64, _ = ref.block_sparse_attention(q, k, v, full, UniSparseConfig(block_size=32))
        lpd, _ = (ref.block_sparse_attention(q, k, v, full, UniSparseConfig(block_size=32), precision=dt)
                  if dt != np.float32 else (None, None))
        assert check_attention(us.to_numpy(out_d), r64, lpd, dt).ok
        assert us.to_numpy(lse_d).dtype == np.float32
        # head dims the kernels are not built for are zero-padded by the backend
        for D2 in (8, 48):
            q2, k2, v2 = (rng.standard_normal((1, 2, 40, D2)).astype(dt) for _ in range(3))
            cfg2 = UniSparseConfig(block_size=16, c_q=4, c_k=4)
            o2, l2 = be.dense_attention(q2, k2, v2, causal=True)
            full2 = BlockMask.full(1, 2, 40, 40, block_size=16)
            r2, rl2 = ref.block_sparse_attention(q2, k2, v2, full2, cfg2)
            lp2, _ = (ref.block_sparse_attention(q2, k2, v2, full2, cfg2, precision=dt)
                      if dt != np.float32 else (None, None))
            assert us.to_numpy(o2).shape == (1, 2, 40, D2)
            assert check_attention(us.to_numpy(o2), r2, lp2, dt).ok  # scale 1/sqrt(D2), not of the padded D
    with pytest.raises(ValueError, match="head dims up to 256"):
        be.dense_attention(*(rng.standard_normal((1, 1, 16, 300)).astype(np.float32) for _ in range(3)))
    # inputs given as device arrays, bf16 bits wrapped, and the errors
    qd = fake.asarray(q.view(np.uint16) if q.dtype == BFLOAT16 else q)
    a, _ = be.compress(qd, k, cfg)
    bits = fake.asarray(rng.standard_normal((1, 2, 64, 32)).astype(BFLOAT16).view(np.uint16))
    assert us.to_numpy(cb.as_bfloat16(bits)).dtype == BFLOAT16
    with pytest.raises(TypeError, match="as_bfloat16"):
        be.compress(bits, bits, UniSparseConfig(block_size=32))
    be.compress(cb.as_bfloat16(bits), cb.as_bfloat16(bits), UniSparseConfig(block_size=32))
    with pytest.raises(TypeError, match="q has dtype float64"):
        be.compress(q.astype(np.float64), k.astype(np.float64), cfg)
    bad = q.copy()
    bad[0, 0, 3, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        be.compress(bad, k, cfg)
    badb = rng.standard_normal((1, 2, 64, 32)).astype(BFLOAT16)
    badb[0, 1, 7, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        be.dense_attention(badb, badb[:, :1], badb[:, :1])
    with pytest.raises(ValueError, match="scores must"):
        be.select_blocks(-np.ones((1, 2, 5, 7)), cfg, Nq, Nk)
    with pytest.raises(TypeError, match="must be a CuPy or NumPy array"):
        be.compress([[1.0]], k, cfg)
    # non-contiguous input: copied, same result
    qt = fake.asarray(np.swapaxes(np.asarray(qd), 1, 2)).swapaxes(1, 2)  # a strided view
    assert isinstance(qt, fake.ndarray) and not qt.flags.c_contiguous
    b_, _ = be.compress(qt if q.dtype != BFLOAT16 else cb.as_bfloat16(qt), k, cfg)
    assert np.array_equal(us.to_numpy(a), us.to_numpy(b_))
    # (version 3 of the scores, version 4 with three parts or 8 warps and the variant instantiations run
    # only on shapes or configs this test does not use: tests/test_cupy_scores.py emulates them)
    not_here = {"emk_onepass", "emk_mma8_3", "emk_mma8v_3", "emk_mma8_2", "emk_mma4v_2", "emk_mma8v_2"}
    assert set(Kernel.launched) == set(_KERNEL_TABLE.values()) - not_here, f"not every kernel ran: {Kernel.launched}"
    # Every kernel the backend asked for is in the list the NVRTC test compiles: same name, same options
    # (the attention's are checked in tests/test_cupy_attention_cpu.py).
    assert Kernel.specs <= set(cb.all_instantiations()), Kernel.specs - set(cb.all_instantiations())
    # objects seen only through __dlpack__, and a (stand-in) PyTorch CPU bf16 tensor
    class DLPackOnly:
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kw):
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    x32 = rng.standard_normal((1, 2, 16, 8)).astype(np.float32)
    arr, dt = _device.device_input("q", DLPackOnly(x32))
    assert dt == np.float32 and np.array_equal(np.asarray(arr), x32)
    fake_torch = types.ModuleType("torch")
    fake_torch.int16 = "int16"
    xb = rng.standard_normal((1, 2, 16, 8)).astype(BFLOAT16)

    class Tensor:
        dtype = "torch.bfloat16"
        device = types.SimpleNamespace(type="cpu")

        def __init__(self, a):
            self._a = a

        def detach(self):
            return self

        def view(self, dtype):
            assert dtype == "int16"
            t = Tensor(self._a.view(np.int16))
            t.dtype = "torch.int16"
            return t

        def numpy(self):
            return self._a

        def __dlpack__(self, **kw):  # present on real tensors; the backend goes through .view/.numpy
            raise AssertionError("a bf16 tensor must not be passed through DLPack directly")

    Tensor.__module__ = "torch.tensor"
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    arr, dt = _device.device_input("q", Tensor(xb))
    assert dt == BFLOAT16 and arr.dtype == np.uint16 and np.array_equal(np.asarray(arr), xb.view(np.uint16))


def test_launch_opts_in_when_static_plus_dynamic_shared_memory_passes_48k(monkeypatch) -> None:
    """A kernel with a static tile needs the opt-in even when its dynamic part is small."""

    class FakeKernel:
        name = "k"
        shared_size_bytes = 17408  # static, as us_scores_onepass
        max_dynamic_shared_size_bytes = 0

        def __init__(self):
            self.calls = []

        def __call__(self, grid, block, args, shared_mem=0):
            self.calls.append(shared_mem)

    monkeypatch.setattr(_loader, "max_dynamic_shared_memory", lambda device_id=None: 232448)
    k = FakeKernel()
    _loader.launch(k, (1,), (256,), (), shared_mem=34048)  # 34048 + 17408 > 48 KiB
    assert k.max_dynamic_shared_size_bytes == 34048 and k.calls == [34048]
    small = FakeKernel()
    _loader.launch(small, (1,), (256,), (), shared_mem=1024)  # fits the default: no opt-in
    assert small.max_dynamic_shared_size_bytes == 0
    with pytest.raises(_loader.LaunchConfigError, match="static shared memory"):
        _loader.launch(FakeKernel(), (1,), (256,), (), shared_mem=232448)
