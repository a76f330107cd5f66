"""The shared test suite's fixtures: one test body, every backend.

``backend`` is parametrised over every registered backend name. A backend that cannot run
here is skipped *with the reason* (never passed silently). The same suite runs:

* plainly (``pytest``): numpy, plus numba/cupy if a GPU is present;
* in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1 pytest -m "not gpu"``): the numba
  backend runs on the CPU, with sizes shrunk by :data:`SIM` (the simulator runs every
  thread in Python);
* on a GPU machine (``scripts/gpu_test.sh``), full sizes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import unisparse_ref as us
from unisparse_ref.oracle.testing import assert_attention_close

#: True when Numba's CUDA simulator is on: tests shrink their sizes.
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

#: Backends tested; ``UNISPARSE_TEST_BACKENDS=numba,cupy`` narrows the list.
BACKENDS = [b for b in os.environ.get("UNISPARSE_TEST_BACKENDS", "numpy,numba,cupy").split(",") if b]

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "sim", max_examples=4, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "gpu", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# CI (CI=true) draws the same examples every run (derandomize: a fixed seed per test), so a
# red CI is reproducible and a green one is not luck; HYPOTHESIS_PROFILE overrides.
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "sim-ci", max_examples=4, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_PROFILE = ("sim-ci" if SIM else "ci") if _CI else ("sim" if SIM else "default")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _PROFILE))


def cupy_backend_or_reason() -> tuple[object | None, str]:
    """The CuPy backend for a module of GPU tests, or ``None`` and why it cannot run here
    (CuPy missing, no usable GPU, ...): the reason the module's ``skipif`` reports."""
    try:
        from unisparse_ref.cupy_backend import make_backend

        return make_backend(), ""
    except (ImportError, us.BackendUnavailable) as e:
        return None, str(e)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """A backend object; skipped, with the reason, where it cannot run."""
    name = request.param
    status = us.backend_status().get(name, f"backend {name!r} is not registered")
    if status is not None:
        pytest.skip(f"backend {name!r} unavailable: {status}")
    return us.get_backend(name)


def random_qkv(
    rng: np.random.Generator, B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, dtype=np.float32,
    scale: float = 1.0,
):
    """Random Gaussian q, k, v in ``dtype`` (never zeros)."""
    q = (scale * rng.standard_normal((B, Hq, Nq, D))).astype(dtype)
    k = (scale * rng.standard_normal((B, Hkv, Nk, D))).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    return q, k, v


def assert_attention_matches_reference(out, lse, q, k, v, block_mask, config) -> None:
    """SPEC section 7 for ``out`` (of whatever dtype the backend returned) and ``lse``.

    The rule itself is :mod:`unisparse_ref.tolerance` (through the oracle's
    :func:`~unisparse_ref.oracle.testing.assert_attention_close`); nothing is restated here.
    """
    assert_attention_close(out, q, k, v, block_mask, config, lse=lse, diagnose=False)
