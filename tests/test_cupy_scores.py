"""Version 4 of the CuPy block scores (``us_scores_mma``, tensor cores, fp16x3 split).

Without a GPU (host emulation of ``raw_kernels/scores.cu`` built with g++, as in
``tests/test_cupy_compile.py``; the warp-collective ``mma.sync`` and shuffles are emulated
by ``scores.cu``'s own host shims):

* the scores against the float64 reference within ``CupyBackend.score_eps``, on tile edge cases;
* the same bits for every work-item size (4 or 8 warps) and pipeline depth (1 or 2 K tiles);
* the research variants ``sink_tokens`` / ``diagonal_correction`` against the reference, and
  :func:`~unisparse_ref.cupy_backend.scores.variant_weights` against ``variant_log_weights``.

On a GPU (``gpu``): scores error against the reference for float16 / bfloat16 / float32
inputs, D = 64 / 128 and odd D, GQA, ``c_h > 1``, ``Nq < Nk``, ragged lengths, non-causal;
masks eps-valid under the reference scores; repeated runs bit-identical; versions 3 and 4 agree;
the variants through the backend's ``compress`` and ``block_scores``.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from tests.conftest import cupy_backend_or_reason
from tests.test_cupy_compile import host_kernels  # noqa: F401 - the g++ host-emulation fixture
from unisparse_ref import BFLOAT16, UniSparseConfig, geometry
from unisparse_ref import reference as ref
from unisparse_ref._arrays import packed_offsets
from unisparse_ref.cupy_backend import CupyBackend
from unisparse_ref.cupy_backend import scores as sc
from unisparse_ref.reference.scores import variant_log_weights
from unisparse_ref.tolerance import eps_valid_rows

EPS = CupyBackend.score_eps
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------- host emulation
def _ptr(a):
    return ctypes.c_void_p(None if a is None else a.ctypes.data)


def _emu_split(lib, x: np.ndarray, Dp: int, P: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, np.float32)
    D = x.shape[-1]
    rows = int(np.prod(x.shape[:-1]))
    words = np.zeros((rows, Dp * P // 2), np.uint32)
    fac = np.zeros(rows, np.float32)
    lib.emk_split(ctypes.c_uint(geometry.cdiv(rows, 4)), ctypes.c_uint(1), ctypes.c_uint(128), ctypes.c_uint(1),
                  _ptr(x), _ptr(words), _ptr(fac), ctypes.c_int(rows), ctypes.c_int(D), ctypes.c_int(Dp),
                  ctypes.c_int(P))
    return words, fac


def _emu_scores_v4(lib, qc, kc, cfg: UniSparseConfig, nq: int, nk: int, warps=None, stages=None, slots=2,
                   parts=None):
    """``us_scores_mma`` in the host emulation, with the backend's launch configuration; scratch full of NaN."""
    B, Hm, R, D = qc.shape
    Hkv, W = kc.shape[1], kc.shape[2]
    var = cfg.sink_tokens > 0 or cfg.diagonal_correction
    lc = sc.mma_launch_config(B, Hm, R, W, D, cfg, num_sms=slots, warps=warps, stages=stages, variant=var,
                              parts=parts)
    Dp, P = lc["Dp"], lc["parts"]
    qw, qf = _emu_split(lib, qc, Dp, P)
    kw, kf = _emu_split(lib, kc, Dp, P)
    S = cfg.block_size
    out = np.zeros((B, Hm, geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)), np.float32)
    part = np.full((lc["slots"], lc["ntiles"], lc["RG"], lc["NKS"]), np.nan, np.float32)
    tmax = np.full((lc["slots"], lc["ntiles"], lc["RG"]), np.nan, np.float32)
    counter = np.zeros(1, np.int32)
    colw = j0 = band = None
    NB = 0
    if var:
        colw, j0, band, NB = sc.variant_weights(cfg, nq, nk)
    fn = getattr(lib, f"emk_mma{lc['warps']}{'v' if var else ''}_{P}")
    ints = [B * Hm, Hm, Hkv, R, W, Dp, nq, nk, cfg.c_q, cfg.c_k, cfg.c_h, Hm * cfg.c_h // Hkv, S, int(cfg.causal)]
    fn(ctypes.c_uint(lc["grid"][0]), ctypes.c_uint(1), ctypes.c_uint(lc["block"][0]), ctypes.c_uint(1),
       _ptr(qw), _ptr(qf), _ptr(kw), _ptr(kf), _ptr(out), _ptr(part), _ptr(tmax), _ptr(counter),
       *(ctypes.c_int(v) for v in ints), ctypes.c_float(cfg.scale_for(D) * LOG2E), ctypes.c_int(lc["stages"]),
       ctypes.c_int(lc["ntiles"]), ctypes.c_int(cfg.sink_tokens), _ptr(colw), _ptr(j0), _ptr(band), ctypes.c_int(NB),
       _ptr(None), _ptr(None), *(ctypes.c_int(0) for _ in range(3)))  # batch mode: no work list
    assert counter[0] >= lc["items"], "not every work item was taken"
    return out, lc


def _composites(case, seed=1, **extra):
    B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal = case
    rng = np.random.default_rng(seed)
    q = 1.5 * rng.standard_normal((B, Hq, Nq, D))
    k = 1.5 * rng.standard_normal((B, Hkv, Nk, D))
    cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, causal=causal, **extra)
    rq, rk = ref.compress(q, k, cfg)
    return np.ascontiguousarray(rq, np.float32), np.ascontiguousarray(rk, np.float32), cfg, Nq, Nk


