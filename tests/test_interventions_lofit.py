"""LoFiT (Yin et al. 2024): training lowers the loss and touches only A / v; folding into o_proj
reproduces the edited model; saved edits load back."""
import copy

import pytest
import torch

import headscope as hs
from headscope.interventions import edits_io, lofit, tasks


@pytest.fixture(scope="module")
def tiny():
    return hs.load("tiny-llama")


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.model.named_parameters()}


def test_training_lowers_loss_and_touches_only_a_v(tiny):
    task = tasks.token_task(n=48, seed=1)
    sp = task.splits(seed=0, n_train=32, n_calibration=0, n_test=16)
    before = _snapshot(tiny)
    flags = [p.requires_grad for p in tiny.model.parameters()]
    _, loss0 = tasks.score_examples(tiny, sp["train"])
    cfg = lofit.LoFiTConfig(k=3, epochs=6, batch_size=8, lr_scale=5e-2, lr_offset=5e-2)
    res = lofit.lofit(tiny, sp["train"], cfg, progress=False)
    _, loss1 = tasks.score_examples(tiny, sp["train"], res.edits())
    assert loss1.mean() < loss0.mean() - 0.05, (loss0.mean(), loss1.mean())
    assert res.losses_scale[-1] < res.losses_scale[0] or res.losses_offset[-1] < res.losses_offset[0]
    after = _snapshot(tiny)
    assert all(torch.equal(before[n], after[n]) for n in before)       # base weights bit-identical
    assert [p.requires_grad for p in tiny.model.parameters()] == flags  # freezing undone
    assert res.n_params == 3 * tiny.cfg.d_head
    assert len(set(res.heads)) == 3
    # the selected heads are the top-3 by ||A||
    s = res.norms.scores
    assert min(float(s[l, h]) for l, h in res.heads) >= float(s.flatten().sort(descending=True).values[2])


def test_schedule_is_the_reference_trainers():
    """The reference trains with Hugging Face's Trainer defaults: the rate decays linearly to 0 with no
    warm-up (transformers.get_linear_schedule_with_warmup) and gradients are clipped to norm 1.0."""
    from transformers import get_linear_schedule_with_warmup
    for total in (1, 4, 7):
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
        sch = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=total)
        for step in range(total):
            assert lofit.lr_factor("linear", step, total) == pytest.approx(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        assert lofit.lr_factor("constant", total - 1, total) == 1.0
    cfg = lofit.LoFiTConfig()
    assert (cfg.schedule, cfg.max_grad_norm) == ("linear", 1.0)
    with pytest.raises(ValueError, match="schedule"):
        lofit.LoFiTConfig(schedule="cosine")
    with pytest.raises(ValueError, match="max_grad_norm"):
        lofit.LoFiTConfig(max_grad_norm=0.0)


def test_clipping_bounds_the_first_update(tiny):
    """Adam's first update moves each coordinate by about lr whatever the gradient's size, so clipping
    shows in AdamW's second moment only; here: with clipping at 1e-8 every gradient is tiny, Adam's eps
    (1e-8) dominates, and v moves far less than without clipping (one update, lr 1e-2)."""
    task = tasks.token_task(n=16, seed=3)
    train = task.splits(seed=0, n_train=8, n_calibration=0, n_test=8)["train"]
    heads = [(0, 1), (2, 3)]
    moved = {}
    for clip in (None, 1e-8):
        cfg = lofit.LoFiTConfig(k=2, epochs=1, batch_size=8, lr_offset=1e-2, max_grad_norm=clip, init_std=0.0)
        v, _ = lofit.train_offsets(tiny, train, heads, cfg, progress=False)
        moved[clip] = v.abs().max().item()
    assert moved[None] == pytest.approx(1e-2, rel=0.05)                 # Adam: |step| = lr on the first update
    assert moved[1e-8] < 0.6e-2                                          # clipped: g ~ eps, step ~ lr * g / (g + eps)


def test_fold_equals_edit(tiny):
    L, H, d = tiny.cfg.n_layers, tiny.cfg.n_heads, tiny.cfg.d_head
    g = torch.Generator().manual_seed(3)
    edits = [hs.HeadAffine(0, [1, 2], scale=torch.randn(2, d, generator=g) * 0.3, bias=torch.randn(2, d, generator=g)),
             hs.HeadAffine(2, 0, bias=torch.randn(d, generator=g)),
             hs.HeadAffine(2, 0, scale=torch.randn(d, generator=g) * 0.2),        # composes with the one above
             hs.AddToHead(1, 3, vector=torch.randn(d, generator=g)), hs.Ablate(1, 2, how="zero")]
    toks = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad(), tiny.edit(edits):
        edited = tiny(toks)
    base = tiny(toks)
    clone = hs.load(copy.deepcopy(tiny.model))
    plain = lofit.fold(clone, edits)
    plain.set_attn_implementation("eager")                              # no headscope path at all
    with torch.no_grad():
        folded = plain(input_ids=toks).logits
    assert (folded - edited).abs().max() < 1e-4
    assert (folded - base).abs().max() > 1e-2                            # the edit does something
    assert plain.model.layers[0].self_attn.o_proj.bias is not None


def test_fold_refuses_other_edits(tiny):
    with pytest.raises(ValueError, match="only output-space edits"):
        lofit.fold(hs.load(copy.deepcopy(tiny.model)), [hs.Ablate(0, 1, how="uniform")])


def test_save_load_round_trip(tiny, tmp_path):
    d = tiny.cfg.d_head
    edits = [hs.HeadAffine(1, [0, 3], bias=torch.randn(2, d)), hs.Ablate(2, 1, how="uniform"),
             hs.ScaleKeys(0, 2, keys=[(0, 1)], factor=0.4), hs.AddToHead(2, [0, 1], vector=torch.randn(d))]
    out = edits_io.save_edits(tmp_path / "e", edits, meta={"task": "x"})
    edits_io.save_edits(out, edits[:1])                                 # replacing an existing folder
    back, meta = edits_io.load_edits(out, with_meta=True)
    assert len(back) == 1 and meta == {}
    edits_io.save_edits(out, edits, meta={"task": "x"})
    back, meta = edits_io.load_edits(out, with_meta=True)
    assert meta == {"task": "x"} and [type(e) for e in back] == [type(e) for e in edits]
    assert hs.load_edits is edits_io.load_edits and hs.save_edits is edits_io.save_edits   # hs.load_edits(DIR)
    toks = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        with tiny.edit(edits):
            a = tiny(toks)
        with tiny.edit(back):
            b = tiny(toks)
    assert torch.equal(a, b)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())     # no temp folders left
    with pytest.raises(FileNotFoundError, match="no saved edits"):
        edits_io.load_edits(tmp_path)
