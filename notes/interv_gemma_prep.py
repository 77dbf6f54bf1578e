"""Device prep for notes/interv_gemma_gpu.sh: convert the Gemma-3-270M GGUF once into a plain HF
folder (every job then loads it in seconds instead of re-reading the GGUF and its 262k-token
tokenizer), then check the device's forward against this repo's CPU reference values and the Triton
path against the chunked one.

    python notes/interv_gemma_prep.py GGUF_OR_FOLDER DIR [DEVICE]

Prints one JSON line; exit 0 when the folder loads and the forward is finite. Writes DIR/no_triton when
the Triton path fails or disagrees with the chunked path (the batch then sets HEADSCOPE_NO_TRITON=1).
"""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.interventions import var
from headscope.probe.loading import convert_gguf

# CPU reference (this repo, 2-core CPU, transformers 5.24, torch 2.13; embedded gemma3-270m):
# the last position's max logit and argmax token for PROMPT, and VAR's first-token peak (layers >= 2).
PROMPT = "The capital of France is"
REF = {"argmax": " the", "max_logit": 19.0915, "first_token_peak": 25.291}

src, out = Path(sys.argv[1]), Path(sys.argv[2])
device = sys.argv[3] if len(sys.argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu")
t0 = time.time()
if not (out / "config.json").is_file():
    if src.is_dir():
        ggufs = sorted(src.glob("*.gguf"))
        if not ggufs:
            sys.exit(f"{src} holds no .gguf file")
        src = ggufs[0]
    if src.suffix != ".gguf" or not src.is_file():
        sys.exit(f"{src} is not a .gguf file: pass the Gemma GGUF (MODEL=...)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        convert_gguf(src, tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
t_conv = time.time() - t0
m = hs.load(out, device=device)
t_load = time.time() - t0 - t_conv
if (m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_kv_heads) != (18, 4, 1):
    sys.exit(f"{out} is not Gemma-3-270M: {m.cfg}")
toks = m.to_tokens(PROMPT).to(m.device)
with torch.no_grad():
    logits = m(toks)[0, -1].float()
res = dict(folder=str(out), device=str(m.device), name=m.cfg.name, seconds_convert=round(t_conv, 1),
           seconds_load=round(t_load, 1), argmax=m.tokenizer.decode(logits.argmax()), ref_argmax=REF["argmax"],
           max_logit=round(float(logits.max()), 4), ref_max_logit=REF["max_logit"],
           first_token_peak=round(var.first_token_peak(m, toks[0]), 3), ref_first_token_peak=REF["first_token_peak"])
if not torch.isfinite(logits).all():
    sys.exit(f"non-finite logits on {device}: {res}")
# Triton vs chunked on an instrumented pass (stats recorded: the Triton kernel runs on CUDA), 700 tokens
# so that the sliding-window layers (512) matter.
text = (Path(var.__file__).parents[1] / "heads" / "data" / "natural_text.txt").read_text(encoding="utf-8")
long = m.to_tokens(text[:6000])[:, :700].to(m.device)
triton_ok, why = True, ""
if m.device.type == "cuda":
    outs = {}
    for flag in ("1", "0"):
        os.environ["HEADSCOPE_NO_TRITON"] = flag
        try:
            with torch.no_grad(), m.record(hs.Stats(sink_k=1, entropy=True)) as rec:
                lg = m(long)[0].float()
            outs[flag] = (lg, rec.stack("sink_mass").float())
        except Exception as e:  # noqa: BLE001 - reported, and the batch falls back to the chunked path
            triton_ok, why = False, f"{type(e).__name__}: {e}"
            break
    os.environ.pop("HEADSCOPE_NO_TRITON", None)
    if triton_ok:
        dl = float((outs["1"][0] - outs["0"][0]).abs().max())
        ds = float((outs["1"][1] - outs["0"][1]).abs().max())
        res.update(triton_vs_chunked_max_dlogit=dl, triton_vs_chunked_max_dsink=ds)
        if not (dl < 5e-2 and ds < 5e-3):
            triton_ok, why = False, f"Triton differs from the chunked path (|dlogit| {dl:.3g}, |dsink| {ds:.3g})"
if not triton_ok:
    (out / "no_triton").write_text(why + "\n")
elif (out / "no_triton").exists():
    (out / "no_triton").unlink()
res.update(triton_ok=triton_ok, triton_note=why, seconds=round(time.time() - t0, 1))
print(json.dumps(res), flush=True)
