"""The dashboard over every check: its read side (audit.queries: the check filter, findings per image, the
overview's check list) and its pages (app.py under Streamlit's AppTest: the check filter, cards naming the checks
that flagged an image, the review page's findings with partner images to open), on the synthetic workspace of
test_queries plus rows of fake checks written by the pipeline's writer; and workspaces with the label check
alone (a version-1 one included), which look as they did before checks were plug-ins.

One module for both, so the session's workspaces imported from test_queries / test_app are built once here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _workspaces import MARK
from streamlit.testing.v1 import AppTest
from test_app import _copy, built, click_strip, goto, markdown_leaks, metrics, ok, rendered, start, strip_cards, texts  # noqa: F401
from test_queries import FLIP, ODD, _brute, _labels, base_workspace, ws  # noqa: F401
from test_store_v1 import _copy as v1_copy
from test_store_v1 import v1  # noqa: F401

from audit import checks as checks_pkg
from audit import queries as q
from audit.checks import Check, CheckInputs, CheckRegistry, CheckResult
from audit.checks.label import LabelCheck
from audit.dashboard.ui import shown
from audit.pipeline import _check_frames
from audit.store import connect, insert_frame, transaction

N = 24
# fake_duplicate: two groups of duplicates, {2, 3} and {1, 5} (1 is also a label flag); each image's partner is
# the other one of its group; the lowest score first: 1, then 2 and 3 (tied), then 5.
DUP_GROUPS = {0: (2, 3), 1: (1, 5)}
DUP_SCORE = {1: 0.05, 2: 0.1, 3: 0.1, 5: 0.2}
# fake_knn: flags the image only model c disagrees on, and the second label flag, suggesting the next class.
KNN = {ODD[0]: 0.3, FLIP[1]: 0.4}


class FakeDuplicate(Check):
    """Stands for near_duplicate (another helper's): suggests a partner image, groups in info."""

    name = "fake_duplicate"
    default = False  # a run while the fakes are registered runs the real checks only
    needs = frozenset()
    suggests = "image"
    description = "test double of a duplicate check"

    def run(self, inputs: CheckInputs) -> CheckResult:
        raise NotImplementedError  # results are made by hand below


class FakeKnn(Check):
    """Stands for knn_label: suggests a label."""

    name = "fake_knn"
    default = False  # a run while the fakes are registered runs the real checks only
    needs = frozenset()
    suggests = "label"
    description = "test double of a label-suggesting check"

    def run(self, inputs: CheckInputs) -> CheckResult:
        raise NotImplementedError


class FakeSkipped(Check):
    """A check the run selected but could not feed."""

    name = "fake_skipped"
    default = False  # a run while the fakes are registered runs the real checks only
    needs = frozenset({"features"})
    description = "test double of a skipped check"

    def run(self, inputs: CheckInputs) -> CheckResult:
        raise NotImplementedError


SKIP_NOTE = "skipped: needs features, which this run lacks (no model recorded features)"


def fake_registry() -> CheckRegistry:
    reg = CheckRegistry()
    for cls in (LabelCheck, FakeDuplicate, FakeKnn, FakeSkipped):
        reg.register(cls)
    return reg


@pytest.fixture
def fake_checks(monkeypatch: pytest.MonkeyPatch) -> CheckRegistry:
    """The fake checks registered (readers learn what a suggestion is from the registry)."""
    reg = fake_registry()
    monkeypatch.setattr(checks_pkg, "default_checks", lambda: reg)
    return reg


def dup_result(n: int = N) -> CheckResult:
    score = np.ones(n)
    is_issue = np.zeros(n, dtype=bool)
    sug = np.full(n, -1, dtype=np.int64)
    info: list[Mapping[str, Any] | None] = [None] * n
    for g, members in DUP_GROUPS.items():
        for i in members:
            score[i], is_issue[i] = DUP_SCORE[i], True
            sug[i] = next(m for m in members if m != i)
            info[i] = {"group": g, "partners": list(members), "different_labels": True}
    return CheckResult("fake_duplicate", score, is_issue, sug, info, {"threshold": 0.9}, {"groups": 2})


def knn_result(labels: Mapping[int, int], n: int = N) -> CheckResult:
    score = np.ones(n)
    score[0] = math.nan  # not assessed
    is_issue = np.zeros(n, dtype=bool)
    sug = np.full(n, -1, dtype=np.int64)
    for i, s in KNN.items():
        score[i], is_issue[i], sug[i] = s, True, (labels[i] + 1) % 4
    return CheckResult("fake_knn", score, is_issue, sug, None, {"k": 5}, {})


def add_checks(db: Path, results: Sequence[CheckResult], skipped: Mapping[str, str] | None = None) -> None:
    """Append check rows to a workspace through the pipeline's writer, as ``audit run`` would have written them."""
    skipped = dict(skipped or {})
    reg = fake_registry()
    selected = [reg.get(r.check)() for r in results] + [reg.get(name)() for name in skipped]
    for r in results:  # what run_checks adds to every summary
        r.summary.update({"n_issues": int(r.is_issue.sum()), "n_assessed": int(np.isfinite(r.score).sum())})
    with connect(db) as con:
        run_id = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()[0]
        issues, checks = _check_frames(run_id, selected, results, skipped)
        with transaction(con):
            insert_frame(con, "issues", issues)
            insert_frame(con, "checks", checks)


def add_fakes(db: Path) -> None:
    add_checks(db, [dup_result(), knn_result(_labels(db))], {"fake_skipped": SKIP_NOTE})


def _flagged_by(db: Path) -> dict[str, set[int]]:
    with connect(db, read_only=True) as con:
        rows = con.execute('SELECT "check", image_index FROM issues WHERE is_issue').fetchall()
    out: dict[str, set[int]] = {}
    for c, i in rows:
        out.setdefault(c, set()).add(i)
    return out


def _gallery_no_findings(db: Path, f: q.Filters):
    total, df = q.gallery(db, f, 0, 100)
    return total, df.drop(columns=["findings"])


# --------------------------------------------------------------------------- without other checks


def test_a_label_only_workspace_reads_as_before(ws):  # noqa: F811 - the ws fixture
    runs = q.check_runs(ws)
    assert runs.check.tolist() == ["label"] and bool(runs.ran.iloc[0]) and runs.note.iloc[0] is None
    assert runs.n_issues.iloc[0] == len(FLIP) == q.run_summary(ws)["flagged"]
    assert runs.suggests.iloc[0] == "label" and runs.description.iloc[0]
    # The default filter (the label check's issues) is cleanlab's flags, in label quality order.
    total, df = q.gallery(ws, q.Filters(), 0, 100)
    assert total == len(FLIP) and set(df.image_index) == set(FLIP) and df.is_label_issue.all()
    assert df.label_quality.is_monotonic_increasing
    assert df.check_score.tolist() == df.label_quality.tolist()  # the label check's score is its label quality
    by_score = q.gallery(ws, q.Filters(sort="score"), 0, 100)[1]
    assert by_score.image_index.tolist() == df.image_index.tolist()
    assert [[x["check"] for x in f] for f in df.findings] == [["label"]] * len(FLIP)
    d = q.image_detail(ws, FLIP[0])
    (label,) = d["findings"]
    assert (label["check"], label["is_issue"], label["suggests"]) == ("label", True, "label")
    assert label["score"] == pytest.approx(d["label_quality"]) and label["suggestion"] == d["suggested_label"]
    assert label["suggested"] == d["suggested"] and label["partners"] == []
    assert q.finding_line(label).startswith("label: score ") and f"suggests {d['suggested']}" in q.finding_line(label)
    clean = next(i for i in range(N) if i not in FLIP)
    assert [x["is_issue"] for x in q.image_detail(ws, clean)["findings"]] == [False]


# --------------------------------------------------------------------------- with other checks


def test_check_runs_lists_each_selected_check_with_counts_or_why_it_was_skipped(ws, fake_checks):  # noqa: F811
    add_fakes(ws)
    runs = q.check_runs(ws).set_index("check")
    assert runs.index.tolist() == ["label", "fake_duplicate", "fake_knn", "fake_skipped"]  # label first
    assert runs.loc["fake_duplicate", "n_issues"] == 4 and runs.loc["fake_duplicate", "n_assessed"] == N
    assert runs.loc["fake_knn", "n_issues"] == 2 and runs.loc["fake_knn", "n_assessed"] == N - 1
    assert not runs.loc["fake_skipped", "ran"] and runs.loc["fake_skipped", "note"] == SKIP_NOTE
    assert runs.loc["fake_skipped", "n_issues"] is None
    assert runs.loc["fake_duplicate", "suggests"] == "image" and runs.loc["fake_knn", "suggests"] == "label"


@pytest.mark.parametrize(
    "checks",
    [("label",), ("fake_duplicate",), ("fake_knn",), ("label", "fake_duplicate"), (), ("fake_skipped",), ("nope",)],
)
def test_check_filter_keeps_the_issues_of_the_selected_checks(ws, fake_checks, checks):  # noqa: F811
    add_fakes(ws)
    by = _flagged_by(ws)
    expected = set().union(*(by.get(c, set()) for c in (checks or by)))
    f = q.Filters(checks=checks, reviewed="all", sort="score")
    total, df = q.gallery(ws, f, 0, 100)
    assert total == len(expected) and set(df.image_index) == expected
    assert q.queue_window(ws, f, None)[0] == total  # the review queue walks the same images
    # Each card's findings are the checks that flagged it.
    for row in df.itertuples():
        assert {x["check"] for x in row.findings} == {c for c, ims in by.items() if row.image_index in ims}
        assert all(x["is_issue"] for x in row.findings)
    # Other filters combine with it as before (brute force knows the label check only).
    if checks == ("label",):
        for kinds in [("flagged", "real"), ("flagged", "models")]:
            g = q.Filters(kinds=kinds, checks=checks, reviewed="all")
            assert set(q.gallery(ws, g, 0, 100)[1].image_index) == set(_brute(ws, g))


def test_score_sort_orders_by_the_selected_checks_lowest_score(ws, fake_checks):  # noqa: F811
    add_fakes(ws)
    df = q.gallery(ws, q.Filters(checks=("fake_duplicate",), sort="score"), 0, 100)[1]
    assert df.image_index.tolist() == [1, 2, 3, 5] and df.check_score.tolist() == [0.05, 0.1, 0.1, 0.2]
    both = q.gallery(ws, q.Filters(checks=("fake_duplicate", "fake_knn"), sort="score"), 0, 100)[1]
    assert both.image_index.tolist() == [1, 2, 3, 5, ODD[0], FLIP[1]]
    # Every image, sorted by one check's score: the assessed ones first, the unassessed one (NaN) last.
    every = q.gallery(ws, q.Filters(kinds=(), checks=("fake_knn",), sort="score", reviewed="all"), 0, 100)[1]
    assert every.image_index.tolist()[:2] == [ODD[0], FLIP[1]] and every.image_index.iloc[-1] == 0


def test_the_default_filter_is_unchanged_by_other_checks(ws, fake_checks, tmp_path):  # noqa: F811
    for f in (q.Filters(), q.Filters(kinds=("flagged", "label"), reviewed="all", sort="disagree")):
        before = _gallery_no_findings(ws, f)
        n, pos, window = q.queue_window(ws, f, FLIP[1])
        add_fakes(ws)
        after = _gallery_no_findings(ws, f)
        assert before[0] == after[0] and before[1].equals(after[1])
        n2, pos2, window2 = q.queue_window(ws, f, FLIP[1])
        assert (n, pos) == (n2, pos2) and window.equals(window2)
        with connect(ws) as con:
            con.execute('DELETE FROM issues WHERE "check" <> ?', ["label"])
            con.execute('DELETE FROM checks WHERE "check" <> ?', ["label"])


def test_image_detail_names_every_checks_finding(ws, fake_checks):  # noqa: F811
    add_fakes(ws)
    labels = _labels(ws)
    ids = dict(q.gallery(ws, q.Filters(kinds=(), reviewed="all"), 0, 100)[1][["image_index", "image_id"]].values)
    d = q.image_detail(ws, 2)
    found = {x["check"]: x for x in d["findings"]}
    assert [x["check"] for x in d["findings"]] == ["label", "fake_duplicate", "fake_knn"]  # skipped: no rows
    dup = found["fake_duplicate"]
    assert dup["is_issue"] and dup["score"] == 0.1 and dup["suggestion"] == 3 and dup["suggested"] == ids[3]
    assert dup["partners"] == [(3, ids[3])] and dup["info"]["group"] == 0
    line = q.finding_line(dup)
    assert f"fake duplicate of {ids[3]} (#3)" in line and '"group": 0' in line and "partners" not in line
    assert not found["label"]["is_issue"] and not found["fake_knn"]["is_issue"]
    assert found["fake_knn"]["suggested"] is None and "suggests" not in q.finding_line(found["fake_knn"])
    # A label suggestion is named by its class; an unassessed image says so.
    knn = {x["check"]: x for x in q.image_detail(ws, ODD[0])["findings"]}["fake_knn"]
    names = q.classes(ws).set_index("class_index")["name"]
    assert knn["suggestion"] == (labels[ODD[0]] + 1) % 4 and knn["suggested"] == names[knn["suggestion"]]
    assert f"suggests {knn['suggested']}" in q.finding_line(knn)
    first = {x["check"]: x for x in q.image_detail(ws, 0)["findings"]}["fake_knn"]
    assert first["score"] is None and "not assessed" in q.finding_line(first)
    # The label flag that is also a duplicate: both findings, side by side.
    both = {x["check"]: x for x in q.image_detail(ws, 1)["findings"]}
    assert both["label"]["is_issue"] and both["fake_duplicate"]["suggested"] == ids[5]


def test_findings_from_a_foreign_writer_are_shown_not_trusted(ws, fake_checks):  # noqa: F811
    """Rows of a check this audit does not know, partners out of range, info that is no object: read as data."""
    with connect(ws) as con:
        con.execute(
            'INSERT INTO issues (run_id, "check", image_index, score, is_issue, suggestion, info) VALUES '
            "(?, ?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?, ?)",
            [
                *("r", "zz `x` **md**", 4, 0.2, True, 9, '{"partners": [4, 999, "x", true, 6]}'),
                *("r", "fake_duplicate", 4, 0.5, True, 999, "[1, 2]"),
            ],
        )
    d = q.image_detail(ws, 4)
    found = {x["check"]: x for x in d["findings"]}
    alien = found["zz `x` **md**"]
    assert alien["suggests"] is None and alien["suggested"] is None
    assert [p for p, _ in alien["partners"]] == [999, 6] and alien["partners"][0][1] == "#999"
    dup = found["fake_duplicate"]
    assert dup["suggested"] == "#999" and dup["info"] == {"info": [1, 2]}
    assert q.finding_line(alien).startswith("zz `x` **md**: score 0.200")
    # Check names are parameters, never SQL text.
    assert q.gallery(ws, q.Filters(checks=("x' OR '1'='1",)))[0] == 0
    with pytest.raises(ValueError, match="tuple of check names"):
        q.Filters(checks="label")


# --------------------------------------------------------------------------- the pages


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("AUDIT_READ_WAIT", "0.8")
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    monkeypatch.delenv("AUDIT_DASHBOARD_TOKEN", raising=False)


def _ids(db: Path) -> dict[int, str]:
    df = q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 100)[1]
    return dict(zip(df.image_index.tolist(), df.image_id.tolist(), strict=True))


