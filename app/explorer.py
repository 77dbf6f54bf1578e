"""The headscope explorer (Streamlit): a saved head report, one head up close, a saved circuit, and
an intervention playground.

    headscope explore --report out/smollm2          # or: streamlit run app/explorer.py -- --report DIR

Pages (sidebar):
- **Head map**: a saved report (``headscope report``): every head coloured by the analyzer where it
  stands out most (qualitative palette, grey "none"), then one analyzer at a time. Clicking a head
  (or naming it) opens it in the head view.
- **Head view**: one head on a text. Short text: its attention pattern (first token hidden and a log
  scale on request). Any length: per-token statistics from one O(N) pass (attention received, sink
  mass, distance), drawn over the text; and every head's mean statistics.
- **Circuit**: a folder written by ``Circuit.save`` (``headscope circuit ... --out DIR``): the graph
  (edges weighted by score) and the faithfulness curve when it was computed.
- **Intervention**: an edit and the next-token distribution and greedy text before and after it,
  side by side. Edits: ablate heads (zero / mean / uniform); ACT (calibrate the chosen heads' hidden
  sinks, Yu et al. 2024); VAR (move attention from sink tokens to a token group, Kang et al. 2025);
  a saved edit file (LoFiT's result, ``headscope intervene ... --out DIR``: a folder path or an
  upload); KV compression (the chosen heads' KV heads keep sink + recent tokens while generating,
  DuoAttention's deployment). Heads are typed or taken from a head class of the report. A model
  without a tokenizer (the tiny test models) takes token ids.
The figures and computations live in ``views.py``; this file is only layout.

State: nothing mutable is shared between sessions: per-session values (widgets, the last result)
live in ``st.session_state``. The model is cached per server (``st.cache_resource``): safe because the
probe's records and edits belong to the call (a context variable), not to the model, so two sessions
editing different heads at once each see only their own. Results are cached by their inputs
(``st.cache_data``): equal inputs give equal results, whoever asked.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

from headscope.app import views
from headscope.app.report import STAND_OUT_Z, combined_caption, summary_lines, threshold_line, tie_note

PAGES = ["Head map", "Head view", "Circuit", "Intervention"]
MAX_PATTERN_TOKENS = 256
MAX_TEXT_CHARS = 200_000


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--report", default=os.environ.get("HEADSCOPE_REPORT", ""))
    p.add_argument("--model", default=os.environ.get("HEADSCOPE_MODEL", "smollm2"))
    p.add_argument("--circuit", default=os.environ.get("HEADSCOPE_CIRCUIT", ""))
    a, _ = p.parse_known_args(sys.argv[1:])
    return a


# ------------------------------------------------------------------ cached work
@st.cache_resource(show_spinner="loading the model…")
def _model(name: str):
    import headscope as hs
    return hs.load(name)


@st.cache_data(show_spinner=False, max_entries=8)
def _report(folder: str, signature: tuple):
    """The parsed report; ``signature`` (scores.json's path, mtime, size) makes a re-written report
    load again. st.cache_data hands each caller its own copy."""
    return views.load_report(folder)


def _mtime(path) -> int:
    try:
        return Path(path).expanduser().stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=8)
def _circuit(folder: str, signature: int):
    return views.load_circuit(folder)


@st.cache_data(show_spinner=False, max_entries=32)
def _live_stats(model_name: str, text: str, chat: bool):
    return views.live_stats(_model(model_name), text, chat)


@st.cache_data(show_spinner=False, max_entries=32)
def _token_stats(model_name: str, text: str, layer: int, head: int, chat: bool):
    return views.token_stats(_model(model_name), text, layer, head, chat)


@st.cache_data(show_spinner=False, max_entries=32)
def _pattern(model_name: str, text: str, layer: int, head: int, chat: bool, hide_first: bool, log: bool):
    return views.pattern_figure(_model(model_name), text, layer, head, chat, MAX_PATTERN_TOKENS, hide_first, log)


def _playground_edits(model, toks, spec: tuple):
    """spec (what the page asked for, hashable) -> (edits, cache maker or None, a line describing it)."""
    kind, *args = spec
    if kind == "ablate":
        heads, how = args
        return views.make_edits(model, list(heads), how), None, f"{_names(heads)} ablated ({how})"
    if kind == "act":
        heads, beta, threshold = args
        edits, note = views.act_playground_edits(model, toks, list(heads), beta, threshold)
        return edits, None, f"ACT on {_names(heads)}: {note}"
    if kind == "var":
        target, p, rho, tau = args
        edits, note = views.var_playground_edits(model, toks, target, p, rho, tau)
        return edits, None, f"VAR: {note}"
    if kind == "file":
        folder, _sig, shown = args
        edits = views.load_edit_file(folder)
        return edits, None, f"{len(edits)} edits from {shown}"
    heads, sink, recent = args                                   # "kv"
    edits, make_cache, note = views.kv_playground(model, list(heads), sink, recent)
    return edits, make_cache, f"KV compression: {note}"


@st.cache_data(show_spinner=False, max_entries=64)
def _playground_side(model_name: str, text: str, chat: bool, tokens: int, spec: tuple | None):
    """One side of the playground (spec None: the unedited model): cached by its inputs."""
    model = _model(model_name)
    toks = views.prompt_tokens(model, text, chat)
    if spec is None:
        return views.edit_side(model, toks, [], tokens) | {"what": "before"}
    edits, make_cache, what = _playground_edits(model, toks, spec)
    try:
        return views.edit_side(model, toks, edits, tokens, make_cache=make_cache) | {"what": what}
    except (IndexError, ValueError) as e:
        if spec[0] != "file":
            raise
        raise ValueError(f"the edits in {spec[-1]} do not fit {model.cfg.name} (made for another model?): {e}") from None


def _names(heads) -> str:
    return ", ".join(f"L{l}H{h}" for l, h in heads)


def _load_model(name: str):
    """The cached model, or None after an error message."""
    try:
        return _model(name)
    except Exception as e:  # unknown name, missing package: the loader says what to install
        st.error(f"cannot load {name!r}: {' '.join(str(e).split())}")
        return None


def _text_ok(text: str) -> bool:
    if not text.strip():
        st.warning("Type a text.")
        return False
    if len(text) > MAX_TEXT_CHARS:
        st.error(f"the text is {len(text):,} characters; the explorer takes at most {MAX_TEXT_CHARS:,}")
        return False
    return True


def _open_head(layer: int, head: int):
    st.session_state["layer"] = int(layer)
    st.session_state["head"] = int(head)
    st.session_state["page"] = "Head view"


def _map_points(sel) -> list:
    """The selected points of the head map's selection state (a dict or Streamlit's attribute dict)."""
    if isinstance(sel, dict):
        return (sel.get("selection") or {}).get("points") or []
    return getattr(getattr(sel, "selection", None), "points", None) or []


def _map_key() -> str:
    """The head map's widget key: a new one each time a click on the map has opened a head."""
    return f"headmap_{st.session_state.setdefault('_map_clicks', 0)}"


