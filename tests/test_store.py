"""Store: schema, versioning, locking retries and append-only decisions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from audit.errors import StoreError
from audit.store import (
    SCHEMA_VERSION,
    append_decision,
    connect,
    current_label_sets,
    decision_history,
)


def make_db(path: Path, n: int = 5, n_classes: int = 4) -> Path:
    with connect(path, create=True) as con:
        con.register(
            "c",
            pd.DataFrame(
                {
                    "class_index": range(n_classes),
                    "key": [f"k{i}" for i in range(n_classes)],
                    "name": [f"class {i}" for i in range(n_classes)],
                }
            ),
        )
        con.execute("INSERT INTO classes SELECT * FROM c")
        imgs = pd.DataFrame(
            {
                "image_index": range(n),
                "image_id": [f"x/{i}.jpg" for i in range(n)],
                "label": [i % n_classes for i in range(n)],
                "real_labels": [[i % n_classes] for i in range(n)],
                "valid": [True] * n,
            }
        )
        con.register("i", imgs)
        con.execute("INSERT INTO images SELECT * FROM i")
    return path


def test_create_stamps_version_and_reopens(tmp_path):
    db = make_db(tmp_path / "w.duckdb")
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = ?", ["schema_version"]).fetchone()[0] == str(
            SCHEMA_VERSION
        )
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"runs", "images", "models", "predictions", "metrics", "label_issues", "decisions", "bad_images"} <= tables


def test_missing_and_newer_workspace_are_refused(tmp_path):
    with pytest.raises(StoreError, match="audit run"), connect(tmp_path / "nope.duckdb"):
        pass
    db = make_db(tmp_path / "w.duckdb")
    with connect(db) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = ?", [str(SCHEMA_VERSION + 1), "schema_version"])
    with pytest.raises(StoreError, match="upgrade audit"), connect(db):
        pass
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    with pytest.raises(StoreError, match="not an audit workspace"), connect(other):
        pass


def test_decisions_are_append_only_and_undo_is_a_decision(tmp_path):
    db = make_db(tmp_path / "w.duckdb")
    append_decision(db, 1, "relabel", labels=[3], reviewer="ann", reason="looks like 3")
    append_decision(db, 1, "multi", labels=[3, 1], reviewer="bob")
    append_decision(db, 1, "undo", reviewer="bob")
    append_decision(db, 2, "no_fit", reviewer="ann")
    hist = decision_history(db, 1)
    assert hist["action"].tolist() == ["relabel", "multi", "undo"]
    assert [list(x) for x in hist["new_labels"]] == [[3], [1, 3], [3]]
    assert [list(x) for x in hist["old_labels"]] == [[1], [3], [1, 3]]
    with connect(db, read_only=True) as con:
        sets, decided = current_label_sets(con)
    assert sets == [[0], [3], [], [3], [0]]
    assert decided.tolist() == [False, True, True, False, False]


@pytest.mark.parametrize(
    ("action", "labels", "match"),
    [
        ("explode", [], "unknown review action"),
        ("relabel", [], "takes 1..1"),
        ("multi", [2], "takes 2"),
        ("relabel", [99], "outside the 4 classes"),
    ],
)
def test_bad_decisions_are_refused_and_write_nothing(tmp_path, action, labels, match):
    db = make_db(tmp_path / "w.duckdb")
    with pytest.raises(StoreError, match=match):
        append_decision(db, 0, action, labels=labels)
    assert len(decision_history(db, 0)) == 0


_WRITER = """
import sys
from audit.store import append_decision
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for k in range(n):
    append_decision(db, k % 5, "relabel", labels=[k % 4], reviewer=who, timeout=60)
"""

_HOLDER = """
import sys, time
{setup}
print("ready", flush=True)
time.sleep(60)
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    # Plain subprocesses, not multiprocessing: forking or spawning from a pytest
    # process that has OpenVINO loaded has crashed the parent.
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def test_two_processes_appending_lose_nothing(tmp_path):
    db = make_db(tmp_path / "w.duckdb")
    procs = [_python(_WRITER, str(db), who, "15") for who in ("ann", "bob")]
    for p in procs:
        assert p.wait(120) == 0
    with connect(db, read_only=True) as con:
        counts = dict(con.execute("SELECT reviewer, count(*) FROM decisions GROUP BY reviewer").fetchall())
        ids = [r[0] for r in con.execute("SELECT decision_id FROM decisions ORDER BY decision_id").fetchall()]
    assert counts == {"ann": 15, "bob": 15}
    assert np.all(np.diff(ids) > 0)


def test_lock_held_too_long_is_a_clear_error(tmp_path):
    db = make_db(tmp_path / "w.duckdb")
    p = _python(_HOLDER.format(setup=f"import duckdb; con = duckdb.connect({str(db)!r})"))
    try:
        assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        with pytest.raises(StoreError, match="locked by another process"), connect(db, timeout=0.5):
            pass
    finally:
        p.kill()
        p.wait()


def test_one_run_per_workspace_and_dead_runs_are_marked(tmp_path):
    from audit.store import mark_interrupted_runs, workspace_lock

    db = make_db(tmp_path / "w.duckdb")
    with connect(db) as con:
        con.execute("INSERT INTO runs (run_id, status) VALUES (?, ?)", ["dead", "running"])
    setup = f"from audit.store import workspace_lock; lock = workspace_lock({str(db)!r}); lock.__enter__()"
    p = _python(_HOLDER.format(setup=setup))
    try:
        assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        with pytest.raises(StoreError, match=f"pid {p.pid}"), workspace_lock(db):
            pass
    finally:
        p.kill()  # like kill -9: the OS releases the lock
        p.wait()
    with workspace_lock(db):
        assert mark_interrupted_runs(db) == 1
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]


_FORK_THEN_DIE = """
import os, signal, sys, time
from audit.store import workspace_lock
with workspace_lock(sys.argv[1]):
    if os.fork() == 0:  # like a DataLoader worker: outlives its killed parent for a while
        time.sleep(30)
        os._exit(0)
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_run_lock_is_not_kept_by_forked_workers_of_a_killed_run(tmp_path):
    from audit.store import workspace_lock

    db = make_db(tmp_path / "w.duckdb")
    p = _python(_FORK_THEN_DIE, str(db))
    assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    p.wait(30)
    with workspace_lock(db):  # at once, while the orphaned child still runs
        pass
