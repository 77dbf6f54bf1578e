"""The Streamlit explorer (app/explorer.py, app/views.py): its functions, the app through
Streamlit's AppTest, and the app served by `streamlit run` in a real headless Chromium."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import headscope as hs
from headscope.app import views
from headscope.app.cli import STREAMLIT_OPTIONS
from headscope.app.report import write_report
from headscope.heads import ANALYZERS, HeadScores

EXPLORER = str(Path(views.__file__).with_name("explorer.py"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real report folder: two analyzers run on tiny-llama with random token data."""
    m = hs.load("tiny-llama")
    x = torch.randint(1, 128, (4, 40), generator=torch.Generator().manual_seed(0))
    results = {n: ANALYZERS[n]().score(m, data=x, progress=False) for n in ("sinks", "previous_token")}
    out = tmp_path_factory.mktemp("report")
    write_report(m, results, {}, out)
    return out, results


def test_load_report_and_errors(report, tmp_path):
    folder, results = report
    summary, loaded = views.load_report(folder)
    assert summary["model"]["name"] == "tiny-llama" and list(loaded) == list(results)
    for n in results:
        torch.testing.assert_close(loaded[n].scores, results[n].scores)
    with pytest.raises(FileNotFoundError, match="headscope report"):
        views.load_report(tmp_path / "nothing")
    (tmp_path / "scores.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        views.load_report(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"analyzers": {"sinks": {}}}))
    with pytest.raises(FileNotFoundError, match="missing"):
        views.load_report(tmp_path)


def test_parse_heads():
    assert views.parse_heads("L12H4, l3h0 5.2", 30, 9) == [(12, 4), (3, 0), (5, 2)]
    assert views.parse_heads("", 30, 9) == []
    with pytest.raises(ValueError, match="out of range"):
        views.parse_heads("L30H0", 30, 9)
    with pytest.raises(ValueError, match="L12H4"):
        views.parse_heads("head-three", 30, 9)


@pytest.fixture(scope="module")
def circuit_dir(tmp_path_factory):
    """A small saved Circuit (SmolLM2's shape) with edges and a faithfulness curve."""
    from headscope.circuits.circuit import Circuit
    nodes = {"L9H1": 0.9, "L10H7": 0.6, "L14H4": 0.3, "L3H0": 0.1, "M5": 0.2}
    edges = {"L9H1->logits": 0.8, "L10H7->L14H4.q": 0.4, "L3H0->L9H1.k": -0.2, "embed->L3H0.v": 0.05}
    c = Circuit(method="eap-ig", task="ioi", model={"name": "smollm2", "n_layers": 30, "n_heads": 9}, nodes=nodes,
                edges=edges, faithfulness={"n": [1, 2, 4], "kept": [0.3, 0.6, 0.95], "m_clean": 2.0})
    out = tmp_path_factory.mktemp("circuit")
    c.save(out)
    return out


@pytest.fixture(scope="module")
def edits_dir(tmp_path_factory):
    from headscope.interventions import save_edits
    out = tmp_path_factory.mktemp("edits") / "zero3"
    save_edits(out, [hs.Ablate(l, h, how="zero") for l in range(3) for h in range(9)], {"note": "test"})
    return out


TEXT = "The capital of France is Paris. The capital of Italy is"


def test_views_on_smollm2(smollm2):
    """The live and per-token statistics equal what the full attention pattern gives; the pattern
    view hides the first token and uses a log scale on request and refuses long prompts; ablating
    nothing changes nothing and ablating layers 0-2 changes the next-token distribution."""
    stats, words = views.live_stats(smollm2, TEXT, chat=False)
    L, H = smollm2.cfg.n_layers, smollm2.cfg.n_heads
    assert set(stats) == set(views.LIVE_STATS) and all(v.shape == (L, H) for v in stats.values())
    toks = smollm2.to_tokens(TEXT)
    N = toks.shape[1]
    assert len(words) == N
    _, cache = smollm2.run_with_cache(toks, names_filter="blocks.7.attn.hook_pattern")
    p = cache["pattern", 7][0].float()                                         # [head, q, k]
    torch.testing.assert_close(stats["sink_mass"][7], p[..., 0].mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["max_prob"][7], p.max(-1).values.mean(-1), atol=1e-5, rtol=1e-5)
    tok, words = views.token_stats(smollm2, TEXT, 7, 2)
    torch.testing.assert_close(tok["sink_mass"], p[2, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok["received"], p[2].sum(0) / torch.arange(N, 0, -1), atol=1e-5, rtol=1e-5)
    dist = (p[2] * (torch.arange(N)[:, None] - torch.arange(N)[None]).float()).sum(-1)
    torch.testing.assert_close(tok["distance"], dist, atol=1e-4, rtol=1e-5)
    html = views.token_html(words, tok["received"])
    assert html.count("<span") == N and "rgba(214, 39, 40, 1.00)" in html
    fig = views.pattern_figure(smollm2, TEXT, 7, 2, chat=False)
    torch.testing.assert_close(torch.tensor(fig.data[0].z, dtype=torch.float32), p[2], atol=1e-6, rtol=1e-6)
    fig = views.pattern_figure(smollm2, TEXT, 7, 2, chat=False, hide_first=True, log=True)
    z = torch.tensor(fig.data[0].z, dtype=torch.float32)                       # [query, key - 1], log10 p
    assert z.shape == (N, N - 1) and "first token hidden" in fig.layout.title.text
    torch.testing.assert_close(z[-1], torch.log10(p[2, -1, 1:].clamp_min(1e-6)), atol=1e-5, rtol=1e-5)
    assert torch.isnan(z[0]).all()                                            # above the diagonal: blank
    with pytest.raises(ValueError, match="at most 8"):
        views.pattern_figure(smollm2, TEXT, 7, 2, chat=False, max_tokens=8)
    with pytest.raises(ValueError, match="out of range"):
        views.pattern_figure(smollm2, TEXT, L, 0)
    same = views.edit_compare(smollm2, TEXT, [], max_new_tokens=6, chat=False)
    assert same["before"] == same["after"] and same["before"]["text"]
    res = views.edit_compare(smollm2, TEXT, views.make_edits(smollm2, [(l, h) for l in range(3) for h in range(H)],
                                                              "zero"), max_new_tokens=6, chat=False)
    assert res["before"] == same["before"] and res["after"]["top"][0][0] != res["before"]["top"][0][0]
    assert len(res["after"]["top"]) == 10 and abs(sum(p for _, p in res["before"]["top"]) - 1) < 1
    fig = views.next_token_figure(res)
    assert [len(d.x) for d in fig.data] == [10, 10]
    top = max(p for side in ("before", "after") for _, p in res[side]["top"])   # one scale, fitted to the bars
    assert fig.layout.xaxis.range == fig.layout.xaxis2.range and top <= fig.layout.xaxis.range[1] <= max(top * 1.2, 1)
    assert fig.layout.yaxis.type == fig.layout.yaxis2.type == "category"
    words = [smollm2.tokenizer.decode([int(t)]) for t in toks[0]]              # VAR's token group from text
    a, b = views.target_spans(smollm2, toks, "France is Paris")[0]
    assert "".join(words[a:b]).strip() == "France is Paris"
    assert views.target_spans(smollm2, toks, "") == [(0, N)] and views.target_spans(smollm2, toks, "2:5") == [(2, 5)]
    for bad, message in (("Berlin", "is not in the prompt"), (f"3:{N + 1}", "do not fit the prompt")):
        with pytest.raises(ValueError, match=message):
            views.target_spans(smollm2, toks, bad)
    mean = views.make_edits(smollm2, [(3, 0), (3, 1)], "mean")
    assert [e.how for e in mean] == ["mean", "mean"] and mean[0].mean.shape == (smollm2.cfg.d_head,)


def test_head_map_classes(report):
    _, results = report
    fig, labels = views.head_map(results)
    from headscope.app.report import head_classes
    cls, names = head_classes(results)
    for l, row in enumerate(labels):
        for h, c in enumerate(row):
            assert c == (names[int(cls[l, h])] if cls[l, h] >= 0 else "none")
    shown = {tuple(cd) for d in fig.data for cd in d.customdata}
    assert len(shown) == 3 * 4                                                # every head once
    assert all(d.name in ["none", *names] for d in fig.data)
    assert views.heads_of_class(labels, "none") == [(l, h) for l in range(3) for h in range(4) if labels[l][h] == "none"]


def test_explorer_pages_apptest(report, circuit_dir, edits_dir):
    """Every page renders; naming a head opens it in the head view, a new text shows its view;
    the circuit page draws the graph and the curve; an intervention changes the output."""
    from streamlit.testing.v1 import AppTest
    folder, _ = report
    os.environ["HEADSCOPE_REPORT"] = str(folder)
    os.environ["HEADSCOPE_CIRCUIT"] = str(circuit_dir)
    try:
        at = AppTest.from_file(EXPLORER, default_timeout=240)
        at.run()
        assert not at.exception
        assert at.subheader[0].value == "Report — tiny-llama"
        assert at.radio(key="analyzer").options == ["sinks", "previous_token"]
        assert any("stands out" in c.value for c in at.caption)
        at.radio(key="analyzer").set_value("previous_token").run()
        assert not at.exception and any("previous_token" in m.value for m in at.markdown)
        at.text_input(key="open_head").set_value("L9H9").run()
        at.button(key="open").click().run()
        assert any("out of range" in e.value for e in at.error)
        at.text_input(key="open_head").set_value("L2H3").run()
        at.button(key="open").click().run()                           # opens the head view (loads SmolLM2)
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert at.radio(key="page").value == "Head view"
        assert at.number_input(key="layer").value == 2 and at.number_input(key="head").value == 3
        titles = [c.proto.spec for c in at.get("plotly_chart")]
        assert any("attention pattern L2 H3" in t for t in titles)
        at.text_area(key="prompt").set_value("One two three four five six seven").run()
        at.checkbox(key="hide_first").check().run()
        assert not at.exception
        assert any("attention pattern L2 H3, first token hidden" in c.proto.spec for c in at.get("plotly_chart"))
        assert any(c.value.startswith("L2 H3, ") and "one pass with O(N) memory" in c.value for c in at.caption)
        at.text_area(key="prompt").set_value("word " * 400).run()          # long: no pattern, statistics still
        assert not at.exception and any("at most 256" in i.value for i in at.info)
        assert any("one pass with O(N) memory" in c.value for c in at.caption)

        at.radio(key="page").set_value("Circuit").run()
        assert not at.exception and at.subheader[0].value == "eap-ig circuit — ioi — smollm2"
        assert len(at.get("plotly_chart")) == 2                              # graph + faithfulness curve
        at.text_input(key="circuit").set_value(str(circuit_dir / "nothing")).run()
        assert any("no circuit.json" in e.value for e in at.error)

        at.radio(key="page").set_value("Intervention").run()
        assert not at.exception
        assert at.selectbox(key="head_src").options[0] == "typed below"
        at.text_area(key="iprompt").set_value(TEXT).run()
        at.checkbox(key="ichat").uncheck().run()
        at.text_input(key="heads").set_value("L99H0").run()
        at.button(key="generate").click().run()
        assert any("out of range" in e.value for e in at.error)
        at.text_input(key="heads").set_value(", ".join(f"L{l}H{h}" for l in range(3) for h in range(9))).run()
        at.slider(key="new_tokens").set_value(6).run()
        at.button(key="generate").click().run()
        assert not at.exception and not at.error
        res = at.session_state["playground"]["result"]
        assert res["before"]["top"][0][0] == " Rome" and res["after"]["top"][0][0] != " Rome"
        assert any("after: L0H0" in m.value for m in at.markdown)
        at.radio(key="edit_kind").set_value("file").run()
        at.text_input(key="edit_folder").set_value(str(edits_dir)).run()
        at.button(key="generate").click().run()
        assert not at.exception and not at.error
        saved = at.session_state["playground"]["result"]
        for side in ("before", "after"):                                     # the same 27 heads zeroed
            assert (saved[side]["top"], saved[side]["text"]) == (res[side]["top"], res[side]["text"])
        (edits_dir.parent / "empty").mkdir(exist_ok=True)
        at.text_input(key="edit_folder").set_value(str(edits_dir.parent / "empty")).run()
        at.button(key="generate").click().run()
        assert any("holds no saved edits" in e.value for e in at.error)
        at.radio(key="edit_kind").set_value("var").run()                      # VAR: BOS is SmolLM2's sink token
        at.button(key="generate").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        got = at.session_state["playground"]
        assert got["what"].startswith("VAR: massive dimensions") and "sink tokens [0]" in got["what"]
        assert got["result"]["after"]["top"] != got["result"]["before"]["top"]
        at.text_input(key="var_target").set_value("Italy").run()             # a group without a sink token
        at.button(key="generate").click().run()
        assert any("no sink token lies inside the token group" in e.value for e in at.error)
        at.text_input(key="model").set_value("no-such-model").run()
        assert any("cannot load" in e.value for e in at.error)
    finally:
        os.environ.pop("HEADSCOPE_REPORT", None)
        os.environ.pop("HEADSCOPE_CIRCUIT", None)


TINY_PROMPT = " ".join(str(i) for i in range(3, 60, 3))                  # tiny-llama has no tokenizer: ids


def _tiny_playground(at, kind: str):
    at.text_input(key="model").set_value("tiny-llama").run()
    at.radio(key="page").set_value("Intervention").run()
    at.text_area(key="iprompt").set_value(TINY_PROMPT).run()
    at.slider(key="new_tokens").set_value(6).run()
    at.radio(key="edit_kind").set_value(kind).run()
    return at


def _outputs(got):
    return {k: (v["top"], v["text"]) for k, v in got["result"].items()}


def _run_playground(at):
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at.session_state["playground"]


@pytest.mark.parametrize("kind", ["ablate", "act", "kv"])
def test_playground_edit_changes_output_tiny(kind):
    """On tiny-llama (token-id prompt), each playground edit on chosen heads changes the next-token
    distribution, and the page draws before and after side by side; KV compression holds fewer bytes."""
    from streamlit.testing.v1 import AppTest
    at = _tiny_playground(AppTest.from_file(EXPLORER, default_timeout=120).run(), kind)
    assert any("has no tokenizer" in i.value for i in at.info)
    at.text_input(key="heads").set_value("L0H0, L1H0, L1H1, L2H3").run()
    if kind == "kv":
        at.number_input(key="kv_sink").set_value(2)
        at.number_input(key="kv_recent").set_value(4).run()
    got = _run_playground(at)
    before, after = got["result"]["before"], got["result"]["after"]
    assert before["text"] and after["text"] and after["top"] != before["top"]
    assert {"ablate": "L0H0, L1H0, L1H1, L2H3 ablated (zero)", "act": "ACT on L0H0",
            "kv": "KV compression: streaming KV heads L0KV0, L1KV0, L2KV1"}[kind] in got["what"]
    assert len(at.get("plotly_chart")) == 1 and any(m.value.startswith("**after: ") for m in at.markdown)
    if kind == "kv":
        assert after["cache_bytes"] < before["cache_bytes"]
        assert any("(compressed)" in c.value for c in at.caption)
        assert not any("nothing is dropped" in i.value for i in at.info)
        at.number_input(key="kv_recent").set_value(64).run()                 # keeps every token: said so
        at.button(key="generate").click().run()
        assert any("nothing is dropped" in i.value for i in at.info)
        got = at.session_state["playground"]["result"]
        assert got["after"]["text"] == got["before"]["text"] and got["after"]["top"] == got["before"]["top"]


def test_playground_inputs_give_messages_tiny(tmp_path):
    """Bad playground inputs are messages, not exceptions: a prompt that is not token ids, no heads,
    a head out of range, VAR on a 3-layer model, an ACT threshold no key reaches."""
    from streamlit.testing.v1 import AppTest
    at = _tiny_playground(AppTest.from_file(EXPLORER, default_timeout=120).run(), "act")
    cases = [(lambda: at.text_area(key="iprompt").set_value("not ids"), "type the prompt as token ids"),
             (lambda: at.text_area(key="iprompt").set_value("5 999"), "token id 999 is out of range"),
             (lambda: at.text_area(key="iprompt").set_value(TINY_PROMPT), "name at least one head"),
             (lambda: at.text_input(key="heads").set_value("L7H0"), "out of range"),
             (lambda: (at.text_input(key="heads").set_value("L1H0"), at.slider(key="act_threshold").set_value(0.5)),
              "has a hidden sink on this prompt"),
             (lambda: at.radio(key="edit_kind").set_value("var"), "tiny-llama has 3 layers")]
    for change, message in cases:
        change()
        at.run()
        at.button(key="generate").click().run()
        assert not at.exception, (message, at.exception)
        assert any(message in e.value for e in at.error), (message, [e.value for e in at.error])
        assert "playground" not in at.session_state


def test_playground_edit_file_path_upload_and_bad_files_tiny(tmp_path):
    """A saved edit file (LoFiT's HeadAffine edits) by folder path, by one of its files' paths and by
    upload (two files or a zip) gives the same after-edit output; a missing path, a folder without
    edits, a broken file, an incomplete upload and edits made for another model are messages."""
    import zipfile
    from streamlit.testing.v1 import AppTest
    from headscope.interventions import save_edits
    g = torch.Generator().manual_seed(0)
    good = save_edits(tmp_path / "lofit", [hs.HeadAffine(l, [0, 1], scale=torch.randn(2, 16, generator=g),
                                                         bias=torch.randn(2, 16, generator=g)) for l in range(3)])
    other = save_edits(tmp_path / "other", [hs.HeadAffine(5, 0, scale=torch.ones(16))])
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "edits.json").write_text("{not json")
    at = _tiny_playground(AppTest.from_file(EXPLORER, default_timeout=120).run(), "file")
    at.text_input(key="edit_folder").set_value(str(good)).run()
    ref = _run_playground(at)
    assert ref["what"] == f"3 edits from {good}"
    assert ref["result"]["after"]["top"] != ref["result"]["before"]["top"]
    at.text_input(key="edit_folder").set_value(str(good / "edits.json")).run()
    assert _outputs(_run_playground(at)) == _outputs(ref)
    for path, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "holds no saved edits"),
                          (broken, "cannot read the edit file"), (other, "do not fit tiny-llama")):
        at.text_input(key="edit_folder").set_value(str(path)).run()
        at.button(key="generate").click().run()
        assert not at.exception and any(message in e.value for e in at.error), (message, [e.value for e in at.error])
    at.radio(key="file_src").set_value("upload").run()
    files = [(n, (good / n).read_bytes(), "application/octet-stream") for n in views.EDIT_FILES]
    at.file_uploader(key="edit_upload").set_value(files[:1]).run()
    at.button(key="generate").click().run()
    assert any("lacks edits.safetensors" in e.value for e in at.error)
    at.file_uploader(key="edit_upload").set_value(files).run()
    assert _outputs(_run_playground(at)) == _outputs(ref)
    zpath = tmp_path / "lofit.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n in views.EDIT_FILES:
            z.write(good / n, f"lofit/{n}")
    at.file_uploader(key="edit_upload").set_value(("lofit.zip", zpath.read_bytes(), "application/zip")).run()
    assert _outputs(_run_playground(at)) == _outputs(ref)
    assert Path(at.session_state["_upload_dir"]).is_dir()


