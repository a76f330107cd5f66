"""Golden vectors: shipped, hashed, never overwritten, reproducible, self-consistent, and matched
by every backend (compared with the *stored* outputs, never with the live reference)."""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import reference as ref
from unisparse_ref.oracle import golden, testing

from .conftest import SIM

CASES = golden.load_cases()
DATA = str(resources.files("unisparse_ref.data"))


def _sha(path: str) -> str:
    return golden._sha256(path)


# ----------------------------------------------------------------------------- files and hashes
def test_every_version_is_shipped_and_small():
    assert [c.name for c in CASES] == golden.case_names()
    assert golden.VERSIONS[:2] == ["v1", "v2"] and golden.VERSION == golden.VERSIONS[-1]
    total = 0
    for v in golden.VERSIONS:
        files = sorted(f for f in os.listdir(DATA) if f.startswith(f"golden_{v}_"))
        assert files == sorted(golden._files(v)), v
        total += sum(os.path.getsize(os.path.join(DATA, f)) for f in files)
    assert total < 1_000_000


def test_shipped_files_match_their_hashes():
    assert golden.check_hashes() == []


def test_v1_is_byte_identical_and_every_file_hashed():
    # v1's manifest is pinned in the code; the hashes of its case files are recorded in v2's manifest.
    assert _sha(os.path.join(DATA, "golden_v1_manifest.json")) == golden._MANIFEST_SHA256["v1"]
    with open(os.path.join(DATA, "golden_v2_manifest.json")) as f:
        recorded = json.load(f)["sha256"]
    for v in ("v1", "v2"):
        for fname in golden._files(v)[:-1]:
            assert recorded[fname] == _sha(os.path.join(DATA, fname)), fname
    assert "golden_v1_manifest.json" in recorded


def _copy_data(tmp_path) -> str:
    d = str(tmp_path / "data")
    shutil.copytree(DATA, d, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    return d


def test_hash_check_detects_an_edited_or_regenerated_file(tmp_path):
    d = _copy_data(tmp_path)
    assert golden.check_hashes(d, pinned=True) == []
    # One byte of a v1 case file changes: its recorded hash no longer matches.
    path = os.path.join(d, "golden_v1_basic_causal.npz")
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 1
    open(path, "wb").write(bytes(raw))
    problems = golden.check_hashes(d, pinned=True)
    assert any("golden_v1_basic_causal.npz" in p and "recorded" in p for p in problems), problems
    # A changed case file with a manifest rewritten to match it (what deleting a version and
    # regenerating it from a changed reference produces): only the pinned manifest hash sees it.
    d2 = _copy_data(tmp_path / "again")
    path = os.path.join(d2, "golden_v2_exact_ties.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["mask"] = ~arrays["mask"]
    np.savez_compressed(path, **arrays)
    mpath = os.path.join(d2, "golden_v2_manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["sha256"]["golden_v2_exact_ties.npz"] = _sha(path)
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    assert golden.check_hashes(d2, pinned=False) == []
    problems = golden.check_hashes(d2, pinned=True)
    assert any("golden_v2_manifest.json" in p and "pinned" in p for p in problems), problems


def test_regenerate_refuses_to_overwrite_a_version(tmp_path, capsys):
    d = str(tmp_path)
    written = golden.regenerate(d, "v1")
    before = {p: _sha(p) for p in written}
    with pytest.raises(FileExistsError, match="never"):
        golden.regenerate(d, "v1")
    assert {p: _sha(p) for p in written} == before
    # The CLI writes the newest version by default, then refuses to write it again.
    assert golden.main(["regenerate", "--out", d]) == 0
    assert golden.main(["regenerate", "--out", d]) == 1
    assert "never overwritten" in capsys.readouterr().err
    # The shipped data are refused too (nothing written into the package).
    assert golden.main(["regenerate"]) == 1
    with pytest.raises(ValueError, match="not defined"):
        golden.regenerate(d, "v99")
    assert golden.check_hashes() == []


def test_regenerating_reproduces_every_version(tmp_path):
    d = str(tmp_path)
    for v in golden.VERSIONS:
        golden.regenerate(d, v)
    fresh = {c.name: c for c in golden.load_cases(d)}
    for case in CASES:
        assert golden.compare(fresh[case.name], case) == []
    # A freshly written set is internally consistent (its own hashes), though not the pinned one.
    assert golden.check_hashes(d) == []


def test_compare_detects_a_change():
    case = CASES[0]
    other = golden.GoldenCase(case.name, case.description, case.config, case.nq, case.nk, dict(case.arrays))
    other.arrays["out"] = case["out"] + 1e-9
    other.arrays["mask"] = ~case["mask"]
    problems = golden.compare(other, case)
    assert any("out" in p for p in problems) and any("mask" in p for p in problems)


def test_check_command(capsys):
    assert golden.main(["check"]) == 0
    assert "intact and reproduced" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the cases
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.version}-{c.name}")
def test_case_is_self_consistent(case):
    cfg = case.config
    counts, idx = us.BlockMask(case["mask"], cfg.block_size, cfg.c_h, case.nq, case.nk, cfg.causal).to_indices()
    assert np.array_equal(counts, case["kv_counts"]) and np.array_equal(idx, case["kv_indices"])
    np.testing.assert_allclose(case["scores"].sum(-1), 1.0, atol=1e-12)
    assert case["lse"].dtype == np.float32
    assert np.array_equal(np.isneginf(case["lse"]), ~np.isfinite(case["lse"]))  # -inf, never NaN
    assert (case["out"][np.isneginf(case["lse"])] == 0).all()
    if cfg.threshold >= 1.0:
        np.testing.assert_allclose(case["out"], case["dense_out"], atol=1e-12)


def test_v2_cases_hold_what_they_claim():
    by = {c.name: c for c in CASES}
    for name in ("exact_ties", "exact_threshold_hit"):  # exact ties: every block scores exactly 1/8
        assert (by[name]["scores"] == 0.125).all()
    c = by["exact_threshold_hit"]  # the kept mass reaches P = 0.75 exactly: no rounding can excuse it
    assert (c["margin"] == 0).all() and testing.exact_rows(c["scores"], c.config.threshold).all()
    assert (by["exact_ties"]["margin"] > 0.01).all()  # ties decided away from P: never borderline
    # By hand: Nq = 64 queries at the end of Nk = 128 keys, S = 16, so query block i's diagonal
    # block is i + 4. Forced {0, i + 4} carry 0.25; four more blocks reach 0.75 >= P = 0.7, taken
    # lower j first among the equal scores.
    for h in range(2):
        m = by["exact_ties"]["mask"][0, h]
        for i in range(4):
            forced = {0, i + 4}
            lower_first = [j for j in range(8) if j not in forced][:4]
            assert np.flatnonzero(m[i]).tolist() == sorted(forced | set(lower_first)), (h, i)
    c = by["cq8_ck4_offset17_gqa"]
    assert c.nk - c.nq == c.config.block_size + 1 and c.config.c_q != c.config.c_k
    assert np.isneginf(by["forced_reaches_p_empty_rows"]["lse"]).any()
    assert by["scale_cq4_ck16"].config.softmax_scale not in (None, 1 / np.sqrt(16))


# ----------------------------------------------------------------------------- every backend against the stored outputs
#: In the CUDA simulator (every thread in Python): two v1 cases and the two v2 cases that
#: catch what v1 cannot (composite visibility and GQA head mapping; a mass reaching P exactly).
_SIM_CASES = ("basic_causal", "ragged_gqa_ch2", "cq8_ck4_offset17_gqa", "exact_threshold_hit")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in _SIM_CASES] if SIM else CASES,
                         ids=lambda c: f"{c.version}-{c.name}")
