"""CPU tests of the attention stage's pure-Python parts (``unisparse_ref.cupy_backend.attention``).

The kernels themselves are tested on a GPU (``tests/test_cupy_attention.py``) and compiled
without one by ``tests/test_cupy_compile.py``; here: the version registry, the instantiation
list (and that every kernel the launcher can pick is in it, with its options), the launch
configuration arithmetic and the index-form check (on NumPy arrays).
"""

from __future__ import annotations

import numpy as np
import pytest

from unisparse_ref import BlockMask
from unisparse_ref.cupy_backend import all_instantiations
from unisparse_ref.cupy_backend import attention as att
from unisparse_ref.cupy_backend._loader import KernelSpec


def test_registry_and_default():
    assert sorted(att.KERNEL_VERSIONS) == [1, 6, 7, 9], "the ladder: scalar, mma.sync, wgmma, FA3-class"
    assert att.DEFAULT_VERSION in att.KERNEL_VERSIONS
    assert att.KERNEL_VERSIONS[att.DEFAULT_VERSION].wgmma
    assert not att.KERNEL_VERSIONS[att.FALLBACK_VERSION].wgmma, "the fallback must run off Hopper"
    assert att.KERNEL_VERSIONS[1].dtypes() == ("float16", "bfloat16", "float32")
    for n, ver in att.KERNEL_VERSIONS.items():
        assert ver.number == n
        if ver.tensor_core:
            br = ver.rows_per_cta(128)
            assert br == ver.warps * ver.m_tiles * 16 == 128 and 128 % ver.tile_keys() == 0
            assert ver.sorted_work


def test_instantiations_cover_every_version_dtype_and_head_dim():
    specs = att.INSTANTIATIONS
    assert all(isinstance(s, KernelSpec) and s.file in ("attention.cu", "attention_hopper.cu") for s in specs)
    assert len(set(specs)) == len(specs)
    assert set(specs) <= set(all_instantiations())
    names = {s.name_expression for s in specs}
    assert "us_attn_fwd_mma<__nv_bfloat16, 128, 4, 2, 64>" in names
    assert "us_attn_fwd_wgmma<__half, 64>" in names
    assert "us_attn_fwd_v1<float, 32>" in names
    wg = [s for s in specs if "wgmma" in s.name_expression]
    assert len(wg) == 4 and all(s.options == ("-arch=sm_90a",) for s in wg)
    fa3 = [s for s in specs if s.file == "attention_hopper.cu"]
    assert len(fa3) == 6 and all(s.options == ("-arch=sm_90a",) for s in fa3)  # fp16/bf16 x D 64/128/256
    assert "us_fa3_fwd<__nv_bfloat16, 256, 64, 2>" in names
    assert all(s.options == () for s in specs if "wgmma" not in s.name_expression and s not in fa3)


@pytest.mark.parametrize("hopper", [True, False])
def test_every_kernel_the_launcher_picks_is_compiled(monkeypatch, hopper):
    """What ``attention_forward`` launches (``kernel_spec`` of the resolved version) is in the list."""
    monkeypatch.setattr(att, "_has_sm90", lambda: hopper)
    listed = set(att.INSTANTIATIONS)
    for version in [None, *att.KERNEL_VERSIONS]:
        for dtype in ("float16", "bfloat16", "float32"):
            for D in att.KERNEL_HEAD_DIMS:
                for S in (16, 64, 128, 256):
                    try:
                        ver = att._resolve_version(version, dtype, D, S)
                    except (TypeError, ValueError):
                        continue
                    assert att.kernel_spec(ver, dtype, D) in listed, (version, dtype, D, S)
                    if version is None:
                        if dtype == "float32" or D == 32 or S < 128 or (D == 256 and not hopper):
                            want = 1
                        else:
                            want = 9 if hopper else 6
                        assert ver.number == want, (dtype, D, S, hopper)


