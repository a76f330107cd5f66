"""Mutation battery: planted faults in an *outside* implementation must fail the oracle.

The reference is the oracle for other people's kernels, so a wrong implementation must never
pass it. This file holds a second implementation of UniSparse written here from
``docs/spec.md`` alone, as an outside implementer would (loops over rows, nothing imported
from :mod:`unisparse_ref.reference` or :mod:`unisparse_ref.geometry`), with a ``fault``
switch on every stage. Unfaulted, it passes every check: that is the evidence that the
oracle accepts a correct independent implementation. Each planted fault must then be caught

* by the oracle's battery of its own stage (:mod:`unisparse_ref.oracle.testing`, the
  functions behind ``unisparse-ref verify --stage ...``), and
* by ``--stage pipeline`` run on the whole pipeline that contains it (where the fault can
  show through SPEC section 7's eps-validity: see ``PIPELINE_BLIND``), and
* by the stored golden vectors, where the fault moves a stored value.

The reference is never monkeypatched and never compared with itself here: the mutants are the
point. :class:`Spec` (the unfaulted loops) is also the independent comparison that
``tests/test_properties.py`` uses for the numpy backend.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from unisparse_ref import SUPPORTED_DTYPES, BlockMask, UniSparseConfig, to_numpy
from unisparse_ref.oracle import golden, testing
from unisparse_ref.oracle.verify import main as verify_main


# ============================================================================ the outside implementation
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale(config: UniSparseConfig, D: int) -> float:
    return 1.0 / math.sqrt(D) if config.softmax_scale is None else float(config.softmax_scale)


class Spec:
    """UniSparse transcribed from docs/spec.md with loops; ``fault`` plants one mistake."""

    # ---------------------------------------------------------------- SPEC 3: composite tokens
    @staticmethod
    def compress(q, k, config: UniSparseConfig, fault: str | None = None):
        q, k = (np.asarray(to_numpy(x), dtype=np.float64) for x in (q, k))
        c_q, c_k, c_h = config.c_q, config.c_k, config.c_h
        if fault == "pool_cq_ck_swapped":
            c_q, c_k = c_k, c_q

        def pool(x, c):
            B, H, N, D = x.shape
            out = np.zeros((B, H, _cdiv(N, c), D))
            for r in range(out.shape[2]):
                group = x[:, :, r * c: min((r + 1) * c, N)]
                count = c if fault == "pool_last_group_divided_by_c" else group.shape[2]
                out[:, :, r] = group.sum(axis=2) / count
            return out

        qs = pool(q, c_q)
        Hm = q.shape[1] // c_h
        if fault == "pool_heads_strided":  # heads {g, g + Hm, ...} instead of {g*c_h .. g*c_h + c_h - 1}
            q_c = np.stack([qs[:, g::Hm].mean(axis=1) for g in range(Hm)], axis=1)
        else:
            q_c = np.stack([qs[:, g * c_h:(g + 1) * c_h].mean(axis=1) for g in range(Hm)], axis=1)
        return q_c, pool(k, c_k)

    # ---------------------------------------------------------------- SPEC 4: block scores
    @staticmethod
    def block_scores(q_c, k_c, config: UniSparseConfig, nq: int, nk: int, fault: str | None = None):
        q_c, k_c = (np.asarray(to_numpy(x), dtype=np.float64) for x in (q_c, k_c))
        B, Hm, R, D = q_c.shape
        Hkv, C = k_c.shape[1], k_c.shape[2]
        S, c_q, c_k, c_h = config.block_size, config.c_q, config.c_k, config.c_h
        if fault == "pool_cq_ck_swapped":  # the pipeline of a swapped pooling, consistent with it
            c_q, c_k = c_k, c_q
        G = Hm * c_h // Hkv
        scale = _scale(config, D)
        if fault == "scores_ignore_softmax_scale":
            scale = 1.0 / math.sqrt(D)
        nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
        scores = np.zeros((B, Hm, nqb, nkb))
        rows_in_block = np.zeros(nqb)
        for r in range(R):
            rows_in_block[(r * c_q) // S] += 1
        if fault == "scores_divide_by_full_R":
            rows_in_block[:] = S // c_q
        key_block = np.array([(c * c_k) // S for c in range(C)])
        for b in range(B):
            for g in range(Hm):
                kv = (g * c_h) // G if fault != "scores_kv_head_g_div_G" else g // G
                for r in range(R):
                    last = min((r + 1) * c_q, nq) - 1
                    if fault == "vis_first_query":
                        last = r * c_q
                    p = last + (nk - nq)
                    vis = np.ones(C, dtype=bool)
                    if config.causal:
                        first = np.arange(C) * c_k
                        vis = (first <= p) if fault != "vis_strict_key0" else ((first < p) | (np.arange(C) == 0))
                    logits = scale * (k_c[b, kv] @ q_c[b, g, r])
                    a = np.zeros(C)
                    if fault == "scores_per_block_softmax":
                        blocks = [j for j in range(nkb) if (vis & (key_block == j)).any()]
                        for j in blocks:
                            sel = vis & (key_block == j)
                            e = np.exp(logits[sel] - logits[sel].max())
                            a[sel] = e / e.sum() / len(blocks)
                    else:
                        e = np.exp(logits[vis] - logits[vis].max())
                        a[vis] = e / e.sum()
                    scores[b, g, (r * c_q) // S] += np.bincount(key_block, weights=a, minlength=nkb)
                scores[b, g] /= rows_in_block[:, None]
        return scores

    # ---------------------------------------------------------------- SPEC 5: selection
    @staticmethod
    def select_blocks(scores, config: UniSparseConfig, nq: int, nk: int, fault: str | None = None):
        s = np.asarray(to_numpy(scores), dtype=np.float64)
        B, Hm, nqb, nkb = s.shape
        S, P = config.block_size, float(config.threshold)
        n_sink, n_local = config.n_sink_blocks, config.n_local_blocks
        if fault == "forced_ignores_n_sink_local":
            n_sink, n_local = 1, 1
        mask = np.zeros(s.shape, dtype=bool)
        for i in range(nqb):
            p_last = min((i + 1) * S, nq) - 1 + (nk - nq)
            d = p_last // S
            visible = [j for j in range(nkb) if not config.causal or j * S <= p_last]
            forced = [j for j in visible if j < n_sink or d - n_local < j <= d]
            if fault == "sink_local_not_forced":
                forced = []
            for b in range(B):
                for g in range(Hm):
                    row = s[b, g, i]
                    if P >= 1.0:
                        mask[b, g, i, visible] = True
                        continue
                    m = 0.0
                    for j in forced:
                        mask[b, g, i, j] = True
                        if fault != "forced_not_counted":
                            m += row[j]
                    tie = (lambda j: -j) if fault == "ties_to_higher_j" else (lambda j: j)
                    for j in sorted((j for j in visible if j not in forced), key=lambda j: (-row[j], tie(j))):
                        if not (m <= P if fault == "threshold_le" else m < P):
                            break
                        mask[b, g, i, j] = True
                        m += row[j]
        return BlockMask(mask, S, config.c_h, nq, nk, config.causal)

    # ---------------------------------------------------------------- SPEC 6: attention
    @staticmethod
    def block_sparse_attention(q, k, v, block_mask: BlockMask, config: UniSparseConfig,
                               fault: str | None = None):
        q, k, v = (np.asarray(to_numpy(x), dtype=np.float64) for x in (q, k, v))
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        S = block_mask.block_size
        mask = np.asarray(to_numpy(block_mask.mask), dtype=bool)
        scale = _scale(config, D)
        if fault == "attention_ignore_softmax_scale":
            scale = 1.0 / math.sqrt(D)
        t = np.arange(Nq)[:, None]
        s = np.arange(Nk)[None, :]
        if fault == "causal_diag_excluded":
            causal = s < t + (Nk - Nq)
        elif fault == "causal_top_left":
            causal = s <= t
        else:
            causal = s <= t + (Nk - Nq)
        out = np.zeros((B, Hq, Nq, D))
        lse = np.zeros((B, Hq, Nq))
        for b in range(B):
            for h in range(Hq):
                mh = h // block_mask.heads_per_mask if fault != "mask_head_h_mod" else h % mask.shape[1]
                allowed = mask[b, mh][np.ix_(np.arange(Nq) // S, np.arange(Nk) // S)]
                if block_mask.causal:
                    allowed = allowed & causal
                logits = np.where(allowed, scale * (q[b, h] @ k[b, h // G].T), -np.inf)
                mx = logits.max(axis=1)
                empty = np.isneginf(mx)  # rows with no allowed key
                e = np.exp(logits - np.where(empty, 0.0, mx)[:, None])
                den = e.sum(axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    o = (e @ v[b, h // G]) / den[:, None]
                    row_lse = mx + np.log(den)
                out[b, h] = o if fault == "empty_rows_nan" else np.where(empty[:, None], 0.0, o)
                lse[b, h] = np.where(empty, -np.inf, row_lse)
                if fault == "lse_log2":
                    lse[b, h] /= math.log(2.0)
        return out, lse.astype(np.float32)

    # ---------------------------------------------------------------- the pipeline
    @staticmethod
    def pipeline(q, k, v, config: UniSparseConfig, fault: str | None = None, return_mask: bool = True):
        nq, nk = np.shape(q)[2], np.shape(k)[2]
        q_c, k_c = Spec.compress(q, k, config, fault)
        scores = Spec.block_scores(q_c, k_c, config, nq, nk, fault)
        bm = Spec.select_blocks(scores, config, nq, nk, fault)
        out, lse = Spec.block_sparse_attention(q, k, v, bm, config, fault)
        return (out, lse, bm) if return_mask else (out, lse)


STAGE_FN = {"compress": "compress", "scores": "block_scores", "selection": "select_blocks",
            "attention": "block_sparse_attention"}


@dataclass(frozen=True)
class Fault:
    name: str
    stage: str
    what: str


FAULTS = [
    Fault("pool_last_group_divided_by_c", "compress", "the last (short) group divided by c, not by its count"),
    Fault("pool_cq_ck_swapped", "compress", "queries pooled by c_k and keys by c_q"),
    Fault("pool_heads_strided", "compress", "head pooling over heads g, g+Hm, ... instead of consecutive heads"),
    Fault("vis_first_query", "scores", "composite visibility judged at the group's first query, not its last"),
    Fault("vis_strict_key0", "scores", "strict < in the composite rule, key group 0 always visible"),
    Fault("scores_ignore_softmax_scale", "scores", "config.softmax_scale ignored (1/sqrt(D) always)"),
    Fault("scores_per_block_softmax", "scores", "softmax per key block instead of over the whole row"),
    Fault("scores_divide_by_full_R", "scores", "block rows averaged over S/c_q, not R_i (short last block)"),
    Fault("scores_kv_head_g_div_G", "scores", "composite head g reads KV head g // G, not (g*c_h) // G"),
    Fault("ties_to_higher_j", "selection", "equal scores: the higher block index first"),
    Fault("threshold_le", "selection", "while m <= P instead of m < P"),
    Fault("forced_not_counted", "selection", "forced blocks kept but not counted in m"),
    Fault("sink_local_not_forced", "selection", "sink and local blocks not forced"),
    Fault("forced_ignores_n_sink_local", "selection", "one sink and one local block whatever the config says"),
    Fault("causal_diag_excluded", "attention", "causal rule s < p(t): the diagonal key excluded"),
    Fault("causal_top_left", "attention", "causal rule aligned top-left (s <= t) for Nq < Nk"),
    Fault("attention_ignore_softmax_scale", "attention", "config.softmax_scale ignored in the attention"),
    Fault("lse_log2", "attention", "lse in log2 instead of the natural log"),
    Fault("empty_rows_nan", "attention", "a row with no allowed key gives NaN (0/0)"),
    Fault("mask_head_h_mod", "attention", "query head h reads mask head h % Hm instead of h // c_h"),
]

#: Faults that ``--stage pipeline`` cannot see when the implementation returns its mask: they
#: change a decision only where two scores are equal or the mass equals ``P``, i.e. within any
#: ``eps`` of SPEC section 7, whose eps-validity rightly accepts either choice for an
#: implementation computing its own scores. Without a returned mask the pipeline battery
#: compares the output with the reference pipeline's, and ``pipe_exact_ties`` catches them;
#: the selection battery and the golden vectors catch them in any case.
PIPELINE_BLIND = {"ties_to_higher_j", "threshold_le"}

CHECKS = {"compress": testing.check_compress, "scores": testing.check_scores,
          "selection": testing.check_selection, "attention": testing.check_block_sparse_attention}


def _impl(stage: str, fault: str | None):
    return functools.partial(getattr(Spec, STAGE_FN[stage]), fault=fault)


# Named targets for ``unisparse-ref verify tests.test_mutations:<namespace>.<fault>``.
STAGE_IMPLS = SimpleNamespace(**{f.name: _impl(f.stage, f.name) for f in FAULTS})
PIPELINES = SimpleNamespace(**{f.name: functools.partial(Spec.pipeline, fault=f.name) for f in FAULTS})
PIPELINES_NO_MASK = SimpleNamespace(**{f.name: functools.partial(Spec.pipeline, fault=f.name, return_mask=False)
                                       for f in FAULTS})
CORRECT = SimpleNamespace(pipeline=Spec.pipeline, **{stage: _impl(stage, None) for stage in STAGE_FN})

IDS = [f.name for f in FAULTS]


@pytest.fixture(scope="module")
def golden_cases():
    return golden.load_cases()


def _verify(target: str, stage: str, capsys, *extra: str) -> tuple[int, str]:
    rc = verify_main([f"tests.test_mutations:{target}", "--stage", stage, *extra])
    return rc, capsys.readouterr().out


# ----------------------------------------------------------------------------- unfaulted: everything passes
def test_there_are_enough_faults_in_every_stage():
    stages = {f.stage for f in FAULTS}
    assert len(FAULTS) >= 10 and stages == set(STAGE_FN), stages
    assert len({f.name for f in FAULTS}) == len(FAULTS)


def test_outside_implementation_passes_every_battery():
    """A correct implementation written independently of the reference passes every battery
    (full size, several dtypes): the oracle's pass is earned, not a self-comparison."""
    for stage, check in CHECKS.items():
        dtypes = [np.float64] if stage == "selection" else SUPPORTED_DTYPES
        for dt in dtypes:
            kw = {"score_dtype": dt} if stage == "selection" else {"dtype": dt}
            report = check(_impl(stage, None), **kw)
            assert report.ok, report.table()
    report = testing.check_selection(_impl("selection", None), score_dtype=np.float32)
    assert report.ok, report.table()
    for fn in (Spec.pipeline, functools.partial(Spec.pipeline, return_mask=False)):
        report = testing.check_pipeline(fn)
        assert report.ok, report.table()