def test_playground_sessions_keep_their_own_result():
    """Two sessions of the explorer with different edits: each keeps its own result and request."""
    from streamlit.testing.v1 import AppTest
    a = _tiny_playground(AppTest.from_file(EXPLORER, default_timeout=120).run(), "ablate")
    b = _tiny_playground(AppTest.from_file(EXPLORER, default_timeout=120).run(), "kv")
    a.text_input(key="heads").set_value("L0H0").run()
    b.text_input(key="heads").set_value("L2H3")
    b.number_input(key="kv_sink").set_value(1).run()
    ra, rb = _run_playground(a), _run_playground(b)
    a.run()
    assert a.session_state["playground"]["what"] == ra["what"] == "L0H0 ablated (zero)"
    assert rb["what"].startswith("KV compression") and rb["result"]["after"] != ra["result"]["after"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCREENSHOTS = Path(__file__).resolve().parents[1] / "out" / "screenshots"


def _goto(page, port):
    for _ in range(60):                                                  # wait for the server to listen
        try:
            page.goto(f"http://127.0.0.1:{port}", timeout=5000)
            return
        except Exception:
            time.sleep(1)
    raise AssertionError("the explorer did not answer")


def _set_playground(page, heads: str):
    _sidebar_page(page, "Intervention")
    page.get_by_label("prompt", exact=True).wait_for(timeout=120_000)        # the head view has a chat box too
    page.get_by_label("wrap in the chat template").wait_for(timeout=30_000)
    if page.get_by_label("wrap in the chat template").is_checked():
        page.locator("label").filter(has_text="wrap in the chat template").first.click()
    box = page.get_by_label("prompt", exact=True)
    box.fill(TEXT)
    box.press("Control+Enter")
    h = page.get_by_label("heads (e.g. L3H0, L5H2)")
    h.fill(heads)
    h.press("Enter")
    time.sleep(1.0)


def _sidebar_page(page, name):
    page.locator("[data-testid=stSidebar] label").filter(has_text=name).first.click()


def _click_first_map_point(page):
    page.get_by_text(re.compile(r"(sinks|previous_token) — tiny-llama")).first.wait_for(timeout=60_000)  # drawn to the end
    point = page.locator(".js-plotly-plot .scatterlayer .point").first
    point.wait_for(timeout=30_000)
    point.evaluate("el => el.scrollIntoView({block: 'center'})")
    time.sleep(1.0)
    box = point.bounding_box()                                    # plotly hit-tests clicks on its drag layer
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def test_explorer_in_headless_chromium(report, circuit_dir, smollm2):
    """`streamlit run` serves the explorer; Debian's Chromium (headless, driven by playwright)
    renders every page without an exception (a screenshot of each in out/screenshots/), and two
    browser sessions that run different edits at the same time each see their own result, equal to
    the same edit run alone."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed: `apt-get install chromium` (.ci/setup does it)")
    from playwright.sync_api import sync_playwright
    folder, _ = report
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    edits = {"A": ", ".join(f"L{l}H{h}" for l in range(3) for h in range(9)), "B": "L29H8"}
    expected = {}
    for k, heads in edits.items():
        e = views.make_edits(smollm2, views.parse_heads(heads, 30, 9), "zero")
        expected[k] = views.edit_compare(smollm2, TEXT, e, 24, chat=False)["after"]["text"]
    assert expected["A"] != expected["B"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", EXPLORER, "--server.headless", "true", "--server.port", str(port),
         *STREAMLIT_OPTIONS, "--", "--report", str(folder), "--circuit", str(circuit_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            _goto(page, port)
            page.get_by_text("Report — tiny-llama").wait_for(timeout=90_000)
            page.get_by_text("Head map (click a head").first.wait_for(timeout=30_000)
            page.locator("[data-testid=stMain] [data-testid=stRadio] label").filter(has_text="previous_token").first.click()
            page.get_by_text("previous_token — tiny-llama").first.wait_for(timeout=60_000)   # its heatmap
            assert page.locator(".stException").count() == 0
            page.screenshot(path=str(SCREENSHOTS / "head_map.png"), full_page=True)
            _, labels = views.head_map(report[1])                          # click the first square drawn
            order = ["none", "sinks", "previous_token"]
            first = min(((order.index(c), l, h) for l, row in enumerate(labels) for h, c in enumerate(row)))
            pattern = f"attention pattern L{first[1]} H{first[2]}"
            _click_first_map_point(page)
            page.get_by_text(pattern).first.wait_for(timeout=180_000)
            assert page.locator("[data-testid=stSidebar] input[type=radio]").nth(1).is_checked()   # Head view
            assert page.locator(".stException").count() == 0
            page.screenshot(path=str(SCREENSHOTS / "head_view.png"), full_page=True)
            # One click on another page while the head view may still be computing its other tabs:
            # the browser re-sends the map's selection with it, which must not send us back.
            _sidebar_page(page, "Circuit")
            page.get_by_text("eap-ig circuit — ioi").first.wait_for(timeout=120_000)
            assert page.locator("[data-testid=stSidebar] input[type=radio]").nth(2).is_checked()
            assert page.locator(".stException").count() == 0
            page.screenshot(path=str(SCREENSHOTS / "circuit.png"), full_page=True)
            _sidebar_page(page, "Head map")                               # the same head opens again
            page.get_by_text("Head map (click a head").first.wait_for(timeout=60_000)
            _click_first_map_point(page)
            try:
                page.get_by_text(pattern).first.wait_for(timeout=120_000)
            finally:
                page.screenshot(path=str(SCREENSHOTS / "head_view_again.png"), full_page=True)
            assert page.locator("[data-testid=stSidebar] input[type=radio]").nth(1).is_checked()
            pages = {"A": page, "B": browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()}
            _goto(pages["B"], port)
            pages["B"].get_by_text("Report — tiny-llama").wait_for(timeout=90_000)
            for k, p in pages.items():
                _set_playground(p, edits[k])
            for p in pages.values():                                      # both runs in flight at once
                p.get_by_role("button", name="run").click()
            for k, p in pages.items():
                p.get_by_text("after: L").first.wait_for(timeout=240_000)
                # the column's heading is drawn before the generated text under it: read the column
                # until the text is there (or 120 s have passed), then compare
                col = p.locator("[data-testid=stColumn]").filter(has_text="after:").last
                want = " ".join(expected[k].split())
                deadline = time.time() + 120
                after = " ".join(col.inner_text().split())
                while not after.endswith(want) and time.time() < deadline:
                    time.sleep(0.5)
                    after = " ".join(col.inner_text().split())
                assert p.locator(".stException").count() == 0
                assert after.startswith(f"after: {edits[k].split(',')[0]}")
                assert after.endswith(want), (k, after, expected[k])
            pages["A"].get_by_text("after: L").first.scroll_into_view_if_needed()   # the results in the picture
            pages["A"].screenshot(path=str(SCREENSHOTS / "intervention.png"), full_page=True)
            browser.close()
        for name in ("head_map", "head_view", "circuit", "intervention"):
            assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _malformed_reports(base: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of a good report folder -> {case: (folder, message fragment)}."""
    cases = {}

    def copy(name):
        d = base / name
        shutil.copytree(good, d)
        return d
    d = base / "empty"
    d.mkdir()
    cases["no scores.json"] = (d, "has no scores.json")
    d = copy("badjson")
    (d / "scores.json").write_text("{not json")
    cases["bad JSON"] = (d, "not valid JSON")
    d = copy("notdict")
    (d / "scores.json").write_text("[1, 2]")
    cases["not a summary"] = (d, "not a headscope report summary")
    d = copy("missingraw")
    (d / "raw" / "previous_token.json").unlink()
    cases["missing analyzer file"] = (d, "previous_token.json is missing")
    d = copy("badtensors")
    (d / "raw" / "sinks.safetensors").write_bytes(b"\x00garbage")
    cases["unreadable tensors"] = (d, "cannot read 'sinks'")
    d = copy("badmeta")
    (d / "raw" / "sinks.json").write_text(json.dumps({"method": "sinks"}))
    cases["incomplete metadata"] = (d, "cannot read 'sinks'")
    return cases


def test_malformed_report_folders_are_messages(report, tmp_path):
    """Each malformed folder: views.load_report raises a ValueError/FileNotFoundError naming the
    problem, and the app shows it as an error message, not an exception."""
    from streamlit.testing.v1 import AppTest
    folder, _ = report
    cases = _malformed_reports(tmp_path, folder)
    for case, (d, frag) in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=frag):
            views.load_report(d)
    at = AppTest.from_file(EXPLORER, default_timeout=120)
    at.run()
    for case, (d, frag) in cases.items():
        at.text_input(key="report").set_value(str(d)).run()
        assert not at.exception, (case, at.exception)
        assert any(frag in e.value for e in at.error), (case, [e.value for e in at.error])
    mixed = tmp_path / "mixed"                                  # analyzer files of two models, copied together
    shutil.copytree(folder, mixed)
    HeadScores(scores=torch.rand(5, 2), method="previous_token", model={"name": "other"}).save(
        mixed / "raw" / "previous_token")
    at.text_input(key="report").set_value(str(mixed)).run()
    assert not at.exception and any("score maps do not fit together" in w.value for w in at.warning)
    at.text_input(key="report").set_value(str(folder)).run()      # and a good one still shows
    assert not at.exception and not at.error and at.subheader[0].value == "Report — tiny-llama"


