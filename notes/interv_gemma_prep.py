"""Device prep for notes/interv_gemma_gpu.sh: convert the Gemma-3-270M GGUF once into a plain HF
folder (every job then loads it in seconds instead of re-reading the GGUF and its 262k-token
tokenizer), then check the device's forward against this repo's CPU reference values and the Triton
path against the chunked one.

    python notes/interv_gemma_prep.py GGUF_OR_FOLDER DIR [DEVICE]

Prints one JSON line; exit 0 when the folder loads and the forward is finite. Writes DIR/no_triton when
the Triton path fails or disagrees with the chunked path (the batch then sets HEADSCOPE_NO_TRITON=1).

The tokenizer: transformers 5.17 (the device's) builds Gemma-3's GGUF tokenizer as a Unigram over the
file's scores and adds no <bos>: "The capital of France is" becomes 24 one-character tokens (5.24 gives
[2, 818, 5279, 529, 7001, 563]), and " positive" / " negative" share their first token. So the converted
tokenizer is checked against ids computed here with 5.24 (the embedded model's); if it differs it is rebuilt
from the GGUF metadata the way 5.24 does (``build_gemma_tokenizer``: BPE, merges rebuilt from the vocabulary
in file order, control tokens special, <bos> added; checked equal to 5.24's on 207 texts under 5.17 and 5.24),
and checked again; exit 1 if it still differs. TOKENIZER_DIR=<folder with tokenizer.json and
tokenizer_config.json> copies a known-good tokenizer instead.
"""
import hashlib
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

# Tokenizer reference (transformers 5.24, the embedded gemma3-270m): ids of two prompts, and a hash of the ids
# of the first 200 non-empty lines of heads/data/natural_text.txt (2,910 tokens).
TOK_REF = {"The capital of France is": [2, 818, 5279, 529, 7001, 563],
           'Is the word "happy" positive or negative?\nAnswer:': [2, 4602, 506, 3658, 623, 19849, 236775, 4414, 653,
                                                                  5676, 236881, 107, 7925, 236787]}
TOK_HASH = "f8681ec76f858a25"
TEXT = Path(var.__file__).parents[1] / "heads" / "data" / "natural_text.txt"


def tokenizer_problem(tok) -> str | None:
    """Why ``tok`` is not the reference Gemma-3 tokenizer (None: it is)."""
    for text, ids in TOK_REF.items():
        got = tok(text)["input_ids"]
        if list(got) != ids:
            return f"{text!r} -> {list(got)[:12]}... (reference {ids})"
    lines = [l for l in TEXT.read_text(encoding="utf-8").split("\n") if l][:200]
    h = hashlib.sha256(json.dumps([tok(t)["input_ids"] for t in lines]).encode()).hexdigest()[:16]
    return None if h == TOK_HASH else f"natural_text ids hash {h} (reference {TOK_HASH})"


def build_gemma_tokenizer(gguf_file: Path):
    """Gemma-3's tokenizer from the GGUF metadata, built as transformers 5.24 does
    (integrations/gguf/gguf_tokenizer_mapping.py: gemma_tokenizer + add_gguf_special_tokens)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    f = GGUFReader(str(gguf_file)).fields
    arr = lambda k: [f[k].parts[i] for i in f[k].data]
    one = lambda k: f[k].parts[f[k].data[0]][0] if k in f else None
    tokens = [bytes(p).decode("utf-8") for p in arr("tokenizer.ggml.tokens")]
    types = [int(p[0]) for p in arr("tokenizer.ggml.token_type")]
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]   # "  " is stored as spaces
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})   # file order = merge order
    special = {name: tokens[int(one(k))] for name, k in (
        ("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id"))
        if one(k) is not None}
    add_bos = bool(one("tokenizer.ggml.add_bos_token")) if "tokenizer.ggml.add_bos_token" in f else True
    add_eos = bool(one("tokenizer.ggml.add_eos_token")) if "tokenizer.ggml.add_eos_token" in f else False
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=add_bos, add_eos_token=add_eos, **special)
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    have = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4 and t in have]
    if user:
        tok.add_tokens(user)
    return tok


def replace_tokenizer(folder: Path, tok=None, src_dir: Path | None = None) -> None:
    """Put ``tok`` (or the tokenizer files of ``src_dir``) in ``folder`` instead of its tokenizer files."""
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    if src_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src_dir / name, folder / name)
    else:
        tok.save_pretrained(folder)


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
        from transformers import AutoTokenizer
        why = tokenizer_problem(AutoTokenizer.from_pretrained(tmp))
        if os.environ.get("TOKENIZER_DIR"):
            print(f"tokenizer: copying {os.environ['TOKENIZER_DIR']}", flush=True)
            replace_tokenizer(tmp, src_dir=Path(os.environ["TOKENIZER_DIR"]))
        elif why:
            print(f"the converted tokenizer is wrong ({why}); rebuilding it from the GGUF metadata", flush=True)
            replace_tokenizer(tmp, build_gemma_tokenizer(src))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
t_conv = time.time() - t0
from transformers import AutoTokenizer  # noqa: E402
why = tokenizer_problem(AutoTokenizer.from_pretrained(out))
if why:
    sys.exit(f"the tokenizer in {out} is not Gemma-3's ({why}): remove {out} and run again, or set TOKENIZER_DIR "
             "to a folder with a good tokenizer.json + tokenizer_config.json (e.g. ~/.cache/headscope/gemma3-270m-v1)")
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
text = TEXT.read_text(encoding="utf-8")
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