# B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal
EMU_CASES = [
    (1, 4, 4, 1, 512, 512, 64, 128, 16, 16, True),    # defaults: RB = KB = 8, pieces of one n8 tile
    (2, 8, 2, 2, 300, 1000, 32, 64, 16, 8, True),     # Nq < Nk, ragged, GQA with c_h = 2, KB = 8
    (1, 2, 1, 1, 260, 260, 64, 128, 1, 1, True),      # RB = KB = 128: a key block spans two tiles
    (1, 2, 2, 1, 200, 333, 16, 16, 16, 16, False),    # RB = KB = 1 (single-column pieces), non-causal
    (1, 3, 1, 1, 129, 700, 40, 32, 2, 32, True),      # KB = 1, D = 40 padded to 64
    (1, 2, 1, 1, 1000, 300, 32, 64, 8, 4, False),     # non-causal Nq > Nk, KB = 16 (pieces of 2 n8 tiles)
    (1, 2, 2, 1, 90, 150, 200, 64, 4, 64, True),      # KB = 1, D = 200 padded to 224, pieces of 4 columns
]


@pytest.mark.parametrize("parts", [3, 2])
@pytest.mark.parametrize("case", EMU_CASES, ids=[f"case{i}" for i in range(len(EMU_CASES))])
def test_host_emulated_v4_matches_reference(host_kernels, case, parts) -> None:  # noqa: F811
    qc, kc, cfg, nq, nk = _composites(case)
    if not sc.mma_applicable(cfg, qc.shape[-1], parts=parts):
        pytest.skip(f"version 4 with {parts} parts does not take this shape (version 3 does)")
    want = ref.block_scores(qc, kc, cfg, nq, nk)
    got, lc = _emu_scores_v4(host_kernels["scores.cu"], qc, kc, cfg, nq, nk, parts=parts)
    err = float(np.abs(got - want).max())
    print(f"\nv4 host emulation {case}: max |scores - ref| = {err:.2e} (parts {parts}, warps {lc['warps']}, "
          f"stages {lc['stages']})")
    assert err <= EPS, f"max |scores - ref| = {err:.2e} > score_eps {EPS:g}"
    vis = geometry.visible_blocks(nq, nk, cfg.block_size, cfg.causal)
    assert np.all(got[..., ~vis] == 0.0)


@pytest.mark.parametrize("case", [EMU_CASES[1], EMU_CASES[5]], ids=["causal", "noncausal"])
def test_host_emulated_v4_same_bits_for_every_configuration(host_kernels, case) -> None:  # noqa: F811
    """Each row's arithmetic does not depend on the work-item size, the pipeline depth or the slots."""
    qc, kc, cfg, nq, nk = _composites(case, seed=5)
    lib = host_kernels["scores.cu"]
    base, _ = _emu_scores_v4(lib, qc, kc, cfg, nq, nk, warps=4, stages=1, parts=2)
    for warps, stages, slots in ((4, 2, 1), (8, 1, 3), (8, 2, 2)):
        again, _ = _emu_scores_v4(lib, qc, kc, cfg, nq, nk, warps=warps, stages=stages, slots=slots, parts=2)
        assert again.tobytes() == base.tobytes(), (warps, stages, slots)
    base, _ = _emu_scores_v4(lib, qc, kc, cfg, nq, nk, stages=1, parts=3)
    again, _ = _emu_scores_v4(lib, qc, kc, cfg, nq, nk, stages=2, slots=3, parts=3)
    assert again.tobytes() == base.tobytes()


VARIANT_CASES = [
    ((1, 2, 1, 1, 200, 260, 32, 64, 4, 8, True), 3, True),
    ((1, 2, 1, 1, 200, 260, 32, 64, 4, 8, True), 0, True),
    ((1, 2, 2, 1, 150, 150, 64, 32, 16, 4, True), 3, False),
    ((2, 4, 2, 2, 100, 170, 32, 32, 1, 8, True), 7, True),
    ((1, 2, 1, 1, 120, 90, 32, 32, 4, 8, False), 2, True),
]


@pytest.mark.parametrize("case,t,diag", VARIANT_CASES, ids=[f"var{i}" for i in range(len(VARIANT_CASES))])
def test_host_emulated_variants_match_reference(host_kernels, case, t, diag) -> None:  # noqa: F811
    qc, kc, cfg, nq, nk = _composites(case, seed=3, sink_tokens=t, diagonal_correction=diag)
    assert kc.shape[2] == t + geometry.cdiv(nk, cfg.c_k)
    want = ref.block_scores(qc, kc, cfg, nq, nk)
    got, _ = _emu_scores_v4(host_kernels["scores.cu"], qc, kc, cfg, nq, nk)
    err = float(np.abs(got - want).max())
    assert err <= EPS, f"max |scores - ref| = {err:.2e} > score_eps {EPS:g}"


def _center_model(k: np.ndarray, want_kbar: bool = False) -> np.ndarray:
    """``us_center_keys`` of one segment ``[W, D]`` in NumPy, in the kernel's order of float32 sums
    (``want_kbar``: the subtracted vector ``[D]`` instead)."""
    k = np.asarray(k, np.float32)
    nref = min(k.shape[0], sc.KREF)
    partial = np.zeros((8, k.shape[1]), np.float32)
    for c in range(nref):  # thread y adds its rows y, y + 8, ... ascending
        partial[c % 8] += k[c]
    kbar = np.zeros(k.shape[1], np.float32)
    for j in range(8):
        kbar += partial[j]
    kbar = kbar / np.float32(max(nref, 1))
    return kbar if want_kbar else k - kbar


