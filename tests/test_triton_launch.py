"""``kernels/launch.py``: the compiled-kernel launch keeps Triton's specialisation (its key holds
everything Triton's own ``native_specialize_impl`` reads) and falls back, saying so once, when
Triton disagrees. On the CPU with a stand-in for the compiled kernel; the GPU tests of the Triton
paths (``test_kernels_decode.py``, ``test_triton_kernels.py``) run the real launches."""
import itertools
import logging

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from headscope.kernels import launch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _values():
    ints = [0, 1, 2, 15, 16, 17, 32, 48, -16, -1, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16,
            -2 ** 31, -2 ** 31 - 16, 2 ** 62, 2 ** 63, 2 ** 63 + 16]
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base[8:]]
    for dt in (torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool):
        t = torch.zeros(64, dtype=dt)
        tensors += [t, t[1:], t[16:]]
    return ints + tensors + [0.0, 1.0, 1.5, -2.0, True, False, None]


def test_equal_facts_mean_equal_triton_specialisation():
    """Two argument values with the same ``specialization_fact`` get the same specialisation from
    Triton itself, for ints around every boundary, tensors of several dtypes and alignments,
    floats, bools and None. (A finer key only costs cache entries; a coarser one would reuse a
    kernel compiled for the wrong arguments, which this would catch after a Triton upgrade.)"""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError as e:
        pytest.skip(f"this Triton has no native_specialize_impl to compare with ({e})")
    vals = _values()
    facts = [launch.specialization_fact(v) for v in vals]
    native = [native_specialize_impl(BaseBackend, v, False, True, True) for v in vals]
    for (i, a), (j, b) in itertools.combinations(enumerate(facts), 2):
        if a == b:
            assert native[i] == native[j], (vals[i], vals[j], a, native[i], native[j])
    # and the facts do tell apart what Triton tells apart
    assert len(set(facts)) == len(set(map(str, native)))


def test_the_bulk_facts_equal_the_fact_of_each_value():
    """``specialization_facts`` (the key's fast form) gives ``specialization_fact`` of each value,
    for every value above and for a tensor subclass (a Parameter)."""
    vals = _values() + [torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))[1:]]
    assert launch.specialization_facts(vals) == tuple(launch.specialization_fact(v) for v in vals)
    assert launch.specialization_facts(()) == ()


