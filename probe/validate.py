"""Checks for indices given at the probe's public entries (layers, heads, start layers).

An index must be an integer: a Python int, a NumPy integer or a 0-d integer tensor. Floats (even
1.0), bools and strings are refused instead of truncated, so ``layer=2.7`` never silently means
layer 2.
"""
from __future__ import annotations

import numbers

import torch


def as_index(x, what: str, n: int | None = None) -> int:
    """``x`` as a Python int, checked to lie in [0, n) when ``n`` is given (IndexError otherwise).
    TypeError for anything that is not an integer."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer, got a tensor of shape {tuple(x.shape)} and dtype {x.dtype}")
        x = int(x)
    elif isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {x!r} ({type(x).__name__}); "
                        "floats are not truncated: pass int(...) if that is what you mean")
    x = int(x)
    if n is not None and not 0 <= x < n:
        raise IndexError(f"{what} {x} out of range: valid values are 0..{n - 1}")
    return x


def as_indices(x, what: str, n: int | None = None) -> list[int]:
    """One integer or an iterable of integers (list, tuple, range, 1-d tensor/array) -> list[int]."""
    if isinstance(x, torch.Tensor):
        return [as_index(x, what, n)] if x.dim() == 0 else [as_index(v, what, n) for v in x]
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        return [as_index(x, what, n)]
    if getattr(x, "ndim", None) == 0:                                # 0-d NumPy array
        return [as_index(x.item() if x.dtype.kind in "iu" else x, what, n)]
    return [as_index(v, what, n) for v in x]
