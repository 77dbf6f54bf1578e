"""benchmarks/compare_reports.py, which REPORTS.md's CPU-vs-GPU comparison rests on: its Spearman
equals scipy's (ties included) and it finds a planted difference between two report folders."""
import importlib.util
import os

import pytest
import torch
from scipy.stats import spearmanr

from headscope.heads import HeadScores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("compare_reports", os.path.join(ROOT, "benchmarks", "compare_reports.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spearman_matches_scipy_with_ties():
    cr = _script()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (40,), generator=g).float()          # many ties
    b = a + torch.randn(40, generator=g)
    assert cr.spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert cr.spearman(a, -a) == pytest.approx(-1.0)


def test_compare_finds_a_planted_difference(tmp_path):
    cr = _script()
    s = torch.arange(12, dtype=torch.float32).reshape(3, 4)                # [layer, head]
    t = s.clone()
    t[0, 1] = 20.0                                                         # L0H1 becomes the top head
    for d, x in (("a", s), ("b", t)):
        (tmp_path / d / "raw").mkdir(parents=True)
        HeadScores(scores=x, method="x").save(tmp_path / d / "raw" / "demo")
    HeadScores(scores=s, method="x").save(tmp_path / "a" / "raw" / "only_a")
    rows = {r["analyzer"]: r for r in cr.compare(tmp_path / "a", tmp_path / "b", top=3)}
    r = rows["demo"]
    assert r["max_abs_diff"] == pytest.approx(19.0) and r["max_rel_diff"] == pytest.approx(19.0 / 20.0)
    assert (r["top_a"], r["top_b"]) == ("L2H3", "L0H1") and r["top_k_shared"] == 2
    assert rows["only_a"]["missing"] == str(tmp_path / "b")
    same = cr.compare(tmp_path / "a", tmp_path / "a")
    assert all(x["max_abs_diff"] == 0 and x["spearman"] == pytest.approx(1.0) for x in same)
