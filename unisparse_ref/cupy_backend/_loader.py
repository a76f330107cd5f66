"""The one small loader of the CuPy layer: CUDA sources, compiled modules, launches.

This module imports WITHOUT CuPy (CuPy is imported inside the functions that need it), so
the no-GPU compile test and the docs can use it. It knows nothing of the stages: each stage
module (:mod:`~unisparse_ref.cupy_backend.pooling`, ``scores``, ``selection``, ``attention``)
names its own instantiations with their NVRTC options, and
:func:`unisparse_ref.cupy_backend.all_instantiations` gathers those lists.

API
---
``KernelSpec(file, name_expression, options=())``
    A ``NamedTuple`` naming one template instantiation: ``file`` is a ``.cu`` in
    ``raw_kernels/`` (e.g. ``"attention.cu"``), ``name_expression`` the C++ name NVRTC
    instantiates (e.g. ``"us_attn_fwd_v1<__half, 64>"``), ``options`` extra NVRTC options
    such as ``("-DUS_POOL_THREADS=256",)`` (the loader always adds :data:`BASE_OPTIONS`).
    A stage builds the spec it launches with the same function that builds its list, so the
    compile test compiles exactly what the backend launches.
``read_source(file) -> str``
    The CUDA source, read with :mod:`importlib.resources` from the package
    ``unisparse_ref.raw_kernels`` (a source checkout falls back to ``<repo>/raw_kernels``),
    with every local ``#include "name.cuh"`` inlined (so NVRTC needs no include path for
    our own headers; ``cuda_fp16.h`` / ``cuda_bf16.h`` come from CuPy / NVRTC).
``get_module(file, name_expressions, options=()) -> cupy.RawModule``
    Compiled once per ``(device id, file, options, name_expressions)`` and cached.
``get_function(spec) -> cupy.RawKernel``
    ``get_module(spec.file, (spec.name_expression,), spec.options)``'s kernel.
``launch(kernel, grid, block, args, shared_mem=0) -> None``
    Checks ``block`` (<= 1024 threads), ``grid`` (y, z <= 65535) and the dynamic shared
    memory against the device limit; above 48 KiB it opts in by setting
    ``kernel.max_dynamic_shared_size_bytes``. Raises :class:`LaunchConfigError` (a
    ``ValueError``) with the numbers when a launch cannot fit.
``CTYPES``
    ``{"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}``: the C++
    element type of each supported input dtype name (bf16 travels as a ``uint16`` CuPy
    array; kernels read it as ``__nv_bfloat16``).
``raw_kernels/common.cuh``
    Shared device helpers (``us::to_float``, ``us::from_float``, ``us::pack2``, ...);
    ``#include "common.cuh"`` in every ``.cu`` file.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
import threading
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "BASE_OPTIONS",
    "CTYPES",
    "KernelSpec",
    "LaunchConfigError",
    "cuda_include_dirs",
    "get_function",
    "get_module",
    "launch",
    "max_dynamic_shared_memory",
    "read_source",
    "source_files",
]

#: Options added to every compilation.
BASE_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: Input dtype name -> C++ element type of the kernels' templates.
CTYPES: dict[str, str] = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}

#: Dynamic shared memory a kernel may use without opting in (bytes).
DEFAULT_SHARED_LIMIT = 48 * 1024

_PACKAGE = "unisparse_ref.raw_kernels"
# A local include, optionally followed by a // comment (which goes with the inlined text).
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([A-Za-z0-9_./-]+\.cuh)"[ \t]*(?://[^\n]*)?$', re.MULTILINE)


class KernelSpec(NamedTuple):
    """One kernel instantiation: ``.cu`` file, C++ name expression, extra NVRTC options."""

    file: str
    name_expression: str
    options: tuple[str, ...] = ()


class LaunchConfigError(ValueError):
    """A launch configuration (block, grid or shared memory) the device cannot run."""


# ---------------------------------------------------------------------------- sources
def _source_dir_fallback() -> Path:
    return Path(__file__).resolve().parents[2] / "raw_kernels"  # <repo>/unisparse_ref/cupy_backend/_loader.py


def _read_raw(name: str) -> str:
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"kernel source name must be a plain file name, got {name!r}")
    try:
        res = importlib.resources.files(_PACKAGE).joinpath(name)
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    path = _source_dir_fallback() / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"CUDA source {name!r} not found in package {_PACKAGE} nor in {_source_dir_fallback()}"
    )


def read_source(file: str) -> str:
    """The text of ``raw_kernels/<file>`` with local ``#include "*.cuh"`` lines inlined.

    Parameters
    ----------
    file : str
        A plain file name such as ``"pooling.cu"``.

    Returns
    -------
    str
        Self-contained CUDA C++ source (each header inlined once).

    Raises
    ------
    FileNotFoundError
        When the file is neither in the installed package nor in the source checkout.
    """
    seen: set[str] = set()

    def expand(text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(_read_raw(inc))}\n// ---- end {inc}"

        return _INCLUDE.sub(repl, text)

    return expand(_read_raw(file))


def source_files() -> list[str]:
    """Names of the ``.cu`` and ``.cuh`` files shipped in ``unisparse_ref.raw_kernels``."""
    names: set[str] = set()
    try:
        for entry in importlib.resources.files(_PACKAGE).iterdir():
            names.add(entry.name)
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    if not any(n.endswith(".cu") for n in names) and _source_dir_fallback().is_dir():
        names.update(p.name for p in _source_dir_fallback().iterdir())
    return sorted(n for n in names if n.endswith((".cu", ".cuh")))


def cuda_include_dirs() -> list[str]:
    """Include directories of the pip CUDA header wheels, if installed.

    ``nvidia-cuda-runtime`` provides ``cuda_fp16.h`` and ``cuda_bf16.h``; ``nvidia-cuda-cccl``
    provides ``nv/target`` that they include. Returns the existing ``.../nvidia/<x>/include``
    directories holding either (CUDA 13 wheels share ``nvidia/cu13/include``).
    """
    found: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        for sub in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
            for inc in (sub / "include", sub / "include" / "cccl"):
                if (inc / "cuda_fp16.h").is_file() or (inc / "nv" / "target").is_file():
                    if str(inc) not in found:
                        found.append(str(inc))
    return found


# ---------------------------------------------------------------------------- compilation
_MODULES: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def get_module(file: str, name_expressions: tuple[str, ...] | list[str], options: tuple[str, ...] = ()) -> Any:
    """The compiled ``cupy.RawModule`` of ``file`` for the current device (cached).

    Parameters
    ----------
    file : str
        ``.cu`` file name in ``raw_kernels/``.
    name_expressions : sequence of str
        Template instantiations to compile, e.g. ``("us_pool_seq<__half>",)``.
    options : tuple of str
        Extra NVRTC options (``-D`` tile overrides); :data:`BASE_OPTIONS` are always added.
    """
    import cupy

    dev = cupy.cuda.Device().id
    names = tuple(name_expressions)
    opts = BASE_OPTIONS + tuple(options)
    key = (dev, file, opts, names)
    mod = _MODULES.get(key)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                code = read_source(file)
                try:
                    mod = cupy.RawModule(code=code, options=opts, name_expressions=names)
                    mod.compile()
                except cupy.cuda.compiler.CompileException as e:
                    extra = tuple(f"-I{d}" for d in cuda_include_dirs())
                    if "could not open source file" not in str(e) or not extra:
                        raise
                    # CuPy did not find cuda_fp16.h / cuda_bf16.h: use the pip CUDA headers.
                    mod = cupy.RawModule(code=code, options=opts + extra, name_expressions=names)
                    mod.compile()
                _MODULES[key] = mod
    return mod


def get_function(spec: KernelSpec) -> Any:
    """The ``cupy.RawKernel`` of one instantiation (its module compiled and cached on first use)."""
    return get_module(spec.file, (spec.name_expression,), spec.options).get_function(spec.name_expression)


# ---------------------------------------------------------------------------- launching
_SHARED_OPTIN: dict[int, int] = {}


def max_dynamic_shared_memory(device_id: int | None = None) -> int:
    """The most dynamic shared memory (bytes) one block may opt in to on the device."""
    import cupy

    dev = cupy.cuda.Device(device_id) if device_id is not None else cupy.cuda.Device()
    if dev.id not in _SHARED_OPTIN:
        attrs = dev.attributes
        _SHARED_OPTIN[dev.id] = int(attrs.get("MaxSharedMemoryPerBlockOptin", DEFAULT_SHARED_LIMIT))
    return _SHARED_OPTIN[dev.id]


def _dims(name: str, value: Any) -> tuple[int, int, int]:
    t = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(t) <= 3 or any(not isinstance(x, int) or x < 1 for x in t):
        raise LaunchConfigError(f"{name} must be 1 to 3 positive ints, got {value!r}")
    return (t + (1, 1))[:3]  # type: ignore[return-value]


def launch(kernel: Any, grid: Any, block: Any, args: tuple[Any, ...], shared_mem: int = 0) -> None:
    """Launch ``kernel`` after checking that the configuration fits the device.

    Parameters
    ----------
    kernel : cupy.RawKernel
    grid, block : int or tuple of int
        Launch dimensions.
    args : tuple
        Kernel arguments (CuPy arrays and NumPy scalars of the exact C types).
    shared_mem : int
        Dynamic shared memory in bytes. Above 48 KiB the kernel opts in through
        ``max_dynamic_shared_size_bytes``.

    Raises
    ------
    LaunchConfigError
        Too many threads per block, a grid dimension out of range, or more shared memory
        than the device's opt-in limit (the message gives both numbers).
    """
    gx, gy, gz = _dims("grid", grid)
    bx, by, bz = _dims("block", block)
    if bx * by * bz > 1024:
        raise LaunchConfigError(f"block {block} has {bx * by * bz} threads; at most 1024 per block")
    if gx > 2**31 - 1 or gy > 65535 or gz > 65535:
        raise LaunchConfigError(f"grid {grid} out of range (x < 2^31, y and z <= 65535)")
    shared_mem = int(shared_mem)
    if shared_mem < 0:
        raise LaunchConfigError(f"shared_mem must be >= 0, got {shared_mem}")
    # The 48 KiB default covers static plus dynamic shared memory: past it the kernel must opt
    # in, even when the dynamic part alone is small (a kernel with a static tile, say).
    static = int(getattr(kernel, "shared_size_bytes", 0) or 0)
    if shared_mem + static > DEFAULT_SHARED_LIMIT:
        limit = max_dynamic_shared_memory()
        if shared_mem + static > limit:
            raise LaunchConfigError(
                f"kernel {getattr(kernel, 'name', kernel)!r} needs {shared_mem} bytes of dynamic plus {static} "
                f"bytes of static shared memory; the device allows at most {limit} per block (choose smaller tiles)"
            )
        if getattr(kernel, "max_dynamic_shared_size_bytes", 0) < shared_mem:
            kernel.max_dynamic_shared_size_bytes = shared_mem
    kernel((gx, gy, gz), (bx, by, bz), tuple(args), shared_mem=shared_mem)
