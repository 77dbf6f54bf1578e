"""`headscope intervene`: arguments checked before a model loads; small ACT and KV runs on
tiny-llama and a LoFiT run on SmolLM2 write folders whose edits re-apply with load_edits."""
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
    (["kv", "--frac", "0", "--out", "X"], "--frac"),
    (["kv", "--task", "sentiment", "--out", "X"], "kv runs on"),
    (["act", "--task", "context-qa", "--out", "X"], "act runs on"),
    (["var", "--task", "sentiment", "--out", "X"], "var runs on"),
    (["act", "--n-calibration", "1", "--out", "X"], "--n-calibration must be >= 2"),
    (["act", "--threshold", "5/M", "--out", "X"], "alpha/N"),
    (["var", "--tau", "big", "--out", "X"], "a number or 'auto'"),
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


def test_act_cli_on_tiny(tmp_path):
    """ACT on the synthetic copy task: a table with the base, ACT, random (3 sets) and all-heads rows
    with CIs; the edit file re-applies ACT as built for held-out example 0."""
    from headscope.interventions import act, load_edits
    out = tmp_path / "act"
    assert intervene_cli.run(_args(["act", "--model", "tiny-llama", "--task", "copy", "--n-calibration", "16",
                                    "--n-test", "12", "--n-random", "3", "--first-layer", "1",
                                    "--out", str(out)])) == 0
    res = json.loads((out / "results.json").read_text())
    names = [r["condition"] for r in res["rows"]]
    assert names[0] == "base" and len(res["rows"]) in (1, 4)
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in res["rows"])
    assert res["n_calibration"] == 16 and res["n_heldout"] == 12
    if res["kept_heads"]:
        assert res["rows"][2]["sets"] == 3 and res["rows"][2]["n_heads"] == len(res["kept_heads"])
    eds, meta = load_edits(out, with_meta=True)
    assert meta["method"] == "act"
    assert all(isinstance(e, hs_edits().ScaleKeys) for e in eds)
    assert {(e.layer, e.head) for e in eds} <= {tuple(h) for h in res["kept_heads"]}
    assert not list(tmp_path.glob(".act.*"))                           # no temporary folder left


def hs_edits():
    from headscope.probe import edits
    return edits


def test_kv_cli_on_tiny(tmp_path):
    """KV on synthetic key-value recall: streaming rows hold a smaller cache than the full one; the
    saved StreamingGate edits (the mask-only version) give the same tokens as the compressed cache."""
    import headscope as hs
    from headscope.interventions import kv_compress, load_edits
    out = tmp_path / "kv"
    assert intervene_cli.run(_args(["kv", "--model", "tiny-llama", "--task", "tokens", "--heads", "L1H0",
                                    "--sink", "4", "--recent", "8", "--n-test", "4", "--n-random", "2",
                                    "--max-new-tokens", "3", "--out", str(out)])) == 0
    res = json.loads((out / "results.json").read_text())
    full, cls, rnd = res["rows"]
    assert cls["cache_mb"] < full["cache_mb"] and rnd["sets"] == 2
    assert [1, 0] in res["kept_kv_groups"]                              # L1H0's KV group stays full
    assert all(g != 0 for g in res["stream"].get("1", []))
    m = hs.load("tiny-llama")
    stream = {int(k): v for k, v in res["stream"].items()}
    prompt = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(5))
    with m.edit(load_edits(out)):
        masked = m.generate(prompt[None], max_new_tokens=5)[0, 40:]
    new, _, _ = kv_compress.generate_compressed(m, prompt, stream, 4, 8, 5)
    assert torch.equal(new, masked)


def test_kv_cli_razor_preset_on_tiny(tmp_path):
    """--preset razor: RazorAttention's own retrieval set keeps the full cache, every other KV head
    streams with 4 sinks, max(4000, N/5) recent tokens and the compensation token; prompts of 97
    tokens lose nothing, so every test decodes as with the full cache. Explicit flags override."""
    out = tmp_path / "razor"
    assert intervene_cli.run(_args(["kv", "--model", "tiny-llama", "--task", "tokens", "--preset", "razor",
                                    "--n-test", "3", "--n-random", "0", "--max-new-tokens", "2",
                                    "--out", str(out)])) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["preset"], res["sink"], res["compensate"], res["frac"]) == ("razor", 4, True, 1.0)
    assert res["recent"] == "max(4000, N // 5) per prompt" and "RazorAttention" in res["heads_source"]
    keep = {tuple(g) for g in res["kept_kv_groups"]}
    stream = {(int(l), g) for l, gs in res["stream"].items() for g in gs}
    assert keep and not keep & stream and len(keep | stream) == 3 * 2        # tiny-llama: 3 layers x 2 KV heads
    full, cls = res["rows"]
    assert cls["accuracy"] == full["accuracy"]
    out2 = tmp_path / "razor8"
    assert intervene_cli.run(_args(["kv", "--model", "tiny-llama", "--task", "tokens", "--preset", "razor",
                                    "--recent", "8", "--no-compensate", "--heads", "L1H0", "--n-test", "2",
                                    "--n-random", "0", "--max-new-tokens", "2", "--out", str(out2)])) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert (res2["recent"], res2["compensate"], res2["heads_source"]) == (8, False, "--heads")
    assert res2["rows"][1]["cache_mb"] < res2["rows"][0]["cache_mb"]


def test_var_cli_needs_a_tokenizer(tmp_path):
    with pytest.raises(SystemExit, match="no tokenizer"):
        intervene_cli.run(_args(["var", "--model", "tiny-llama", "--out", str(tmp_path / "v")]))


@pytest.mark.slow
def test_var_cli_on_smollm2(smollm2, tmp_path, monkeypatch):
    """VAR on a few short context questions: base, VAR (all heads) and, when target-centric heads
    exist, the random control; the edit file is VAR for held-out example 0 (ScaleKeys towards its
    context span)."""
    import headscope
    from headscope.interventions import load_edits
    monkeypatch.setattr(headscope, "load", lambda *a, **k: smollm2)
    out = tmp_path / "var"
    assert intervene_cli.run(_args(["var", "--n-calibration", "3", "--n-test", "3", "--passages", "1",
                                    "--n-random", "1", "--batch-size", "4", "--out", str(out)])) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["condition"] for r in res["rows"]][:2] == ["base", "VAR, all heads of layers 2..28 (paper)"]
    assert res["massive_dims"] and res["tau"] == 20.0 and res["sinks_from"] == "edited"
    eds = load_edits(out)
    assert eds and all(type(e).__name__ == "ScaleKeys" and e.factor == 0.6 and e.max_ratio == 0.5 for e in eds)
    assert all(2 <= e.layer <= 28 for e in eds)
    # the saved edits keep the reference's query rows: only queries after the context change
    assert all(e.min_query == max(b for _, b in e.target) and e.min_query > 0 for e in eds)
