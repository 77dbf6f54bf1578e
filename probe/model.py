"""``HookedModel``: a Hugging Face causal LM running through headscope's attention path, with a
TransformerLens-style API (``run_with_cache``, ``run_with_hooks``) and headscope's own contexts
(``record`` for O(N) statistics, ``edit`` for head edits).

Nothing here re-implements attention or patches a model class: at load time the model is switched
to the registered "headscope" attention function, each attention module gets a reference to the
shared ``ProbeState``, and plain PyTorch forward hooks on the decoder layers and output projections
serve the residual-stream and ``hook_result`` names.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels.spec import StatRequest
from . import attention as _attention
from . import module_hooks
from .checks import as_index, as_indices, check_range
from .edits import EDIT_TYPES, OutputEdit, compile_edits
from .cache import ActivationCache
from .hf_compat import GENERATE_CACHE_KWARG
from .hooks import hook_name, parse
from .record import Recorder
from .state import ProbeState
from .tl_idioms import TLConfigNames, TLIdioms, bos_token_id, tokens_with_bos

_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")                  # attention output projection
_PRE_MLP_NORM = ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm")  # input = resid_mid


@dataclass(frozen=True)
class ModelInfo(TLConfigNames):
    """A model's shape, as ``model.cfg`` (TransformerLens' config names too: ``d_vocab``, ``n_ctx``, ...).

    Fields: ``name``; ``n_layers``; ``n_heads`` (query heads per layer); ``n_kv_heads`` (key/value
    heads, = n_heads without GQA); ``d_head``; ``d_model``; ``max_ctx`` (context length in tokens);
    ``vocab_size``; ``windows`` (per layer: the sliding-window size, or None for full attention);
    ``arch`` (the HF model class name)."""
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    max_ctx: int
    vocab_size: int
    windows: tuple            # per layer: sliding window size or None (full attention)
    arch: str = ""

    def to_dict(self):
        """The fields as a plain dict (JSON-able; what ``HeadScores.model`` stores)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _decoder_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise TypeError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")
    return lists[0]


def _attention_module(layer: nn.Module) -> nn.Module:
    for m in layer.modules():
        if m is not layer and "Attention" in type(m).__name__ and hasattr(m, "layer_idx"):
            return m
    raise TypeError(f"no attention module found in {type(layer).__name__}")


def _info(model, name: str) -> ModelInfo:
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    n_heads = c.num_attention_heads
    d_model = c.hidden_size
    d_head = getattr(c, "head_dim", None) or d_model // n_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    n_layers = c.num_hidden_layers
    lt = getattr(c, "layer_types", None)
    sw = getattr(c, "sliding_window", None)
    if lt is not None:
        windows = tuple(sw if t == "sliding_attention" else None for t in lt)
    else:
        windows = tuple([sw] * n_layers) if sw else tuple([None] * n_layers)
    max_ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    return ModelInfo(name, n_layers, n_heads, n_kv, d_head, d_model, int(max_ctx), c.vocab_size, windows,
                     type(model).__name__)


