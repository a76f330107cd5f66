"""The wheel ships the CUDA sources, and the loader finds them in an installed copy.

Builds the wheel from a copy of the project (the checkout is left untouched), installs it
with ``--no-deps --no-index`` into a fresh virtual environment that sees this environment's
NumPy and ml_dtypes through a ``.pth`` line, and, from a directory outside the checkout,
asks the loader for every kernel source: they must come from the installed package
``unisparse_ref.raw_kernels`` (``importlib.resources``), not from a source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from unisparse_ref.cupy_backend import _loader

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE")
PROJECT_DIRS = ("unisparse_ref", "raw_kernels")
NETWORK_HINTS = ("No matching distribution", "Could not find a version", "connection", "Network is unreachable")


def _copy_project(dst: Path) -> None:
    for f in PROJECT_FILES:
        if (REPO / f).is_file():
            shutil.copy2(REPO / f, dst / f)
    for d in PROJECT_DIRS:
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _build_wheel(src: Path, out: Path) -> Path:
    """``python -m build --wheel``; without a network, ``--no-isolation`` with this env's tools."""
    attempts = [
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
         "--outdir", str(out), str(src)],
    ]
    logs = []
    for cmd in attempts:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wheels = sorted(out.glob("unisparse_ref-*.whl"))
        if r.returncode == 0 and wheels:
            return wheels[-1]
        logs.append(f"$ {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    text = "\n".join(logs)
    if any(h.lower() in text.lower() for h in NETWORK_HINTS):
        pytest.skip(f"the wheel cannot be built here (no build backend and no network):\n{text[-1500:]}")
    raise AssertionError(f"building the wheel failed:\n{text}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    _copy_project(src)
    return _build_wheel(src, root / "dist")


def test_wheel_contains_the_kernel_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in _loader.source_files():
        assert f"unisparse_ref/raw_kernels/{f}" in names, f"{f} is missing from {wheel.name}"
    for module in ("__init__", "_loader", "_device", "pooling", "scores", "selection", "attention"):
        assert f"unisparse_ref/cupy_backend/{module}.py" in names, f"cupy_backend/{module}.py is missing"


def test_installed_loader_reads_the_packaged_sources(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300,
    )
    # NumPy and ml_dtypes of this environment, seen through a .pth line (no download).
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = {str(Path(np.__file__).parent.parent), str(Path(ml_dtypes.__file__).parent.parent)}
    (Path(purelib) / "_unisparse_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    probe = textwrap.dedent(
        """
        import importlib.resources, json
        import unisparse_ref
        from unisparse_ref.cupy_backend import _loader
        files = _loader.source_files()
        pkg = importlib.resources.files("unisparse_ref.raw_kernels")
        try:
            from unisparse_ref.cupy_backend import make_backend  # imports without CuPy
            make_backend()
            backend = "available"
        except Exception as e:
            backend = type(e).__name__
        print(json.dumps({
            "package": unisparse_ref.__file__,
            "files": files,
            "in_package": {f: pkg.joinpath(f).is_file() for f in files},
            "sources": {f: _loader.read_source(f) for f in files if f.endswith(".cu")},
            "backend": backend,
        }))
        """
    )
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=run_env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["package"]).resolve().is_relative_to(env.resolve()), f"imported {got['package']}, not the wheel"
    expected = _loader.source_files()
    assert got["files"] == expected
    assert all(got["in_package"].values()), got["in_package"]
    for f, text in got["sources"].items():
        assert text == _loader.read_source(f), f"{f} differs between the wheel and the checkout"
        assert not re.search(r'^\s*#\s*include\s+"common.cuh"', text, re.M)  # inlined by the loader
    assert got["backend"] in ("available", "BackendUnavailable")
