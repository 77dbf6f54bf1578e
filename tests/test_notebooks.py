"""Every notebook runs top to bottom on the CPU (its cells assert the numbers its text claims), and
the committed notebook (with the outputs of a real run) was built from its current source."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
spec = importlib.util.spec_from_file_location("nb_build", NB / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
NAMES = sorted(p.stem for p in (NB / "src").glob("*.py"))


def test_there_are_notebooks():
    assert len(NAMES) >= 5, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name):
    import nbformat
    committed = NB / f"{name}.ipynb"
    assert committed.exists(), f"run `python notebooks/build.py {name}` and commit {committed.name}"
    nb = nbformat.read(committed, as_version=4)
    fresh = build.parse((NB / "src" / f"{name}.py").read_text())
    assert [c.source for c in nb.cells] == [c.source for c in fresh.cells], \
        f"{committed.name} is stale: rebuild it with `python notebooks/build.py {name}`"
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in ran), f"{committed.name} was not executed"
    errors = [o for c in ran for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors[:1]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    nb = build.execute(build.parse((NB / "src" / f"{name}.py").read_text()))
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, f"{name} shows no figure"
