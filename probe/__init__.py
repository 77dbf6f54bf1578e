"""The one attention path: loading, the registered attention function, hooks, statistics, edits."""
from ..kernels.spec import StatRequest as Stats
from .edits import AddToHead, Ablate, HeadAffine, OutputEdit, ScaleKeys, StreamingGate
from .cache import ActivationCache
from .hf_compat import logits_at, output_cache
from .hooks import hook_name
from .loading import ModelNotFound
from .model import HookedModel, ModelInfo
from .record import Recorder


def load(model="smollm2", *, tokenizer=None, dtype=None, device=None, device_map=None,
         max_memory=None, offload_dir=None) -> HookedModel:
    """Load a model and switch it to headscope's attention path.

    ``model``: "smollm2" (embedded default), "gemma3-270m", a tiny test model ("tiny-llama",
    "tiny-qwen2", "tiny-mistral", "tiny-gemma3", "tiny-gpt2"), a local HF folder, or an already
    loaded ``transformers.PreTrainedModel`` (then pass its ``tokenizer``).

    ``device_map`` splits the model over devices with accelerate (``dispatch_model``): "auto" /
    "balanced" / "sequential" (``infer_auto_device_map`` within ``max_memory``, e.g. {0: "70GiB",
    1: "70GiB"}) or a dict {module name: device | "cpu" | "disk"}; "disk" needs ``offload_dir``.
    The model is loaded on the CPU first. Statistics, edits, hooks and gradients work unchanged.
    """
    import torch

    from .loading import load_hf

    if isinstance(model, torch.nn.Module):
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return HookedModel(dispatch(model, device_map, max_memory, offload_dir), tokenizer,
                           getattr(model.config, "_name_or_path", None))
    hf, tok, name = load_hf(model, dtype=dtype or torch.float32, device=device)
    return HookedModel(dispatch(hf, device_map, max_memory, offload_dir), tokenizer or tok, name)


def dispatch(hf_model, device_map=None, max_memory=None, offload_dir=None):
    """Split ``hf_model`` over devices with accelerate's ``dispatch_model`` (see ``load``); None: as is."""
    if device_map is None:
        return hf_model
    from accelerate import dispatch_model, infer_auto_device_map
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"device_map={device_map!r}: use 'auto', 'balanced', 'balanced_low_0', 'sequential' "
                             "or a dict {module name: device}")
        from accelerate.utils import get_balanced_memory
        no_split = getattr(hf_model, "_no_split_modules", None) or []
        if device_map != "sequential" and max_memory is None:
            max_memory = get_balanced_memory(hf_model, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf_model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in set(map(str, device_map.values())) and offload_dir is None:
        raise ValueError("device_map puts modules on 'disk': pass offload_dir (a folder for the offloaded weights)")
    return dispatch_model(hf_model, device_map=device_map, offload_dir=offload_dir)


__all__ = ["Ablate", "ActivationCache", "AddToHead", "OutputEdit", "HeadAffine", "HookedModel", "ModelInfo", "ModelNotFound",
           "Recorder", "ScaleKeys", "Stats", "StreamingGate", "hook_name", "load", "logits_at", "output_cache"]