def _cards(at: AppTest) -> set[int]:
    return {c["idx"] for c in strip_cards(at, "g_strip")}


def leaks(at: AppTest) -> list[tuple[str, str, str]]:
    """:func:`test_app.markdown_leaks`, where a multiselect's ``raw_values`` also counts as text: Streamlit puts
    the selected options there as ``format_func`` wrote them (``serde.serialize``), shown as the options are."""
    return [x for x in markdown_leaks(at) if x[:2] != ("multiselect", "raw_values")]


def _everything(at: AppTest) -> str:
    return texts(at) + "\n".join(v for _, _, v in rendered(at))


def test_a_label_only_workspace_shows_no_check_ui(ws, base_workspace, monkeypatch):  # noqa: F811 - the fixtures
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
    assert "checks:" not in texts(at) and not strip_cards(at, "partner_strip")
    assert "checks selected" not in texts(at)
    # The copy has no arrays folder (as a workspace made before neighbours were stored): one line naming the fix.
    assert q.RERUN_FOR_NEIGHBOURS in texts(at) and not strip_cards(at, "nbr_strip")
    # The original's run read prediction files, which carry no features: its answer says so, in one line.
    note = q.image_neighbours(base_workspace[0], FLIP[0])["note"]
    assert note.startswith("neighbours: none, this run recorded no features") and "\n" not in note


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
    (partner,) = strip_cards(at, "partner_strip")
    assert partner["idx"] == 5 and partner["lines"] == [f"fake_duplicate: {ids[5]}", "#5"] and partner["mark"]
    click_strip(at, "partner_strip", 5)
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
    # Made before neighbours were stored: the section names the fix, and the read side answers without them.
    assert q.RERUN_FOR_NEIGHBOURS in texts(at)
    note = q.image_neighbours(db, min(flagged))["note"]
    assert q.RERUN_FOR_NEIGHBOURS in note and "\n" not in note
    goto(at, "Overview")
    assert "checks of the last run" not in texts(at)