def _emu_center(lib, k: np.ndarray, cu: np.ndarray | None = None) -> np.ndarray:
    k = np.ascontiguousarray(k, np.float32)
    out = np.full_like(k, np.nan)
    if cu is None:
        B, Hkv, W, D = k.shape
        segments = B * Hkv
    else:
        Hkv, D = k.shape[1], k.shape[2]
        W = int(np.diff(cu).max())
        segments = (cu.size - 1) * Hkv
    lc = sc.center_config(segments, W, D)
    cu32 = None if cu is None else np.ascontiguousarray(cu, np.int32)
    lib.emk_center(*(ctypes.c_uint(v) for v in (lc["grid"][0], lc["grid"][1], 32, 8)), _ptr(k), _ptr(out),
                   _ptr(cu32), ctypes.c_int(Hkv), ctypes.c_int(W), ctypes.c_int(D))
    return out


def test_host_emulated_center_keys_batch_and_packed(host_kernels) -> None:  # noqa: F811
    """``us_center_keys``: each (sequence, KV head) minus the mean of its first ``KREF`` columns, in a
    fixed order (the NumPy model's bits), the same bits in the batch and the packed layout."""
    rng = np.random.default_rng(7)
    lib = host_kernels["scores.cu"]
    k = (rng.standard_normal((2, 3, 300, 40)) + 5.0).astype(np.float32)  # W > CENTER_ROWS, D not a multiple of 32
    got = _emu_center(lib, k)
    want = np.stack([np.stack([_center_model(k[b, h]) for h in range(3)]) for b in range(2)])
    assert got.tobytes() == want.tobytes()
    lens = [5, 300, 64, 0, 257]  # fewer than KREF columns, two chunks, exactly KREF, empty, a short last chunk
    cu = np.concatenate([[0], np.cumsum(lens)])
    packed = (rng.standard_normal((int(cu[-1]), 3, 40)) + 5.0).astype(np.float32)
    gotp = _emu_center(lib, packed, cu)
    for i in range(len(lens)):
        seq = packed[cu[i]:cu[i + 1]].transpose(1, 0, 2)[None]
        assert gotp[cu[i]:cu[i + 1]].transpose(1, 0, 2)[None].tobytes() == _emu_center(lib, seq).tobytes(), i
    # a prefix of at least KREF columns is centred like the whole (chunked prefill, context parallelism)
    assert _emu_center(lib, k[:, :, :100])[:, :, :100].tobytes() == got[:, :, :100].tobytes()


@pytest.mark.parametrize("case,extra", [((1, 2, 1, 1, 200, 333, 16, 16, 16, 16, False), {}),
                                        ((2, 8, 2, 2, 50, 70, 16, 64, 2, 8, True), {}),
                                        ((1, 2, 1, 1, 200, 260, 32, 64, 4, 8, True),
                                         {"sink_tokens": 3, "diagonal_correction": True})])
def test_centering_leaves_the_reference_scores_unchanged(case, extra) -> None:
    """SPEC 4's scores of the centred keys equal those of the keys (a per-row shift of the logits), in float64."""
    qc, kc, cfg, nq, nk = _composites(case, seed=9, **extra)
    kc = kc + 3.0 * np.random.default_rng(1).standard_normal(kc.shape[-1]).astype(np.float32)  # a common component
    kbar = np.stack([np.stack([_center_model(kc[b, h], want_kbar=True) for h in range(kc.shape[1])])
                     for b in range(kc.shape[0])])[:, :, None, :].astype(np.float64)  # [B, Hkv, 1, D]
    a = ref.block_scores(qc, kc, cfg, nq, nk)
    b = ref.block_scores(qc, kc.astype(np.float64) - kbar, cfg, nq, nk)
    # within float64's own rounding of the logits (the dot-product bound D u sum|q||k|, u = 2^-53, twice):
    # |dA| <= A (1 - A) |dx| summed over a block is at most the largest logit error
    D = qc.shape[-1]
    dots = np.abs(qc.astype(np.float64)).max() * np.abs(kc.astype(np.float64)).max() * D
    assert np.abs(a - b).max() <= 2 * D * np.finfo(np.float64).eps * cfg.scale_for(D) * dots


@pytest.mark.parametrize("t,diag,causal", [(0, True, True), (3, False, True), (5, True, True), (2, True, False),
                                           (3, False, False)])
