"""Shared fixtures: each real model is loaded once per test run (converted weights are cached in
$HEADSCOPE_CACHE, default ~/.cache/headscope)."""
import os
import shutil

# Triton reads TRITON_INTERPRET when it is first imported, and importing headscope (through
# transformers) already imports it: without a GPU, set it before anything else so the Triton
# kernel tests run in the interpreter whatever order the test modules load in.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

# Hypothesis: CI (CI set) runs a fixed, derandomized set of examples so a submission never fails by
# chance; locally the same count is drawn at random; HYPOTHESIS_PROFILE=thorough runs 300.
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    import headscope as hs
    return hs.load("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    import headscope as hs
    return hs.load("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_llama():
    import headscope as hs
    return hs.load("tiny-llama")
