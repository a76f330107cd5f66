"""The CuPy pipeline of issue 13: selection v2, no host syncs, CUDA graphs (GPU), and their glue (CPU).

GPU (skipped without CuPy or a usable GPU):

* ``us_select_topp`` v2 equals the reference's mask and index form on identical scores for
  ``nKb`` from 1 to past 2048 (every power-of-two edge), float32 and float64 scores, causal
  and not, ``P`` in (0.5, 0.9, 1), ``threshold_mode`` "total" and "remaining", with exact ties
  and rows built to land on the threshold (the exact sequential re-walk);
* the pipeline with ``check_finite=False`` (no synchronisation at all) gives the bits of the
  checked one; a NaN input still raises with the check on, in eager and graph mode;
* :class:`~unisparse_ref.cupy_backend.PipelinePlan` (``graph=True``) gives the bits of the
  eager pipeline, on the capture's inputs and on new ones; wrong shapes are refused.

CPU: the launch configuration of the selection, and the kernel itself under the host emulation
of ``tests/test_cupy_compile.py`` (g++) in both threshold modes against the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import BFLOAT16, UniSparseConfig, geometry
from unisparse_ref import reference as ref
from unisparse_ref.cupy_backend import selection

from .conftest import cupy_backend_or_reason, random_qkv
from .test_cupy_compile import host_kernels  # noqa: F401 - the g++-built kernels, a fixture

#: nKb values around every power-of-two edge of the sort, up to past 2048.
NKBS = [1, 2, 3, 5, 31, 32, 33, 64, 65, 127, 129, 255, 256, 257, 511, 513, 1023, 1024, 1025, 2047, 2048, 2049, 2500]


def selection_scores(rng: np.random.Generator, shape: tuple[int, ...], Nq: int, Nk: int, S: int, causal: bool,
                     kind: str) -> np.ndarray:
    """Normalised scores ``[B, Hm, nQb, nKb]`` (float64): random, with exact ties, or uniform rows."""
    vis = geometry.visible_blocks(Nq, Nk, S, causal)
    if kind == "uniform":  # every visible block 1/n: running sums land on P = k/n up to rounding
        raw = np.ones(shape)
    else:
        raw = rng.exponential(size=shape) ** 3
        if kind == "ties":
            raw = np.round(raw, 1) + 0.1
    raw = np.where(vis, raw, 0.0)
    return raw / np.maximum(raw.sum(-1, keepdims=True), 1e-300)


# ---------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("nkb", [1, 2, 31, 32, 33, 100, 128, 129, 1000, 1024, 1025, 4096, 8192, 9000])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_selection_launch_config(nkb: int, itemsize: int) -> None:
    lc = selection.launch_config(7, nkb, itemsize)
    threads = lc["block"][0]
    assert threads % 32 == 0 and 32 <= threads <= selection.THREADS
    np2 = 1 << max(0, (nkb - 1).bit_length())
    assert np2 >= nkb and lc["shared_mem"] == np2 * (8 if itemsize == 4 else 16) + nkb
    assert lc["grid"] == (7, 1, 1)
    m = selection.mask_to_indices_config(7, nkb)
    assert m["block"][0] % 32 == 0 and m["shared_mem"] == nkb


@pytest.fixture(scope="module")
def emulated_selection(tmp_path_factory: pytest.TempPathFactory):
    """selection.cu built for the host emulation of tests/test_cupy_compile.py (32 threads per block)."""
    import ctypes
    import shutil
    import subprocess

    from .test_cupy_compile import _host_source

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels is skipped")
    d = tmp_path_factory.mktemp("selemu")
    cpp = d / "selection.cpp"
    cpp.write_text(_host_source("selection.cu"))
    so = d / "libselection.so"
    r = subprocess.run([gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-DUS_SEL_THREADS=32",
                        str(cpp), "-o", str(so)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(so))


#: (nKb, causal, P, kind) rows of the host-emulated selection: every path of the kernel (fast,
#: exact with ties at the cutoff, on-threshold rows walked sequentially, P = 1).
EMULATED_CASES = [(1, True, 0.9, "random"), (2, False, 0.5, "ties"), (33, True, 0.9, "ties"),
                  (64, False, 0.7, "uniform"), (70, True, 0.5, "uniform"), (130, True, 0.95, "random"),
                  (257, False, 0.9, "ties"), (40, True, 1.0, "random")]


@pytest.mark.parametrize(
    "mode, score_dtype, cases",
    [pytest.param("remaining", np.float32, [EMULATED_CASES[i] for i in (2, 3, 5)], id="remaining-float32-small")]
    + [pytest.param(m, d, EMULATED_CASES, id=f"{m}-{np.dtype(d).name}-all", marks=pytest.mark.slow)
       for m in ("total", "remaining") for d in (np.float32, np.float64)],
)
def test_host_emulated_selection_modes(emulated_selection, mode: str, score_dtype, cases, monkeypatch) -> None:
    """The kernel (host emulation, the backend's launch configuration) equals the reference
    (one small case by default; every case of both modes and dtypes is marked slow)."""
    import ctypes

    monkeypatch.setattr(selection, "THREADS", 32)  # the emulation was built with -DUS_SEL_THREADS=32
    fn = emulated_selection.emk_select_d if score_dtype == np.float64 else emulated_selection.emk_select_f
    rng = np.random.default_rng(31)
    S = 16
    for nkb, causal, P, kind in cases:
        Nq, Nk = min(3, nkb) * S, nkb * S
        cfg = UniSparseConfig(block_size=S, c_q=4, c_k=4, threshold=P, n_sink_blocks=1, n_local_blocks=2,
                              causal=causal, threshold_mode=mode)
        nqb = geometry.num_blocks(Nq, S)
        scores = np.ascontiguousarray(
            selection_scores(rng, (1, 2, nqb, nkb), Nq, Nk, S, causal, kind).astype(score_dtype))
        want = ref.select_blocks(scores, cfg, Nq, Nk)
        mask = np.zeros(scores.shape, np.bool_)
        cnt = np.zeros(scores.shape[:3], np.int32)
        idx = np.zeros(scores.shape, np.int32)
        lc = selection.launch_config(2 * nqb, nkb, scores.itemsize)
        ptr = [a.ctypes.data_as(ctypes.c_void_p) for a in (scores, mask, cnt, idx)]
        fn(*(ctypes.c_uint(x) for x in (lc["grid"][0], 1, lc["block"][0], 1)), *ptr,
           ctypes.c_void_p(None),  # geom: null, the batch layout
           *(ctypes.c_int(x) for x in (nqb, nkb, Nq, Nk, S, 1, 2, int(causal))), ctypes.c_double(P),
           ctypes.c_int(selection.THRESHOLD_MODES[mode]))
        assert np.array_equal(mask, want.mask), (nkb, causal, P, kind)
        wc, wi = want.to_indices()
        assert np.array_equal(cnt, wc) and np.array_equal(idx, wi), (nkb, causal, P, kind)


# ---------------------------------------------------------------------------- GPU
BACKEND, _WHY = cupy_backend_or_reason()
needs_gpu = pytest.mark.skipif(BACKEND is None, reason=f"cupy backend unavailable: {_WHY}")


def _bits(x) -> np.ndarray:
    """Host bytes of a backend output (any dtype, bf16 included): for bit-identity checks."""
    return np.ascontiguousarray(us.to_numpy(x)).view(np.uint8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["total", "remaining"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("score_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nkb", NKBS)
def test_selection_v2_equals_reference_for_every_nkb(nkb: int, score_dtype, causal: bool, mode: str) -> None:
    import cupy as cp

    S = 16
    Nq, Nk = min(4, nkb) * S, nkb * S
    nqb = geometry.num_blocks(Nq, S)
    rng = np.random.default_rng(nkb)
    for P in (0.5, 0.9, 1.0):
        cfg = UniSparseConfig(block_size=S, c_q=4, c_k=4, threshold=P, n_sink_blocks=1, n_local_blocks=2,
                              causal=causal, threshold_mode=mode)
        parts = [selection_scores(rng, (1, 1, nqb, nkb), Nq, Nk, S, causal, kind)
                 for kind in ("random", "ties", "uniform")]
        scores = np.concatenate(parts, axis=1).astype(score_dtype)
        want = ref.select_blocks(scores, cfg, Nq, Nk)
        bm, counts, idx = BACKEND.select_blocks_indices(cp.asarray(scores), cfg, Nq, Nk)
        assert np.array_equal(us.to_numpy(bm.mask), want.mask), (nkb, P, mode)
        wc, wi = want.to_indices()
        assert np.array_equal(us.to_numpy(counts), wc) and np.array_equal(us.to_numpy(idx), wi)


def _qkv(seed: int, dtype=BFLOAT16, N: int = 1500, Nk: int = 1700):
    return random_qkv(np.random.default_rng(seed), 1, 8, 2, N, Nk, 128, dtype)


CFG = UniSparseConfig(block_size=128, c_q=16, c_k=16, c_h=2, threshold=0.9)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", [CFG, UniSparseConfig.calibrated(block_size=128, c_q=16, c_k=16)],
                         ids=["spec", "calibrated"])
def test_no_sync_path_equals_the_checked_one(config) -> None:
    q, k, v = _qkv(1)
    a = BACKEND.unisparse_attention(q, k, v, config)
    b = BACKEND.unisparse_attention(q, k, v, config, check_finite=False)
    for x, y in zip(a[:2] + a[3:], b[:2] + b[3:], strict=True):
        assert _bits(x).tobytes() == _bits(y).tobytes()
    assert np.array_equal(us.to_numpy(a[2].mask), us.to_numpy(b[2].mask))
    # the mask is the reference's selection on the GPU's own scores (both modes)
    want = ref.select_blocks(us.to_numpy(a[3]), config, q.shape[2], k.shape[2]).mask
    assert np.array_equal(us.to_numpy(a[2].mask), want)
    bad = v.copy()
    bad[0, 1, 7, 3] = np.nan
    with pytest.raises(ValueError, match="v holds non-finite"):
        BACKEND.unisparse_attention(q, k, bad, config)
    BACKEND.unisparse_attention(q, k, bad, config, check_finite=False)  # no check: no error


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16, np.float32], ids=["bf16", "fp16", "fp32"])
def test_nonfinite_counts_on_words_count_every_lane(dtype) -> None:
    """The pipelines' NaN/inf counts read 2- and 4-byte inputs as 8-byte words: a NaN, +inf or
    -inf in any lane of a word is counted once, finite extremes and subnormals are not; arrays
    whose bytes are not whole aligned words take the element-wise test, with the same counts."""
    from unisparse_ref.cupy_backend._device import device_input, nonfinite_counts

    rng = np.random.default_rng(3)
    lanes = 8 // np.dtype(dtype).itemsize
    big, tiny = float(np.finfo(np.float16 if dtype == np.float16 else np.float32).max), 1e-41
    for n in (4096, 4096 + 1, 13):  # whole words; a tail (element-wise); a few elements
        x = rng.standard_normal(n).astype(np.float32)
        x[:4] = [big if dtype != BFLOAT16 else 3e38, -big if dtype != BFLOAT16 else -3e38, tiny, 0.0]
        x = x.astype(dtype)
        bad = rng.choice(np.arange(4, n), size=min(n - 4, 2 * lanes + 1), replace=False)
        x[bad] = np.array([np.nan, np.inf, -np.inf] * n, np.float32)[: bad.size].astype(dtype)
        d, dt = device_input("x", x)
        whole = nonfinite_counts(("x", d, dt), ("x1", d[1:], dt)).get()  # d[1:]: not 8-byte aligned
        assert whole.tolist() == [bad.size, bad.size], (n, whole)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_graph_capture_gives_the_eager_bits(dtype, check_finite: bool) -> None:
    import cupy as cp

    BACKEND.clear_plans()
    q, k, v = _qkv(2, dtype)
    plan = BACKEND.plan(q, k, v, CFG, check_finite=check_finite)
    for seed in (2, 3):  # the capture's inputs, then new ones
        q2, k2, v2 = _qkv(seed, dtype)
        eager = BACKEND.unisparse_attention(q2, k2, v2, CFG, check_finite=check_finite)
        got = plan(q2, k2, v2)
        cp.cuda.Device().synchronize()
        for x, y in zip(eager[:2] + eager[3:], got[:2] + got[3:], strict=True):
            assert _bits(x).tobytes() == _bits(y).tobytes()
        assert np.array_equal(us.to_numpy(eager[2].mask), us.to_numpy(got[2].mask))
    # graph=True: a cached plan, the same bits; its outputs are the plan's buffers
    g1 = BACKEND.unisparse_attention(q, k, v, CFG, graph=True, check_finite=check_finite)
    g2 = BACKEND.unisparse_attention(q, k, v, CFG, graph=True, check_finite=check_finite)
    assert g1[1] is g2[1] and len(BACKEND._plans) == 1
    e = BACKEND.unisparse_attention(q, k, v, CFG)
    assert _bits(g2[0]).tobytes() == _bits(e[0]).tobytes()
    # inputs given as the plan's own buffers: no copies, same result
    assert _bits(plan(plan.q, plan.k, plan.v)[0]).tobytes() == _bits(plan(q2, k2, v2)[0]).tobytes()
    with pytest.raises(ValueError, match="plan was built for"):
        plan(q[:, :, :1400], k, v)
    if check_finite:
        bad = us.to_numpy(v).copy()
        bad[0, 0, 3, 3] = np.inf
        with pytest.raises(ValueError, match="v holds non-finite"):
            plan(q, k, bad)
        with pytest.raises(ValueError, match="v holds non-finite"):
            BACKEND.unisparse_attention(q, k, bad, CFG, graph=True)
    BACKEND.clear_plans()


@pytest.mark.gpu
@needs_gpu
def test_graph_plans_are_bounded_and_keyed() -> None:
    BACKEND.clear_plans()
    for n in range(BACKEND.max_plans + 2):
        q, k, v = _qkv(4, BFLOAT16, N=256 + 128 * n, Nk=256 + 128 * n)
        BACKEND.unisparse_attention(q, k, v, CFG, graph=True)
    assert len(BACKEND._plans) == BACKEND.max_plans
    BACKEND.clear_plans()
    assert not BACKEND._plans


# ---------------------------------------------------------------------------- CPU: the plan's glue
def _graph_stand_in(monkeypatch, kernels):
    """tests/test_cupy_compile.py's NumPy stand-in for CuPy, plus streams that capture: between
    ``begin_capture`` and ``end_capture`` every kernel launch (the emulated kernels, the
    non-finite counter, the reference standing in for the attention) is recorded as well as run,
    and ``Graph.launch`` runs the records again on the same arrays, as a CUDA graph would."""
    import contextlib
    import sys
    import types

    from unisparse_ref.cupy_backend import _device, _loader, attention

    from .test_cupy_compile import _fake_cupy, _reference_attention_forward

    fake, Kernel = _fake_cupy(kernels)
    rec: dict[str, list | None] = {"ops": None}

    def recorded(fn):
        def run(*a, **k):
            res = fn(*a, **k)
            if rec["ops"] is not None:
                rec["ops"].append(lambda: fn(*a, **k))
            return res
        return run

    Kernel.__call__ = recorded(Kernel.__call__)
    zeros = fake.zeros

    def zeros_recorded(*a, **k):  # cudaMemsetAsync: a node of the graph, replayed too
        z = zeros(*a, **k)
        if rec["ops"] is not None:
            rec["ops"].append(lambda: z.fill(0))
        return z

    fake.zeros = zeros_recorded
    fake.ReductionKernel.__call__ = recorded(fake.ReductionKernel.__call__)
    ref_forward = _reference_attention_forward()

    def attention_forward(*a, **k):
        out, lse = ref_forward(*a, **k)
        if rec["ops"] is not None:
            def again():
                o2, l2 = ref_forward(*a, **k)
                out[...] = o2
                lse[...] = l2
            rec["ops"].append(again)
        return out, lse

    class Graph:
        def __init__(self, ops):
            self.ops = ops

        def launch(self, stream=None):
            for op in self.ops:
                op()

    class Stream:
        ptr = 7

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

        def begin_capture(self, mode=None):
            assert rec["ops"] is None, "capture inside a capture"
            rec["ops"] = []

        def end_capture(self):
            ops, rec["ops"] = rec["ops"], None
            return Graph(ops)

    class Data:
        def __init__(self, arr):
            self.arr, self.ptr = arr, arr.ctypes.data

        def copy_from_device_async(self, src, nbytes, stream=None):
            assert nbytes == self.arr.nbytes == src.arr.nbytes
            self.arr.view(np.uint8)[...] = src.arr.view(np.uint8)

    fake.ndarray.data = property(lambda self: Data(self))
    fake.cuda.Stream = Stream
    fake.cuda.get_current_stream = lambda: Stream()
    fake.cuda.MemoryPool = lambda: types.SimpleNamespace(malloc=None)
    fake.cuda.using_allocator = lambda alloc=None: contextlib.nullcontext()
    fake.empty_like = lambda a: np.empty_like(a).view(fake.ndarray)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(attention, "attention_forward", attention_forward)
    monkeypatch.setattr(_device, "_BF16_NATIVE", True)
    monkeypatch.setattr(_device, "_NONFINITE", {})
    monkeypatch.setattr(selection, "THREADS", 32)  # the emulation was built with -DUS_SEL_THREADS=32
    monkeypatch.setattr(_loader, "_SHARED_OPTIN", {})
    monkeypatch.setattr(_loader, "get_function", Kernel)
    return fake


@pytest.mark.slow  # builds pooling, scores and selection with g++ (about 15 s) and emulates the pipeline
def test_plan_glue_on_host_emulation(host_kernels, monkeypatch) -> None:  # noqa: F811 - the imported fixture
    """PipelinePlan and graph=True on the stand-in: the replay recomputes from new inputs and
    gives the eager bits, the plan's own buffers skip the copies, the check raises, plans are
    keyed and bounded."""
    from unisparse_ref import cupy_backend as cb

    _graph_stand_in(monkeypatch, host_kernels)
    be = cb.CupyBackend("host emulation")
    cfg = UniSparseConfig(block_size=32, c_q=8, c_k=4, c_h=2, threshold=0.8)
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 4, 2, 150, 200, 32, BFLOAT16)
    plan = be.plan(q, k, v, cfg)
    for seed in (5, 6):
        q2, k2, v2 = random_qkv(np.random.default_rng(seed), 1, 4, 2, 150, 200, 32, BFLOAT16)
        eager = be.unisparse_attention(q2, k2, v2, cfg)
        got = plan(q2, k2, v2)
        for x, y in zip(eager[:2] + eager[3:], got[:2] + got[3:], strict=True):
            assert _bits(x).tobytes() == _bits(y).tobytes()
        assert np.array_equal(us.to_numpy(eager[2].mask), us.to_numpy(got[2].mask))
    same = plan(plan.q, plan.k, plan.v)  # the plan's own buffers (bf16 views): no copy, same bits
    assert _bits(same[0]).tobytes() == _bits(eager[0]).tobytes()
    bad = v2.copy()
    bad[0, 1, 9, 4] = np.nan
    with pytest.raises(ValueError, match="v holds"):  # (the reference standing in for the attention may say it first)
        plan(q2, k2, bad)
    with pytest.raises(ValueError, match="plan was built for"):
        plan(q2[:, :, :140], k2, v2)
    be.max_plans = 2
    for n in (64, 96, 128):
        qn, kn, vn = random_qkv(rng, 1, 4, 2, n, n, 32, BFLOAT16)
        a1 = be.unisparse_attention(qn, kn, vn, cfg, graph=True)
        a2 = be.unisparse_attention(qn, kn, vn, cfg, graph=True)
        assert a1[1] is a2[1]  # the same plan's buffers
    assert len(be._plans) == 2
    be.clear_plans()
    assert not be._plans