@pytest.mark.parametrize("nq,nk,c_q,c_k", [(200, 260, 4, 8), (77, 77, 16, 8), (33, 100, 1, 16), (64, 64, 8, 8)])
def test_variant_weights_equal_the_reference_log_weights(t, diag, causal, nq, nk, c_q, c_k) -> None:
    """colw + band (the kernel's form) = variant_log_weights on every column SPEC's rule lets a row see."""
    if t >= c_k or (causal and nq > nk):
        pytest.skip("not a valid configuration")
    cfg = UniSparseConfig(block_size=64, c_q=c_q, c_k=c_k, causal=causal, sink_tokens=t, diagonal_correction=diag)
    _, want = variant_log_weights(cfg, nq, nk)
    colw, j0, band, NB = sc.variant_weights(cfg, nq, nk)
    R, W = want.shape
    got = np.repeat(colw[None, :].astype(np.float64), R, axis=0)
    for r in range(R):
        for b in range(NB):
            j = int(j0[r]) + b
            if j < W:
                got[r, j] += band[r, b]
    # the kernel's visibility: sinks s <= p(last(r)), composites SPEC's rule (the reference's -inf there)
    C = W - t
    vis = np.ones((R, W), bool)
    if causal:
        last = np.minimum((np.arange(R) + 1) * c_q, nq) - 1 + (nk - nq)
        vis[:, :t] = np.arange(t)[None, :] <= last[:, None]
        vis[:, t:] = geometry.composite_visibility(nq, nk, c_q, c_k, True)[:, :C]
    got = np.where(vis, got, -np.inf)
    fin = np.isfinite(want)
    assert np.array_equal(fin, np.isfinite(got))
    assert np.allclose(got[fin], want[fin], atol=1e-6)


@pytest.fixture(scope="module")
def host_pool_sinks(tmp_path_factory):
    """``pooling.cu``'s ``us_pool_keys_sinks<float>`` built for the host emulation (g++)."""
    import shutil
    import subprocess

    from tests.test_cupy_compile import _host_source

    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels is skipped")
    d = tmp_path_factory.mktemp("hostemu_sinks")
    src = _host_source("pooling.cu") + """
extern "C" void emk_pool_sinks_f(unsigned gx, unsigned gy, unsigned bx, const float* x, float* o, int N, int D, int c, int t) {
  emu_launch({gx, gy, 1}, {bx, 1, 1}, [&] { us_pool_keys_sinks<float>(x, o, N, D, c, t); }); }
extern "C" void emk_pool_seq_h(unsigned gx, unsigned gy, unsigned bx, const __half* x, float* o, int H, int N, int D, int c, int ch) {
  emu_launch({gx, gy, 1}, {bx, 1, 1}, [&] { us_pool_seq<__half>(x, o, H, N, D, c, ch); }); }
"""
    (d / "sinks.cpp").write_text(src)
    so = d / "libsinks.so"
    r = subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-DUS_POOL_THREADS=64",
                        str(d / "sinks.cpp"), "-o", str(so)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(so))


@pytest.mark.parametrize("Nk,c_k,t", [(100, 8, 3), (5, 8, 7), (64, 16, 1), (9, 4, 3), (2, 4, 3)])
def test_host_emulated_pool_keys_with_sinks(host_pool_sinks, Nk, c_k, t) -> None:
    from unisparse_ref.cupy_backend import pooling
    from unisparse_ref.reference.pooling import pool_keys_with_sinks

    rng = np.random.default_rng(7)
    k = rng.standard_normal((2, 3, Nk, 24)).astype(np.float32)
    want = pool_keys_with_sinks(k, c_k, t)
    W = t + geometry.cdiv(Nk, c_k)
    out = np.full((2, 3, W, 24), np.nan, np.float32)
    lc = pooling.launch_config(2, 3, W, 24)
    lc_grid = (geometry.cdiv(W * 24, 64), 2 * 3)  # the backend's grid with 64 threads per block
    assert lc["grid"][1] == lc_grid[1]
    host_pool_sinks.emk_pool_sinks_f(ctypes.c_uint(lc_grid[0]), ctypes.c_uint(lc_grid[1]), ctypes.c_uint(64),
                                     _ptr(k), _ptr(out), ctypes.c_int(Nk), ctypes.c_int(24), ctypes.c_int(c_k),
                                     ctypes.c_int(t))
    assert out.shape == want.shape
    assert np.abs(out - want).max() <= 1e-6 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("D", [24, 20])
