"""The dashboard (app.py, Streamlit AppTest) over every check: the check filter, cards naming the checks that
flagged an image, the review page's findings with partner images to open, the overview's check list; and a
workspace with the label check alone, which looks as it did before checks were plug-ins."""

from __future__ import annotations

from pathlib import Path

import pytest
from _workspaces import MARK
from streamlit.testing.v1 import AppTest
from test_app import _copy, built, goto, markdown_leaks, metrics, ok, rendered, start, texts  # noqa: F401
from test_queries import FLIP, base_workspace, ws  # noqa: F401
from test_queries_checks import KNN, SKIP_NOTE, add_checks, add_fakes, dup_result, fake_checks  # noqa: F401
from test_store_v1 import _copy as v1_copy
from test_store_v1 import v1  # noqa: F401

from audit import queries as q
from audit.dashboard.ui import shown
from audit.store import connect


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("AUDIT_READ_WAIT", "0.8")
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    monkeypatch.delenv("AUDIT_DASHBOARD_TOKEN", raising=False)


def _ids(db: Path) -> dict[int, str]:
    df = q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 100)[1]
    return dict(zip(df.image_index.tolist(), df.image_id.tolist(), strict=True))


def _cards(at: AppTest) -> set[int]:
    return {int(b.key[4:]) for b in at.button if (b.key or "").startswith("rev_")}


def leaks(at: AppTest) -> list[tuple[str, str, str]]:
    """:func:`test_app.markdown_leaks`, where a multiselect's ``raw_values`` also counts as text: Streamlit puts
    the selected options there as ``format_func`` wrote them (``serde.serialize``), shown as the options are."""
    return [x for x in markdown_leaks(at) if x[:2] != ("multiselect", "raw_values")]


def _everything(at: AppTest) -> str:
    return texts(at) + "\n".join(v for _, _, v in rendered(at))


def test_a_label_only_workspace_shows_no_check_ui(ws, monkeypatch):  # noqa: F811 - the ws fixture
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = start()
    assert "checks of the last run" not in texts(at)
    goto(at, "Disagreements")
    assert not [m for m in at.multiselect if m.key == "f_checks"]
    assert "score" not in at.selectbox(key="f_sort").options and "flagged by cleanlab" in at.multiselect(
        key="f_kinds"
    ).options[0]
    assert _cards(at) == set(FLIP) and "flagged by:" not in texts(at)
    goto(at, "Review")
    assert at.session_state["image"] in FLIP
    assert "checks:" not in texts(at) and not [b for b in at.button if (b.key or "").startswith("open_")]
    assert "checks selected" not in texts(at)


def test_check_filter_shows_a_checks_issues_sorted_by_its_score(ws, fake_checks, monkeypatch):  # noqa: F811
    add_fakes(ws)
    ids = _ids(ws)
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = start()
    # The overview: each selected check, with its issues or why it was skipped.
    assert "checks of the last run:" in texts(at)
    assert "fake_duplicate: 4 issue(s) of 24 images assessed" in texts(at)
    assert f"fake_skipped: {SKIP_NOTE}" in texts(at) and f"label: {len(FLIP)} issue(s)" in texts(at)
    # From the overview, one check's issues in the gallery (and so the review queue).
    at.selectbox(key="o_check").set_value("fake_knn")
    next(b for b in at.button if b.label == "Review this check's issues").click()
    ok(at)
    assert at.session_state["page"] == "Disagreements" and at.session_state["f_checks"] == ["fake_knn"]
    assert metrics(at)["matching images"] == "2" and _cards(at) == set(KNN)
    at.multiselect(key="f_checks").set_value(["label"])
    at.selectbox(key="f_sort").set_value("quality")
    ok(at)
    checks = at.multiselect(key="f_checks")
    assert list(checks.options) == ["label", "fake_duplicate", "fake_knn"]  # what ran; the skipped one cannot
    assert checks.value == ["label"] and _cards(at) == set(FLIP)  # the default: today's label flags
    assert metrics(at)["matching images"] == str(len(FLIP))
    checks.set_value(["fake_duplicate"])
    ok(at)
    assert at.session_state["f_sort"] == "score" and at.session_state["g_page"] == 1
    assert metrics(at)["matching images"] == "4" and _cards(at) == {1, 2, 3, 5}
    # Each card names the checks that flagged it, with its score and partner.
    body = texts(at)
    assert "flagged by: label " in body and f"; fake_duplicate 0.050 (of {ids[5]})" in body
    assert f"flagged by: fake_duplicate 0.100 (of {ids[3]})" in body
    # Several checks, and "any check" (empty).
    at.multiselect(key="f_checks").set_value(["fake_duplicate", "fake_knn"])
    ok(at)
    assert metrics(at)["matching images"] == "6"
    at.multiselect(key="f_checks").set_value([])
    ok(at)
    total = q.gallery(ws, q.Filters(checks=()), 0, 1)[0]
    assert metrics(at)["matching images"] == str(total) == str(len({*FLIP, 1, 2, 3, 5, 20}))
    # The review queue is the selected check's issues, in its score order.
    at.multiselect(key="f_checks").set_value(["fake_duplicate"])
    ok(at)
    next(b for b in at.button if b.label == "Review these in order").click()
    ok(at)
    assert at.session_state["page"] == "Review" and at.session_state["image"] == 1
    assert "checks selected: fake_duplicate" in texts(at) and "1 of 4" in texts(at)


