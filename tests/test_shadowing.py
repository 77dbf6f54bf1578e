"""The repository root on sys.path must not break transformers.

``python -m pytest`` (README's test command) and notebooks started in the repository root put the
root on ``sys.path``, where the folder ``kernels/`` (``headscope.kernels``) shadows the top-level
name ``kernels`` of Hugging Face's hub-kernels package, which transformers >= 5.25 imports. The
folder steps aside under that name (kernels/__init__.py); these tests run fresh interpreters from
the root to see it.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _printed(code: str) -> str:
    """What ``code`` prints, run from the root; its stderr as the message when it fails."""
    done = _run(code)
    return done.stdout.strip() if done.returncode == 0 else f"exit {done.returncode}: {done.stderr}"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's 'kernels' is not installed")
def test_top_level_kernels_from_the_root_is_the_installed_package():
    code = (
        "import os, sys, kernels\n"
        f"root = {ROOT!r}\n"
        "assert not os.path.abspath(kernels.__file__).startswith(os.path.join(root, 'kernels')), kernels.__file__\n"
        "assert sys.modules['kernels'] is kernels\n"
        "from transformers import modeling_utils\n"
        "import headscope.kernels as ours\n"
        "assert os.path.abspath(ours.__file__) == os.path.join(root, 'kernels', '__init__.py'), ours.__file__\n"
        "assert ours.StatRequest.__module__ == 'headscope.kernels.spec'\n"
        "print('fine')\n")
    assert _printed(code) == "fine"


def test_top_level_kernels_without_an_installed_package_says_what_to_do():
    # -S: no site-packages, so no installed 'kernels'; only the repository root is searched. The import
    # itself succeeds (transformers imports it to read a version); what is taken from it says what to do
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import kernels\n"
            "assert getattr(kernels, '__file__', None) is None and getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
            "from kernels import get_kernel\n")
    done = _run(code, "-S")
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "get_kernel" in done.stderr
    assert "import headscope.kernels" in done.stderr


# Before 5.25 transformers did not depend on 'kernels', but checked for it when modeling_utils was
# imported: find_spec("kernels"), then, with no distribution metadata, an import to read a version
# (the device machine's transformers 5.17 does this). The installed package and its metadata are hidden
# here, so that the check meets only the repository's folder (transformers' own check of its
# dependencies, at import, reads the real metadata first).
_HIDE_INSTALLED_KERNELS = """
import importlib.machinery, importlib.metadata, os, sys
root = {root!r}
_find, _version = importlib.machinery.PathFinder.find_spec, importlib.metadata.version
def find_spec(name, path=None, target=None):
    spec = _find(name, path, target)
    if name == "kernels" and spec is not None and os.path.dirname(os.path.realpath(spec.origin)) != os.path.join(root, "kernels"):
        return None
    return spec
def version(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
import transformers  # its own dependency check reads the real metadata first
importlib.machinery.PathFinder.find_spec, importlib.metadata.version = find_spec, version
sys.path.insert(0, root)
"""


def test_transformers_counts_the_folder_as_no_package():
    code = _HIDE_INSTALLED_KERNELS.format(root=ROOT) + (
        "from transformers.utils import import_utils\n"
        "exists, ver = import_utils._is_package_available('kernels', return_version=True)\n"
        "assert not exists, (exists, ver)\n"
        "from packaging.version import Version\n"
        "if Version(transformers.__version__) < Version('5.25'):   # later ones need the package\n"
        "    from transformers import modeling_utils\n"
        "import headscope.kernels as ours\n"
        "assert ours.StatRequest.__module__ == 'headscope.kernels.spec'\n"
        "print('fine')\n")
    assert _printed(code) == "fine"


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's 'kernels' is not installed")
def test_root_on_the_path_under_two_names(tmp_path):
    """The root reached through a symlink as well as by its own name, and a copy of the checkout on the
    path too: the folder still steps aside (an abspath comparison would find it again under the second
    name, and the copy would find this one, and recurse)."""
    link = tmp_path / "repo"
    link.symlink_to(ROOT, target_is_directory=True)
    copy = tmp_path / "copy"
    for part in ("kernels", "probe"):
        shutil.copytree(os.path.join(ROOT, part), copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    done = _run(f"import os, sys; sys.path[:0] = [{str(copy)!r}, {str(link)!r}, {ROOT!r}]; import kernels; "
                f"assert os.path.realpath(kernels.__file__) != {os.path.join(ROOT, 'kernels', '__init__.py')!r}, kernels.__file__")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("folder", ["benchmarks", "experiments", "notebooks"])
def test_script_folders_shadow_no_module(folder):
    """``python benchmarks/x.py`` puts benchmarks/ first on sys.path, so a script there named like an
    installed top-level module replaces it for every import in the process. benchmarks/kernels.py
    did that to Hugging Face's ``kernels`` package (transformers >= 5.25 imports it), and a dozen
    scripts carried a sys.path filter to survive it; it is benchmarks/attention_bench.py now."""
    import importlib.machinery
    here = os.path.realpath(os.path.join(ROOT, folder))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) not in (here, ROOT)]
    shadows = []
    for name in sorted(os.listdir(here)):
        stem, ext = os.path.splitext(name)
        if ext != ".py":
            continue
        spec = importlib.machinery.PathFinder.find_spec(stem, path)
        if spec is not None or stem in sys.stdlib_module_names:
            shadows.append(f"{folder}/{name} shadows {spec.origin if spec else 'the standard library'}")
    assert not shadows, "rename: " + "; ".join(shadows)
