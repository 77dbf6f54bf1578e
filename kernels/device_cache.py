"""Small device tensors built from Python values, made once per device and value.

The Triton paths (``triton_attention``, ``triton_decode``) pass kernels dummies for absent
arguments, span tables, zero key positions, valid-key counts and redistribution tables. Building
them anew would cost a host-to-device copy in every layer of every forward; ``cached`` builds each
on first use and hands back the same tensor afterwards.

    from .device_cache import cached
    pos0 = cached(("pos0", dev, B), lambda: torch.zeros(B, dtype=torch.int64, device=dev))
"""
from __future__ import annotations

# entries kept before the cache is emptied (the keys hold shapes and requests; a long session with
# many shapes must not grow it without bound; tensors still in use stay alive through their callers)
MAX_ENTRIES = 512

_CACHE: dict = {}


def cached(key, make):
    """``make()`` for ``key`` (a hashable naming the device and the values), built on first use and
    returned from the cache afterwards. Callers must not write into what they get."""
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) >= MAX_ENTRIES:
            _CACHE.clear()
        value = _CACHE[key] = make()
    return value
