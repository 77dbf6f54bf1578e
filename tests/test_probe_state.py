"""The probe's active state belongs to the call: threads see only their own edits, hooks and
recorders; nested contexts compose and leave nothing behind. Output-space edits (AddToHead,
HeadAffine, Ablate) act on z once, in PyTorch, with autograd; gradients through hooks equal plain
gradients."""
import sys
import threading

import pytest
import torch

import headscope as hs


@pytest.fixture(scope="module")
def m():
    return hs.load("tiny-llama")


def live_attention_module():
    """The module whose ``headscope_attention`` transformers calls (pytest may import the package
    under a second name; the registered copy is the one that logs)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return sys.modules[ALL_ATTENTION_FUNCTIONS["headscope"].__module__]


def toks(m, seed=0, B=1, N=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, m.cfg.vocab_size, (B, N), generator=g)


def run_threads(fns):
    """Run each fn in its own thread, all started together; return their results in order."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def wrap(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_two_threads_with_different_edits_each_get_their_own_logits(m):
    x = toks(m)
    e1 = [hs.Ablate(0, [0, 1, 2, 3], how="zero")]
    e2 = [hs.Ablate(1, 2, how="uniform"), hs.ScaleKeys(0, 1, keys=((0, 2),), factor=0.3)]
    with torch.no_grad():
        plain = m(x)
        with m.edit(e1):
            want1 = m(x)
        with m.edit(e2):
            want2 = m(x)
    assert (want1 - plain).abs().max() > 1e-3 and (want2 - plain).abs().max() > 1e-3

    inside = threading.Event()
    release = threading.Event()

    def edited(edits, want_event):
        def fn():
            outs = []
            with torch.no_grad(), m.edit(edits):
                if want_event:
                    inside.set()
                    release.wait(10)
                for _ in range(3):
                    outs.append(m(x))
            return outs
        return fn

    def unedited():
        inside.wait(10)                      # another thread holds model.edit now
        with torch.no_grad():
            out = [m(x) for _ in range(3)]
        release.set()
        return out

    r1, r2, r0 = run_threads([edited(e1, True), edited(e2, False), unedited])
    for o in r1:
        torch.testing.assert_close(o, want1, atol=0, rtol=0)
    for o in r2:
        torch.testing.assert_close(o, want2, atol=0, rtol=0)
    for o in r0:
        torch.testing.assert_close(o, plain, atol=0, rtol=0)
    assert not m.state.active()


def test_recorder_in_one_thread_records_nothing_from_another(m):
    x = toks(m)
    started = threading.Event()
    done = threading.Event()

    def recorder():
        with m.record(hs.Stats(sink_k=1), layers=[0]) as rec:
            started.set()
            done.wait(10)                    # the other thread runs the model meanwhile
        return rec.names

    def runner():
        started.wait(10)
        with torch.no_grad():
            m(x)
        done.set()

    names, _ = run_threads([recorder, runner])
    assert names == []
    # and a hook added in one thread never fires for another
    calls = []
    hooked = threading.Event()
    finished = threading.Event()

    def hooker():
        with m.hooks([("blocks.0.attn.hook_z", lambda z, hook: calls.append(1))]):
            hooked.set()
            finished.wait(10)

    def runner2():
        hooked.wait(10)
        with torch.no_grad():
            m(x)
        finished.set()

    run_threads([hooker, runner2])
    assert calls == []


def _z(m, x, layer, edits=()):
    with torch.no_grad(), m.edit(list(edits)):
        _, cache = m.run_with_cache(x, names_filter=hs.hook_name("z", layer))
    return cache["z", layer]


def test_nested_edits_on_one_layer_compose_and_unwind(m):
    x = toks(m)
    d = m.cfg.d_head
    with torch.no_grad():
        plain = m(x)
        # same head: replace (outer, stage 0) then the inner affine (stage 1)
        val = torch.randn(d)
        bias = torch.randn(d)
        with m.edit(hs.Ablate(1, 2, how="mean", mean=val)):
            with m.edit(hs.HeadAffine(1, 2, bias=bias)):
                nested_same = m(x)
            after_inner = m(x)
        with m.edit([hs.Ablate(1, 2, how="mean", mean=val), hs.HeadAffine(1, 2, bias=bias)]):
            together_same = m(x)
        with m.edit(hs.Ablate(1, 2, how="mean", mean=val)):
            outer_only = m(x)
        # different heads of one layer
        with m.edit(hs.Ablate(1, 0)):
            with m.edit(hs.Ablate(1, 3, how="uniform")):
                nested_diff = m(x)
        with m.edit([hs.Ablate(1, 0), hs.Ablate(1, 3, how="uniform")]):
            together_diff = m(x)
    torch.testing.assert_close(nested_same, together_same, atol=1e-6, rtol=0)
    torch.testing.assert_close(after_inner, outer_only, atol=0, rtol=0)
    torch.testing.assert_close(nested_diff, together_diff, atol=1e-6, rtol=0)
    assert (nested_same - plain).abs().max() > 1e-3
    assert not m.state.active()
    z = _z(m, x, 1)
    zs = None
    with torch.no_grad(), m.edit(hs.Ablate(1, 2, how="mean", mean=val)), m.edit(hs.HeadAffine(1, 2, bias=bias)):
        _, cache = m.run_with_cache(x, names_filter=hs.hook_name("z", 1))
        zs = cache["z", 1]
    torch.testing.assert_close(zs[:, :, 2], (val + bias).expand_as(zs[:, :, 2]))
    torch.testing.assert_close(zs[:, :, [0, 1, 3]], z[:, :, [0, 1, 3]])

    # the same edit object twice, nested (== would compare tensors): both unwind
    e = hs.Ablate(1, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with m.edit(e):
            with m.edit(e):
                with m.record(hs.Stats(entropy=True)), m.hooks([("blocks.0.attn.hook_z", lambda z, hook: z)]):
                    raise RuntimeError("boom")
    assert not m.state.active()
    assert m.state.hooks == {} and m.state.recorders == () and m.state.edit_sets == ()
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain, atol=0, rtol=0)


