"""Controls: random head sets and bootstrap confidence intervals."""
import pytest
import torch

from headscope.interventions import controls


def test_random_head_sets():
    sets = controls.random_head_sets(30, 9, 8, n_sets=10, seed=0, exclude=[(18, 6), (17, 3)])
    assert len(sets) == 10 and all(len(set(s)) == 8 for s in sets)
    assert all((18, 6) not in s and (17, 3) not in s for s in sets)
    assert len({tuple(s) for s in sets}) == 10
    assert sets == controls.random_head_sets(30, 9, 8, n_sets=10, seed=0, exclude=[(18, 6), (17, 3)])
    with pytest.raises(ValueError, match="cannot draw"):
        controls.random_head_sets(2, 2, 5)


def test_bootstrap_ci():
    m, lo, hi = controls.bootstrap_ci(torch.ones(50))
    assert m == lo == hi == 1.0
    x = torch.tensor([0.0, 1.0] * 100)
    m, lo, hi = controls.bootstrap_ci(x, n_boot=1000)
    assert m == 0.5 and 0.40 < lo < 0.5 < hi < 0.60                       # ~ ±1.96·sqrt(.25/200)
    # two-level: sets that disagree widen the interval compared with one set
    fam = torch.stack([torch.full((100,), v) for v in (0.0, 1.0, 0.0, 1.0)])
    _, flo, fhi = controls.bootstrap_ci(fam, n_boot=1000)
    assert fhi - flo > 0.3


def test_table_pairs_deltas_with_base():
    base = controls.Row("base", torch.tensor([1, 0, 1, 0] * 25))
    better = controls.Row("edit", torch.ones(100, dtype=torch.long), n_params=64, n_heads=1, heads=[(3, 2)])
    rows = controls.table([base, better], n_boot=500)
    assert rows[1]["delta_vs_base"] == pytest.approx(0.5)
    assert rows[1]["delta_ci95"][0] > 0.3
    md = controls.format_table(rows)
    assert "| edit | 1 | 64 |" in md and "+0.500" in md
