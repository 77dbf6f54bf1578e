"""The `headscope` CLI: report writes complete files and nothing half-written; bad input is refused."""
import json

import pytest

from headscope.app.cli import main


def test_list_and_bad_inputs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("retrieval", "sinks", "induction", "ships", "preplan", "streaming"):
        assert name in out
    assert main(["score", "no_such_method", "--model", "tiny-llama"]) == 2
    assert "unknown analyzer" in capsys.readouterr().err
    assert main(["score", "sinks", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_smollm2(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--model", "smollm2", "--out", str(out), "--only", "previous_token,sinks"]) == 0
    html = (out / "report.html").read_text()
    assert "previous_token" in html and "Combined head map" in html and "Gu et al." in html
    summary = json.loads((out / "scores.json").read_text())
    assert set(summary["analyzers"]) == {"previous_token", "sinks"} and not summary["errors"]
    sc = summary["analyzers"]["sinks"]["scores"]
    assert len(sc) == 30 and len(sc[0]) == 9
    assert (out / "raw" / "sinks.safetensors").exists()
    assert not [p for p in out.rglob(".*")]          # no temporary files left behind


def test_intervene_and_circuit_are_wired_with_one_line_errors(capsys, tmp_path):
    """`headscope intervene` / `headscope circuit` hand their arguments to app/intervene_cli.py /
    app/circuit_cli.py; their checks (before any model loads) give one line and exit 2 like every
    other command, and --out is checked the same way as report's."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    out = str(tmp_path / "new")
    for argv, frag in ((["intervene", "lofit", "--task", "nope", "--out", out], "is not a shipped task"),
                       (["intervene", "lofit", "--k", "x", "--out", out], "invalid int value"),
                       (["intervene", "act", "--task", "context-qa", "--out", out], "act runs on"),
                       (["intervene", "lofit", "--out", str(notes)], "holds no results.json"),
                       (["circuit", "no-such-task", "--out", out], "unknown task"),
                       (["circuit", "ioi", "--out", str(notes)], "holds no circuit.json"),
                       (["circuit", "ioi", "--model", "no-such-model", "--out", out], "unknown model"),
                       # a model without a tokenizer cannot take the text tasks (was an AttributeError)
                       (["circuit", "ioi", "--model", "tiny-llama", "--out", out], "has no tokenizer")):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and frag in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_score_writes_scores_whole(tmp_path, capsys):
    """`score --out` on a tiny model with token data: PATH.json + PATH.safetensors, loadable, no temp."""
    import torch

    from headscope.heads import ANALYZERS, HeadScores
    x = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    real = ANALYZERS["previous_token"].score
    ANALYZERS["previous_token"].score = lambda self, model, data=None, progress=True: real(self, model, data=x,
                                                                                         progress=False)
    try:
        code = main(["score", "previous_token", "--model", "tiny-llama", "--top", "3", "--out", str(tmp_path / "pt")])
    finally:
        ANALYZERS["previous_token"].score = real
    out = capsys.readouterr().out
    assert code == 0 and len([l for l in out.splitlines() if l.startswith("L")]) == 3
    r = HeadScores.load(tmp_path / "pt.json")
    assert r.scores.shape == (3, 4) and r.method == "previous_token"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt.json", "pt.safetensors"]