def test_contexts_closed_out_of_order_remove_only_their_own(m):
    a = m.edit(hs.Ablate(0, 1))
    b = m.record(hs.Stats(entropy=True), layers=[0])
    a.__enter__()
    rec = b.__enter__()
    a.__exit__(None, None, None)             # closed before the inner one: only its edit goes
    assert len(m.state.edit_sets) == 0 and m.state.recorders == (rec,)
    b.__exit__(None, None, None)
    assert not m.state.active()


def test_generate_sees_the_callers_edits(m):
    x = toks(m, N=6)
    with m.edit(hs.Ablate(0, [0, 1, 2, 3])):
        edited = m.generate(x, max_new_tokens=4)
    plain = m.generate(x, max_new_tokens=4)
    with torch.no_grad(), m.edit(hs.Ablate(0, [0, 1, 2, 3])):
        step = m(edited[:, :-1])
    assert torch.equal(step[:, x.shape[1] - 1:].argmax(-1), edited[:, x.shape[1]:])
    assert edited.shape == plain.shape


# ---------------------------------------------------------------- output-space edits
def test_add_to_head_equals_the_same_change_in_a_hook_z_hook(m):
    x = toks(m, B=2)
    d = m.cfg.d_head
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(d, generator=g)
    per_example = torch.randn(2, d, generator=g)
    per_pos = torch.randn(2, x.shape[1], 2, d, generator=g)          # two heads: [B, Q, n, d]

    def add(layer_vals):
        def fn(z, hook):
            z = z.clone()
            for h, v in layer_vals:
                z[:, :, h] += v if v.dim() != 2 else v[:, None]
            return z
        return fn

    with torch.no_grad():
        plain = m(x)
        for edit, hooked in [
            (hs.AddToHead(1, 2, vec), add([(2, vec)])),
            (hs.AddToHead(1, 3, per_example), add([(3, per_example)])),
            (hs.AddToHead(1, [0, 2], per_pos), add([(0, per_pos[:, :, 0]), (2, per_pos[:, :, 1])])),
        ]:
            with m.edit(edit):
                a = m(x)
            b = m.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_z", hooked)])
            assert (a - b).abs().max() < 1e-5
            assert (a - plain).abs().max() > 1e-3
        # hook_z sees z after the edit
        seen = {}
        with m.edit(hs.AddToHead(1, 2, vec)):
            m.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: seen.setdefault("z", z))])
        _, cache = m.run_with_cache(x, names_filter="blocks.1.attn.hook_z")
        torch.testing.assert_close(seen["z"][:, :, 2], cache["z", 1][:, :, 2] + vec)
    with pytest.raises(ValueError, match="per-example/per-position"):
        with torch.no_grad(), m.edit(hs.AddToHead(1, 2, per_example)):
            m(toks(m, B=3))


