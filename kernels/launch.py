"""Launching a ``@triton.jit`` kernel again without Triton's per-call work (issue 13).

``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run`` on every call. That binds the arguments,
specialises each one (its dtype, 16-byte alignment, integer range, ``== 1``, divisibility by 16),
builds a cache-key string, checks the kernel's globals, and only then launches. On the H200 a
decode step's two launches took 46-107 µs of host time that way against 15-31 µs through the
compiled kernels, for 10-40 µs of GPU work; the whole eager step became 17-18 µs faster with this
module (``benchmarks/launch_overhead.py``, BENCHMARKS.md "Decode per call: the host cost taken
apart, and the compiled-kernel launch").

``fast(kernel)[grid](*args, **kwargs)`` takes the same arguments as ``kernel[grid]``:

- Each call is keyed on what Triton's specialisation reads (``specialization_fact``, value by
  value), on the constexpr and option values, and on the current CUDA device.
- The first call with a key goes through ``kernel[grid]``, which compiles as usual and returns the
  compiled kernel. That kernel is kept.
- Later calls with the key launch the kept kernel directly: through ``CompiledKernel[grid]`` once,
  then by the call that its runner makes to Triton's launcher (``compiled.run``: grid, stream,
  function handle, packed metadata, then the arguments), without the runner's closure and its
  device, stream and launch-metadata lookups. Each plain CUDA tensor goes as its address
  (``addresses``): Triton's launcher asks the driver about every tensor argument's pointer
  (``cuPointerGetAttribute``) and takes an int as it is (~2-3 µs less a launch of the decode
  kernel). Where this Triton's runner differs from that call (its source is read once) or a launch
  hook is set (a profiler), through ``CompiledKernel[grid]``.
- The first reuse of each key is checked against Triton's own choice (``JITFunction.warmup``, which
  specialises and looks up without launching). If Triton picks another compiled kernel, it
  specialises on something the key does not hold: fast launches stop for the process, said once.

Bound launches: ``b = fast(kernel).bind(BLOCK_N=64, ..., num_warps=4)`` fixes the constexprs and
options once (a caller keeps ``b`` per configuration); ``b[grid](*args)`` then passes the runtime
arguments alone. The key and the kept kernels are the same as above; only the per-call work of
reading keywords and defaults is gone.

Keyed launches: ``b.run_keyed(caller_key, grid, args)`` is ``b[grid](*args)`` for a caller that
knows which of its arguments vary: equal caller keys must mean equal specialisation facts, the
tensors' alignment aside. Once the key's kernel launches directly, a call skips the full key: its
tensors go as addresses, checked for 16-byte alignment all at once. The decode path keys on the
facts of its 20 scalars, its plan fixing the rest: 9-14 µs less a whole eager decode call on the
H200 (BENCHMARKS.md "Decode host: the pointer check skipped, a launch keyed by the caller").
``HEADSCOPE_VERIFY_KEYED_LAUNCH=1`` (``VERIFY_KEYED``) computes the full key as well and raises where
a caller key misses a fact; the decode tests set it.

Off under the interpreter (``TRITON_INTERPRET=1``), for anything that is not a ``JITFunction``, and
when ``HEADSCOPE_TRITON_FAST_LAUNCH=0``; then ``fast(kernel)[grid]`` is ``kernel[grid]``.
"""
from __future__ import annotations

import logging
import os
from functools import reduce
from operator import itemgetter, or_

import torch

log = logging.getLogger("headscope")
try:
    _RAW_STREAM = torch._C._cuda_getCurrentRawStream          # what Triton's driver itself calls
    # the current device, part of every launch key: what torch.cuda.current_device calls after its
    # lazy-init check (a launch has CUDA tensors, so CUDA is up by then)
    _GET_DEVICE = torch._C._cuda_getDevice
except AttributeError:                                       # a CPU-only torch build
    _RAW_STREAM = None
    _GET_DEVICE = torch.cuda.current_device
_I32 = (-(1 << 31), 1 << 31)
_I64_MAX = 1 << 63
ENABLED = os.environ.get("HEADSCOPE_TRITON_FAST_LAUNCH", "1") not in ("0", "")
# Check every keyed launch (``Bound.run_keyed``) against the full specialisation key, and raise
# where they disagree (a caller key that misses something): the GPU tests set it.
VERIFY_KEYED = os.environ.get("HEADSCOPE_VERIFY_KEYED_LAUNCH", "0") not in ("0", "")
MAX_PLANS = 1024           # kept compiled kernels per kernel (Triton keeps its own cache besides)