def test_launch_config_numbers():
    v7 = att.KERNEL_VERSIONS[7]
    cfg = att.launch_config(v7, batch=2, q_heads=32, nq=1000, block_size=128, head_dim=128, itemsize=2)
    assert cfg["br"] == 128 and cfg["n_qtiles"] == 8
    assert cfg["grid"] == (2 * 32 * 8,) and cfg["block"] == (256,)
    # Q [128][128] + K [2][64][128] + V [64][128] + V^T [128][64], bf16, + 1 KiB alignment
    assert cfg["shared_mem"] == (128 + 4 * 64) * 128 * 2 + 1024
    assert 2 * (cfg["shared_mem"] + 1024) <= 228 * 1024, "two CTAs per H200 SM"
    v6 = att.KERNEL_VERSIONS[6]
    cfg = att.launch_config(v6, batch=1, q_heads=8, nq=129, block_size=128, head_dim=64, itemsize=2)
    assert cfg["grid"] == (8 * 2,) and cfg["block"] == (128,)
    assert cfg["shared_mem"] == (128 + 4 * 64) * 64 * 2  # Q [Br][D] + K, V [2][Bc][D]
    v1 = att.KERNEL_VERSIONS[1]
    cfg = att.launch_config(v1, batch=1, q_heads=4, nq=100, block_size=32, head_dim=64, itemsize=4)
    assert cfg["block"] == (32,) and cfg["grid"] == (4, 4, 1) and cfg["shared_mem"] == 0
    v9 = att.KERNEL_VERSIONS[9]  # persistent: at most one CTA per SM (132 on an H200)
    cfg = att.launch_config(v9, batch=1, q_heads=32, nq=32768, block_size=128, head_dim=128, itemsize=2)
    assert cfg["block"] == (384, 1, 1) and cfg["grid"] == (132, 1, 1) and cfg["n_tasks"] == 32 * 256
    # 1 KiB alignment + Q [128][128] + K, V rings [2 stages][128][128] + 10 mbarriers
    assert cfg["shared_mem"] == 1024 + (128 + 2 * 2 * 128) * 128 * 2 + 8 * (2 + 4 * 2) <= 227 * 1024


def test_padded_head_dim():
    assert [att.padded_head_dim(d) for d in (1, 32, 33, 64, 100, 128, 129, 256)] == [32, 32, 64, 64, 128, 128,
                                                                                     256, 256]
    with pytest.raises(ValueError, match="head dims up to 256"):
        att.padded_head_dim(257)


def test_resolve_version_errors(monkeypatch):
    monkeypatch.setattr(att, "_has_sm90", lambda: False)
    with pytest.raises(ValueError, match="version"):
        att._resolve_version(2, "bfloat16", 128, 128)  # retired
    with pytest.raises(TypeError, match="supports"):
        att._resolve_version(6, "float32", 128, 128)
    with pytest.raises(ValueError, match="head dims"):
        att._resolve_version(6, "float16", 96, 128)
    with pytest.raises(ValueError, match="block_size"):
        att._resolve_version(6, "float16", 64, 64)
    with pytest.raises(ValueError, match="Hopper"):
        att._resolve_version(7, "float16", 64, 128)
    assert att._resolve_version(1, "float32", 32, 16).number == 1


def test_check_index_form_accepts_blockmask_indices_and_rejects_bad_ones():
    rng = np.random.default_rng(0)
    bm = BlockMask(rng.random((2, 3, 4, 5)) < 0.5, 128, 1, 500, 600, True)
    counts, idx = bm.to_indices()
    att.check_index_form(counts, idx, 5)
    bad = idx.copy()
    row = tuple(int(x) for x in np.argwhere(counts >= 2)[0])
    bad[row][0] = 7
    with pytest.raises(ValueError, match="outside"):
        att.check_index_form(counts, bad, 5)
    bad = idx.copy()
    bad[row][1] = bad[row][0]
    with pytest.raises(ValueError, match="ascending"):
        att.check_index_form(counts, bad, 5)
    with pytest.raises(ValueError, match="kv_counts"):
        att.check_index_form(counts + 6, idx, 5)


