"""`headscope intervene`: arguments checked before a model loads; a small LoFiT run on SmolLM2
writes a folder whose edits re-apply with load_edits."""
import argparse
import json

import pytest
import torch

from headscope.app import intervene_cli


def _args(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    intervene_cli.add_parser(sub)
    return ap.parse_args(["intervene", *argv])


@pytest.mark.parametrize("argv, msg", [
    (["lofit", "--task", "nope", "--out", "X"], "not a shipped task"),
    (["lofit", "--task", "harm", "--other-task", "harm", "--out", "X"], "must differ"),
    (["lofit", "--k", "0", "--out", "X"], "--k must be >= 1"),
    (["kv", "--out", "X"], "not available from this command yet"),
    (["influence", "--heads", "L1H2,banana", "--out", "X"], "neither"),
    (["lofit", "--n-random", "-1", "--out", "X"], "--n-random"),
])
def test_bad_arguments_fail_before_loading(argv, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import headscope
    monkeypatch.setattr(headscope, "load", lambda *a, **k: pytest.fail("loaded a model"), raising=False)
    with pytest.raises(SystemExit, match=msg):
        intervene_cli.run(_args(argv))


def test_out_must_be_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="not a folder"):
        intervene_cli.validate(_args(["lofit", "--out", str(f)]))


def test_parse_heads():
    assert intervene_cli._parse_heads("L18H6, L1H0") == [(18, 6), (1, 0)]
    assert intervene_cli._parse_heads("scores/retrieval") is None


@pytest.mark.slow
def test_lofit_cli_round_trip_on_smollm2(smollm2, tmp_path, monkeypatch):
    import headscope
    from headscope.interventions import load_edits, tasks
    monkeypatch.setattr(headscope, "load", lambda *a, **k: smollm2)
    out = tmp_path / "lofit"
    args = _args(["lofit", "--out", str(out), "--n-train", "8", "--n-test", "8", "--n-random", "1",
                  "--epochs", "1", "--k", "2", "--other-task", "none"])
    assert intervene_cli.run(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["condition"] for r in res["rows"]] == ["base", "LoFiT top-2", "random-2"]
    assert res["rows"][1]["trained_params"] == 2 * smollm2.cfg.d_head
    edits = load_edits(out)
    test = tasks.load_task("sentiment", smollm2).splits(0, n_train=8, n_calibration=0, n_test=8)["test"]
    ok, _ = tasks.score_examples(smollm2, test, edits)
    assert ok.float().mean().item() == pytest.approx(res["rows"][1]["accuracy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lofit"]          # no temp folder left