def test_gradients_flow_to_output_edit_tensors(m):
    x = toks(m)
    d = m.cfg.d_head
    vec = torch.zeros(d, requires_grad=True)
    scale = torch.zeros(2, d, requires_grad=True)
    bias = torch.zeros(2, d, requires_grad=True)
    with m.edit([hs.AddToHead(0, 1, vec), hs.HeadAffine(1, [0, 3], scale=scale, bias=bias)]):
        loss = m(x)[0, -1].logsumexp(-1)
    loss.backward()
    for t in (vec, scale, bias):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # the gradient wrt the steering vector equals the gradient wrt z's head slice (summed over pos)
    zs = {}

    def grab(z, hook):
        z.retain_grad()
        zs["z"] = z
        return z
    with m.hooks([("blocks.0.attn.hook_z", grab)]):
        loss2 = m(x)[0, -1].logsumexp(-1)
    loss2.backward()
    torch.testing.assert_close(vec.grad, zs["z"].grad[0, :, 1].sum(0), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- gradients through the probe
def test_gradients_through_instrumented_path_equal_plain_gradients(m, caplog):
    """d loss / d resid_pre[0] with hook_z + a recorder (chunked path; the fused C row pass has no
    backward) and with a pattern hook (reference path) equals the plain SDPA gradient."""
    x = toks(m, B=2, N=10)

    def grad_with(extra_hooks=(), record=False):
        leaf = {}

        def embed(t, hook):
            leaf["e"] = t.detach().clone().requires_grad_(True)
            return leaf["e"]

        hooks = [("blocks.0.hook_resid_pre", embed)] + list(extra_hooks)
        with m.hooks(hooks):
            if record:
                with m.record(hs.Stats(sink_k=1, entropy=True)) as rec:
                    loss = m(x)[:, -3:].logsumexp(-1).sum()
                assert rec["entropy", 1].shape == (2, m.cfg.n_heads, x.shape[1])
            else:
                loss = m(x)[:, -3:].logsumexp(-1).sum()
        loss.backward()
        return leaf["e"].grad

    plain = grad_with()
    live_attention_module()._declined.clear()
    with caplog.at_level("WARNING", logger="headscope"):
        via_chunked = grad_with([("blocks.1.attn.hook_z", lambda z, hook: z)], record=True)
        grad_with([("blocks.1.attn.hook_z", lambda z, hook: z)], record=True)
    via_reference = grad_with([("blocks.0.attn.hook_pattern", lambda p, hook: p)])
    assert plain.abs().max() > 0
    torch.testing.assert_close(via_chunked, plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(via_reference, plain, atol=1e-5, rtol=1e-4)
    from headscope.kernels import cpu_native
    if cpu_native.available():                  # declining the C row pass is said once
        msgs = [r.getMessage() for r in caplog.records if "no backward pass" in r.getMessage()]
        assert len(msgs) == 1 and "row pass" in msgs[0], msgs


def test_state_is_read_only_outside_push_and_pop(m):
    """Adding hooks by mutating ``state.hooks`` (which would be seen by every thread) fails loudly;
    push/pop is the way, and what it adds is seen by torch module hooks and the attention function."""
    with pytest.raises((TypeError, AttributeError)):
        m.state.hooks.setdefault((0, "z"), []).append(print)
    with pytest.raises(TypeError):
        m.state.hooks[(0, "z")] = (print,)
    seen = []
    handle = m.state.push(hooks=[(0, "z", lambda z, hook: seen.append(hook.name)),
                                 (1, "resid_pre", lambda t, hook: seen.append(hook.name))])
    try:
        assert set(m.state.hooks) == {(0, "z"), (1, "resid_pre")}
        with torch.no_grad():
            m(toks(m))
    finally:
        m.state.pop(handle)
    assert seen == ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"]
    assert not m.state.active()


def test_key_positions_are_kept_per_position_tensor_and_follow_in_place_changes():
    """Every layer of a forward shares one position_ids tensor: the key positions are computed once
    for it, and computed again for another tensor, another key count, or after an in-place change."""
    from headscope.probe import attention as pa
    pos = torch.tensor([[5, 6, 7], [0, 1, 2]])
    a = pa._key_pos0(pos, 2, 10, pos.device)
    assert a.tolist() == [-2, -7]
    assert pa._key_pos0(pos, 2, 10, pos.device) is a                  # the next layer: kept
    assert pa._key_pos0(pos, 2, 12, pos.device).tolist() == [-4, -9]  # another key count
    pos.add_(1)                                                        # in place: a new version
    assert pa._key_pos0(pos, 2, 12, pos.device).tolist() == [-3, -8]
    assert pa._key_pos0(pos.clone(), 2, 12, pos.device).tolist() == [-3, -8]
    one = torch.tensor([[3, 4]])
    assert pa._key_pos0(one, 3, 4, one.device).tolist() == [1, 1, 1]  # one row for the batch
    with torch.inference_mode():                                       # no version counter: not kept
        inf = torch.tensor([[5, 6, 7]])
        assert pa._key_pos0(inf, 1, 10, inf.device).tolist() == [-2]
        inf.add_(1)
        assert pa._key_pos0(inf, 1, 10, inf.device).tolist() == [-1]


def test_recording_under_inference_mode_matches_no_grad(smollm2):
    """A forward under torch.inference_mode (tensors without version counters) records what the
    same forward under torch.no_grad records."""
    toks = smollm2.to_tokens("The capital of France is Paris. The capital of Italy is")
    got = []
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), smollm2.record(hs.Stats(sink_k=1, argmax=True)) as rec:
            smollm2(toks)
        got.append({n: rec[n, 3].clone() for n in ("sink_mass", "argmax")})
    assert torch.equal(got[0]["argmax"], got[1]["argmax"])
    torch.testing.assert_close(got[0]["sink_mass"], got[1]["sink_mass"])
