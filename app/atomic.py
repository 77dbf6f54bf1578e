"""Write files and folders whole or not at all: a temporary sibling, then ``os.replace``.

Used by every command that writes files (``headscope report``, ``headscope score --out``): an
interrupted run or a full disk leaves the previous output untouched and no temporary files behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written (the message says why and what to do)."""


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def _held(folder: Path):
    """Hold an exclusive advisory lock on ``folder`` while the block runs (POSIX; elsewhere a
    no-op): a temporary folder whose lock can be taken belongs to a run that is gone."""
    try:
        import fcntl
    except ImportError:          # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_orphans(parent: Path, name: str) -> list[Path]:
    """Remove ``.{name}.tmp-*`` / ``.{name}.old-*`` folders in ``parent`` left by a run that was
    killed (their lock is free); folders of a run still going (locked) are kept."""
    try:
        import fcntl
    except ImportError:          # pragma: no cover - Windows
        return []
    removed = []
    for p in parent.glob(f".{name}.*-*"):
        if not p.is_dir() or not p.name.startswith((f".{name}.tmp-", f".{name}.old-")):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue                                   # a live run holds it
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, what: str) -> None:
    """The parent of ``path`` is a folder we can write in (made if missing): proven by creating and
    removing a temporary folder there, since permission bits say little (root, read-only mounts)."""
    parent = path.parent
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, so the folder {parent} cannot be made")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{path.name}.check-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {parent} ({e.strerror or e}); "
                          "choose a folder you can write to") from None


def check_out_folder(out, marker: str = "scores.json") -> Path:
    """Check, before any work, that the folder ``out`` can be written whole: not a file, its parent
    writable (or makeable), and if it exists, empty or an earlier output (holding ``marker``) that
    may be replaced. Returns the absolute path."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    if out == Path(out.anchor) or out == Path.home().absolute() or out == Path.cwd():
        raise OutputError(f"--out {out} would replace a whole folder you work in; give a new sub-folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise OutputError(f"--out {out} exists, is not empty and holds no {marker} (so it is no earlier "
                          "output of this command); choose a new or empty folder")
    _check_parent(out, "--out")
    return out


def check_out_files(paths) -> list[Path]:
    """Check, before any work, that each of ``paths`` can be written as a file (not a folder, its
    parent writable or makeable). Returns the absolute paths."""
    out = []
    for p in paths:
        p = Path(p).expanduser().absolute()
        if p.is_dir():
            raise OutputError(f"--out {p} is a folder; give a file path")
        _check_parent(p, "--out")
        out.append(p)
    return out


@contextlib.contextmanager
def staged_folder(out):
    """Yield a temporary folder beside ``out``; when the block ends normally it replaces ``out``
    whole (an earlier ``out`` is moved aside, then deleted: files are never mixed). When the block
    raises (a failure, a full disk, Ctrl-C), the temporary folder is removed and ``out`` is untouched."""
    out = Path(out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _held(tmp):                               # held through the renames below
            yield tmp
            os.chmod(tmp, _umask_mode(0o777))          # mkdtemp makes 0700; give the usual folder mode
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                try:
                    with _held(old):
                        os.replace(out, old / "previous")
                        try:
                            os.replace(tmp, out)
                        except BaseException:
                            os.replace(old / "previous", out)     # put the earlier output back
                            raise
                finally:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_files(targets):
    """Yield a temporary folder beside the files ``targets`` (all in one folder); each file written
    there under its target's name is renamed onto its target when the block ends normally, after
    all of them were written. On an exception nothing is renamed and the temporary folder is removed."""
    targets = [Path(t).expanduser().absolute() for t in targets]
    parent = targets[0].parent
    if any(t.parent != parent for t in targets):
        raise ValueError("staged_files: all targets must lie in one folder")
    parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(parent, targets[0].name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{targets[0].name}.tmp-", dir=parent))
    try:
        with _held(tmp):
            yield tmp
            missing = [t.name for t in targets if not (tmp / t.name).exists()]
            if missing:
                raise FileNotFoundError(f"nothing was written for {', '.join(missing)}")
            for t in targets:
                os.chmod(tmp / t.name, _umask_mode(0o666))
                os.replace(tmp / t.name, t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
