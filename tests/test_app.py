"""The Streamlit dashboard (app.py) driven by Streamlit's AppTest, page by page and through a review.

Every page and its main interactions run on each kind of workspace (tests/_workspaces.py): with ReaL,
without ReaL (flat folder and label file), custom classes, and one made of hostile names. Further tests:
user text never reaches an element that renders Markdown, URL values are validated, and writes need the
access token when the dashboard is served beyond localhost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from _workspaces import BAD_REASON, CLASSES, KINDS, MARK, MODELS, REASON, REMOTE, REVIEWER, add_hostile_review, build
from google.protobuf.message import Message
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.util import patch_config_options
from test_queries import FLIP, ROOT, _hold_lock_script, _labels, _metric, base_workspace, ws  # noqa: F401

from audit import queries as q
from audit.dashboard.auth import TOKEN_ENV, is_loopback, token_matches, write_policy
from audit.dashboard.params import image_from_url, page_from_url
from audit.dashboard.serve import streamlit_command
from audit.dashboard.thumbs import UnsafePath, safe_image_path, thumbnail
from audit.dashboard.ui import plain_frame, shown
from audit.pipeline import ENSEMBLE
from audit.store import connect

APP = str(ROOT / "app.py")
PAGES = ("Overview", "Disagreements", "Review", "Duplicates", "Impact", "Export")


@pytest.fixture(autouse=True)
def _short_lock_wait(monkeypatch):
    monkeypatch.setenv("AUDIT_READ_WAIT", "0.8")  # seconds a page waits for a locked workspace
    monkeypatch.delenv(TOKEN_ENV, raising=False)


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
    parts += [t.value for t in at.text] + [c.value for c in at.code]
    parts += [w.value for w in at.warning] + [e.value for e in at.error]
    # Every strip's cards (audit.dashboard.strip: the gallery, the Map's selection, the Review page's strips).
    strips = [e.proto for e in at.main if e.type == "bidi_component" and e.proto.component_name == "audit_strip"]
    parts += [line for el in strips for c in json.loads(el.json)["cards"] for line in c["lines"]]
    return "\n".join(str(p) for p in parts)


def _strip(at: AppTest, key: str) -> Message | None:
    """The proto of the thumbnail strip (audit.dashboard.strip) mounted with ``key``, or None."""
    got = [e.proto for e in at.main if e.type == "bidi_component" and e.proto.component_name == "audit_strip"]
    return next((p for p in got if p.id.endswith(key)), None)


def strip_cards(at: AppTest, key: str) -> list[dict]:
    """The cards a strip draws (index, lines, button label, ...); none when it is not on the page."""
    el = _strip(at, key)
    return json.loads(el.json)["cards"] if el is not None else []


def click_strip(at: AppTest, key: str, index: int) -> AppTest:
    """Click the button of a strip's card as the browser does: the element's ``open`` trigger carries the card's
    image index into the next run, whose ``on_open`` callback runs first (AppTest has no element for it)."""
    from streamlit.components.v2.bidi_component.main import _make_trigger_id
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    el = _strip(at, key)
    assert el is not None and index in [c["idx"] for c in strip_cards(at, key)], (key, index)
    states = at._tree.get_widget_states()
    click = json.dumps([{"event": "open", "value": index}])
    states.widgets.append(WidgetState(id=_make_trigger_id(el.id, "events"), json_trigger_value=click))
    at._run(states)
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


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
    cards = strip_cards(app, "g_strip")  # the gallery's cards: one strip (audit.dashboard.strip)
    assert len(cards) == len(FLIP) and {c["button"] for c in cards} == {"Review"}
    assert "\ngiven " in "\n" + texts(app)
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
    click_strip(app, "g_strip", target)
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


def test_a_stale_key_press_on_review_decides_nothing(app):
    """A key pressed before the rerun has drawn the next image presses the last run's button, bound to the image
    just decided: it must not record a second decision on that image."""
    db = Path(os.environ["AUDIT_DB"])
    goto(app, "Review")
    img = app.session_state["image"]
    app.button(key="do_keep").click()  # the button drawn for img ...
    app.session_state["image"] = img + 1  # ... while the page has moved on (an accept's callback did this)
    app.run()
    assert decisions(db) == [] and not app.exception
    assert any("Not saved: that key or button was for the image decided a moment ago." in w.value for w in app.warning)
    app.button(key="do_keep").click().run()  # pressed again, on the image now shown
    assert [(d[0], d[1]) for d in decisions(db)] == [(img + 1, "keep")]


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


def test_a_read_outside_the_page_render_leaves_no_connection_open(app):
    """AppTest calls a filter's format_func (which reads the checks that ran) from its own thread after the run.
    That read used to reopen the finished render's connection and keep it, holding q.DB_LOCK in a thread that
    then ended: the next page's first read waited forever. Now such a read opens and closes its own."""
    for page in ("Disagreements", "Review", "Impact"):
        st.cache_data.clear()  # every read of the next run misses the cache and opens the file
        app.sidebar.radio(key="page").set_value(page)
        app.run(timeout=20)
        assert not app.exception, [e.value for e in app.exception]
        # Free for this (another) thread: no connection outlived the call or the render that opened it.
        assert q.DB_LOCK.acquire(timeout=1)
        q.DB_LOCK.release()
    assert app.title[0].value == "audit" and any(h.value == "Impact of the review" for h in app.header)


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
    assert "no audit workspace" in texts(at)


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
    assert "refused" in texts(at) and any("Image not shown" in str(w.value) for w in at.warning)
    assert len(at.get("imgs")) == 0 or all("hostname" not in str(i.proto) for i in at.get("imgs"))


