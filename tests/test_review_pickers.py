"""The Review page's class pickers: in a large label space they offer the image's likely classes, and all
of them on request; a small space is offered in full.

The likely classes (``candidate_classes``) are a pure function of the image's detail row and its
neighbours' labels, checked directly; the page is driven with AppTest on the 1,000-class workspace of
tests/test_queries.py and on the 3-class custom one of tests/_workspaces.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest
from test_app import APP, _n_classes, decisions, goto
from test_queries import _labels, base_workspace, ws  # noqa: F401

from audit.dashboard.pages.review import SHORTLIST_ABOVE, candidate_classes


def _detail(**kw):
    d = {
        "suggested_label": 7,
        "predictions": [("m1", [(3, "c3", 0.5), (7, "c7", 0.2)]), ("ensemble", [(7, "c7", 0.6), (9, "c9", 0.1)])],
        "real_labels": [7, 11],
        "label": 3,
        "current_labels": [3],
    }
    return {**d, **kw}


def test_candidates_put_the_suggestion_then_the_ensemble_then_neighbours_then_real_and_given_first_once():
    got = candidate_classes(_detail(), [[12], [5], [12], None, np.array([5, 12])])
    # suggestion 7; ensemble (listed last by image_detail) 7, 9; m1 3; neighbours 12 (x3) before 5 (x2); ReaL 11
    assert got == [7, 9, 3, 12, 5, 11]


def test_candidates_never_offer_no_class_fits_and_survive_missing_parts():
    d = _detail(suggested_label=float("nan"), predictions=[], real_labels=None, current_labels=[], label=4)
    assert candidate_classes(d, [[-1], [2]]) == [2, 4]
    assert candidate_classes(_detail(suggested_label=-1, real_labels=[-1, 11]), []) == [7, 9, 3, 11]


@given(
    sug=st.one_of(st.none(), st.integers(-1, 30)),
    top=st.lists(st.integers(0, 30), max_size=6),
    nbrs=st.lists(st.one_of(st.none(), st.lists(st.integers(-1, 30), max_size=3)), max_size=8),
    real=st.one_of(st.none(), st.lists(st.integers(-1, 30), max_size=3)),
    label=st.integers(0, 30),
    current=st.lists(st.integers(0, 30), max_size=3),
)
def test_candidates_hold_every_default_of_the_multi_picker_once(sug, top, nbrs, real, label, current):
    d = _detail(
        suggested_label=sug,
        predictions=[("e", [(c, str(c), 0.1) for c in top])],
        real_labels=real,
        label=label,
        current_labels=current,
    )
    got = candidate_classes(d, nbrs)
    assert len(got) == len(set(got)) and all(x >= 0 for x in got)
    # The multi picker's defaults (current, suggestion, ReaL) and the given label are always offered.
    wanted = {*current, label, *([sug] if sug is not None and sug >= 0 else []), *(x for x in real or [] if x >= 0)}
    assert wanted <= set(got)


def _start(db: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("AUDIT_DB", str(db))
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return goto(at, "Review")


def test_a_large_space_offers_the_likely_classes_and_all_on_request(ws, monkeypatch):  # noqa: F811
    assert _n_classes(ws) == 1000 > SHORTLIST_ABOVE
    at = _start(ws, monkeypatch)
    image = at.session_state["image"]
    picker = at.selectbox(key=f"relabel_to_{image}")
    offered = list(picker.options)
    assert 1 < len(offered) < 60, len(offered)
    assert any(c.value.startswith(f"Offered: {len(offered)} likely classes") for c in at.caption)
    assert list(at.multiselect(key=f"multi_to_{image}").options) == offered
    # A class outside the shortlist: the toggle offers every class, and relabelling to it is recorded.
    labels = _labels(ws)
    at.toggle(key="all_classes").set_value(True).run()
    assert not at.exception
    picker = at.selectbox(key=f"relabel_to_{image}")
    assert len(picker.options) == 1000
    far = next(c for c in range(500, 1000) if c != labels[image])
    picker.set_value(far)
    next(b for b in at.button if b.label == "Relabel").click().run()
    assert not at.exception
    assert decisions(ws)[-1][:3] == (image, "relabel", [far])
    # The toggle is the reviewer's choice for the session: the next image is offered every class too.
    nxt = at.session_state["image"]
    assert nxt != image and len(at.selectbox(key=f"relabel_to_{nxt}").options) == len(picker.options)


def test_a_small_space_is_offered_in_full_without_a_toggle(tmp_path, monkeypatch):
    from _workspaces import build

    db = build("custom", tmp_path)
    at = _start(db, monkeypatch)
    image = at.session_state["image"]
    if image is None:  # nothing flagged: open the first image
        at.session_state["image"] = 0
        at.run()
        image = 0
    n = _n_classes(db)
    assert n <= SHORTLIST_ABOVE
    assert len(at.selectbox(key=f"relabel_to_{image}").options) == n
    assert len(at.multiselect(key=f"multi_to_{image}").options) == n
    assert not [t for t in at.toggle if t.key == "all_classes"]
