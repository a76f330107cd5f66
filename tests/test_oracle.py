"""The oracle (unisparse_ref.oracle.testing) and ``unisparse-ref verify``: our GPU backends pass it, and
deliberately broken implementations fail it with a message that names the fault.

The numpy backend *is* the reference: running it through the batteries compares the reference
with itself and proves nothing, so those parametrisations skip. That a correct implementation
passes and faulty ones fail is shown on an independent implementation in
``tests/test_mutations.py``."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import reference as ref
from unisparse_ref.oracle import testing
from unisparse_ref.oracle.verify import main as verify_main

from .conftest import SIM

# In the CUDA simulator every thread runs in Python: two tiny cases per stage.
_SIM_ATTN = [testing.AttentionCase("sim_ragged_gqa", 1, 2, 1, 20, 37, 16, seed=1),
             testing.AttentionCase("sim_empty_rows", 1, 2, 2, 32, 32, 16, mask="empty_rows", seed=2)]
_SIM_PIPE = [testing.AttentionCase("sim_pipe", 1, 2, 1, 40, 48, 16, seed=3, structured=True)]


# ----------------------------------------------------------------------------- our backends pass
def _not_the_reference(backend) -> None:
    if backend.name == "numpy":
        pytest.skip("the reference against itself proves nothing")


def test_backend_passes_attention_battery(backend):
    _not_the_reference(backend)
    for dtype in backend.supported_dtypes:
        if SIM and dtype != np.float32:
            continue
        report = testing.check_block_sparse_attention(backend.block_sparse_attention, dtype=dtype, quick=True,
                                                      cases=_SIM_ATTN if SIM else None)
        assert report.ok, report.table()


def test_backend_passes_compress_and_scores_batteries(backend):
    _not_the_reference(backend)
    cases = testing.scores_cases(quick=True)[:1] if SIM else None
    report = testing.check_compress(backend.compress, cases=cases)
    assert report.ok, report.table()
    report = testing.check_scores(backend.block_scores, cases=cases, score_eps=max(backend.score_eps, 1e-6))
    assert report.ok, report.table()


def test_backend_passes_selection_battery(backend):
    _not_the_reference(backend)
    cases = testing.selection_cases(quick=True)
    report = testing.check_selection(backend.select_blocks, cases=cases[:2] if SIM else cases)
    assert report.ok, report.table()


def test_backend_passes_pipeline_battery(backend):
    _not_the_reference(backend)

    def fn(q, k, v, config):
        return us.unisparse_attention(q, k, v, config, backend=backend, return_details=True)

    report = testing.check_pipeline(fn, quick=True, score_eps=max(backend.score_eps, 1e-6),
                                    cases=_SIM_PIPE if SIM else None)
    assert report.ok, report.table()


# ----------------------------------------------------------------------------- assert_attention_close
def _inputs(causal=True, nq=40, nk=56):
    case = testing.AttentionCase("x", 1, 2, 1, nq, nk, 16, causal=causal, seed=5)
    return testing.make_attention_inputs(case)


def test_assert_attention_close_passes_reference_and_fails_with_worst_element():
    q, k, v, bm, cfg = _inputs()
    out, lse = ref.block_sparse_attention(q, k, v, bm, cfg)
    testing.assert_attention_close(out, q, k, v, bm, cfg, lse=lse)
    bad = out.copy()
    bad[0, 1, 17, 3] += 1e-3
    with pytest.raises(AssertionError) as e:
        testing.assert_attention_close(bad, q, k, v, bm, cfg)
    msg = str(e.value)
    assert "(0, 1, 17, 3)" in msg and "tolerance" in msg and "low-precision reference error" in msg


def test_assert_attention_close_low_precision_rule():
    q, k, v, bm, cfg = _inputs()
    for dt in (np.float16, us.BFLOAT16):
        out_lp, lse_lp = ref.block_sparse_attention(q, k, v, bm, cfg, precision=dt)
        testing.assert_attention_close(out_lp, q, k, v, bm, cfg, lse=lse_lp)  # the rule's own baseline passes
        ref64, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
        worse = (ref64 + 3 * (out_lp.astype(np.float64) - ref64) + 1e-4).astype(dt)
        with pytest.raises(AssertionError, match=str(np.dtype(dt))):
            testing.assert_attention_close(worse, q, k, v, bm, cfg)


def test_assert_attention_close_checks_lse():
    q, k, v, bm, cfg = _inputs()
    out, lse = ref.block_sparse_attention(q, k, v, bm, cfg)
    with pytest.raises(AssertionError, match="lse"):
        testing.assert_attention_close(out, q, k, v, bm, cfg, lse=lse + np.float32(0.1))
    # This package's backends must return float32 (the default); outside implementations may
    # return float64 (the batteries and verify pass LSE_DTYPES), never float16.
    with pytest.raises(AssertionError, match="float32"):
        testing.assert_attention_close(out, q, k, v, bm, cfg, lse=lse.astype(np.float64))
    testing.assert_attention_close(out, q, k, v, bm, cfg, lse=lse.astype(np.float64), lse_dtypes=testing.LSE_DTYPES)
    with pytest.raises(AssertionError, match="lse"):
        testing.assert_attention_close(out, q, k, v, bm, cfg, lse=lse.astype(np.float64) + 0.1,
                                       lse_dtypes=testing.LSE_DTYPES)
    with pytest.raises(AssertionError, match="float32 or float64, got float16"):
        testing.assert_attention_close(out, q, k, v, bm, cfg, lse=lse.astype(np.float16), lse_dtypes=testing.LSE_DTYPES)


# ----------------------------------------------------------------------------- broken implementations
BROKEN = textwrap.dedent('''
    import numpy as np
    from unisparse_ref import BlockMask
    from unisparse_ref import reference as ref

    def _attn(q, k, v, bm, config, *, scale=None, strict=False, nan=False):
        q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
        B, Hq, Nq, D = q.shape
        Nk, G = k.shape[2], q.shape[1] // k.shape[1]
        rows = np.arange(Nq)
        nc = BlockMask(bm.mask, bm.block_size, bm.heads_per_mask, Nq, Nk, False)
        allowed = ref.expand_block_mask(nc, Hq, rows)
        if bm.causal:
            pos = (rows + Nk - Nq)[:, None]
            keys = np.arange(Nk)[None]
            allowed = allowed & ((keys < pos) if strict else (keys <= pos))
        s = config.scale_for(D) if scale is None else scale
        kk, vv = np.repeat(k, G, 1), np.repeat(v, G, 1)
        lg = np.where(allowed, s * q @ kk.swapaxes(-1, -2), -np.inf)
        m = lg.max(-1, keepdims=True)
        e = ~np.isfinite(m)
        p = np.exp(lg - np.where(e, 0, m))
        den = p.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (p @ vv) / den
        if not nan:
            out = np.where(e, 0, out)
        lse = np.where(e[..., 0], -np.inf, m[..., 0] + np.log(np.where(e[..., 0], 1, den[..., 0])))
        return out.astype(np.float32), lse.astype(np.float32)

    def good(q, k, v, bm, config):
        return _attn(q, k, v, bm, config)

    def good_float64_lse(q, k, v, bm, config):
        out, lse = _attn(q, k, v, bm, config)
        return out.astype(np.float64), lse.astype(np.float64)

    def float16_lse(q, k, v, bm, config):
        out, lse = _attn(q, k, v, bm, config)
        return out, lse.astype(np.float16)

    def off_by_one_causal(q, k, v, bm, config):
        return _attn(q, k, v, bm, config, strict=True)

    def wrong_scale(q, k, v, bm, config):
        return _attn(q, k, v, bm, config, scale=1.0)

    def nan_in_empty_rows(q, k, v, bm, config):
        return _attn(q, k, v, bm, config, nan=True)

    def missing_forced_block(scores, config, nq, nk):
        m = ref.select_blocks(scores, config, nq, nk).mask.copy()
        m[..., 0] = False  # the sink block is dropped
        return m

    def pipeline_missing_sink(q, k, v, config):
        q_c, k_c = ref.compress(q, k, config)
        s = ref.block_scores(q_c, k_c, config, q.shape[2], k.shape[2])
        bm = ref.select_blocks(s, config, q.shape[2], k.shape[2])
        m = bm.mask.copy()
        m[..., 1:, 0] = False
        bm = BlockMask(m, bm.block_size, bm.heads_per_mask, bm.nq, bm.nk, bm.causal)
        out, lse = ref.block_sparse_attention(q, k, v, bm, config)
        return out, lse, bm
''')


@pytest.fixture()
def broken_module(tmp_path, monkeypatch):
    (tmp_path / "us_broken_impls.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "us_broken_impls"
    sys.modules.pop("us_broken_impls", None)


@pytest.mark.parametrize("fn, stage, expect", [
    ("off_by_one_causal", "attention", "off-by-one causal mask: the diagonal key s = p(t) was excluded"),
    ("wrong_scale", "attention", "wrong softmax scale 1 (forgot 1/sqrt(D))"),
    ("nan_in_empty_rows", "attention", "a row with no allowed key must give 0, not NaN"),
    ("missing_forced_block", "selection", "missing blocks [j=0 (forced: sink)]"),
    ("pipeline_missing_sink", "pipeline", "missing forced block(s) j=0 (sink)"),
])
def test_broken_implementation_fails_verify_with_pointed_message(broken_module, capsys, fn, stage, expect):
    rc = verify_main([f"{broken_module}:{fn}", "--stage", stage, "--quick"])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "FAIL" in text
    assert expect in text, text


def test_verify_passes_a_correct_implementation(broken_module, capsys):
    assert verify_main([f"{broken_module}:good", "--stage", "attention", "--quick"]) == 0
    assert "ALL PASS" in capsys.readouterr().out


def test_verify_accepts_lse_float32_or_float64(broken_module, capsys):
    assert verify_main([f"{broken_module}:good_float64_lse", "--stage", "attention", "--quick"]) == 0
    assert "ALL PASS" in capsys.readouterr().out
    assert verify_main([f"{broken_module}:float16_lse", "--stage", "attention", "--quick"]) == 1
    assert "lse must be float32 or float64, got float16" in capsys.readouterr().out


def test_verify_backend_targets_resolve_every_stage(capsys):
    """Plumbing only: a backend name resolves to the right method for every stage and the table
    is printed. (The numpy backend is the reference: that it agrees with itself proves nothing.)"""
    for stage in ("compress", "scores", "selection", "attention"):
        assert verify_main(["numpy", "--stage", stage, "--quick"]) == 0
        assert f"stage={stage}" in capsys.readouterr().out
    assert verify_main(["numpy", "--stage", "pipeline", "--quick", "--dtype", "float16"]) == 0


def test_verify_help_cites_the_specification(capsys):
    with pytest.raises(SystemExit):
        verify_main(["--help"])
    text = capsys.readouterr().out
    assert "docs/spec.md" in text and "compress" in text and "scores" in text


def test_verify_bad_target_exit_code(broken_module, capsys):
    assert verify_main(["no_such_module_xyz:f", "--stage", "attention"]) == 2
    assert verify_main([f"{broken_module}:nope", "--stage", "attention"]) == 2
    assert "nope" in capsys.readouterr().err


def test_report_lists_borderline_rows_and_skips_not_implemented():
    # Kept mass at the threshold up to rounding (0.4 + 0.3 vs P = 0.7): every row is borderline
    # and listed, none hidden.
    cfg = us.UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=0.7, causal=False, n_sink_blocks=0,
                             n_local_blocks=0)
    scores = np.broadcast_to(np.array([0.1, 0.4, 0.3, 0.2]), (1, 1, 2, 4)).copy()
    rep = testing.check_selection(ref.select_blocks, cases=[("at_threshold", scores, cfg, 32, 64)])
    assert rep.ok and rep.cases[0].borderline_rows == [(0, 0, 0), (0, 0, 1)]
    assert "borderline" in rep.table()
    # Exact binary fractions (0.25 each, P = 0.5) cannot round: no row is excused, and the rule
    # "while m < P" decides (two blocks, not three).
    cfg = dataclasses.replace(cfg, threshold=0.5)
    scores = np.full((1, 1, 2, 4), 0.25)
    rep = testing.check_selection(ref.select_blocks, cases=[("exact", scores, cfg, 32, 64)])
    assert rep.ok and rep.cases[0].borderline_rows == []

    def takes_one_more(s, c, nq, nk):
        m = ref.select_blocks(s, c, nq, nk).mask.copy()
        m[..., 2] = True
        return m

    rep = testing.check_selection(takes_one_more, cases=[("exact", scores, cfg, 32, 64)])
    assert not rep.ok and "exact sums" in rep.table()

    def unsupported(*args):
        raise NotImplementedError("head_dim 40")

    rep = testing.check_block_sparse_attention(unsupported, quick=True)
    assert rep.ok and all(c.skipped for c in rep.cases) and "SKIP" in rep.table()