def _on_map_select(key: str):
    """A head clicked on the map opens it in the head view, once per click.

    The browser keeps the map's selection until the page without the map has finished its run, and
    sends it again with any widget change made meanwhile (e.g. a click on another page in the
    sidebar while the head view is still computing): Streamlit then calls this callback again with
    the same selection, and acting on it would put the page back to the head view and swallow the
    user's click. So each click that opens a head retires the map's widget key: a selection that
    arrives under a retired key is ignored, and the map is drawn afresh (a new key, no selection)
    when the page shows it again, so clicking the same head later opens it again."""
    if key != _map_key():
        return
    points = _map_points(st.session_state.get(key))
    if points:
        l, h = (int(x) for x in points[0]["customdata"][:2])
        st.session_state["_map_clicks"] += 1
        _open_head(l, h)


def _on_open_typed():
    text = st.session_state.get("open_head", "")
    n_layers, n_heads = st.session_state.get("_dims", (10 ** 6, 10 ** 6))
    try:
        heads = views.parse_heads(text, n_layers, n_heads)
    except ValueError as e:
        st.session_state["open_error"] = str(e)
        return
    if len(heads) != 1:
        st.session_state["open_error"] = "name one head, e.g. L3H0"
        return
    st.session_state.pop("open_error", None)
    _open_head(*heads[0])


# ------------------------------------------------------------------ pages
def _saved_report(folder: str):
    """(summary, results) or None after a message."""
    if not folder:
        st.info("Give the folder of a report written by `headscope report --model smollm2 --out DIR`.")
        return None
    try:
        return _report(folder, views.report_signature(folder))
    except (OSError, ValueError) as e:      # a malformed folder: say what is wrong, never a traceback
        st.error(str(e))
        return None


