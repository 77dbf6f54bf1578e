"""Bad inputs at the file boundary (issue 8): model names and folders, the converted-model cache,
the CLI's arguments and output folders. Each test asserts the error type (or exit code), a
fragment of the message, and that no partial file or temporary folder is left behind."""
import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import headscope as hs
from headscope.probe import loading
from headscope.probe.tiny import tiny_model


def _tokenizer():
    """A small word-level fast tokenizer over tiny-llama's 128 ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_tiny_folder(folder: Path, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model("tiny-llama").save_pretrained(folder)
    if tokenizer:
        _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama-folder")


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


# ------------------------------------------------------------------ model names and folders
def test_local_folder_loads_with_its_tokenizer(tiny_folder):
    m = hs.load(str(tiny_folder))
    assert m.tokenizer is not None and m.cfg.n_layers == 3
    ref = tiny_model("tiny-llama")
    x = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x).logits)


def test_unknown_model_name():
    with pytest.raises(hs.ModelNotFound, match="unknown model 'no-such-model'.*never downloads"):
        hs.load("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(hs.ModelNotFound, match="no such file or folder") as e:
        hs.load(str(tmp_path / "not-there"))
    assert "hub id" not in str(e.value)
    with pytest.raises(hs.ModelNotFound, match="never downloads weights"):
        hs.load("HuggingFaceTB/SmolLM2-135M")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(hs.ModelNotFound, match="holds no config.json"):
        hs.load(str(tmp_path))
    with pytest.raises(hs.ModelNotFound, match="is a file, not a model"):
        hs.load(str(tmp_path / "notes.txt"))


def test_folder_with_config_but_no_weights(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    with pytest.raises(hs.ModelNotFound, match="no weights"):
        hs.load(str(tmp_path))


def test_folder_with_broken_config(tmp_path, tiny_folder):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(loading.ModelLoadError, match="config.json is not valid JSON"):
        hs.load(str(folder))


def test_broken_tokenizer_is_an_error_naming_the_folder(tmp_path, tiny_folder):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer.json").write_text("{broken")
    with pytest.raises(loading.ModelLoadError, match=f"tokenizer files in {folder}.*do not load"):
        hs.load(str(folder))


def test_folder_without_tokenizer_loads_with_a_warning(tmp_path, caplog):
    folder = write_tiny_folder(tmp_path / "m", tokenizer=False)
    with caplog.at_level(logging.WARNING, logger="headscope"):
        m = hs.load(str(folder))
    assert m.tokenizer is None
    assert any("holds no tokenizer files" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ the converted-model cache
class FakeEmbedded(loading.Embedded):
    """An embedded model whose 'GGUF' is a small file and whose conversion writes tiny-llama."""
    def gguf_path(self):
        return Path(self.package)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADSCOPE_CACHE", str(cache))
    src = tmp_path / "src.gguf"
    src.write_bytes(b"gguf" * 8)
    monkeypatch.setitem(loading.EMBEDDED, "fakemodel", FakeEmbedded("fakemodel", str(src), "pip install x", "x/y"))
    calls = []

    def convert(gguf, folder):
        calls.append(folder)
        write_tiny_folder(folder)
    monkeypatch.setattr(loading, "convert_gguf", convert)
    return cache, calls


def test_cache_manifest_covers_every_file(fake_cache):
    cache, calls = fake_cache
    hs.load("fakemodel")
    entry = cache / "fakemodel-v1"
    info = json.loads((entry / "headscope.json").read_text())
    on_disk = {p.name for p in entry.iterdir()} - {"headscope.json"}
    assert set(info["files"]) == on_disk and {"config.json", "model.safetensors", "tokenizer.json"} <= on_disk
    hs.load("fakemodel")
    assert len(calls) == 1                                     # verified, not converted again
    assert not _leftovers(cache)


@pytest.mark.parametrize("damage", ["config", "tokenizer", "weights", "missing", "extra", "old-manifest"])
def test_corrupt_cache_entry_is_reconverted(fake_cache, caplog, damage):
    cache, calls = fake_cache
    hs.load("fakemodel")
    entry = cache / "fakemodel-v1"
    if damage == "config":             # an edited config would load a truncated model with exit 0
        cfg = json.loads((entry / "config.json").read_text())
        cfg["num_hidden_layers"] = 1
        (entry / "config.json").write_text(json.dumps(cfg))
    elif damage == "tokenizer":
        (entry / "tokenizer.json").write_text("{broken")
    elif damage == "weights":
        with open(entry / "model.safetensors", "r+b") as f:
            f.seek(-1, 2)
            b = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([b[0] ^ 1]))
    elif damage == "missing":
        (entry / "tokenizer_config.json").unlink()
    elif damage == "extra":
        (entry / "generation_config.json").write_text("{}") if not (entry / "generation_config.json").exists() \
            else (entry / "chat_template.jinja").write_text("{{ x }}")
    else:                              # a manifest written by an older headscope (weights only)
        info = json.loads((entry / "headscope.json").read_text())
        (entry / "headscope.json").write_text(json.dumps({k: v for k, v in info.items() if k != "files"}))
    with caplog.at_level(logging.WARNING, logger="headscope"):
        m = hs.load("fakemodel")
    assert len(calls) == 2
    why = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(why) == 1, why
    frag = {"config": "config.json does not match", "tokenizer": "tokenizer.json does not match",
            "weights": "model.safetensors does not match", "missing": "tokenizer_config.json is missing",
            "extra": "does not list", "old-manifest": "predates"}[damage]
    assert frag in why[0]
    assert m.cfg.n_layers == 3 and m.tokenizer is not None
    assert loading.check_entry(entry, loading.EMBEDDED["fakemodel"].gguf_path()) is None
    assert not _leftovers(cache)


def test_interrupted_conversion_keeps_old_entry_and_leaves_no_temp(fake_cache, monkeypatch):
    cache, calls = fake_cache
    hs.load("fakemodel")
    entry = cache / "fakemodel-v1"
    (entry / "config.json").write_text((entry / "config.json").read_text() + " ")   # invalid now
    before = {p.name: p.read_bytes() for p in entry.iterdir()}

    def dies(gguf, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        hs.load("fakemodel")
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before     # old entry untouched
    assert not _leftovers(cache)


def test_stale_temp_folders_are_removed_on_next_load(fake_cache):
    cache, calls = fake_cache
    cache.mkdir(parents=True)
    orphan = cache / ".fakemodel-v1.converting-abc123"      # a conversion killed by SIGKILL
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"x" * 1000)
    old_style = cache / ".fakemodel-ab12cd34"                # left by an older headscope, 2 hours ago
    old_style.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(old_style, (two_hours_ago, two_hours_ago))
    recent = cache / ".fakemodel-zz99yy88"                   # maybe a conversion running right now
    recent.mkdir()
    other = cache / ".fakemodel-refusal-0123456789ab"        # someone else's temp folder
    other.mkdir()
    os.utime(other, (two_hours_ago, two_hours_ago))
    hs.load("fakemodel")
    assert not orphan.exists() and not old_style.exists()
    assert recent.exists() and other.exists()


# ------------------------------------------------------------------ the CLI: arguments before the model
from headscope.app import cli  # noqa: E402
from headscope.heads import HeadScores  # noqa: E402


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI loads a model."""
    def boom(*a, **k):
        raise AssertionError("the CLI loaded a model before checking its arguments")
    monkeypatch.setattr(hs, "load", boom)