def specialization_fact(x):
    """What Triton's specialisation of a non-constexpr argument depends on (Triton 3.x,
    ``native_specialize_impl``): a tensor's dtype and whether its address is a multiple of 16; an
    int's being 1, its range (i32 / i64 / u64) and divisibility by 16; for floats, bools and None
    only the kind. Two values with equal facts get the same compiled kernel. (Ints are coded as
    small ints: 1, or 2 / 4 / 6 for the range plus 1 when divisible by 16; this runs for every
    argument of every launch.)"""
    t = type(x)
    if t is int:
        if x == 1:
            return 1
        return (2 if _I32[0] <= x < _I32[1] else (4 if x < _I64_MAX else 6)) + (not x & 15)
    if t is float:
        return "f"
    if isinstance(x, torch.Tensor):
        return (x.dtype, not x.data_ptr() & 15)
    if t is bool:
        return "b"
    if x is None:
        return None
    return (t, x)          # anything else: its value (hashable, or the key fails and the call falls back)


def specialization_facts(args, _tensor=torch.Tensor) -> tuple:
    """``tuple(map(specialization_fact, args))``, computed in one comprehension: ints and plain
    tensors (most of a launch's arguments) inline, without a function call each. A launch of the
    decode kernel has 38 arguments; this is ~30% less host time than the map (CPU, timeit)."""
    return tuple([
        (1 if x == 1 else (2 if -2147483648 <= x < 2147483648 else (4 if x < 9223372036854775808 else 6))
         + (not x & 15)) if type(x) is int
        else ((x.dtype, not x.data_ptr() & 15) if type(x) is _tensor else specialization_fact(x))
        for x in args])


def addresses(vals, _tensor=torch.Tensor) -> list:
    """``vals`` with each plain CUDA tensor replaced by its address (``data_ptr()``), for the direct
    launch. Triton's launcher takes an int for a pointer argument as the address itself; for a
    tensor it calls ``data_ptr()`` and then asks the driver whether the address is device memory
    (``cuPointerGetAttribute``), one driver call per pointer argument of every launch (the decode
    kernel has 12). The question is answered here instead by ``is_cuda``; anything else (a CPU
    tensor, a tensor subclass) is passed as it is, so the launcher still checks it and refuses a
    CPU tensor with its own message."""
    return [x.data_ptr() if type(x) is _tensor and x.is_cuda else x for x in vals]


