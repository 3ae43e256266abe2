"""The Duplicates page (app.py under Streamlit's AppTest): groups side by side, resolved in one step, seen on the
Impact and Export pages; its empty states; and a workspace of hostile names whose groups (the real duplicate
checks run on planted hashes, against a reference set of hostile names) show only as plain text and export
safely.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from _workspaces import MARK, build
from test_app import goto, markdown_leaks, metrics, ok, rendered, start, texts
from test_duplicates_view import dup_base, dup_ws  # noqa: F401 - the planted workspace

from audit import queries as q
from audit.checks._base import CheckInputs
from audit.checks.duplicates import NearDuplicateCheck
from audit.checks.pixels import ExactDuplicateCheck
from audit.dashboard.ui import shown
from audit.pipeline import _check_frames
from audit.store import connect, insert_frame, transaction


@pytest.fixture
def app_env(monkeypatch):
    monkeypatch.setenv("AUDIT_READ_WAIT", "0.8")
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")

    def use(db: Path) -> None:
        monkeypatch.setenv("AUDIT_DB", str(db))

    return use


def test_groups_resolve_in_one_step_and_reach_impact_and_export(dup_ws, app_env):  # noqa: F811
    db, _ = dup_ws
    app_env(db)
    at = start(page="duplicates")
    assert at.header[0].value == "Duplicates"
    m = metrics(at)
    assert (m["duplicate groups"], m["with different labels"], m["copies of the reference set"]) == ("4", "3", "1")
    res = q_groups(db)
    assert res["groups"][0]["labels_differ"]
    first = next(g for g in res["groups"] if g["labels_differ"] and not g["reference"])
    body = texts(at)
    for g in res["groups"]:
        assert f"group {g['group']} · {g['size']} image(s)" in body
        for image_id in g["members"]["image_id"]:
            assert shown(image_id) in body
    assert "reference set: n01484850/train_leak.JPEG" in body  # the training copy, with its label there
    # Keep the lowest image, exclude the others: one click, one transaction.
    gid = first["group"]
    assert at.selectbox(key=f"u_keep_{gid}").value == int(first["members"]["image_index"].iloc[0])
    at.text_input(key="reason").set_value("same photo")
    ok(at)
    at.button(key=f"u_x_{gid}").click()
    ok(at)
    assert any(f"Group {gid} resolved" in s.value for s in at.success), texts(at)
    with connect(db, read_only=True) as con:
        sql = "SELECT image_index, action, reviewer, reason FROM decisions ORDER BY decision_id"
        rows = con.execute(sql).fetchall()
    copies = [i for i in first["members"]["image_index"] if i != gid]
    kept_id = first["members"]["image_id"].iloc[0]
    assert [r for r in rows if r[1] == "duplicate"] == [
        (i, "duplicate", "tester", f"duplicate of {kept_id}; same photo") for i in copies
    ]
    resolved = next(g for g in q_groups(db, "all")["groups"] if g["group"] == gid)
    assert resolved["resolved"] and not resolved["labels_differ"]
    assert f"excluded: duplicate of {shown(kept_id)}; same photo" in texts(at)
    # Undo one copy from its card: as on the Review page, one image at a time.
    at.button(key=f"u_undo_{copies[0]}").click()
    ok(at)
    assert any(f"undo on image #{copies[0]}" in s.value for s in at.success)
    at.button(key=f"u_x_{gid}").click()  # and exclude it again: that one only (the other stays as it was)
    ok(at)
    assert any("1 decision(s) saved" in s.value for s in at.success)
    goto(at, "Impact")
    assert metrics(at)["copies excluded"] == str(len(copies)) == str(q.decision_counts(db)["duplicates"])
    goto(at, "Export")
    assert metrics(at)["excluded"] == str(len(copies))
    excluded = q.export_files(db)["excluded.csv"].decode()
    assert excluded.count(f"duplicate of {kept_id}") == len(copies) and excluded.count("; same photo") == 1
    # One label for a group, from the picker (its default: the most common current label).
    other = next(g for g in q_groups(db, "unresolved")["groups"] if g["size"] == 2)
    goto(at, "Duplicates")
    at.selectbox(key="u_show").set_value("unresolved")
    ok(at)
    at.selectbox(key=f"u_label_{other['group']}").set_value(3)
    at.button(key=f"u_l_{other['group']}").click()
    ok(at)
    g = next(g for g in q_groups(db)["groups"] if g["group"] == other["group"])
    assert {tuple(x) for x in g["members"]["current_labels"]} == {(3,)} and g["resolved"]


def q_groups(db: Path, show: str = "all") -> dict:
    from audit import duplicates_view as dv

    return dv.duplicate_groups(db, show, 0, 50)


def test_decisions_need_the_token_here_too(dup_ws, app_env, monkeypatch):  # noqa: F811
    from streamlit.testing.v1.util import patch_config_options

    from audit.dashboard.auth import TOKEN_ENV

    db, _ = dup_ws
    app_env(db)
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    gid = q_groups(db)["groups"][0]["group"]
    with patch_config_options({"server.address": "0.0.0.0"}):
        at = start(page="duplicates")
        at.button(key=f"u_k_{gid}").click()
        ok(at)
    assert any("Group not resolved" in e.value for e in at.error)
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchone() == (0,)


def test_empty_states(dup_ws, app_env, tmp_path):  # noqa: F811
    db, _ = dup_ws
    none = tmp_path / "none.duckdb"
    shutil.copy(db, none)
    with connect(none) as con:
        con.execute("UPDATE issues SET is_issue = false WHERE \"check\" IN ('exact_duplicate', 'near_duplicate')")
    app_env(none)
    at = start(page="duplicates")
    assert metrics(at)["duplicate groups"] == "0" and any("No duplicates" in s.value for s in at.success)
    # A workspace of prediction files: the checks were skipped; the page says why, and what would run them.
    custom = build("custom", tmp_path / "custom")
    app_env(custom)
    at = start(page="duplicates")
    assert any("have not run" in i.value for i in at.info)
    assert "the duplicate checks were skipped" in texts(at) and "zoo model" in texts(at)


# --------------------------------------------------------------------------- hostile names

# The reference set's file names are user text too.
REF_IDS = ("=HYPERLINK(\"http://203.0.113.1/\") **zqref0**.jpg", "train/![](http://203.0.113.1/r.png) `zqref1`.png")


def add_duplicate_checks(db: Path, groups: list[tuple[int, ...]], leaks: dict[int, int]) -> None:
    """Run the real duplicate checks on planted pixel hashes of ``db``'s images and store their rows.

    ``groups``: images given one md5 and phash each (exact and near duplicates); ``leaks``: image -> reference
    image (of :data:`REF_IDS`) given its hashes. Replaces the rows of a run that skipped the checks.
    """
    with connect(db, read_only=True) as con:
        labels = np.array([r[0] for r in con.execute("SELECT label FROM images ORDER BY image_index").fetchall()])
        run_id = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()[0]
    n = len(labels)
    rng = np.random.default_rng(0)
    phash = rng.integers(0, 2**63, n, dtype=np.uint64) | np.uint64(1)  # far apart: random 64-bit hashes
    md5 = np.array([f"m{i}" for i in range(n)], dtype=object)
    rphash = rng.integers(0, 2**63, len(REF_IDS), dtype=np.uint64)
    rmd5 = np.array([f"r{j}" for j in range(len(REF_IDS))], dtype=object)
    for g in groups:
        phash[list(g)], md5[list(g)] = phash[g[0]], md5[g[0]]
    for i, j in leaks.items():
        rphash[j], rmd5[j] = phash[i], md5[i]
    px = {"phash": phash, "md5": md5, "ok": np.ones(n, dtype=bool)}
    ref_labels = np.zeros(len(REF_IDS), dtype=np.int64)
    for i, j in leaks.items():
        ref_labels[j] = (labels[i] + 1) % 4  # training says another class
    ref = {
        "image_ids": REF_IDS,
        "pixels": {"phash": rphash, "md5": rmd5, "ok": np.ones(len(REF_IDS), dtype=bool)},
        "labels": ref_labels,
    }
    inputs = CheckInputs(n=n, labels=labels, n_classes=4, pixels=px, reference=ref)
    checks = [NearDuplicateCheck(), ExactDuplicateCheck()]
    results = [c.run(inputs) for c in checks]
    for r in results:
        r.summary.update({"n_issues": int(r.is_issue.sum()), "n_assessed": n})
    issues, rows = _check_frames(run_id, checks, results, {})
    with connect(db) as con, transaction(con):
        con.execute("DELETE FROM issues WHERE \"check\" IN ('exact_duplicate', 'near_duplicate')")
        con.execute("DELETE FROM checks WHERE \"check\" IN ('exact_duplicate', 'near_duplicate')")
        insert_frame(con, "issues", issues)
        insert_frame(con, "checks", rows)


def test_hostile_names_on_the_duplicates_page_are_text_and_export_safely(app_env, tmp_path):
    db = build("hostile", tmp_path / "h")
    with connect(db, read_only=True) as con:
        ids = dict(con.execute("SELECT image_index, image_id FROM images").fetchall())
    # Image 6's folder starts a formula ('=cmd...'); image 7's file name holds a newline (where the disk allows).
    add_duplicate_checks(db, [(6, 7), (2, 3, 4)], {10: 0, 11: 1})
    app_env(db)
    at = start(page="duplicates")
    assert not at.exception and markdown_leaks(at) == []
    everything = texts(at) + "".join(v for _, _, v in rendered(at))
    for i in (6, 7, 2, 3, 4, 10, 11):
        assert shown(ids[i]) in everything, ids[i]
    for r in REF_IDS:
        assert shown(r) in everything, r
    assert MARK in everything
    at.selectbox(key="u_keep_6").set_value(7)
    ok(at)
    at.button(key="u_x_6").click()
    ok(at)
    assert markdown_leaks(at) == [] and any("Group 6 resolved" in s.value for s in at.success)
    at.selectbox(key="u_keep_10").set_value(-1)  # none of the set: it copies the reference image
    ok(at)
    at.button(key="u_x_10").click()
    ok(at)
    assert markdown_leaks(at) == []
    for page in ("Review", "Impact", "Export"):
        at.session_state["image"] = 6
        goto(at, page)
        assert markdown_leaks(at) == []
    # The export: the reason names the kept image exactly, as data; no cell starts a formula.
    files = q.export_files(db)
    rows = list(csv.reader(io.StringIO(files["excluded.csv"].decode(), newline="")))
    reasons = {image: reason for image, reason in rows[1:]}
    six = ids[6] if ids[6][0] not in "=+-@" else "./" + ids[6]
    assert reasons[six] == f"duplicate of {ids[7]}"
    assert reasons[ids[10]] == f"duplicate of reference image {REF_IDS[0]}"
    assert all(cell[:1] not in "=+-@\t\r" for row in rows for cell in row), rows