# --------------------------------------------------------------------------- every kind of workspace


@pytest.fixture(scope="session")
def built(request, tmp_path_factory) -> Callable[[str], Path]:
    """``get(kind)``: the session's finished workspace of that kind (built on first use)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            if kind == "real":
                cache[kind] = request.getfixturevalue("base_workspace")[0]
            else:
                cache[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def _copy(src: Path, tmp_path: Path) -> Path:
    db = tmp_path / src.name  # the same (hostile) file name
    shutil.copy(src, db)
    return db


@pytest.fixture(params=KINDS)
def kws(request, built, tmp_path, monkeypatch) -> Path:
    """A fresh copy of each kind of workspace, with AUDIT_DB pointing at it."""
    db = _copy(built(request.param), tmp_path)
    monkeypatch.setenv("AUDIT_DB", str(db))
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    return db


def start(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def ok(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _n_classes(db: Path) -> int:
    return len(q.classes(db))


def test_overview_impact_and_export_on_every_kind_of_workspace(kws):
    db = kws
    s = q.run_summary(db)
    at = start()
    assert at.header[0].value == "Overview"
    m = metrics(at)
    assert m["images"] == "24" and m["models"] == str(len(s["models"])) and int(m["flagged"]) == len(FLIP)
    table = at.dataframe[0].value
    assert ("ReaL top1" in table.columns) == (s["real_source"] is not None)
    assert ("ReaL: does not apply" in texts(at)) == (s["real_source"] is None)
    assert {shown(x) for x in s["models"]} | {ENSEMBLE} == set(table.index)
    goto(at, "Impact")
    assert metrics(at)["decisions"] == "0" and len(at.dataframe) >= 1
    goto(at, "Export")
    assert metrics(at)["images"] == "24" and metrics(at)["changed by review"] == "0"
    labels = [b.label for b in at.get("download_button")]
    assert "labels.csv" in labels and ("real.json" in labels) == (s["real_source"] is not None)
    files = q.export_files(db)  # what the download buttons serve
    assert set(files) >= {"labels.csv", "classes.csv", "excluded.csv", "imagefolder.txt"}


def test_disagreements_filters_and_pairs_on_every_kind_of_workspace(kws):
    db = kws
    models = q.model_names(db)
    at = start(page="disagreements")
    assert metrics(at)["matching images"] == str(len(FLIP))
    assert len(strip_cards(at, "g_strip")) == len(FLIP)
    at.radio(key="f_reviewed").set_value("all")
    # Several filters per rerun keeps this fast; each combination is checked against the query layer.
    combos = [
        q.Filters(kinds=("label",), reviewed="all"),
        q.Filters(kinds=("models", "real"), model=models[0], reviewed="all", sort="disagree"),
        q.Filters(
            kinds=("real", "flagged"),
            issue_kinds=("wrong_label",),
            model=models[-1],
            class_index=_n_classes(db) - 1,
            quality=(0.0, 0.5),
            reviewed="all",
            sort="confidence",
        ),
        q.Filters(kinds=(), reviewed="all", sort="image"),
    ]
    for f in combos:
        at.multiselect(key="f_kinds").set_value(list(f.kinds))
        at.multiselect(key="f_issue").set_value(list(f.issue_kinds))
        at.selectbox(key="f_model").set_value(f.model)
        at.selectbox(key="f_class").set_value(f.class_index)
        at.slider(key="f_quality").set_value(f.quality)
        at.selectbox(key="f_sort").set_value(f.sort)
        ok(at)
        total, rows = q.gallery(db, f, 0, 24)
        assert metrics(at)["matching images"] == f"{total:,}"
        assert [c["idx"] for c in strip_cards(at, "g_strip")] == rows.image_index.tolist()  # in the query's order
    assert metrics(at)["matching images"] == "24"
    at.number_input(key="g_page").set_value(2)
    ok(at)
    assert at.session_state["g_page"] == 1  # 24 images fit one page
    # Confused classes: every model, then one pair into the gallery, then clear it.
    at.radio(key="d_view").set_value("Confused classes")
    ok(at)
    for model in models:
        at.selectbox(key="c_model").set_value(model)
        ok(at)
        assert len(at.dataframe) == 1 and len(at.selectbox(key="c_pick").options) >= 1
    next(b for b in at.button if b.label.startswith("Show these images")).click()
    ok(at)
    assert at.session_state["f_pair"] is not None and at.session_state["d_view"] == "Gallery"
    assert 1 <= int(metrics(at)["matching images"]) <= len(FLIP)
    next(b for b in at.button if b.label == "Clear class pair").click()
    ok(at)
    assert at.session_state["f_pair"] is None
    click_strip(at, "g_strip", FLIP[0])
    ok(at)
    assert at.session_state["page"] == "Review" and at.session_state["image"] == FLIP[0]


def test_review_every_action_on_every_kind_of_workspace(kws):
    db = kws
    labels, n = _labels(db), _n_classes(db)
    at = start(page="review")
    first = at.session_state["image"]
    assert first in FLIP and f"image #{first}" in texts(at)
    at.text_input(key="reason").set_value("next class")
    ok(at)
    at.button(key="do_accept").click()
    ok(at)
    assert decisions(db) == [(first, "accept", [(labels[first] + 1) % n], "tester", "next class")], texts(at)
    second = at.session_state["image"]
    assert second != first
    at.selectbox(key=f"relabel_to_{second}").set_value((labels[second] + 1) % n)
    next(b for b in at.button if b.label == "Relabel").click()
    ok(at)
    assert decisions(db)[-1][:3] == (second, "relabel", [(labels[second] + 1) % n])
    third = at.session_state["image"]
    pair = sorted({labels[third], (labels[third] + 1) % n})
    at.multiselect(key=f"multi_to_{third}").set_value(pair)
    next(b for b in at.button if b.label == "Save these labels").click()
    ok(at)
    assert decisions(db)[-1][:3] == (third, "multi", pair)
    # The queue is now empty under the default filters; walk every image instead.
    assert "Nothing left in this queue" in texts(at)
    at.session_state["f_kinds"], at.session_state["f_reviewed"] = [], "all"
    head = int(q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 1)[1].image_index.iloc[0])
    at.session_state["image"] = head
    at.session_state["advance"] = False
    ok(at)
    at.button(key="do_keep").click()
    ok(at)
    at.button(key="do_nofit").click()
    ok(at)
    at.button(key="do_undo").click()
    ok(at)
    assert [d[1] for d in decisions(db)][-3:] == ["keep", "no_fit", "undo"]
    assert at.dataframe[1].value.action.tolist()[-3:] == ["keep", "no_fit", "undo"]  # the history table
    nxt = next(b for b in at.button if b.label.startswith("Next"))
    nxt.click()
    ok(at)
    assert at.session_state["image"] != head
    next(b for b in at.button if b.label.startswith("◀")).click()
    ok(at)
    assert at.session_state["image"] == head
    queue = [c["idx"] for c in strip_cards(at, "q_strip") if not c["current"]]
    click_strip(at, "q_strip", queue[0])
    assert at.session_state["image"] == queue[0] and f"image #{queue[0]}" in texts(at)
    goto(at, "Impact")
    counts = q.decision_counts(db)
    assert metrics(at)["decisions"] == "6" and metrics(at)["images reviewed"] == str(counts["reviewed"])
    assert len(at.dataframe[-1].value) == 6  # the latest decisions
    goto(at, "Export")
    assert metrics(at)["changed by review"] == str(q.export_summary(db)["changed"])


# --------------------------------------------------------------------------- user text is never Markdown

# Elements and fields that show text as it is; user text anywhere else would be rendered as Markdown.
PLAIN_FIELDS = {
    ("text", "body"),
    ("code", "code_text"),
    ("selectbox", "options"),  # Streamlit renders select options as text
    ("multiselect", "options"),
    ("text_input", "value"),
    ("text_input", "default"),
    # The data of this project's components-v2 elements (mapcanvas, maphover, strip): their JavaScript sets
    # every string as textContent (tests/test_browser_map.py reads them back as text in a real browser).
    ("bidi_component", "json"),
}
OPAQUE = {"arrow_data_frame", "arrow_vega_lite_chart", "imgs", "dataframe", "vega_lite_chart"}  # data, not markup


def _nodes(node: object) -> Iterator[object]:
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _nodes(child)


def _strings(msg: Message, path: str = "") -> Iterator[tuple[str, str]]:
    for f, v in msg.ListFields():
        for x in v if f.is_repeated else [v]:
            if isinstance(x, Message):
                yield from _strings(x, f"{path}.{f.name}" if path else f.name)
            elif isinstance(x, str):
                yield (f"{path}.{f.name}" if path else f.name), x


_DATA_URL = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")


def rendered(at: AppTest) -> Iterator[tuple[str, str, str]]:
    """(element type, proto field, string) of every string in the page's elements and blocks."""
    for node in _nodes(at._tree):
        proto = getattr(node, "proto", None)
        ty = getattr(node, "type", "")
        if isinstance(proto, Message) and ty not in OPAQUE:
            for field, value in _strings(proto):
                # A thumbnail inlined as a data: URL is image bytes, not text (its base64 may spell anything).
                yield ty, field, _DATA_URL.sub("data:", value)


