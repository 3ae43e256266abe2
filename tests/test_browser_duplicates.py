"""Duplicate groups in real headless Chromium (issue 12, section 3): open the Duplicates page, resolve a group in
one step, see it on the Impact page and in the export downloaded from the Export page.

The workspace is test_duplicates_view's planted one (copies within the set, a copy of a training image under
another class, groups from identical pixels and perceptual hashes, no features). Screenshots of each step go
to reports/screenshots/duplicates-*.png.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest
from test_browser import TIMEOUT_MS, browser, settled, visit_page  # noqa: F401 - the browser fixture
from test_duplicates_view import dup_base  # noqa: F401 - the planted workspace

from audit import duplicates_view as dv
from audit import queries as q
from audit.dashboard.serve import serve
from audit.store import connect

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[1] / "reports" / "screenshots"


def test_resolve_a_duplicate_group_in_chromium(dup_base, browser, tmp_path):  # noqa: F811
    db = tmp_path / "w.duckdb"
    shutil.copy(dup_base[0], db)
    res = dv.duplicate_groups(db, "all", 0, 50)
    group = next(g for g in res["groups"] if g["labels_differ"] and not g["reference"])  # copies under two labels
    gid, members = group["group"], group["members"]
    kept_id = members["image_id"].iloc[0]
    copies = [int(i) for i in members["image_index"] if i != gid]
    excluded_before = q.export_summary(db)["excluded"]
    with serve(db, log=tmp_path / "streamlit.log", env={"AUDIT_REVIEWER": "browser"}) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)


        # The groups side by side: the pair under two labels first among the unresolved, the training copy named.
        body = visit_page(page, url, "page=duplicates", "Duplicates")
        page.get_by_test_id("stMetric").filter(has_text="with different labels").wait_for()
        body = settled(page)
        assert f"group {gid} · {group['size']} image(s) · labels differ" in body
        assert "reference set: n01484850/train_leak.JPEG" in body and kept_id in body
        # The set's images and the training copy. Streamlit loads its image component as a lazy chunk, so the
        # <img> elements can appear after the run has settled: wait for the seventh rather than count at once.
        page.locator("[data-testid='stImage'] img").nth(6).wait_for()
        page.get_by_test_id("stMain").screenshot(path=str(SHOTS / "duplicates-groups.png"))

        # One click: keep the first image (a keep decision), exclude its copies (a duplicate decision each).
        # A button with a tooltip is drawn twice (a hidden copy measures its width): the first is the one shown.
        page.locator(f".st-key-u_x_{gid} button").first.click()
        page.get_by_text(re.compile(rf"Group {gid} resolved .*: {len(copies) + 1} decision\(s\) saved")).wait_for()
        body = settled(page)
        assert f"excluded: duplicate of {kept_id}" in body
        page.locator(f".st-key-u_x_{gid}").scroll_into_view_if_needed()
        page.get_by_test_id("stMain").screenshot(path=str(SHOTS / "duplicates-resolved.png"))

        # Impact: the copies are counted, and left out of the relabeled metric.
        visit_page(page, url, "page=impact", "Impact of the review")
        metric = page.get_by_test_id("stMetric").filter(has_text="copies excluded")
        assert metric.inner_text().split()[-1] == str(len(copies))
        imp = q.impact(q.metrics_table(db)).set_index("model")
        assert q.decision_counts(db)["duplicates"] == len(copies) and not imp.empty
        page.get_by_test_id("stMain").screenshot(path=str(SHOTS / "duplicates-impact.png"))

        # Export: excluded.csv, downloaded from the page, says what each copy duplicates.
        visit_page(page, url, "page=export", "Export the cleaned labels")
        assert page.get_by_test_id("stMetric").filter(has_text="excluded").first.inner_text().split()[-1] == str(
            excluded_before + len(copies)
        )
        with page.expect_download() as download:
            page.get_by_role("button", name="excluded.csv").click()
        downloaded = Path(download.value.path()).read_bytes()
        page.get_by_test_id("stMain").screenshot(path=str(SHOTS / "duplicates-export.png"))
    rows = {r["image"]: r["reason"] for r in csv.DictReader(io.StringIO(downloaded.decode()))}
    with connect(db, read_only=True) as con:
        ids = dict(con.execute("SELECT image_index, image_id FROM images").fetchall())
        who = {r[0] for r in con.execute("SELECT DISTINCT reviewer FROM decisions").fetchall()}
    assert {ids[i]: rows[ids[i]] for i in copies} == {ids[i]: f"duplicate of {kept_id}" for i in copies}
    assert downloaded == q.export_files(db)["excluded.csv"] and who == {"browser"}
    for name in ("groups", "resolved", "impact", "export"):
        assert (SHOTS / f"duplicates-{name}.png").stat().st_size > 10_000
