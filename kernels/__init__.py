"""Attention math only: the eager reference, the chunked CPU path (with its fused C row pass,
``cpu_rows.c``, built on first use) and the Triton kernels.

Imports torch (and triton, lazily), nothing else of headscope. ``spec`` says what a kernel computes.

This folder is ``headscope.kernels``. When the repository root is on ``sys.path`` (``python -m
pytest`` or a notebook started there) it can also be found as the top-level name ``kernels``, which
belongs to Hugging Face's hub-kernels package, a dependency of transformers (>= 5.25) that
``transformers.modeling_utils`` imports. Imported under that name, this file steps aside and loads
the installed package in its place (tests/test_shadowing.py).
"""
import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))   # realpath: the root by any name
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "'kernels' was found as headscope's kernels/ folder because the repository root is on "
            "sys.path, and no installed package 'kernels' exists; import headscope.kernels, or run "
            "from outside the repository root", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from . import chunked, reference
    from .spec import LayerEdits, Redistribution, StatRequest

    __all__ = ["LayerEdits", "Redistribution", "StatRequest", "chunked", "reference"]