def toy(X, n, scale, Y, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


class Compiled:
    """Stands in for a ``CompiledKernel``: records each direct launch."""

    def __init__(self, name):
        self.name, self.launches = name, []

    def run(self, *args):
        raise AssertionError("launched through __getitem__ only")

    def __getitem__(self, grid):
        return lambda *vals: self.launches.append((grid, vals))


class ToyJIT(JITFunction):
    """A real ``JITFunction`` whose launch and warmup are recorded instead of compiled."""

    def __init__(self, fn):
        super().__init__(fn)
        self.jit_launches, self.warmups, self.compiled, self.other = [], 0, {}, None

    def _kernel_for(self, kw):
        key = (kw["BLOCK"], kw.get("FLAG", False))
        return self.compiled.setdefault(key, Compiled(key))

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.jit_launches.append((grid, args, kw))
            return self._kernel_for(kw)
        return run

    def warmup(self, *args, grid, **kw):
        self.warmups += 1
        return self.other if self.other is not None else self._kernel_for(kw)


@pytest.fixture
def toy_kernel(monkeypatch):
    monkeypatch.setattr(launch, "_GET_DEVICE", lambda: 0)
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k = ToyJIT(toy)
    f = launch.FastLaunch(k)
    assert f.on
    yield k, f
    launch._FAST.pop(id(k), None)


def test_first_call_compiles_then_the_compiled_kernel_is_launched(toy_kernel):
    k, f = toy_kernel
    x, y = torch.zeros(32), torch.zeros(32)
    f[(4,)](x, 17, 0.5, y, BLOCK=64, num_warps=4)          # new key: through JITFunction
    assert len(k.jit_launches) == 1 and k.warmups == 0
    f[(4,)](x, 33, 0.25, Y=y, BLOCK=64, num_warps=4)       # same facts (n not 1, not /16, i32): reused,
    assert len(k.jit_launches) == 1 and k.warmups == 1     # checked once against Triton's choice
    c = k.compiled[(64, False)]
    assert c.launches == [((4, 1, 1), (x, 33, 0.25, y, 64, False))]      # every parameter, in order
    f[(8, 2)](x, 49, 1.0, y, BLOCK=64, num_warps=4)
    assert k.warmups == 1 and c.launches[-1] == ((8, 2, 1), (x, 49, 1.0, y, 64, False))
    # what Triton specialises on makes a new key: n divisible by 16, n == 1, a constexpr, an option,
    # a misaligned tensor
    for args, kw in (((x, 32, 1.0, y), dict(BLOCK=64, num_warps=4)), ((x, 1, 1.0, y), dict(BLOCK=64, num_warps=4)),
                     ((x, 17, 1.0, y), dict(BLOCK=128, num_warps=4)), ((x, 17, 1.0, y), dict(BLOCK=64, num_warps=8)),
                     ((x[1:], 17, 1.0, y), dict(BLOCK=64, num_warps=4))):
        before = len(k.jit_launches)
        f[(4,)](*args, **kw)
        assert len(k.jit_launches) == before + 1, (args[1], kw)


def test_a_disagreement_with_triton_turns_fast_launch_off_once(toy_kernel, caplog):
    k, f = toy_kernel
    x, y = torch.zeros(32), torch.zeros(32)
    f[(4,)](x, 17, 0.5, y, BLOCK=64)
    k.other = Compiled("another")
    with caplog.at_level(logging.WARNING, logger="headscope"):
        f[(4,)](x, 33, 0.5, y, BLOCK=64)
    assert [r.getMessage() for r in caplog.records if "JITFunction" in r.getMessage()]
    assert not f.on and len(k.jit_launches) == 2 and not k.compiled[(64, False)].launches
    f[(4,)](x, 33, 0.5, y, BLOCK=64)                       # from now on: JITFunction, every call
    assert len(k.jit_launches) == 3


def test_off_under_the_interpreter_and_for_other_callables(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch.FastLaunch(ToyJIT(toy)).on
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not launch.FastLaunch(lambda: None).on
    monkeypatch.setattr(launch, "ENABLED", False)
    assert not launch.FastLaunch(ToyJIT(toy)).on


def test_a_triton_without_what_the_fast_launch_reads_is_said_once(monkeypatch, caplog):
    """Another Triton's JITFunction without ``params`` / ``warmup`` as read here: Triton's own launch,
    and one warning that says so (not one per kernel)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_SAID", set())
    k1, k2 = ToyJIT(toy), ToyJIT(toy)
    for k in (k1, k2):
        monkeypatch.setattr(k, "params", [object()])           # no .name / .is_constexpr
    with caplog.at_level(logging.WARNING, logger="headscope"):
        assert not launch.FastLaunch(k1).on and not launch.FastLaunch(k2).on
    said = [r.getMessage() for r in caplog.records if "JITFunction" in r.getMessage()]
    assert len(said) == 1, said
    f = launch.FastLaunch(k1)
    f[(2,)](torch.zeros(4), 3, 1.0, torch.zeros(4), BLOCK=16)
    assert len(k1.jit_launches) == 1                        # through Triton


class Direct(Compiled):
    """A compiled kernel with what the direct launch reads: Triton's launcher (``run``), the function
    handle and the packed metadata, as a ``CompiledKernel`` has them after its first launch."""

    def __init__(self, name):
        super().__init__(name)
        self.function, self.packed_metadata, self.direct = f"fn-{name}", ("meta", name), []

    def run(self, *args):
        self.direct.append(args)


def test_a_kept_kernel_is_launched_by_the_launcher_call_its_runner_makes(toy_kernel, monkeypatch):
    """After its first launch through ``compiled[grid]``, a kept kernel is launched by calling Triton's
    launcher directly, with the arguments ``CompiledKernel.__getitem__``'s runner passes: grid, the
    current stream, function, packed metadata, no launch metadata and no hooks, then every
    parameter. With a launch hook set (a profiler), ``compiled[grid]`` again, so the hook runs."""
    k, f = toy_kernel
    k._kernel_for = lambda kw: k.compiled.setdefault(kw["BLOCK"], Direct(kw["BLOCK"]))
    monkeypatch.setattr(launch, "_RAW_STREAM", lambda device: 7000 + device)
    monkeypatch.setattr(launch, "_DIRECT_OK", True)
    x, y = torch.zeros(32), torch.zeros(32)
    b = f.bind(BLOCK=64, num_warps=4)
    b[(4,)](x, 17, 0.5, y)                                 # compiles (JITFunction)
    b[(4,)](x, 33, 0.5, y)                                 # checked against warmup, then compiled[grid]
    c = k.compiled[64]
    assert c.launches == [((4, 1, 1), (x, 33, 0.5, y, 64, False))] and not c.direct
    b[(8, 2)](x, 49, 0.25, y)                              # from now on: the launcher itself
    assert c.direct == [(8, 2, 1, 7000, "fn-64", ("meta", 64), None, None, None, x, 49, 0.25, y, 64, False)]
    assert len(c.launches) == 1 and len(k.jit_launches) == 1
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: False)
    b[(4,)](x, 17, 0.5, y)
    assert len(c.launches) == 2 and len(c.direct) == 1
    # a Triton whose runner launches otherwise: compiled[grid], every call
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: True)
    monkeypatch.setattr(launch, "_DIRECT_OK", False)
    monkeypatch.setattr(launch, "_SAID", {"this Triton's CompiledKernel launches otherwise than headscope's "
                                          "direct call reads it"})
    b2 = f.bind(BLOCK=32, num_warps=4)
    for n in (17, 33, 49):
        b2[(4,)](x, n, 0.5, y)
    assert len(k.compiled[32].launches) == 2 and not k.compiled[32].direct


def test_the_direct_launch_passes_cuda_tensors_as_their_addresses():
    """Triton's launcher takes an int pointer argument as the address itself and asks the driver
    about every tensor's; ``addresses`` gives it the ints for plain CUDA tensors only. Anything else
    (ints, floats, None, CPU tensors, tensor subclasses) passes unchanged, so the launcher checks it
    as before (a CPU tensor is refused with Triton's own message)."""
    x, p = torch.zeros(4), torch.nn.Parameter(torch.zeros(2))
    vals = (x, 3, 0.5, None, p, True, "tf32")
    got = launch.addresses(vals)
    assert len(got) == len(vals) and all(a is b for a, b in zip(got, vals))
    if torch.cuda.is_available():
        c = torch.arange(6, device="cuda")[2:]
        pc = torch.nn.Parameter(torch.zeros(2, device="cuda"))
        got = launch.addresses((c, x, 7, pc))
        assert got[0] == c.data_ptr() and type(got[0]) is int
        assert got[1] is x and got[2] == 7 and got[3] is pc


def _keyed_toy(toy_kernel, monkeypatch):
    """The toy kernel set up for keyed launches on the CPU: kept compiled kernels that launch directly
    (a stand-in stream per device), CPU tensors standing in for aligned CUDA ones. Returns (kernel,
    its bound form at BLOCK=64, x, y)."""
    k, f = toy_kernel
    k._kernel_for = lambda kw: k.compiled.setdefault(kw["BLOCK"], Direct(kw["BLOCK"]))
    monkeypatch.setattr(launch, "_RAW_STREAM", lambda device: 7000 + device)
    monkeypatch.setattr(launch, "_DIRECT_OK", True)
    monkeypatch.setattr(launch, "_plain_cuda_aligned", lambda x: type(x) is torch.Tensor and not x.data_ptr() & 15)
    return k, f.bind(BLOCK=64, num_warps=4), torch.zeros(32), torch.zeros(32)


def test_a_keyed_launch_skips_the_key_until_a_tensor_is_misaligned(toy_kernel, monkeypatch):
    """``run_keyed``: once the caller key's kernel launches directly, a call passes its tensors as
    their addresses without the full key; a misaligned tensor or a launch hook takes the general
    path (a misaligned x is another specialisation: Triton compiles it), as does a tensor subclass;
    ``VERIFY_KEYED`` catches a caller key that misses a fact (here 32 is divisible by 16, 17 is not).
    On the CPU, with CPU tensors standing in for CUDA ones."""
    k, b, x, y = _keyed_toy(toy_kernel, monkeypatch)
    for _ in range(3):                                     # compile; check + compiled[grid], then kept
        b.run_keyed("ck", (4,), (x, 17, 0.5, y))
    c = k.compiled[64]
    assert "ck" in b.keyed and len(k.jit_launches) == 1 and len(c.launches) == 1
    assert c.direct == [(4, 1, 1, 7000, "fn-64", ("meta", 64), None, None, None,
                         x.data_ptr(), 17, 0.5, y.data_ptr(), 64, False)]
    b.run_keyed("ck", (4,), (x[1:], 17, 0.5, y))            # misaligned: the general path, a new kernel key
    assert len(c.direct) == 1 and len(k.jit_launches) == 2
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: False)
    b.run_keyed("ck", (4,), (x, 17, 0.5, y))                # a hook: compiled[grid]
    assert len(c.direct) == 1 and len(c.launches) == 2
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: True)
    p = torch.nn.Parameter(torch.zeros(32))                 # a tensor subclass: the general path, no error
    b.run_keyed("ck", (4,), (p, 17, 0.5, y))
    assert len(c.direct) == 2 and c.direct[-1][9] is p
    monkeypatch.setattr(launch, "VERIFY_KEYED", True)
    b.run_keyed("ck", (4,), (x, 33, 0.5, y))                # same facts as 17: fine
    with pytest.raises(AssertionError, match="caller key"):
        b.run_keyed("ck", (4,), (x, 32, 0.5, y))


def test_a_kept_kernel_launches_from_addresses_and_verifies_against_tensors(toy_kernel, monkeypatch):
    """``launch_kept``: the kernel ``run_keyed`` kept for a caller key, launched with arguments that
    are already addresses (``triton_decode.fast_attention``'s call); False, launching nothing, for
    an unknown key, another device, a set launch hook or fast launch off. ``verify_kept``: the full
    key of the tensor arguments must be the kept one. On the CPU, CPU tensors standing in."""
    k, b, x, y = _keyed_toy(toy_kernel, monkeypatch)
    assert not b.launch_kept("ck", (4,), [x.data_ptr(), 17, 0.5, y.data_ptr()], 0)     # nothing kept yet
    for _ in range(3):
        b.run_keyed("ck", (4,), (x, 17, 0.5, y))
    c, dev = k.compiled[64], b.keyed["ck"][2][0]
    n = len(c.direct)
    assert b.launch_kept("ck", (8, 2), [x.data_ptr(), 33, 0.25, y.data_ptr()], dev)
    assert c.direct[n:] == [(8, 2, 1, 7000 + dev, "fn-64", ("meta", 64), None, None, None,
                             x.data_ptr(), 33, 0.25, y.data_ptr(), 64, False)]
    assert not b.launch_kept("other", (4,), [x.data_ptr(), 17, 0.5, y.data_ptr()], dev)
    assert not b.launch_kept("ck", (4,), [x.data_ptr(), 17, 0.5, y.data_ptr()], dev + 1)
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: False)
    assert not b.launch_kept("ck", (4,), [x.data_ptr(), 17, 0.5, y.data_ptr()], dev)
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: True)
    monkeypatch.setattr(b.fl, "on", False)
    assert not b.launch_kept("ck", (4,), [x.data_ptr(), 17, 0.5, y.data_ptr()], dev)
    assert len(c.direct) == n + 1
    b.verify_kept("ck", (x, 49, 0.5, y))                    # the same facts as 17
    with pytest.raises(AssertionError, match="caller key"):
        b.verify_kept("ck", (x, 32, 0.5, y))
    with pytest.raises(AssertionError, match="no kernel kept"):
        b.verify_kept("other", (x, 17, 0.5, y))


