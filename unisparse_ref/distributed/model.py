"""The scaling model of context-parallel UniSparse on H200s (``docs/layers/distributed.md``).

Time per rank = compute, scaled from single-GPU kernel times measured in run 8 of
``docs/performance.md`` (H200, bf16, B=1, Hq=32, Hkv=8, D=128, S=128, c_q=c_k=16, causal),
divided over ``W`` ranks (the zigzag plan balances causal work within ``1 + 2W/nQb``), plus
communication at an assumed NVLink bandwidth. Nothing here is measured on several GPUs.

* estimator, scaled from 128K: pooling 0.745 ms (linear in N), scores 16.22 ms and selection
  4.227 ms (quadratic: composite pairs, ``nQb x nKb``);
* sparse attention: ``density * 4 D Hq N (N + 1) / 2`` FLOPs at 466 TFLOP/s (v9, 10%, 128K);
  dense at 571 TFLOP/s (v9, 128K);
* communication per rank, bytes received: composite keys ``(W-1)/W * (N/c_k) Hkv D e_c``
  (``e_c = 4``, float32 composite keys on a GPU), requests ``(W-1) Hkv nKb`` (one byte each),
  K/V ``f * (W-1)/W * 2 N Hkv D e_kv`` (``e_kv = 2``, bf16), with ``f`` the fraction of the
  non-owned K/V a rank's query blocks select (``f = 1``: every block, the volume of the
  all-gather-KV scheme; an upper bound);
* bandwidth: 450 GB/s per direction per GPU, i.e. the H200 SXM datasheet's NVLink 4 figure of
  900 GB/s bidirectional, through NVSwitch for any ``W`` (an assumption, not measured here;
  NCCL reaches less in practice, so the communication times are optimistic by that factor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "H200",
    "MEASURED_H200",
    "MeasuredPoint",
    "ScalingPoint",
    "measured_from_record",
    "one_device_split",
    "measured_model",
    "measured_table",
    "scaling_model",
    "scaling_table",
]

#: Run-8 figures (docs/performance.md) and the bandwidth assumption.
H200 = {
    "ref_tokens": 131072,
    "pool_ms": 0.745,
    "scores_ms": 16.22,
    "select_ms": 4.227,
    "sparse_tflops": 466.0,
    "dense_tflops": 571.0,
    "nvlink_gbs_per_direction": 450.0,
    "q_heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "block_size": 128,
    "c_k": 16,
    "composite_bytes": 4,
    "kv_bytes": 2,
}


@dataclass(frozen=True)
class ScalingPoint:
    """Modelled time of one rank (milliseconds) and bytes it receives.

    Attributes
    ----------
    tokens, world_size : int
    density : float
        Selected share of the causal work.
    estimator_ms, attention_ms, dense_ms : float
        Per rank: pooling + scores + selection; sparse attention; dense attention (for scale).
    comm_bytes : int
        Received per rank, with every non-owned K/V block fetched (``f = 1``).
    comm_ms : float
        ``comm_bytes`` at the assumed bandwidth.
    total_ms : float
        estimator + attention + communication, nothing overlapped.
    speedup : float
        Single-GPU total over this total.
    imbalance : float
        The zigzag bound on max work / mean work, ``1 + 2 W / nQb``.
    """

    tokens: int
    world_size: int
    density: float
    estimator_ms: float
    attention_ms: float
    dense_ms: float
    comm_bytes: int
    comm_ms: float
    total_ms: float
    speedup: float
    imbalance: float


def _single(n: int, density: float, h: dict) -> tuple[float, float, float]:
    x = n / h["ref_tokens"]
    est = h["pool_ms"] * x + (h["scores_ms"] + h["select_ms"]) * x * x
    flops = 4.0 * h["head_dim"] * h["q_heads"] * n * (n + 1) / 2
    attn = density * flops / (h["sparse_tflops"] * 1e12) * 1e3
    dense = flops / (h["dense_tflops"] * 1e12) * 1e3
    return est, attn, dense


def scaling_model(tokens: int, world_size: int, density: float = 0.1, fetch_fraction: float = 1.0,
                  hw: dict | None = None) -> ScalingPoint:
    """Model one rank of a ``world_size``-GPU run over ``tokens`` tokens (see the module docstring).

    Parameters
    ----------
    tokens : int
        ``N`` (``Nq = Nk``, causal).
    world_size : int
        ``W``.
    density : float
        Share of the causal work the selection keeps.
    fetch_fraction : float
        ``f``: share of the non-owned K/V a rank fetches (1: all, the upper bound).
    hw : dict, optional
        Overrides of :data:`H200`.

    Returns
    -------
    ScalingPoint
    """
    h = {**H200, **(hw or {})}
    W, n = int(world_size), int(tokens)
    est, attn, dense = _single(n, density, h)
    nkb = -(-n // h["block_size"])
    share = (W - 1) / W
    ck = share * (n / h["c_k"]) * h["kv_heads"] * h["head_dim"] * h["composite_bytes"]
    req = (W - 1) * h["kv_heads"] * nkb
    kv = fetch_fraction * share * 2 * n * h["kv_heads"] * h["head_dim"] * h["kv_bytes"]
    comm_bytes = int(ck + req + kv)
    comm_ms = comm_bytes / (h["nvlink_gbs_per_direction"] * 1e9) * 1e3
    total = est / W + attn / W + comm_ms
    return ScalingPoint(n, W, density, est / W, attn / W, dense / W, comm_bytes, comm_ms, total,
                        (est + attn) / total, 1 + 2 * W / (n / h["block_size"]))


def scaling_table(tokens: tuple[int, ...] = (1 << 20, 1 << 22), world_sizes: tuple[int, ...] = (1, 2, 4, 8),
                  density: float = 0.1) -> str:
    """The model as a Markdown table (what the docs page shows)."""
    head = ("| N | GPUs | estimator ms | sparse attention ms | dense ms (for scale) | received GB | "
            "comm ms | total ms | speedup | comm share | work bound |\n| " + " | ".join(["---"] * 11) + " |")
    rows = [head]
    for n in tokens:
        for W in world_sizes:
            p = scaling_model(n, W, density)
            rows.append(
                f"| {n // (1 << 20)}M | {W} | {p.estimator_ms:.1f} | {p.attention_ms:.1f} | {p.dense_ms:.1f} | "
                f"{p.comm_bytes / 1e9:.2f} | {p.comm_ms:.2f} | {p.total_ms:.1f} | {p.speedup:.2f}x | "
                f"{100 * p.comm_ms / p.total_ms:.1f} % | {p.imbalance:.4f} |"
            )
    return "\n".join(rows)


def as_dicts(points: list[ScalingPoint]) -> list[dict]:
    """Plain dictionaries of :class:`ScalingPoint` values."""
    return [asdict(p) for p in points]


# --------------------------------------------------------------------------------------------
# the model from measured per-rank GPU compute (backend="cupy")
# --------------------------------------------------------------------------------------------

#: Steps of :func:`~unisparse_ref.distributed.stages.stage_rank` whose work grows as ``N``
#: (pooling, the requests, packing and unpacking the K/V tiles) and as ``N^2`` (scoring and
#: selection of composite pairs and block pairs; the sparse attention at a fixed density).
LINEAR_STEPS = ("pool", "requests", "pack", "unpack")
QUADRATIC_STEPS = ("score_select", "attend")

#: Measured on one H200 by ``scripts/distributed_gpu.py time`` (``docs/gpu_results/distributed.md``):
#: the one-device CuPy pipeline and, per world size ``W``, the slowest simulated rank's seconds
#: per step and the most bytes a rank received, at ``tokens``. Empty until a run is recorded.
MEASURED_H200: dict = {
    "source": "batch M, 2026-12-01, commit 6b25620, docs/gpu_results/distributed_runs/M_6b25620_timing.json",
    "tokens": 524288,
    "one_device_s": 0.69051,
    "density": 0.0886,
    "ranks": {
        2: {"linear_s": 0.01673, "quadratic_s": 0.3325, "recv_bytes": 171737408,
            "steps": {"pool": 0.00198, "score_select": 0.15141, "requests": 0.00062, "pack": 0.00529, "unpack": 0.00884, "attend": 0.18109}},
        4: {"linear_s": 0.01112, "quadratic_s": 0.17068, "recv_bytes": 257000384,
            "steps": {"pool": 0.00131, "score_select": 0.07765, "requests": 0.00037, "pack": 0.00282, "unpack": 0.00663, "attend": 0.09302}},
        8: {"linear_s": 0.01691, "quadratic_s": 0.09235, "recv_bytes": 295667904,
            "steps": {"pool": 0.00067, "score_select": 0.03619, "requests": 0.00046, "pack": 0.00609, "unpack": 0.00969, "attend": 0.05615}},
    },
}


def measured_from_record(record: dict, tokens: int | None = None) -> dict:
    """The :data:`MEASURED_H200` form of a ``distributed_gpu.py time --json`` record.

    Parameters
    ----------
    record : dict
        The JSON record.
    tokens : int, optional
        Which measured size to use (default: the largest with runs).

    Returns
    -------
    dict
        ``{"tokens", "one_device_s", "density", "ranks": {W: {"linear_s", "quadratic_s",
        "recv_bytes", "steps"}}}``; per ``W`` the rank with the largest compute.
    """
    sizes = [e for e in record["sizes"] if e["runs"]]
    entry = max(sizes, key=lambda e: e["tokens"]) if tokens is None else next(e for e in sizes if e["tokens"] == tokens)
    ranks = {}
    for run in entry["runs"]:
        if run["check"] != "PASS":
            continue
        r = max(range(len(run["rank_compute_s"])), key=lambda i: run["rank_compute_s"][i])
        steps = run["rank_steps_s"][r]
        ranks[int(run["world_size"])] = {
            "linear_s": float(sum(steps.get(k, 0.0) for k in LINEAR_STEPS)),
            "quadratic_s": float(sum(steps.get(k, 0.0) for k in QUADRATIC_STEPS)),
            "recv_bytes": int(max(sum(x.values()) for x in run["rank_recv_bytes"])),
            "steps": {k: float(v) for k, v in steps.items()},
        }
    return {"tokens": int(entry["tokens"]), "one_device_s": float(entry["one_device_s"]),
            "density": float(entry["density"]), "ranks": ranks}


@dataclass(frozen=True)
class MeasuredPoint:
    """One rank of a ``W``-GPU run, scaled from the measured per-rank compute (milliseconds).

    Attributes
    ----------
    tokens, world_size : int
    compute_ms : float
        The slowest rank's compute: linear steps times ``N / N_m``, quadratic steps times
        ``(N / N_m)^2``.
    comm_bytes : int
        The most bytes a rank received at ``N_m``, times ``N / N_m``.
    comm_ms : float
        At the assumed NVLink bandwidth (not measured).
    total_ms : float
        compute + communication, nothing overlapped.
    one_device_ms : float
        The one-device pipeline at ``N_m``, scaled by :func:`one_device_split`.
    speedup, efficiency : float
        ``one_device_ms / total_ms`` and that over ``W``.
    """

    tokens: int
    world_size: int
    compute_ms: float
    comm_bytes: int
    comm_ms: float
    total_ms: float
    one_device_ms: float
    speedup: float
    efficiency: float


def one_device_split(measured: dict) -> tuple[float, float]:
    """The one-device pipeline's seconds at ``N_m`` split into a part linear and a part quadratic in ``N``.

    With a one-rank stage-path measurement (``W = 1``): its quadratic steps, at most the
    pipeline's time, are quadratic and the rest of the pipeline linear (the smallest one-device
    time at larger ``N`` the measurements allow, so the smallest speedup). Without: all of it
    quadratic (an upper bound of the one-device time, so of the speedup).
    """
    one = float(measured["one_device_s"])
    r1 = measured["ranks"].get(1)
    if r1 is None:
        return 0.0, one
    quad = min(one, float(r1["quadratic_s"]))
    return one - quad, quad


def measured_model(tokens: int, world_size: int, measured: dict | None = None, hw: dict | None = None) -> MeasuredPoint:
    """Scale the measured per-rank compute of ``world_size`` ranks to ``tokens`` (see :class:`MeasuredPoint`)."""
    m = measured or MEASURED_H200
    if not m:
        raise ValueError("no measured per-rank compute recorded (MEASURED_H200 is empty)")
    h = {**H200, **(hw or {})}
    W = int(world_size)
    if W not in m["ranks"]:
        raise ValueError(f"no measurement for {W} ranks; measured: {sorted(m['ranks'])}")
    x = tokens / m["tokens"]
    r = m["ranks"][W]
    compute = (r["linear_s"] * x + r["quadratic_s"] * x * x) * 1e3
    comm_bytes = int(r["recv_bytes"] * x)
    comm = comm_bytes / (h["nvlink_gbs_per_direction"] * 1e9) * 1e3
    lin1, quad1 = one_device_split(m)
    one = (lin1 * x + quad1 * x * x) * 1e3
    total = compute + comm
    return MeasuredPoint(int(tokens), W, compute, comm_bytes, comm, total, one, one / total, one / total / W)


def measured_table(tokens: tuple[int, ...] = (1 << 20, 1 << 22), measured: dict | None = None) -> str:
    """:func:`measured_model` for every measured world size, as a Markdown table."""
    m = measured or MEASURED_H200
    head = ("| N | GPUs | per-rank compute ms | received GB | comm ms | total ms | one GPU ms | speedup | "
            "efficiency |\n| " + " | ".join(["---"] * 9) + " |")
    rows = [head]
    for n in tokens:
        for W in sorted(m["ranks"]):
            p = measured_model(n, W, m)
            rows.append(f"| {n // (1 << 20)}M | {W} | {p.compute_ms:.0f} | {p.comm_bytes / 1e9:.2f} | {p.comm_ms:.1f} | "
                        f"{p.total_ms:.0f} | {p.one_device_ms:.0f} | {p.speedup:.2f}x | {100 * p.efficiency:.0f} % |")
    return "\n".join(rows)
