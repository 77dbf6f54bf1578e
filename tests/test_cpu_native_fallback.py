"""The fused CPU row kernel (kernels/cpu_rows.c) is an optional speed-up: without a C compiler, or
when it does not build, the CPU path falls back to plain PyTorch ops, and says so once (a warning),
not silently."""
import logging

import pytest

from headscope.kernels import cpu_native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_native, "_lib", None)              # restored after the test
    monkeypatch.setattr(cpu_native, "_cache_dir", lambda: tmp_path)
    monkeypatch.delenv("HEADSCOPE_NATIVE", raising=False)
    return monkeypatch


@pytest.mark.parametrize("compiler, says", [(None, "no C compiler found"),
                                            ("false", "did not build or load with any flag set")])
def test_fallback_is_announced_once(fresh, caplog, compiler, says):
    fresh.setattr(cpu_native, "_compiler", lambda: compiler)
    with caplog.at_level(logging.WARNING, logger="headscope"):
        assert cpu_native.available() is False
        assert cpu_native.available() is False                 # decided once
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and says in msgs[0] and "HEADSCOPE_NATIVE=0" in msgs[0], msgs
