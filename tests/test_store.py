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
    meta_value,
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


# --------------------------------------------------------------------------- issue 9: paths, creation, writes


def _spellings(tmp_path: Path) -> tuple[Path, list[Path]]:
    """One workspace, and other paths that reach it: a link to the file, a link to its folder, ``x/..``, relative."""
    import os

    real = tmp_path / "real" / "w.duckdb"
    real.parent.mkdir()
    (tmp_path / "real" / "x").mkdir()
    (tmp_path / "file_link.duckdb").symlink_to(real)
    (tmp_path / "dir_link").symlink_to(real.parent, target_is_directory=True)
    rel = Path(os.path.relpath(real, Path.cwd()))
    dotdot = real.parent / "x" / ".." / "w.duckdb"
    return real, [tmp_path / "file_link.duckdb", tmp_path / "dir_link" / "w.duckdb", dotdot, rel]


def test_one_workspace_by_any_path_has_one_identity_and_one_lock(tmp_path):
    from audit.store import arrays_dir, workspace_lock, workspace_path

    real, others = _spellings(tmp_path)
    make_db(real)
    # POSIX record locks are per process: another one holds the lock by the real path.
    setup = f"from audit.store import workspace_lock; lock = workspace_lock({str(real)!r}); lock.__enter__()"
    p = _python(_HOLDER.format(setup=setup))
    try:
        assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        for other in others:
            assert workspace_path(other) == real and arrays_dir(other) == arrays_dir(real), other
            with pytest.raises(StoreError, match=f"pid {p.pid}"), workspace_lock(other):
                pass
            with connect(other, read_only=True) as con:
                assert con.execute("SELECT count(*) FROM images").fetchall() == [(5,)]
    finally:
        p.kill()
        p.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir_link", "file_link.duckdb", "real"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["w.duckdb", "w.duckdb.arrays", "x"]


_COMMIT_THEN_DIE = """
import os, signal, sys
from audit.store import connect
with connect(sys.argv[1]) as con:
    con.execute("INSERT INTO meta VALUES (?, ?)", ["probe", "committed"])
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the commit sits in the WAL: no checkpoint on close
"""


def test_a_commit_made_through_a_link_is_recovered_through_the_real_path(tmp_path):
    # DuckDB names its WAL after the path it was given: a link must not get a WAL of its own.
    real, others = _spellings(tmp_path)
    make_db(real)
    p = _python(_COMMIT_THEN_DIE, str(others[0]))
    assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    p.wait(30)
    assert not Path(f"{others[0]}.wal").exists()
    with connect(real, read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = ?", ["probe"]).fetchall() == [("committed",)]


def test_lock_errors_are_duckdbs_lock_conflict_only():
    from audit.store import _is_lock_error

    held = duckdb.IOException(
        'IO Error: Could not set lock on file "/x/w.duckdb": Conflicting lock is held in /usr/bin/python3 (PID 7). '
        "See also https://duckdb.org/docs/current/connect/concurrency"
    )
    assert _is_lock_error(held)
    for other in (
        duckdb.IOException('IO Error: Cannot open file "/data/lockers/block.duckdb": No such file or directory'),
        duckdb.IOException('IO Error: The file "/srv/locks/w.duckdb" exists, but it is not a valid DuckDB database'),
        duckdb.CatalogException("Catalog Error: Table with name lock does not exist!"),
    ):
        assert not _is_lock_error(other), other


@pytest.mark.parametrize("leftover", ["zero-byte file", "table-less database"])
def test_an_empty_workspace_left_by_a_killed_creation_is_rebuilt(tmp_path, leftover):
    from audit.store import is_new_workspace

    db = tmp_path / "w.duckdb"
    if leftover == "zero-byte file":
        db.touch()
    else:
        duckdb.connect(str(db)).close()
    assert is_new_workspace(db)
    with pytest.raises(StoreError, match=rf"run 'audit run DATASET --db {db}' to build it"), connect(db):
        pass
    make_db(db)
    assert not is_new_workspace(db)
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM images").fetchall() == [(5,)]


def test_creation_is_atomic_and_sweeps_temporaries_of_dead_creators(tmp_path, monkeypatch):
    from audit import store

    db = tmp_path / "w.duckdb"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".w.duckdb.building-{int(dead.stdout)}-abcdef12"
    stale.write_bytes(b"half")
    seen: list[bool] = []
    real_init = store.init_db

    def init_and_look(con):
        seen.append(db.exists())  # while the schema is being built, nothing is at the workspace's path
        real_init(con)

    monkeypatch.setattr(store, "init_db", init_and_look)
    make_db(db)
    assert seen[0] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.duckdb"]


def test_insert_frame_writes_empty_frames_as_nothing(tmp_path):
    from audit.store import insert_frame, transaction

    db = make_db(tmp_path / "w.duckdb")
    with connect(db) as con, transaction(con):
        assert insert_frame(con, "metrics", pd.DataFrame([])) == 0  # no columns at all: a list of no rows
        assert insert_frame(con, "bad_images", pd.DataFrame({"image_index": [], "reason": []})) == 0
        # Matched by name, not position.
        assert insert_frame(con, "bad_images", pd.DataFrame({"reason": ["gone"], "image_index": [3]})) == 1
        with pytest.raises(ValueError, match="not a workspace table"):
            insert_frame(con, "images; DROP TABLE images", pd.DataFrame({"a": [1]}))
        with pytest.raises(ValueError, match="not in table"):
            insert_frame(con, "bad_images", pd.DataFrame({"nope": [1]}))
    assert read_frame_rows(db) == [(3, None, "gone", None)]


def read_frame_rows(db: Path) -> list[tuple]:
    with connect(db, read_only=True) as con:
        return con.execute("SELECT * FROM bad_images").fetchall()


def test_a_failed_commit_keeps_its_own_error_and_the_old_state(tmp_path, monkeypatch):
    from audit import store
    from audit.errors import DiskError

    db = make_db(tmp_path / "w.duckdb")

    def full(con):
        raise duckdb.TransactionException(
            f'TransactionContext Error: Failed to commit: Could not write file "{db}.wal": No space left on device'
        )

    monkeypatch.setattr(store, "_commit", full)
    with (
        pytest.raises(DiskError, match=r"No space left on device; free some disk space"),
        connect(db) as con,
        store.transaction(con),
    ):
        con.execute("DELETE FROM images")
    monkeypatch.undo()
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM images").fetchall() == [(5,)]


def test_meta_value_reads_one_key_and_leaves_the_connection_usable(tmp_path):
    with connect(tmp_path / "ws.duckdb", create=True) as con:
        con.execute("INSERT INTO meta VALUES (?, ?)", ["dataset_root", "/data/x y"])
        assert meta_value(con, "dataset_root") == "/data/x y"
        assert meta_value(con, "no such key") is None
        assert con.execute("SELECT count(*) FROM meta").fetchall()[0][0] >= 2  # the result was consumed
