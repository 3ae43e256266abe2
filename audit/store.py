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

Schema version 2 (see :data:`SCHEMA`); newer files are refused, never guessed at.

Versions. Version 2 adds the checks' long ``issues`` table and their ``checks``
table (:mod:`audit.checks`); ``label_issues`` stays, as the label check's detail
table. A version-1 workspace migrates in place on the first connection that may
write (one transaction: the new tables, filled from ``label_issues``, and the new
version stamp, or nothing); a read-only connection leaves the file as it is and
sees the same rows through temporary views of the same SQL (:data:`_V1_ISSUES`),
so a dashboard opened on an old workspace reads what a migration would write.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import glob
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from audit.errors import DISK_ERRNOS, ReviewError, StoreError, UserError, disk_error, is_disk_error

__all__ = [
    "ACTIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Decision",
    "DecisionRequest",
    "LabelState",
    "append_decision",
    "append_decisions",
    "arrays_dir",
    "check_workspace",
    "connect",
    "current_label_sets",
    "current_labels_sql",
    "current_sql",
    "decision_history",
    "default_db",
    "duplicate_reason",
    "fetch_one",
    "given_sql",
    "init_db",
    "insert_frame",
    "is_new_workspace",
    "label_state",
    "mark_interrupted_runs",
    "meta_value",
    "read_frame",
    "transaction",
    "workspace_lock",
    "workspace_path",
]

SCHEMA_VERSION = 2
_log = logging.getLogger(__name__)

# Append-only review actions and what each does to an image's label set.
ACTIONS = {
    "accept": "take the suggested label",
    "relabel": "replace the label with another single class",
    "multi": "several classes are valid",
    "no_fit": "no class fits; leave the image out of evaluation",
    "keep": "the original label is right",
    "duplicate": "a copy of another image (of the set, or of the reference set); leave it out of evaluation",
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
    # One row per image per check of the newest run (audit.checks): score in [0, 1], low = suspicious, NULL =
    # not assessed; suggestion a label or a partner image index (-1 none, NULL: the check suggests nothing);
    # info the check's JSON details for the image. "check" is an SQL keyword, hence the quotes.
    """CREATE TABLE IF NOT EXISTS issues (
        run_id VARCHAR, "check" VARCHAR, image_index INTEGER, score DOUBLE, is_issue BOOLEAN,
        suggestion INTEGER, info JSON, PRIMARY KEY ("check", image_index))""",
    # One row per check selected by the newest run: its settings, and what it found (or why it was skipped).
    """CREATE TABLE IF NOT EXISTS checks (
        run_id VARCHAR, "check" VARCHAR PRIMARY KEY, params JSON, summary JSON)""",
)
# The schema version that added each table; older workspaces lack them until they migrate.
_TABLE_SINCE = {"issues": 2, "checks": 2}

# The label check's rows of a version-1 workspace, from its label_issues table: what the migration
# writes, and what a read-only connection to an unmigrated workspace reads (audit.checks.label writes
# the same info keys). NaN scores inside the old JSON become null, as the label check writes them.
_V1_ISSUES = r"""
    SELECT run_id, 'label' AS "check", image_index,
           CASE WHEN isnan(label_quality) THEN NULL ELSE label_quality END AS score,
           coalesce(is_label_issue, false) AS is_issue, suggested_label AS suggestion,
           json_object(
               'issue_kind', coalesce(issue_kind, ''),
               'suggested_confidence', CASE WHEN isnan(suggested_confidence) THEN NULL ELSE suggested_confidence END,
               'rank', rank,
               'scores', CAST(regexp_replace(CAST(scores AS VARCHAR), ':\s*-?NaN', ':null', 'g') AS JSON)
           ) AS info
    FROM label_issues"""