def test_host_emulated_pooling_vector_and_scalar_paths_agree(host_pool_sinks, D) -> None:
    """``us_pool_seq<__half>`` with 16-byte loads (D % 8 == 0, aligned input) and one element per
    thread (a misaligned input, or D % 8 != 0): the same sums in the same order, the same bits,
    each with the grid the backend computes."""
    from unisparse_ref.cupy_backend import pooling

    rng = np.random.default_rng(8)
    B, H, N, c, ch = 2, 4, 45, 16, 2
    x = rng.standard_normal((B, H, N, D)).astype(np.float16)
    buf = np.zeros(x.size + 8, np.float16)
    base = (-buf.ctypes.data // 2) % 8  # an element offset giving a 16-byte aligned start
    outs = []
    for off in (base, base + 1):  # aligned, then misaligned by 2 bytes
        xin = buf[off:off + x.size].reshape(x.shape)
        xin[...] = x
        per = pooling.outputs_per_thread(np.float16, D, xin.ctypes.data)
        assert per == (8 if off == base and D % 8 == 0 else 1)
        R = geometry.cdiv(N, c)
        lc = pooling.launch_config(B, H // ch, R, D, per)
        out = np.full((B, H // ch, R, D), np.nan, np.float32)
        host_pool_sinks.emk_pool_seq_h(ctypes.c_uint(lc["grid"][0] * pooling.THREADS // 64), ctypes.c_uint(lc["grid"][1]),
                                       ctypes.c_uint(64), _ptr(xin), _ptr(out),
                                       *(ctypes.c_int(v) for v in (H, N, D, c, ch)))
        want = ref.pool_heads(ref.pool_sequence(x, c), ch)
        assert np.abs(out - want).max() <= 1e-5 * float(np.abs(want).max())
        outs.append(out)
    assert outs[0].tobytes() == outs[1].tobytes()


# ---------------------------------------------------------------------------- packed batches (one launch)
@pytest.fixture(scope="module")
def host_scores(tmp_path_factory):
    """``scores.cu`` alone built for the host emulation (g++), as ``host_kernels`` builds it (``{"scores.cu": lib}``):
    the packed-mode tests do not depend on the other files' builds."""
    import shutil
    import subprocess

    from tests.test_cupy_compile import _host_source
    from unisparse_ref.cupy_backend import all_instantiations

    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels is skipped")
    d = tmp_path_factory.mktemp("hostemu_scores")
    (d / "scores.cpp").write_text(_host_source("scores.cu"))
    flags = sorted({o for s_ in all_instantiations() if s_.file == "scores.cu" for o in s_.options if o.startswith("-D")})
    r = subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", *flags, str(d / "scores.cpp"),
                        "-o", str(d / "libscores.so")], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"scores.cu": ctypes.CDLL(str(d / "libscores.so"))}


def _offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _packed_composites(nq, nk, Hq, Hkv, D, cfg, seed=4):
    """Packed float32 composite tokens ``q_c [sum R_i, Hm, D]``, ``k_c [sum C_i, Hkv, D]`` (the reference's
    pooling; a shared direction in the keys, which the centring removes) and the offsets."""
    from unisparse_ref.reference import varlen as rv

    rng = np.random.default_rng(seed)
    cu_q, cu_k = _offsets(nq), _offsets(nk)
    q = 1.5 * rng.standard_normal((int(cu_q[-1]), Hq, D))
    k = 1.5 * rng.standard_normal((int(cu_k[-1]), Hkv, D)) + 2.0 * rng.standard_normal(D)
    q_c, k_c = rv.compress_varlen(q, k, cu_q, cu_k, cfg)
    return np.ascontiguousarray(q_c, np.float32), np.ascontiguousarray(k_c, np.float32), cu_q, cu_k


#: (lengths_q, lengths_k, Hq, Hkv, D, config): lengths 1 and odd, not multiples of S or c, Nq < Nk, a
#: sequence without queries (with keys) and one without either, GQA with c_h = 2, a sequence of two
#: row tiles and two column tiles (the longest first across the batch), D = 40 padded to 64.
PACKED_CASES = [
    ([1, 37, 0, 600, 23, 0], [1, 61, 9, 700, 90, 0], 8, 2, 40,
     UniSparseConfig(block_size=32, c_q=4, c_k=8, c_h=2, threshold=0.8)),
    ([21, 3, 300], [13, 40, 250], 4, 2, 32, UniSparseConfig(block_size=16, c_q=2, c_k=4, causal=False)),
    ([130, 1, 260], [200, 1, 300], 2, 1, 64, UniSparseConfig(block_size=128, c_q=1, c_k=1)),
    ([5, 300, 77], [5, 400, 100], 4, 4, 64, UniSparseConfig(block_size=128, c_q=16, c_k=16)),
]


def test_packed_launch_config_work_list_and_descriptors() -> None:
    """The packed mode's tables (host, no GPU): every row tile of every sequence with queries once,
    sorted by the column tiles its last row walks, most first across the sequences; the descriptor
    of each sequence; the scratch of the widest sequence; the batch mode's tile numbers."""
    nq, nk, Hq, Hkv, D, cfg = PACKED_CASES[0]
    cu_q, cu_k = _offsets(nq), _offsets(nk)
    Hm = Hq // cfg.c_h
    lc = sc.packed_launch_config(cu_q, cu_k, Hm, D, cfg, num_sms=4)
    RG, TC = lc["RG"], lc["TC"]
    R = [geometry.cdiv(n, cfg.c_q) for n in nq]
    C = [geometry.cdiv(n, cfg.c_k) for n in nk]
    assert sorted(map(tuple, lc["work"].tolist())) == sorted(
        (i, x) for i in range(len(nq)) for x in range(geometry.cdiv(R[i], RG)))
    assert lc["nwork"] == 2 + 1 + 1 + 1 and lc["items"] == lc["nwork"] * Hm  # sequence 3 has two row tiles
    vis = [geometry.composite_visibility(nq[i], nk[i], cfg.c_q, cfg.c_k, cfg.causal) if nq[i] else None
           for i in range(len(nq))]
    tiles = [int(np.flatnonzero(vis[i][min((x + 1) * RG, R[i]) - 1]).max()) // TC + 1 for i, x in lc["work"].tolist()]
    assert tiles == sorted(tiles, reverse=True) and tiles[0] == 2 and lc["work"][0].tolist() == [3, 1]
    want = np.stack([R, C, nq, nk, packed_offsets(cu_q, cfg.c_q)[:-1], packed_offsets(cu_k, cfg.c_k)[:-1],
                     packed_offsets(cu_q, cfg.block_size)[:-1], np.zeros(len(nq), int)], axis=1)
    np.testing.assert_array_equal(lc["desc"], want)
    assert lc["ntiles"] == geometry.cdiv(max(C), TC) and lc["slots"] == min(lc["items"], 4 * lc["blocks_per_sm"])
    assert lc["width"] == max(geometry.num_blocks(n, cfg.block_size) for n in nk)
    batch = sc.mma_launch_config(1, Hm, R[3], C[3], D, cfg, num_sms=4)
    assert all(lc[k_] == batch[k_] for k_ in ("block", "shared_mem", "stages", "warps", "parts", "RG", "NKS", "Dp"))
    empty = sc.packed_launch_config(_offsets([0, 0]), _offsets([3, 0]), Hm, D, cfg)
    assert empty["nwork"] == 0 and empty["work"].shape == (0, 2) and empty["total_qb"] == 0


def _emu_scores_packed(lib, q_c, k_c, cu_q, cu_k, cfg, slots=3, warps=None, stages=None, parts=None):
    """``us_center_keys`` (packed), ``us_split_rows`` on the packed rows and ONE ``us_scores_mma`` launch in its
    packed mode, in the host emulation, with :func:`~unisparse_ref.cupy_backend.scores.packed_launch_config`."""
    Hm, D = q_c.shape[1], q_c.shape[2]
    Hkv = k_c.shape[1]
    lc = sc.packed_launch_config(cu_q, cu_k, Hm, D, cfg, num_sms=slots, warps=warps, stages=stages, parts=parts)
    Dp, P = lc["Dp"], lc["parts"]
    qw, qf = _emu_split(lib, q_c, Dp, P)
    kw, kf = _emu_split(lib, _emu_center(lib, k_c, lc["cu_c"]), Dp, P)
    out = np.zeros((Hm, lc["total_qb"], lc["width"]), np.float32)
    part = np.full((lc["slots"], lc["ntiles"], lc["RG"], lc["NKS"]), np.nan, np.float32)
    tmax = np.full((lc["slots"], lc["ntiles"], lc["RG"]), np.nan, np.float32)
    counter = np.zeros(1, np.int32)
    desc, work = np.ascontiguousarray(lc["desc"]), np.ascontiguousarray(lc["work"])
    fn = getattr(lib, f"emk_mma{lc['warps']}_{P}")
    ints = [Hm, Hm, Hkv, 0, 0, Dp, 0, 0, cfg.c_q, cfg.c_k, cfg.c_h, Hm * cfg.c_h // Hkv, cfg.block_size, int(cfg.causal)]
    fn(ctypes.c_uint(lc["grid"][0]), ctypes.c_uint(1), ctypes.c_uint(lc["block"][0]), ctypes.c_uint(1),
       _ptr(qw), _ptr(qf), _ptr(kw), _ptr(kf), _ptr(out), _ptr(part), _ptr(tmax), _ptr(counter),
       *(ctypes.c_int(v) for v in ints), ctypes.c_float(cfg.scale_for(D) * LOG2E), ctypes.c_int(lc["stages"]),
       ctypes.c_int(lc["ntiles"]), ctypes.c_int(0), _ptr(None), _ptr(None), _ptr(None), ctypes.c_int(0),
       _ptr(desc), _ptr(work), *(ctypes.c_int(v) for v in (lc["nwork"], lc["total_qb"], lc["width"])))
    assert counter[0] >= lc["items"], "not every work item was taken"
    return out


def _check_packed_against_batch(lib, case, **kw):
    """Packed scores: each sequence's rows bit for bit the batch mode on that sequence alone (its keys
    centred by the batch call), zeros past nKb_i; within score_eps of the float64 reference."""
    from unisparse_ref.reference import varlen as rv

    nq, nk, Hq, Hkv, D, cfg = case
    q_c, k_c, cu_q, cu_k = _packed_composites(nq, nk, Hq, Hkv, D, cfg)
    got = _emu_scores_packed(lib, q_c, k_c, cu_q, cu_k, cfg, **kw)
    cu_r, cu_c, cu_qb = (packed_offsets(c, g) for c, g in ((cu_q, cfg.c_q), (cu_k, cfg.c_k), (cu_q, cfg.block_size)))
    for i in range(len(nq)):
        if nq[i] == 0:
            continue
        qi = np.ascontiguousarray(q_c[cu_r[i]:cu_r[i + 1]].transpose(1, 0, 2)[None])
        ki = _emu_center(lib, np.ascontiguousarray(k_c[cu_c[i]:cu_c[i + 1]].transpose(1, 0, 2)[None]))
        one, _ = _emu_scores_v4(lib, qi, ki, cfg, nq[i], nk[i], warps=kw.get("warps"), stages=kw.get("stages"),
                                parts=kw.get("parts"))
        rows = got[:, cu_qb[i]:cu_qb[i + 1]]
        nkb = one.shape[-1]
        assert rows[:, :, :nkb].tobytes() == one[0].tobytes(), f"sequence {i}: packed != batch"
        assert not rows[:, :, nkb:].any(), f"sequence {i}: entries past nKb_i"
    want = rv.block_scores_varlen(q_c, k_c, cu_q, cu_k, cfg)
    err = float(np.abs(got - want).max())
    assert err <= EPS, f"max |packed scores - ref| = {err:.2e} > score_eps {EPS:g}"
    return got


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"parts": 3}, {"parts": 2, "warps": 4, "stages": 1, "slots": 2}, {"parts": 2, "warps": 8}],
                         ids=["p3", "p2w4s1", "p2w8"])
@pytest.mark.parametrize("case", PACKED_CASES, ids=[f"packed{i}" for i in range(len(PACKED_CASES))])
def test_host_emulated_packed_scores_equal_the_batch_mode(host_scores, case, kw) -> None:
    """us_scores_mma's packed mode (one launch over every sequence) against its batch mode on each
    sequence alone: the same bits; and against the float64 reference (more configurations; the
    default run has the backend-level test below)."""
    if not sc.mma_applicable(case[5], case[4], parts=kw.get("parts")):
        pytest.skip("version 4 does not take this shape with these parts")
    _check_packed_against_batch(host_scores["scores.cu"], case, **kw)


def test_host_emulated_block_scores_varlen_is_one_packed_launch(host_scores, monkeypatch) -> None:
    """``block_scores_varlen`` of the CuPy layer through a NumPy stand-in for CuPy whose kernels are the
    host-emulated ones (no GPU): ONE scoring launch in the packed mode (plus one centring and two splits),
    whose scores equal the per-sequence batch path ``be.block_scores`` bit for bit and the float64
    reference within score_eps; the variant diagonal_correction keeps the per-sequence path."""
    import sys

    from tests.test_cupy_compile import _fake_cupy
    from unisparse_ref.cupy_backend import _device, _loader
    from unisparse_ref.cupy_backend import varlen as cv
    from unisparse_ref.reference import varlen as rv

    fake, Kernel = _fake_cupy(host_scores)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_device, "_NONFINITE", {})
    monkeypatch.setattr(_loader, "_SHARED_OPTIN", {})
    monkeypatch.setattr(sc, "_SMS", {0: 3})  # three slots: each takes several items
    calls = []

    class Counting(Kernel):
        def __call__(self, grid, block, args, shared_mem=0):
            calls.append(self.name)
            return super().__call__(grid, block, args, shared_mem)

    monkeypatch.setattr(_loader, "get_function", Counting)
    be = CupyBackend("host emulation")
    # small (the emulation spawns a thread per CUDA thread): lengths 1 and odd, an empty sequence, Nq < Nk,
    # GQA with c_h = 2; sequence 3's row tile walks two column tiles and is taken first
    nq, nk, Hq, Hkv, D, cfg = ([1, 37, 0, 200, 23], [1, 61, 9, 300, 90], 4, 1, 32,
                               UniSparseConfig(block_size=32, c_q=4, c_k=4, c_h=2, threshold=0.8))
    q_c, k_c, cu_q, cu_k = _packed_composites(nq, nk, Hq, Hkv, D, cfg)
    got = cv.block_scores_varlen(be, fake.asarray(q_c), fake.asarray(k_c), cu_q, cu_k, cfg)
    mma = sc.mma_kernel(sc.mma_launch_config(1, 1, 1, 1, D, cfg)["warps"], False, sc.DEFAULT_PARTS).name_expression
    assert calls == ["us_split_rows", "us_center_keys", "us_split_rows", mma], calls
    got = np.asarray(got)
    cu_r, cu_c, cu_qb = (packed_offsets(c, g) for c, g in ((cu_q, cfg.c_q), (cu_k, cfg.c_k), (cu_q, cfg.block_size)))
    for i in range(len(nq)):
        if nq[i]:
            one = be.block_scores(np.ascontiguousarray(q_c[cu_r[i]:cu_r[i + 1]].transpose(1, 0, 2)[None]),
                                  np.ascontiguousarray(k_c[cu_c[i]:cu_c[i + 1]].transpose(1, 0, 2)[None]), cfg,
                                  nq[i], nk[i])
            nkb = one.shape[-1]
            assert got[:, cu_qb[i]:cu_qb[i + 1], :nkb].tobytes() == np.asarray(one)[0].tobytes(), i
            assert not got[:, cu_qb[i]:cu_qb[i + 1], nkb:].any()
    err = float(np.abs(got - rv.block_scores_varlen(q_c, k_c, cu_q, cu_k, cfg)).max())
    assert err <= EPS, f"max |packed scores - ref| = {err:.2e} > score_eps {EPS:g}"
    calls.clear()  # the research variant: per sequence, as before (one scoring launch per sequence with queries)
    small = ([3, 0, 20], [9, 4, 20], 2, 1, 16, UniSparseConfig(block_size=16, c_q=4, c_k=4, diagonal_correction=True))
    q2, k2, cq2, ck2 = _packed_composites(*small[:5], small[5])
    cv.block_scores_varlen(be, fake.asarray(q2), fake.asarray(k2), cq2, ck2, small[5])
    assert sum(c.startswith("us_scores_mma") for c in calls) == 2, calls


# ---------------------------------------------------------------------------- GPU
# the GPU tests need CuPy and a device; the host-emulation tests above do not
BACKEND, _WHY = cupy_backend_or_reason()
if BACKEND is not None:
    import cupy as cp
else:
    cp = None



def _gpu(f):
    """Mark a GPU test: ``gpu``, skipped without CuPy or a usable device."""
    return pytest.mark.gpu(pytest.mark.skipif(BACKEND is None, reason=f"cupy backend unavailable: {_WHY}")(f))


# B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal
GPU_CASES = EMU_CASES + [
    (1, 8, 2, 1, 4096, 4096, 128, 128, 16, 16, True),   # the default config at 4K, GQA 4
    (1, 8, 2, 4, 3000, 3333, 64, 128, 16, 16, True),    # c_h = 4, ragged, D = 64
    (2, 4, 4, 1, 1025, 2049, 128, 64, 4, 8, True),      # ragged, Nq < Nk
    (1, 4, 1, 1, 700, 900, 64, 256, 2, 4, True),        # RB = 128 on 4 warps, KB = 64
    (1, 2, 1, 1, 640, 640, 96, 256, 1, 32, True),       # RB = 256: 8 warps
    (1, 4, 2, 1, 800, 600, 128, 128, 16, 16, False),    # non-causal Nq > Nk
    (1, 2, 2, 1, 300, 300, 256, 64, 8, 8, True),        # D = 256
]


def _gpu_inputs(case, dtype, seed=11, structured=True, **extra):
    B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Nq, D))
    k = rng.standard_normal((B, Hkv, Nk, D))
    if structured:  # a shared direction per KV head and rotary positions: peaked rows, large logits
        from unisparse_ref.evaluation.workloads import rope

        u = 3.0 * rng.standard_normal((B, Hkv, 1, D))
        q = rope(q + np.repeat(u, Hq // Hkv, axis=1), np.arange(Nq) + max(0, Nk - Nq))
        k = rope(k + u, np.arange(Nk))
    cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, causal=causal, **extra)
    return q.astype(dtype), k.astype(dtype), cfg, Nq, Nk


@_gpu
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32], ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"case{i}" for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "random"])
def test_gpu_v4_scores_and_masks(case, dtype, structured) -> None:
    """Scores of the backend's own composites within score_eps of the float64 reference scores
    of those composites; masks eps-valid; both versions agree; repeats bit-identical."""
    q, k, cfg, nq, nk = _gpu_inputs(case, dtype, structured=structured)
    q_c, k_c = BACKEND.compress(q, k, cfg)
    qh, kh = cp.asnumpy(q_c), cp.asnumpy(k_c)
    want = ref.block_scores(qh, kh, cfg, nq, nk)
    D = qh.shape[-1]
    tag = f"{case} {np.dtype(dtype).name} {'structured' if structured else 'random'}"
    got = cp.asnumpy(BACKEND.block_scores(q_c, k_c, cfg, nq, nk))  # version 4 where it applies, else 3
    err = float(np.abs(got - want).max())
    print(f"\nGPU v{4 if sc.mma_applicable(cfg, D) else 3} {tag}: max |scores - ref64| = {err:.2e}")
    assert err <= EPS, f"max |scores - ref| = {err:.2e} > score_eps {EPS:g}"
    assert got.tobytes() == cp.asnumpy(BACKEND.block_scores(q_c, k_c, cfg, nq, nk)).tobytes()
    v3 = cp.asnumpy(sc.launch_scores(q_c, k_c, cfg, nq, nk, version=3))
    print(f"GPU v3 {tag}: max |scores - ref64| = {float(np.abs(v3 - want).max()):.2e}")
    assert float(np.abs(v3 - want).max()) <= EPS
    mask = BACKEND.select_blocks(cp.asarray(got), cfg, nq, nk)
    assert eps_valid_rows(mask, want, cfg, nq, nk, EPS).all()
    if sc.mma_applicable(cfg, D, parts=3):  # the three-part form (exact float32 operands), within the same eps
        three = cp.asnumpy(sc.launch_scores(q_c, k_c, cfg, nq, nk, version=4, parts=3))
        err3 = float(np.abs(three - want).max())
        print(f"GPU v4-3parts {tag}: max |scores - ref64| = {err3:.2e}")
        assert err3 <= EPS