class HookedModel(TLIdioms, nn.Module):
    """Wraps an HF causal LM. ``model(tokens)`` returns logits [batch, pos, vocab]."""

    def __init__(self, hf_model: nn.Module, tokenizer=None, name: str | None = None):
        super().__init__()
        self.model = hf_model.eval()
        self.tokenizer = tokenizer
        self.cfg = _info(hf_model, name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__)
        self._token_masks = WeakIdKeyDictionary()   # to_tokens output -> its padding mask
        self.model.set_attn_implementation(_attention.NAME)
        self.layers = _decoder_layers(hf_model, self.cfg.n_layers)
        self.attn = [_attention_module(l) for l in self.layers]
        # a second load of the same HF model shares the first one's state and module hooks, so that
        # both wrappers keep working (a fresh state would leave the first one recording nothing)
        prior = getattr(self.attn[0], "_headscope", None) if self.attn else None
        shared = isinstance(prior, ProbeState) and prior.n_layers == self.cfg.n_layers and \
            all(a.__dict__.get("_headscope") is prior for a in self.attn)
        self.state = prior if shared else ProbeState(self.cfg.n_layers)
        for i, a in enumerate(self.attn):
            a._headscope = self.state          # read by the attention function
            a._headscope_layer = i
        self._check_dispatch()
        hooks = module_hooks.LazyHooks(self.state)
        self._install_torch_hooks(hooks)       # the module search (its errors) and the hooks, queued
        if not shared:                         # shared: the first wrapper's hooks serve both; these are dropped
            self.state.on_hooks = hooks.register          # registered by the first push of hooks

    def _check_dispatch(self):
        """Run two tokens and refuse the model unless every layer's attention module went through
        the registered attention function: a model class whose attention does not dispatch through
        transformers' ``AttentionInterface`` (e.g. Falcon before transformers 5.25) would otherwise load,
        run its own attention and silently ignore every hook, statistic and edit."""
        with torch.no_grad(), _attention.watch_calls(self.attn) as seen:
            self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device), use_cache=False)
        missing = [i for i in range(len(self.attn)) if i not in seen]
        if missing:
            cls = type(self.attn[missing[0]]).__name__
            raise TypeError(
                f"{type(self.model).__name__} cannot run through headscope: its attention modules ({cls}, "
                f"layers {missing}) do not call transformers' attention interface (ALL_ATTENTION_FUNCTIONS), "
                "so headscope's attention function would never run and every hook, statistic and edit "
                "would be silently ignored. Use a model class whose attention dispatches through "
                "AttentionInterface (Llama, Qwen2/3, Mistral, Gemma, GPT-2, GPT-NeoX, OPT, ...; e.g. convert "
                "the checkpoint to one), or run this model without headscope.")

    def _check_attention_path(self) -> None:
        """Refuse a context (record, edit, hooks) when the model no longer runs its attention through
        headscope: after ``set_attn_implementation("sdpa")`` (or any other) on the HF model, the
        statistics, edits and attention hooks would be silently ignored."""
        for i, a in enumerate(self.attn):
            impl = getattr(getattr(a, "config", None), "_attn_implementation", _attention.NAME)
            if impl != _attention.NAME:
                raise RuntimeError(
                    f"layer {i} of {self.cfg.name} runs its attention through {impl!r}, not headscope's, so "
                    "statistics, edits and attention hooks would be ignored: call "
                    f"model.model.set_attn_implementation({_attention.NAME!r}) (or hs.load the model again) "
                    "before this block")

    # ---------------------------------------------------------------- torch module hooks (registered on first use)
    def _install_torch_hooks(self, hooks: module_hooks.LazyHooks):
        """The hook points served by torch module hooks (resid_pre/mid/post, result, and
        ``module_hooks.install``'s), handed to ``hooks``: registered when hooks are first used. Each
        hook reads the active hooks from the module it runs on (``module_hooks.active_hooks``)."""
        active, run = module_hooks.active_hooks, module_hooks.run
        H, d = self.cfg.n_heads, self.cfg.d_head

        for i, layer in enumerate(self.layers):
            def pre(mod, args, kwargs, i=i):
                hk = active(mod)
                if not hk.get((i, "resid_pre")):
                    return None
                if args:
                    return (run(hk, i, "resid_pre", args[0]),) + tuple(args[1:]), kwargs
                kwargs["hidden_states"] = run(hk, i, "resid_pre", kwargs["hidden_states"])
                return args, kwargs

            def post(mod, args, kwargs, output, i=i):
                hk = active(mod)
                if not hk.get((i, "resid_post")):
                    return None
                if isinstance(output, tuple):
                    return (run(hk, i, "resid_post", output[0]),) + tuple(output[1:])
                return run(hk, i, "resid_post", output)

            hooks.forward_pre(layer, pre, with_kwargs=True)
            hooks.forward(layer, post, with_kwargs=True)
            norm = next((getattr(layer, n) for n in _PRE_MLP_NORM if hasattr(layer, n)), None)
            if norm is not None:
                def mid(mod, args, i=i):
                    hk = active(mod)
                    if not hk.get((i, "resid_mid")):
                        return None
                    return (run(hk, i, "resid_mid", args[0]),) + tuple(args[1:])
                hooks.forward_pre(norm, mid)
            proj = next((getattr(self.attn[i], n) for n in _OUT_PROJ if hasattr(self.attn[i], n)), None)
            if proj is not None:
                def result(mod, args, output, i=i):                          # mod: the output projection
                    hk = active(mod)
                    if not hk.get((i, "result")):
                        return None
                    z = args[0]                                               # [B, pos, H*d]
                    W = mod.weight if isinstance(mod, nn.Linear) else mod.weight.T  # [d_model, H*d]
                    W = W.view(W.shape[0], H, d)
                    res = torch.einsum("bphd,mhd->bphm", z.view(*z.shape[:-1], H, d), W)  # [B, pos, H, d_model]
                    new = run(hk, i, "result", res)
                    if new is res:
                        return None
                    return output + (new - res).sum(-2)
                hooks.forward(proj, result)
        module_hooks.install(self, hooks)   # hook_embed, hook_attn_out, hook_mlp_in, hook_mlp_out

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, text, prepend_bos: bool = True, chat: bool = False) -> torch.Tensor:
        """Text (or a list of texts, left-padded) -> token ids [batch, pos].

        A padded batch carries its mask: the returned tensor's padding mask is remembered (weakly,
        for that tensor object), so ``model(model.to_tokens([short, long]))``, ``run_with_cache`` and
        ``generate`` mask the pads exactly. A token tensor made any other way gets TransformerLens'
        rule instead (see ``padding_mask``). ``attention_mask=`` given explicitly always wins."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not t for t in texts):
            raise ValueError("empty prompt: give at least one non-empty string")
        if chat and not getattr(self.tokenizer, "chat_template", None):
            import warnings
            warnings.warn(f"{self.cfg.name}'s tokenizer has no chat template; using the plain text")
            chat = False
        if chat:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True) for t in texts]
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if chat:            # the chat template already holds the model's special tokens
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:               # TransformerLens' prepend_bos: exactly one BOS, on every tokenizer
            enc = tokens_with_bos(self.tokenizer, texts, prepend_bos=prepend_bos)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if not bool(mask.all()):
            self._token_masks[ids] = mask
        return ids

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The padding mask [batch, pos] (1 = real token) that ``model(tokens)`` uses when no
        ``attention_mask`` is given, or None when nothing is padded.

        Tokens from ``to_tokens`` use the mask the tokenizer made. Other tensors follow
        TransformerLens' ``utils.get_attention_mask`` for left padding, with TransformerLens'
        default ``prepend_bos=True`` (as ``to_tokens``): the run of pad tokens at the start of each
        row is masked; when the pad id is also the BOS id, the last token of that run is the BOS and
        stays visible (whether or not the tokenizer itself prepends a BOS: SmolLM2's GGUF tokenizer
        in transformers 5.17 has no pad token, EOS = BOS = 1, so the pad falls back to the BOS and
        every prompt starts with one). The BOS is the one ``to_tokens`` prepends (``bos_token_id``:
        Qwen2's EOS, which is also its pad). Pads elsewhere in a row are real tokens. A row that is
        nothing but padding is an error."""
        known = self._token_masks.get(tokens)
        if known is not None and known.shape == tokens.shape:
            return known
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None or tokens.dim() != 2:
            return None
        lead = (tokens != pad).long().cumsum(-1) == 0                  # [B, N] leading pad run
        if not bool(lead.any()):
            return None
        mask = (~lead).long()
        if pad == _prepended_bos_id(tok):
            n = lead.sum(-1)                                            # [B] run lengths
            rows = torch.nonzero(n > 0)[:, 0]
            mask[rows, n[rows] - 1] = 1
        empty = torch.nonzero(mask.sum(-1) == 0)[:, 0].tolist()
        if empty:
            raise ValueError(f"row(s) {empty} of the tokens are all padding (pad id {pad}): drop them or "
                             "pass attention_mask= explicitly")
        return None if bool(mask.all()) else mask

    def to_string(self, tokens) -> str | list[str]:
        """Token ids -> text: [pos] -> str, [batch, pos] -> one str per row (TransformerLens'
        ``to_string``; special tokens are kept)."""
        if tokens.dim() == 1:
            return self.tokenizer.decode(tokens)
        return [self.tokenizer.decode(t) for t in tokens]

    def _inputs(self, tokens, attention_mask=None):
        if isinstance(tokens, (list, tuple)) and len(tokens) == 0:
            raise ValueError("empty prompt: give at least one string or token id")
        if isinstance(tokens, (str, list)) and (isinstance(tokens, str) or isinstance(tokens[0], str)):
            texts = [tokens] if isinstance(tokens, str) else tokens
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            if any(not t for t in texts):
                raise ValueError("empty prompt: give at least one non-empty string")
            enc = tokens_with_bos(self.tokenizer, texts)           # as to_tokens (TransformerLens' default)
            tokens, attention_mask = enc["input_ids"], enc["attention_mask"]
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(tokens)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, pos] (or [pos]), got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0 or tokens.shape[-1] == 0:
            raise ValueError("empty prompt: tokens has no positions")
        if attention_mask is None:
            attention_mask = self.padding_mask(tokens)
        if tokens.shape[-1] > self.cfg.max_ctx:
            raise ValueError(f"the input is {tokens.shape[-1]} tokens but {self.cfg.name} allows at most "
                             f"{self.cfg.max_ctx}: shorten the prompt or pick a model with a longer context")
        if int(tokens.max()) >= self.cfg.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {int(tokens.min())}.."
                             f"{int(tokens.max())}")
        dev = self.device
        tokens = tokens.to(dev)
        kw = {}
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(dev)
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens {tuple(tokens.shape)}")
            kw["attention_mask"] = attention_mask
            # positions count real tokens only (what generate() does), so left padding is harmless
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return tokens, kw

    @property
    def device(self):
        """Where inputs go: the input embedding's device. Under accelerate (``device_map``, CPU/disk
        offload) that is its hook's execution device (offloaded weights sit on "meta"); layers may live
        elsewhere, so code after the embedding uses each tensor's own device."""
        return input_device(self.model)

    # ---------------------------------------------------------------- running
    def forward(self, tokens, attention_mask=None, *, return_type: str | None = "logits",
                loss_per_token: bool = False, start_at_layer: int | None = None,
                resid_pre: torch.Tensor | None = None, **kwargs):
        """Run the model, as TransformerLens' ``HookedTransformer.forward``.

        ``tokens``: ids [batch, pos] or [pos], a string or a list of strings (left-padded; a padded
        batch always carries its mask, see ``padding_mask``). ``return_type``: "logits" (default,
        [batch, pos, vocab]), "loss" (mean next-token cross-entropy over real tokens; with
        ``loss_per_token=True`` [batch, pos - 1]), "both" ((logits, loss)) or None (run for the
        hooks, return None). With ``start_at_layer=l`` and ``resid_pre`` (the residual stream
        ``blocks.{l}.hook_resid_pre``, [batch, pos, d_model]) layers below ``l`` are not run: see
        ``start_at``. Of Hugging Face's arguments only ``logits_to_keep`` is passed through (with
        return_type "logits"); any other keyword is refused."""
        unknown = sorted(set(kwargs) - _HF_FORWARD_KWARGS)
        if unknown:
            raise TypeError(f"HookedModel.forward() got unexpected keyword argument(s) {unknown}; accepted: "
                            "tokens, attention_mask, return_type ('logits', 'loss', 'both', None), "
                            f"loss_per_token, start_at_layer, resid_pre, {', '.join(sorted(_HF_FORWARD_KWARGS))}")
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type={return_type!r}: use one of {_RETURN_TYPES}")
        if "logits_to_keep" in kwargs and return_type in ("loss", "both"):
            raise ValueError("logits_to_keep drops the logits the loss needs: use it with return_type='logits'")
        tokens, kw = self._inputs(tokens, attention_mask)
        start = None if start_at_layer is None else as_index(start_at_layer, "start_at_layer")
        ctx = self.start_at(start, resid_pre) if start else contextlib.nullcontext()
        with ctx:
            logits = self.model(input_ids=tokens, use_cache=False, **kw, **kwargs).logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = lm_cross_entropy_loss(logits, tokens, kw.get("attention_mask"), per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @contextlib.contextmanager
    def start_at(self, layer: int, resid_pre: torch.Tensor):
        """Within the block, forward passes start at decoder layer ``layer`` from ``resid_pre``
        ([batch, pos, d_model], what ``blocks.{layer}.hook_resid_pre`` saw on the same tokens), like
        TransformerLens' ``start_at_layer``: the tokens still give positions and the padding mask,
        layers below ``layer`` are skipped (layer ``layer - 1`` hands ``resid_pre`` on, the others
        pass their input through). Exact when nothing would change those layers, which is what
        ablation sweeps use it for (the unablated prefix is computed once). Hooks and probes on the
        skipped layers see nothing meaningful. The decoder layers' ``forward`` is swapped on the
        instances only for the duration of the block."""
        layer = as_index(layer, "start_at_layer")
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"start_at_layer={layer} is outside 0..{self.cfg.n_layers - 1}")
        if layer == 0:
            yield self
            return
        if resid_pre is None or resid_pre.dim() != 3 or resid_pre.shape[-1] != self.cfg.d_model:
            raise ValueError(f"start_at_layer needs resid_pre [batch, pos, {self.cfg.d_model}] "
                             f"(blocks.{layer}.hook_resid_pre of the same tokens)")

        def passthrough(hidden_states, *a, **k):
            return hidden_states

        def inject(hidden_states, *a, **k):
            if hidden_states.shape[:2] != resid_pre.shape[:2]:
                raise ValueError(f"resid_pre covers {tuple(resid_pre.shape[:2])} (batch, pos) but the tokens "
                                 f"are {tuple(hidden_states.shape[:2])}")
            return resid_pre.to(hidden_states.dtype)

        try:
            for i in range(layer):
                self.layers[i].forward = inject if i == layer - 1 else passthrough
            yield self
        finally:
            for i in range(layer):
                self.layers[i].__dict__.pop("forward", None)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), *, first: bool = False):
        """Add (name or name-filter, fn) hooks for the duration of the block (for this call only:
        other threads do not see them); ``bwd_hooks`` get the gradient of the hooked tensor
        (TransformerLens), see ``module_hooks.as_forward``. ``first``: on a hook point these run
        before the hooks already active (how ``add_hook``'s persistent hooks keep TransformerLens'
        order)."""
        added = []
        for entry in list(fwd_hooks) + module_hooks.as_forward(bwd_hooks):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise TypeError(f"fwd_hooks entries are (name or name-filter, fn) pairs, got {entry!r}")
            name, fn = entry
            if not callable(fn):
                raise TypeError(f"hook for {name!r} is not callable: {fn!r}")
            if isinstance(name, str):
                names = [name]
            elif callable(name):
                names = [n for n in self.hook_names() if name(n)]
                if not names:
                    raise ValueError(f"hook filter {name!r} matched no hook name; see model.hook_names()")
            else:
                raise TypeError(f"hook name must be a string or a predicate on names, got {name!r}")
            for n in names:
                layer, kind = parse(n, self.cfg.n_layers)
                module_hooks.check(self, layer, kind)
                added.append((layer, kind, fn))
        self._check_attention_path()
        handle = self.state.push(hooks=added, hooks_first=first)
        try:
            yield self
        finally:
            self.state.pop(handle)

    def run_with_hooks(self, tokens, fwd_hooks=(), attention_mask=None, bwd_hooks=(), **kwargs):
        """Run the model with ``fwd_hooks`` / ``bwd_hooks`` active for this call only (TransformerLens'
        ``run_with_hooks``: (name or name-filter, fn) pairs, see ``hooks``); returns what ``forward``
        returns for ``kwargs`` (default logits [batch, pos, d_vocab]). Raises TypeError / ValueError for
        a malformed hook entry or an unknown hook name."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(tokens, attention_mask=attention_mask, **kwargs)

    def hook_names(self) -> list[str]:
        """Every hook name this model serves (TransformerLens order); MLP hooks whose modules the
        search did not find (see ``module_hooks``) are left out."""
        from .hooks import all_names, parse
        n = self.cfg.n_layers
        return [h for h in all_names(n) if h == "hook_embed" or module_hooks.servable(self, *parse(h, n))]

    def pattern_bytes(self, batch: int, n_tokens: int, n_layers: int) -> int:
        """Bytes that fp32 attention patterns take: 4 · batch · n_heads · n_tokens² · n_layers (what
        ``run_with_cache`` checks before it caches ``hook_pattern``)."""
        return 4 * batch * self.cfg.n_heads * n_tokens * n_tokens * n_layers

    def patterns_fit(self, batch: int, n_tokens: int, n_layers: int = 1) -> bool:
        """Would ``n_layers`` fp32 patterns fit in half the free memory (run_with_cache's budget)?"""
        return self.pattern_bytes(batch, n_tokens, n_layers) <= free_bytes(self.device) // 2

    def run_with_cache(self, tokens, names_filter=None, attention_mask=None, max_bytes: int | None = None,
                       incl_bwd: bool = False, bwd_metric=None, **kwargs):
        """(logits, ActivationCache). ``names_filter``: None (all), a name, a list of names or a
        predicate. ``incl_bwd``: also back-propagate ``bwd_metric(logits)`` (default: the mean
        next-token loss, TransformerLens' return_type="loss") and cache ``name + "_grad"``. Patterns cost batch·heads·N²·4 bytes a layer: this refuses up front, with a
        pointer to ``record``, when that exceeds ``max_bytes`` (default: half the free memory)."""
        if names_filter is None:
            names = self.hook_names()
        elif isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):
            names = [n for n in self.hook_names() if names_filter(n)]
            if not names:
                raise ValueError("names_filter matched no hook name; see model.hook_names()")
        elif isinstance(names_filter, (list, tuple, set, frozenset)):
            names = list(names_filter)
            bad = [n for n in names if not isinstance(n, str)]
            if bad:
                raise TypeError(f"names_filter lists hook names (strings), got {bad[:3]!r}")
        else:
            raise TypeError("names_filter is None, a hook name, a list of names or a predicate on names; "
                            f"got {type(names_filter).__name__}")
        parsed = [parse(n, self.cfg.n_layers) for n in names]
        toks, _ = self._inputs(tokens, attention_mask)
        B, N = toks.shape
        n_quadratic = sum(k in ("pattern", "attn_scores") for _, k in parsed)
        need = self.pattern_bytes(B, N, n_quadratic)
        budget = max_bytes if max_bytes is not None else free_bytes(self.device) // 2
        if need > budget:
            raise MemoryError(
                f"caching {n_quadratic} attention patterns/scores of {N} tokens needs {need / 2**30:.1f} GiB, over "
                f"the {budget / 2**30:.1f} GiB budget. Record O(N) statistics instead, e.g. "
                "`with model.record(Stats(sink_k=4, entropy=True, argmax=True)) as rec: model(tokens)`, "
                "or cache fewer layers (names_filter), or pass max_bytes= to override.")
        cache = ActivationCache(model=self)

        def saver(name):
            def fn(t, hook):
                cache[name] = t.detach()
            return fn

        grads = module_hooks.grad_savers([hook_name(k, l) for l, k in parsed], cache) if incl_bwd else []
        with self.hooks([(n, saver(hook_name(k, l))) for n, (l, k) in zip(names, parsed)] + grads):
            logits = self(tokens, attention_mask=attention_mask, **kwargs)
        if incl_bwd:
            (bwd_metric(logits) if bwd_metric else module_hooks.next_token_loss(logits, toks)).backward()
        return logits, cache

    @contextlib.contextmanager
    def record(self, stats: StatRequest | None = None, layers=None, heads=None, **kw):
        """Record O(N) per-head statistics while the block runs: ``stats`` is a ``Stats`` (=
        ``kernels.StatRequest``) or its fields as keywords. Yields a ``Recorder``."""
        if stats is not None and kw:
            raise TypeError("give either stats=Stats(...) or keyword fields, not both")
        if stats is not None and not isinstance(stats, StatRequest):
            raise TypeError(f"record(stats=...) takes a headscope.Stats, got {type(stats).__name__}")
        request = stats if stats is not None else StatRequest(**kw)
        n_layers, n_heads = self.cfg.n_layers, self.cfg.n_heads
        layers = list(range(n_layers)) if layers is None else list(as_indices(layers, "record layers"))
        for l in layers:
            check_range(l, n_layers, "layer", f"{self.cfg.name} has {n_layers} layers")
        if heads is not None:
            heads = list(as_indices(heads, "record heads"))
            for h in heads:
                check_range(h, n_heads, "head", f"{self.cfg.name} has {n_heads} heads per layer")
        self._check_attention_path()
        rec = Recorder(request, layers, heads, self.device)
        handle = self.state.push(recorders=[rec])
        try:
            yield rec
        finally:
            self.state.pop(handle)

    @contextlib.contextmanager
    def edit(self, edits):
        """Apply head edits (``Ablate``, ``ScaleKeys``, ``HeadAffine``, ``AddToHead``,
        ``StreamingGate``) while the block runs, for this call only (other threads do not see
        them); nested blocks compose."""
        if isinstance(edits, OutputEdit) or hasattr(edits, "add_to"):
            edits = [edits]
        elif not hasattr(edits, "__iter__") or isinstance(edits, (str, bytes)):
            raise TypeError(f"model.edit takes an edit or a list of edits ({EDIT_TYPES}), got {edits!r}")
        compiled = compile_edits(list(edits), self.cfg.n_layers, self.cfg.n_heads, self.cfg.d_head,
                                 [module_device(a) for a in self.attn])
        self._check_attention_path()
        handle = self.state.push(edit_sets=[compiled])
        try:
            yield self
        finally:
            self.state.pop(handle)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int = 32, attention_mask=None, do_sample: bool = False,
                 cache=None, **kwargs) -> torch.Tensor:
        """HF generate (KV cache on) through the headscope path; probes and edits stay active.
        ``cache``: a transformers ``Cache`` to decode into (a prefilled one, or a ``HeadClassCache``);
        passed under the keyword the installed transformers takes (``cache`` or, in older
        versions, ``past_key_values``). Returns prompt + new tokens [batch, pos]."""
        if cache is not None:
            kwargs[GENERATE_CACHE_KWARG] = cache
        toks, kw = self._inputs(tokens, attention_mask)
        kw.pop("position_ids", None)
        if "attention_mask" not in kw:
            kw["attention_mask"] = torch.ones_like(toks)
        if toks.shape[-1] + max_new_tokens > self.cfg.max_ctx:
            raise ValueError(f"prompt ({toks.shape[-1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.cfg.max_ctx}")
        pad = None
        if self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return self.model.generate(input_ids=toks, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   pad_token_id=pad, **kw, **kwargs)

    @torch.no_grad()
    def mean_z(self, tokens, layer: int, attention_mask=None) -> torch.Tensor:
        """Mean head output z over batch and positions: [head, d_head] (for mean ablation)."""
        _, cache = self.run_with_cache(tokens, names_filter=hook_name("z", layer), attention_mask=attention_mask)
        return cache["z", layer].float().mean((0, 1))