_V1_CHECKS = """
    SELECT li.run_id, 'label' AS "check", coalesce(r.params -> 'flag', '{}'::JSON) AS params,
           json_object('n_issues', li.n_issues, 'n_assessed', li.n_assessed, 'n_images', li.n_images,
                       'migrated_from_schema', 1) AS summary
    FROM (SELECT any_value(run_id) AS run_id, count(*) AS n_images,
                 count(*) FILTER (WHERE is_label_issue) AS n_issues,
                 count(*) FILTER (WHERE label_quality IS NOT NULL AND NOT isnan(label_quality)) AS n_assessed
          FROM label_issues HAVING count(*) > 0) li
    LEFT JOIN runs r USING (run_id)"""


def default_db() -> Path:
    """Where ``audit`` keeps its workspace when ``--db`` is not given."""
    return Path("reports") / "audit.duckdb"


def workspace_path(db: str | Path) -> Path:
    """The one spelling of workspace ``db``: absolute, ``~`` expanded, every symbolic link resolved.

    Every path of a workspace (the DuckDB file, its WAL, the arrays folder, the
    run lock, the paths recorded inside it) derives from this, so a workspace
    reached as ``ws.duckdb``, ``./x/../ws.duckdb``, through a symbolic link to
    the file or to its folder, is one workspace with one lock.
    """
    return Path(os.path.realpath(Path(db).expanduser()))


def arrays_dir(db: str | Path) -> Path:
    """The folder beside ``db`` that holds its probability matrices and shards."""
    p = workspace_path(db)
    return p.with_name(p.name + ".arrays")


# DuckDB's own words when another process holds the file (duckdb 1.x and 2.x); a
# path that merely contains "lock" must not read as one.
_LOCK_CONFLICT = re.compile(r'Could not set lock on file ".*": Conflicting lock is held', re.S)
# Temporaries of an atomic creation: ".<name>.building-<pid>-<random>".
_BUILDING = ".{name}.building-"


def _is_lock_error(e: Exception) -> bool:
    return isinstance(e, duckdb.IOException) and _LOCK_CONFLICT.search(str(e)) is not None


def check_workspace(db: str | Path, *, create: bool = False) -> Path:
    """Check that ``db`` can name a workspace before anything is written; return :func:`workspace_path`.

    Raises
    ------
    StoreError
        ``db`` is a folder, its arrays folder is a file, or (``create`` False) nothing is there.
    """
    path = workspace_path(db)
    if path.is_dir():
        raise StoreError(f"--db {db} is a folder; name a workspace file, e.g. --db {Path(db) / 'audit.duckdb'}")
    arrays = arrays_dir(path)
    if arrays.exists() and not arrays.is_dir():
        raise StoreError(f"{arrays} is a file, where workspace {path} keeps its arrays; move it or pass another --db")
    if not create and not path.exists():
        raise StoreError(f"no audit workspace at {path}; run 'audit run DATASET --db {db}' first")
    return path


def is_new_workspace(db: str | Path) -> bool:
    """True when ``db`` holds nothing yet: no file, an empty file, or a DuckDB database without tables.

    The last two are what a first ``audit run`` killed at its start left behind
    before creation became atomic; ``audit run`` builds them afresh.
    """
    path = check_workspace(db, create=True)
    if not path.exists() or path.stat().st_size == 0:
        return True
    with _open(path, read_only=True, timeout=30.0) as con:
        return not _columns(con)