def test_this_tritons_runner_is_the_one_the_direct_launch_reads(monkeypatch):
    """The installed Triton's ``CompiledKernel.__getitem__`` makes the launcher call that the direct
    launch makes (else every kept kernel would go through ``compiled[grid]``: same results, more host
    time); and launch hooks read as unset here. Fails after a Triton upgrade that changes them."""
    monkeypatch.setattr(launch, "_DIRECT_OK", None)
    assert launch._runner_is_known()
    assert launch._no_launch_hooks()


def middle(X, BLOCK: tl.constexpr, n):
    pass


def test_bound_launches_share_the_kept_kernels_and_pass_every_parameter(toy_kernel):
    """``bind`` fixes the constexprs and options: the bound call takes the runtime arguments alone,
    finds the kernel the keyword call kept (same key), launches it with every parameter in order,
    and makes a new key for what Triton specialises on."""
    k, f = toy_kernel
    x, y = torch.zeros(32), torch.zeros(32)
    f[(4,)](x, 17, 0.5, y, BLOCK=64, num_warps=4)          # kept through the keyword path
    b = f.bind(BLOCK=64, num_warps=4)
    b[(4,)](x, 33, 0.25, y)
    assert len(k.jit_launches) == 1 and k.warmups == 1
    assert k.compiled[(64, False)].launches == [((4, 1, 1), (x, 33, 0.25, y, 64, False))]
    b[(2, 3)](x, 32, 0.25, y)                              # 32 is divisible by 16: a new key
    assert len(k.jit_launches) == 2 and k.jit_launches[-1][2] == dict(BLOCK=64, num_warps=4)
    b2 = f.bind(BLOCK=64, FLAG=True, num_warps=4)          # another constexpr: another kernel
    b2[(4,)](x, 17, 0.5, y)
    assert len(k.jit_launches) == 3 and (64, True) in k.compiled
    b[(4,)](x, 17, 0.5)                                    # too few arguments: Triton's launch says what
    assert len(k.jit_launches) == 4


