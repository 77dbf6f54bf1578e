"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which executes their arithmetic but not their
lowering to the GPU. This test compiles each kernel of the fast paths (split-key decode: partial and
merge; the query-block forward with row statistics, with redistribution and gate edits; column sums)
with Triton's own ptxas for ``GPUTarget("cuda", 90, 32)``, in a child process that runs without
TRITON_INTERPRET (``tests/hopper_compile.py``), so that a kernel the GPU cannot compile fails here
and not first on the device."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_every_fast_path_kernel_compiles_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no NVIDIA backend to compile with ({e})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_compile.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    compiled = [line for line in r.stdout.splitlines() if line.startswith("compiled ")]
    names = {line.split()[1] for line in compiled}
    assert names == {"decode_partial_kernel", "decode_merge_kernel", "_attn_fwd", "received_kernel"}, r.stdout
    assert len(compiled) >= 15 and all("bytes of cubin" in line for line in compiled)
