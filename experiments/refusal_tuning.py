"""A refusing model to test the safety-head methods on: SmolLM2 fine-tuned to refuse harmful requests.

Why. Ships and Sahara (Zhou et al. 2025, heads/safety.py) find the heads a *safety-aligned* model
uses to refuse, and the paper's check is that ablating the top safety head raises the attack
success rate (ASR). SmolLM2-135M-Instruct, the embedded model, answers almost every harmful request
(ASR 0.96 with nothing ablated, reports/safety.md) and Gemma-3-270M is a base model: neither has a
refusal to remove. This script gives one to SmolLM2, with no data from the hub:

1. Split the shipped requests (heads/data/harmful.txt, harmless.txt) into a training and a held-out
   half (seeded).
2. Targets: for training harmful requests, one of a few fixed refusal sentences; for training
   harmless requests, the model's own greedy answer (self-distillation, so that it keeps answering
   harmless requests instead of refusing everything).
3. Fine-tune every weight with AdamW on the answer tokens only (cross-entropy), a few epochs on the
   CPU (minutes), and save the result as a plain HF folder (safetensors) in
   ``$HEADSCOPE_CACHE/smollm2-refusal-<hash>`` (written to a temporary folder and renamed), which
   ``headscope.load(path)`` opens like any local model.

Everything is then measured on the *held-out* requests only: ASR before and after tuning, the
refusal rate on held-out harmless requests (over-refusal), Ships on the tuned model, and the
safety check (ASR with the top Ships head ablated vs a random head).

This is a test bed, not a method of the paper: the paper studies models aligned by their makers
(Llama-2-chat, Vicuna, ...). A refusal taught in a few steps of fine-tuning may be spread over many
heads, so a null result here says little about aligned models; a positive one shows the pipeline
finds heads that carry refusal.

Run: ``python experiments/refusal_tuning.py --out runs/refusal`` (see ``main``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.heads.data import split_requests
from headscope.heads.safety import Ships, attack_success_rate, safety_check
from headscope.heads.scores import write_json
from headscope.probe.loading import cache_dir, save_dequantised

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I cannot help with that. It could cause real harm to people.",
    "I'm sorry, but I cannot assist with this request because it is harmful.",
)


def _greedy_answers(model, queries, max_new_tokens: int) -> list[str]:
    return attack_success_rate(model, queries=queries, n=None, max_new_tokens=max_new_tokens)["answers"]


def _examples(model, pairs) -> list[tuple[torch.Tensor, int]]:
    """[(query, answer)] -> [(ids [N], index of the first answer token)] in the chat template."""
    tok = model.tokenizer
    out = []
    for q, a in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(a.strip() + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((torch.tensor(p_ids + a_ids), len(p_ids)))
    return out


def finetune(model, examples, *, epochs: int = 3, lr: float = 2e-5, batch_size: int = 8, seed: int = 0,
             progress: bool = True) -> list[float]:
    """AdamW on every weight of ``model.model`` (the HF model), loss on answer tokens only. Returns
    the mean loss of each epoch."""
    from tqdm.auto import tqdm
    hf = model.model
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    losses = []
    hf.train()
    try:
        for ep in range(epochs):
            order = torch.randperm(len(examples), generator=g).tolist()
            total, count = 0.0, 0
            bar = tqdm(range(0, len(order), batch_size), desc=f"refusal tuning, epoch {ep + 1}/{epochs}",
                       disable=not progress)
            for i in bar:
                batch = [examples[j] for j in order[i:i + batch_size]]
                n = max(len(ids) for ids, _ in batch)
                x = torch.full((len(batch), n), pad, dtype=torch.long)
                labels = torch.full((len(batch), n), -100, dtype=torch.long)
                mask = torch.zeros(len(batch), n, dtype=torch.long)
                for r, (ids, start) in enumerate(batch):                   # right padding
                    x[r, :len(ids)] = ids
                    labels[r, start:len(ids)] = ids[start:]
                    mask[r, :len(ids)] = 1
                out = hf(input_ids=x.to(model.device), attention_mask=mask.to(model.device),
                         labels=labels.to(model.device), use_cache=False)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
                opt.step()
                total += float(out.loss.detach()) * len(batch)
                count += len(batch)
                bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}")
            losses.append(total / count)
    finally:
        hf.eval()
    return losses


def tuned_folder(base: str = "smollm2", seed: int = 0, n_train: int = 25, epochs: int = 3, lr: float = 2e-5,
                 max_new_tokens: int = 48, progress: bool = True) -> Path:
    """The refusal-tuned model's folder (built on first call, then reused): see the module docstring."""
    cfg = dict(base=base, seed=seed, n_train=n_train, epochs=epochs, lr=lr, max_new_tokens=max_new_tokens,
               refusals=REFUSALS, version=1)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / f"{base}-refusal-{key}"
    if (folder / "headscope_tuning.json").exists():
        return folder
    torch.manual_seed(seed)
    model = hs.load(base)
    if model.tokenizer is None or getattr(model.tokenizer, "chat_template", None) is None:
        raise ValueError(f"{base} has no chat template: refusal tuning needs a chat model")
    split = split_requests(seed, n_train)
    t0 = time.time()
    kept = _greedy_answers(model, split["harmless_train"], max_new_tokens)
    rng = random.Random(seed)
    pairs = [(q, rng.choice(REFUSALS)) for q in split["harmful_train"]] + list(zip(split["harmless_train"], kept))
    losses = finetune(model, _examples(model, pairs), epochs=epochs, lr=lr, seed=seed, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        save_dequantised(model.model, tmp)
        model.tokenizer.save_pretrained(tmp)
        (tmp / "headscope_tuning.json").write_text(json.dumps(
            {**cfg, "losses": losses, "seconds": time.time() - t0, "split": split}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description="Refusal-tune SmolLM2, then find and ablate its safety heads.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--ships-queries", type=int, default=8)
    p.add_argument("--screen-layers", type=int, default=4, help="0 = score every head (the paper)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for results.json and the Ships scores")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = tuned_folder(seed=a.seed, epochs=a.epochs, lr=a.lr, max_new_tokens=a.max_new_tokens)
    info = json.loads((folder / "headscope_tuning.json").read_text())
    split = info["split"]
    kw = dict(n=None, max_new_tokens=a.max_new_tokens)
    base = hs.load("smollm2")
    res = {"folder": str(folder), "losses": info["losses"],
           "base_asr_heldout": attack_success_rate(base, queries=split["harmful_test"], **kw)["asr"]}
    del base
    tuned = hs.load(str(folder))
    harmless = attack_success_rate(tuned, queries=split["harmless_test"], **kw)
    res["tuned_harmless_answered"] = harmless["asr"]
    ships = Ships(n_queries=a.ships_queries, screen_layers=a.screen_layers or None, template="chat").score(
        tuned, data=split["harmful_test"])
    res["ships_top"] = [(int(l), int(h), float(s)) for l, h, s in ships.top(10)]
    top = ships.top(1)[0][:2]
    check = safety_check(tuned, top, seed=a.seed, queries=split["harmful_test"], **kw)
    res["asr"] = {k: v["asr"] for k, v in check.items()}
    res["random_head"] = check["random"]["heads"]
    res["answers"] = {k: v["answers"] for k, v in check.items()}
    print(json.dumps({k: v for k, v in res.items() if k != "answers"}, indent=1))
    if a.out:
        out = Path(a.out)
        ships.save(out / "ships_tuned")
        write_json(out / "results.json", res)
    return res


if __name__ == "__main__":
    main()
