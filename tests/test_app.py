"""The Streamlit dashboard (app.py) driven by Streamlit's AppTest, page by page and through a review."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from test_queries import FLIP, ROOT, _hold_lock_script, _labels, _metric, base_workspace, ws  # noqa: F401

from audit import queries as q
from audit.dashboard.thumbs import UnsafePath, safe_image_path, thumbnail
from audit.pipeline import ENSEMBLE
from audit.store import connect

APP = str(ROOT / "app.py")
PAGES = ("Overview", "Disagreements", "Review", "Impact", "Export")


@pytest.fixture(autouse=True)
def _short_lock_wait(monkeypatch):
    monkeypatch.setenv("AUDIT_READ_WAIT", "0.8")  # seconds a page waits for a locked workspace


@pytest.fixture
def app(ws, monkeypatch) -> AppTest:  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.success]
    parts += [h.value for h in at.header] + [h.value for h in at.subheader] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def decisions(db: Path) -> list[tuple]:
    with connect(db, read_only=True) as con:
        return con.execute(
            "SELECT image_index, action, new_labels, reviewer, reason FROM decisions ORDER BY decision_id"
        ).fetchall()


# --------------------------------------------------------------------------- pages


def test_overview_shows_facts_metrics_chart_and_ranking(app):
    assert app.header[0].value == "Overview"
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["images"] == "24" and metrics["models"] == "3" and metrics["bad images"] == "0"
    assert int(metrics["flagged"]) >= len(FLIP)
    table = app.dataframe[0].value
    assert list(table.columns) == ["original top1", "ReaL top1", "sigmoid f1", "clean top1", "relabeled top1"]
    assert {ENSEMBLE, "preds:a", "preds:b", "preds:c"} == set(table.index)
    assert "%" in table.loc["preds:a", "original top1"] and "–" in table.loc["preds:a", "original top1"]
    subs = [s.value for s in app.subheader]
    assert "Accuracy by evaluation" in subs and "Model ranking per evaluation" in subs
    ranks = app.dataframe[1].value
    assert ENSEMBLE not in ranks.index and ranks.min().min() == 1
    runs = app.dataframe[-1].value
    assert list(runs["status"]) == ["finished"] and runs["models"][0].count("preds:") == 3


def test_disagreements_gallery_filters_and_pairs(app):
    goto(app, "Disagreements")
    matching = {m.label: m.value for m in app.metric}["matching images"]
    assert matching == str(len(FLIP))
    cards = [b for b in app.button if b.label == "Review"]
    assert len(cards) == len(FLIP)
    assert "given **" in texts(app)
    # Widen the filter: every image where a model disagrees with the given label, any review state.
    app.multiselect(key="f_kinds").set_value(["label"]).run()
    app.radio(key="f_reviewed").set_value("all").run()
    total, _ = q.gallery(Path(os.environ["AUDIT_DB"]), q.Filters(kinds=("label",), reviewed="all"))
    assert {m.label: m.value for m in app.metric}["matching images"] == str(total)
    app.selectbox(key="f_sort").set_value("image").run()
    assert not app.exception
    # Confused classes: the flipped labels make pairs; "show these images" filters the gallery to one pair.
    app.radio(key="d_view").set_value("Confused classes").run()
    assert not app.exception and len(app.dataframe) == 1
    assert any("↔" in str(v) for v in app.selectbox(key="c_pick").options)
    next(b for b in app.button if b.label.startswith("Show these images")).click().run()
    assert app.session_state["f_pair"] is not None and app.session_state["f_kinds"] == []
    assert app.session_state["d_view"] == "Gallery"
    n = int({m.label: m.value for m in app.metric}["matching images"])
    assert 1 <= n <= len(FLIP)


def test_card_review_button_opens_that_image(app):
    goto(app, "Disagreements")
    target = FLIP[1]
    app.button(key=f"rev_{target}").click().run()
    assert app.session_state["page"] == "Review" and app.session_state["image"] == target
    assert f"image #{target}" in texts(app)


def test_review_round_trip_moves_relabeled_metric_and_export(app):
    db = Path(os.environ["AUDIT_DB"])
    labels = _labels(db)
    before = _metric(q.metrics_table(db), ENSEMBLE, "relabeled").value
    goto(app, "Review")
    first = app.session_state["image"]
    assert first in FLIP and "Queue:" in texts(app)
    app.text_input(key="reason").set_value("label is the next class").run()
    app.button(key="do_accept").click().run()
    assert not app.exception
    assert decisions(db) == [(first, "accept", [labels[first] + 1], "tester", "label is the next class")]
    assert "Decision 1 saved" in texts(app)
    assert app.session_state["image"] != first  # moved on in the queue
    # Relabel the second one with the class search, then mark the third as several labels.
    second = app.session_state["image"]
    app.selectbox(key=f"relabel_to_{second}").set_value(labels[second] + 1)
    next(b for b in app.button if b.label == "Relabel").click().run()
    assert decisions(db)[-1][:3] == (second, "relabel", [labels[second] + 1])
    third = app.session_state["image"]
    app.multiselect(key=f"multi_to_{third}").set_value([labels[third], labels[third] + 1])
    next(b for b in app.button if b.label == "Save these labels").click().run()
    assert decisions(db)[-1][:3] == (third, "multi", sorted([labels[third], labels[third] + 1]))
    after = _metric(q.metrics_table(db), ENSEMBLE, "relabeled").value
    assert after > before and after == pytest.approx(1.0)
    # Impact shows the move; Export ships it.
    goto(app, "Impact")
    m = {x.label: x.value for x in app.metric}
    # accepted counts flagged images that ended on the suggestion, whichever button put them there
    assert m["decisions"] == "3" and m["accepted"] == "2" and m["rejected"] == "0" and m["flag precision"] == "100.0%"
    view = app.dataframe[0].value.set_index("model")
    assert view.loc[ENSEMBLE, "Δ vs original"].startswith("+")
    goto(app, "Export")
    assert {x.label: x.value for x in app.metric}["changed by review"] == "3"
    files = q.export_files(db)
    rows = files["labels.csv"].decode().splitlines()
    relabeled = [r for r in rows if ",relabeled," in r or ",multi_label," in r]
    assert len(relabeled) == 3 and all("decision" in r and "tester" in r for r in relabeled)


def test_review_keep_no_fit_undo_and_history(app):
    db = Path(os.environ["AUDIT_DB"])
    labels = _labels(db)
    app.session_state["advance"] = False
    goto(app, "Review")
    img = app.session_state["image"]
    app.button(key="do_keep").click().run()
    app.button(key="do_nofit").click().run()
    assert app.session_state["image"] == img  # stayed: moving on is switched off
    hist = app.dataframe[1].value
    assert hist.action.tolist() == ["keep", "no_fit"] and hist.reviewer.tolist() == ["tester", "tester"]
    app.button(key="do_undo").click().run()
    assert [d[1] for d in decisions(db)] == ["keep", "no_fit", "undo"]
    assert decisions(db)[-1][2] == [labels[img]]  # undo returns to the label set before no_fit
    assert app.dataframe[1].value.action.tolist() == ["keep", "no_fit", "undo"]


def test_review_next_previous_and_deep_link(ws, monkeypatch):  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "review"
    at.query_params["image"] = str(FLIP[2])
    at.run()
    assert not at.exception and at.session_state["page"] == "Review"
    assert at.session_state["image"] == FLIP[2] and f"image #{FLIP[2]}" in texts(at)
    order = q.gallery(ws, q.Filters(), 0, 10)[1].image_index.tolist()
    pos = order.index(FLIP[2])
    nxt = next(b for b in at.button if b.label.startswith("Next"))
    if pos + 1 < len(order):
        nxt.click().run()
        assert at.session_state["image"] == order[pos + 1]
        next(b for b in at.button if b.label.startswith("◀")).click().run()
        assert at.session_state["image"] == FLIP[2]
    assert at.query_params["image"] == [str(FLIP[2])] or at.query_params["image"] == str(FLIP[2])


def test_empty_queue_says_so(app):
    db = Path(os.environ["AUDIT_DB"])
    labels = _labels(db)
    for i in FLIP:
        q.record_decision(db, i, "accept", labels=[labels[i] + 1], reviewer="other")
    goto(app, "Review")
    assert "Nothing left in this queue" in texts(app)


def test_other_reviewers_decisions_show_up_without_refresh(app):
    db = Path(os.environ["AUDIT_DB"])
    goto(app, "Impact")
    assert {m.label: m.value for m in app.metric}["decisions"] == "0"
    script = f"from audit.queries import record_decision; record_decision({str(db)!r}, 0, 'keep', reviewer='bob')"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    app.run()
    assert {m.label: m.value for m in app.metric}["decisions"] == "1"


def test_page_shows_last_data_while_another_process_writes(app, tmp_path):
    """An `audit run` ingesting holds the write lock: the page answers from what it read last, then catches up."""
    db = Path(os.environ["AUDIT_DB"])
    goto(app, "Impact")
    ready = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", _hold_lock_script(db, 3.0, ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        # Nothing committed yet, so the data version is unchanged: the rerun answers from its cache at once.
        t = time.monotonic()
        app.run()
        assert time.monotonic() - t < 2.0 and not app.exception
        # A cache miss (here forced) while the lock is held: after AUDIT_READ_WAIT the page shows its last data.
        st.cache_data.clear()
        t = time.monotonic()
        app.run()
        took = time.monotonic() - t
        assert not app.exception, [e.value for e in app.exception]
        assert {m.label: m.value for m in app.metric}["decisions"] == "0"
        assert "showing the last data" in texts(app) and took < 2.5, took
    finally:
        assert holder.wait(30) == 0
    app.run()
    assert not app.exception and "showing the last data" not in texts(app)


def test_missing_workspace_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_DB", str(tmp_path / "none.duckdb"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert any("no audit workspace" in str(w.value) for w in [*at.warning, *at.error])


def test_workspace_never_comes_from_the_url(ws, tmp_path, monkeypatch):  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["db"] = str(tmp_path / "evil.duckdb")
    at.run()
    assert not at.exception and {m.label: m.value for m in at.metric}["images"] == "24"


# --------------------------------------------------------------------------- images stay under the root


def test_safe_image_path_refuses_everything_outside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(root / "cls" / "ok.jpg")
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (40, 30), "blue").save(secret)
    (root / "cls" / "link.jpg").symlink_to(secret)
    (root / "escape").symlink_to(tmp_path)
    (root / "cls" / "inner.jpg").symlink_to(root / "cls" / "ok.jpg")
    assert safe_image_path(root, "cls/ok.jpg") == (root / "cls" / "ok.jpg").resolve()
    assert safe_image_path(root, "cls/inner.jpg") == (root / "cls" / "ok.jpg").resolve()  # a link inside is fine
    for bad in (
        "../secret.jpg",
        "cls/../../secret.jpg",
        str(secret),
        "/etc/passwd",
        "cls/link.jpg",
        "escape/secret.jpg",
        "",
        "cls\\ok.jpg",
        "cls/ok.jpg\x00",
        "cls",
        "cls/missing.jpg",
        "C:/x.jpg",
    ):
        with pytest.raises(UnsafePath):
            safe_image_path(root, bad)
    with pytest.raises(UnsafePath):
        safe_image_path("", "cls/ok.jpg")


def test_thumbnails_are_small_and_cached(tmp_path):
    from io import BytesIO

    from PIL import Image

    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (800, 600), "green").save(root / "big.jpg")
    cache = tmp_path / "cache"
    data = thumbnail(root, "big.jpg", 160, cache=cache)
    with Image.open(BytesIO(data)) as im:
        assert max(im.size) <= 160 and im.format == "JPEG"
    cached = list(cache.rglob("*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == data
    (root / "big.jpg").unlink()
    with pytest.raises(UnsafePath):  # the cache never serves a file that is gone
        thumbnail(root, "big.jpg", 160, cache=cache)


def test_app_refuses_an_image_id_that_leaves_the_root(ws, monkeypatch):  # noqa: F811 - the ws fixture
    with connect(ws) as con:
        con.execute("UPDATE images SET image_id = ? WHERE image_index = ?", ["../../../../etc/hostname", FLIP[0]])
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "review"
    at.query_params["image"] = str(FLIP[0])
    at.run()
    assert not at.exception
    assert any("refused" in str(w.value) for w in at.warning)
    assert len(at.get("imgs")) == 0 or all("hostname" not in str(i.proto) for i in at.get("imgs"))
