"""headscope: find out what each attention head does, fast, on any Hugging Face causal LM.

    import headscope as hs
    model = hs.load("smollm2")
    with model.record(hs.Stats(sink_k=1, entropy=True, argmax=True)) as rec:
        model("The capital of France is")
    rec.stack("sink_mass")            # [layer, batch, head, query]

The names below come from ``headscope.probe`` (and ``load_edits`` / ``save_edits`` from
``headscope.interventions``) and are imported on first use (PEP 562), so ``headscope --help`` and
``import headscope.app.cli`` do not import torch.
"""
__version__ = "0.1.0"
_SUBPACKAGES = ("probe", "heads", "circuits", "interventions", "app", "kernels")
__all__ = ["Ablate", "ActivationCache", "AddToHead", "HeadAffine", "HookedModel", "ModelInfo", "ModelNotFound",
           "Recorder", "ScaleKeys", "Stats", "StreamingGate", "hook_name", "load", "load_edits", "save_edits"]
_FROM_INTERVENTIONS = ("load_edits", "save_edits")     # model.edit(hs.load_edits(DIR)) re-applies a learned edit


def __getattr__(name):
    import importlib
    if name in _FROM_INTERVENTIONS:
        value = getattr(importlib.import_module(f"{__name__}.interventions"), name)
        globals()[name] = value
        return value
    if name in __all__ or (not name.startswith("_") and name not in _SUBPACKAGES and
                           name in getattr(importlib.import_module(f"{__name__}.probe"), "__all__", ())):
        value = getattr(importlib.import_module(f"{__name__}.probe"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headscope' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
