"""The documentation site builds with ``mkdocs build --strict`` (every mkdocstrings reference
resolves) and names every analyzer and every CLI command."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("__init__.py", "probe", "heads", "circuits", "interventions", "app", "kernels")


def _griffe_root(tmp: Path) -> Path:
    """mkdocstrings reads the sources statically: give it a folder `headscope/` holding the package's
    parts only (the repo root itself also holds .venv, whose scan takes minutes)."""
    pkg = tmp / "headscope"
    pkg.mkdir(parents=True)
    for name in PACKAGES:
        (pkg / name).symlink_to(ROOT / name)
    return tmp


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is not installed: pip install -e '.[docs]'"
    griffe = ROOT / "out" / "griffe"
    shutil.rmtree(griffe, ignore_errors=True)
    _griffe_root(griffe)
    site = tmp_path / "site"
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (site / "index.html").exists()
    api = (site / "api" / "probe" / "index.html").read_text()
    assert "HookedModel" in api and "run_with_cache" in api      # mkdocstrings rendered the docstrings


def test_docs_name_every_analyzer_and_command():
    from headscope.heads import ANALYZERS
    text = (ROOT / "docs" / "analyzers.md").read_text()
    missing = [n for n in ANALYZERS if f"## `{n}`" not in text]
    assert not missing, f"docs/analyzers.md lacks a section for {missing}"
    cli = (ROOT / "docs" / "cli.md").read_text()
    for cmd in re.findall(r"`headscope (\w+)", (ROOT / "README.md").read_text()):
        assert f"headscope {cmd}" in cli, f"docs/cli.md does not document `headscope {cmd}`"


def test_no_citation_of_a_file_users_do_not_have():
    """Docstrings, the report, the docs and REPORTS.md cite papers (and sections), never the
    project's internal methods notes."""
    folders = ("probe", "heads", "circuits", "interventions", "app", "kernels", "docs", "reports", "experiments")
    files = [ROOT / "README.md", ROOT / "REPORTS.md", ROOT / "BENCHMARKS.md"]
    for folder in folders:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".html", ".txt")]
    bad = [str(p.relative_to(ROOT)) for p in files if p.is_file() and "methods.md" in p.read_text(errors="ignore")]
    assert not bad, f"these cite methods.md, which users do not have: {bad}"