class FastLaunch:
    """``kernel[grid]`` with the compiled kernel kept per specialisation key (module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        # key -> [compiled kernel, checked against Triton's choice, its direct launch (None: not
        # looked at yet, False: none, else ``_direct_handles``)]
        self.plans: dict = {}
        self.on = ENABLED and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and _jit_function(kernel)
        if self.on:
            params = kernel.params
            self.names = [p.name for p in params]
            self.name_set = frozenset(self.names)
            ce = [i for i, p in enumerate(params) if p.is_constexpr]
            rest = [i for i, p in enumerate(params) if not p.is_constexpr]
            # (itemgetter of one index returns the value, not a 1-tuple: wrap it)
            self.constexpr_values = _getter(ce)
            self.other_values = _getter(rest)
            import inspect
            sig = inspect.signature(kernel.fn)
            self.defaults = {n: p.default for n, p in sig.parameters.items()
                             if p.default is not inspect.Parameter.empty}
            self._tails: dict = {}      # number of positional args -> names that come after them

    def __getitem__(self, grid):
        if not self.on or callable(grid):
            return self.kernel[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def bind(self, **constants) -> "Bound":
        """``constants`` (every constexpr the call sets, and options such as ``num_warps``) fixed
        once: ``bound[grid](*args)`` then takes the runtime arguments alone, in the kernel's order,
        and skips the per-call sorting of keywords (module docstring, "Bound launches")."""
        return Bound(self, constants)

    def _values(self, args, kwargs):
        """Every parameter's value, in the kernel's order (positional, keyword, default)."""
        tail = self._tails.get(len(args))
        if tail is None:
            tail = self._tails[len(args)] = self.names[len(args):]
        d = self.defaults
        return args + tuple(kwargs[n] if n in kwargs else d[n] for n in tail)

    def _launch(self, grid, args, kwargs):
        try:
            vals = self._values(args, kwargs)
            key = (_GET_DEVICE(),
                   frozenset((n, kwargs[n]) for n in kwargs.keys() - self.name_set),     # options
                   self.constexpr_values(vals),
                   specialization_facts(self.other_values(vals)))
            plan = self.plans.get(key)
        except (KeyError, TypeError):        # a missing argument or an unhashable value: Triton says what
            return self.kernel[grid](*args, **kwargs)
        return self._run(plan, key, grid, args, kwargs, vals)

    def _run(self, plan, key, grid, args, kwargs, vals):
        """Launch through ``plan`` (the kept compiled kernel of ``key``), or through Triton when
        there is none yet (then keep what Triton compiled)."""
        if plan is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "run"):
                if len(self.plans) >= MAX_PLANS:        # keys made of raw values (an odd argument type)
                    self.plans.clear()                  # must not grow without bound
                self.plans[key] = [compiled, False, None]
            return compiled
        compiled, checked, direct = plan
        if not checked:
            if self.kernel.warmup(*args, grid=grid, **kwargs) is not compiled:
                self._stop(f"Triton chose another compiled {self.kernel.__name__} for arguments with the "
                           "same specialisation facts")
                return self.kernel[grid](*args, **kwargs)
            plan[1] = True
        if direct and _no_launch_hooks():
            _direct_call(direct, grid, key[0], addresses(vals))
            return compiled
        g = tuple(grid) + (1,) * (3 - len(grid))
        compiled[g](*vals)
        if direct is None:                      # its handles exist now: look once whether to go direct
            plan[2] = _direct_handles(compiled) or False
        return compiled

    def _stop(self, reason: str):
        global ENABLED
        ENABLED = False
        self.on = False
        for f in _FAST.values():
            f.on = False
        _say_once(reason)


class Bound:
    """``FastLaunch`` with its constexprs and options fixed (``FastLaunch.bind``). The key of a
    call is the same as ``FastLaunch``'s, so both share the kept compiled kernels; what ``bind``
    fixed is not looked at again. A kernel whose constexprs are not all after its runtime
    parameters, or a call with another number of runtime arguments, goes through
    ``FastLaunch``'s general path (same result)."""

    def __init__(self, fl: FastLaunch, constants: dict):
        self.fl, self.constants = fl, constants
        self.ok = fl.on
        params = getattr(fl.kernel, "params", None) if _jit_function(fl.kernel) else None
        self.runtime_names = None if params is None else [p.name for p in params if not p.is_constexpr]
        if self.ok:
            ce = [p.name for p in params if p.is_constexpr]
            self.n_runtime = len(params) - len(ce)
            trailing = all(p.is_constexpr for p in params[self.n_runtime:])
            try:
                tail = tuple(constants[n] if n in constants else fl.defaults[n] for n in ce)
                options = frozenset((n, constants[n]) for n in constants.keys() - fl.name_set)
                hash((tail, options))
            except (KeyError, TypeError):       # a missing constexpr or an unhashable value
                trailing = False
            self.ok = trailing
            if self.ok:
                self.tail, self.options = tail, options
        self.keyed: dict = {}          # caller key -> (direct handles, tensor slots, full key)

    def __getitem__(self, grid):
        if not (self.ok and self.fl.on) or callable(grid):
            return lambda *args: self._general(grid, args)
        return lambda *args: self._launch(grid, args)

    def _general(self, grid, args):
        """``FastLaunch``'s keyword path; the runtime arguments by name where constexprs sit
        between them (positions would not line up)."""
        names = self.runtime_names
        if names is not None and len(args) <= len(names):
            return self.fl[grid](**dict(zip(names, args)), **self.constants)
        return self.fl[grid](*args, **self.constants)

    def _launch(self, grid, args):
        fl = self.fl
        if len(args) != self.n_runtime:
            return self._general(grid, args)
        try:
            key = self._full_key(args)
            plan = fl.plans.get(key)
        except TypeError:                       # an unhashable argument: Triton says what
            return fl.kernel[grid](*args, **self.constants)
        if plan is not None and plan[1] and plan[2] and _no_launch_hooks():   # _run's direct call, without _run
            _direct_call(plan[2], grid, key[0], addresses(args), self.tail)
            return plan[0]
        return fl._run(plan, key, grid, args, self.constants, args + self.tail)

    def run_keyed(self, caller_key, grid, args) -> None:
        """``self[grid](*args)`` for a caller that vouches for ``caller_key`` (hashable): two calls with
        equal keys pass arguments with equal specialisation facts, the alignment of their tensors
        aside, and every tensor is a CUDA tensor on the current device. (The decode path's key is the
        specialisation facts of its scalars, from the strides to the window; everything else is fixed
        by its plan, which holds this ``Bound``.) Once the key's kernel
        launches directly, a call skips the specialisation key of all its arguments: its tensors go
        as their addresses, checked for 16-byte alignment all at once (one misaligned takes the
        general path, as does a set launch hook). With ``VERIFY_KEYED`` the full key is computed
        as well, and a difference raises."""
        kept = self.keyed.get(caller_key)
        if kept is not None and self.fl.on and _no_launch_hooks():
            handles, slots, full_key = kept
            vals = [x.data_ptr() if type(x) is _TENSOR else x for x in args]
            try:
                bits = reduce(or_, slots(vals), 0)      # a tensor subclass left in: not an int
            except Exception:
                bits = None
            if type(bits) is int and not bits & 15 and _GET_DEVICE() == full_key[0]:
                if VERIFY_KEYED:
                    self._verify(full_key, args)
                _direct_call(handles, grid, full_key[0], vals, self.tail)
                return
        self[grid](*args)
        if kept is None and self.ok and self.fl.on:
            self._keep(caller_key, args)

    def launch_kept(self, caller_key, grid, vals, device: int) -> bool:
        """Launch the kernel ``run_keyed`` kept for ``caller_key``, with ``vals`` the runtime arguments
        as the direct call takes them: every tensor already its address, 16-byte aligned, on CUDA
        device ``device``, the current one (the caller checked). Returns False, launching nothing, when
        no kernel is kept for the key (``run_keyed`` keeps it on its first direct launch), fast launch
        is off or a launch hook is set; the caller then takes ``run_keyed`` with its tensors."""
        kept = self.keyed.get(caller_key)
        if kept is None or not self.fl.on or kept[2][0] != device or not _no_launch_hooks():
            return False
        _direct_call(kept[0], grid, device, vals, self.tail)
        return True

    def verify_kept(self, caller_key, args) -> None:
        """Raise unless a kernel is kept for ``caller_key`` and the full specialisation key of ``args``
        (the runtime arguments, tensors as tensors) is the one it was kept under (``launch_kept``'s
        callers check themselves with it under ``VERIFY_KEYED``)."""
        kept = self.keyed.get(caller_key)
        if kept is None:
            raise AssertionError(f"{self.fl.kernel.__name__}: no kernel kept for the caller key {caller_key}")
        self._verify(kept[2], args)

    def _keep(self, caller_key, args) -> None:
        """Keep ``caller_key``'s kernel for ``run_keyed`` once it launches directly (compiled, checked
        against Triton's choice, its launcher's handles known), its tensors all plain, on CUDA and
        aligned; until then nothing (the next call tries again)."""
        try:
            key = self._full_key(args)
        except TypeError:
            return
        plan = self.fl.plans.get(key)
        if plan is None or not plan[1] or not plan[2]:
            return
        slots = [i for i, x in enumerate(args) if isinstance(x, torch.Tensor)]
        if not slots or not all(_plain_cuda_aligned(args[i]) for i in slots):
            return
        if len(self.keyed) >= MAX_PLANS:
            self.keyed.clear()
        self.keyed[caller_key] = (plan[2], _getter(slots), key)

    def _full_key(self, args) -> tuple:
        """The key of ``FastLaunch.plans`` for these runtime arguments (TypeError if unhashable)."""
        return (_GET_DEVICE(), self.options, self.tail, specialization_facts(args))

    def _verify(self, full_key, args) -> None:
        key = self._full_key(args)
        if key != full_key:
            raise AssertionError(f"{self.fl.kernel.__name__}: a caller key kept the kernel of {full_key[3]} "
                                 f"for arguments with the facts {key[3]}")


