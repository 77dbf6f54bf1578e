"""SM clock and board power while a GPU benchmark runs, sampled by a thread through NVML
(``torch.cuda.clock_rate`` / ``torch.cuda.power_draw``). It tells a kernel that is slower because it
does more work from one that is slower because the board lowered its clock to stay within its power
limit. Issue 13.

    with ClockSampler() as c:
        t = triton.testing.do_bench(fn)
    c.mhz, c.watts        # means over the samples; None where NVML is not there (said once)

    t, c = bench(fn, rep=100)     # the same: triton's median over ``rep`` ms, and the sampler
"""
import threading

import torch

_said = False


class ClockSampler:
    """Context manager: samples the SM clock (MHz) and power (W) every ``period`` seconds."""

    def __init__(self, period: float = 0.005):
        self.period, self.mhz, self.watts = period, None, None
        self._stop = threading.Event()
        self._clk, self._pw = [], []

    def _run(self):
        while not self._stop.wait(self.period):
            self._clk.append(torch.cuda.clock_rate())
            self._pw.append(torch.cuda.power_draw() / 1000.0)     # mW -> W

    def __enter__(self):
        global _said
        try:
            torch.cuda.clock_rate(), torch.cuda.power_draw()
        except Exception as e:  # noqa: BLE001  (no pynvml / NVML on this machine)
            if not _said:
                print(f"clock sampling unavailable ({type(e).__name__}: {e}); clocks are not reported", flush=True)
                _said = True
            self._thread = None
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._clk:
                self.mhz = sum(self._clk) / len(self._clk)
                self.watts = sum(self._pw) / len(self._pw)
        return False

    def __str__(self):
        return "" if self.mhz is None else f"{self.mhz:.0f} MHz {self.watts:.0f} W"


def bench(fn, rep: int = 100):
    """(median ms of ``fn`` by ``triton.testing.do_bench``, the ``ClockSampler`` that ran during it)."""
    import triton.testing
    with ClockSampler() as c:
        t = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    return t, c