def markdown_leaks(at: AppTest, needle: str = MARK) -> list[tuple[str, str, str]]:
    """Strings holding ``needle`` in elements or fields that render Markdown (labels, captions, alerts...)."""
    return [(t, f, v) for t, f, v in rendered(at) if needle in v and (t, f) not in PLAIN_FIELDS]


def test_user_text_never_reaches_markdown_on_any_page(built, tmp_path, monkeypatch):
    """A workspace made of hostile names, decisions with hostile reviewer and reason, a bad image, a refused id:
    every page and interaction shows them only as plain text (st.text, st.code, tables, select options)."""
    db = _copy(built("hostile"), tmp_path)
    add_hostile_review(db, bad=5)
    with connect(db) as con:  # an id that leaves the root is refused, and the message quotes it
        con.execute("UPDATE images SET image_id = ? WHERE image_index = ?", ["../`esc` **zqesc**.jpg", 9])
    monkeypatch.setenv("AUDIT_DB", str(db))
    monkeypatch.setenv("AUDIT_REVIEWER", REVIEWER)
    seen: list[str] = []

    def check(at: AppTest) -> None:
        assert not at.exception, [e.value for e in at.exception]
        assert markdown_leaks(at) == []
        seen.append(texts(at) + "".join(v for _, _, v in rendered(at)))

    at = start()
    check(at)
    for page in PAGES:
        check(goto(at, page))
    goto(at, "Disagreements")
    at.multiselect(key="f_kinds").set_value([])
    at.radio(key="f_reviewed").set_value("all")
    check(ok(at))
    at.radio(key="d_view").set_value("Confused classes")
    check(ok(at))
    next(b for b in at.button if b.label.startswith("Show these images")).click()
    check(ok(at))  # the pair filter names both classes
    # Review: the bad image, the refused id, the image whose path spells a remote image, a flagged one.
    ids = dict(q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 100)[1][["image_id", "image_index"]].values)
    for image in (5, 9, ids[REMOTE], FLIP[2]):
        at.session_state["image"] = image
        check(goto(at, "Review"))
    at.text_input(key="reason").set_value(REASON)
    at.button(key="do_keep").click()
    check(ok(at))
    at.button(key="do_undo").click()
    check(ok(at))
    for page in ("Impact", "Export", "Overview"):
        check(goto(at, page))
    # The literal text is there, made visible where it holds control characters.
    everything = "\n".join(seen)
    for s in (*CLASSES, *MODELS, REMOTE, BAD_REASON, "zqesc", "data `root` **x** zqroot", "w `db` **x** zqdb"):
        assert shown(s) in everything, s
    history = plain_frame(q.image_detail(db, FLIP[2])["history"])
    assert set(history.reviewer) == {shown(REVIEWER)} and REASON in set(history.reason)
    # A missing workspace at a hostile path: the error quotes the path as text.
    monkeypatch.setenv("AUDIT_DB", str(tmp_path / "none `x` **zqnone**.duckdb"))
    at = start()
    assert markdown_leaks(at) == [] and "**zqnone**" in texts(at)


