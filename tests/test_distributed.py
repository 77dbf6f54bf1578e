"""Sweeps on Ray (headscope.app.distributed): a local Ray cluster with 2 CPU workers gives the same
HeadScores as one process (activation patching on the planted induction circuit, retrieval heads on
the same planted model), a failing item is retried, and an item that keeps failing is reported."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'headscope[distributed]'")

import headscope as hs  # noqa: E402
from headscope import circuits as C  # noqa: E402
from headscope.app import distributed as D  # noqa: E402
from headscope.heads.retrieval import NeedleTest, Retrieval, find_needle_span  # noqa: E402
from planted import PLANTED, induction_task, planted_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_planted():
    return planted_model()


@pytest.fixture(scope="module")
def cluster():
    # workers import tests/planted.py (the model loader) like this process does
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])}}
    D.connect(None, 2, runtime_env=env)
    yield ray
    ray.shutdown()


def test_circuit_cli_patching_on_ray(cluster, capsys, tmp_path):
    """`headscope circuit --ray`: refused for methods other than patching (one line, exit 2); with
    patching, compute() runs the sweep on a pool of its own and gives the single-process circuit.
    (First in this file: the module's pool below holds both CPUs.)"""
    import argparse

    from headscope.app.circuit_cli import compute
    from headscope.app.cli import main
    assert main(["circuit", "ioi", "--method", "eap", "--ray", "local", "--out", str(tmp_path / "c")]) == 2
    assert "--ray runs the patching method only" in capsys.readouterr().err
    m = hs.load("tiny-llama")
    task = induction_task(m)                                          # tokens < 16: fit tiny-llama's vocabulary
    a = argparse.Namespace(method="patching", how="mean", force=True, ray="local", workers=2, model="tiny-llama",
                           device=None)
    many = compute(m, task, a, progress=False)
    one = C.from_head_scores(C.patch_heads(m, task, how="mean", check=False), task)
    assert torch.equal(one.head_scores(), many.head_scores())
    assert one.top_nodes(4) == many.top_nodes(4)


@pytest.fixture(scope="module")
def planted_pool(cluster):
    with D.ModelPool(_load_planted, num_workers=2, retries=1) as pool:
        yield pool


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_patch_heads_on_ray_equals_one_process(planted_pool, how):
    m = planted_model()
    task = induction_task(m)
    one = C.patch_heads(m, task, how=how, batch_size=8)
    many = D.patch_heads(planted_pool, m, task, how=how, batch_size=8, progress=False)
    assert torch.equal(one.scores, many.scores)
    assert torch.equal(one.extra["m_clean"], many.extra["m_clean"])
    assert one.params == many.params and one.method == many.method
    assert {r[:2] for r in one.top(2)} == set(PLANTED)           # non-trivial: the planted heads lead


def _needles():
    """Needle tests within the planted model's 16-token vocabulary and 64 positions."""
    g = torch.Generator().manual_seed(0)
    answer = [3, 4, 5, 6]
    tests = []
    for n, depth in [(20, 20), (30, 50), (25, 80), (15, 0), (30, 100)]:
        hay = torch.randint(7, 16, (n,), generator=g).tolist()
        p = int(n * depth / 100)
        prompt = torch.tensor([0] + hay[:p] + answer + hay[p:] + answer[:1])   # the induction head copies on
        tests.append(NeedleTest(prompt, find_needle_span(prompt, answer), answer, n, float(depth), 0))
    return tests


def test_retrieval_on_ray_equals_one_process(planted_pool):
    m = planted_model()
    tests = _needles()
    an = Retrieval(max_new_tokens=6, batch_size=2, rouge_gate=-1.0)      # every test counted
    one = an.score(m, data=tests, progress=False)
    many = D.retrieval(planted_pool, m, an, data=tests, progress=False)
    assert one.extra["test_scores"].abs().sum() > 0                       # non-trivial: some heads copy
    assert torch.equal(one.scores, many.scores)
    for k in ("test_scores", "test_recall", "grid_scores"):
        assert torch.equal(one.extra[k], many.extra[k]), k
    assert one.info["outputs"] == many.info["outputs"]


# ------------------------------------------------------------------------- failures
def _flaky(marker_dir, model, item, shared):
    """Fails the first attempt at item 1 (a marker file says it was tried), and every attempt at item 3."""
    if item == 3:
        raise RuntimeError("item 3 always fails")
    mark = os.path.join(marker_dir, f"tried-{item}")
    if item == 1 and not os.path.exists(mark):
        open(mark, "w").close()
        raise RuntimeError("item 1 fails once")
    return item * 10 + model.cfg.n_layers


def test_pool_that_cannot_start_says_so(planted_pool):
    with pytest.raises(RuntimeError, match="did not start"):               # both CPUs are taken
        D.ModelPool(_load_planted, num_workers=1, start_timeout=3)


def test_failed_item_is_retried_then_reported(planted_pool, tmp_path):
    from functools import partial
    with pytest.raises(D.ItemsFailed) as e:
        planted_pool.map(partial(_flaky, str(tmp_path)), range(5), progress=False)
    assert [(i, item) for i, item, _ in e.value.failed] == [(3, 3)]    # item 1 recovered on its retry
    assert "item 3 always fails" in str(e.value)
    assert (tmp_path / "tried-1").exists()
    got = planted_pool.map(partial(_flaky, str(tmp_path)), [0, 1, 2, 4], progress=False)
    assert got == [2, 12, 22, 42]                                     # in item order


def test_report_ray_flag_routes_analyzers_through_the_pool(monkeypatch):
    """`headscope report --ray` parses, and ``run_analyzers(pool=...)`` sends every analyzer through
    ``distributed.score`` (which runs the splittable ones on the pool's workers)."""
    from headscope.app import report
    from headscope.app.cli import build_parser
    a = build_parser().parse_args(["report", "--out", "x", "--ray", "local", "--workers", "2"])
    assert a.ray == "local" and a.workers == 2
    seen = []

    def fake_score(pool, model, analyzer, data=None, progress=True):
        from headscope.heads import HeadScores
        seen.append((pool, analyzer.name))
        return HeadScores(torch.zeros(model.cfg.n_layers, model.cfg.n_heads), method=analyzer.name)
    monkeypatch.setattr(D, "score", fake_score)
    m = hs.load("tiny-llama")
    pool = object()
    results, errors = report.run_analyzers(m, ["previous_token"], pool=pool, log=lambda *_: None)
    assert not errors and seen == [(pool, "previous_token")]
    assert results["previous_token"].shape == (m.cfg.n_layers, m.cfg.n_heads)
