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


def dummies(dev):
    """(fp32 [1], int64 [2], int32 [1], uint8 [1]) zero tensors on ``dev``: what the Triton kernels
    receive for pointer arguments a call does not use."""
    import torch
    return cached(("dummies", dev), lambda: (torch.zeros(1, dtype=torch.float32, device=dev),
                                             torch.zeros(2, dtype=torch.int64, device=dev),
                                             torch.zeros(1, dtype=torch.int32, device=dev),
                                             torch.zeros(1, dtype=torch.uint8, device=dev)))


_SM_COUNT: dict = {}


def sm_count(dev) -> int:
    """Streaming multiprocessors of CUDA device ``dev`` (asked once per device)."""
    if dev not in _SM_COUNT:
        import torch
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


def off_current_device(t) -> bool:
    """``t`` is a CUDA tensor on a device other than the current one (a layer of a model split over
    GPUs with a device map). Triton and FlashAttention-4 launch on the current device and its
    stream, so the caller switches to ``t``'s device first (``torch.cuda.device``), as PyTorch's own
    ops do."""
    import torch
    # (a CUDA tensor exists, so CUDA is initialised: the C call, without current_device's checks)
    return t.is_cuda and t.device.index != torch._C._cuda_getDevice()
