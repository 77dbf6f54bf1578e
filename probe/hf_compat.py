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