def head_map_page(folder: str):
    """Head map page: the saved report in ``folder`` as a combined head map (each head coloured by the
    analyzer where it stands out most, z >= ``STAND_OUT_Z``; grey: none) with the cross-analyzer
    summary, then one analyzer at a time (heatmap, top-15 table, paper, threshold). Clicking or
    naming a head opens it in the head view. A missing or malformed folder shows a message."""
    got = _saved_report(folder)
    if got is None:
        return
    summary, results = got
    m = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    st.subheader(f"Report — {m.get('name', '?')}")
    st.caption(f"{m.get('n_layers')} layers × {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads); "
               f"preset {summary.get('preset', 'quick')}; created {summary.get('created', '?')}; {len(results)} analyzers")
    st.session_state["_dims"] = (m.get("n_layers") or 10 ** 6, m.get("n_heads") or 10 ** 6)
    for name, err in summary.get("errors", {}).items():
        st.warning(f"{name} failed in this report: {err}")
    for name, why in (summary.get("skipped") or {}).items():
        st.info(f"{name} is not in this report: {why}")
    if not results:
        st.warning("This report holds no analyzer results.")
        return
    try:
        fig, _ = views.head_map(results)
    except (RuntimeError, ValueError) as e:     # e.g. analyzer files of different models mixed by hand
        st.warning(f"no combined map: the analyzers' score maps do not fit together ({e})")
        fig = None
    if fig is not None:
        with st.expander("summary across analyzers", expanded=True):
            st.markdown("\n".join(f"- {s}" for s in summary_lines(results)))
        key = _map_key()
        st.plotly_chart(fig, key=key, on_select=lambda: _on_map_select(key), selection_mode="points",
                        width="stretch")
        st.caption(combined_caption(STAND_OUT_Z) + " Click a head (or name it below) to open it in the head view.")
    c1, c2 = st.columns([3, 1])
    c1.text_input("open a head (e.g. L3H0)", key="open_head")
    c2.button("open in head view", key="open", on_click=_on_open_typed)
    if st.session_state.get("open_error"):
        st.error(st.session_state["open_error"])
    name = st.radio("analyzer", list(results), horizontal=True, key="analyzer")
    r = results[name]
    st.markdown(f"**{name}** follows {r.paper}")
    st.markdown(f"*What the score means:* {r.description}")
    tie = tie_note(r)
    if tie:
        st.warning(tie)
    if r.threshold is not None:
        st.markdown(threshold_line(r))
    left, right = st.columns([2, 1])
    left.plotly_chart(r.plot(), width="stretch", key=f"plot_{name}")
    right.dataframe([{"head": f"L{l}H{h}", "score": round(s, 4)} for l, h, s in r.top(15)],
                    hide_index=True, width="stretch")
    st.caption(f"data: {r.dataset}; {r.seconds:.1f}s; parameters: "
               + ", ".join(f"{k}={v}" for k, v in r.params.items())[:600])
    if r.info:
        with st.expander(f"model outputs and other results kept with the scores ({', '.join(map(str, r.info))})"):
            st.json(r.info, expanded=False)


