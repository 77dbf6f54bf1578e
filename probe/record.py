"""The recorder: what ``model.record(...)`` returns, filled by the attention function.

Row statistics arrive per forward call as [batch, head, query] (``span_mass`` [batch, head, query,
span]); several calls (e.g. the steps of ``generate``) are concatenated along the query axis.
Column statistics (``received_sum`` [batch, head, key], ``received_count`` [batch, key]) are summed
over calls, zero-padded to the longest key axis.
"""
from __future__ import annotations

import torch

from ..kernels.spec import COLUMN_STATS, StatRequest


class Recorder:
    """What ``model.record(...)`` returns: the statistics the attention function computed for
    ``request`` on ``layers`` (and ``heads``: None = all), read as ``rec[name, layer]``
    ([batch, head, query] for row statistics, ``span_mass`` [batch, head, query, span],
    ``received_sum`` [batch, head, key], ``received_count`` [batch, key]), ``rec.stack(name)`` or
    ``rec.received_mean(layer)``. Statistics are detached; with ``device`` set, layers on other
    devices are moved there."""

    def __init__(self, request: StatRequest, layers: list[int], heads: list[int] | None, device=None):
        self.request = request
        self.device = device          # statistics of layers on other devices are moved here (device_map)
        self.layers = layers
        self.heads = heads
        self._rows: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._cols: dict[tuple[str, int], torch.Tensor] = {}

    # called by the attention function -------------------------------------------------------
    def add(self, layer: int, stats: dict[str, torch.Tensor]) -> None:
        """Take one forward call's statistics of ``layer`` ({name: tensor}, from the attention function):
        row statistics are appended (concatenated along the query axis when read), column statistics
        summed (zero-padded to the longer key axis)."""
        for name, t in stats.items():
            if t.requires_grad:                     # a tensor without grad has no history to cut
                t = t.detach()
            if self.device is not None and t.device != self.device:
                t = t.to(self.device)
            if name in COLUMN_STATS:
                old = self._cols.get((name, layer))
                if old is not None and old.shape[-1] != t.shape[-1]:
                    n = max(old.shape[-1], t.shape[-1])
                    old = torch.nn.functional.pad(old, (0, n - old.shape[-1]))
                    t = torch.nn.functional.pad(t, (0, n - t.shape[-1]))
                self._cols[(name, layer)] = t if old is None else old + t
            else:
                self._rows.setdefault((name, layer), []).append(t)

    # what users read -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Sorted names of the statistics recorded so far (on any layer)."""
        return sorted({n for n, _ in self._rows} | {n for n, _ in self._cols})

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        name, layer = key
        if (name, layer) in self._cols:
            t = self._cols[(name, layer)]
            return t if name == "received_count" or self.heads is None else t[:, self.heads]
        if (name, layer) not in self._rows:
            if layer not in self.layers:
                raise KeyError(f"layer {layer} was not recorded; recorded layers: {self.layers}")
            raise KeyError(f"statistic {name!r} was not recorded on layer {layer} (have: {self.names}); "
                           "did the model run inside the `with model.record(...)` block?")
        t = torch.cat(self._rows[(name, layer)], dim=2)
        return t if self.heads is None else t[:, self.heads]

    def stack(self, name: str) -> torch.Tensor:
        """[layer, batch, head, ...] over the recorded layers (in ``self.layers`` order)."""
        return torch.stack([self[name, l] for l in self.layers])

    def received_mean(self, layer: int) -> torch.Tensor:
        """Mean attention each key receives from the queries that can see it: [batch, head, key]
        (Gu et al. 2024's alpha_k; with a received window, FAI of Li et al. 2025)."""
        s, c = self["received_sum", layer], self["received_count", layer]
        return s / c[:, None].clamp_min(1)
