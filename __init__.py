"""headscope: find out what each attention head does, fast, on any Hugging Face causal LM.

    import headscope as hs
    model = hs.load("smollm2")
    with model.record(hs.Stats(sink_k=1, entropy=True, argmax=True)) as rec:
        model("The capital of France is")
    rec.stack("sink_mass")            # [layer, batch, head, query]
"""
from .probe import (Ablate, ActivationCache, AddToHead, HeadAffine, HookedModel, ModelInfo, ModelNotFound, Recorder,
                    ScaleKeys, Stats, StreamingGate, hook_name, load)

__version__ = "0.1.0"
__all__ = ["Ablate", "ActivationCache", "AddToHead", "HeadAffine", "HookedModel", "ModelInfo", "ModelNotFound",
           "Recorder", "ScaleKeys", "Stats", "StreamingGate", "hook_name", "load"]