def test_shown_makes_invisible_characters_visible():
    assert shown("plain `x` **y** $z$") == "plain `x` **y** $z$"
    assert shown("a\nb\tc\r") == "a␊b␉c␍"
    assert shown("evil\u202egpj.exe") == "evil⟨U+202E⟩gpj.exe" and shown("zero\u200bwidth") == "zero⟨U+200B⟩width"
    assert shown(None) == "" and shown(3) == "3" and shown("عربى") == "عربى"
    df = plain_frame(pd.DataFrame({"a": ["x\ny", None], "n": [1, 2]}, index=["r\u202e", "s"]))
    assert df["a"].tolist() == ["x␊y", None] and df["n"].tolist() == [1, 2] and list(df.index) == ["r⟨U+202E⟩", "s"]


# --------------------------------------------------------------------------- values from the URL


GARBAGE = [
    {"page": "nope"},
    {"page": "x" * 5000},
    {"page": "`**zq**` $zq$"},
    {"page": "review\n"},
    {"page": "review", "image": "-1"},
    {"page": "review", "image": "99999999999999999999999"},
    {"page": "review", "image": "2147483648"},
    {"page": "review", "image": "1e3"},
    {"page": "review", "image": "²"},
    {"page": "review", "image": "١٢"},
    {"page": "review", "image": "0x10"},
    {"page": "review", "image": "zq"},
    {"page": "review", "image": "9" * 5000},
    {"page": "review", "image": "100000"},  # a valid number with no such image
    {"page": "disagreements", "model": "![](http://203.0.113.1/zq.png)", "kinds": "zq", "sort": "zq; DROP"},
    {"page": "export", "db": "/tmp/zq.duckdb", "token": "zq", "reviewer": "**zq**"},
]