@contextlib.contextmanager
def connect(
    db: str | Path, *, read_only: bool = False, timeout: float = 30.0, create: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``db`` briefly, retrying while another process holds it.

    With ``create`` a missing workspace is built atomically (under a temporary
    name beside it, then linked into place), so no command ever finds half a
    workspace; an empty file or table-less database left by an older, killed
    creation is rebuilt.

    Raises
    ------
    StoreError
        The file is missing (and ``create`` is False), not an audit workspace,
        of a newer schema, or stays locked for ``timeout`` seconds.
    DiskError
        The machine refused a write (full disk, read-only file system, permissions).
    """
    path = check_workspace(db, create=create)
    if create:
        _create(path)
    elif path.stat().st_size == 0:
        raise StoreError(
            f"{path} is an empty file, not an audit workspace (an 'audit run' killed as it started leaves one); "
            f"run 'audit run DATASET --db {db}' to build it"
        )
    with _open(path, read_only=read_only, timeout=timeout) as con:
        try:
            if create:
                _check_schema(con, path, complete=False)
            if not read_only:
                _migrate(con, path)  # the first connection that may write brings an older workspace up to date
            if create:
                init_db(con)
            version = _check_schema(con, path, complete=True)
            if version < SCHEMA_VERSION:
                _compat_views(con, version)  # read-only on an older workspace: its rows in today's shape
            yield con
        except duckdb.Error as e:
            if is_disk_error(e):
                raise disk_error(e, f"writing workspace {path}") from e
            raise


@contextlib.contextmanager
def _open(path: Path, *, read_only: bool, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only and path.exists())
            break
        except duckdb.Error as e:
            if not _is_lock_error(e):
                raise _open_error(e, path) from e
            if time.monotonic() > deadline:
                raise StoreError(
                    f"workspace {path} is locked by another process; try again when it finishes"
                ) from e
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.5)
    try:
        yield con
    finally:
        con.close()


def _open_error(e: duckdb.Error, path: Path) -> UserError:
    text = str(e)
    if "not a valid DuckDB database file" in text:
        return StoreError(
            f"{path} is not a DuckDB file, so not an audit workspace; pass the file 'audit run' made, "
            "or a new --db path"
        )
    if is_disk_error(e):
        return disk_error(e, f"opening workspace {path}")
    return StoreError(f"workspace {path} cannot be opened ({text}); check the file, or pass another --db path")


def _create(path: Path) -> None:
    """Build a workspace at ``path`` unless one is there: schema in a temporary beside it, then linked in."""
    if path.exists() and path.stat().st_size > 0:
        # A database: the caller checks it, and init_db completes it in place in one transaction
        # (a table-less one, left by an older killed creation, holds nothing to lose).
        return
    replace = path.exists()  # an empty file, left by an older creation killed as it started
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, f"creating the folder of workspace {path}") from e
    _sweep_builds(path)
    tmp = path.with_name(f"{_BUILDING.format(name=path.name)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            con = duckdb.connect(str(tmp))
            try:
                init_db(con)
            finally:
                con.close()
        except duckdb.Error as e:
            raise _open_error(e, path) from e
        # A WAL beside a missing or empty file belongs to no database: DuckDB would replay it into ours.
        Path(f"{path}.wal").unlink(missing_ok=True)
        if replace:  # an empty file left by an older, killed creation
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # never replaces a workspace another process has just made
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno in DISK_ERRNOS:
                    raise
                os.replace(tmp, path)  # no hard links on this file system
    except OSError as e:
        raise disk_error(e, f"creating workspace {path}") from e
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)


def _sweep_builds(path: Path) -> None:
    """Remove temporaries of creations whose process died (kill -9 mid-way)."""
    prefix = _BUILDING.format(name=path.name)
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    """Each table of the main schema with its ``(column, type)`` list, in column order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for table, col, typ in con.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = ? ORDER BY table_name, column_index",
        ["main"],
    ).fetchall():
        out.setdefault(table, []).append((col, typ))
    return out


@functools.cache
def _expected_columns() -> dict[str, list[tuple[str, str]]]:
    # Read back from DuckDB itself, so the check can never disagree with SCHEMA.
    con = duckdb.connect(":memory:")
    try:
        for stmt in SCHEMA:
            con.execute(stmt)
        return _columns(con)
    finally:
        con.close()


