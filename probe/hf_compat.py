"""Names that differ between the transformers versions headscope supports (5.9 and later)."""


def _generate_cache_kwarg() -> str:
    """The keyword ``GenerationMixin.generate`` takes a cache under: newer transformers (5.24 here)
    renamed ``past_key_values`` to ``cache`` and deprecated the old name; older ones (5.17, checked on
    the GPU machine) know only ``past_key_values`` and reject ``cache``."""
    from transformers.generation import utils as generation_utils
    return "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


GENERATE_CACHE_KWARG = _generate_cache_kwarg()


def output_cache(output):
    """The KV cache a transformers forward returned (``output.cache`` in newer transformers,
    ``output.past_key_values`` in older ones)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _per_row_logits_to_keep() -> bool:
    """Whether models take a 2-D integer ``logits_to_keep`` [batch, k] as per-row positions: newer
    transformers (5.24 here) slice through ``modeling_utils.slice_logits_to_keep``; older ones (5.17)
    index ``hidden_states[:, logits_to_keep]``, so a [B, 1] tensor gives every row the positions of
    all rows ([B, B, 1, V] logits)."""
    from transformers import modeling_utils
    return hasattr(modeling_utils, "slice_logits_to_keep")


PER_ROW_LOGITS_TO_KEEP = _per_row_logits_to_keep()


def logits_at(hf_model, positions, **kwargs):
    """Run ``hf_model(**kwargs)`` computing the logits at ``positions`` [B] only (one position per
    row) -> (logits [B, V], the model output). Newer transformers take ``logits_to_keep=positions[:, None]``;
    on older ones the distinct positions go in as a 1-D ``logits_to_keep`` (kept for every row:
    [B, U, V], U <= B) and each row's own column is picked."""
    import torch
    if PER_ROW_LOGITS_TO_KEEP:
        out = hf_model(logits_to_keep=positions[:, None], **kwargs)
        return out.logits[:, 0], out                                       # [B, V]
    uniq, col = torch.unique(positions, return_inverse=True)              # [U], [B]
    out = hf_model(logits_to_keep=uniq, **kwargs)                          # logits [B, U, V]
    return out.logits[torch.arange(len(positions), device=out.logits.device), col.to(out.logits.device)], out