def _run(capsys, argv):
    try:
        code = cli.main(argv)
    except SystemExit as e:          # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, fragment", [
    (["score", "sinks", "--param", "n_tokens=abc"], "n_tokens=abc: expected int"),
    (["score", "sinks", "--param", "eps=fast"], "eps=fast: expected float"),
    (["score", "sinks", "--param", "prepend_bos=maybe"], "expected bool"),
    (["score", "retrieval", "--param", "lengths=[1,"], "expected tuple or NoneType"),
    (["score", "sinks", "--param", "no_such=1"], "unknown parameter 'no_such' for sinks; its parameters: eps"),
    (["score", "sinks", "--param", "n_tokens"], "expects KEY=VALUE"),
    (["score", "no_such_method"], "unknown analyzer 'no_such_method'; available:"),
    (["score", "sinks", "--top", "0"], "expected a positive integer"),
    (["score", "sinks", "--device", "gpu7"], "is not a device"),
    (["report", "--out", "x", "--only", "sinks,bogus"], "unknown analyzer(s) bogus"),
    (["explore", "--port", "99999"], "port number"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_argument_is_one_line_exit_2_before_loading(capsys, no_load, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out
    assert not list(tmp_path.iterdir())                       # nothing written


def test_param_values_are_typed():
    from headscope.heads import ANALYZERS
    p = cli.parse_params(ANALYZERS["retrieval"], ["lengths=200,400", "depths=[0, 50]", "needles=None",
                                                  "chat=false", "rouge_gate=0.25", "batch_size=2"])
    assert p == {"lengths": (200, 400), "depths": (0, 50), "needles": None, "chat": False,
                 "rouge_gate": 0.25, "batch_size": 2}
    assert cli.parse_params(ANALYZERS["sinks"], ["eps=1"]) == {"eps": 1.0}
    with pytest.raises(cli.UsageError, match="expected int"):
        cli.parse_params(ANALYZERS["sinks"], ["n_tokens=2.5"])
    with pytest.raises(cli.UsageError, match="expected float"):
        cli.parse_params(ANALYZERS["sinks"], ["eps=inf"])


def test_help_is_fast_and_imports_no_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = ("import sys, headscope.app.cli as c\n"
            "heavy = [m for m in ('torch', 'transformers', 'streamlit', 'plotly') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    for argv in (["--help"], ["score", "--help"], ["report", "--help"], ["explore", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "headscope.app.cli", *argv],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "usage: headscope" in r.stdout
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()}
        assert "torch" not in imported and "transformers" not in imported


# ------------------------------------------------------------------ output folders, written whole
def test_out_is_checked_before_loading(capsys, no_load, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", str(afile)])
    assert code == 2 and "is a file; give a folder" in err
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", str(mine)])
    assert code == 2 and "is not empty and holds no scores.json" in err
    code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", str(afile / "sub" / "out")])
    assert code == 2 and "cannot be made" in err
    (tmp_path / "x.json").mkdir()
    code, _, err = _run(capsys, ["score", "sinks", "--model", "tiny-llama", "--out", str(tmp_path / "x")])
    assert code == 2 and "x.json is a folder; give a file path" in err
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:   # root writes anyway: a path under /proc instead
            target = "/proc/headscope-no/out"
        else:
            target = str(ro / "out")
        code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", target])
        assert code == 2 and "cannot write in" in err
    finally:
        ro.chmod(0o700)
    assert afile.read_text() == "keep me" and [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "my-notes", "read-only", "x.json"]
    assert not [p for p in tmp_path.rglob(".*")]


def _fake_results():
    return {n: HeadScores(scores=torch.rand(3, 4, generator=torch.Generator().manual_seed(i)), method=n,
                          model={"name": "tiny-llama"}, paper="a paper", description="what it means")
            for i, n in enumerate(("sinks", "previous_token"))}


def test_report_failed_analyzer_exit_1_listed_and_rerun_replaces_whole(capsys, tmp_path, monkeypatch, tiny_folder):
    """Real analyzers on a tiny model: previous_token and duplicate_token run; sinks is made to fail."""
    from headscope.heads import ANALYZERS
    out = tmp_path / "rep"

    def fails(self, model, data=None, progress=True):
        raise RuntimeError("sinks broke on purpose")
    code, _, err = _run(capsys, ["report", "--model", str(tiny_folder), "--out", str(out),
                                 "--only", "previous_token,duplicate_token"])
    assert code == 0, err
    assert (out / "raw" / "duplicate_token.json").exists()
    monkeypatch.setattr(ANALYZERS["sinks"], "score", fails)
    code, _, err = _run(capsys, ["report", "--model", str(tiny_folder), "--out", str(out),
                                 "--only", "previous_token,sinks"])
    assert code == 1
    assert "1 of 2 analyzers failed" in err and "sinks: RuntimeError: sinks broke on purpose" in err
    summary = json.loads((out / "scores.json").read_text())
    assert set(summary["analyzers"]) == {"previous_token"} and "sinks" in summary["errors"]
    html = (out / "report.html").read_text()
    assert "Failed analyzers" in html and "sinks broke on purpose" in html and "sinks — FAILED" in html
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["previous_token.json", "previous_token.safetensors"]
    assert not [p for p in tmp_path.rglob(".*")]


@pytest.mark.parametrize("where", ["report.html", "safetensors"])
def test_report_full_disk_leaves_earlier_report_and_no_temp(capsys, tmp_path, monkeypatch, where):
    import pathlib

    import safetensors.torch

    from headscope.app import report
    out = tmp_path / "rep"
    monkeypatch.setattr(report, "run_analyzers", lambda model, names, **kw: (_fake_results(), {}))
    code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", str(out)])
    assert code == 0, err
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 6

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if where == "report.html":
        real = pathlib.Path.write_text
        monkeypatch.setattr(pathlib.Path, "write_text",
                            lambda self, *a, **k: enospc() if self.name == "report.html" else real(self, *a, **k))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", str(out)])
    assert code == 1 and "No space left on device" in err and "nothing was written" in err
    assert len(err.strip().splitlines()) == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob(".*")]
    new = tmp_path / "new"                                   # and with no earlier report: nothing at all
    code, _, err = _run(capsys, ["report", "--model", "tiny-llama", "--out", str(new)])
    assert code == 1 and not new.exists() and not [p for p in tmp_path.rglob(".*")]


def test_score_out_full_disk_writes_neither_file(capsys, tmp_path, monkeypatch):
    import pathlib

    from headscope.heads import ANALYZERS
    res = _fake_results()["sinks"]
    monkeypatch.setattr(ANALYZERS["sinks"], "score", lambda self, model, data=None, progress=True: res)
    code, out, err = _run(capsys, ["score", "sinks", "--model", "tiny-llama", "--out", str(tmp_path / "s")])
    assert code == 0 and (tmp_path / "s.json").exists() and (tmp_path / "s.safetensors").exists()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = pathlib.Path.write_text

    def full(self, *a, **k):       # the .json is written after the .safetensors: fail there
        if ".json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    code, _, err = _run(capsys, ["score", "sinks", "--model", "tiny-llama", "--out", str(tmp_path / "s")])
    assert code == 1 and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before      # old pair intact, no temp
    code, _, err = _run(capsys, ["score", "sinks", "--model", "tiny-llama", "--out", str(tmp_path / "t.json")])
    assert code == 1 and not list(tmp_path.glob("t.*")) and not [p for p in tmp_path.rglob(".*")]


def test_broken_model_folder_exit_1_one_line(capsys, tmp_path, tiny_folder):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer.json").write_text("{broken")
    code, _, err = _run(capsys, ["score", "previous_token", "--model", str(folder)])
    assert code == 1 and "do not load" in err and str(folder) in err and "Traceback" not in err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "Loading weights" not in l]
    assert len(lines) == 1, lines                  # (transformers' own progress bar aside)


def test_intervene_out_checked_before_loading(capsys, no_load, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    code, _, err = _run(capsys, ["intervene", "lofit", "--out", str(mine)])
    assert code == 2 and "holds no results.json" in err


def test_unknown_model_and_missing_path_exit_2(capsys, tmp_path):
    code, _, err = _run(capsys, ["score", "previous_token", "--model", "no-such-model"])
    assert code == 2 and "unknown model 'no-such-model'" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, ["score", "previous_token", "--model", str(tmp_path / "gone")])
    assert code == 2 and "no such file or folder" in err


def test_orphans_of_a_killed_report_are_removed_live_ones_kept(tmp_path):
    """A report killed by SIGKILL leaves `.OUT.tmp-*` beside --out; the next write to that --out
    removes it (its lock is free) but keeps the folder of a run still going (locked)."""
    import fcntl

    from headscope.app.atomic import staged_folder
    orphan = tmp_path / ".rep.tmp-dead1234"
    orphan.mkdir()
    (orphan / "scores.json").write_text("{}")
    live = tmp_path / ".rep.tmp-live5678"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / ".other.tmp-abcd1234"            # another output's temp folder: not ours
    other.mkdir()
    try:
        with staged_folder(tmp_path / "rep") as stage:
            (stage / "scores.json").write_text("{}")
        assert not orphan.exists() and live.exists() and other.exists()
        assert (tmp_path / "rep" / "scores.json").exists()
    finally:
        os.close(fd)


def test_report_killed_midway_leaves_earlier_report(tmp_path):
    """SIGKILL while the report is being written: the earlier report is whole; the orphan goes on
    the next run."""
    import signal
    out = tmp_path / "rep"
    code = (
        "import sys, time, headscope as hs\n"
        "from headscope.app.report import write_report\n"
        "from headscope.heads import HeadScores\n"
        "import torch\n"
        "m = hs.load('tiny-llama')\n"
        "r = {'sinks': HeadScores(scores=torch.ones(3, 4), method='sinks', model={'name': 'tiny-llama'})}\n"
        f"write_report(m, r, {{}}, {str(out)!r})\n"
        "import headscope.heads.scores as S\n"
        "real = HeadScores.save\n"
        "def slow(self, path):\n"
        "    real(self, path); print('WRITING', flush=True); time.sleep(60)\n"
        "HeadScores.save = slow\n"
        f"write_report(m, r, {{}}, {str(out)!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert [p.name for p in tmp_path.glob(".rep.tmp-*")]        # the run's temp folder, mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert len(before) == 4
    from headscope.app.atomic import remove_orphans
    assert len(remove_orphans(tmp_path, "rep")) == 1 and not [p for p in tmp_path.rglob(".*")]
