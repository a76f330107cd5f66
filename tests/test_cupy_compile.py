"""Every CUDA kernel instantiation of the CuPy layer compiles with NVRTC, without a GPU.

The list comes from :func:`unisparse_ref._loader.all_instantiations` (pooling, scores,
selection, and the attention launcher's kernels). Instantiations sharing a file and options
are compiled in one NVRTC program per target, to CUBIN, with ``--ptxas-options=-v``; the
ptxas log gives registers, static shared memory and spills of every entry function, which the
tests check and print (``pytest -s`` shows the table). No driver or GPU is needed: only
``cuda-bindings`` (``from cuda.bindings import nvrtc``), the pip ``nvidia-cuda-nvrtc``
library, and the CUDA headers from the pip ``nvidia-cuda-runtime`` (``cuda_fp16.h``,
``cuda_bf16.h``) and ``nvidia-cuda-cccl`` (``nv/target``) wheels.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
from collections import defaultdict

import pytest

from unisparse_ref import _loader

#: Targets every kernel must build for (an instantiation whose options name its own
#: architecture, such as the sm_90a wgmma kernels, builds for that one only).
ARCHS = ("sm_80", "sm_90")
#: Registers per thread above which a kernel cannot launch at all.
MAX_REGISTERS = 255
#: Static shared memory a kernel may declare (dynamic shared memory comes on top).
MAX_STATIC_SHARED = 48 * 1024


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - dev extra missing
        pytest.skip(f"cuda-bindings is not installed ({e}); pip install cuda-bindings nvidia-cuda-nvrtc")
    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - libnvrtc missing
        pytest.skip(f"NVRTC cannot be loaded ({e}); pip install nvidia-cuda-nvrtc")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"NVRTC is not usable: {err}")
    return nvrtc


def _include_options() -> list[str]:
    dirs = _loader.cuda_include_dirs()
    from pathlib import Path

    if not any((Path(d) / "cuda_fp16.h").is_file() for d in dirs):
        pytest.skip("cuda_fp16.h not found: pip install nvidia-cuda-runtime nvidia-cuda-cccl")
    if not any((Path(d) / "nv" / "target").is_file() for d in dirs):
        pytest.skip("nv/target not found: pip install nvidia-cuda-cccl")
    return [f"-I{d}" for d in dirs]


def _own_arch(options: tuple[str, ...]) -> str | None:
    for o in options:
        m = re.match(r"^(?:-arch|--gpu-architecture)[= ](\S+)$", o)
        if m:
            return m.group(1).replace("compute_", "sm_")
    return None


def _groups() -> dict[tuple[str, tuple[str, ...], str], list[str]]:
    groups: dict[tuple[str, tuple[str, ...], str], list[str]] = defaultdict(list)
    for spec in _loader.all_instantiations():
        own = _own_arch(spec.options)
        extra = tuple(o for o in spec.options if _own_arch((o,)) is None)
        for arch in (own,) if own else ARCHS:
            groups[(spec.file, extra, arch)].append(spec.name_expression)
    return groups


GROUPS = _groups()


def _check(nvrtc, result, what: str) -> None:
    err = result[0] if isinstance(result, tuple) else result
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{what}: {err}"


def _parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per mangled entry name: registers, static shared memory (bytes), spill stores/loads."""
    info: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            info.setdefault(current, {"registers": -1, "smem": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[current]["spill_stores"] = int(m.group(1))
            info[current]["spill_loads"] = int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            info[current]["smem"] = int(s.group(1)) if s else 0
    return info


def test_instantiation_list_is_complete() -> None:
    """The loader lists this layer's kernels and the attention launcher's."""
    specs = _loader.all_instantiations()
    files = {s.file for s in specs}
    assert {"pooling.cu", "scores.cu", "selection.cu"} <= files
    for s in specs:
        assert s.file in _loader.source_files(), f"{s.file} is not shipped in raw_kernels/"
        assert isinstance(s.options, tuple)
    for t in _loader.CTYPES.values():
        assert any(s.name_expression == f"us_pool_seq<{t}>" for s in specs)
    assert len({(s.file, s.name_expression, s.options) for s in specs}) == len(specs), "duplicate instantiations"


def test_sources_start_with_a_version_table() -> None:
    """House rule: every .cu opens with what it computes and a version table of its kernels."""
    for name in _loader.source_files():
        if not name.endswith(".cu"):
            continue
        text = _loader.read_source(name)
        assert text.lstrip().startswith("//"), f"{name} must open with a comment"
        assert "version" in text[:6000].lower(), f"{name} must have a version table near the top"


_POOL: dict[tuple[str, tuple[str, ...], str], concurrent.futures.Future] = {}


def _compile(group: tuple[str, tuple[str, ...], str]) -> tuple[bool, str, int, dict[str, str]]:
    """The compile result of ``group``; the first call starts every group on a thread pool.

    NVRTC holds the GIL, so the groups build in forked worker processes, one per core.
    """
    _nvrtc()
    includes = _include_options()
    if not _POOL:
        ctx = multiprocessing.get_context("fork")  # no CUDA context exists here: fork is safe
        ex = concurrent.futures.ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1), mp_context=ctx)
        # Largest sources first, so the long attention builds do not finish last.
        for g in sorted(GROUPS, key=lambda g: -len(_loader.read_source(g[0]))):
            _POOL[g] = ex.submit(_compile_now, includes, g)
        ex.shutdown(wait=False)
    return _POOL[group].result()