_TENSOR = torch.Tensor


def _direct_call(handles, grid, device: int, vals, tail=()) -> None:
    """The call ``CompiledKernel[grid]``'s runner makes to Triton's launcher (``_RUNNER_CALL``), with
    ``handles`` = (launcher, function handle, packed metadata) from ``_direct_handles``, no launch
    metadata and no hooks, then every argument (``vals``, then the constexpr ``tail``)."""
    run, function, packed = handles
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _RAW_STREAM(device), function, packed,
        None, None, None, *vals, *tail)


def _plain_cuda_aligned(x) -> bool:
    """A plain tensor (no subclass) on CUDA at a 16-byte aligned address."""
    return type(x) is _TENSOR and x.is_cuda and not x.data_ptr() & 15


# -- the direct launch ---------------------------------------------------------------------------
# ``CompiledKernel[grid](*args)`` builds a runner closure, asks the driver for the current device and
# stream, and builds launch metadata (None without launch hooks) before it calls ``compiled.run``,
# Triton's launcher, with the kernel's function handle and packed metadata. A kept kernel is
# launched by that same call directly, where this Triton's runner is the one read below (its source
# is checked once); otherwise through ``compiled[grid]``, said once.
_RUNNER_CALL = ("self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, "
                "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)")
_DIRECT_OK = None


