"""The one attention path: loading, the registered attention function, hooks, statistics, edits."""
from ..kernels.spec import StatRequest as Stats
from .edits import AddToHead, Ablate, HeadAffine, OutputEdit, ScaleKeys, StreamingGate
from .cache import ActivationCache
from .hooks import hook_name
from .loading import ModelNotFound
from .model import HookedModel, ModelInfo
from .record import Recorder


def load(model="smollm2", *, tokenizer=None, dtype=None, device=None) -> HookedModel:
    """Load a model and switch it to headscope's attention path.

    ``model``: "smollm2" (embedded default), "gemma3-270m", a tiny test model ("tiny-llama",
    "tiny-qwen2", "tiny-mistral", "tiny-gemma3", "tiny-gpt2"), a local HF folder, or an already
    loaded ``transformers.PreTrainedModel`` (then pass its ``tokenizer``).
    """
    import torch

    from .loading import load_hf

    if isinstance(model, torch.nn.Module):
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return HookedModel(model, tokenizer, getattr(model.config, "_name_or_path", None))
    hf, tok, name = load_hf(model, dtype=dtype or torch.float32, device=device)
    return HookedModel(hf, tokenizer or tok, name)


__all__ = ["Ablate", "ActivationCache", "AddToHead", "OutputEdit", "HeadAffine", "HookedModel", "ModelInfo", "ModelNotFound",
           "Recorder", "ScaleKeys", "Stats", "StreamingGate", "hook_name", "load"]
