"""Every public name has a docstring (issue 12): module-level functions and classes without a leading
underscore, and the public methods of those classes, in each subpackage. Read statically with ``ast``
(nothing is imported), one test per subpackage so a failure names the package and every offender."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("probe", "heads", "circuits", "interventions", "app", "kernels")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def undocumented(source: str) -> list[str]:
    """Public names in ``source`` without a docstring: "name" or "Class.method", in source order."""
    out = []
    for node in ast.parse(source).body:
        if not isinstance(node, _DEFS) or node.name.startswith("_"):
            continue
        if not ast.get_docstring(node):
            out.append(node.name)
        if isinstance(node, ast.ClassDef):
            out += [f"{node.name}.{sub.name}" for sub in node.body
                    if isinstance(sub, _DEFS[:2]) and not sub.name.startswith("_") and not ast.get_docstring(sub)]
    return out


def test_undocumented_finds_what_it_should():
    src = ('def f(): pass\n'
           'def _private(): pass\n'
           'async def g():\n    """Doc."""\n'
           'class C:\n    def m(self): pass\n    def _n(self): pass\n'
           '    @property\n    def p(self):\n        """Doc."""\n        return 1\n'
           'class _D:\n    def m(self): pass\n')
    assert undocumented(src) == ["f", "C", "C.m"]


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_public_name_has_a_docstring(package):
    files = sorted((ROOT / package).glob("*.py"))
    assert files, f"{package}/ holds no Python file: was it moved?"
    missing = [f"{f.relative_to(ROOT)}: {name}" for f in files for name in undocumented(f.read_text(encoding="utf-8"))]
    assert not missing, (f"{len(missing)} public name(s) in {package}/ without a docstring (say what it returns, "
                         "with shapes and units, what it raises, and the paper + section it implements):\n  "
                         + "\n  ".join(missing))