@pytest.mark.parametrize("query", GARBAGE, ids=lambda d: "-".join(f"{k}={v[:12]!r}" for k, v in d.items()))
def test_garbage_in_the_url_falls_back_to_defaults(ws, monkeypatch, query):  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = start(**query)
    assert at.session_state["page"] in PAGES
    image = at.session_state["image"]
    assert image is None or image in _labels(ws)  # never an index the workspace lacks
    assert at.session_state["reviewer"] != "**zq**"
    assert not [v for _, _, v in rendered(at) if "zq" in v]  # nothing from the URL is shown
    if query.get("page") == "review":
        assert at.header[0].value == "Review" and at.session_state["image"] in FLIP  # the queue head instead
    # The URL now carries only validated values: the page and the image shown.
    want = {"page": at.session_state["page"].lower()}
    if at.session_state["page"] == "Review":
        want["image"] = str(at.session_state["image"])
    assert {k: at.query_params[k] for k in at.query_params} in (want, {k: [v] for k, v in want.items()})
    if len(str(query)) > 1000:  # and every page still works from there
        for page in PAGES:
            goto(at, page)


def test_url_parsers():
    pages = ("Overview", "Review")
    assert page_from_url("REVIEW", pages, "Overview") == "Review"
    assert page_from_url(" review ", pages, "Overview") == "Review"
    for bad in (None, "", "nope", "r" * 100, ["review"], 3):
        assert page_from_url(bad, pages, "Overview") == "Overview"
    assert image_from_url("17") == 17 and image_from_url("0") == 0 and image_from_url("2147483647") == 2**31 - 1
    for bad in (None, "", "-1", "+1", "1.0", "1e3", "²", "١٢", "0x1", "2147483648", "9" * 400, " ", 17):
        assert image_from_url(bad) is None, bad


