"""Discrete sparse-autoencoder circuits (O'Neill & Bui 2024, "Sparse Autoencoders for Dense Text
Embeddings / Circuit discovery with discrete SAEs", repo charlieoneill11/sae-circuits, §3).

For every head, its result (``hook_result``, the head's write to the residual) averaged over
positions is one vector per prompt. ``n_latents`` = 200 ReLU latents, Adam (lr 1e-3) for ``epochs`` =
500 full-batch steps, and the reference's loss (src/train.py ``loss_fn``, see ``sae_loss``): MSE
averaged over rows and d_model coordinates + ``l1`` (0.02) x the L1 norm of a row's latent vector
averaged over rows. Two designs:

- ``design="shared"`` (the reference code, src/main.py + src/sae.py; the default): ONE SAE for every
  head, in d_model coordinates, trained on ``n_examples`` = 10 prompts drawn at random from the
  pooled positive and negative prompts (each prompt gives one vector per head). As the reference's
  ``SparseAutoencoder``: a tied bias (zero at start) subtracted before encoding and added after
  decoding, an encoder bias, no decoder bias, and encoder and decoder weights whose rows are held at
  unit norm (``ConstrainedUnitNormLinear``: renormalised before every use, and the gradient's radial
  part removed). The reference's config uses 300 latents (``num_unique``); pass ``n_latents=300``.
- ``design="per_head"``: one small SAE per head (all heads trained at once, as one batched model),
  on ``n_examples`` positive and as many negative prompts, each head's vectors expressed in an
  orthonormal basis of their span (``span_coordinates``), no norm constraint.

Each head's code on a prompt is its argmax latent, read on all of the task's prompts. Node score
of a head = the number of codes seen on positive prompts and never on negative ones, softmax over
heads; edge score of (u, v), u below v = the number of code pairs
(code_u, code_v) seen on positive prompts and never on negative ones (normalised to sum 1).
"""
from __future__ import annotations

import logging
import time

import torch

from ..probe.hooks import hook_name
from .circuit import Circuit, head_node


@torch.no_grad()
def head_means(model, tokens, batch_size: int = 32) -> torch.Tensor:
    """Per-head result averaged over positions: [n_prompts, layer*head, d_model]."""
    L = model.cfg.n_layers
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        _, c = model.run_with_cache(tokens[i:i + batch_size], names_filter=[hook_name("result", l) for l in range(L)],
                                    logits_to_keep=1)
        out.append(torch.cat([c["result", l].float().mean(1) for l in range(L)], 1))   # [b, L*H, D]
    return torch.cat(out)


def span_coordinates(xs: torch.Tensor) -> torch.Tensor:
    """[U, n, D] -> [U, n, k] (k = min(n, D)): each unit's vectors in an orthonormal basis of their
    span (SVD). Distances, norms and hence the SAE's summed squared reconstruction error are
    unchanged for decoders in that span, where the best decoder lies (the mean over coordinates is
    not: ``sae_loss`` divides by d_model, not k); with 20 prompts this makes training on
    d_model = 576 about 29x cheaper. (Adam and the random init are not rotation invariant, so the
    optimiser's path differs from training in the original coordinates.)"""
    if xs.shape[1] >= xs.shape[2]:
        return xs
    _, _, vh = torch.linalg.svd(xs, full_matrices=False)                     # vh [U, k, D]
    return xs @ vh.transpose(1, 2)