def test_backend_matches_golden(backend, case):
    """Each stage of the backend, run on the stored inputs, reproduces the stored outputs
    (SPEC section 7 tolerances). For the numpy backend this is the live reference against the
    stored files: a reference change that moves a value fails here."""
    if case.q.dtype not in [np.dtype(d) for d in backend.supported_dtypes]:
        pytest.skip(f"{backend.name} does not take {case.q.dtype}")
    lse_dtypes = []

    def attention(q, k, v, bm, cfg):
        out, lse = backend.block_sparse_attention(q, k, v, bm, cfg)
        lse_dtypes.append(us.to_numpy(lse).dtype)
        return out, lse

    for stage, fn in (("compress", backend.compress), ("scores", backend.block_scores),
                      ("selection", backend.select_blocks), ("attention", attention)):
        problems = golden.check_stage(case, stage, fn, score_eps=backend.score_eps)
        assert problems == [], (stage, problems)
    assert lse_dtypes == [np.float32]  # this package's backends return float32 lse


def test_live_reference_pipeline_matches_the_stored_outputs():
    """The whole reference pipeline, run now, against the stored intermediates and outputs."""
    for case in CASES:
        r = us.unisparse_attention(case.q, case.k, case.v, case.config, return_details=True)
        np.testing.assert_allclose(r.scores, case["scores"], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(us.to_numpy(r.block_mask.mask), case["mask"])
        scale = max(1.0, float(np.abs(case["out"]).max()))
        assert np.abs(np.asarray(r.out, dtype=np.float64) - case["out"]).max() <= 1e-12 * scale, case.name
        np.testing.assert_array_equal(np.isneginf(r.lse), np.isneginf(case["lse"]))
        fin = np.isfinite(case["lse"])
        np.testing.assert_allclose(r.lse[fin], case["lse"][fin], rtol=1e-6)
        dense, _ = ref.dense_attention(case.q, case.k, case.v, case.config.causal, case.config.softmax_scale)
        np.testing.assert_allclose(dense, case["dense_out"], rtol=0, atol=1e-12 * scale)