def _numpy_cupy():
    """A NumPy-backed stand-in for the few CuPy calls the v9 launch glue makes (no GPU here)."""
    import types

    fake = types.ModuleType("cupy")

    class ndarray(np.ndarray):
        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

    ndarray.__module__ = "cupy"

    def wrap(fn):
        return lambda *a, **k: np.asarray(fn(*a, **k)).view(ndarray)

    for n in ("float16", "float32", "uint16", "int32", "int64", "bool_"):
        setattr(fake, n, getattr(np, n))
    fake.ndarray = ndarray
    for n in ("empty", "zeros", "ascontiguousarray", "arange", "argsort", "empty_like", "asarray"):
        setattr(fake, n, wrap(getattr(np, n)))
    dev = types.SimpleNamespace(id=0, compute_capability="90", attributes={"MultiProcessorCount": 132})
    fake.cuda = types.SimpleNamespace(Device=lambda *a: dev)
    return fake, ndarray


@pytest.mark.parametrize("sort_work", [False, True])
def test_v9_launch_glue(monkeypatch, sort_work):
    """attention_forward -> _hopper.fa3_forward on the host: the instantiation, the tensor maps,
    every scalar argument in the kernel's order, the persistent grid, and (sort_work) the work
    list built once by attention_forward, longest mask rows first. The launch is recorded, not run."""
    import sys

    from unisparse_ref.cupy_backend import _hopper

    fake, nd = _numpy_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    launches = []
    monkeypatch.setattr(_hopper, "_launch_param", lambda kernel, cfg, tmaps, rest: launches.append((kernel, cfg, tmaps, rest)))
    monkeypatch.setattr(_hopper, "_get_kernel", lambda name: name)
    monkeypatch.setattr(_hopper, "encode_tensor_map", lambda arr, dtype, rows: (dtype, tuple(arr.shape), rows))
    monkeypatch.setattr(att, "_has_sm90", lambda: True)
    rng = np.random.default_rng(0)
    B, Hq, Hkv, N, D = 1, 8, 2, 700, 128
    q = rng.standard_normal((B, Hq, N, D)).astype(np.float16).view(np.uint16).view(nd)  # bf16 bits
    k = rng.standard_normal((B, Hkv, N, D)).astype(np.float16).view(np.uint16).view(nd)
    bm = BlockMask(rng.random((B, Hq, 6, 6)) < 0.5, 128, 1, N, N, True)
    counts, idx = (a.astype(np.int32).view(nd) for a in bm.to_indices())
    out, lse = att.attention_forward(q, k, k, counts, idx, nq=N, nk=N, block_size=128, heads_per_mask=1,
                                     causal=True, softmax_scale=None, sort_work=sort_work)
    assert out.shape == q.shape and lse.shape == (B, Hq, N)
    (kernel, cfg, tmaps, rest), = launches
    assert kernel == "us_fa3_fwd<__nv_bfloat16, 128, 128, 2>"
    assert tmaps == [("bfloat16", q.shape, 128), ("bfloat16", k.shape, 128), ("bfloat16", k.shape, 128)]
    # Hq, Hkv, Hm, Nq, Nk, nQb, idx_stride, S, c_h, causal, n_qtiles; scale * log2(e); n_tasks; sched; dynamic
    assert [int(x) for x in rest[5:16]] == [Hq, Hkv, Hq, N, N, 6, 6, 128, 1, 1, 6]
    assert float(rest[16]) == pytest.approx(np.log2(np.e) / np.sqrt(D), rel=1e-6)
    assert int(rest[17]) == B * Hq * 6 and cfg["grid"] == (48, 1, 1)  # fewer tasks than SMs: one CTA each
    assert rest[18].shape == (1 + 48,) and not rest[18].any() and int(rest[19]) == 1
    work = rest[2]
    if not sort_work:
        assert work is None
        return
    assert sorted(work.tolist()) == list(range(48))
    lengths = [int(counts[0, (t // 6) % Hq, t % 6]) for t in work.tolist()]
    assert lengths == sorted(lengths, reverse=True)
