"""The fused CPU row pass (``cpu_rows.c``): compiled once with the system C compiler, loaded with ctypes.

``chunked.attention`` forms each query block's scores with one matmul; turning them into
probabilities and row statistics takes a dozen PyTorch ops, each a trip over the block in memory.
``cpu_rows.c`` does it in three passes over each row while the row sits in cache (see its header).

The library is built on first use into ``$HEADSCOPE_CACHE/native/`` (default
``~/.cache/headscope``), named by a hash of the source, the compiler and its flags, written to a
temporary file and renamed. Without a working C compiler (or with ``HEADSCOPE_NATIVE=0``) nothing
is built: ``available()`` is False and the chunked path runs its plain PyTorch version of the same
computation. The two are tested against each other and against the eager reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .spec import LayerEdits, StatRequest, decline_reason

log = logging.getLogger("headscope")
_SRC = Path(__file__).with_name("cpu_rows.c")
_lib = None          # ctypes library, False once building failed
_lock = threading.Lock()

_P = ctypes.c_void_p
_I = ctypes.c_int64
_ARGTYPES = [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I,
             _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P]


# What the fused row pass can do, declared (``supports`` checks a request against it). It computes
# every StatRequest field; of the edits, only those applied outside the row pass (the query scale
# before the scores, replacement and the LoFiT affine after e @ V) -- the probability edits
# (redistribution, the streaming gate) need the PyTorch block.
SUPPORTED_STATS = frozenset(StatRequest.__dataclass_fields__)
SUPPORTED_EDITS = frozenset({"q_scale"})


def supports(stats: StatRequest | None, edits: LayerEdits | None, *, sinks: bool = False,
             grad: bool = False) -> str | None:
    """None when the fused row pass can run this call, else the reason it declines (a sentence):
    a statistic or edit outside ``SUPPORTED_STATS`` / ``SUPPORTED_EDITS``, learned attention sinks
    (``s_aux``: not in the C code), or autograd (the C pass has no backward)."""
    if sinks:
        return "the fused CPU row pass does not implement learned attention sinks (s_aux)"
    if grad:
        return "the fused CPU row pass has no backward pass (an input requires grad)"
    return decline_reason("the fused CPU row pass", SUPPORTED_STATS, SUPPORTED_EDITS, stats, edits)


def _cache_dir() -> Path:
    return Path(os.environ.get("HEADSCOPE_CACHE", Path.home() / ".cache" / "headscope")) / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc


def _cpu_id() -> bytes:
    """What -march=native depends on: a library built for one CPU must not be loaded on another
    (a cache folder shared over NFS would otherwise hand out illegal instructions)."""
    import platform
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return ident.encode()


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.warning("headscope: no C compiler found (set CC, or install gcc/clang): the CPU path uses plain "
                    "PyTorch ops for the row statistics (exact, slower); HEADSCOPE_NATIVE=0 silences this")
        return None
    src = _SRC.read_bytes()
    for flags in (["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"]):
        key = hashlib.sha256(src + cc.encode() + " ".join(flags).encode() + _cpu_id()).hexdigest()[:16]
        out = _cache_dir() / f"cpu_rows-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = [cc, *flags, "-std=c11", "-Wno-psabi", "-fPIC", "-shared", str(_SRC), "-o", tmp, "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                os.unlink(tmp)
                log.info("headscope: building the CPU row kernel failed (%s): %s", " ".join(cmd),
                         r.stderr.strip()[-300:])
                continue
            os.replace(tmp, out)
        try:
            lib = ctypes.CDLL(str(out))
        except OSError as e:
            log.info("headscope: cannot load %s (%s)", out, e)
            continue
        lib.hs_rows_par.argtypes = [_I, _P, _I] + _ARGTYPES[3:]     # nt, s, n_rows, then as hs_rows
        lib.hs_rows_par.restype = None
        return lib
    log.warning("headscope: the CPU row kernel (kernels/cpu_rows.c) did not build or load with any flag set "
                "(run with logging at INFO for the compiler's messages): the CPU path uses plain PyTorch ops "
                "(exact, slower); HEADSCOPE_NATIVE=0 silences this")
    return None


def available() -> bool:
    """True when the fused row kernel is built (or can be) and not switched off."""
    global _lib
    if os.environ.get("HEADSCOPE_NATIVE", "1") == "0":
        return False
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = _build() or False
                except Exception as e:  # never let an optional speed-up break attention
                    log.warning("headscope: CPU row kernel unavailable (%s): the CPU path uses plain PyTorch "
                                "ops (exact, slower); HEADSCOPE_NATIVE=0 silences this", e)
                    _lib = False
    return bool(_lib)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rows(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tq: torch.Tensor, kvalid: torch.Tensor | None,
         *, sink_hi: torch.Tensor | None, span_lo: torch.Tensor | None, span_hi: torch.Tensor | None,
         W: int, R: int, recv_mode: int, recv_window: tuple[int, int] | None, argmax: bool,
         want: set[str]) -> dict[str, torch.Tensor]:
    """In place: s [B, H, Qb, Kb] fp32 contiguous scores -> e = exp(s - row max), 0 where not visible;
    the probabilities are ``e * inv_z[..., None]`` (``inv_z`` [B, H, Qb] is always returned). Returns the wanted row
    statistics ([B, H, Qb]; ``span_mass`` [B, H, Qb, S]; ``argmax`` block-local key index) and
    ``colsum`` [B, H, Kb] when ``recv_mode`` is 1 (all queries) or 2 (queries in ``recv_window``).

    lo, hi, tq [Qb] int64: visible key range and the query's key-local index; kvalid [B, Kb] bool or
    None; sink_hi [B], span_lo / span_hi [B, S] int64 key-local bounds clipped to [0, Kb]."""
    if not available():
        raise RuntimeError("the fused CPU row kernel is not available here (see headscope's log)")
    assert s.dtype == torch.float32 and s.is_contiguous() and s.device.type == "cpu"
    B, H, Qb, Kb = s.shape
    n_rows = B * H * Qb
    out: dict[str, torch.Tensor] = {}

    def buf(name, dtype=torch.float32, extra=()):
        if name not in want:
            return None
        t = torch.empty(B, H, Qb, *extra, dtype=dtype)
        out[name] = t
        return t

    lse, ent, dist = buf("lse"), buf("entropy"), buf("distance")
    wdist, recent, sink = buf("window_distance"), buf("recent_mass"), buf("sink_mass")
    S = 0 if span_lo is None else span_lo.shape[1]
    spans = buf("span_mass", extra=(S,)) if S else None
    mp = buf("max_prob")
    am = torch.empty(B, H, Qb, dtype=torch.int64) if argmax else None
    if am is not None:
        out["argmax"] = am
    nt = max(1, min(torch.get_num_threads(), n_rows // 16 or 1))
    col = torch.zeros(nt, B, H, Kb) if recv_mode else None
    inv_z = torch.empty(B, H, Qb)
    out["inv_z"] = inv_z
    lo, hi, tq = (x.to(torch.int64).contiguous() for x in (lo, hi, tq))
    kv = None if kvalid is None else kvalid.to(torch.uint8).contiguous()
    sink_hi = None if sink_hi is None else sink_hi.to(torch.int64).contiguous()
    span_lo = None if span_lo is None else span_lo.to(torch.int64).contiguous()
    span_hi = None if span_hi is None else span_hi.to(torch.int64).contiguous()
    ra, rb = recv_window if recv_window is not None else (0, 0)

    _lib.hs_rows_par(nt, s.data_ptr(), n_rows, H, Qb, Kb, lo.data_ptr(), hi.data_ptr(), tq.data_ptr(), _ptr(kv),
                     _ptr(sink_hi), S, _ptr(span_lo), _ptr(span_hi), int(W or 0), int(R or 0), int(recv_mode),
                     int(ra), int(rb), int(argmax),
                     _ptr(lse), _ptr(ent), _ptr(dist), _ptr(wdist), _ptr(recent), _ptr(sink), _ptr(spans),
                     _ptr(mp), _ptr(am), _ptr(col), inv_z.data_ptr())
    if col is not None:
        out["colsum"] = col.sum(0)
    return out