def _compile_now(includes: list[str], group: tuple[str, tuple[str, ...], str]) -> tuple[bool, str, int, dict[str, str]]:
    """Compile one group to CUBIN: (success, log, cubin size, name expression -> lowered name)."""
    from cuda.bindings import nvrtc

    file, extra, arch = group
    names = GROUPS[group]
    err, prog = nvrtc.nvrtcCreateProgram(_loader.read_source(file).encode(), file.encode(), 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        for n in names:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, n.encode()), f"add {n}")
        opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", *includes, *_loader.BASE_OPTIONS, *extra]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace")
        ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        cubin_size, lowered = 0, {}
        if ok:
            _, cubin_size = nvrtc.nvrtcGetCUBINSize(prog)
            for n in names:
                e, low = nvrtc.nvrtcGetLoweredName(prog, n.encode())
                _check(nvrtc, e, f"lowered name of {n}")
                lowered[n] = low.decode()
        return ok, log, cubin_size, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize(
    "group", sorted(GROUPS), ids=[f"{f}-{a}{'-' + '-'.join(o) if o else ''}" for f, o, a in sorted(GROUPS)]
)
def test_nvrtc_compiles(group: tuple[str, tuple[str, ...], str]) -> None:
    """Each group builds to CUBIN; every instantiation fits registers and static shared memory."""
    file, extra, arch = group
    ok, log, cubin_size, lowered = _compile(group)
    assert ok, f"{file} for {arch} failed:\n{log[-4000:]}"
    assert cubin_size > 0, f"{file}: NVRTC produced no CUBIN for {arch}"
    info = _parse_ptxas(log)
    print(f"\n{file} [{arch}{' ' + ' '.join(extra) if extra else ''}]")
    for n in GROUPS[group]:
        assert lowered[n] in info, f"ptxas reported nothing for {n} ({lowered[n]}); log:\n{log[-2000:]}"
        r = info[lowered[n]]
        assert 0 < r["registers"] <= MAX_REGISTERS, f"{n}: {r['registers']} registers"
        assert r["smem"] <= MAX_STATIC_SHARED, f"{n}: {r['smem']} bytes of static shared memory"
        print(f"  {n:72s} regs {r['registers']:3d}  smem {r['smem']:6d} B  "
              f"spill st/ld {r['spill_stores']}/{r['spill_loads']} B")


@pytest.mark.parametrize("file", ["pooling.cu", "scores.cu", "selection.cu"])
def test_layer_kernels_do_not_spill_on_sm90(file: str) -> None:
    """Pooling, scores and selection fit in registers on Hopper (no local-memory spills)."""
    ok, log, _, lowered = _compile((file, (), "sm_90"))
    assert ok
    info = _parse_ptxas(log)
    for n, low in lowered.items():
        r = info[low]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{file}: {n} spills {r}"
