"""The report's summary and presets, `headscope show` / `headscope compare`, and HeadScores.export
into the formats of Retrieval_Head and DuoAttention. Tiny models and tiny reports made here."""
import json

import numpy as np
import pytest
import torch

import headscope as hs
from headscope.app import report as rep
from headscope.app import tables
from headscope.app.cli import main
from headscope.heads import ANALYZERS, HeadScores


def _hs(method, scores, **kw):
    return HeadScores(scores=scores, method=method, model={"name": "planted", "n_layers": scores.shape[0],
                                                           "n_heads": scores.shape[1], "n_kv_heads": 2}, **kw)


def _planted():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 4, generator=g) * 0.1
    b = torch.rand(6, 4, generator=g) * 0.1
    a[3, 2] = 5.0                       # stands out in a and b
    b[3, 2] = 4.0
    b[0, 1] = 4.0                       # stands out in b only
    return {"a": _hs("a", a), "b": _hs("b", b), "flat": _hs("flat", torch.ones(6, 4))}


def test_summary_classes_and_ties():
    res = _planted()
    cls, names = rep.head_classes(res)
    assert names == ["a", "b", "flat"]
    assert cls[3, 2] == 0 and cls[0, 1] == 1 and int((cls >= 0).sum()) == 2     # the rest: none (-1)
    lines = rep.summary_lines(res)
    assert lines[0].startswith("1 head(s) stand out") and lines[1].startswith("L3 H2 stands out in a (5")
    assert "and b (4" in lines[1]
    assert any(l.startswith("flat: 24 heads tie at the top score 1") for l in lines)
    assert rep.tie_note(res["a"]) == ""
    fig = rep.combined_map(res)
    z = np.array(fig.data[0].z)
    assert z[3, 2] == 1 and z[0, 1] == 2 and z[5, 3] == 0                     # 0 = "none" (grey)
    assert list(fig.data[0].colorbar.ticktext) == ["none", "a", "b", "flat"]
    scale = fig.data[0].colorscale
    assert scale[0][1] == rep.NONE_COLOUR and len({c for _, c in scale}) == 4  # one colour per class


def test_thresholds_printed_sensibly():
    r = _hs("s", torch.tensor([[0.1, 0.2], [0.3, 0.4]]), threshold=0.254321987, params={"split_threshold": 0.254321987,
                                                                                       "sparsity": 0.5})
    assert rep.threshold_line(r) == "2 of 4 heads (50.0%) score above the split threshold at sparsity 0.5 (0.254)."
    assert "the paper's threshold (0.3)" in rep.threshold_line(_hs("t", torch.rand(2, 2), threshold=0.3))


def test_presets_and_estimate():
    for n, cls in ANALYZERS.items():
        assert rep.make_analyzer(n, "paper").params() == cls.paper_config().params()
        assert rep.make_analyzer(n, "quick").params() == cls.quick().params()
    assert "duo" not in rep.default_names("quick") and "duo" in rep.default_names("paper")
    cfg = {"n_layers": 30, "d_model": 576, "max_ctx": 8192, "n_heads": 9}
    q, p = rep.estimate_seconds(cfg, ["sinks", "induction", "retrieval"], "quick"), \
        rep.estimate_seconds(cfg, ["sinks", "induction", "retrieval"], "paper")
    assert q["sinks"] == pytest.approx(rep.QUICK_SECONDS_SMOLLM2["sinks"])
    assert p["sinks"] == pytest.approx(5 * q["sinks"])                     # 100 vs 20 samples of 64 tokens
    assert p["induction"] > 10 * q["induction"] and p["retrieval"] > 100 * q["retrieval"]
    big = rep.estimate_seconds({**cfg, "d_model": 1152}, ["sinks"], "quick")
    assert big["sinks"] == pytest.approx(4 * q["sinks"])
    with pytest.raises(ValueError, match="unknown preset"):
        rep.make_analyzer("sinks", "slow")


def test_paper_estimate_warns_on_cpu_and_is_labelled_on_gpu(capsys):
    """The paper preset's CPU estimate (days for SmolLM2) comes with a warning on a CPU; on a GPU the
    printed figure is labelled as one CPU thread's, not the GPU's run time."""
    from headscope.app.cli import print_estimate
    import headscope as hs
    m = hs.load("tiny-llama")
    names = rep.default_names("paper")
    print_estimate(m, names, "paper", "cpu")
    o = capsys.readouterr().out
    assert "warning: the paper preset takes about" in o and "--device cuda" in o
    print_estimate(m, names, "paper", "cuda")
    o = capsys.readouterr().out
    assert "on one CPU thread" in o and "no estimate exists" in o and "warning" not in o
    print_estimate(m, names, "quick", "cpu")
    assert "warning" not in capsys.readouterr().out