def test_review_shows_every_checks_finding_and_opens_a_partner(ws, fake_checks, monkeypatch):  # noqa: F811
    add_fakes(ws)
    ids = _ids(ws)
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = start(page="review", image="1")
    body = texts(at)
    # The label flag and the duplicate, side by side; the knn check's "no issue" too.
    assert "checks:\nlabel: score " in body and " · issue · suggests " in body
    assert f"fake_duplicate: score 0.050 · issue · fake duplicate of {ids[5]} (#5)" in body
    assert "fake_knn: score 1.000 · no issue" in body
    assert f"fake_duplicate: {ids[5]} · #5" in body
    at.button(key="open_5").click()
    ok(at)
    assert at.session_state["image"] == 5 and "image #5" in texts(at)
    assert f"fake duplicate of {ids[1]} (#1)" in texts(at)
    # Deciding still works beside the findings: accept the label check's suggestion on image 1.
    at.session_state["image"] = 1
    ok(at)
    at.session_state["advance"] = False
    at.button(key="do_accept").click()
    ok(at)
    assert q.image_detail(ws, 1)["last_action"] == "accept"


def test_check_names_and_partner_ids_never_reach_markdown(built, tmp_path, monkeypatch, fake_checks):  # noqa: F811
    """Hostile image ids as partners, and a check this audit does not know, named in Markdown: shown as text."""
    db = _copy(built("hostile"), tmp_path)
    n = len(_ids(db))
    dup = dup_result(n)
    add_checks(db, [dup])
    alien = f"`tick` **{MARK}check** :red[x]"
    with connect(db) as con:
        con.execute(
            'INSERT INTO issues (run_id, "check", image_index, score, is_issue, suggestion, info) '
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ["r", alien, 2, 0.01, True, None, '{"partners": [6], "note": "**zqnote**"}'],
        )
        con.execute('INSERT INTO checks VALUES (?, ?, ?, ?)', ["r", alien, "{}", '{"n_issues": 1, "n_assessed": 1}'])
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = start()
    assert leaks(at) == [] and alien in _everything(at)
    goto(at, "Disagreements")
    at.multiselect(key="f_checks").set_value([alien, "fake_duplicate"])
    ok(at)
    assert leaks(at) == [] and _cards(at) == {1, 2, 3, 5}
    seen = []
    for image in (2, 1):
        at.session_state["image"] = image
        goto(at, "Review")
        assert leaks(at) == [], image
        seen.append(_everything(at))
    # The text is there, as text (invisible characters made visible): the unknown check's details, the
    # duplicate's finding naming its hostile partner.
    assert "**zqnote**" in seen[0] and f"{shown(alien)}: score 0.010 · issue" in seen[0]
    assert shown(q.finding_line(q.image_detail(db, 1)["findings"][1])) in seen[1]


def test_no_check_ran_at_all(ws, monkeypatch):  # noqa: F811 - the ws fixture
    """A workspace whose run stored no check rows (no label check either): pages render, nothing is flagged."""
    with connect(ws) as con:
        con.execute("DELETE FROM issues")
        con.execute("DELETE FROM checks")
    monkeypatch.setenv("AUDIT_DB", str(ws))
    at = start(page="disagreements")
    assert metrics(at)["matching images"] == "0"
    goto(at, "Review")
    goto(at, "Overview")
    assert not at.exception and q.check_runs(ws).empty


def test_a_version_1_workspace_reads_and_renders_as_before(v1, monkeypatch):  # noqa: F811 - the v1 fixture
    """An unmigrated version-1 workspace (made by the old code), opened read-only: the label check's rows come
    through the compatibility views; the check UI stays hidden and the pages show today's flags."""
    db = v1_copy(v1, "dash")
    flagged = {r[0] for r in v1["tables"]["label_issues"] if r[2]}
    runs = q.check_runs(db)
    assert runs.check.tolist() == ["label"] and runs.n_issues.tolist() == [len(flagged)]
    total, df = q.gallery(db, q.Filters(reviewed="all"), 0, 100)
    assert set(df.image_index) == flagged and [[x["check"] for x in f] for f in df.findings] == [["label"]] * total
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = start(page="disagreements")
    assert not [m for m in at.multiselect if m.key == "f_checks"] and "flagged by:" not in texts(at)
    goto(at, "Review")
    assert "checks:" not in texts(at)
    goto(at, "Overview")
    assert "checks of the last run" not in texts(at)
