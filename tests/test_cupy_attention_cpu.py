"""CPU tests of the attention launcher's pure-Python parts (``unisparse_ref._cupy_attention``).

The kernels themselves are tested on a GPU (``tests/test_cupy_attention.py``) and compiled
without one by ``tests/test_cupy_compile.py``; here: the version registry, the instantiation
list, the launch configuration arithmetic and the index-form check (on NumPy arrays).
"""

from __future__ import annotations

import numpy as np
import pytest

from unisparse_ref import BlockMask
from unisparse_ref import _cupy_attention as att
from unisparse_ref._loader import CTYPES, KernelSpec


def test_registry_and_default():
    assert att.DEFAULT_VERSION in att.KERNEL_VERSIONS
    assert not att.KERNEL_VERSIONS[att.FALLBACK_VERSION].wgmma, "the fallback must run off Hopper"
    assert att.KERNEL_VERSIONS[1].dtypes() == ("float16", "bfloat16", "float32")
    for n, ver in att.KERNEL_VERSIONS.items():
        assert ver.number == n
        if ver.tensor_core:
            assert ver.br(128) == ver.warps * ver.m_tiles * 16 and 128 % ver.br(128) == 0
            assert 128 % ver.bc == 0


def test_instantiations_cover_every_version_dtype_and_head_dim():
    specs = att.attention_instantiations()
    assert specs == att.INSTANTIATIONS
    assert all(isinstance(s, KernelSpec) and s.file == "attention.cu" for s in specs)
    names = {s.name_expression for s in specs}
    for ver in att.KERNEL_VERSIONS.values():
        for dt in ver.dtypes():
            for d in ver.head_dims:
                assert ver.name_expression(CTYPES[dt], d) in names
    wg = [s for s in specs if "wgmma" in s.name_expression]
    assert wg and all(s.options == ("-arch=sm_90a",) for s in wg)
    assert all(s.options == () for s in specs if "wgmma" not in s.name_expression)


def test_launch_config_numbers():
    v7 = att.KERNEL_VERSIONS[7]
    cfg = att.launch_config(v7, batch=2, q_heads=32, nq=1000, block_size=128, head_dim=128, itemsize=2)
    assert cfg["br"] == 128 and cfg["n_qtiles"] == 8
    assert cfg["grid"] == (2 * 32 * 8,) and cfg["block"] == (256,)
    # Q [128][128] + K [2][64][128] + V [64][128] + V^T [128][64], bf16, + 1 KiB alignment
    assert cfg["shared_mem"] == (128 + 4 * 64) * 128 * 2 + 1024
    assert 2 * (cfg["shared_mem"] + 1024) <= 228 * 1024, "two CTAs per H200 SM"
    v2 = att.KERNEL_VERSIONS[2]
    cfg = att.launch_config(v2, batch=1, q_heads=8, nq=129, block_size=128, head_dim=64, itemsize=2)
    assert cfg["grid"] == (8, 3, 1) and cfg["block"] == (128,)
    v1 = att.KERNEL_VERSIONS[1]
    cfg = att.launch_config(v1, batch=1, q_heads=4, nq=100, block_size=32, head_dim=64, itemsize=4)
    assert cfg["block"] == (32,) and cfg["grid"] == (4, 4, 1) and cfg["shared_mem"] == 0


def test_resolve_version_errors():
    with pytest.raises(ValueError, match="version"):
        att._resolve_version(99, "bfloat16", 128, 128)
    with pytest.raises(TypeError, match="supports"):
        att._resolve_version(2, "float32", 128, 128)
    with pytest.raises(ValueError, match="head dims"):
        att._resolve_version(2, "float16", 96, 128)
    with pytest.raises(ValueError, match="block_size"):
        att._resolve_version(6, "float16", 64, 64)
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
