"""The headscope explorer (Streamlit): browse a saved head report, or probe a model live.

    headscope explore --report out/smollm2          # or: streamlit run app/explorer.py -- --report DIR

Two views:
- **Saved report**: the combined head map, then one analyzer at a time (heatmap, top heads, the
  paper it follows and what its score means), from a folder written by ``headscope report``.
- **Live model**: per-head statistics of one prompt (sink mass, entropy, distance, focus) in
  O(N) memory, the attention pattern of one head, and a greedy continuation with chosen heads
  ablated next to the unedited one.
The figures and computations live in ``views.py``; this file is only layout.

State: nothing mutable is shared between sessions or reruns except the loaded model
(``st.cache_resource``, one per model name and server). That is safe because the probe's records and
edits belong to the call (a context variable), not to the model: two sessions, or an old rerun still
finishing while a new one starts, each see only their own. Per-session values (widgets, the last
generation) live in ``st.session_state``.
"""
from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

from headscope.app import views
from headscope.app.report import combined_map


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--report", default=os.environ.get("HEADSCOPE_REPORT", ""))
    p.add_argument("--model", default=os.environ.get("HEADSCOPE_MODEL", "smollm2"))
    a, _ = p.parse_known_args(sys.argv[1:])
    return a


@st.cache_resource(show_spinner="loading the model…")
def _model(name: str):
    import headscope as hs
    return hs.load(name)


@st.cache_data(show_spinner=False, max_entries=8)
def _report(folder: str, signature: tuple):
    """The parsed report; ``signature`` (scores.json's path, mtime, size) makes a re-written report
    load again. st.cache_data hands each caller its own copy."""
    return views.load_report(folder)


def report_view(folder: str):
    if not folder:
        st.info("Give the folder of a report written by `headscope report --model smollm2 --out DIR`.")
        return
    try:
        summary, results = _report(folder, views.report_signature(folder))
    except (OSError, ValueError) as e:      # a malformed folder: say what is wrong, never a traceback
        st.error(str(e))
        return
    m = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    st.subheader(f"Report — {m.get('name', '?')}")
    st.caption(f"{m.get('n_layers')} layers × {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads); "
               f"created {summary.get('created', '?')}; {len(results)} analyzers")
    for name, err in summary.get("errors", {}).items():
        st.warning(f"{name} failed in this report: {err}")
    if not results:
        st.warning("This report holds no analyzer results.")
        return
    try:
        fig = combined_map(results)
    except (RuntimeError, ValueError) as e:     # e.g. analyzer files of different models mixed by hand
        st.warning(f"no combined map: the analyzers' score maps do not fit together ({e})")
        fig = None
    if fig is not None:
        st.plotly_chart(fig, width="stretch")
    name = st.radio("analyzer", list(results), horizontal=True, key="analyzer")
    r = results[name]
    st.markdown(f"**{name}** follows {r.paper}")
    st.markdown(f"*What the score means:* {r.description}")
    if r.threshold is not None:
        st.markdown(f"{int(r.classify().sum())} of {r.scores.numel()} heads ({100 * r.fraction():.1f}%) score "
                    f"above the paper's threshold {r.threshold}.")
    left, right = st.columns([2, 1])
    left.plotly_chart(r.plot(), width="stretch")
    right.dataframe([{"head": f"L{l}H{h}", "score": round(s, 4)} for l, h, s in r.top(15)],
                    hide_index=True, width="stretch")
    st.caption(f"data: {r.dataset}; parameters: {r.params}; {r.seconds:.1f}s")


def live_view(model_name: str):
    model_name = st.text_input("model (smollm2, gemma3-270m or a local HF folder)", model_name, key="model")
    try:
        model = _model(model_name)
    except Exception as e:  # unknown name, missing package: the loader says what to install
        st.error(f"cannot load {model_name!r}: {e}")
        return
    cfg = model.cfg
    chat = st.checkbox("wrap in the chat template", value=getattr(model.tokenizer, "chat_template", None) is not None)
    text = st.text_area("prompt", "The capital of France is Paris. The capital of Italy is", key="prompt")
    if not text.strip():
        st.warning("Type a prompt.")
        return
    tab_stats, tab_pattern, tab_edit = st.tabs(["per-head statistics", "one head's pattern", "ablate heads"])
    with tab_stats:
        try:
            stats, words = views.live_stats(model, text, chat)
        except ValueError as e:
            st.error(str(e))
        else:
            st.caption(f"{len(words)} tokens, means over query positions, every layer in one pass")
            name = st.radio("statistic", list(stats), horizontal=True, key="statistic")
            st.plotly_chart(views.stat_figure(stats[name], name, cfg.name), width="stretch")
    with tab_pattern:
        c1, c2 = st.columns(2)
        layer = c1.number_input("layer", 0, cfg.n_layers - 1, min(3, cfg.n_layers - 1), key="layer")
        head = c2.number_input("head", 0, cfg.n_heads - 1, 0, key="head")
        try:
            st.plotly_chart(views.pattern_figure(model, text, int(layer), int(head), chat), width="stretch")
        except ValueError as e:
            st.error(str(e))
    with tab_edit:
        heads_text = st.text_input("heads to ablate (e.g. L3H0, L5H2)", "", key="heads")
        how = st.selectbox("ablation", ["zero", "uniform"], key="how", help="zero: the head's output is 0; uniform: its "
                           "query is scaled by 1e-4, so it attends evenly to all visible keys")
        tokens = st.slider("new tokens", 4, 64, 24, key="new_tokens")
        request = (model_name, text, chat, heads_text, how, tokens)
        if st.button("generate", key="generate"):
            st.session_state.pop("generation", None)
            try:
                heads = views.parse_heads(heads_text, cfg.n_layers, cfg.n_heads)
                base, edited = views.ablation_compare(model, text, heads, how, tokens, chat)
            except ValueError as e:
                st.error(str(e))
            else:
                st.session_state["generation"] = {"request": request, "heads": heads, "base": base,
                                                  "edited": edited}
        gen = st.session_state.get("generation")
        if gen is not None and gen["request"] == request:      # this session's last result, kept on reruns
            a, b = st.columns(2)
            a.markdown("**unedited**")
            a.write(gen["base"])
            b.markdown(f"**ablated: {', '.join(f'L{l}H{h}' for l, h in gen['heads']) or 'nothing'} ({how})**")
            b.write(gen["edited"])


def main():
    st.set_page_config(page_title="headscope explorer", layout="wide")
    st.title("headscope explorer")
    args = _args()
    mode = st.sidebar.radio("view", ["Saved report", "Live model"], key="view")
    if mode == "Saved report":
        folder = st.sidebar.text_input("report folder", args.report, key="report")
        report_view(folder)
    else:
        live_view(args.model)


main()