def _check_schema(con: duckdb.DuckDBPyConnection, path: Path, *, complete: bool) -> int:
    """Refuse a file that is not an audit workspace of a version this audit reads; return its version.

    Another application's DuckDB file may hold tables named like ours (``meta``,
    ``images``) with other columns: each of our tables it has must have our
    columns, and ``meta`` must stamp a numeric schema version. With
    ``complete``, every table of that version must be there. A table-less
    database (which ``init_db`` builds) reads as version 0.
    """
    have = _columns(con)
    expected = _expected_columns()
    not_ours = f"{path} is not an audit workspace"
    fix = "pass the file 'audit run' made, or a new --db path"
    if not have:
        if not complete:
            return 0  # table-less: init_db builds it
        raise StoreError(
            f"{path} is an empty DuckDB database, not an audit workspace yet (an 'audit run' killed as it "
            f"started leaves one); run 'audit run DATASET --db {path}' to build it"
        )
    if "meta" not in have:
        raise StoreError(f"{not_ours} (no meta table); {fix}")
    for table, cols in expected.items():
        if table in have and have[table] != cols:
            got = ", ".join(f"{c} {t}" for c, t in have[table])
            raise StoreError(f"{not_ours}: its table {table} has columns ({got}), not audit's; {fix}")
    row = fetch_one(con, "SELECT value FROM meta WHERE key = ?", ["schema_version"])
    if row is None:
        raise StoreError(f"{not_ours} (its meta table has no schema_version); {fix}")
    text = str(row[0]).strip()
    if not text.isascii() or not text.isdigit():
        raise StoreError(
            f"{path} has schema_version {row[0]!r}, not a number: the file is damaged or was not made by audit; {fix}"
        )
    version = int(text)
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {text}, this audit reads up to {SCHEMA_VERSION}; upgrade audit")
    missing = sorted(t for t in set(expected) - set(have) if _TABLE_SINCE.get(t, 1) <= version)
    if complete and missing:
        raise StoreError(
            f"{path} lacks table(s) {', '.join(missing)}; run 'audit run --db {path}' to complete the workspace"
        )
    return version


def _stamped_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The schema version ``meta`` stamps, or None (no meta table, no stamp, not a number: _check_schema says)."""
    try:
        row = fetch_one(con, "SELECT value FROM meta WHERE key = ?", ["schema_version"])
    except duckdb.Error:  # no meta table, or one of other columns: _check_schema has refused those already
        return None
    text = str(row[0]).strip() if row else ""
    return int(text) if text.isascii() and text.isdigit() else None


def _v1_to_v2(con: duckdb.DuckDBPyConnection) -> None:
    """Version 2: the checks' tables, the label check's rows and settings taken from ``label_issues``."""
    for stmt in SCHEMA:  # every table of version 2; those there already are left as they are
        con.execute(stmt)
    con.execute(f'INSERT INTO issues (run_id, "check", image_index, score, is_issue, suggestion, info) {_V1_ISSUES}')
    con.execute(f'INSERT INTO checks (run_id, "check", params, summary) {_V1_CHECKS}')


# Each step brings a workspace from the version it names to the next one, inside the caller's transaction.
_MIGRATIONS = {1: _v1_to_v2}
# Each older version's tables as today's schema shapes them, for a read-only connection (temporary views).
_COMPAT_VIEWS = {1: {"issues": _V1_ISSUES, "checks": _V1_CHECKS}}


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Bring an older workspace to :data:`SCHEMA_VERSION` in one transaction (nothing is lost, or nothing changes)."""
    # Refused first: another application's file, a damaged stamp, a newer version; table-less reads as 0.
    version = _check_schema(con, path, complete=False)
    if version == 0 or version >= SCHEMA_VERSION:
        return
    _check_schema(con, path, complete=True)  # an older audit workspace, whole, before it is changed
    with transaction(con):
        stamped = _stamped_version(con)  # another process may have migrated it meanwhile
        version = SCHEMA_VERSION if stamped is None else stamped
        while version < SCHEMA_VERSION:
            _MIGRATIONS[version](con)
            version += 1
        con.execute("UPDATE meta SET value = ? WHERE key = ?", [str(SCHEMA_VERSION), "schema_version"])
    _log.info("workspace %s migrated to schema version %d", path, SCHEMA_VERSION)


