"""The Map page in real headless Chromium: open the map, hover a point (its thumbnail), select a region, send it
to review, decide an image opened from the neighbour panel, and see the decision on the Impact page. Screenshots
go to reports/screenshots/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_browser import ARGS, CHROMIUM, TIMEOUT_MS  # the map is a 2-D canvas: no WebGL, no GPU needed
from test_featuremap import map_ws  # noqa: F401 - the fixture

from audit.dashboard.serve import serve
from audit.store import connect

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[1] / "reports" / "screenshots"


def map_canvas(page):
    """The Map's canvas (audit.dashboard.mapcanvas) once it has drawn its points."""
    cv = page.get_by_test_id("auditMapCanvas")
    cv.and_(page.locator("[data-drawn]")).wait_for(state="attached")
    return cv


def lasso(page, frac: float = 0.35, *, release: bool = True) -> None:
    """Drag a closed loop around the middle of the map's canvas (its lasso mode, the default); ``release=False``
    leaves the button down (the caller releases it: reports/map_bench.py times the two apart)."""
    box = map_canvas(page).bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    rx, ry = box["width"] * frac, box["height"] * frac
    page.mouse.move(cx - rx, cy - ry)
    page.mouse.down()
    for x, y in ((cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry), (cx - rx, cy - ry)):
        page.mouse.move(x, y, steps=6)
    if release:
        page.mouse.up()


def hover(page, k: int = 0):
    """Rest the pointer on the k-th drawn point of the map; the hover card (maphover) once shown."""
    pt = map_canvas(page).evaluate("(cv, k) => cv.auditPoint(Math.min(k, cv.auditCount() - 1))", k)
    page.mouse.move(pt["x"] - 4, pt["y"] - 4)
    page.mouse.move(pt["x"], pt["y"], steps=2)
    card = page.locator("[data-testid='auditMapHover']")
    card.locator("img").wait_for(state="visible")
    return card


def test_map_select_review_neighbour_decide_impact(map_ws, tmp_path):  # noqa: F811 - the fixture
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent; install Debian's chromium package (.ci/run does) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    _, db, _, _, _, _ = map_ws
    with connect(db, read_only=True) as con:
        before = con.execute("SELECT count(*) FROM decisions").fetchone()[0]
        ids = dict(con.execute("SELECT image_index, image_id FROM images").fetchall())
    env = {"AUDIT_REVIEWER": "mapper"}
    with serve(db, log=tmp_path / "streamlit.log", env=env) as url, sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = b.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/?page=map")
        page.get_by_role("heading", name="Map").wait_for()
        map_canvas(page)
        page.get_by_text(re.compile(r"^120 images\. Draw a lasso")).wait_for()
        page.screenshot(path=str(SHOTS / "map-page.png"), full_page=True)
        # Hovering a point shows its thumbnail and labels (the image the canvas finds under the pointer).
        card = hover(page, 5)
        idx = int(card.get_attribute("data-image-index"))
        assert card.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
        assert card.inner_text().splitlines()[0] == ids[idx] and "given: " in card.inner_text()
        page.screenshot(path=str(SHOTS / "map-hover.png"))
        page.mouse.move(5, 5)
        card.wait_for(state="hidden")
        lasso(page)
        page.get_by_text("selected images").wait_for()
        n_sel = int(page.get_by_test_id("stMetric").filter(has_text="selected images").inner_text().split()[-1])
        assert 0 < n_sel <= 120
        page.screenshot(path=str(SHOTS / "map-selection.png"), full_page=True)
        page.get_by_role("button", name="Send these to the review queue").click()
        page.get_by_role("heading", name="Review").wait_for()
        page.get_by_text(re.compile(rf"of {n_sel:,}")).first.wait_for()
        # Open the first neighbour in the panel and decide it.
        page.get_by_text("Nearest images in feature space").wait_for()
        # The neighbours' strip (audit.dashboard.strip; Streamlit marks a keyed element's box with st-key-<key>): the
        # partner images' strip comes first on the page.
        first = page.locator(".st-key-nbr_strip [data-testid='auditStripCard']").first
        idx = first.get_attribute("data-idx")
        assert first.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
        first.get_by_role("button", name="Open").click()
        page.get_by_text(re.compile(rf"· image #{idx}$")).first.wait_for()  # the page now reviews that neighbour
        page.get_by_role("button", name=re.compile(r"^Keep original")).click()
        page.get_by_text(re.compile(r"Decision \d+ saved: keep")).wait_for()
        page.screenshot(path=str(SHOTS / "map-review-neighbour.png"), full_page=True)
        page.get_by_test_id("stSidebar").get_by_text("Impact", exact=True).click()
        page.get_by_role("heading", name="Impact of the review").wait_for()
        page.get_by_text("mapper").first.wait_for(state="attached")  # listed with its reviewer (a grid cell)
        page.screenshot(path=str(SHOTS / "map-impact.png"), full_page=True)
        b.close()
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT action, reviewer FROM decisions ORDER BY decision_id").fetchall()
    assert len(rows) == before + 1 and rows[-1] == ("keep", "mapper")