def train_saes(x: torch.Tensor, n_latents: int = 200, l1: float = 0.02, lr: float = 1e-3, epochs: int = 500,
               seed: int = 0, train=None) -> torch.Tensor:
    """One SAE per unit, trained jointly on the rows ``train`` of x (default all): x [n, units, D]
    -> codes [n, units] (argmax latents of every row)."""
    n, U, D = x.shape
    d_model = D                                                              # the MSE's denominator
    g = torch.Generator().manual_seed(seed)
    allx = span_coordinates(x.transpose(0, 1).contiguous())                  # [U, n, min(n, D)]
    xs = allx if train is None else allx[:, train]
    D = xs.shape[-1]
    w_enc = (torch.randn(U, D, n_latents, generator=g) / D ** 0.5).requires_grad_(True)
    b_enc = torch.zeros(U, 1, n_latents, requires_grad=True)
    w_dec = (torch.randn(U, n_latents, D, generator=g) / n_latents ** 0.5).requires_grad_(True)
    b_dec = torch.zeros(U, 1, D, requires_grad=True)
    opt = adam([w_enc, b_enc, w_dec, b_dec], lr)
    threads = torch.get_num_threads()
    if U * D * n_latents < 50_000_000:
        # small batched matmuls and a memory-bound Adam update: one thread is as fast on an idle machine
        # and much faster on a shared one (SmolLM2, 270 x 80 x 200, 30 steps: 1.7 s on 1 thread vs 6.8 s
        # on 2 at load 4)
        torch.set_num_threads(1)
    try:
        _fit(xs, w_enc, b_enc, w_dec, b_dec, opt, l1, epochs, d_model)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        z = torch.relu(torch.bmm(allx - b_dec, w_enc) + b_enc)
    return z.argmax(-1).T                                                    # [n, U]


