"""Probe hook points for circuits: hook_embed / hook_attn_out / hook_mlp_in / hook_mlp_out and
gradients (bwd_hooks, run_with_cache(incl_bwd=True)) checked against finite differences."""
import pytest
import torch

import headscope as hs


@pytest.fixture(scope="module")
def tiny64():
    m = hs.load("tiny-llama")
    m.model.double()
    return m


def test_module_hook_points_shapes_and_meaning(tiny64):
    toks = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    names = ["hook_embed"] + [f"blocks.{l}.hook_{k}" for l in range(3) for k in ("attn_out", "mlp_in", "mlp_out",
                                                                                     "resid_pre", "resid_post")]
    _, c = tiny64.run_with_cache(toks, names_filter=names)
    for n in names:
        assert c[n].shape == (2, 7, 64), n
    assert torch.equal(c["hook_embed"], c["blocks.0.hook_resid_pre"])
    # llama: resid_post = resid_pre + attn_out + mlp_out
    for l in range(3):
        want = c[f"blocks.{l}.hook_resid_pre"] + c[f"blocks.{l}.hook_attn_out"] + c[f"blocks.{l}.hook_mlp_out"]
        torch.testing.assert_close(c[f"blocks.{l}.hook_resid_post"], want)
    # editing hook_mlp_out changes the output; a filter picks the new names
    base = tiny64(toks)
    out = tiny64.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("hook_mlp_out"), lambda t, hook: t * 0)])
    assert not torch.allclose(base, out)
    with pytest.raises(ValueError, match="hook_embed"):
        tiny64.run_with_cache(toks, names_filter="blocks.0.hook_mlp_nope")


def test_missing_mlp_is_a_clear_error():
    from headscope.probe.module_hooks import find_mlp
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="cannot find the MLP module of decoder layer 3"):
        find_mlp(layer, 3)


@pytest.mark.parametrize("name", ["hook_embed", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z",
                                  "blocks.1.attn.hook_result", "blocks.2.attn.hook_q", "blocks.1.hook_attn_out",
                                  "blocks.2.hook_resid_pre"])
def test_bwd_hooks_match_finite_differences(tiny64, name):
    """The attention kernels compute in float32 even for a float64 model, so the check is a central
    difference along a random unit direction with eps 3e-3 (second-order error cancels) at 1% tolerance."""
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 128, (2, 7), generator=g)

    def metric(lg):
        return (lg[:, -1, 5] - lg[:, -1, 9]).sum()

    got = {}
    lg = tiny64.run_with_hooks(toks, bwd_hooks=[(name, lambda grad, hook: got.__setitem__(hook.name, grad))])
    metric(lg).backward()
    grad = got[name]
    direction = torch.randn(grad.shape, generator=g, dtype=grad.dtype)
    direction /= direction.norm()
    eps = 3e-3

    def shifted(s):
        with torch.no_grad():
            return metric(tiny64.run_with_hooks(toks, fwd_hooks=[(name, lambda t, hook: t + s * direction)]))
    fd = float((shifted(eps) - shifted(-eps)) / (2 * eps))
    an = float((grad * direction).sum())
    assert abs(fd) > 1e-4
    assert an == pytest.approx(fd, rel=1e-2)


def test_run_with_cache_incl_bwd(tiny64):
    toks = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    _, c = tiny64.run_with_cache(toks, names_filter=["blocks.1.attn.hook_z", "hook_embed"], incl_bwd=True,
                                 bwd_metric=lambda lg: lg[0, -1, 3])
    assert c["z_grad", 1].shape == c["z", 1].shape
    got = {}
    lg = tiny64.run_with_hooks(toks, bwd_hooks=[("hook_embed", lambda grad, hook: got.__setitem__("e", grad))])
    lg[0, -1, 3].backward()
    torch.testing.assert_close(c["hook_embed_grad"], got["e"], rtol=1e-4, atol=1e-6)  # float32 kernels
    # default metric: next-token loss, like TransformerLens' return_type="loss"
    _, c2 = tiny64.run_with_cache(toks, names_filter="hook_embed", incl_bwd=True)
    assert c2["hook_embed_grad"].abs().sum() > 0