def _runner_is_known() -> bool:
    """This Triton's ``CompiledKernel.__getitem__`` launches exactly as ``_run``'s direct call
    (checked once, on its source, whitespace aside)."""
    global _DIRECT_OK
    if _DIRECT_OK is None:
        try:
            import inspect

            from triton.compiler.compiler import CompiledKernel
            src = "".join(inspect.getsource(CompiledKernel.__getitem__).split())
            _DIRECT_OK = "".join(_RUNNER_CALL.split()) in src and "filtered" not in src
        except Exception:                  # no source, another layout: launch through compiled[grid]
            _DIRECT_OK = False
        if not _DIRECT_OK:
            _say_once("this Triton's CompiledKernel launches otherwise than headscope's direct call reads it")
    return _DIRECT_OK


def _direct_handles(compiled):
    """(launcher, function handle, packed metadata) of a compiled kernel that has launched once
    through ``compiled[grid]``, or None where the direct call does not apply."""
    if _RAW_STREAM is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return None
    if compiled.function is None or not _runner_is_known():
        return None
    return compiled.run, compiled.function, compiled.packed_metadata


_RUNTIME_KNOBS = None        # triton.knobs.runtime, imported on first use


def _no_launch_hooks() -> bool:
    """No launch hooks are set (a profiler such as Proton sets them; then ``compiled[grid]`` builds
    their metadata and calls them, and the direct call steps aside). Triton keeps each hook as None
    or as a chain of calls (``HookChain``, empty when none is set)."""
    global _RUNTIME_KNOBS
    if _RUNTIME_KNOBS is None:
        from triton import knobs
        _RUNTIME_KNOBS = knobs.runtime
    rt = _RUNTIME_KNOBS
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return False
    return True


def _getter(idx):
    """vals -> the tuple of vals[i] for i in idx."""
    if len(idx) == 1:
        i = idx[0]
        return lambda vals: (vals[i],)
    return itemgetter(*idx) if idx else (lambda vals: ())


_SAID: set = set()


def _say_once(reason: str) -> None:
    """Log, once per process and reason, why Triton kernels launch through ``JITFunction``."""
    if reason not in _SAID:
        _SAID.add(reason)
        log.warning("headscope: %s; Triton kernels launch through JITFunction (same results, more host "
                    "time per call)", reason)


def _jit_function(kernel) -> bool:
    """``kernel`` is a Triton ``JITFunction`` with what ``FastLaunch`` reads (its parameters'
    names and constexpr flags, ``warmup``). A ``JITFunction`` without them (another Triton) is
    launched through Triton, said once; anything else (a test's stand-in) silently."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    if not isinstance(kernel, JITFunction):
        return False
    params = getattr(kernel, "params", None)
    if hasattr(kernel, "warmup") and params is not None and \
            all(hasattr(p, "name") and hasattr(p, "is_constexpr") for p in params):
        return True
    _say_once("this Triton's JITFunction has no params/warmup as headscope reads them")
    return False


_FAST: dict = {}


def fast(kernel) -> FastLaunch:
    """The ``FastLaunch`` of ``kernel`` (one per kernel per process)."""
    f = _FAST.get(id(kernel))
    if f is None or f.kernel is not kernel:
        f = _FAST[id(kernel)] = FastLaunch(kernel)
    return f
