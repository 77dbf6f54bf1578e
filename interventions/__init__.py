"""Interventions: change a model by editing a few heads, through the probe's edits.

``act``: ACT attention calibration (Yu et al. 2024).
``var``: VAR attention redistribution towards a named token group (Kang et al. 2025).
``lofit``: LoFiT per-head scales and offsets, trained with the base model frozen (Yin et al. 2024).
``influence``: AttentionInfluence data selection by masking retrieval heads (Hua et al. 2025).
``kv_compress``: a KV cache that keeps only sink + recent tokens for streaming heads
(DuoAttention / RazorAttention deployment; optional RazorAttention compensation token).
``redistribute``: ACT/VAR's redistribution with per-example key sets, for batched pattern hooks.
``controls``: random-head and other-task controls with bootstrap confidence intervals.
``evaluate``: held-out scoring of a head intervention (hooks or edits) and the selected-vs-random
head-set comparison that ACT and VAR share.
``tasks``: shipped labelled tasks with fixed disjoint splits.
``save_edits`` / ``load_edits``: one folder per learned edit list (``edits_io``).
"""
from .edits_io import load_edits, save_edits

__all__ = ["load_edits", "save_edits"]