def test_report_quick_leaves_out_duo_says_why_and_prints_estimate(capsys, tmp_path, monkeypatch):
    seen = {}

    def fake(model, names, **kw):
        seen.update(names=names, **kw)
        L, H = model.cfg.n_layers, model.cfg.n_heads
        return {"sinks": HeadScores(scores=torch.rand(L, H), method="sinks", model=model.cfg.to_dict(),
                                    info={"greedy": ["an output"]}, params={"n": 1})}, {}
    monkeypatch.setattr(rep, "run_analyzers", fake)
    out = tmp_path / "rep"
    assert main(["report", "--model", "tiny-llama", "--out", str(out)]) == 0
    o = capsys.readouterr().out
    assert "estimated run time, preset quick: about" in o and "an estimate" in o
    assert "not run in the quick report: duo" in o
    assert "duo" not in seen["names"] and seen["preset"] == "quick"
    html = (out / "report.html").read_text()
    assert "Not in this report" in html and "12 steps" in html and "id='summary'" in html
    assert "HeadScores.info" in html and "an output" in html                 # outputs apart from the parameters
    s = json.loads((out / "scores.json").read_text())
    assert s["preset"] == "quick" and "duo" in s["skipped"]
    assert main(["report", "--model", "tiny-llama", "--out", str(out), "--preset", "paper", "--only", "duo"]) == 0
    assert seen["names"] == ["duo"] and seen["preset"] == "paper"
    assert "preset paper" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:                                    # argparse: one line, exit 2
        main(["report", "--model", "tiny-llama", "--out", str(out), "--preset", "fast"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Two runs of tiny-llama on different random tokens, and one of tiny-qwen2."""
    base = tmp_path_factory.mktemp("reports")
    out = {}
    for key, name, seed in (("a", "tiny-llama", 0), ("b", "tiny-llama", 1), ("q", "tiny-qwen2", 0)):
        m = hs.load(name)
        x = torch.randint(1, 100, (2, 32), generator=torch.Generator().manual_seed(seed))
        res = {n: ANALYZERS[n]().score(m, data=x, progress=False) for n in ("sinks", "previous_token")}
        rep.write_report(m, res, {}, base / key)
        out[key] = (base / key, res)
    return out


def test_show_prints_tables_and_exports_csv(reports, capsys, tmp_path):
    folder, res = reports["a"]
    csv_path = tmp_path / "heads.csv"
    assert main(["show", str(folder), "--top", "3", "--csv", str(csv_path)]) == 0
    o = capsys.readouterr().out
    (l, h, v), = res["sinks"].top(1)
    assert "sinks — top 3" in o and f"L{l}H{h}" in o and "previous_token — top 3" in o
    rows = csv_path.read_text().splitlines()
    L, H = res["sinks"].shape
    assert rows[0] == "analyzer,layer,head,score,z,rank" and len(rows) == 1 + 2 * L * H
    first = rows[1].split(",")
    assert first[:3] == ["sinks", str(l), str(h)] and float(first[3]) == pytest.approx(v, rel=1e-5)
    assert main(["show", str(folder), "--only", "induction"]) == 2
    assert "not in" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "none")]) == 2


def test_compare_runs_and_models(reports, capsys):
    from scipy.stats import spearmanr
    (fa, ra), (fb, rb), (fq, rq) = reports["a"], reports["b"], reports["q"]
    from headscope.app.views import load_report
    res = tables.compare(load_report(fa), load_report(fb), k=4)
    assert res["mode"] == "runs"
    rho = spearmanr(ra["sinks"].scores.flatten().numpy(), rb["sinks"].scores.flatten().numpy()).statistic
    assert res["analyzers"]["sinks"]["spearman"] == pytest.approx(rho, abs=1e-6)
    ta = {(l, h) for l, h, _ in ra["sinks"].top(4)}
    tb = {(l, h) for l, h, _ in rb["sinks"].top(4)}
    assert res["analyzers"]["sinks"]["overlap"] == len(ta & tb) / 4
    assert tables.compare(load_report(fa), load_report(fa))["analyzers"]["sinks"]["spearman"] == pytest.approx(1.0)
    assert main(["compare", str(fa), str(fb), "--top", "4"]) == 0
    o = capsys.readouterr().out
    assert "two runs of tiny-llama" in o and "Spearman" in o and f"{rho:.3f}" in o
    res = tables.compare(load_report(fa), load_report(fq), k=3)
    assert res["mode"] == "models" and res["analyzers"]["sinks"]["top_b"] == rq["sinks"].top(3)
    assert main(["compare", str(fa), str(fq), "--top", "3"]) == 0
    o = capsys.readouterr().out
    assert "two models: tiny-llama (A) and tiny-qwen2 (B)" in o and "depth of the top heads" in " ".join(o.split())



def test_compare_same_model_under_another_name(reports, capsys, tmp_path):
    """--same-model: the same weights loaded from another folder (CPU vs GPU runs) compare as runs,
    with the largest difference absolute and relative; reports of different shapes are refused."""
    import json
    import shutil

    from headscope.app.views import load_report
    (fa, ra), (fb, rb), (fq, _) = reports["a"], reports["b"], reports["q"]
    other = tmp_path / "elsewhere"
    shutil.copytree(fb, other)
    summary = json.loads((other / "scores.json").read_text())
    summary["model"]["name"] = "a-copied-folder"
    (other / "scores.json").write_text(json.dumps(summary))
    assert tables.compare(load_report(fa), load_report(other))["mode"] == "models"
    res = tables.compare(load_report(fa), load_report(other), k=4, same=True)
    d = res["analyzers"]["sinks"]
    x, y = ra["sinks"].scores, rb["sinks"].scores
    assert res["mode"] == "runs" and d["max_abs_diff"] == pytest.approx(float((x - y).abs().max()))
    assert d["max_rel_diff"] == pytest.approx(d["max_abs_diff"] / float(torch.maximum(x.abs(), y.abs()).max()))
    assert main(["compare", str(fa), str(other), "--same-model"]) == 0
    o = " ".join(capsys.readouterr().out.split())
    assert "two runs of tiny-llama / a-copied-folder" in o and "relative" in o
    assert main(["compare", str(fa), str(fq), "--same-model"]) == 2
    assert "shapes differ" in capsys.readouterr().err


def test_export_retrieval_head_and_duo(tmp_path):
    g = torch.Generator().manual_seed(0)
    per_test = torch.rand(5, 3, 4, generator=g)                              # [test, layer, head]
    counted = torch.tensor([1, 0, 1, 1, 0], dtype=torch.uint8)
    r = _hs("retrieval", per_test[counted.bool()].mean(0), extra={"test_scores": per_test, "test_counted": counted})
    p = r.export(tmp_path / "head_score" / "m.json", format="retrieval_head")
    text = p.read_text()
    assert text.count("\n") == 1                                              # Retrieval_Head reads one line
    d = json.loads(text.splitlines()[0])
    assert len(d) == 12 and len(d["2-3"]) == 3
    for key, vals in d.items():                                               # readers take np.mean
        l, h = map(int, key.split("-"))
        assert np.mean(vals) == pytest.approx(float(r.scores[l, h]), abs=1e-6)
    plain = _hs("sinks", torch.rand(3, 4, generator=g))
    assert json.loads(plain.export(tmp_path / "s.json").read_text())["1-2"] == [pytest.approx(float(plain.scores[1, 2]))]

    f = plain.export(tmp_path / "duo", format="duo")                          # 2 KV heads of 2 query heads
    assert f.name == "full_attention_heads.tsv"
    arr = np.loadtxt(f, dtype=float, delimiter="\t")                          # as duo_attn.utils.load_attn_pattern
    assert arr.shape == (3, 2) and ((arr >= 0) & (arr <= 1)).all()
    np.testing.assert_allclose(arr, plain.scores.reshape(3, 2, 2).amax(-1).numpy(), atol=1e-6)
    cfg = json.loads((tmp_path / "duo" / "config.json").read_text())
    assert cfg["sink_size"] == 64 and cfg["recent_size"] == 256
    gates = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 0.0]])
    duo = _hs("duo", gates.repeat_interleave(2, 1), extra={"alpha_kv": gates}, params={"sink": 16, "recent": 64})
    duo.export(tmp_path / "d2" / "full_attention_heads.tsv", format="duo")
    np.testing.assert_allclose(np.loadtxt(tmp_path / "d2" / "full_attention_heads.tsv", delimiter="\t"), gates.numpy())
    assert json.loads((tmp_path / "d2" / "config.json").read_text())["sink_size"] == 16
    wide = _hs("ships", torch.tensor([[-1.0, 3.0, 0.0, 1.0], [-2.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    arr = np.loadtxt(wide.export(tmp_path / "d3", format="duo"), delimiter="\t")
    np.testing.assert_allclose(arr[0], [1.0, 0.5])                           # min-max scaled into [0, 1]
    with pytest.raises(ValueError, match="unknown export format"):
        plain.export(tmp_path / "x", format="snapkv")