def head_view_page(model_name: str):
    """Head view page: one head of ``model_name`` on a typed text. Tabs: its attention pattern (short
    texts up to ``MAX_PATTERN_TOKENS`` tokens; first token hidden and log scale on request), its
    per-token statistics from one O(N) pass at any length (attention received, sink mass, distance,
    drawn over the text), and every head's mean statistics."""
    model = _load_model(model_name)
    if model is None:
        return
    cfg = model.cfg
    st.session_state["_dims"] = (cfg.n_layers, cfg.n_heads)
    for k, hi in (("layer", cfg.n_layers - 1), ("head", cfg.n_heads - 1)):   # a head of another model
        if k in st.session_state and not 0 <= int(st.session_state[k]) <= hi:
            st.warning(f"{k} {st.session_state[k]} does not exist in {cfg.name}; showing {hi}")
            st.session_state[k] = hi
    st.session_state.setdefault("layer", min(3, cfg.n_layers - 1))
    st.session_state.setdefault("head", 0)
    st.session_state.setdefault("chat", getattr(model.tokenizer, "chat_template", None) is not None)
    c1, c2, c3 = st.columns([1, 1, 2])
    layer = int(c1.number_input("layer", 0, cfg.n_layers - 1, key="layer"))
    head = int(c2.number_input("head", 0, cfg.n_heads - 1, key="head"))
    chat = c3.checkbox("wrap in the chat template", key="chat")
    text = st.text_area("text", "The capital of France is Paris. The capital of Italy is", key="prompt")
    if not _text_ok(text):
        return
    tab_pattern, tab_tokens, tab_all = st.tabs(["attention pattern", "per-token statistics (any length)",
                                               "every head's statistics"])
    with tab_pattern:
        o1, o2 = st.columns(2)
        hide = o1.checkbox("hide the first token", key="hide_first",
                           help="the first token often takes most of the attention (an attention sink) and "
                           "flattens everything else")
        log = o2.checkbox("log scale", key="log_scale")
        try:
            with st.spinner("computing the pattern…"):
                st.plotly_chart(_pattern(model_name, text, layer, head, chat, hide, log), width="stretch",
                                key="pattern")
        except ValueError as e:
            st.info(f"{e}. The per-token statistics tab shows this head on text of any length.")
    with tab_tokens:
        try:
            with st.spinner("one O(N) pass…"):
                stats, words = _token_stats(model_name, text, layer, head, chat)
        except ValueError as e:
            st.error(str(e))
        else:
            st.caption(f"L{layer} H{head}, {len(words)} tokens; one pass with O(N) memory (no attention matrix)")
            which = st.radio("shade the text by", list(views.TOKEN_STATS), horizontal=True, key="token_stat",
                             format_func=lambda n: f"{n}: {views.TOKEN_STATS[n]}")
            st.markdown(views.token_html(words, stats[which], skip_first=which != "distance"), unsafe_allow_html=True)
            st.plotly_chart(views.token_stats_figure(stats, words, f"L{layer} H{head}"), width="stretch",
                            key="token_stats")
    with tab_all:
        try:
            with st.spinner("one O(N) pass over every layer…"):
                stats, words = _live_stats(model_name, text, chat)
        except ValueError as e:
            st.error(str(e))
        else:
            st.caption(f"{len(words)} tokens, means over query positions, every layer in one pass")
            name = st.radio("statistic", list(stats), horizontal=True, key="statistic")
            st.plotly_chart(views.stat_figure(stats[name], name, cfg.name), width="stretch", key="all_stats")


def circuit_page(default: str):
    """Circuit page: a folder written by ``Circuit.save`` (``headscope circuit ... --out DIR``) as a
    graph (edges weighted by |score|, the largest first), its faithfulness curve when it was computed,
    and the top-20 nodes."""
    folder = st.text_input("circuit folder (written by `headscope circuit ... --out DIR`)", default, key="circuit")
    if not folder:
        st.info("Give a folder written by `headscope circuit ioi --model smollm2 --method eap-ig --out DIR` "
                "(or `Circuit.save`).")
        return
    try:
        c = _circuit(folder, _mtime(Path(folder) / "circuit.json"))
    except (OSError, ValueError) as e:
        st.error(str(e))
        return
    st.subheader(f"{c.method} circuit — {c.task} — {c.model.get('name', '?')}")
    st.caption(f"{len(c.nodes)} nodes, {len(c.edges)} edges; {c.paper}")
    n_edges = st.slider("edges drawn (largest |score| first)", 5, max(6, min(300, len(c.edges) or 6)),
                        min(60, max(5, len(c.edges))), key="n_edges")
    st.plotly_chart(c.plot(n_edges=n_edges), width="stretch", key="circuit_graph")
    st.caption("Line width follows the edge's |score| (red: positive, blue: negative); nodes are coloured by score.")
    if c.faithfulness:
        st.plotly_chart(c.plot_faithfulness(), width="stretch", key="faithfulness")
    else:
        st.info("This circuit has no faithfulness curve: compute `circuit.faithfulness_curve(model, task)` "
                "and save it again.")
    st.dataframe([{"node": n, "score": round(float(c.nodes[n]), 4)} for n in c.top_nodes(20)], hide_index=True)


def _heads_picker(folder: str) -> str:
    """Heads typed, or a head class of the report's map -> the heads as text (L3H0, L5H2)."""
    labels = None
    if folder:                                         # the report's head classes, when it has a map
        try:
            _, results = _report(folder, views.report_signature(folder))
            _, labels = views.head_map(results)
        except (OSError, ValueError, RuntimeError):
            labels = None
    classes = sorted({c for row in labels for c in row} - {"none"}) if labels else []
    src = st.selectbox("heads from", ["typed below"] + [f"report class: {c}" for c in classes], key="head_src",
                       help="a class of the report's head map (the heads that stand out most in that analyzer)")
    if src == "typed below":
        return st.text_input("heads (e.g. L3H0, L5H2)", "", key="heads")
    heads_text = ", ".join(f"L{l}H{h}" for l, h in views.heads_of_class(labels, src.split(": ", 1)[1]))
    st.caption(f"heads: {heads_text}")
    return heads_text


