"""Schema version 1 -> 2 on a real version-1 workspace, built by the code of the last version-1 commit.

The old ``audit`` package is taken from git (``git archive``) and run in a subprocess, so the
workspace is exactly what a user's older install made: a run with ReaL sets and a truth file,
review decisions with an undo. The new code then opens it read-only (the dashboard: nothing
changes on disk, the new tables read through views), writes to it (the first write migrates:
every old table kept row for row, ``issues`` and ``checks`` filled), and runs on it again
(today's flags come out unchanged, now also as the label check's rows of ``issues``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pytest
from _synth import make_imagefolder, make_predictions

from audit.datasets import load_dataset

REPO = Path(__file__).resolve().parents[1]
# The last commit whose workspaces are schema version 1: main just before checks became plug-ins.
V1_COMMIT = "ba542f4dc742b7c2766a804a93d4392432e90280"
FLIP = np.array([1, 7, 13])


def _old_code(base: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed, so the version-1 code cannot be taken from history")
    probe = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{V1_COMMIT}^{{commit}}"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"commit {V1_COMMIT[:10]} (schema version 1) is not in this clone (shallow?); fetch the history")
    tar = subprocess.run(["git", "-C", str(REPO), "archive", V1_COMMIT, "audit"], capture_output=True, check=True)
    out = base / "v1code"
    out.mkdir()
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(out, filter="data")
    return out


# Runs several ``audit`` commands in one process (imports once): argv lists in, each one's stdout out.
_MANY = """
import contextlib, io, json, sys
from audit.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        sys.exit(f"audit {argv}: exit {code}")
    out.append(buf.getvalue())
print(json.dumps(out))
"""


def _audit(code: Path, *commands: list[str]) -> list[str]:
    """Each of ``commands`` (argv lists) run by the ``audit`` package at ``code``; their stdouts.

    The working folder holds no package, so the one on PYTHONPATH is the one imported.
    """
    env = dict(os.environ, PYTHONPATH=str(code))
    res = subprocess.run(
        [sys.executable, "-c", _MANY, json.dumps([list(c) for c in commands])],
        env=env,
        cwd=code.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def _tables(db: Path) -> dict[str, list[tuple]]:
    """Every table of the file, every row, in a fixed order (plain DuckDB: no audit code involved)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1"
            ).fetchall()
        ]
        return {t: con.execute(f'SELECT * FROM "{t}" ORDER BY ALL').fetchall() for t in names}
    finally:
        con.close()


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """A finished version-1 workspace (run + ReaL + truth + decisions with an undo), and how the old code read it."""
    base = tmp_path_factory.mktemp("v1")
    old = _old_code(base)
    root = make_imagefolder(base / "ds")
    ds = load_dataset(root)
    ids = list(ds.image_ids)
    a = make_predictions(base / "a.npy", ids, ds.labels, flip=FLIP, seed=1)
    b = make_predictions(base / "b.npy", ids, ds.labels, flip=FLIP, seed=2, probs=True)
    truth = base / "truth.csv"
    true = ds.labels.copy()
    true[FLIP] = (true[FLIP] + 1) % 1000  # the flipped labels are the wrong ones
    rows = [f"{i},{ds.label_space.keys[t]}" for i, t in zip(ids, true.tolist(), strict=True)]
    truth.write_text("path,label\n" + "\n".join(rows) + "\n")
    db = base / "ws.duckdb"
    ws = ["--db", str(db)]
    reviews = [["review", *r, *ws, "--reviewer", "old"] for r in (["1", "accept", "--labels", "1"], ["7", "keep"])]
    reviews += [["review", *r, *ws, "--reviewer", "old"] for r in (["7", "undo"], ["13", "no_fit"])]
    *_, issues, metrics = _audit(
        old,
        ["run", str(root), "--models", f"preds:{a},preds:{b}", *ws, "--truth", str(truth), "-q"],
        *reviews,
        ["issues", *ws, "--format", "json"],
        ["metrics", *ws, "--format", "json"],
    )
    before = {"issues": issues, "metrics": metrics}
    return {"base": base, "root": root, "db": db, "preds": (a, b), "truth": truth, "tables": _tables(db), "old": before}


def _copy(v1: dict, name: str) -> Path:
    """A private copy of the version-1 workspace (file and arrays), so each test changes its own."""
    db = v1["base"] / f"{name}.duckdb"
    shutil.copyfile(v1["db"], db)
    shutil.copytree(v1["db"].with_name(v1["db"].name + ".arrays"), db.with_name(db.name + ".arrays"))
    return db


def _version(db: Path) -> str:
    return dict(_tables(db)["meta"])["schema_version"]


