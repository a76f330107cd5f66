"""``unisparse-ref verify MODULE:FUNCTION --stage compress|scores|selection|attention|pipeline``.

Runs the oracle battery of :mod:`unisparse_ref.oracle.testing` against your function and
prints a pass/fail table. Exit code 0 only when every case passes. What is checked is the
specification, ``docs/spec.md`` (SPEC sections 3 to 6 for the stages, section 7 for the
tolerances).

Signatures expected for each stage:

* ``compress`` (SPEC 3): ``fn(q, k, config) -> (q_c, k_c)``;
* ``scores`` (SPEC 4): ``fn(q_c, k_c, config, nq, nk) -> scores`` ``[B, Hq/c_h, nQb, nKb]``;
* ``selection`` (SPEC 5): ``fn(scores, config, nq, nk) -> BlockMask`` (or a bool
  ``[B, Hm, nQb, nKb]`` array);
* ``attention`` (SPEC 6): ``fn(q, k, v, block_mask, config) -> (out, lse)`` (or ``out``);
* ``pipeline``: ``fn(q, k, v, config) -> out``, ``(out, lse)``, ``(out, lse, block_mask)`` or an
  object with ``out``, ``lse`` and ``block_mask`` attributes.

``lse`` may be float32 or float64 (natural log; ``-inf`` on rows with no allowed key).

``MODULE`` is imported with the current directory on ``sys.path``; ``FUNCTION`` may be a
dotted attribute path (``mypkg.kernels:Backend.attention``). The target ``numpy``,
``numba`` or ``cupy`` (no colon) checks one of this package's backends.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .._arrays import SUPPORTED_DTYPES, dtype_name
from . import testing

__all__ = ["STAGES", "main", "resolve_target"]

_DTYPES = {dtype_name(d): d for d in SUPPORTED_DTYPES}

#: The stages and the signature each expects.
STAGES = {
    "compress": "fn(q,k,config)->(q_c,k_c) (SPEC 3)",
    "scores": "fn(q_c,k_c,config,nq,nk)->scores (SPEC 4)",
    "selection": "fn(scores,config,nq,nk)->BlockMask (SPEC 5)",
    "attention": "fn(q,k,v,block_mask,config)->(out,lse) (SPEC 6)",
    "pipeline": "fn(q,k,v,config)->out, (out,lse) or (out,lse,block_mask)",
}


def resolve_target(target: str, stage: str) -> Callable[..., Any]:
    """The function named by ``MODULE:FUNCTION`` (or the right method of a backend name).

    Raises
    ------
    ValueError
        When the target cannot be imported or found (the message says which part failed).
    """
    if ":" not in target:
        from ..api import unisparse_attention
        from ..backends import BackendUnavailable, get_backend

        try:
            be = get_backend(target)
        except (ValueError, BackendUnavailable) as e:
            raise ValueError(f"target {target!r} is neither MODULE:FUNCTION nor an available backend: {e}") from e
        if stage == "compress":
            return be.compress
        if stage == "scores":
            return be.block_scores
        if stage == "attention":
            return be.block_sparse_attention
        if stage == "selection":
            return be.select_blocks
        return lambda q, k, v, config: unisparse_attention(q, k, v, config, backend=be, return_details=True)
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (missing {part!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target} is not callable")
    return obj


def _to_device(name: str) -> Callable[[np.ndarray], Any] | None:
    if name == "numpy":
        return None
    if name == "cupy":
        import cupy

        return cupy.asarray
    raise ValueError(f"--arrays must be numpy or cupy, got {name!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``unisparse-ref verify``; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="unisparse-ref verify",
        description="Check your implementation of a UniSparse stage against the float64 reference on a "
                    "battery of edge cases. The definition checked is docs/spec.md (the specification: "
                    "sections 3-6 for the stages, section 7 for the tolerances).",
    )
    p.add_argument("target", help="MODULE:FUNCTION to check, or a backend name (numpy, numba, cupy)")
    p.add_argument("--stage", choices=list(STAGES), required=True,
                   help="; ".join(f"{k}: {v}" for k, v in STAGES.items()))
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                   help="input dtype for compress/attention/pipeline, composite-token dtype for scores, score "
                        "dtype for selection (default float32, float64 for selection unless given)")
    p.add_argument("--quick", action="store_true", help="a smaller battery")
    p.add_argument("--arrays", default="numpy", choices=["numpy", "cupy"],
                   help="array type handed to your function (default numpy)")
    p.add_argument("--score-eps", type=float, default=None,
                   help="scores/pipeline: your score tolerance eps (default 1e-6, or 1e-2 for float16/bfloat16)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every line of every message")
    argv = list(sys.argv[1:] if argv is None else argv)
    dtype_given = any(a == "--dtype" or a.startswith("--dtype=") for a in argv)
    args = p.parse_args(argv)
    try:
        fn = resolve_target(args.target, args.stage)
        dev = _to_device(args.arrays)
    except (ValueError, ImportError) as e:
        print(f"unisparse-ref verify: {e}", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]
    if args.stage == "compress":
        report = testing.check_compress(fn, dtype=dtype, quick=args.quick, to_device=dev)
    elif args.stage == "scores":
        report = testing.check_scores(fn, dtype=dtype, quick=args.quick, to_device=dev, score_eps=args.score_eps)
    elif args.stage == "attention":
        report = testing.check_block_sparse_attention(fn, dtype=dtype, quick=args.quick, to_device=dev)
    elif args.stage == "selection":
        sdt = dtype if dtype_given else np.dtype(np.float64)
        report = testing.check_selection(fn, quick=args.quick, to_device=dev, score_dtype=sdt)
    else:
        report = testing.check_pipeline(fn, dtype=dtype, quick=args.quick, to_device=dev, score_eps=args.score_eps)
    print(f"unisparse-ref verify {args.target}")
    print(report.table(verbose=args.verbose))
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