def _upload_folder(files) -> tuple[str, str]:
    """Uploaded edit files -> (a folder of this session's own, its content hash)."""
    import tempfile
    if "_upload_dir" not in st.session_state:           # one folder per browser session
        st.session_state["_upload_dir"] = tempfile.mkdtemp(prefix="headscope-explorer-")
    folder = views.unpack_upload([(f.name, f.getvalue()) for f in files], st.session_state["_upload_dir"])
    return str(folder), folder.name


def _edit_inputs(kind: str, folder: str):
    """The widgets of one kind of edit -> a function that checks them and returns the spec."""
    if kind in ("ablate", "act", "kv"):
        heads_text = _heads_picker(folder)
    if kind == "ablate":
        how = st.selectbox("ablation", list(views.ABLATIONS), key="how",
                           help="zero: the head's output is 0; mean: its output is replaced by its mean over "
                           "shipped natural text; uniform: its query is scaled by 1e-4, so it attends evenly "
                           "to every visible key")
    elif kind == "act":
        c1, c2 = st.columns(2)
        beta = c1.slider("beta: share of attention the hidden sinks keep", 0.0, 1.0, 0.4, 0.05, key="act_beta")
        threshold = c2.slider("hidden-sink threshold (mean attention a key receives)", 0.01, 0.5, 0.1, 0.01,
                              key="act_threshold")
        st.caption("ACT (Yu et al. 2024, §3): in each chosen head, keys other than the first sink that receive more "
                   "than the threshold of attention on average are hidden sinks; their attention is multiplied by "
                   "beta and the rest goes to the other keys.")
    elif kind == "var":
        target = st.text_input("token group (a part of the prompt, or token positions a:b; empty: the whole prompt)",
                               "", key="var_target")
        c1, c2, c3 = st.columns(3)
        p = c1.slider("p: share the sink tokens keep", 0.0, 1.0, 0.6, 0.05, key="var_p")
        rho = c2.slider("rho: largest sink share of a row that is edited", 0.0, 1.0, 0.5, 0.05, key="var_rho")
        tau = c3.number_input("tau: massive-activation threshold", 1.0, 1000.0, 20.0, key="var_tau")
        st.caption("VAR (Kang et al. 2025, §3-4): sink tokens (huge hidden-state dimensions) inside the group keep p "
                   "of their attention in the rows that look at the group; the rest goes to the group's other tokens.")
    elif kind == "file":
        src = st.radio("edit file", ["folder path", "upload"], horizontal=True, key="file_src")
        if src == "folder path":
            path = st.text_input("folder of a saved edit file (written by `headscope intervene ... --out DIR`, "
                                 "LoFiT's result or save_edits)", "", key="edit_folder")
        else:
            files = st.file_uploader("edits.json and edits.safetensors, or a .zip of their folder",
                                     type=["json", "safetensors", "zip"], accept_multiple_files=True, key="edit_upload")
    else:
        c1, c2 = st.columns(2)
        sink = int(c1.number_input("sink tokens kept", 0, 4096, 4, key="kv_sink"))
        recent = int(c2.number_input("recent tokens kept", 1, 65536, 16, key="kv_recent"))
        st.caption("DuoAttention / RazorAttention deployment: the chosen heads' KV heads keep only the first sink and "
                   "the last recent tokens while generating (a compressed KV cache); the other heads keep everything.")

    def spec(cfg) -> tuple:
        if kind in ("ablate", "act", "kv"):
            heads = tuple(views.parse_heads(heads_text, cfg.n_layers, cfg.n_heads))
            if not heads:
                raise ValueError("name at least one head (e.g. L3H0) or pick a report class")
        if kind == "ablate":
            return ("ablate", heads, how)
        if kind == "act":
            return ("act", heads, float(beta), float(threshold))
        if kind == "var":
            return ("var", target, float(p), float(rho), float(tau))
        if kind == "kv":
            return ("kv", heads, sink, recent)
        if src == "folder path":
            f = views.edit_folder(path)
            return ("file", str(f), tuple(_mtime(f / n) for n in views.EDIT_FILES), str(f))
        if not files:
            raise ValueError("upload edits.json and edits.safetensors (or a .zip of their folder)")
        f, digest = _upload_folder(files)
        return ("file", f, digest, ", ".join(x.name for x in files))
    return spec


