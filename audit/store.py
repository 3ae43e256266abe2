"""The audit workspace: one DuckDB file plus a folder of arrays beside it.

``<name>.duckdb`` holds every table; ``<name>.arrays/`` holds each model's
``(N, C)`` logits and probability matrices and the resumable scoring shards.

Concurrency. DuckDB lets one process at a time open a file for writing, and
while it does, no other process can open it at all. So no ``audit`` process
holds the file: every read or write opens it, works inside one transaction and
closes it again, and a process that finds the file locked retries with backoff
for up to ``timeout`` seconds (:func:`connect`). Long work (scoring) touches
only files in the arrays folder; its DB writes are one short transaction at the
end. Decisions are appended one per transaction, so two reviewers on one DB
never lose each other's work and a crash loses at most the decision in flight.

Schema version 1 (see :data:`SCHEMA`); newer files are refused, never guessed at.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from audit.errors import ReviewError, StoreError

__all__ = [
    "ACTIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Decision",
    "LabelState",
    "append_decision",
    "arrays_dir",
    "connect",
    "current_label_sets",
    "current_labels_sql",
    "current_sql",
    "decision_history",
    "default_db",
    "fetch_one",
    "given_sql",
    "init_db",
    "label_state",
    "mark_interrupted_runs",
    "read_frame",
    "workspace_lock",
]

SCHEMA_VERSION = 1

# Append-only review actions and what each does to an image's label set.
ACTIONS = {
    "accept": "take the suggested label",
    "relabel": "replace the label with another single class",
    "multi": "several classes are valid",
    "no_fit": "no class fits; leave the image out of evaluation",
    "keep": "the original label is right",
    "undo": "withdraw the newest decision still in effect; each undo walks back one more",
}

SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, started_at TIMESTAMP, finished_at TIMESTAMP,
        status VARCHAR, command VARCHAR, dataset_root VARCHAR, n_images INTEGER,
        models VARCHAR[], audit_version VARCHAR, params JSON)""",
    """CREATE TABLE IF NOT EXISTS classes (
        class_index INTEGER PRIMARY KEY, key VARCHAR, name VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS images (
        image_index INTEGER PRIMARY KEY, image_id VARCHAR UNIQUE, label INTEGER,
        real_labels INTEGER[], valid BOOLEAN)""",
    """CREATE TABLE IF NOT EXISTS models (
        model VARCHAR PRIMARY KEY, source VARCHAR, arch VARCHAR, tag VARCHAR, loss VARCHAR,
        num_classes INTEGER, preprocess JSON, weights_file VARCHAR, logits_file VARCHAR,
        probs_file VARCHAR, run_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS predictions (
        model VARCHAR, image_index INTEGER, top1 INTEGER, top1_prob FLOAT,
        label_prob FLOAT, top_classes INTEGER[], top_probs FLOAT[],
        PRIMARY KEY (model, image_index))""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id VARCHAR, model VARCHAR, evaluation VARCHAR, metric VARCHAR,
        value DOUBLE, low DOUBLE, high DOUBLE, n INTEGER, params JSON)""",
    """CREATE TABLE IF NOT EXISTS label_issues (
        image_index INTEGER PRIMARY KEY, label_quality DOUBLE, is_label_issue BOOLEAN,
        suggested_label INTEGER, suggested_confidence DOUBLE, issue_kind VARCHAR,
        rank INTEGER, scores JSON, run_id VARCHAR)""",
    "CREATE SEQUENCE IF NOT EXISTS decision_seq START 1",
    """CREATE TABLE IF NOT EXISTS decisions (
        decision_id BIGINT PRIMARY KEY DEFAULT nextval('decision_seq'),
        image_index INTEGER, image_id VARCHAR, old_labels INTEGER[], new_labels INTEGER[],
        action VARCHAR, reviewer VARCHAR, decided_at TIMESTAMP, reason VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS bad_images (
        image_index INTEGER PRIMARY KEY, image_id VARCHAR, reason VARCHAR, run_id VARCHAR)""",
)


def default_db() -> Path:
    """Where ``audit`` keeps its workspace when ``--db`` is not given."""
    return Path("reports") / "audit.duckdb"


def arrays_dir(db: str | Path) -> Path:
    """The folder beside ``db`` that holds its probability matrices and shards."""
    p = Path(db)
    return p.with_name(p.name + ".arrays")


def _is_lock_error(e: Exception) -> bool:
    return "lock" in str(e).lower()