@_gpu
@pytest.mark.parametrize("parts,warps,stages", [(3, 8, 2), (2, 4, 2), (2, 8, 1), (2, 8, 2)])
def test_gpu_v4_same_bits_for_every_configuration(parts, warps, stages) -> None:
    q, k, cfg, nq, nk = _gpu_inputs((1, 8, 2, 1, 2000, 2100, 128, 128, 16, 16, True), np.float32)
    q_c, k_c = BACKEND.compress(q, k, cfg)
    base = cp.asnumpy(sc.launch_scores(q_c, k_c, cfg, nq, nk, version=4, warps=MMA_W[parts], stages=1, parts=parts))
    got = cp.asnumpy(sc.launch_scores(q_c, k_c, cfg, nq, nk, version=4, warps=warps, stages=stages, parts=parts))
    assert got.tobytes() == base.tobytes()


MMA_W = {p: ws[0] for p, ws in sc.MMA_WARPS.items()}


@_gpu
@pytest.mark.parametrize("t,diag", [(0, True), (4, False), (4, True)])
@pytest.mark.parametrize("case", [GPU_CASES[7], GPU_CASES[8], EMU_CASES[1], (1, 4, 2, 1, 90, 90, 64, 32, 2, 8, False)],
                         ids=["4k", "ch4", "gqa_ch2", "noncausal"])
def test_gpu_variants_match_reference(case, t, diag) -> None:
    """The research variants through the backend's compress and block_scores, against the reference."""
    q, k, cfg, nq, nk = _gpu_inputs(case, np.float32, sink_tokens=t, diagonal_correction=diag)
    q_c, k_c = BACKEND.compress(q, k, cfg)
    rq, rk = ref.compress(q, k, cfg)
    assert tuple(k_c.shape) == rk.shape
    assert float(np.abs(cp.asnumpy(k_c) - rk).max()) <= 1e-5 * max(1.0, float(np.abs(rk).max()))
    want = ref.block_scores(cp.asnumpy(q_c), cp.asnumpy(k_c), cfg, nq, nk)
    got = cp.asnumpy(BACKEND.block_scores(q_c, k_c, cfg, nq, nk))
    err = float(np.abs(got - want).max())
    assert err <= EPS, f"max |scores - ref| = {err:.2e} > score_eps {EPS:g}"