def _compat_views(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Temporary views (this connection only, nothing written) of the tables ``version`` lacks."""
    for table, sql in _COMPAT_VIEWS.get(version, {}).items():
        con.execute(f"CREATE TEMP VIEW {table} AS {sql}")


def init_db(con: duckdb.DuckDBPyConnection) -> None:
    """Create any missing tables and stamp the schema version, in one transaction."""
    with transaction(con):
        for stmt in SCHEMA:
            con.execute(stmt)
        con.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO NOTHING", ["schema_version", str(SCHEMA_VERSION)]
        )


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
    got = _fold_many(con, [int(image_index)], extra_action).get(int(image_index))
    if got is None:
        raise ReviewError(f"image index {image_index} is not in this workspace; see 'audit issues' for indices")
    return got


def label_state(db: str | Path, image_index: int, *, timeout: float = 30.0) -> LabelState:
    """The current label set of one image and whether a decision is in effect."""
    with connect(db, read_only=True, timeout=timeout) as con:
        return _fold(con, int(image_index))


# How many distinct labels each action takes (undo, keep, no_fit and duplicate take none).
_ARITY = {
    "accept": (1, 1),
    "relabel": (1, 1),
    "multi": (2, 1000),
    "no_fit": (0, 0),
    "keep": (0, 0),
    "duplicate": (0, 0),
    "undo": (0, 0),
}


@dataclass(frozen=True)
class DecisionRequest:
    """One decision to append (:func:`append_decisions`): what :func:`append_decision` takes, as a value.

    ``duplicate`` names the image the copy duplicates: ``of`` (an image index of this workspace) or
    ``of_reference`` (an image id of the reference set, ``audit run --reference``); no other action takes either.
    """

    image_index: int
    action: str
    labels: tuple[int, ...] = ()
    of: int | None = None
    of_reference: str | None = None


def duplicate_reason(of_id: str, *, reference: bool = False, note: str = "") -> str:
    """The reason a ``duplicate`` decision stores, which the export writes: ``duplicate of <image id>``.

    ``reference``: the original is an image of the reference set. A reviewer's ``note`` follows after ``; ``.
    The ids are data (file names): every writer of this text (the CSV export, the dashboard) treats it as such.
    """
    head = f"duplicate of reference image {of_id}" if reference else f"duplicate of {of_id}"
    return f"{head}; {note}" if note else head


def _checked(req: DecisionRequest) -> DecisionRequest:
    """``req`` with its labels as ints, or :class:`ReviewError` for a mistake visible without the workspace."""
    action = req.action
    if action not in ACTIONS:
        raise ReviewError(f"unknown review action {action!r}; use one of {', '.join(ACTIONS)}")
    labels = tuple(int(x) for x in req.labels)
    lo, hi = _ARITY[action]
    if not lo <= len(set(labels)) <= hi:
        raise ReviewError(f"action {action!r} takes {lo}..{hi} distinct labels, got {list(labels)}")
    has_of = req.of is not None or req.of_reference is not None
    if action == "duplicate":
        if (req.of is None) == (req.of_reference is None):
            raise ReviewError(
                "action 'duplicate' needs the image it copies: --of IMAGE (an image index of this workspace)"
            )
        if req.of is not None and int(req.of) == int(req.image_index):
            raise ReviewError(f"image {req.image_index} cannot be a duplicate of itself; name another image with --of")
        if req.of_reference is not None and not str(req.of_reference):
            raise ReviewError("action 'duplicate': the reference image id is empty; name the reference image")
    elif has_of:
        raise ReviewError(f"only action 'duplicate' names the image it copies (--of); {action!r} takes none")
    return DecisionRequest(
        int(req.image_index), action, labels, None if req.of is None else int(req.of), req.of_reference
    )


def append_decision(
    db: str | Path,
    image_index: int,
    action: str,
    *,
    labels: Sequence[int] = (),
    reviewer: str | None = None,
    reason: str = "",
    of: int | None = None,
    of_reference: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Append one review decision in its own transaction; return its id.

    Parameters
    ----------
    action : str
        One of :data:`ACTIONS`. ``accept`` / ``relabel`` take one label in
        ``labels``; ``multi`` takes two or more; ``no_fit``, ``keep``,
        ``duplicate`` and ``undo`` take none. ``undo`` withdraws the newest decision still in
        effect on the image, so repeated undos walk back to the given label;
        it is appended as a row of its own (the log is never rewritten), and an
        undone decision is not redone by anything but deciding it again.
    of, of_reference
        ``duplicate`` only, exactly one of them: the image this one copies, an image index of the
        workspace (``of``) or an image id of the reference set (``of_reference``). The decision
        excludes the image (label set ``[]``, as ``no_fit``) and stores :func:`duplicate_reason`
        as its reason, the reviewer's ``reason`` after it.

    Raises
    ------
    ReviewError
        Unknown action, wrong number of labels, labels outside the label space,
        an image index not in the workspace, an undo with nothing to undo, or a
        ``duplicate`` without (or a non-``duplicate`` with) the image it copies.
    """
    req = DecisionRequest(int(image_index), action, tuple(labels), of, of_reference)
    return append_decisions(db, [req], reviewer=reviewer, reason=reason, timeout=timeout)[0]


def append_decisions(
    db: str | Path,
    requests: Sequence[DecisionRequest],
    *,
    reviewer: str | None = None,
    reason: str = "",
    timeout: float = 30.0,
) -> list[int]:
    """Append several decisions in one transaction: all of them, or (on any error) none; return their ids.

    Each is checked and folded as :func:`append_decision` does one, against the log as the
    decisions before it in ``requests`` left it (an ``undo`` after a decision on the same image
    withdraws that decision); ids are returned in the order of ``requests``, and each image's
    rows are appended in that order. Every row carries the same reviewer and time. This is how a
    duplicate group is resolved in one step (:mod:`audit.duplicates_view`).

    Speed: the rows are folded and written in rounds (the first request on each image, then the
    second, ...), each one query through the fold and one insert, so a group of thousands of
    images costs a few queries, not thousands.

    Raises
    ------
    ReviewError
        As :func:`append_decision`, for any of the requests; nothing is written then.
    """
    reqs = [_checked(r) for r in requests]  # every mistake visible without the workspace, before it is opened
    if not reqs:
        return []
    who = reviewer or getpass.getuser()
    at = now()
    seen: dict[int, int] = {}
    rounds: list[list[int]] = []  # positions in reqs, round by round: at most one request per image in each
    for pos, r in enumerate(reqs):
        k = seen.get(r.image_index, 0)
        seen[r.image_index] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(pos)
    ids: list[int] = [0] * len(reqs)
    with connect(db, timeout=timeout) as con, transaction(con):
        n_classes = fetch_one(con, "SELECT count(*) FROM classes")[0]
        others = sorted({r.of for r in reqs if r.of is not None})
        of_ids = dict(
            con.execute("SELECT image_index, image_id FROM images WHERE list_contains(?, image_index)", [others])
        .fetchall()) if others else {}
        for r in reqs:
            if r.of is not None and r.of not in of_ids:
                raise ReviewError(f"--of {r.of}: image index {r.of} is not in this workspace; see 'audit issues'")
            if any(not 0 <= x < n_classes for x in r.labels):
                raise ReviewError(f"labels {list(r.labels)} are outside the {n_classes} classes of this workspace")
        for positions in rounds:
            batch = [reqs[p] for p in positions]
            states = _fold_many(con, [r.image_index for r in batch])
            missing = [r.image_index for r in batch if r.image_index not in states]
            if missing:
                raise ReviewError(
                    f"image index {missing[0]} is not in this workspace; see 'audit issues' for indices"
                )
            undos = [r.image_index for r in batch if r.action == "undo"]
            undone = _fold_many(con, undos, "undo") if undos else {}
            rows = []
            for r in batch:
                before = states[r.image_index]
                note = reason
                if r.action == "undo":
                    if not before.reviewed:
                        raise ReviewError(
                            f"nothing to undo on image {r.image_index}: no decision on it is in effect "
                            "(it has its given label); record a decision instead"
                        )
                    new = list(undone[r.image_index].labels)
                else:
                    new = {
                        "accept": list(r.labels),
                        "relabel": list(r.labels),
                        "multi": sorted(set(r.labels)),
                        "no_fit": [],
                        "duplicate": [],
                        "keep": list(before.given),
                    }[r.action]
                if r.action == "duplicate":
                    of_id = of_ids[r.of] if r.of is not None else str(r.of_reference)
                    note = duplicate_reason(str(of_id), reference=r.of is None, note=reason)
                rows.append((r.image_index, before.image_id, list(before.labels), new, r.action, note))
            got = _insert_decisions(con, rows, who, at)
            for p, r in zip(positions, batch, strict=True):
                ids[p] = got[r.image_index]
    return ids


def _insert_decisions(
    con: duckdb.DuckDBPyConnection,
    rows: Sequence[tuple[int, str, list[int], list[int], str, str]],
    reviewer: str,
    at: datetime,
) -> dict[int, int]:
    """Append rows (image_index, image_id, old_labels, new_labels, action, reason), at most one per image.

    Returns each image's new decision id.
    """
    import pyarrow as pa

    table = pa.table(
        {
            "image_index": pa.array([r[0] for r in rows], pa.int32()),
            "image_id": pa.array([r[1] for r in rows], pa.string()),
            "old_labels": pa.array([r[2] for r in rows], pa.list_(pa.int32())),
            "new_labels": pa.array([r[3] for r in rows], pa.list_(pa.int32())),
            "action": pa.array([r[4] for r in rows], pa.string()),
            "reason": pa.array([r[5] for r in rows], pa.string()),
        }
    )
    view = f"_decisions_{uuid.uuid4().hex[:8]}"
    con.register(view, table)
    try:
        # Identifiers cannot be parameters: the view's name is made here.
        got = con.execute(
            "INSERT INTO decisions (image_index, image_id, old_labels, new_labels, action, reviewer, decided_at, "
            f'reason) SELECT image_index, image_id, old_labels, new_labels, action, ?, ?, reason FROM "{view}" '
            "RETURNING image_index, decision_id",
            [reviewer, at],
        ).fetchall()
    finally:
        con.unregister(view)
    return {int(i): int(d) for i, d in got}


def _fold_many(
    con: duckdb.DuckDBPyConnection, images: Sequence[int], extra_action: str | None = None
) -> dict[int, LabelState]:
    """The state of each image from its log (plus one hypothetical row of ``extra_action`` each, when given),
    by the one fold (:func:`current_sql`) in one query; images not in the workspace are absent from the result."""
    rows = con.execute(
        f"""
        WITH src AS (
            SELECT image_index, decision_id, action, new_labels, reviewer FROM decisions
            WHERE list_contains($images, image_index)
            -- The hypothetical rows sort after every stored one (ids come from a sequence).
            UNION ALL SELECT unnest($images)::INTEGER, (2::BIGINT << 61), $extra::VARCHAR, NULL::INTEGER[],
                             NULL::VARCHAR WHERE $hypothetical),
        {current_sql("cur", "src")}
        SELECT i.image_index, i.image_id, i.label, cur.labels, coalesce(cur.reviewed, false), cur.decision_id
        FROM images i LEFT JOIN cur USING (image_index)
        WHERE list_contains($images, i.image_index)
        """,
        {"images": [int(x) for x in images], "extra": extra_action or "", "hypothetical": extra_action is not None},
    ).fetchall()
    out = {}
    for idx, image_id, label, labels, reviewed, decision in rows:
        given = (int(label),) if label is not None and label >= 0 else ()
        out[int(idx)] = LabelState(
            int(idx), str(image_id), given, given if labels is None else tuple(int(x) for x in labels),
            bool(reviewed), None if decision is None else int(decision),
        )
    return out


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


def meta_value(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    """The workspace's ``meta`` value for ``key`` (dataset_root, label_space, ...), None when it is not set."""
    row = fetch_one(con, "SELECT value FROM meta WHERE key = ?", [key])
    return None if row is None else row[0]


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> Any:
    """First row of a query or None, with the result fully consumed.

    DuckDB 2 keeps a result open after ``fetchone()`` and refuses some later
    calls on the connection, so always fetch to the end.
    """
    rows = con.execute(sql, list(params or [])).fetchall()
    return rows[0] if rows else None


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN`` ... ``COMMIT``, rolled back on any exception, the exception kept.

    A failed ``COMMIT`` (a full disk) has already ended the transaction in
    DuckDB, so the rollback that follows must not replace its error with
    "no transaction is active".
    """
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        _commit(con)
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise


def _commit(con: duckdb.DuckDBPyConnection) -> None:
    # One name for the commit, so that tests can inject a failed one.
    con.execute("COMMIT")


def insert_frame(con: duckdb.DuckDBPyConnection, table: str, df: pd.DataFrame) -> int:
    """Append the rows of ``df`` to workspace ``table``, columns matched by name; return the row count.

    An empty frame writes nothing (DuckDB cannot even register a frame without
    columns, which is what an empty list of rows makes), so every write of a
    possibly-empty result goes through here.
    """
    cols = dict(_expected_columns()).get(table)
    if cols is None:
        raise ValueError(f"{table!r} is not a workspace table")
    if df.empty:
        return 0
    names = [str(c) for c in df.columns]
    unknown = sorted(set(names) - {c for c, _ in cols})
    if unknown:
        raise ValueError(f"columns {unknown} are not in table {table}")
    view = f"_insert_{table}_{uuid.uuid4().hex[:8]}"
    # Identifiers cannot be parameters: table and columns are checked against SCHEMA above.
    col_sql = ", ".join(f'"{c}"' for c in names)
    con.register(view, df)
    try:
        con.execute(f'INSERT INTO "{table}" ({col_sql}) SELECT {col_sql} FROM "{view}"')
    finally:
        con.unregister(view)
    return len(df)


@contextlib.contextmanager
def workspace_lock(db: str | Path) -> Iterator[None]:
    """Hold the workspace's run lock (an OS file lock, released even on kill -9).

    One lock per workspace however it is spelled (:func:`workspace_path`).

    Raises
    ------
    StoreError
        Another live process holds it, or ``db`` cannot name a workspace.
    DiskError
        The arrays folder or the lock file cannot be created there.
    """
    import errno
    import fcntl

    path = check_workspace(db, create=True)
    d = arrays_dir(path)
    lock = d / "run.lock"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # whatever the reason, the workspace cannot be made here
        raise disk_error(e, f"creating workspace {path}") from e
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
                f"another audit run (pid {holder}) is writing workspace {path}; wait for it or pass another --db"
            ) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            if e.errno in DISK_ERRNOS:
                raise disk_error(e, f"writing the run lock of workspace {path}") from e
            raise
        yield
    finally:
        os.close(fd)


def mark_interrupted_runs(db: str | Path) -> int:
    """Mark runs left ``running`` by a dead process as ``interrupted``; call with the run lock held."""
    if is_new_workspace(db):
        return 0
    with connect(db) as con:
        rows = con.execute(
            "UPDATE runs SET status = ? WHERE status = ? RETURNING run_id", ["interrupted", "running"]
        ).fetchall()
    return len(rows)
