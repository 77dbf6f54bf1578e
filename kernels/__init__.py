"""Attention math only: the eager reference, the chunked CPU path (with its fused C row pass,
``cpu_rows.c``, built on first use) and the Triton kernels.

Imports torch (and triton, lazily), nothing else of headscope. ``spec`` says what a kernel computes.
"""
from . import chunked, reference
from .spec import LayerEdits, Redistribution, StatRequest

__all__ = ["LayerEdits", "Redistribution", "StatRequest", "chunked", "reference"]
