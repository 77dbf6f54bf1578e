"""Save and load a list of head edits: one folder with ``edits.json`` (types, layers, heads, plain
parameters, and any metadata) and ``edits.safetensors`` (every tensor parameter).

The folder is written next to its destination under a temporary name and renamed into place, so a
reader never sees half an edit file; an existing folder is replaced only after the new one is
complete. ``model.edit(load_edits(path))`` re-applies what ``save_edits`` stored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..probe import edits as probe_edits

FORMAT = "headscope-edits/1"


def _edit_types() -> dict[str, type]:
    return {name: obj for name, obj in vars(probe_edits).items()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj)
            and (issubclass(obj, probe_edits.OutputEdit) or hasattr(obj, "add_to"))}


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a new temporary folder beside ``path``; when the block ends without error it becomes
    ``path`` (an existing folder there is replaced only then), otherwise it is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_edits(folder, edits, meta: dict | None = None) -> None:
    """Write ``edits.json`` + ``edits.safetensors`` into the existing ``folder`` (not atomic on
    its own: use ``save_edits``, or ``atomic_folder`` to write more files beside them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    types = _edit_types()
    records, tensors = [], {}
    for i, ed in enumerate(edits):
        name = type(ed).__name__
        if name not in types or types[name] is not type(ed):
            raise TypeError(f"cannot save {ed!r}: not one of the probe's edits ({', '.join(sorted(types))})")
        rec = {"type": name, "fields": {}, "tensors": []}
        for f in dataclasses.fields(ed):
            v = getattr(ed, f.name)
            if isinstance(v, torch.Tensor):
                key = f"{i}.{f.name}"
                tensors[key] = v.detach().to("cpu", torch.float32).contiguous()
                rec["tensors"].append(f.name)
            else:
                rec["fields"][f.name] = _jsonable(v)
        records.append(rec)
    doc = {"format": FORMAT, "edits": records, "meta": meta or {}}
    (folder / "edits.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    save_file(tensors, str(folder / "edits.safetensors"))


def save_edits(path, edits, meta: dict | None = None) -> Path:
    """Write ``edits`` (a list of headscope edits) and ``meta`` (JSON-able) to the folder ``path``,
    atomically (a temporary folder renamed into place)."""
    with atomic_folder(path) as tmp:
        write_edits(tmp, edits, meta)
    return Path(path)


def _tuples(v):
    """JSON lists back to the tuples the edits hold (spans, head lists)."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v


def load_edits(path, with_meta: bool = False):
    """The edits saved in folder ``path`` (a list, ready for ``model.edit``); with
    ``with_meta=True`` also the stored metadata dict."""
    from safetensors.torch import load_file

    path = Path(path)
    js, st = path / "edits.json", path / "edits.safetensors"
    if not js.is_file() or not st.is_file():
        raise FileNotFoundError(f"{path} holds no saved edits (edits.json + edits.safetensors); "
                                "write them with save_edits or `headscope intervene ... --out DIR`")
    doc = json.loads(js.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{js}: format {doc.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(st))
    types = _edit_types()
    out = []
    for i, rec in enumerate(doc["edits"]):
        cls = types.get(rec["type"])
        if cls is None:
            raise ValueError(f"{js}: edit type {rec['type']!r} is unknown to this headscope version")
        kw = {k: _tuples(v) for k, v in rec["fields"].items()}
        for name in rec["tensors"]:
            kw[name] = tensors[f"{i}.{name}"]
        out.append(cls(**kw))
    return (out, doc.get("meta", {})) if with_meta else out
