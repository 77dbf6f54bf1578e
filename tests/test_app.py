"""The Streamlit explorer (app/explorer.py, app/views.py): its functions, the app through
Streamlit's AppTest, and the app served by `streamlit run` in a real headless Chromium."""
import json
import os
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


def test_live_views_on_smollm2(smollm2):
    """The live statistics equal what the full attention pattern gives; the pattern view refuses
    long prompts; ablating nothing changes nothing."""
    text = "The capital of France is Paris. The capital of Italy is"
    stats, words = views.live_stats(smollm2, text, chat=False)
    L, H = smollm2.cfg.n_layers, smollm2.cfg.n_heads
    assert set(stats) == set(views.LIVE_STATS) and all(v.shape == (L, H) for v in stats.values())
    toks = smollm2.to_tokens(text)
    assert len(words) == toks.shape[1]
    _, cache = smollm2.run_with_cache(toks, names_filter="blocks.7.attn.hook_pattern")
    p = cache["pattern", 7][0].float()                                         # [head, q, k]
    torch.testing.assert_close(stats["sink_mass"][7], p[..., 0].mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["max_prob"][7], p.max(-1).values.mean(-1), atol=1e-5, rtol=1e-5)
    fig = views.pattern_figure(smollm2, text, 7, 2, chat=False)
    torch.testing.assert_close(torch.tensor(fig.data[0].z, dtype=torch.float32), p[2], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="at most 8"):
        views.pattern_figure(smollm2, text, 7, 2, chat=False, max_tokens=8)
    with pytest.raises(ValueError, match="out of range"):
        views.pattern_figure(smollm2, text, L, 0)
    base, same = views.ablation_compare(smollm2, text, [], max_new_tokens=6, chat=False)
    assert base == same and base


def test_explorer_apptest(report):
    from streamlit.testing.v1 import AppTest
    folder, _ = report
    os.environ["HEADSCOPE_REPORT"] = str(folder)
    try:
        at = AppTest.from_file(EXPLORER, default_timeout=180)
        at.run()
        assert not at.exception
        assert at.subheader[0].value == "Report — tiny-llama"
        assert at.radio(key="analyzer").options == ["sinks", "previous_token"]
        at.radio(key="analyzer").set_value("previous_token").run()
        assert not at.exception and any("previous_token" in m.value for m in at.markdown)
        at.text_input(key="report").set_value(str(folder / "missing")).run()
        assert any("no scores.json" in e.value for e in at.error)
        at.radio(key="view").set_value("Live model").run()         # loads SmolLM2 (cached weights)
        assert not at.exception and not at.error
        assert len(at.get("plotly_chart")) == 2                     # statistics + one head's pattern
        at.text_input(key="heads").set_value("L99H0").run()
        at.button(key="generate").click().run()
        assert any("out of range" in e.value for e in at.error)
        at.text_input(key="model").set_value("no-such-model").run()
        assert any("cannot load" in e.value for e in at.error)
    finally:
        os.environ.pop("HEADSCOPE_REPORT", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explorer_in_headless_chromium(report, tmp_path):
    """`streamlit run` serves the explorer; Debian's Chromium (headless, driven by playwright)
    renders the report, switches analyzer by clicking, and shows no Streamlit exception."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed: `apt-get install chromium` (.ci/setup does it)")
    from playwright.sync_api import sync_playwright
    folder, _ = report
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", EXPLORER, "--server.headless", "true", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--", "--report", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            for _ in range(60):                                      # wait for the server to listen
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5000)
                    break
                except Exception:
                    time.sleep(1)
            page.get_by_text("Report — tiny-llama").wait_for(timeout=90_000)
            page.get_by_text("Combined head map").first.wait_for(timeout=30_000)
            assert page.get_by_text("Gu et al. 2024").count() >= 1
            page.locator("[data-testid=stRadio] label").filter(has_text="previous_token").first.click()
            page.get_by_text("Wang et al. 2022").first.wait_for(timeout=60_000)
            page.get_by_text("previous_token — tiny-llama").first.wait_for(timeout=60_000)   # its heatmap
            assert page.locator(".stException").count() == 0
            page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
            browser.close()
        assert (tmp_path / "explorer.png").stat().st_size > 10_000
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
