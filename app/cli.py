"""``headscope`` command line: ``report`` (every analyzer), ``score`` (one), ``list``, ``explore``
(the Streamlit explorer)."""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path


def _params(items):
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--param expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="headscope", description="What does each attention head do?")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="run every analyzer and write report.html, scores.json, raw/")
    r.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, tiny-*, or a local HF folder")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--only", default="", help="comma-separated analyzer names (default: all)")
    r.add_argument("--device", default=None)
    s = sub.add_parser("score", help="run one analyzer")
    s.add_argument("method")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--out", default=None, help="save HeadScores here (PATH.json + PATH.safetensors)")
    s.add_argument("--param", action="append", help="analyzer hyperparameter key=value (repeatable)")
    s.add_argument("--top", type=int, default=10)
    s.add_argument("--device", default=None)
    sub.add_parser("list", help="list the analyzers")
    e = sub.add_parser("explore", help="open the Streamlit explorer (a saved report, or a model live)")
    e.add_argument("--report", default="", help="a folder written by `headscope report`")
    e.add_argument("--model", default="smollm2", help="model for the live view")
    e.add_argument("--port", type=int, default=8501)
    a = ap.parse_args(argv)
    if a.cmd == "explore":
        import subprocess
        script = Path(__file__).with_name("explorer.py")
        cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(a.port),
               "--browser.gatherUsageStats", "false", "--", "--report", a.report, "--model", a.model]
        return subprocess.call(cmd)

    from .. import load
    from ..heads import ANALYZERS
    if a.cmd == "list":
        for n, cls in sorted(ANALYZERS.items()):
            print(f"{n:18s} {cls.paper}")
        return 0
    if a.cmd == "score" and a.method not in ANALYZERS:
        print(f"unknown analyzer {a.method!r}; available: {', '.join(sorted(ANALYZERS))}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        model = load(a.model, device=a.device)
    except Exception as e:
        print(f"headscope: cannot load model {a.model!r}: {e}", file=sys.stderr)
        return 2
    print(f"loaded {model.cfg.name}: {model.cfg.n_layers} layers × {model.cfg.n_heads} heads "
          f"({time.time() - t0:.1f}s)")
    if a.cmd == "score":
        res = ANALYZERS[a.method](**_params(a.param)).score(model)
        for l, h, v in res.top(a.top):
            print(f"L{l:<3d} H{h:<3d} {v:.4f}")
        if a.out:
            print("saved", res.save(a.out))
        return 0
    from .report import run_analyzers, write_report
    names = [n for n in a.only.split(",") if n] or None
    results, errors = run_analyzers(model, names)
    path = write_report(model, results, errors, Path(a.out))
    print(f"report: {path} ({len(results)} analyzers, {len(errors)} failed, {time.time() - t0:.0f}s total)")
    return 1 if errors and not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