@contextlib.contextmanager
def connect(
    db: str | Path, *, read_only: bool = False, timeout: float = 30.0, create: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``db`` briefly, retrying while another process holds it.

    Raises
    ------
    StoreError
        The file is missing (and ``create`` is False), of a newer schema, or
        stays locked for ``timeout`` seconds.
    """
    path = Path(db)
    if not path.exists() and not create:
        raise StoreError(f"no audit workspace at {path}; run 'audit run DATASET --db {path}' first")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only and path.exists())
            break
        except duckdb.Error as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                what = "is locked by another process" if _is_lock_error(e) else f"cannot be opened ({e})"
                raise StoreError(f"workspace {path} {what}; try again when it finishes") from e
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.5)
    try:
        if create:
            init_db(con)
        else:
            _check_version(con, path)
        yield con
    finally:
        con.close()


def _check_version(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    try:
        row = fetch_one(con, "SELECT value FROM meta WHERE key = ?", ["schema_version"])
    except duckdb.CatalogException as e:
        raise StoreError(f"{path} is not an audit workspace (no meta table); pass the file 'audit run' made") from e
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, this audit reads up to {SCHEMA_VERSION}; upgrade audit")


def init_db(con: duckdb.DuckDBPyConnection) -> None:
    """Create any missing tables and stamp the schema version."""
    con.execute("BEGIN TRANSACTION")
    for stmt in SCHEMA:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO NOTHING", ["schema_version", str(SCHEMA_VERSION)])
    con.execute("COMMIT")
    _check_version(con, Path("?"))


def read_frame(db: str | Path, sql: str, params: Sequence[Any] = (), *, timeout: float = 30.0) -> pd.DataFrame:
    """Run one parameterised query and return a DataFrame."""
    with connect(db, read_only=True, timeout=timeout) as con:
        return con.execute(sql, list(params)).df()


@dataclass(frozen=True)
class Decision:
    """One review decision, as stored."""

    image_index: int
    new_labels: tuple[int, ...]  # the image's label set after this decision; () = excluded
    action: str  # one of ACTIONS
    reviewer: str
    reason: str = ""


# --------------------------------------------------------------------------- the current label set
#
# The review log is append-only and read as a stack per image: every decision other than
# ``undo`` pushes itself, every ``undo`` pops the newest decision still in effect. The
# current label set is the ``new_labels`` of the decision on top of the stack, or the given
# label when the stack is empty. That fold is written once, in SQL (:func:`current_sql`),
# and every reader (queries for the CLI and the dashboard, the export, the relabeled metric)
# and the writer (:func:`append_decision`, to find what an undo restores) go through it.
#
# The stack depth after each row is a +1/-1 walk (push / undo) held at zero: an undo on an
# empty stack (only logs written before undo was a stack hold those) pops nothing. A walk
# held at zero is the free walk minus its running minimum (when that is negative), which SQL
# window functions compute; the decision on top of a stack of depth D > 0 is the newest push
# that left depth D (any later push back to D would be newer, and going below D pops it).
# Undo rows store the label set they restored in ``new_labels``, for the history views; the
# fold reads only the pushes' ``new_labels``, so older logs fold by the same rule.

_PUSH_STEP = "CASE WHEN action = 'undo' THEN -1 ELSE 1 END"


def given_sql(image: str = "i") -> str:
    """SQL expression: the given label set of ``image`` (an alias of ``images``): ``[label]``, or ``[]`` without one."""
    return f"CASE WHEN {image}.label >= 0 THEN [{image}.label] ELSE []::INTEGER[] END"


def current_sql(name: str = "last", source: str = "decisions") -> str:
    """SQL text of the CTEs that fold the review log: ``<name>``, one row per image with a decision.

    Put it after ``WITH``. Columns of ``<name>``: ``image_index``; ``labels`` (INTEGER[],
    the current label set, the given one when every decision was undone; ``[]`` =
    excluded); ``reviewed`` (a decision is in effect); ``action``, ``decision_id`` and
    ``reviewer`` of the decision in effect (NULL when none); ``last_id`` (the newest row).
    Images without a row in ``source`` have their given label (:func:`current_labels_sql`).

    Parameters
    ----------
    name : str
        The CTE's name; helpers are named ``<name>_walk`` etc. Code-chosen identifiers only.
    source : str
        Table or CTE with the ``decisions`` columns image_index, decision_id, action,
        new_labels, reviewer (:func:`append_decision` folds one image's log plus the row it
        is about to add).
    """
    return f"""
    {name}_walk AS (
        SELECT image_index, decision_id, action, new_labels, reviewer,
               (walk - least(0, min(walk) OVER (PARTITION BY image_index ORDER BY decision_id)))::INTEGER AS depth
        FROM (SELECT image_index, decision_id, action, new_labels, reviewer,
                     sum({_PUSH_STEP}) OVER (PARTITION BY image_index ORDER BY decision_id) AS walk
              FROM {source})),
    {name}_end AS (
        SELECT image_index, arg_max(depth, decision_id) AS depth, max(decision_id) AS last_id
        FROM {name}_walk GROUP BY image_index),
    {name}_top AS (
        SELECT w.image_index, max(w.decision_id) AS top_id
        FROM {name}_walk w JOIN {name}_end e USING (image_index)
        WHERE w.action <> 'undo' AND e.depth > 0 AND w.depth = e.depth
        GROUP BY w.image_index),
    {name} AS (
        SELECT e.image_index, coalesce(w.new_labels, {given_sql("gi")}) AS labels, e.depth > 0 AS reviewed,
               w.action, w.decision_id, w.reviewer, e.last_id
        FROM {name}_end e
        JOIN images gi USING (image_index)
        LEFT JOIN {name}_top t USING (image_index)
        LEFT JOIN {name}_walk w ON w.decision_id = t.top_id AND w.image_index = e.image_index)
    """


def current_labels_sql(last: str = "l", image: str = "i") -> str:
    """SQL expression: the current label set of an image, given ``last`` (a LEFT JOINed :func:`current_sql`
    CTE) and ``image`` (an alias of ``images``, or of a table with its ``label`` column)."""
    return f"coalesce({last}.labels, {given_sql(image)})"


@dataclass(frozen=True)
class LabelState:
    """Where one image stands in review (the fold of its log, :func:`current_sql`)."""

    image_index: int
    image_id: str
    given: tuple[int, ...]  # the label set the dataset gave it
    labels: tuple[int, ...]  # the current label set; () = excluded
    reviewed: bool  # a decision is in effect (False: never reviewed, or every decision undone)
    decision_id: int | None  # the decision in effect


def _fold(con: duckdb.DuckDBPyConnection, image_index: int, extra_action: str | None = None) -> LabelState:
    """The state of one image from its log, plus one hypothetical row of ``extra_action`` when given."""
    row = fetch_one(con, "SELECT label, image_id FROM images WHERE image_index = ?", [image_index])
    if row is None:
        raise ReviewError(f"image index {image_index} is not in this workspace; see 'audit issues' for indices")
    given = (int(row[0]),) if row[0] is not None and row[0] >= 0 else ()
    src = (
        "src AS (SELECT image_index, decision_id, action, new_labels, reviewer FROM decisions WHERE image_index = ?"
        " UNION ALL SELECT ?::INTEGER, ?::BIGINT, ?::VARCHAR, NULL::INTEGER[], NULL::VARCHAR WHERE ?)"
    )
    got = fetch_one(
        con,
        f"WITH {src}, {current_sql('cur', 'src')} SELECT labels, reviewed, decision_id FROM cur",
        # The hypothetical row sorts after every stored one (ids come from a sequence).
        [image_index, image_index, 2**62, extra_action or "", extra_action is not None],
    )
    if got is None:
        return LabelState(image_index, str(row[1]), given, given, False, None)
    return LabelState(
        image_index, str(row[1]), given, tuple(int(x) for x in got[0]), bool(got[1]),
        None if got[2] is None else int(got[2]),
    )


def label_state(db: str | Path, image_index: int, *, timeout: float = 30.0) -> LabelState:
    """The current label set of one image and whether a decision is in effect."""
    with connect(db, read_only=True, timeout=timeout) as con:
        return _fold(con, int(image_index))


# How many distinct labels each action takes (undo, keep and no_fit take none).
_ARITY = {"accept": (1, 1), "relabel": (1, 1), "multi": (2, 1000), "no_fit": (0, 0), "keep": (0, 0), "undo": (0, 0)}


def append_decision(
    db: str | Path,
    image_index: int,
    action: str,
    *,
    labels: Sequence[int] = (),
    reviewer: str | None = None,
    reason: str = "",
    timeout: float = 30.0,
) -> int:
    """Append one review decision in its own transaction; return its id.

    Parameters
    ----------
    action : str
        One of :data:`ACTIONS`. ``accept`` / ``relabel`` take one label in
        ``labels``; ``multi`` takes two or more; ``no_fit``, ``keep`` and
        ``undo`` take none. ``undo`` withdraws the newest decision still in
        effect on the image, so repeated undos walk back to the given label;
        it is appended as a row of its own (the log is never rewritten), and an
        undone decision is not redone by anything but deciding it again.

    Raises
    ------
    ReviewError
        Unknown action, wrong number of labels, labels outside the label space,
        an image index not in the workspace, or an undo with nothing to undo.
    """
    if action not in ACTIONS:
        raise ReviewError(f"unknown review action {action!r}; use one of {', '.join(ACTIONS)}")
    labels = [int(x) for x in labels]
    lo, hi = _ARITY[action]
    if not lo <= len(set(labels)) <= hi:
        raise ReviewError(f"action {action!r} takes {lo}..{hi} distinct labels, got {labels}")
    who = reviewer or getpass.getuser()
    with connect(db, timeout=timeout) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            before = _fold(con, image_index)
            n_classes = fetch_one(con, "SELECT count(*) FROM classes")[0]
            if any(not 0 <= x < n_classes for x in labels):
                raise ReviewError(f"labels {labels} are outside the {n_classes} classes of this workspace")
            if action == "undo":
                if not before.reviewed:
                    raise ReviewError(
                        f"nothing to undo on image {image_index}: no decision on it is in effect "
                        "(it has its given label); record a decision instead"
                    )
                new = list(_fold(con, image_index, "undo").labels)
            else:
                new = {
                    "accept": labels,
                    "relabel": labels,
                    "multi": sorted(set(labels)),
                    "no_fit": [],
                    "keep": list(before.given),
                }[action]
            row = fetch_one(
                con,
                "INSERT INTO decisions (image_index, image_id, old_labels, new_labels, action, reviewer, "
                "decided_at, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING decision_id",
                [image_index, before.image_id, list(before.labels), new, action, who, now(), reason],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return int(row[0])


def decision_history(db: str | Path, image_index: int) -> pd.DataFrame:
    """Every decision on one image, oldest first (undo rows carry the label set they restored)."""
    return read_frame(
        db,
        "SELECT decision_id, action, old_labels, new_labels, reviewer, decided_at, reason "
        "FROM decisions WHERE image_index = ? ORDER BY decision_id",
        [image_index],
    )


def current_label_sets(con: duckdb.DuckDBPyConnection) -> tuple[list[list[int]], np.ndarray]:
    """Current label set of every image (the fold of the review log, :func:`current_sql`).

    Returns
    -------
    label_sets : list of list of int, length N, in image_index order; empty = excluded
    decided : ndarray of bool, shape (N,), True where a decision is in effect
    """
    rows = con.execute(
        f"""
        WITH {current_sql("l")}
        SELECT {current_labels_sql("l", "i")} AS labels, coalesce(l.reviewed, false) AS reviewed
        FROM images i LEFT JOIN l USING (image_index)
        ORDER BY i.image_index
        """
    ).fetchall()
    return [[int(x) for x in r[0]] for r in rows], np.array([bool(r[1]) for r in rows], dtype=bool)


def now() -> datetime:
    """UTC now without tzinfo, as DuckDB TIMESTAMP columns store it."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> Any:
    """First row of a query or None, with the result fully consumed.

    DuckDB 2 keeps a result open after ``fetchone()`` and refuses some later
    calls on the connection, so always fetch to the end.
    """
    rows = con.execute(sql, list(params or [])).fetchall()
    return rows[0] if rows else None


@contextlib.contextmanager
def workspace_lock(db: str | Path) -> Iterator[None]:
    """Hold the workspace's run lock (an OS file lock, released even on kill -9).

    Raises
    ------
    StoreError
        Another live process holds it.
    """
    import errno
    import fcntl
    import os

    d = arrays_dir(db)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            # POSIX record lock, not flock: DataLoader workers forked from a run must not
            # inherit it, or a run killed with -9 keeps its workspace locked until they exit.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise StoreError(
                f"another audit run (pid {holder}) is writing workspace {db}; wait for it or pass another --db"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def mark_interrupted_runs(db: str | Path) -> int:
    """Mark runs left ``running`` by a dead process as ``interrupted``; call with the run lock held."""
    if not Path(db).exists():
        return 0
    with connect(db) as con:
        rows = con.execute(
            "UPDATE runs SET status = ? WHERE status = ? RETURNING run_id", ["interrupted", "running"]
        ).fetchall()
    return len(rows)
