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
    with pytest.raises(hs.ModelNotFound, match="no such file or folder"):
        hs.load(str(tmp_path / "not-there"))


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
