"""End to end in real headless Chromium: serve the app, review flagged images, see the impact, save a screenshot.

Also: a workspace made of hostile names renders no markup and makes no request beyond 127.0.0.1, and the
server refuses a WebSocket from another origin (Streamlit's CORS / XSRF checks, switched on explicitly).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _workspaces import BAD_REASON, MARK, MODELS, REMOTE, REVIEWER, add_hostile_review, build
from test_queries import FLIP, _labels, base_workspace, ws  # noqa: F401

from audit import queries as q
from audit.dashboard.serve import serve
from audit.dashboard.ui import shown
from audit.store import connect

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def open_options(page, picker, attempts: int = 4) -> None:
    """Click a select open until its options show: a click that lands while the select mounts opens nothing."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # here: the module skips without playwright

    for attempt in range(attempts):
        picker.click()
        try:
            page.get_by_role("option").first.wait_for(timeout=5_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")


def page_text(page) -> str:
    """The page's text: innerText leaves out shadow roots, where the strips (audit.dashboard.strip) draw their
    cards, so their text (Playwright's locators enter shadow roots) follows the body's."""
    cards = page.get_by_test_id("auditStripCard").all_inner_texts()
    return page.locator("body").inner_text() + "\n" + "\n".join(cards)


def settled(page) -> str:
    """The page's text once its script run is over, checked for an exception (Streamlit's or a traceback)."""
    # Until a rerun ends, the last run's elements stay on screen (marked stale): read none of them.
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for()
    page.wait_for_function("() => !document.querySelector(\"[data-stale='true']\")")
    body = page_text(page)
    assert page.get_by_test_id("stException").count() == 0, body[-2000:]
    assert "Traceback" not in body and "Error:" not in body, body[-2000:]
    return body


def visit_page(page, url: str, query: str, heading: str) -> str:
    """Open ``url/?query``, wait for the page's heading, and return its settled text."""
    page.goto(f"{url}/?{query}")
    page.get_by_role("heading", name=heading).wait_for()
    return settled(page)


@pytest.fixture
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent; install Debian's chromium package (.ci/run does) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_review_flagged_images_in_chromium(ws, browser, tmp_path):  # noqa: F811 - the ws fixture
    labels = _labels(ws)
    with serve(ws, log=tmp_path / "streamlit.log", env={"AUDIT_REVIEWER": "browser"}) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/?page=review")
        page.get_by_role("heading", name="Review").wait_for()
        page.get_by_text(re.compile(r"^Queue: flagged by cleanlab")).wait_for()
        shown = int(re.search(r"image #(\d+)", page.get_by_text(re.compile(r"· image #\d+")).inner_text()).group(1))
        assert shown in FLIP
        page.get_by_role("button", name=re.compile(r"^Accept")).click()
        page.get_by_text(re.compile(r"Decision 1 saved: accept")).wait_for()
        # Keyboard: K keeps the original label of the next image in the queue. Only once the rerun has drawn that
        # image: a key pressed while the last run's buttons are still on screen would press those (the same image).
        settled(page)
        nxt = int(re.search(r"image #(\d+)", page.get_by_text(re.compile(r"· image #\d+")).inner_text()).group(1))
        assert nxt != shown and nxt in FLIP
        page.get_by_role("heading", name="Review").click()
        page.keyboard.press("k")
        page.get_by_text(re.compile(r"Decision 2 saved: keep")).wait_for()
        page.wait_for_timeout(500)
        shot = tmp_path / "review.png"
        page.screenshot(path=str(shot), full_page=True)
        # The impact page counts both decisions.
        page.get_by_test_id("stSidebar").get_by_text("Impact", exact=True).click()
        page.get_by_role("heading", name="Impact of the review").wait_for()
        page.get_by_text("flags reviewed").wait_for()
        settled(page)
        assert "2 / " in page.get_by_test_id("stMetric").filter(has_text="flags reviewed").inner_text()
        # The export page downloads the cleaned labels, built by the code `audit export` runs.
        page.get_by_test_id("stSidebar").get_by_text("Export", exact=True).click()
        page.get_by_role("heading", name="Export the cleaned labels").wait_for()
        with page.expect_download() as download:
            page.get_by_role("button", name="labels.csv").click()
        csv = Path(download.value.path()).read_text()
    with connect(ws, read_only=True) as con:
        rows = con.execute("SELECT image_index, action, new_labels, reviewer FROM decisions ORDER BY 1").fetchall()
    by_action = {a: (i, lab, who) for i, a, lab, who in rows}
    assert by_action["accept"] == (shown, [labels[shown] + 1], "browser")
    assert by_action["keep"][0] == nxt and by_action["keep"][2] == "browser", by_action
    assert shot.stat().st_size > 10_000
    changed = [ln for ln in csv.splitlines() if ",relabeled," in ln]
    assert len(changed) == 1 and "by browser" in changed[0] and f",{labels[shown] + 1}," in changed[0]


LOCAL = {"127.0.0.1", "localhost"}
# Markup that user text must never turn into: any such element holding MARK, any image not served by the app.
_MARKUP_JS = """
(mark) => {
  const found = [];
  // The document and every open shadow root in it: the dashboard's own elements (audit.dashboard.strip, the Map's
  // canvas and hover card) draw inside one, which document.querySelectorAll does not enter.
  const roots = [document];
  for (let i = 0; i < roots.length; i++)
    for (const el of roots[i].querySelectorAll("*")) if (el.shadowRoot) roots.push(el.shadowRoot);
  const all = (sel) => roots.flatMap((r) => [...r.querySelectorAll(sel)]);
  const markup = "strong, em, b, i, del, s, a, blockquote, h1, h2, h3, h4, h5, h6, .katex, [class*='katex']";
  // Layout a Markdown renderer makes; a dataframe's own grid (an accessible <table>, styled divs) and a
  // chart's SVG draw their data as text, and st.code's <pre> block shows it literally: not markup.
  const layout = "li, table, hr, [style*='color'], [style*='background']";
  const data = "[data-testid='stDataFrame'], [data-testid='stVegaLiteChart'], .vega-embed, svg, pre";
  for (const el of all(markup)) {
    if ((el.textContent || "").includes(mark)) found.push(el.tagName + " " + el.outerHTML.slice(0, 160));
  }
  for (const el of all(layout)) {
    if (!el.closest(data) && (el.textContent || "").includes(mark))
      found.push(el.tagName + " " + el.outerHTML.slice(0, 160));
  }
  for (const el of all("code")) {  // inline code: Markdown backticks; st.code is <pre><code>
    if (!el.closest("pre") && (el.textContent || "").includes(mark)) found.push("CODE " + el.outerHTML.slice(0, 160));
  }
  for (const img of all("img, image, source, video, audio, iframe, object, embed")) {
    const src = img.currentSrc || img.getAttribute("src") || img.getAttribute("href") || "";
    const alt = img.getAttribute("alt") || "";
    if (alt.includes(mark)) found.push("ALT " + img.outerHTML.slice(0, 160));
    if (src && !/^(data:|blob:|https?:\\/\\/(127\\.0\\.0\\.1|localhost)[:/])/.test(src) && !src.startsWith("/"))
      found.push("SRC " + src);
  }
  return found;
}
"""


def test_hostile_names_render_as_text_and_nothing_leaves_localhost(browser, tmp_path):
    db = build("hostile", tmp_path / "hostile")
    add_hostile_review(db, bad=5)
    ids = dict(q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 100)[1][["image_id", "image_index"]].values)
    details = {i: q.image_detail(db, i) for i in (ids[REMOTE], 5, FLIP[2])}
    outside: list[str] = []
    seen: list[str] = []
    with serve(db, log=tmp_path / "streamlit.log", env={"AUDIT_REVIEWER": REVIEWER}) as url:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)

        def gate(route):  # every request the page makes: local ones go through, others are recorded and blocked
            if urlsplit(route.request.url).hostname in LOCAL:
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", gate)
        page.on("request", lambda r: seen.append(r.url))
        page.on("websocket", lambda w: seen.append(w.url))

        def visit(query: str, heading: str) -> str:
            page.goto(f"{url}/?{query}")
            page.get_by_role("heading", name=heading).wait_for()
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(800)  # images and late elements
            leaks = page.evaluate(_MARKUP_JS, MARK)
            assert leaks == [], (query, leaks)
            return page_text(page)

        body = visit("page=overview", "Overview")
        for s in ("data `root` **x** zqroot", *MODELS):
            assert shown(s) in body, s
        body = visit("page=disagreements", "Disagreements")
        assert "given " in body
        page.get_by_text("Confused classes").click()
        page.get_by_text("Pairs of classes a model mixes up").wait_for()
        page.wait_for_timeout(800)
        assert page.evaluate(_MARKUP_JS, MARK) == []
        for image, d in details.items():  # the image whose path spells a remote image, a bad one, a flagged one
            body = visit(f"page=review&image={image}", "Review")
            assert f"{shown(d['image_id'])} · image #{image}" in body and shown(d["given"]) in body
            assert page.get_by_test_id("auditStripCard").count() > 0  # the queue's strip, checked for markup too
            if image == 5:
                assert shown(BAD_REASON) in body and "Bad image" in body
        assert image == FLIP[2]
        open_options(page, page.get_by_role("combobox", name=re.compile("Relabel to one class")))  # every class name
        options = page.get_by_role("option").all_inner_texts()
        assert len(options) == 4 and all(MARK in o for o in options)
        assert page.evaluate(_MARKUP_JS, MARK) == []
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Keep original").click()
        page.get_by_text(re.compile(r"Decision \d+ saved: keep")).wait_for()
        assert page.evaluate(_MARKUP_JS, MARK) == []
        visit("page=impact", "Impact of the review")
        visit("page=export", "Export the cleaned labels")
        cookies = {c["name"] for c in context.cookies()}
        context.close()
    assert outside == [], outside
    assert seen and [u for u in seen if urlsplit(u).hostname not in LOCAL] == []
    assert "_streamlit_xsrf" in cookies  # XSRF protection is on
    with connect(db, read_only=True) as con:
        last = con.execute("SELECT action, reviewer FROM decisions ORDER BY decision_id DESC LIMIT 1").fetchone()
    assert last == ("keep", REVIEWER)


def test_server_refuses_a_websocket_from_another_origin(ws, tmp_path):  # noqa: F811 - the ws fixture
    """CORS checks are on (--server.enableCORS true): a page on another site cannot open the app's WebSocket."""
    pytest.importorskip("websockets", reason="the websockets client (a Streamlit server dependency) is absent")
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    with serve(ws, log=tmp_path / "streamlit.log") as url:
        stream = url.replace("http://", "ws://") + "/_stcore/stream"
        with ws_connect(stream, origin=url, open_timeout=20) as conn:  # the app's own origin is accepted
            assert conn.protocol.state.name == "OPEN"
        for origin in ("http://evil.example", "http://203.0.113.1:8501"):
            with pytest.raises(InvalidStatus) as e:
                ws_connect(stream, origin=origin, open_timeout=20)
            assert e.value.response.status_code == 403, origin
