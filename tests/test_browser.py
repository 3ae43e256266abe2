"""End to end in real headless Chromium: serve the app, review flagged images, see the impact, save a screenshot."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_queries import FLIP, _labels, base_workspace, ws  # noqa: F401

from audit.dashboard.serve import serve
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
        # Keyboard: K keeps the original label of the next image in the queue.
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
    assert by_action["keep"][0] in FLIP and by_action["keep"][2] == "browser"
    assert shot.stat().st_size > 10_000
    changed = [ln for ln in csv.splitlines() if ",relabeled," in ln]
    assert len(changed) == 1 and "by browser" in changed[0] and f",{labels[shown] + 1}," in changed[0]