# --------------------------------------------------------------------------- served beyond localhost


def test_writes_need_the_token_when_one_is_set(ws, monkeypatch):  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    at = start(page="review")
    assert "Decisions are disabled" in texts(at)
    at.button(key="do_keep").click()
    ok(at)
    assert decisions(ws) == [] and "Decision not saved" in texts(at) and "access token" in texts(at)
    box = at.sidebar.text_input(key="_token_in")
    assert box.proto.type == box.proto.PASSWORD
    box.input("wrong").run()
    assert "Wrong access token" in texts(at)
    at.button(key="do_keep").click()
    ok(at)
    assert decisions(ws) == [] and "Decision not saved" in texts(at)
    at.sidebar.text_input(key="_token_in").input(" s3cret-token ").run()
    assert "Access token accepted" in texts(at)
    assert not [k for k in at.sidebar.text_input if k.key == "_token_in"]  # asked once per session
    img = at.session_state["image"]
    at.button(key="do_keep").click()
    ok(at)
    assert [d[:2] for d in decisions(ws)] == [(img, "keep")]
    # The token is kept nowhere: not in session state, the page, or the workspace.
    assert "s3cret" not in repr(at.session_state)
    assert not [v for _, _, v in rendered(at) if "s3cret" in v]
    with connect(ws, read_only=True) as con:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            assert "s3cret" not in str(con.table(table).fetchall())


def test_served_beyond_localhost_without_a_token_is_read_only(ws, monkeypatch):  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    with patch_config_options({"server.address": "0.0.0.0"}):
        at = start(page="review")
        at.button(key="do_keep").click()
        ok(at)
    assert decisions(ws) == [] and "read only" in texts(at)
    with patch_config_options({"server.address": "127.0.0.1"}):
        at = start(page="review")
        at.button(key="do_keep").click()
        ok(at)
    assert len(decisions(ws)) == 1


def test_write_policy_and_token_check():
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", None, "::", "192.168.1.5", "example.com", "10.0.0.1"):
        assert not is_loopback(host), host
    assert write_policy("127.0.0.1", None).mode == "open"
    assert write_policy("0.0.0.0", None).mode == "closed" and write_policy(None, "").mode == "closed"
    assert write_policy("127.0.0.1", "t").mode == "token" and write_policy("0.0.0.0", "t").token == "t"
    assert token_matches("t0k", "t0k") and token_matches(" t0k\n", "t0k")
    assert not token_matches("t0K", "t0k") and not token_matches("", "") and not token_matches(None, "t")