def test_bound_launch_of_a_kernel_with_constexprs_between_its_arguments_goes_through_triton(monkeypatch):
    monkeypatch.setattr(launch, "_GET_DEVICE", lambda: 0)
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k = ToyJIT(middle)
    k._kernel_for = lambda kw: k.compiled.setdefault(kw["BLOCK"], Compiled(kw["BLOCK"]))
    f = launch.FastLaunch(k)
    b = f.bind(BLOCK=16)
    assert f.on and not b.ok
    x = torch.zeros(4)
    for _ in range(3):
        b[(1,)](x, 5)                                      # X and n by name, not by position
    assert len(k.jit_launches) == 1 and k.jit_launches[0][2] == dict(X=x, n=5, BLOCK=16)
    assert k.compiled[16].launches == [((1, 1, 1), (x, 16, 5))] * 2


def _compile_keys(monkeypatch, calls) -> list:
    """What selects a compiled kernel for each launch the Triton host code makes for ``calls``
    (functions of no argument): the kernel, its constexpr values and options, and each runtime
    argument's specialisation (tensors by dtype). Launches are recorded, not run."""
    import inspect

    from hopper_compile import Recorder       # tests/hopper_compile.py: records launch.fast's launches

    from headscope.kernels import triton_attention as ta
    from headscope.kernels import triton_decode as td
    launches = Recorder.calls
    monkeypatch.setattr(ta, "_check", lambda *args, **kwargs: None)   # it refuses CPU tensors on a GPU machine
    monkeypatch.setattr(ta, "fast", Recorder)
    monkeypatch.setattr(td, "fast", Recorder)
    keys = []
    for call in calls:
        launches.clear()
        try:
            call()
        except Exception:       # host code reading the unwritten outputs after the launches
            pass
        for kernel, args, kw in launches:
            fn = getattr(kernel, "fn", kernel)
            params = inspect.signature(fn).parameters
            const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
            names = list(params)
            vals = dict(zip(names, args)) | kw

            def fact(x):
                return x.dtype if isinstance(x, torch.Tensor) else launch.specialization_fact(x)

            keys.append((fn.__name__, tuple(sorted((n, v) for n, v in vals.items() if n in const or n not in names)),
                         tuple((n, fact(v)) for n, v in vals.items() if n in names and n not in const)))
        assert launches, "the call made no launch"
    return keys