def test_the_old_code_made_a_version_1_workspace_with_every_kind_of_row(v1):
    t = v1["tables"]
    assert dict(t["meta"])["schema_version"] == "1"
    assert "issues" not in t and "checks" not in t
    assert len(t["label_issues"]) == 24 and sum(r[2] for r in t["label_issues"]) >= len(FLIP)
    assert [r[5] for r in sorted(t["decisions"])] == ["accept", "keep", "undo", "no_fit"]
    assert t["truth"] and t["metrics"] and t["predictions"]


def test_read_only_opens_a_version_1_workspace_unchanged_and_reads_the_new_tables_through_views(v1, capsys):
    from audit import queries
    from audit.cli import main
    from audit.store import connect

    db = _copy(v1, "ro")
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with connect(db, read_only=True) as con:
        issues = con.execute('SELECT * FROM issues ORDER BY "check", image_index').fetchall()
        checks = con.execute('SELECT "check", summary FROM checks').fetchall()
    label = {r[0]: r for r in v1["tables"]["label_issues"]}
    assert len(issues) == len(label) == 24
    for run_id, check, idx, score, is_issue, suggestion, info in issues:
        li = label[idx]
        assert (check, run_id, score, is_issue, suggestion) == ("label", li[8], li[1], li[2], li[3])
        got = json.loads(info)
        assert got["issue_kind"] == li[5] and got["rank"] == li[6]
        assert got["suggested_confidence"] == pytest.approx(li[4])
        assert got["scores"] == pytest.approx(json.loads(li[7]))
    ((name, summary),) = checks
    assert name == "label" and json.loads(summary)["n_issues"] == sum(r[2] for r in label.values())
    # What the dashboard reads, through the same read-only connections.
    assert queries.run_summary(db)["images"] == 24
    assert not queries.metrics_table(db).empty
    total, page = queries.gallery(db, queries.Filters())
    assert total > 0 and not page.empty
    assert queries.image_detail(db, int(FLIP[0])) is not None
    assert queries.export_files(db)
    # The new CLI lists what the old one listed.
    for command in ("issues", "metrics"):
        assert main([command, "--db", str(db), "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == json.loads(v1["old"][command])
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest and _version(db) == "1"
    assert not db.with_name(db.name + ".wal").exists()


def test_the_first_write_migrates_keeping_every_row(v1):
    from audit.store import SCHEMA_VERSION, append_decision, connect

    db = _copy(v1, "rw")
    with connect(db, read_only=True) as con:
        seen = con.execute('SELECT * FROM issues ORDER BY "check", image_index').fetchall()
    append_decision(db, 2, "keep", reviewer="new")
    after = _tables(db)
    assert dict(after["meta"])["schema_version"] == str(SCHEMA_VERSION) == "2"
    for table, rows in v1["tables"].items():
        if table == "decisions":
            assert after[table][: len(rows)] == rows and len(after[table]) == len(rows) + 1
        elif table == "meta":
            assert {k: v for k, v in after[table] if k != "schema_version"} == {
                k: v for k, v in rows if k != "schema_version"
            }
        else:
            assert after[table] == rows, table
    with connect(db, read_only=True) as con:
        migrated = con.execute('SELECT * FROM issues ORDER BY "check", image_index').fetchall()
        params = con.execute("SELECT params FROM checks").fetchall()
    assert migrated == seen  # the read-only views showed exactly what the migration wrote
    (row,) = params
    assert json.loads(row[0])["method"] == "normalized_margin"


def test_a_new_run_on_a_version_1_workspace_migrates_and_flags_exactly_as_before(v1, capsys):
    db = _copy(v1, "rerun")
    a, b = v1["preds"]
    from audit.cli import main

    run = ["run", str(v1["root"]), "--models", f"preds:{a},preds:{b}", "--db", str(db), "--truth", str(v1["truth"])]
    assert main([*run, "-q"]) == 0
    assert "check label: " in capsys.readouterr().err
    after = _tables(db)
    assert dict(after["meta"])["schema_version"] == "2"
    old = {r[0]: r for r in v1["tables"]["label_issues"]}
    new = {r[0]: r for r in after["label_issues"]}
    # Today's flagging, unchanged: every column of label_issues but the run id.
    assert {k: r[:8] for k, r in new.items()} == {k: r[:8] for k, r in old.items()}
    issues = {r[2]: r for r in after["issues"] if r[1] == "label"}
    assert sorted(issues) == sorted(old)
    for idx, li in old.items():
        _run, _check, _idx, score, is_issue, suggestion, info = issues[idx]
        assert (score, is_issue, suggestion) == (li[1], li[2], li[3])
        got = json.loads(info)
        assert (got["issue_kind"], got["rank"]) == (li[5], li[6])
        assert got["suggested_confidence"] == li[4]  # the same float64, through JSON and back
        assert {k: v for k, v in got["scores"].items() if v is not None} == {
            k: v for k, v in json.loads(li[7]).items() if v == v
        }
    assert after["decisions"] == v1["tables"]["decisions"]
    assert after["truth"] == v1["tables"]["truth"]