def adam(params, lr):
    """Adam, fused into one kernel where this torch has it (CPU fused Adam: torch >= 2.4): the per-head
    SAEs have ~8.6M parameters on SmolLM2 and the unfused update, ~15 passes over them per step, took
    most of the training time. Same update rule; float rounding differs slightly (max |diff| ~4e-5
    after 30 steps)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError) as e:
        logging.getLogger(__name__).warning("fused Adam is not available here (%s); the SAEs train with the "
                                            "unfused Adam (same rule, several times slower)", e)
        return torch.optim.Adam(params, lr=lr)


def sae_loss(xs: torch.Tensor, rec: torch.Tensor, z: torch.Tensor, l1: float, d_model: int) -> torch.Tensor:
    """O'Neill & Bui 2024's SAE loss (charlieoneill11/sae-circuits, src/train.py ``loss_fn``: ``F.mse_loss``
    + lambda x mean over rows of ``torch.norm(latents, p=1, dim=1)``) of each unit, summed over the units
    (each unit's SAE gets the gradient it would get alone). xs, rec [U, n, k]: inputs and reconstructions
    in span coordinates (k <= d_model; the squared error is the same as in the d_model original
    coordinates, so it is averaged over n x d_model entries, as F.mse_loss does there); z [U, n, latents]."""
    n = xs.shape[1]
    mse = ((rec - xs) ** 2).sum((1, 2)) / (n * d_model)                      # [U]
    sparsity = z.abs().sum(-1).mean(1)                                       # [U]: mean L1 norm of a row's code
    return (mse + l1 * sparsity).sum()


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` with every row scaled to unit L2 norm (``ConstrainedUnitNormLinear``'s constraint)."""
    return torch.nn.functional.normalize(w, dim=-1)


def drop_radial(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of unit-norm rows ``w`` without its part along each row (the reference's
    backward hook): a step then moves a row around the sphere, not off it."""
    return grad - (grad * w).sum(-1, keepdim=True) * unit_rows(w)


def train_shared_sae(x: torch.Tensor, n_latents: int = 200, l1: float = 0.02, lr: float = 1e-3,
                     epochs: int = 500, seed: int = 0, train=None) -> torch.Tensor:
    """One SAE for every unit (the reference's design, see the module docstring), trained on the
    rows ``train`` of x (default all): x [n, units, D] -> codes [n, units] (argmax latents)."""
    n, U, D = x.shape
    g = torch.Generator().manual_seed(seed)
    xs = x if train is None else x[train]                                    # [m, U, D]
    dev = x.device
    w_enc = unit_rows(torch.randn(n_latents, D, generator=g)).to(dev).requires_grad_(True)   # [latents, D]
    b_enc = ((torch.rand(n_latents, generator=g) * 2 - 1) / D ** 0.5).to(dev).requires_grad_(True)
    w_dec = unit_rows(torch.randn(D, n_latents, generator=g)).to(dev).requires_grad_(True)   # [D, latents]
    tied = torch.zeros(D, device=dev, requires_grad=True)                   # pre-encoder = post-decoder bias
    opt = adam([w_enc, b_enc, w_dec, tied], lr)

    def encode(v):
        return torch.relu((v - tied) @ w_enc.T + b_enc)                      # [.., U, latents]

    with torch.enable_grad():
        for _ in range(epochs):
            with torch.no_grad():
                w_enc.copy_(unit_rows(w_enc))
                w_dec.copy_(unit_rows(w_dec))
            z = encode(xs)
            rec = z @ w_dec.T + tied                                         # [m, U, D]
            loss = torch.nn.functional.mse_loss(rec, xs) + l1 * z.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                w_enc.grad.copy_(drop_radial(w_enc.grad, w_enc))
                w_dec.grad.copy_(drop_radial(w_dec.grad, w_dec))
            opt.step()
    with torch.no_grad():
        w_enc.copy_(unit_rows(w_enc))
        return encode(x).argmax(-1)                                          # [n, U]


def _fit(xs, w_enc, b_enc, w_dec, b_dec, opt, l1, epochs, d_model):
    with torch.enable_grad():
        for _ in range(epochs):
            z = torch.relu(torch.bmm(xs - b_dec, w_enc) + b_enc)               # [U, n, latents]
            rec = torch.bmm(z, w_dec) + b_dec
            loss = sae_loss(xs, rec, z, l1, d_model)
            opt.zero_grad()
            loss.backward()
            opt.step()


def sae_circuit(model, task, n_examples: int = 10, n_latents: int = 200, l1: float = 0.02, lr: float = 1e-3,
                epochs: int = 500, seed: int = 0, check: bool = True, design: str = "shared") -> Circuit:
    """Discrete-SAE node and edge scores (see the module docstring). Positive prompts: the task's
    clean prompts; negative: its corrupted prompts. ``design="shared"``: one SAE trained on
    ``n_examples`` prompts drawn (``seed``) from both pools together; ``"per_head"``: one SAE per head
    trained on the first ``n_examples`` of each pool. Codes are then read on all of the task's
    prompts (counting needs more prompts than ten: with 20 points and 200 latents every prompt can
    get its own code)."""
    if design not in ("shared", "per_head"):
        raise ValueError(f"design={design!r}: use 'shared' (one SAE for all heads, the reference code) or "
                         "'per_head' (one SAE per head)")
    t0 = time.time()
    report = task.check(model) if check else (task.report or {})
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n = len(task)
    k = min(n_examples, n)
    pos = head_means(model, task.clean)
    neg = head_means(model, task.corrupt)
    if design == "shared":                        # the reference's prepare_data: a random draw from the pool
        train = torch.randperm(2 * n, generator=torch.Generator().manual_seed(seed))[:min(n_examples, 2 * n)]
        codes = train_shared_sae(torch.cat([pos, neg]), n_latents, l1, lr, epochs, seed, train=train)
    else:
        train = torch.cat([torch.arange(k), n + torch.arange(k)])
        codes = train_saes(torch.cat([pos, neg]), n_latents, l1, lr, epochs, seed, train=train)   # [2n, U]
    cp, cn = codes[:n], codes[n:]
    U = L * H
    counts = torch.zeros(U)
    for u in range(U):
        counts[u] = len(set(cp[:, u].tolist()) - set(cn[:, u].tolist()))
    node = torch.softmax(counts, 0)
    edges = {}
    layer = torch.arange(U) // H
    pair_counts = {}
    for u in range(U):
        for v in range(U):
            if layer[u] >= layer[v]:
                continue
            pp = set(zip(cp[:, u].tolist(), cp[:, v].tolist()))
            nn_ = set(zip(cn[:, u].tolist(), cn[:, v].tolist()))
            c = len(pp - nn_)
            if c:
                pair_counts[(u, v)] = c
    total = sum(pair_counts.values()) or 1
    for (u, v), c in pair_counts.items():
        edges[f"{head_node(u // H, u % H)}->{head_node(v // H, v % H)}"] = c / total
    nodes = {head_node(u // H, u % H): float(node[u]) for u in range(U)}
    return Circuit(method="sae", task=task.name, model=model.cfg.to_dict(), nodes=nodes, edges=edges,
                   params={"design": design, "n_examples": len(train), "n_latents": n_latents, "l1": l1,
                           "lr": lr, "epochs": epochs, "seed": seed, "positive": "clean prompts", "negative": "corrupted prompts"},
                   paper="O'Neill & Bui 2024, discrete sparse autoencoders for circuit discovery",
                   task_report=report, tensors={"codes": codes, "counts": counts.view(L, H)},
                   seconds=time.time() - t0)
