"""LoFiT — localized fine-tuning on attention heads (Yin et al. 2024, "LoFiT: Localized Fine-tuning
on LLM Representations", NeurIPS 2024; reference repo fc2869/lo-fit).

Every head's output z_i (before ``o_proj``) becomes ``(1 + A_i) ⊙ z_i + v_i`` with A_i, v_i in
R^{d_head} (§3, eq. 2) — the probe's ``HeadAffine`` edit, applied after the attention kernel in plain
PyTorch, so gradients reach A and v while every weight of the model stays frozen.

1. ``train_scales`` (§3.1, head selection): train only A on all heads (init N(0, 1e-3)) with the task
   loss + λ·Σ|A| (L1, λ = 5e-4 … 5e-3 in the paper); rank heads by ||A_i||_2 (``scale_norms``).
2. ``train_offsets`` (§3.2, bias tuning): on the unedited model, train only v on the top-K heads
   (init N(0, 1e-3), λ = 0).

The paper's defaults for Llama-2-7B are K = 32 of 1024 heads (3%), lr 5e-3 (step 1) and 1e-2
(step 2), 5 epochs, batch 8; here K, epochs and sizes are arguments (small models, small tasks).
Both steps train as the reference does (``lofit_trainer.py``: Hugging Face ``Trainer`` with its
default ``TrainingArguments``): AdamW without weight decay, the learning rate decaying linearly from
its value to 0 over all steps, no warm-up, gradients clipped to a total norm of 1.0
(``LoFiTConfig.schedule`` / ``max_grad_norm``; "constant" and None switch them off).
The task loss is the cross-entropy of the right answer's token at the last prompt position
(``tasks.score_examples`` measures it).

``fold`` writes learned edits into ``o_proj`` (weight columns scaled by 1 + A, bias += W_O v), so a
plain Hugging Face model reproduces the edited one without headscope.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..heads.scores import HeadScores
from ..probe.edits import HeadAffine, apply_output_edits, compile_edits
from .tasks import Example, batches, pad_id

PAPER = "Yin et al. 2024, LoFiT: Localized Fine-tuning on LLM Representations (NeurIPS), §3"


@dataclass
class LoFiTConfig:
    """LoFiT settings (Yin et al. 2024, §3; the paper's Llama-2-7B values in the module docstring).
    Fields: k heads kept for step 2; lam L1 weight on A in step 1; lr_scale, lr_offset the AdamW learning
    rates of steps 1 and 2; epochs, batch_size per step; init_std std of A and v at init; seed;
    schedule "linear" (the reference's: the rate decays linearly to 0 over the step's updates) or
    "constant"; max_grad_norm the total gradient norm each update is clipped to (None: no clipping)."""
    k: int = 8                   # heads kept for step 2
    lam: float = 5e-4            # L1 weight on A in step 1
    lr_scale: float = 5e-3       # step 1 learning rate
    lr_offset: float = 1e-2      # step 2 learning rate
    epochs: int = 2
    batch_size: int = 8
    init_std: float = 1e-3
    seed: int = 0
    schedule: str = "linear"     # the reference's (HF Trainer default): lr decays linearly to 0
    max_grad_norm: float | None = 1.0   # HF Trainer default clipping

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"LoFiTConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"LoFiTConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


SCHEDULES = ("linear", "constant")


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate's multiplier at update ``step`` (0-based) of ``total``: "linear" decays from 1
    to 0 as transformers' ``get_linear_schedule_with_warmup`` with no warm-up, (total - step) / total;
    "constant" is 1."""
    return max(0.0, (total - step) / total) if schedule == "linear" else 1.0


def _task_loss(model, toks, mask, choices, labels, edits) -> torch.Tensor:
    """Mean cross-entropy of the right answer's token at the last position, with ``edits``."""
    dev = model.device
    with model.edit(edits):
        logits = model(toks, attention_mask=mask, logits_to_keep=1)[:, -1].float()      # [B, V]
    target = choices.gather(1, labels[:, None])[:, 0].to(dev)                             # [B]
    return nn.functional.cross_entropy(logits, target)


def _freeze(model) -> list[bool]:
    flags = [p.requires_grad for p in model.model.parameters()]
    for p in model.model.parameters():
        p.requires_grad_(False)
    return flags


def _unfreeze(model, flags) -> None:
    for p, f in zip(model.model.parameters(), flags):
        p.requires_grad_(f)


def _train(model, examples, params, make_edits, lr, epochs, batch_size, seed, penalty, desc, progress,
           schedule: str = "linear", max_grad_norm: float | None = 1.0):
    """AdamW on ``params`` only, the rate scheduled by ``lr_factor``, gradients clipped to
    ``max_grad_norm``; returns the loss of every step."""
    from tqdm.auto import tqdm
    if not examples:
        raise ValueError("no training examples")
    flags = _freeze(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    pid = pad_id(model)
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    n_updates = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(schedule, step, n_updates))
    losses = []
    try:
        with tqdm(total=n_updates, desc=desc, disable=not progress) as bar:
            for _ in range(epochs):
                order = torch.randperm(len(examples), generator=g).tolist()
                for toks, mask, choices, labels in batches([examples[i] for i in order], batch_size, pid):
                    loss = _task_loss(model, toks, mask, choices, labels, make_edits())
                    total = loss + penalty() if penalty is not None else loss
                    opt.zero_grad()
                    total.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        _unfreeze(model, flags)
    return losses


def scale_edits(A: torch.Tensor) -> list[HeadAffine]:
    """A [layer, head, d_head] -> one HeadAffine per layer scaling every head."""
    return [HeadAffine(l, list(range(A.shape[1])), scale=A[l]) for l in range(A.shape[0])]


def offset_edits(heads, v: torch.Tensor) -> list[HeadAffine]:
    """heads [(layer, head)] and v [K, d_head] -> one HeadAffine per layer adding the offsets."""
    by_layer: dict[int, list[int]] = {}
    for i, (l, _) in enumerate(heads):
        by_layer.setdefault(int(l), []).append(i)
    return [HeadAffine(l, [int(heads[i][1]) for i in idx], bias=v[idx]) for l, idx in sorted(by_layer.items())]


def train_scales(model, train: list[Example], cfg: LoFiTConfig = LoFiTConfig(), progress: bool = True):
    """Step 1: (A [layer, head, d_head], losses). Only A trains; loss + lam * sum|A|."""
    L, H, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    g = torch.Generator().manual_seed(cfg.seed)
    # kept on the CPU: compile_edits moves the compiled edit to the model's device (differentiably)
    A = (torch.randn(L, H, d, generator=g) * cfg.init_std).requires_grad_()
    losses = _train(model, train, [A], lambda: scale_edits(A), cfg.lr_scale, cfg.epochs, cfg.batch_size,
                    cfg.seed, lambda: cfg.lam * A.abs().sum(), "LoFiT step 1 (scales A)", progress,
                    cfg.schedule, cfg.max_grad_norm)
    return A.detach(), losses


def scale_norms(model, A: torch.Tensor, dataset: str = "", seconds: float = 0.0, **params) -> HeadScores:
    """||A_i||_2 per head as HeadScores (LoFiT's head ranking, §3.1)."""
    return HeadScores(scores=A.norm(dim=-1).cpu(), method="lofit", paper=PAPER, params=params,
                      model=model.cfg.to_dict(), dataset=dataset, seconds=seconds,
                      description="L2 norm of the learned LoFiT scale A: heads the task wants to change most")


def train_offsets(model, train: list[Example], heads, cfg: LoFiTConfig = LoFiTConfig(),
                  progress: bool = True):
    """Step 2: (v [K, d_head], losses) for ``heads`` [(layer, head)]; only v trains, no penalty."""
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("train_offsets needs at least one head")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    v = (torch.randn(len(heads), model.cfg.d_head, generator=g) * cfg.init_std).requires_grad_()
    losses = _train(model, train, [v], lambda: offset_edits(heads, v), cfg.lr_offset, cfg.epochs,
                    cfg.batch_size, cfg.seed + 1, None, "LoFiT step 2 (offsets v)", progress,
                    cfg.schedule, cfg.max_grad_norm)
    return v.detach(), losses


@dataclass
class LoFiTResult:
    """A trained LoFiT edit (Yin et al. 2024, §3; ``lofit``). Fields: heads the K selected (layer, head),
    best first; v [K, d_head] learned offsets; norms ||A_i||_2 of step 1 as HeadScores [layer, head];
    losses_scale, losses_offset the task loss (nats) of every training step of steps 1 and 2;
    config the LoFiTConfig; seconds wall time; params extra settings (``lofit`` leaves it empty)."""
    heads: list[tuple[int, int]]          # the K selected heads, best first
    v: torch.Tensor                        # [K, d_head] learned offsets
    norms: HeadScores                      # ||A_i|| of step 1
    losses_scale: list[float]
    losses_offset: list[float]
    config: LoFiTConfig
    seconds: float = 0.0
    params: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """Parameters of the final edit (step 2's offsets): K · d_head."""
        return int(self.v.numel())

    def edits(self) -> list[HeadAffine]:
        """The learned edit: HeadAffine offsets v on ``heads``, one per layer (``offset_edits``)."""
        return offset_edits(self.heads, self.v)


def top_heads(norms: HeadScores, k: int) -> list[tuple[int, int]]:
    """The k heads with the largest score, best first."""
    s = norms.scores
    idx = s.flatten().argsort(descending=True)[:k]
    return [(int(i) // s.shape[1], int(i) % s.shape[1]) for i in idx]


def lofit(model, train: list[Example], cfg: LoFiTConfig = LoFiTConfig(), progress: bool = True,
          dataset: str = "") -> LoFiTResult:
    """Both steps: select the top-``cfg.k`` heads by ||A||, then learn their offsets v."""
    if not 0 < cfg.k <= model.cfg.n_layers * model.cfg.n_heads:
        raise ValueError(f"k={cfg.k}: choose 1..{model.cfg.n_layers * model.cfg.n_heads} heads")
    t0 = time.time()
    A, l1 = train_scales(model, train, cfg, progress)
    norms = scale_norms(model, A, dataset, time.time() - t0, **vars(cfg))
    heads = top_heads(norms, cfg.k)
    v, l2 = train_offsets(model, train, heads, cfg, progress)
    return LoFiTResult(heads, v, norms, l1, l2, cfg, time.time() - t0)


def _out_projection(model, layer: int) -> nn.Module:
    attn = model.attn[layer]
    for name in ("o_proj", "c_proj", "dense", "out_proj"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise TypeError(f"layer {layer}: no output projection found on {type(attn).__name__}")


def fold(model, edits) -> nn.Module:
    """Write output-space edits into the attention output projections of ``model`` (a HookedModel;
    its HF model is changed in place and returned), so a plain Hugging Face model reproduces the
    edited one. The output edits of a layer are elementwise affine in z (``HeadAffine``: (1 + A) z
    + v, LoFiT eq. 2; ``AddToHead``; ``Ablate`` zero/mean), so together they are z -> m ⊙ z + b with
    b = f(0) and m = f(1) - f(0); then W_O[:, head] *= m and b_O += W_O b. A projection without a
    bias gets one. Probability-space edits (``Ablate(how="uniform")``, ``ScaleKeys``,
    ``StreamingGate``) change attention itself and cannot be folded: they raise."""
    cfg = model.cfg
    compiled = compile_edits(list(edits), cfg.n_layers, cfg.n_heads, cfg.d_head)
    if compiled.prob:
        raise ValueError(f"layers {sorted(compiled.prob)}: only output-space edits (HeadAffine, AddToHead, "
                         "Ablate zero/mean) can be folded into o_proj; attention edits cannot")
    H, d = cfg.n_heads, cfg.d_head
    with torch.no_grad():
        for layer, out_edits in compiled.out.items():
            zero = torch.zeros(1, 1, H, d)
            b = apply_output_edits(zero, out_edits)[0, 0]                     # [H, d]
            m = apply_output_edits(zero + 1, out_edits)[0, 0] - b             # [H, d]
            proj = _out_projection(model, layer)
            transposed = not isinstance(proj, nn.Linear)          # GPT-2 Conv1D: weight [in, out]
            W = proj.weight.T if transposed else proj.weight      # view [d_model, H*d]
            W0 = W.detach().clone()
            W.mul_(m.to(W0).reshape(1, H * d))
            shift = W0 @ b.to(W0).reshape(H * d)                   # [d_model]
            if proj.bias is None:
                proj.bias = nn.Parameter(torch.zeros(W0.shape[0], dtype=W0.dtype, device=W0.device),
                                         requires_grad=False)
            proj.bias.add_(shift)
    return model.model


@dataclass
class LoFiTComparison:
    """LoFiT against its controls (Yin et al. 2024, §5.2; ``compare``). Fields: result the task-selected
    LoFiTResult; rows controls.Row per condition (base, top-K, random-K, other-task top-K when given);
    other_heads the other task's top-K or None; random_sets the random head sets; seconds wall time."""
    result: LoFiTResult                    # the task-selected edit
    rows: list                             # controls.Row: base, top-K, random-K, other-task
    other_heads: list[tuple[int, int]] | None
    random_sets: list[list[tuple[int, int]]]
    seconds: float = 0.0


def compare(model, train: list[Example], test: list[Example], cfg: LoFiTConfig = LoFiTConfig(),
            other_train: list[Example] | None = None, n_random: int = 10, batch_size: int = 16,
            progress: bool = True, dataset: str = "") -> LoFiTComparison:
    """LoFiT with its controls (Yin et al. 2024, §5.2), all on the held-out ``test``:
    the base model; offsets on the top-K heads by ||A||; offsets on ``n_random`` random sets of K
    heads; offsets on the top-K heads selected (step 1) on ``other_train``, a different task. Every
    condition trains v the same way (same examples, epochs, learning rate, seed)."""
    from .controls import Row, random_head_sets
    from .tasks import score_examples
    t0 = time.time()
    d = model.cfg.d_head
    ok, loss = score_examples(model, test, (), batch_size)
    rows = [Row("base", ok, loss)]
    res = lofit(model, train, cfg, progress, dataset)
    ok, loss = score_examples(model, test, res.edits(), batch_size)
    rows.append(Row(f"LoFiT top-{cfg.k}", ok, loss, res.n_params, cfg.k, res.heads))
    sets = random_head_sets(model.cfg.n_layers, model.cfg.n_heads, cfg.k, n_random, cfg.seed)
    oks, losses = [], []
    for i, heads in enumerate(sets):
        v, _ = train_offsets(model, train, heads, cfg, progress)
        ok, loss = score_examples(model, test, offset_edits(heads, v), batch_size)
        oks.append(ok)
        losses.append(loss)
    if sets:
        rows.append(Row(f"random-{cfg.k}", torch.stack(oks), torch.stack(losses), cfg.k * d, cfg.k, sets))
    other = None
    if other_train:
        A, _ = train_scales(model, other_train, cfg, progress)
        other = top_heads(scale_norms(model, A), cfg.k)
        v, _ = train_offsets(model, train, other, cfg, progress)
        ok, loss = score_examples(model, test, offset_edits(other, v), batch_size)
        rows.append(Row(f"other-task top-{cfg.k}", ok, loss, cfg.k * d, cfg.k, other))
    return LoFiTComparison(res, rows, other, sets, time.time() - t0)