def test_rewritten_report_is_reloaded(report, tmp_path):
    """The explorer's report cache is keyed on scores.json's mtime: a report written again shows anew."""
    folder, results = report
    m = hs.load("tiny-llama")
    out = tmp_path / "rep"
    write_report(m, {"sinks": results["sinks"]}, {}, out)
    sig = views.report_signature(out)
    time.sleep(0.01)
    write_report(m, results, {}, out)
    assert views.report_signature(out) != sig and views.report_signature(tmp_path / "none") == ()
    assert list(views.load_report(out)[1]) == ["sinks", "previous_token"]


def test_views_in_overlapping_sessions_each_get_their_own_result():
    """Two Streamlit sessions (threads) share one cached model: live statistics on prompts of
    different lengths and a generation with heads ablated, run at the same time, each give exactly
    what they give alone (the 'stack expects each tensor to be equal size' crash and ablations
    bleeding into the unedited output were both shared per-model state)."""
    import threading
    m = hs.load("tiny-llama")
    torch.manual_seed(0)
    prompts = [torch.randint(1, 128, (1, n)) for n in (7, 23, 41, 13)]

    def stats(toks):
        with torch.no_grad(), m.record(hs.Stats(sink_k=1, entropy=True)) as rec:
            m(toks)
        return rec.stack("entropy").clone()

    def ablated(toks):
        with torch.no_grad(), m.edit([hs.Ablate(l, h, how="zero") for l in range(3) for h in range(4)]):
            return m(toks).clone()

    def plain(toks):
        with torch.no_grad():
            return m(toks).clone()
    jobs = [(f, t) for t in prompts for f in (stats, ablated, plain)] * 2
    expected = [f(t) for f, t in jobs]
    got = [None] * len(jobs)
    errors = []
    start = threading.Barrier(len(jobs))

    def run(i, f, t):
        try:
            start.wait()
            got[i] = f(t)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
    threads = [threading.Thread(target=run, args=(i, f, t)) for i, (f, t) in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (f, _), e, g in zip(jobs, expected, got):
        torch.testing.assert_close(g, e, msg=f.__name__)
    assert not torch.allclose(expected[1], expected[2])           # the ablation does change the logits


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_explore(report_dir, port):
    proc = subprocess.Popen([sys.executable, "-m", "headscope.app.cli", "explore", "--headless", "--port", str(port),
                             "--report", str(report_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stderr.readline()                     # "headscope explore: serving on ... (streamlit pid N)"
    assert "serving on http://127.0.0.1:" in line, line
    child = int(line.split("streamlit pid ")[1].split(")")[0])
    for _ in range(120):
        if _listening(port):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the explorer did not start listening within 60 s")
    return proc, child


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:                                              # a zombie (not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_explore_binds_localhost_and_stops_its_server_with_itself(report, sig):
    """`headscope explore` binds 127.0.0.1 by default and its Streamlit server ends when the command
    is killed (SIGTERM: the finally block; SIGKILL: the child's parent-death signal, Linux)."""
    import signal
    folder, _ = report
    port = _free_port()
    proc, child = _start_explore(folder, port)
    try:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--server.address") + 1] == b"127.0.0.1"
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=30)
        for _ in range(60):
            if _gone(child) and not _listening(port):
                break
            time.sleep(0.5)
        assert _gone(child), f"streamlit (pid {child}) still runs after {sig} to `headscope explore`"
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
        if not _gone(child):
            os.kill(child, 9)
