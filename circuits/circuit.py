"""``Circuit``: the result type of every circuit method.

Nodes are named "embed", "L{l}H{h}" (attention head l.h), "M{l}" (MLP of layer l) and "logits";
edges "SENDER->RECEIVER.INPUT" with INPUT q, k or v of a receiving head (under GQA the k/v inputs
belong to KV heads, named "L{l}KV{g}") or the logits ("SENDER->logits"). Scores follow each method's
sign convention (documented in ``method``'s function; patching-style scores are relative drops of
the task metric, larger = more important); rankings use ``abs`` where the method says so
(``params["rank_by_abs"]``).

The faithfulness curve (Wang et al. 2022 §4 "faithfulness"; Conmy et al. 2023 §4.1; Hanna et al.
2024 §4): keep the top-n heads by score, mean-ablate every other head (its output replaced by its
mean over the corrupted prompts at each position) and record M(circuit) / M(clean), for a range of n.

Saved as DIR/circuit.json (metadata, nodes, edges, curve) + DIR/circuit.safetensors (tensors),
each written to a temporary file and renamed.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..heads.scores import HeadScores, write_json

_HEAD = re.compile(r"^L(\d+)H(\d+)$")


def head_node(l: int, h: int) -> str:
    """The node name of attention head ``h`` of layer ``l``: "L{l}H{h}"."""
    return f"L{l}H{h}"


def parse_head(name: str):
    """"L{l}H{h}" -> (l, h); None for any other node name ("M3", "L2KV0", "logits", ...)."""
    m = _HEAD.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class Circuit:
    """A circuit found by one method on one task (see the module docstring for node and edge names).

    Fields: ``method`` and ``paper`` (what found it); ``task`` (its name); ``model`` (``ModelInfo.to_dict()``);
    ``nodes`` {node: score} and ``edges`` {"u->v.q": score} in the method's sign convention; ``params`` (the
    method's settings; ``rank_by_abs`` ranks by |score|); ``m_clean`` (the task metric on clean prompts);
    ``task_report`` (``Task.evaluate``); ``faithfulness`` {"n": [...], "kept": [...]} (M(circuit) / M(clean));
    ``tensors`` (raw arrays saved beside the JSON); ``seconds`` (run time); ``created`` (Unix time)."""
    method: str
    task: str
    model: dict                                    # ModelInfo.to_dict()
    nodes: dict[str, float]                        # node -> score
    edges: dict[str, float] = field(default_factory=dict)   # "u->v.q" -> score
    params: dict = field(default_factory=dict)
    paper: str = ""
    m_clean: float = float("nan")
    task_report: dict = field(default_factory=dict)
    faithfulness: dict = field(default_factory=dict)        # {"n": [...], "kept": [...]}
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    created: float = field(default_factory=time.time)

    # ------------------------------------------------------------------ views
    @property
    def rank_by_abs(self) -> bool:
        """Whether rankings use |score| (methods whose scores are signed estimates, e.g. EAP)."""
        return bool(self.params.get("rank_by_abs", False))

    def _key(self, v):
        return abs(v) if self.rank_by_abs else v

    def head_scores(self) -> torch.Tensor:
        """[layer, head] scores of the head nodes (0 where a head has none)."""
        L, H = self.model["n_layers"], self.model["n_heads"]
        out = torch.zeros(L, H)
        for n, v in self.nodes.items():
            lh = parse_head(n)
            if lh:
                out[lh] = v
        return out

    def to_head_scores(self) -> HeadScores:
        """The head nodes as a ``HeadScores`` [layer, head] map (0 where a head has no node)."""
        return HeadScores(self.head_scores(), method=self.method, paper=self.paper, params=self.params,
                          model=self.model, dataset=self.task, seconds=self.seconds)

    def top_nodes(self, n: int | None = None, heads_only: bool = True) -> list[str]:
        """The ``n`` best-scored node names (all when None), best first; heads only unless ``heads_only=False``."""
        items = [(k, v) for k, v in self.nodes.items() if not heads_only or parse_head(k)]
        items.sort(key=lambda kv: -self._key(kv[1]))
        return [k for k, _ in items[:n]]

    def top_edges(self, n: int | None = None) -> list[str]:
        """The ``n`` best-scored edge names (all when None), best first."""
        return [k for k, _ in sorted(self.edges.items(), key=lambda kv: -self._key(kv[1]))[:n]]

    def in_circuit(self, n: int) -> torch.Tensor:
        """[layer, head] bool: the top-n heads."""
        mask = torch.zeros(self.model["n_layers"], self.model["n_heads"], dtype=torch.bool)
        for k in self.top_nodes(n):
            mask[parse_head(k)] = True
        return mask

    def to_frame(self):
        """A pandas DataFrame, one row per node and edge: kind ("node"/"edge"), name, score, method;
        sorted best first."""
        import pandas as pd
        rows = [{"kind": "node", "name": k, "score": v} for k, v in self.nodes.items()]
        rows += [{"kind": "edge", "name": k, "score": v} for k, v in self.edges.items()]
        df = pd.DataFrame(rows, columns=["kind", "name", "score"])
        df["method"] = self.method
        return df.sort_values("score", ascending=False, key=(lambda s: s.abs()) if self.rank_by_abs else None)

    # ------------------------------------------------------------------ faithfulness
    @torch.no_grad()
    def faithfulness_curve(self, model, task, ns=None, batch_size: int = 32) -> dict:
        """M(top-n heads kept, all others mean-ablated) / M(clean) for each n in ``ns`` (default: a
        geometric range up to all heads). Stored in ``self.faithfulness`` and returned."""
        from .patching import cache_kind, last_logits
        from ..probe.hooks import hook_name
        L, H = self.model["n_layers"], self.model["n_heads"]
        if ns is None:
            ns = sorted({0, *[int(round(float(x))) for x in torch.logspace(0, torch.log10(torch.tensor(float(L * H))), 12)],
                         L * H})
        mean = cache_kind(model, task.corrupt, "z", batch_size).mean(1)       # [L, N, H, d]
        m_clean = float(task.metric(torch.cat([last_logits(model, task.clean[i:i + batch_size])
                                               for i in range(0, len(task), batch_size)])))
        kept = []
        for n in ns:
            keep = self.in_circuit(n)

            def ablate(t, hook, keep=keep):
                l = hook.layer()
                off = ~keep[l]
                if not off.any():
                    return None
                t = t.clone()
                t[:, :, off] = mean[l][None, :, off].to(t)
                return t
            logits = torch.cat([model.run_with_hooks(task.clean[i:i + batch_size],
                                                     fwd_hooks=[(hook_name("z", l), ablate) for l in range(L)],
                                                     logits_to_keep=1)[:, -1]
                                for i in range(0, len(task), batch_size)])
            kept.append(float(task.metric(logits)) / m_clean)
        self.faithfulness = {"n": list(map(int, ns)), "kept": kept, "m_clean": m_clean}
        return self.faithfulness

    def smallest_circuit(self, fraction: float = 0.8):
        """The smallest n on the faithfulness curve keeping >= ``fraction`` of the clean metric (None
        if none does)."""
        f = self.faithfulness
        if not f:
            raise ValueError("compute faithfulness_curve(model, task) first")
        for n, k in zip(f["n"], f["kept"]):
            if k >= fraction:
                return n
        return None

    # ------------------------------------------------------------------ plotting
    def plot(self, n_edges: int = 60, n_nodes: int = 30):
        """Plotly graph: layers as rows (input at the bottom), heads along x, the top edges as lines
        whose width follows |score|."""
        import plotly.graph_objects as go
        L, H = self.model["n_layers"], self.model["n_heads"]

        def xy(name):
            base = name.split(".")[0]
            if base == "embed":
                return (H - 1) / 2, -1
            if base == "logits":
                return (H - 1) / 2, L
            lh = parse_head(base)
            if lh:
                return lh[1], lh[0]
            m = re.match(r"^M(\d+)$", base)
            if m:
                return H + 0.5, int(m.group(1)) + 0.4
            m = re.match(r"^L(\d+)KV(\d+)$", base)
            if m:
                return int(m.group(2)) * H / max(1, H), int(m.group(1))
            return 0, 0
        fig = go.Figure()
        edges = self.top_edges(n_edges)
        wmax = max([abs(self.edges[e]) for e in edges] + [1e-12])
        for e in edges:
            u, v = e.split("->")
            (x0, y0), (x1, y1) = xy(u), xy(v)
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", text=f"{e}: {self.edges[e]:.3g}",
                                     line=dict(width=0.5 + 6 * abs(self.edges[e]) / wmax,
                                               color="crimson" if self.edges[e] >= 0 else "royalblue"),
                                     showlegend=False))
        nodes = self.top_nodes(n_nodes, heads_only=False)
        pts = [xy(n) for n in nodes] + [xy("embed"), xy("logits")]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text",
                                 text=nodes + ["embed", "logits"], textposition="top center",
                                 marker=dict(size=9, color=[self.nodes.get(n, 0) for n in nodes] + [0, 0],
                                             colorscale="Viridis", showscale=True), showlegend=False))
        fig.update_layout(title=f"{self.method} circuit — {self.task} — {self.model.get('name', '')}",
                          xaxis_title="head", yaxis_title="layer", height=max(400, 28 * L + 150),
                          width=max(500, 60 * H + 250))
        return fig

    def plot_faithfulness(self):
        """A plotly figure of the faithfulness curve: M(circuit) / M(clean) against heads kept (log x)."""
        import plotly.graph_objects as go
        f = self.faithfulness
        fig = go.Figure(go.Scatter(x=f.get("n", []), y=f.get("kept", []), mode="lines+markers"))
        fig.update_layout(title="faithfulness: metric kept with only the top-n heads (others mean-ablated)",
                          xaxis_title="heads kept", yaxis_title="M(circuit) / M(clean)", xaxis_type="log")
        return fig

    # ------------------------------------------------------------------ persistence
    def meta(self) -> dict:
        """Everything but the tensors, as JSON-able values (what ``save`` writes to circuit.json)."""
        return {"method": self.method, "task": self.task, "model": self.model, "nodes": self.nodes,
                "edges": self.edges, "params": self.params, "paper": self.paper, "m_clean": self.m_clean,
                "task_report": self.task_report, "faithfulness": self.faithfulness, "seconds": self.seconds,
                "created": self.created, "tensors": sorted(self.tensors)}

    def save(self, folder) -> Path:
        """Write FOLDER/circuit.json and FOLDER/circuit.safetensors (each atomically); returns the json path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"head_scores": self.head_scores().contiguous(),
                   **{k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in self.tensors.items()}}
        save_tensors(folder / "circuit.safetensors", tensors)
        return write_json(folder / "circuit.json", self.meta())

    @classmethod
    def load(cls, folder) -> "Circuit":
        """Read a circuit written by ``save`` (FOLDER or FOLDER/circuit.json); raises OSError when
        circuit.json is missing."""
        from safetensors.torch import load_file
        folder = Path(folder)
        if folder.suffix == ".json":
            folder = folder.parent
        meta = json.loads((folder / "circuit.json").read_text())
        st = folder / "circuit.safetensors"
        tensors = load_file(str(st)) if st.exists() else {}
        tensors.pop("head_scores", None)
        return cls(method=meta["method"], task=meta["task"], model=meta["model"], nodes=meta["nodes"],
                   edges=meta.get("edges", {}), params=meta.get("params", {}), paper=meta.get("paper", ""),
                   m_clean=meta.get("m_clean", float("nan")), task_report=meta.get("task_report", {}),
                   faithfulness=meta.get("faithfulness", {}), tensors=tensors, seconds=meta.get("seconds", 0.0),
                   created=meta.get("created", 0.0))


def save_tensors(path, tensors: dict) -> Path:
    """safetensors file written to a temporary name in the same folder, then renamed."""
    import os
    import tempfile

    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def from_head_scores(hs: HeadScores, task, rank_by_abs: bool = False, **kw) -> Circuit:
    """A node-level Circuit from ``HeadScores`` [layer, head]."""
    L, H = hs.scores.shape
    nodes = {head_node(l, h): float(hs.scores[l, h]) for l in range(L) for h in range(H)}
    return Circuit(method=hs.method, task=task.name, model=hs.model, nodes=nodes,
                   params={**hs.params, "rank_by_abs": rank_by_abs}, paper=hs.paper,
                   m_clean=float(hs.extra.get("m_clean", torch.tensor(float("nan")))),
                   task_report=task.report or {}, seconds=hs.seconds, **kw)