def test_outside_implementation_reproduces_the_golden_vectors(golden_cases):
    for case in golden_cases:
        for stage in STAGE_FN:
            assert golden.check_stage(case, stage, _impl(stage, None)) == [], (case.name, stage)


def test_verify_passes_the_outside_implementation(capsys):
    for stage in STAGE_FN:
        rc, text = _verify(f"CORRECT.{stage}", stage, capsys, "--quick")
        assert rc == 0 and "ALL PASS" in text, text
    rc, text = _verify("CORRECT.pipeline", "pipeline", capsys, "--quick")
    assert rc == 0, text


# ----------------------------------------------------------------------------- every fault is caught
@pytest.mark.parametrize("fault", FAULTS, ids=IDS)
def test_fault_fails_its_stage_battery(fault, capsys):
    """The full battery of the fault's stage fails, and so does ``verify --stage <stage> --quick``."""
    report = CHECKS[fault.stage](_impl(fault.stage, fault.name))
    assert not report.ok, f"{fault.name} ({fault.what}) passes the {fault.stage} battery:\n{report.table()}"
    rc, text = _verify(f"STAGE_IMPLS.{fault.name}", fault.stage, capsys, "--quick")
    assert rc == 1 and "FAIL" in text, text


@pytest.mark.parametrize("fault", FAULTS, ids=IDS)
def test_fault_fails_verify_pipeline(fault, capsys):
    """``unisparse-ref verify --stage pipeline --quick`` fails on the whole pipeline that holds the fault."""
    rc, text = _verify(f"PIPELINES_NO_MASK.{fault.name}", "pipeline", capsys, "--quick")
    assert rc == 1 and "FAIL" in text, f"{fault.name} passes the pipeline battery (no mask returned):\n{text}"
    rc, text = _verify(f"PIPELINES.{fault.name}", "pipeline", capsys, "--quick")
    if fault.name in PIPELINE_BLIND:
        assert rc == 0, f"{fault.name} is now caught with its mask: take it out of PIPELINE_BLIND\n{text}"
    else:
        assert rc == 1 and "FAIL" in text, f"{fault.name} passes the pipeline battery (mask returned):\n{text}"


@pytest.mark.parametrize("fault", FAULTS, ids=IDS)
def test_fault_fails_the_golden_vectors(fault, golden_cases):
    """Run on the stored inputs, the faulty stage misses a stored output of some golden case."""
    problems = [p for case in golden_cases for p in golden.check_stage(case, fault.stage, _impl(fault.stage, fault.name))]
    assert problems, f"{fault.name} ({fault.what}) reproduces every golden case"


def test_golden_v2_is_what_catches_the_faults_of_issue_11(golden_cases):
    """v1 alone let these through (issue 11); v2's cases catch each of them."""
    v1 = [c for c in golden_cases if c.version == "v1"]
    for name in ("vis_first_query", "vis_strict_key0", "ties_to_higher_j", "threshold_le", "empty_rows_nan"):
        fault = next(f for f in FAULTS if f.name == name)
        fn = _impl(fault.stage, name)
        assert not any(golden.check_stage(c, fault.stage, fn) for c in v1), name
        assert any(golden.check_stage(c, fault.stage, fn) for c in golden_cases if c.version != "v1"), name