_RETURN_TYPES = ("logits", "loss", "both", None)
_HF_FORWARD_KWARGS = frozenset({"logits_to_keep"})    # passed through to the Hugging Face model


def _prepended_bos_id(tokenizer) -> int | None:
    """The id ``to_tokens`` prepends as BOS (``tl_idioms.bos_token_id``), None when there is none."""
    try:
        return bos_token_id(tokenizer)
    except ValueError:          # no BOS, CLS or EOS token (or no tokenizer): nothing is prepended
        return None


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy, as TransformerLens' ``utils.lm_cross_entropy_loss``: logits
    [batch, pos, vocab], tokens [batch, pos] -> the mean over predicted positions (scalar), or
    [batch, pos - 1] with ``per_token``. With a padding mask, positions whose input or target is
    padding count 0 and are left out of the mean."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]                        # [B, N-1, V]
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]            # [B, N-1]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    keep = (attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()).to(nll.device)
    nll = nll * keep
    return nll if per_token else nll.sum() / keep.sum().clamp_min(1)


def input_device(hf_model: nn.Module) -> torch.device:
    """The device of ``hf_model``'s input embedding, or its accelerate execution device (AlignDevicesHook)."""
    emb = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    for mod in (emb, hf_model):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(p.device for p in hf_model.parameters() if p.device.type != "meta")


def module_device(mod: nn.Module) -> torch.device:
    """Where ``mod`` computes: its (or a submodule's) accelerate execution device, else its first
    parameter's device (a layer of a model split with ``device_map`` may sit on another device)."""
    for m in mod.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next((p.device for p in mod.parameters() if p.device.type != "meta"), torch.device("cpu"))


def free_bytes(device) -> int:
    """Free memory on ``device`` in bytes (GPU: cudaMemGetInfo; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return 8 << 30
