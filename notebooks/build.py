"""Build the notebooks from their sources and run them, saving the outputs.

    python notebooks/build.py            # every notebook
    python notebooks/build.py 01 03      # the ones whose name starts with 01 / 03

Each notebook is written as a percent-format script in ``notebooks/src/NAME.py``: ``# %%`` starts a
code cell, ``# %% [markdown]`` a markdown cell (its lines start with ``# ``). This turns them into
``notebooks/NAME.ipynb`` and executes them in a fresh kernel (nbclient), so the committed notebooks
hold the outputs of a real run. Cells that need a GPU check ``torch.cuda.is_available()`` themselves
and say when they skip. The notebooks assert the numbers they claim, so a run that contradicts the
text fails.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def parse(text: str) -> nbformat.NotebookNode:
    """A percent-format script -> a notebook (cells in order, no outputs)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines)
            nb.cells.append(nbformat.v4.new_markdown_cell(body))
        else:
            nb.cells.append(nbformat.v4.new_code_cell("\n".join(lines)))
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in the repository root."""
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE.parent)}})
    client.execute()
    return nb


def build(name: str, out_dir: Path = HERE) -> Path:
    src = SRC / f"{name}.py"
    nb = execute(parse(src.read_text()))
    out = out_dir / f"{name}.ipynb"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".ipynb", dir=out_dir)
    os.close(fd)
    try:
        nbformat.write(nb, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main(argv=None) -> int:
    want = (argv if argv is not None else sys.argv[1:])
    names = sorted(p.stem for p in SRC.glob("*.py"))
    if want:
        names = [n for n in names if any(n.startswith(w) for w in want)]
    for n in names:
        print(f"running {n} ...", flush=True)
        print(f"  wrote {build(n)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
