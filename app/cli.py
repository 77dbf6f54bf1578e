"""``headscope`` command line: ``report`` (every analyzer), ``score`` (one), ``list``, ``show`` and
``compare`` (saved reports as terminal tables), ``explore`` (the Streamlit explorer).

Every argument is parsed and checked before a model is loaded (analyzer names, ``--param`` values
against the analyzer's parameters and their types, output paths): a bad value prints one line on
stderr and exits 2. Output is written whole or not at all (``app/atomic.py``). A failed analyzer
makes the command exit 1 and is listed. This module imports nothing heavy at its top, so
``headscope --help`` answers at once; torch and transformers are imported when a command runs.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from pathlib import Path

EXIT_FAILED = 1          # a command ran but something failed (an analyzer, a write)
EXIT_USAGE = 2           # a bad argument (argparse's code): nothing was run
# Options of every `streamlit run` of the explorer. No file watcher (it serves live editing of the app):
# after each run it calls hasattr(m, "__path__") on every module in sys.modules, and under transformers
# 5.17 each of the ~100 image-processor alias modules transformers puts there imports its target on
# any attribute (each import fails without torchvision and logs a traceback): the explorer's first
# page then took over 30 s to draw. transformers 5.24 no longer has these aliases.
STREAMLIT_OPTIONS = ("--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none")

# commands whose parser lives in another app module: name -> (module, marker file of an earlier
# output that --out may replace, help)
DELEGATED = {
    "intervene": ("intervene_cli", "results.json",
                  "learn/apply a head intervention and evaluate it against controls"),
    "circuit": ("circuit_cli", "circuit.json",
                "find a task's circuit (patching, path, EAP, EAP-IG, ACDC, SAE) or compare two saved circuits"),
}


class UsageError(Exception):
    """A bad command-line value, found after argparse (unknown analyzer, bad --param, bad --out)."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``headscope score: error: ...``) instead of usage + error."""

    def error(self, message):
        """Print ``PROG: error: MESSAGE (see `PROG --help`)`` on stderr and exit 2 (``EXIT_USAGE``)."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {s!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {s!r}")
    return v


def build_parser() -> Parser:
    """The ``headscope`` argument parser with every subcommand (report, score, list, show, compare,
    explore, intervene, circuit); ``intervene`` and ``circuit`` keep their arguments in ``rest`` for
    their own modules' parsers."""
    ap = Parser(prog="headscope", description="What does each attention head do?")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{report,score,list,show,compare,explore,intervene,circuit}")
    r = sub.add_parser("report", help="run every analyzer and write report.html, scores.json, raw/",
                       description="Run analyzers on a model and write a report folder (whole: a temporary "
                       "folder beside --out is renamed into place at the end). Exit 1 if an analyzer failed.")
    r.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, tiny-*, or a local HF folder")
    r.add_argument("--out", required=True, help="output folder (new, empty, or an earlier report: replaced whole)")
    r.add_argument("--only", default="", help="comma-separated analyzer names (default: all)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    add_report_preset(r)
    add_report_ray(r)
    s = sub.add_parser("score", help="run one analyzer",
                       description="Run one analyzer and print its top heads. Parameters: `headscope list -v`.")
    s.add_argument("method", help="analyzer name (`headscope list`)")
    s.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, tiny-*, or a local HF folder")
    s.add_argument("--out", default=None, help="save HeadScores here (PATH.json + PATH.safetensors, written whole)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="analyzer hyperparameter, checked against its type (repeatable)")
    s.add_argument("--top", type=_positive_int, default=10, help="how many heads to print")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    ls = sub.add_parser("list", help="list the analyzers")
    ls.add_argument("-v", "--verbose", action="store_true", help="also list each analyzer's parameters")
    add_show_parser(sub)
    add_compare_parser(sub)
    e = sub.add_parser("explore", help="open the Streamlit explorer (a saved report, or a model live)",
                       description="Serve the explorer with Streamlit until this command is stopped "
                       "(Ctrl-C or SIGTERM stop the server too).")
    e.add_argument("--report", default="", help="a folder written by `headscope report`")
    e.add_argument("--model", default="smollm2", help="model for the head view and the intervention playground")
    e.add_argument("--circuit", default="", help="a folder written by `headscope circuit ... --out DIR` (circuit page)")
    e.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves every interface)")
    e.add_argument("--port", type=_port, default=8501)
    e.add_argument("--headless", action="store_true", help="do not open a browser")
    # their own parsers live in app/intervene_cli.py and app/circuit_cli.py and import torch: they are
    # built only when the command is used (`headscope intervene --help`, `headscope circuit --help`)
    for name, what in DELEGATED.items():
        d = sub.add_parser(name, help=f"{what[2]} (`headscope {name} --help`)", add_help=False, prefix_chars="\0")
        d.add_argument("rest", nargs=argparse.REMAINDER)
    return ap


def add_report_preset(r) -> None:
    """``headscope report --preset quick|paper``."""
    r.add_argument("--preset", choices=("quick", "paper"), default="quick",
                   help="quick: each analyzer's quick() settings, minutes on a CPU (leaves out `duo`, whose quick "
                   "run ranks nothing); paper: each analyzer's paper_config(), the papers' settings: hours, "
                   "the run to make on a GPU. An estimate of the run time is printed before it starts")


def add_report_ray(r) -> None:
    """``headscope report --ray auto|ADDRESS|local [--workers N]`` (needs ``pip install headscope[distributed]``)."""
    r.add_argument("--ray", default=None, metavar="auto|ADDRESS|local",
                   help="run the analyzers whose work splits into items (retrieval's needle tests) on a Ray "
                   "cluster, one worker per GPU (or CPU) holding the model; local: start one with --workers")
    r.add_argument("--workers", type=_positive_int, default=None, help="Ray workers (default: every GPU/CPU of the cluster)")


def add_show_parser(sub) -> None:
    """``headscope show DIR [--top K] [--only A,B] [--csv FILE]``."""
    p = sub.add_parser("show", help="print a saved report's top heads per analyzer (--csv exports every head)",
                       description="Print the top heads of each analyzer of a folder written by `headscope report` "
                       "as terminal tables; --csv FILE writes every head of every analyzer (analyzer, layer, head, "
                       "score, z, rank).")
    p.add_argument("report", help="a folder written by `headscope report`")
    p.add_argument("--top", type=_positive_int, default=10, help="heads per analyzer (default 10)")
    p.add_argument("--only", default="", help="comma-separated analyzer names (default: all in the report)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write every head to this CSV file")


def add_compare_parser(sub) -> None:
    """``headscope compare DIR1 DIR2 [--top K]``."""
    p = sub.add_parser("compare", help="compare two saved reports (two runs of one model, or two models)",
                       description="Two reports of one model: per analyzer Spearman's rank correlation over all "
                       "heads and the overlap of the top-K heads. Two models: per analyzer the top-K heads side "
                       "by side and summary statistics (mean, max, share above the threshold, depth of the top heads).")
    p.add_argument("report_a", help="a folder written by `headscope report`")
    p.add_argument("report_b", help="another one")
    p.add_argument("--top", type=_positive_int, default=10, help="K, heads per analyzer (default 10)")
    p.add_argument("--same-model", action="store_true",
                   help="compare as two runs of one model even when the model's name differs (the same "
                        "weights loaded from another folder or run on another device: CPU vs GPU)")


# ------------------------------------------------------------------ --param values
def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def convert_param(raw: str, hint, key: str):
    """The string ``raw`` of ``--param key=raw`` as a value of the annotated type ``hint``
    (int, float, bool, str, tuple, list, dict, ``X | None``); ValueError saying what was expected."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
    else:
        options = (hint,)
    if type(None) in options and raw.strip().lower() in ("none", "null"):
        return None
    try:
        lit = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        lit = raw
    for t in options:
        if t is type(None):
            continue
        base = typing.get_origin(t) or t
        if base is bool:
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
        elif base is int:
            if isinstance(lit, int) and not isinstance(lit, bool):
                return lit
        elif base is float:
            try:
                v = float(raw)
            except ValueError:
                continue
            if math.isfinite(v):
                return v
        elif base is str:
            return lit if isinstance(lit, str) else raw
        elif base in (tuple, list):
            if isinstance(lit, (tuple, list)):
                return base(lit)
            if isinstance(lit, (int, float)) and not isinstance(lit, bool):
                return base([lit])
        elif base is dict:
            if isinstance(lit, dict):
                return lit
        elif t is typing.Any:
            return lit
    expected = " or ".join(_type_name(t) for t in options)
    raise ValueError(f"--param {key}={raw}: expected {expected}")


def analyzer_params(cls) -> dict:
    """{parameter: annotated type} of an analyzer class (its dataclass fields)."""
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: accept any literal
        hints = {}
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls) if f.init}


def parse_params(cls, items) -> dict:
    """``--param k=v`` strings -> {k: typed value}, checked against the analyzer's parameters."""
    known = analyzer_params(cls)
    out = {}
    for it in items or []:
        if "=" not in it:
            raise UsageError(f"--param expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        k = k.strip()
        if k not in known:
            raise UsageError(f"unknown parameter {k!r} for {cls.name}; its parameters: "
                             f"{', '.join(known) or '(none)'}")
        try:
            out[k] = convert_param(v, known[k], k)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return out


def make_analyzer(cls, kw: dict, quick: bool = False):
    """Construct the analyzer now (its own checks run in __init__), so bad values stop the command
    before a model is loaded."""
    try:
        return cls.quick(**kw) if quick and hasattr(cls, "quick") else cls(**kw)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{cls.name}: {e}") from None


def _check_device(device):
    if device is None:
        return
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device!r} is not a device ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


# ------------------------------------------------------------------ commands
def _load(name, device, prog):
    """Load the model; (model, None) or (None, exit code) after one line on stderr."""
    from .. import load
    from ..probe.loading import ModelLoadError, ModelNotFound

    t0 = time.time()
    try:
        model = load(name, device=device)
    except ModelLoadError as e:          # the folder exists but is broken: a failure, not a usage error
        print(f"{prog}: error: cannot load model {name!r}: {' '.join(str(e).split())}", file=sys.stderr)
        return None, EXIT_FAILED
    except ModelNotFound as e:
        print(f"{prog}: error: cannot load model {name!r}: {' '.join(str(e).split())}", file=sys.stderr)
        return None, EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - one line, no traceback (HEADSCOPE_DEBUG=1 shows it)
        if os.environ.get("HEADSCOPE_DEBUG"):
            raise
        print(f"{prog}: error: cannot load model {name!r}: {_one_line(e)}", file=sys.stderr)
        return None, EXIT_FAILED
    print(f"loaded {model.cfg.name}: {model.cfg.n_layers} layers × {model.cfg.n_heads} heads "
          f"({time.time() - t0:.1f}s)")
    return model, None


def _cmd_list(a) -> int:
    from ..heads import ANALYZERS
    for n, cls in sorted(ANALYZERS.items()):
        print(f"{n:18s} {cls.paper}")
        if a.verbose:
            for k, t in analyzer_params(cls).items():
                print(f"{'':20s}--param {k}=…  ({_type_name(t)})")
    return 0


def _cmd_score(a) -> int:
    from ..heads import ANALYZERS
    from .atomic import OutputError, check_out_files
    from .report import save_scores, score_paths

    prog = "headscope score"
    if a.method not in ANALYZERS:
        raise UsageError(f"unknown analyzer {a.method!r}; available: {', '.join(sorted(ANALYZERS))}")
    cls = ANALYZERS[a.method]
    analyzer = make_analyzer(cls, parse_params(cls, a.param))
    if a.out:
        try:
            check_out_files(score_paths(a.out))
        except OutputError as e:
            raise UsageError(str(e)) from None
    _check_device(a.device)
    model, code = _load(a.model, a.device, prog)
    if model is None:
        return code
    try:
        res = analyzer.score(model)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("HEADSCOPE_DEBUG"):
            raise
        print(f"{prog}: error: {a.method} failed: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    for l, h, v in res.top(a.top):
        print(f"L{l:<3d} H{h:<3d} {v:.4f}")
    if a.out:
        try:
            print("saved", save_scores(res, a.out))
        except OSError as e:
            print(f"{prog}: error: cannot write {a.out}: {_one_line(e)} (nothing was written)", file=sys.stderr)
            return EXIT_FAILED
    return 0


def _cmd_report(a) -> int:
    from ..heads import ANALYZERS
    from .atomic import OutputError, check_out_folder

    prog = "headscope report"
    from .report import QUICK_SKIPPED, default_names
    preset = getattr(a, "preset", "quick")
    names = [n.strip() for n in a.only.split(",") if n.strip()] or default_names(preset)
    skipped = {n: w for n, w in QUICK_SKIPPED.items() if n in ANALYZERS and n not in names} \
        if preset == "quick" and not a.only.strip() else {}
    unknown = [n for n in names if n not in ANALYZERS]
    if unknown:
        raise UsageError(f"unknown analyzer(s) {', '.join(unknown)} in --only; available: "
                         f"{', '.join(sorted(ANALYZERS))}")
    try:
        out = check_out_folder(a.out)
    except OutputError as e:
        raise UsageError(str(e)) from None
    _check_device(a.device)
    t0 = time.time()
    model, code = _load(a.model, a.device, prog)
    if model is None:
        return code
    from .report import run_analyzers, write_report
    print_estimate(model, names, preset, a.device)
    for n, why in skipped.items():
        print(f"not run in the quick report: {n} ({why.split(';')[0]})")
    if getattr(a, "ray", None):
        from . import distributed as D
        cuda = (a.device or "").startswith("cuda")
        with D.ModelPool(a.model, address=None if a.ray == "local" else a.ray, num_workers=a.workers,
                         gpus_per_worker=1 if cuda else 0,
                         load_kwargs={"device": "cuda" if cuda else a.device}) as pool:
            results, errors = run_analyzers(model, names, preset=preset, pool=pool)
    else:
        results, errors = run_analyzers(model, names, preset=preset)
    try:
        path = write_report(model, results, errors, out, preset=preset, skipped=skipped)
    except (OSError, OutputError) as e:
        print(f"{prog}: error: cannot write the report to {out}: {_one_line(e)} (nothing was written; "
              "an earlier report there is unchanged)", file=sys.stderr)
        return EXIT_FAILED
    from .report import summary_lines
    for line in summary_lines(results):
        print(f"  {line}")
    print(f"report: {path} ({len(results)} analyzers, {len(errors)} failed, {time.time() - t0:.0f}s total)")
    if errors:
        print(f"{prog}: {len(errors)} of {len(names)} analyzers failed (listed in report.html):", file=sys.stderr)
        for n, err in errors.items():
            print(f"  {n}: {' '.join(err.split())}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def print_estimate(model, names, preset, device) -> None:
    """One line per analyzer and a total: the estimated run time of this preset (before it starts)."""
    from .report import estimate_seconds, format_duration
    est = estimate_seconds(model.cfg.to_dict(), names, preset)
    total = sum(est.values())
    basis = ("an estimate: the quick timings measured on SmolLM2 with one CPU thread, scaled by tokens, prompts "
             "and heads and by the model's size")
    if str(device or "cpu").startswith("cuda"):
        print(f"estimated run time, preset {preset}: about {format_duration(total)} on one CPU thread ({basis}). "
              "This run is on a GPU, for which no estimate exists: expect it to be much shorter")
    else:
        print(f"estimated run time, preset {preset}: about {format_duration(total)} ({basis}; on an idle "
              "multi-core CPU expect less)")
        if preset == "paper" and total > 4 * 3600:
            print(f"warning: the paper preset takes about {format_duration(total)} on this CPU estimate. It is the "
                  "run to make on a GPU (--device cuda); on a CPU, pick analyzers with --only or use --preset quick")
    for n, v in est.items():
        print(f"  {n:16s} ~{format_duration(v)}")
    sys.stdout.flush()


def _load_saved(folder):
    from .views import load_report
    try:
        return load_report(folder)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None


def _cmd_show(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .tables import top_rows, write_csv
    from .report import tie_note
    summary, results = _load_saved(a.report)
    only = [n.strip() for n in a.only.split(",") if n.strip()]
    missing = [n for n in only if n not in results]
    if missing:
        raise UsageError(f"{', '.join(missing)} not in {a.report}; it holds: {', '.join(results) or '(none)'}")
    if only:
        results = {n: results[n] for n in only}
    if a.csv:
        from .atomic import OutputError, check_out_files
        try:
            check_out_files([Path(a.csv).expanduser().absolute()])
        except OutputError as e:
            raise UsageError(str(e)) from None
    con = Console()
    m = summary.get("model") or {}
    con.print(f"[bold]{m.get('name', '?')}[/bold]: {m.get('n_layers')} layers × {m.get('n_heads')} heads; "
              f"preset {summary.get('preset', 'quick')}; created {summary.get('created', '?')}")
    for n, err in (summary.get("errors") or {}).items():
        con.print(f"[red]{n} failed:[/red] {err}")
    for n, why in (summary.get("skipped") or {}).items():
        con.print(f"[yellow]{n} not run:[/yellow] {why}")
    for n, rows in top_rows(results, a.top).items():
        t = Table(title=f"{n} — top {len(rows)}", title_justify="left")
        for c in ("rank", "head", "score", "z"):
            t.add_column(c, justify="right")
        for i, (l, h, v, z) in enumerate(rows, 1):
            t.add_row(str(i), f"L{l}H{h}", f"{v:.4g}", f"{z:+.1f}")
        con.print(t)
        tie = tie_note(results[n])
        if tie:
            con.print(f"[yellow]{n}: {tie}[/yellow]")
    if a.csv:
        try:
            print("wrote", write_csv(results, Path(a.csv).expanduser()))
        except OSError as e:
            print(f"headscope show: error: cannot write {a.csv}: {_one_line(e)}", file=sys.stderr)
            return EXIT_FAILED
    return 0


def _cmd_compare(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .tables import compare, fmt_num, fmt_rho
    ra, rb = _load_saved(a.report_a), _load_saved(a.report_b)
    try:
        res = compare(ra, rb, a.top, same=True if a.same_model else None)
    except ValueError as e:
        print(f"headscope compare: {e}", file=sys.stderr)
        return 2
    con = Console()
    na, nb = (ra[0].get("model") or {}).get("name", "A"), (rb[0].get("model") or {}).get("name", "B")
    if res["mode"] == "runs":
        who = na if na == nb else f"{na} / {nb}"
        con.print(f"two runs of [bold]{who}[/bold]: Spearman's rho over all heads and top-{a.top} overlap")
        t = Table()
        for c in ("analyzer", "Spearman rho", f"top-{a.top} overlap", "top head A / B", "max |diff|",
                  "relative", "note"):
            t.add_column(c)
        for n, d in res["analyzers"].items():
            note = "ties: " + (d["tie_a"] or d["tie_b"]).split(":")[0] if d["tie_a"] or d["tie_b"] else ""
            (la, ha, _), (lb, hb, _) = d["top_a"][0], d["top_b"][0]
            t.add_row(n, fmt_rho(d["spearman"]), f"{d['overlap']:.0%}", f"L{la}H{ha} / L{lb}H{hb}",
                      f"{d['max_abs_diff']:.3g}", f"{d['max_rel_diff']:.3g}", note)
        con.print(t)
    else:
        con.print(f"two models: [bold]{na}[/bold] (A) and [bold]{nb}[/bold] (B)")
        for n, d in res["analyzers"].items():
            t = Table(title=n, title_justify="left")
            for c in ("rank", f"A head", "A score", f"B head", "B score"):
                t.add_column(c, justify="right")
            for i in range(max(len(d["top_a"]), len(d["top_b"]))):
                la = d["top_a"][i] if i < len(d["top_a"]) else None
                lb = d["top_b"][i] if i < len(d["top_b"]) else None
                t.add_row(str(i + 1), f"L{la[0]}H{la[1]}" if la else "", f"{la[2]:.4g}" if la else "",
                          f"L{lb[0]}H{lb[1]}" if lb else "", f"{lb[2]:.4g}" if lb else "")
            con.print(t)
            sa, sb = d["stats_a"], d["stats_b"]
            con.print("  mean {} / {}; max {} / {}; above threshold {} / {}; depth of the top heads (0 = first "
                      "layer, 1 = last) {:.2f} / {:.2f}".format(
                          fmt_num(sa["mean"]), fmt_num(sb["mean"]), fmt_num(sa["max"]), fmt_num(sb["max"]),
                          "—" if sa["above_threshold"] is None else f"{sa['above_threshold']:.1%}",
                          "—" if sb["above_threshold"] is None else f"{sb['above_threshold']:.1%}",
                          sa["top_depth"], sb["top_depth"]))
    if res["only_a"] or res["only_b"]:
        con.print(f"only in A: {', '.join(res['only_a']) or '—'}; only in B: {', '.join(res['only_b']) or '—'}")
    if not res["analyzers"]:
        con.print("[yellow]the two reports have no analyzer in common[/yellow]")
    return 0


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when its parent dies, even by SIGKILL."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the signal handlers below still stop the server
        pass


def _cmd_explore(a) -> int:
    """Run ``streamlit run app/explorer.py`` as a child and stop it when this process ends
    (normally, Ctrl-C, SIGTERM, SIGHUP; on Linux also SIGKILL, through PR_SET_PDEATHSIG)."""
    import signal
    import subprocess

    script = Path(__file__).with_name("explorer.py")
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", a.host,
           "--server.port", str(a.port), *STREAMLIT_OPTIONS]
    if a.headless:
        cmd += ["--server.headless", "true"]
    cmd += ["--", "--report", a.report, "--model", a.model, "--circuit", getattr(a, "circuit", "")]
    kw = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    proc = subprocess.Popen(cmd, **kw)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    handled = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, stop) for s in handled}
    print(f"headscope explore: serving on http://{a.host}:{a.port} (streamlit pid {proc.pid}); "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)


def _cmd_delegated(a) -> int:
    """``headscope intervene|circuit ...``: handed to the module's own parser; its argument checks
    (``SystemExit`` with a message) become one line and exit 2 like the other commands, ``--out`` is
    checked before the model loads, and a model that cannot load is one line too."""
    import importlib

    from ..probe.loading import ModelLoadError, ModelNotFound
    from .atomic import OutputError, check_out_folder

    module, marker, _ = DELEGATED[a.cmd]
    mod = importlib.import_module(f"{__package__}.{module}")
    ap = Parser(prog="headscope")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mod.add_parser(sub)
    args = ap.parse_args([a.cmd, *a.rest])
    if getattr(args, "out", None) and not getattr(args, "compare", None):
        try:
            check_out_folder(args.out, marker=marker)
        except OutputError as e:
            raise UsageError(str(e)) from None
    try:
        return args.func(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            raise UsageError(e.code) from None
        raise
    except ModelLoadError as e:
        print(f"headscope {a.cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAILED
    except ModelNotFound as e:
        raise UsageError(str(e)) from None


def main(argv=None) -> int:
    """Entry point of the ``headscope`` command: parse ``argv`` (default ``sys.argv[1:]``) and run the
    command. Returns the exit code: 0 done, 1 something failed (an analyzer, a write), 2 a bad
    argument (one line on stderr; nothing was run), 130 interrupted (nothing was written)."""
    ap = build_parser()
    a = ap.parse_args(argv)
    prog = f"headscope {a.cmd}"
    try:
        if a.cmd in DELEGATED:
            return _cmd_delegated(a)
        if a.cmd == "explore":
            return _cmd_explore(a)
        if a.cmd == "list":
            return _cmd_list(a)
        if a.cmd == "score":
            return _cmd_score(a)
        if a.cmd == "show":
            return _cmd_show(a)
        if a.cmd == "compare":
            return _cmd_compare(a)
        return _cmd_report(a)
    except UsageError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (nothing was written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
