"""Compile kernels of ``raw_kernels/`` to CUBIN with NVRTC, without a GPU or a driver.

:func:`compile_offline` is what ``tests/test_cupy_compile.py`` runs for every entry of
:func:`unisparse_ref.cupy_backend.all_instantiations` and what tutorial 04 shows. It needs
``cuda-bindings`` (``from cuda.bindings import nvrtc``), the pip ``nvidia-cuda-nvrtc`` library
and the CUDA headers of the pip ``nvidia-cuda-runtime`` (``cuda_fp16.h``, ``cuda_bf16.h``) and
``nvidia-cuda-cccl`` (``nv/target``) wheels; with ``--ptxas-options=-v`` the compile log gives
registers, static shared memory and spills of every kernel, parsed into
:attr:`CompileResult.resources`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from ._loader import BASE_OPTIONS, cuda_include_dirs, read_source

__all__ = ["CompileResult", "NvrtcUnavailable", "check_available", "compile_offline", "own_arch", "parse_ptxas"]


class NvrtcUnavailable(RuntimeError):
    """NVRTC or the CUDA headers cannot be used here; the message says what to install."""


class CompileResult(NamedTuple):
    """One NVRTC compilation of a ``.cu`` file for one architecture (fields below)."""

    #: Whether NVRTC succeeded.
    ok: bool
    #: NVRTC's log (with ptxas' ``-v`` report).
    log: str
    #: Bytes of CUBIN (0 on failure).
    cubin_size: int
    #: Name expression -> mangled kernel name.
    lowered: dict[str, str]
    #: Name expression -> ``{"registers", "smem", "spill_stores", "spill_loads"}`` (bytes except
    #: registers), from the ptxas report.
    resources: dict[str, dict[str, int]]


def own_arch(options: Sequence[str]) -> str | None:
    """The architecture an instantiation's options name (``-arch=sm_90a`` -> ``sm_90a``), if any."""
    for o in options:
        m = re.match(r"^(?:-arch|--gpu-architecture)[= ](\S+)$", o)
        if m:
            return m.group(1).replace("compute_", "sm_")
    return None


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
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


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise NvrtcUnavailable(f"cuda-bindings is not installed ({e}); pip install cuda-bindings nvidia-cuda-nvrtc") from e
    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - libnvrtc missing
        raise NvrtcUnavailable(f"NVRTC cannot be loaded ({e}); pip install nvidia-cuda-nvrtc") from e
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcUnavailable(f"NVRTC is not usable: {err}")
    return nvrtc


def include_options() -> list[str]:
    """``-I`` options for the pip CUDA headers; :class:`NvrtcUnavailable` when they are missing."""
    dirs = cuda_include_dirs()
    if not any((Path(d) / "cuda_fp16.h").is_file() for d in dirs):
        raise NvrtcUnavailable("cuda_fp16.h not found: pip install nvidia-cuda-runtime nvidia-cuda-cccl")
    if not any((Path(d) / "nv" / "target").is_file() for d in dirs):
        raise NvrtcUnavailable("nv/target not found: pip install nvidia-cuda-cccl")
    return [f"-I{d}" for d in dirs]


def check_available() -> None:
    """Raise :class:`NvrtcUnavailable` unless NVRTC and the CUDA header wheels can be used here."""
    _nvrtc()
    include_options()


def compile_offline(file: str, name_expressions: Sequence[str], options: Sequence[str] = (),
                    arch: str = "sm_90") -> CompileResult:
    """Compile the instantiations ``name_expressions`` of ``raw_kernels/<file>`` to CUBIN.

    Parameters
    ----------
    file : str
        A ``.cu`` file name, read with :func:`~unisparse_ref.cupy_backend.read_source`.
    name_expressions : sequence of str
        Template instantiations, e.g. ``["us_scores_onepass"]``.
    options : sequence of str
        The instantiations' NVRTC options (a :class:`~unisparse_ref.cupy_backend.KernelSpec`'s
        ``options``); an ``-arch=`` among them overrides ``arch``. The loader's base options
        (``--std=c++17``) are always added, as when the backend compiles.
    arch : str
        Target, e.g. ``"sm_80"``, ``"sm_90"`` or ``"sm_90a"``.

    Raises
    ------
    NvrtcUnavailable
        NVRTC or the CUDA header wheels are missing.
    """
    nvrtc = _nvrtc()
    includes = include_options()
    arch = own_arch(options) or arch
    extra = [o for o in options if own_arch((o,)) is None]
    err, prog = nvrtc.nvrtcCreateProgram(read_source(file).encode(), file.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcCreateProgram: {err}")
    try:
        for n in name_expressions:
            (e,) = nvrtc.nvrtcAddNameExpression(prog, n.encode())
            if e != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise RuntimeError(f"nvrtcAddNameExpression({n}): {e}")
        opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", *includes, *BASE_OPTIONS, *extra]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace")
        ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        cubin_size, lowered = 0, {}
        if ok:
            _, cubin_size = nvrtc.nvrtcGetCUBINSize(prog)
            for n in name_expressions:
                e, low = nvrtc.nvrtcGetLoweredName(prog, n.encode())
                if e != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                    raise RuntimeError(f"lowered name of {n}: {e}")
                lowered[n] = low.decode()
        info = parse_ptxas(log)
        resources = {n: info[low] for n, low in lowered.items() if low in info}
        return CompileResult(ok, log, int(cubin_size), lowered, resources)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
