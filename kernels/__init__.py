"""Attention math only: the eager reference, the chunked CPU path (with its fused C row pass,
``cpu_rows.c``, built on first use) and the Triton kernels.

Imports torch (and triton, lazily), nothing else of headscope. ``spec`` says what a kernel computes.

This folder is ``headscope.kernels``. When the repository root is on ``sys.path`` (``python -m
pytest`` or a notebook started there) it can also be found as the top-level name ``kernels``, which
belongs to Hugging Face's hub-kernels package, a dependency of transformers (>= 5.25) that
``transformers.modeling_utils`` imports. Imported under that name, this file steps aside and loads
the installed package in its place. With no such package installed (transformers 5.17-5.24 still
look for it), it leaves an empty module that transformers counts as absent, and any name taken from
it raises an error saying to import ``headscope.kernels`` (tests/test_shadowing.py).
"""
import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    def _is_headscope_root(path):
        """A headscope checkout (this one by any name, or a copy): its kernels/ is this folder again."""
        path = os.path.realpath(path or os.curdir)
        return all(os.path.exists(os.path.join(path, *part)) for part in (("kernels", "spec.py"), ("probe",)))

    _path = [p for p in sys.path if not _is_headscope_root(p)]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        # Nothing installed under that name. Raising here would break transformers 5.17-5.24, which
        # finds this folder with find_spec and imports it to read a version; instead the module is
        # left empty, without __file__ or __version__ (transformers then counts the package as not
        # installed: a namespace shadow), and any name taken from it says what to do.
        del __file__

        def __getattr__(name):
            if name.startswith("__"):      # getattr(m, "__version__", default) and the like
                raise AttributeError(name)
            raise ModuleNotFoundError(
                f"'kernels' (asked for {name!r}) was found as headscope's kernels/ folder because the "
                "repository root is on sys.path, and no installed package 'kernels' exists; import "
                "headscope.kernels, or run from outside the repository root", name="kernels")
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
else:
    from . import chunked, reference
    from .spec import LayerEdits, Redistribution, StatRequest

    __all__ = ["LayerEdits", "Redistribution", "StatRequest", "chunked", "reference"]