def test_sliding_and_full_layers_share_their_compiled_kernels(monkeypatch):
    """With ``window_switch`` (what the probe sets for a model with sliding layers) the window's test
    is compiled in and the window is a runtime argument of every Triton kernel (prefill with row
    statistics, column sums, split-key decode): a model that alternates sliding and full layers
    (Gemma-3) compiles each request once. (With the switch set per layer, a first GPU report on
    Gemma-3-270M compiled 21 kernels instead of 11: benchmarks/request_variants.py.) Without it, a layer with no window keeps
    the kernels without the test (faster on the H200)."""
    from headscope.kernels import triton_attention as ta
    from headscope.kernels import triton_decode as td
    from headscope.kernels.spec import StatRequest
    monkeypatch.setattr(td, "DECODE_MIN_K", 16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 64, generator=g)
    k = torch.randn(1, 2, 40, 64, generator=g)
    q1 = q[:, :, -1:].contiguous()
    req = StatRequest(sink_k=1, entropy=True, argmax=True, received=True)

    def calls(window, switch=True):
        return [lambda: ta.attention(q, k, k, scaling=0.125, sliding_window=window, stats=req, window_switch=switch),
                lambda: ta.attention(q, k, k, scaling=0.125, sliding_window=window, window_switch=switch),
                lambda: td.attention(q1, k, k, scaling=0.125, sliding_window=window,
                                     stats=StatRequest(argmax=True), window_switch=switch)]

    full = _compile_keys(monkeypatch, calls(None))
    assert {key[0] for key in full} >= {"_attn_fwd", "received_kernel", "decode_partial_kernel"}
    # Gemma-3's window, 512 (wider than these 40 keys), and 16, which hides keys: the prefill kernels
    # take the same compiled kernel (in decode, hidden keys change the split plan's sizes, as any K does)
    assert _compile_keys(monkeypatch, calls(512)) == full
    assert _compile_keys(monkeypatch, calls(16)[:2]) == _compile_keys(monkeypatch, calls(None)[:2])
    # a model without sliding layers: no window test compiled in
    plain = _compile_keys(monkeypatch, calls(None, switch=False))
    assert all(("HAS_WINDOW", False) in key[1] for key in plain if key[0] != "decode_merge_kernel")
    assert all(("HAS_WINDOW", True) in key[1] for key in full if key[0] != "decode_merge_kernel")


def test_the_probe_compiles_the_window_in_for_models_with_sliding_layers():
    """``has_sliding_layers`` reads the layer's config: Gemma-3 and Mistral have a ``sliding_window``,
    Llama none, Qwen2 only with ``use_sliding_window``; a window with every layer full is none."""
    from types import SimpleNamespace

    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    from headscope.probe.attention import has_sliding_layers
    assert has_sliding_layers(SimpleNamespace(config=Gemma3TextConfig()))
    assert has_sliding_layers(SimpleNamespace(config=MistralConfig(sliding_window=4096)))
    assert not has_sliding_layers(SimpleNamespace(config=MistralConfig(sliding_window=None)))
    assert not has_sliding_layers(SimpleNamespace(config=LlamaConfig()))
    assert not has_sliding_layers(SimpleNamespace(config=Qwen2Config()))
    assert has_sliding_layers(SimpleNamespace(config=Qwen2Config(use_sliding_window=True, max_window_layers=1)))
    # a window in the config, but every layer full: no sliding layers
    assert not has_sliding_layers(SimpleNamespace(config=SimpleNamespace(sliding_window=4096,
                                                                         layer_types=["full_attention"] * 4)))
    assert not has_sliding_layers(None)

