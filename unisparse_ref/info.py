"""``unisparse-ref info``: versions, available backends and the GPU, if any."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata

from . import __version__
from .backends import backend_status

_PACKAGES = ["numpy", "ml_dtypes", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "cuda-bindings",
             "nvidia-cuda-nvrtc"]


def _gpu() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none found (no nvidia-smi)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
        return out or "none found"
    except (subprocess.SubprocessError, OSError) as e:
        return f"nvidia-smi failed: {e}"


def main(argv: list[str] | None = None) -> int:
    """Print the environment report."""
    print(f"unisparse-ref {__version__}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    for name in _PACKAGES:
        try:
            print(f"{name:<12} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    print("backends:")
    for name, why in backend_status().items():
        print(f"  {name:<6} {'available' if why is None else 'unavailable: ' + why}")
    print(f"gpu:         {_gpu()}")
    return 0
