"""Checks for values that cross the probe's public boundary (edit specs, layers, heads, spans):
each turns a user value into a plain Python one or raises an error that says what to do."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def as_index(x, what: str) -> int:
    """An integer index: Python int, numpy integer or 0-d integer tensor -> int. Floats and bools
    are refused (never truncated)."""
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        raise TypeError(f"{what} must be an integer, got the bool {x!r}")
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        return int(x)
    raise TypeError(f"{what} must be an integer (int, numpy integer or 0-d integer tensor), got {x!r} "
                    f"({type(x).__name__}); pass e.g. int(...) of an exact index")


def as_indices(x, what: str) -> tuple[int, ...]:
    """One index or a sequence of them (list, tuple, range, 1-d integer tensor/array) -> tuple of
    distinct ints."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be an integer or a sequence of integers, got {x!r}")
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        return (as_index(x, what),)
    if isinstance(x, torch.Tensor) or isinstance(x, Sequence) or hasattr(x, "__array__") or isinstance(x, range):
        if hasattr(x, "ndim") and getattr(x, "ndim") == 0:
            return (as_index(x, what),)
        out = tuple(as_index(v, what) for v in x)
        if not out:
            raise ValueError(f"{what}: the list is empty; name at least one")
        dup = sorted({v for v in out if out.count(v) > 1})
        if dup:
            raise ValueError(f"{what}: {dup} listed more than once")
        return out
    return (as_index(x, what),)


def check_range(i: int, n: int, what: str, size: str) -> None:
    """IndexError unless 0 <= i < n; ``size`` says what has n (e.g. "the model has 30 layers")."""
    if not 0 <= i < n:
        raise IndexError(f"{what} {i} out of range: {size} (valid: 0..{n - 1})")


def as_spans(spans, what: str) -> tuple[tuple[int, int], ...]:
    """Half-open token-position spans [start, end): a sequence of (start, end) pairs (or a single
    pair) of integers with 0 <= start < end -> tuple of int pairs."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, (Sequence, torch.Tensor)) and not hasattr(spans, "__iter__"):
        raise TypeError(f"{what} must be a sequence of (start, end) spans, e.g. ((0, 4),), got {spans!r}")
    items = list(spans)
    if len(items) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        items = [tuple(items)]                                  # a single (start, end) pair
    out = []
    for sp in items:
        try:
            a, b = sp
        except (TypeError, ValueError):
            raise TypeError(f"{what}: {sp!r} is not a (start, end) pair; give spans as ((start, end), ...)") from None
        a, b = as_index(a, f"{what} start"), as_index(b, f"{what} end")
        if a < 0:
            raise ValueError(f"{what}: span ({a}, {b}) starts before position 0; positions count from the "
                             "first real token")
        if b <= a:
            raise ValueError(f"{what}: span ({a}, {b}) is {'reversed' if b < a else 'empty'}: spans are half-open "
                             "[start, end) with end > start")
        out.append((a, b))
    if not out:
        raise ValueError(f"{what}: no spans given; give at least one (start, end)")
    return tuple(out)


def as_real(x, what: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number in [lo, hi]."""
    if isinstance(x, bool) or isinstance(x, torch.Tensor) and x.numel() != 1:
        raise TypeError(f"{what} must be a number, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {x!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be finite, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{what} must be in {rng}, got {v}")
    return v