def _dashboard(monkeypatch, db: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """Run ``audit dashboard`` up to the exec of Streamlit; return its command line and environment."""
    from audit import cli

    seen: dict[str, object] = {}

    def fake_execve(path, cmd, env):
        seen.update(cmd=cmd, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--db", str(db), *args])
    return seen["cmd"], seen["env"]  # type: ignore[return-value]


def test_dashboard_beyond_localhost_warns_and_sets_a_token(ws, monkeypatch, capsys):  # noqa: F811 - the ws fixture
    cmd, env = _dashboard(monkeypatch, ws, "--host", "0.0.0.0", "--port", "8600")
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "0.0.0.0" in warning[0] and "other machines" in warning[0]
    token = env[TOKEN_ENV]
    assert len(token) >= 20 and err.count(token) == 1  # printed once
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0" and cmd[cmd.index("--server.port") + 1] == "8600"
    assert token not in " ".join(cmd)  # not on the command line, where `ps` shows it
    # A token the user chose is used, and not echoed.
    monkeypatch.setenv(TOKEN_ENV, "chosen-by-me")
    cmd, env = _dashboard(monkeypatch, ws, "--host", "192.168.0.7")
    err = capsys.readouterr().err
    assert env[TOKEN_ENV] == "chosen-by-me" and "chosen-by-me" not in err and "warning" in err


def test_dashboard_on_localhost_has_no_warning_and_no_token(ws, monkeypatch, capsys):  # noqa: F811 - the ws fixture
    cmd, env = _dashboard(monkeypatch, ws)
    err = capsys.readouterr().err
    assert "warning" not in err and TOKEN_ENV not in env
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"


def test_streamlit_command_turns_on_origin_checks(ws, monkeypatch, capsys):  # noqa: F811 - the ws fixture
    for cmd in (streamlit_command("127.0.0.1", 8501), _dashboard(monkeypatch, ws)[0]):
        opts = dict(zip(cmd[5::2], cmd[6::2], strict=True))
        assert opts["--server.enableXsrfProtection"] == "true" and opts["--server.enableCORS"] == "true"
        assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"


def test_dashboard_refuses_a_port_out_of_range(ws, capsys, monkeypatch):  # noqa: F811 - the ws fixture
    from audit import cli

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("started Streamlit on a port out of range"))
    assert cli.main(["dashboard", "--db", str(ws), "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0] and "70000" in err[0] and "65535" in err[0]


def test_query_frames_hold_none_for_sql_null(built, tmp_path, monkeypatch):
    """pandas 3 hands NULL lists over as pd.NA and NULL strings as NaN: the frames the app reads hold None."""
    db = _copy(built("noreal"), tmp_path)
    q.record_decision(db, FLIP[0], "keep", reviewer="t")
    with connect(db) as con:  # NULL lists where another (older, foreign) writer left them
        con.execute("UPDATE decisions SET old_labels = NULL")
        con.execute("UPDATE runs SET models = NULL")
        con.execute("UPDATE predictions SET top_classes = NULL, top_probs = NULL WHERE image_index = ?", [FLIP[1]])
    total, g = q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 30)
    assert total == 24 and set(map(type, g.real_labels)) == {type(None)} and set(map(type, g.real)) == {type(None)}
    assert all(isinstance(v, list) for v in g.current_labels) and all(isinstance(v, str) for v in g.current)
    assert all(v is None or isinstance(v, str) for col in ("issue_kind", "suggested") for v in g[col])
    assert [top for i, top in zip(g.image_index, g.top3, strict=True) if i == FLIP[1]] == [
        [(m, []) for m in q.model_names(db)]
    ]
    _, _, window = q.queue_window(db, q.Filters(kinds=(), reviewed="all"), FLIP[0])
    assert all(isinstance(v, str) for v in window.given)
    d = q.image_detail(db, FLIP[0])
    assert d["real_labels"] is None and d["real"] is None and d["bad_reason"] is None and d["last_action"] == "keep"
    assert d["history"].old.tolist() == [""] and d["history"].new.tolist() != [""]
    assert q.recent_decisions(db).old.tolist() == [""] and q.runs_table(db).models.tolist() == [""]
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = start()
    for page in PAGES:
        goto(at, page)
    at.session_state["image"] = FLIP[1]
    goto(at, "Review")
    assert f"image #{FLIP[1]}" in texts(at)
