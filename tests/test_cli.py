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
