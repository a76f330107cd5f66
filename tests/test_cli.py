"""The command line: demo and info run and report what they promise."""

import subprocess
import sys

import pytest

from unisparse_ref import BlockMask, cli
from unisparse_ref.demo import work_skipped


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "info", "bench", "verify", "evaluate"):
        assert name in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy  available" in out and "backends:" in out and "gpu:" in out


def test_demo_small_runs_and_reports(capsys):
    assert cli.main(["demo", "--n", "1024", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "density" in out and "rel. error" in out
    line = next(l for l in out.splitlines() if l.startswith("numpy "))
    density = float(line.split()[2])
    assert 0.0 < density <= 1.0


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "unisparse_ref", "--help"], capture_output=True, text=True, check=True)
    assert "usage: unisparse-ref" in r.stdout


def test_work_skipped_counts_pairs():
    # Causal 2x2 blocks of 16: pairs = [[136, 0], [256, 136]]. Keeping only the diagonal skips 256/528.
    import numpy as np

    bm = BlockMask(np.eye(2, dtype=bool)[None, None], 16, 1, 32, 32, True)
    assert work_skipped(bm) == pytest.approx(256 / 528)