def intervention_page(model_name: str, folder: str):
    """Intervention playground: an edit on ``model_name`` (ablation, ACT, VAR, a saved edit folder, KV
    compression; heads typed or a head class of the report in ``folder``) and the next-token
    distribution and greedy text before and after it, side by side. Bad inputs show a message."""
    model = _load_model(model_name)
    if model is None:
        return
    cfg = model.cfg
    if model.tokenizer is None:
        st.info(f"{cfg.name} has no tokenizer: type the prompt as token ids separated by spaces "
                f"(0..{cfg.vocab_size - 1}); outputs are shown as token ids.")
    st.session_state.setdefault("ichat", getattr(model.tokenizer, "chat_template", None) is not None)
    chat = st.checkbox("wrap in the chat template", key="ichat", disabled=model.tokenizer is None)
    text = st.text_area("prompt", "The capital of France is Paris. The capital of Italy is", key="iprompt")
    kind = st.radio("edit", list(views.PLAYGROUND_EDITS), format_func=views.PLAYGROUND_EDITS.get, key="edit_kind")
    make_spec = _edit_inputs(kind, folder)
    tokens = st.slider("new tokens", 4, 64, 24, key="new_tokens")
    if st.button("run", key="generate"):
        st.session_state.pop("playground", None)
        bar = st.progress(0.0, text="checking the inputs…")
        try:
            if not _text_ok(text):
                raise ValueError("type a prompt")
            n = views.prompt_tokens(model, text, chat).shape[1]     # a bad prompt: its message before any work
            spec = make_spec(cfg)
            if spec[0] == "kv" and n + tokens - 1 <= spec[2] + spec[3]:
                st.info(f"the streaming heads keep {spec[2]} + {spec[3]} tokens, and the prompt and the new tokens "
                        f"make {n + tokens - 1}: nothing is dropped, so the output will not change. Lower sink or "
                        "recent to see an effect.")
            bar.progress(0.2, text="the unedited model: next-token distribution and greedy text…")
            before = _playground_side(model_name, text, chat, tokens, None)
            bar.progress(0.55, text="building the edit and running the edited model…")
            after = _playground_side(model_name, text, chat, tokens, spec)
        except (OSError, ValueError) as e:
            bar.empty()
            st.error(str(e))
        else:
            bar.empty()
            st.session_state["playground"] = {"request": (model_name, text, chat, tokens, spec), "what": after["what"],
                                              "result": {"before": before, "after": after}}
    got = st.session_state.get("playground")
    if got is not None:                                  # this session's last result, kept on reruns
        res = got["result"]
        st.caption(got["what"])
        st.plotly_chart(views.next_token_figure(res), width="stretch", key="next_token")
        a, b = st.columns(2)
        a.markdown("**before**")
        a.text(res["before"]["text"])                   # as text: model output is not markdown
        b.markdown(f"**after: {got['what'][:200]}**")
        b.text(res["after"]["text"])
        if got["request"][-1][0] == "kv":
            a.caption(f"KV cache at the end: {res['before']['cache_bytes']:,} bytes (uncompressed)")
            b.caption(f"KV cache at the end: {res['after']['cache_bytes']:,} bytes (compressed)")


def main():
    """Lay out the Streamlit app: sidebar (page, report folder, model) and the chosen page. Runs when
    Streamlit executes this file (it is called at the end of the module)."""
    st.set_page_config(page_title="headscope explorer", layout="wide")
    st.title("headscope explorer")
    args = _args()
    if st.session_state.get("page") not in PAGES:
        st.session_state["page"] = PAGES[0]
    page = st.sidebar.radio("page", PAGES, key="page")
    folder = st.sidebar.text_input("report folder", args.report, key="report")
    model_name = st.sidebar.text_input("model (smollm2, gemma3-270m, tiny-llama or a local HF folder)", args.model,
                                       key="model")
    if page == "Head map":
        head_map_page(folder)
    elif page == "Head view":
        head_view_page(model_name)
    elif page == "Circuit":
        circuit_page(args.circuit)
    else:
        intervention_page(model_name, folder)


main()
