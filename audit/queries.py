"""Read-side queries over a workspace, shared by the CLI and the dashboard.

Each function opens the workspace briefly (see :mod:`audit.store`), runs
parameterised SQL in DuckDB and returns a small result: one page of a gallery,
one image, one row per model. Nothing here loads a whole table into pandas to
filter or aggregate it; what pandas touches is at most a few hundred rows.

Every function takes a workspace path, or a :class:`Reader` that shares one
read-only connection among the queries of one dashboard page render.

Concurrency. A call (or a Reader) opens the file, works and closes it, so the
dashboard never holds the DuckDB lock across reruns, and a running ``audit run``
or a reviewer's write waits at most for one page's queries. Within one process
(the Streamlit server serves every browser session from one process) DuckDB
refuses a read-write and a read-only connection to the same file at the same
time, so every open here, and every decision written through
:func:`record_decision`, goes through one process-wide lock (:data:`DB_LOCK`).

Speed. What only ``audit run`` changes is read once per run into an in-memory
Arrow table (:class:`_Run`) that DuckDB scans beside the live ``decisions``
table, so a gallery page, a queue position or the relabeled metric costs tens of
milliseconds on 50,000 images.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from audit.errors import StoreError, UserError
from audit.evaluate import wilson_interval
from audit.featuremap import maps_dir
from audit.neighbours import neighbours_path, read_neighbours
from audit.store import (
    append_decision,
    connect,
    current_labels_sql,
    current_sql,
    fetch_one,
    given_sql,
    meta_value,
)

__all__ = [
    "DB_LOCK",
    "DISAGREEMENTS",
    "ENSEMBLE",
    "EVALUATIONS",
    "HEADLINE",
    "ISSUE_KINDS",
    "NEIGHBOURS_K",
    "NO_FIT",
    "READ_TIMEOUT",
    "RERUN_FOR_NEIGHBOURS",
    "SORTS",
    "Filters",
    "Reader",
    "check_issues",
    "check_note",
    "check_runs",
    "classes",
    "confused_pairs",
    "data_version",
    "dataset_root",
    "decision_counts",
    "export_files",
    "export_summary",
    "finding_line",
    "flagged_issues",
    "flags_vs_truth",
    "gallery",
    "headline",
    "heads_warning",
    "image_detail",
    "image_neighbours",
    "imagenet_sees",
    "impact",
    "metrics_table",
    "model_names",
    "neighbour_summary",
    "queue_window",
    "rank_table",
    "recent_decisions",
    "record_decision",
    "resolve_label",
    "run_summary",
    "runs_table",
]

ENSEMBLE = "ensemble"
EVALUATIONS = ("original", "real", "sigmoid", "clean", "relabeled", "truth", "flags_vs_truth")
# The one number per evaluation that the overview compares and ranks models by.
HEADLINE = {
    "original": "top1",
    "real": "top1",
    "sigmoid": "f1",
    "clean": "top1",
    "relabeled": "top1",
    "truth": "top1",  # against --truth, the trusted labels (audit.truth)
}
ISSUE_KINDS = ("wrong_label", "multi_label", "no_fit", "model_disagreement")
# The name shown where no class fits: a flag's suggestion that none does (label_issues.suggested_label -1 on a
# flagged image, the no_fit kind), and a current label of none (a reviewer left the image out). Fixed text in
# brackets, so it never reads as a class of the label space.
NO_FIT = "(no class fits)"
_DUP_EXCLUDED = "(excluded: a duplicate)"  # the label set a duplicate decision leaves: none, for a stated reason
# Kinds of disagreement an image can show; a filter keeps images showing any of those selected.
DISAGREEMENTS = {
    "flagged": "flagged by cleanlab",
    "label": "a model's top-1 differs from the given label",
    "models": "the models' top-1 predictions differ",
    "real": "a model's top-1 is outside the ReaL labels",
}
# Sort orders: fixed SQL fragments chosen by key, never text from the user.
SORTS = {
    "quality": ("label quality, worst first", "f.label_quality ASC NULLS LAST, f.image_index"),
    "quality_desc": ("label quality, best first", "f.label_quality DESC NULLS LAST, f.image_index"),
    "disagree": ("most models disagreeing", "f.n_wrong DESC, f.label_quality ASC NULLS LAST, f.image_index"),
    "confidence": ("suggestion confidence", "f.suggested_confidence DESC NULLS LAST, f.image_index"),
    "image": ("image id", "f.image_id"),
    # The lowest score among the checks the filter selects (Filters.checks); for ("label",) the label quality.
    "score": ("score of the selected checks, worst first", "f.check_score ASC NULLS LAST, f.image_index"),
}

DB_LOCK = threading.RLock()
# Seconds a read waits for another process's write lock (the dashboard's Reader
# waits less, and falls back to the data it last read).
READ_TIMEOUT = 30.0


class Reader:
    """One read connection shared by the queries of one page render.

    Opened on first use and closed by :meth:`close` (or leaving the ``with``
    block), so a page that needs five queries opens the file once, and holds it
    for no longer than the page takes to draw. Every function here accepts a
    Reader wherever it takes a workspace path.
    """

    def __init__(self, db: str | Path, *, timeout: float | None = None) -> None:
        self.db = Path(db)
        self.timeout = timeout  # seconds to wait for another process's write lock; None: READ_TIMEOUT
        self._stack: contextlib.ExitStack | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._failed: StoreError | None = None

    def connection(self) -> duckdb.DuckDBPyConnection:
        if self._failed is not None:
            raise self._failed  # a locked file is not waited for twice in one page render
        if self._con is None:
            stack = contextlib.ExitStack()
            try:
                self._con = stack.enter_context(_open_file(self.db, self.timeout))
            except StoreError as e:
                self._failed = e
                raise
            self._stack = stack
        return self._con

    @property
    def is_open(self) -> bool:
        return self._con is not None

    def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._con = self._stack, None, None
            stack.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _open_file(db: str | Path, timeout: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    with DB_LOCK, connect(db, read_only=True, timeout=READ_TIMEOUT if timeout is None else timeout) as con:
        yield con


@contextlib.contextmanager
def _open(src: str | Path | Reader) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only connection (or the Reader's), serialised with every other open in this process."""
    if isinstance(src, Reader):
        yield src.connection()
        return
    with _open_file(src) as con:
        yield con


def _path(src: str | Path | Reader) -> Path:
    return src.db if isinstance(src, Reader) else Path(src)


def data_version(db: str | Path) -> tuple[int, ...]:
    """A token that changes whenever a transaction commits to ``db`` (stat of file, WAL, neighbours; opens nothing).

    The dashboard keys its caches on it, so a decision written by another
    reviewer or a finished ``audit run`` shows up on the next rerun, and an
    idle page costs no query at all.
    """
    p = Path(db)
    out: list[int] = []
    # The neighbours file and the maps' index too: the workspace files the read side reads besides the database
    # (every run that records features rewrites the maps' index, and a new map is written before it).
    for f in (p, p.with_name(p.name + ".wal"), neighbours_path(p), maps_dir(p) / "current.json"):
        try:
            st = os.stat(f)
            out += [st.st_mtime_ns, st.st_size, st.st_ino]
        except FileNotFoundError:
            out += [0, 0, 0]
    return tuple(out)


# --------------------------------------------------------------------------- per-run facts


@dataclass(frozen=True)
class _Run:
    """What only an ``audit run`` changes, computed once per run and kept in memory.

    ``facts`` (Arrow, one row per valid image) carries the image's label, ReaL
    set, cleanlab columns, each model's top-1 (``top1s``, in ``models`` order,
    the ensemble last) and the any-model disagreement flags; queries scan it
    inside DuckDB beside the live ``decisions`` table. ``base`` holds each
    evaluated model's relabeled counts under the given labels, so the relabeled
    metric only needs the decided images' predictions.
    """

    models: tuple[str, ...]
    facts: pa.Table
    base: dict[str, tuple[int, int, int, int]]  # model -> (n, hits@1, hits@5, k)


_RUNS: OrderedDict[tuple[Any, ...], _Run] = OrderedDict()
_RUNS_LOCK = threading.Lock()


def run_key(con: duckdb.DuckDBPyConnection, db: Path) -> tuple[Any, ...]:
    """What identifies a workspace's run state: its file, its dataset and every run's status (a finished or new
    run changes it; a review decision does not). Per-run facts are cached under it."""
    return (
        str(db.resolve()),
        tuple(con.execute("SELECT value FROM meta WHERE key = ?", ["dataset_fingerprint"]).fetchall()),
        tuple(con.execute("SELECT run_id, status, finished_at FROM runs ORDER BY run_id").fetchall()),
    )


def per_run(
    cache: OrderedDict[tuple[Any, ...], Any],
    lock: threading.Lock,
    con: duckdb.DuckDBPyConnection,
    db: Path,
    build: Any,
    keep: int = 4,
) -> Any:
    """``build(con)`` once per :func:`run_key`, kept in ``cache`` for the ``keep`` most recent workspaces."""
    key = run_key(con, db)
    with lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    built = build(con)
    with lock:
        cache[key] = built
        while len(cache) > keep:
            cache.popitem(last=False)
    return built


def _run(con: duckdb.DuckDBPyConnection, db: Path) -> _Run:
    return per_run(_RUNS, _RUNS_LOCK, con, db, _build_run)


def _build_run(con: duckdb.DuckDBPyConnection) -> _Run:
    models = tuple(_model_names(con))
    base = [m for m in models if m != ENSEMBLE] or list(models)
    facts = con.sql(
        """
        WITH pa AS (
            SELECT p.image_index,
                   list(CASE WHEN p.top1 >= 0 THEN p.top1 END ORDER BY p.model = $ens, p.model) AS top1s,
                   coalesce(bool_or(p.top1 <> i.label) FILTER (WHERE ok), false) AS dis_label,
                   count(DISTINCT p.top1) FILTER (WHERE ok) > 1 AS dis_models,
                   coalesce(bool_or(len(i.real_labels) > 0 AND NOT list_contains(i.real_labels, p.top1))
                            FILTER (WHERE ok), false) AS dis_real,
                   count(*) FILTER (WHERE ok AND p.top1 <> i.label) AS n_wrong
            FROM (SELECT *, list_contains($base, model) AND top1 >= 0 AS ok
                  FROM predictions WHERE list_contains($models, model)) p
            JOIN images i USING (image_index)
            GROUP BY p.image_index)
        SELECT i.image_index, i.image_id, i.label, i.real_labels,
               li.label_quality, coalesce(li.is_label_issue, false) AS is_label_issue, li.suggested_label,
               li.suggested_confidence, nullif(li.issue_kind, '') AS issue_kind,
               coalesce(pa.top1s, []::INTEGER[]) AS top1s, coalesce(pa.dis_label, false) AS dis_label,
               coalesce(pa.dis_models, false) AS dis_models, coalesce(pa.dis_real, false) AS dis_real,
               coalesce(pa.n_wrong, 0) AS n_wrong
        FROM images i LEFT JOIN label_issues li USING (image_index) LEFT JOIN pa USING (image_index)
        WHERE i.valid
        ORDER BY i.image_index
        """,
        params={"ens": ENSEMBLE, "base": base, "models": list(models)},
    ).to_arrow_table()
    rows = con.execute(
        """
        SELECT p.model, count(*), count(*) FILTER (WHERE p.top_classes[1] = i.label),
               count(*) FILTER (WHERE list_contains(p.top_classes[1:5], i.label)), min(len(p.top_classes))
        FROM predictions p JOIN images i USING (image_index)
        WHERE i.valid AND i.label >= 0 AND p.top_classes[1] >= 0
          AND p.model IN (SELECT DISTINCT model FROM metrics)
        GROUP BY p.model
        """
    ).fetchall()
    return _Run(models, facts, {r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows})


def _with_facts(con: duckdb.DuckDBPyConnection, db: Path) -> _Run:
    run = _run(con, db)
    con.register("facts", run.facts)
    return run


# --------------------------------------------------------------------------- CLI queries


def flagged_issues(db: str | Path | Reader, *, limit: int | None = None) -> pd.DataFrame:
    """Flagged images, worst (lowest label quality) first."""
    with _open(db) as con:
        return con.execute(
            """
            SELECT li.rank, i.image_index, i.image_id, c.name AS given,
                   CASE WHEN li.suggested_label < 0 THEN ? ELSE s.name END AS suggested,
                   round(li.suggested_confidence, 3) AS suggested_confidence, li.issue_kind,
                   round(li.label_quality, 4) AS label_quality,
                   CASE WHEN i.real_labels IS NULL THEN NULL
                        ELSE array_to_string(i.real_labels, ' ') END AS real
            FROM label_issues li
            JOIN images i USING (image_index)
            LEFT JOIN classes c ON c.class_index = i.label
            LEFT JOIN classes s ON s.class_index = li.suggested_label
            WHERE li.is_label_issue
            ORDER BY li.label_quality, i.image_id
            LIMIT ?
            """,
            [NO_FIT, limit if limit is not None else 2**62],
        ).df()


def check_issues(db: str | Path | Reader, check: str, *, limit: int | None = None) -> pd.DataFrame:
    """The images one check flagged, most suspicious (lowest score) first.

    ``check="label"`` is :func:`flagged_issues` (the label check's detail table);
    any other registered check reads the ``issues`` table: its score, its
    suggestion (a class name where the check suggests labels, a partner image id
    where it suggests images) and its JSON details.

    Raises
    ------
    CheckError
        ``check`` is not a registered check (the message lists them).
    """
    from audit.checks import check_name, default_checks

    name = check_name(check)
    if name == "label":
        return flagged_issues(db, limit=limit)
    suggests = default_checks().get(name).suggests
    with _open(db) as con:
        return con.execute(
            """
            SELECT i.image_index, i.image_id, c.name AS given, round(x.score, 4) AS score,
                   CASE WHEN x.suggestion < 0 THEN NULL ELSE x.suggestion END AS suggestion,
                   CASE $suggests WHEN 'label' THEN sc.name WHEN 'image' THEN si.image_id END AS suggested,
                   CAST(x.info AS VARCHAR) AS info
            FROM issues x
            JOIN images i USING (image_index)
            LEFT JOIN classes c ON c.class_index = i.label
            LEFT JOIN classes sc ON sc.class_index = x.suggestion AND $suggests = 'label'
            LEFT JOIN images si ON si.image_index = x.suggestion AND $suggests = 'image'
            WHERE x."check" = $check AND x.is_issue
            ORDER BY x.score ASC NULLS LAST, i.image_id
            LIMIT $limit
            """,
            {"check": name, "suggests": suggests or "", "limit": limit if limit is not None else 2**62},
        ).df()


def check_note(db: str | Path | Reader, check: str) -> str | None:
    """Why ``check`` has no rows in the workspace (not selected by the last run, or skipped), or None when it ran."""
    with _open(db) as con:
        row = fetch_one(con, 'SELECT CAST(summary AS VARCHAR) FROM checks WHERE "check" = ?', [check])
    if row is None:
        return f"the last run did not select check {check!r}; run 'audit run --checks {check}' (see 'audit checks')"
    import json

    skipped = json.loads(row[0] or "{}").get("skipped")
    return f"check {check!r} was {skipped}" if skipped else None


def _registered(name: str) -> Any:
    """The registered check class of ``name``, or None (a workspace may hold a check this audit does not ship)."""
    from audit.checks import default_checks

    reg = default_checks()
    return reg.get(name) if name in reg else None


def check_runs(db: str | Path | Reader) -> pd.DataFrame:
    """The checks the newest run selected, one row each, the label check first, then by name.

    Columns: check, ran (False: skipped), n_issues and n_assessed (from the check's
    stored summary; None when skipped), note (why it was skipped, None when it ran),
    suggests ("label", "image" or None, from the registry; None for a check this
    audit does not know) and description.
    """
    with _open(db) as con:
        rows = con.execute(
            """
            SELECT "check", json_extract_string(summary, ?), TRY_CAST(json_extract(summary, ?) AS BIGINT),
                   TRY_CAST(json_extract(summary, ?) AS BIGINT)
            FROM checks ORDER BY "check" <> ?, "check"
            """,
            ["$.skipped", "$.n_issues", "$.n_assessed", "label"],
        ).fetchall()
    out = []
    for name, skipped, n_issues, n_assessed in rows:
        cls = _registered(name)
        out.append(
            {
                "check": name,
                "ran": not skipped,
                "n_issues": None if skipped or n_issues is None else int(n_issues),
                "n_assessed": None if skipped or n_assessed is None else int(n_assessed),
                "note": skipped or None,
                "suggests": getattr(cls, "suggests", None),
                "description": getattr(cls, "description", "") or "",
            }
        )
    cols = ["check", "ran", "n_issues", "n_assessed", "note", "suggests", "description"]
    # Object columns: a skipped check's counts and a ran check's note stay None (not NaN), as callers test them.
    return pd.DataFrame(out, columns=cols, dtype=object).astype({"ran": bool})


def _image_ids(con: duckdb.DuckDBPyConnection, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = con.execute(
        "SELECT image_index, image_id FROM images WHERE list_contains(?, image_index)", [sorted(ids)]
    ).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


def _partner_list(info: Mapping[str, Any], own: int) -> list[int]:
    """Image indices in a finding's ``info["partners"]`` (duplicate checks), itself left out; [] when none."""
    raw = info.get("partners")
    if not isinstance(raw, list):
        return []
    out: list[int] = []
    for x in raw:
        if isinstance(x, int) and not isinstance(x, bool) and x >= 0 and x != own and x not in out:
            out.append(x)
    return out


def _findings(
    con: duckdb.DuckDBPyConnection, images: Sequence[int], *, issues_only: bool = False
) -> dict[int, list[dict[str, Any]]]:
    """Per image of ``images``: what every check found (its issues only, with ``issues_only``), label check first.

    Each finding is a dict: check, score (None: not assessed), is_issue, suggests ("label",
    "image" or None), suggestion (a class or image index, None: none), suggested (the class
    name or partner image id it names; :data:`NO_FIT` for a label flag whose
    suggestion is that no class fits), partners ([(image index, image id), ...]: the
    suggested image first, then the info's ``partners``) and info (the JSON details).
    """
    import json

    idx = [int(i) for i in images]
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in idx}
    if not idx:
        return out
    rows = con.execute(
        """
        SELECT image_index, "check", score, is_issue, suggestion, CAST(info AS VARCHAR)
        FROM issues
        WHERE list_contains(?, image_index) AND (is_issue OR NOT ?)
        ORDER BY image_index, "check" <> ?, "check"
        """,
        [idx, bool(issues_only), "label"],
    ).fetchall()
    found = []
    classes, pictures = set(), set()
    for image, check, score, is_issue, sug, info_text in rows:
        try:
            info = json.loads(info_text) if info_text else {}
        except ValueError:  # a foreign writer's text: shown as it is, never parsed further
            info = {"info": info_text}
        info = info if isinstance(info, dict) else {"info": info}
        suggests = getattr(_registered(check), "suggests", None)
        sug = None if sug is None or int(sug) < 0 else int(sug)
        partners = _partner_list(info, int(image))
        if suggests == "image" and sug is not None and sug != int(image):
            partners = [sug, *[p for p in partners if p != sug]]
        if suggests == "label" and sug is not None:
            classes.add(sug)
        pictures.update(partners)
        found.append((int(image), check, score, bool(is_issue), suggests, sug, partners, info))
    names, ids = _names(con, classes), _image_ids(con, pictures)
    for image, check, score, is_issue, suggests, sug, partners, info in found:
        if suggests == "label" and sug is not None:
            suggested = names.get(sug, str(sug))
        elif suggests == "label":
            # The label check stores -1 for "no class fits" on a no_fit flag (as label_issues does).
            suggested = NO_FIT if is_issue and info.get("issue_kind") == "no_fit" else None
        elif suggests == "image":
            suggested = None if sug is None else ids.get(sug, f"#{sug}")
        else:
            suggested = None
        out[image].append(
            {
                "check": check,
                "score": None if score is None or not math.isfinite(score) else float(score),
                "is_issue": is_issue,
                "suggests": suggests,
                "suggestion": sug,
                "suggested": suggested,
                "partners": [(p, ids.get(p, f"#{p}")) for p in partners],
                "info": info,
            }
        )
    return out


def finding_line(finding: Mapping[str, Any], *, short: bool = False) -> str:
    """One plain-text line for a finding of :func:`image_detail` / :func:`gallery`.

    e.g. ``near_duplicate: score 0.120 · issue · near duplicate of n01/x.jpg (#12) · {"group": 3}``;
    ``short`` (a gallery card): ``near_duplicate 0.120 (of n01/x.jpg)``, ``knn_label 0.300 (→ cat)``.
    Pure; the names in it are data (show it with ``st.text``).
    """
    import json

    f = finding
    if short:
        score = "–" if f["score"] is None else f"{f['score']:.3f}"
        tail = ""
        if f["suggested"] is not None:
            tail = f" (→ {f['suggested']})" if f["suggests"] == "label" else f" (of {f['suggested']})"
        return f"{f['check']} {score}{tail}"
    bits = [f"{f['check']}: " + ("not assessed" if f["score"] is None else f"score {f['score']:.3f}")]
    bits.append("issue" if f["is_issue"] else "no issue")
    if f["suggested"] is not None:
        if f["suggests"] == "label":
            bits.append(f"suggests {f['suggested']}")
        else:
            what = f["check"].replace("_", " ") if str(f["check"]).endswith("duplicate") else "partner image"
            bits.append(f"{what} of {f['suggested']} (#{f['suggestion']})")
    others = [(i, n) for i, n in f["partners"] if i != f["suggestion"]]
    if others:
        more = ", ".join(str(n) for _, n in others[:3]) + (", ..." if len(others) > 3 else "")
        bits.append(f"{len(others)} more in its group: {more}")
    if f["check"] != "label":  # the label check's details have their own line (kind, confidence)
        rest = {k: v for k, v in f["info"].items() if k != "partners"}
        if rest:
            text = json.dumps(rest, sort_keys=True, ensure_ascii=False, default=str)
            bits.append(text if len(text) <= 160 else text[:157] + "...")
    return " · ".join(bits)


def resolve_label(db: str | Path | Reader, token: str) -> int:
    """Class index of a wnid/key, index or class name in the workspace's label space."""
    tok = token.strip()
    with _open(db) as con:
        if tok.isdigit():
            row = fetch_one(con, "SELECT class_index FROM classes WHERE class_index = ?", [int(tok)])
        else:
            rows = con.execute(
                "SELECT class_index FROM classes WHERE lower(key) = lower(?) OR lower(name) = lower(?)", [tok, tok]
            ).fetchall()
            if len(rows) > 1:
                raise UserError(f"{tok!r} names several classes; give the wnid or index instead")
            row = rows[0] if rows else None
    if row is None:
        raise UserError(f"{tok!r} is not a class of this workspace; give a wnid, index or class name")
    return int(row[0])


def dataset_root(db: str | Path | Reader) -> str | None:
    """The folder the workspace's image ids are relative to (``meta.dataset_root``), None before any run.

    Every thumbnail needs it; :func:`run_summary` counts the whole workspace (~50 ms at 50,000 images), and a
    decision, which changes the data version, made every thumbnail wait for it again.
    """
    with _open(db) as con:
        return meta_value(con, "dataset_root")


def run_summary(db: str | Path | Reader) -> dict[str, Any]:
    """Dataset and run facts for the overview."""
    with _open(db) as con:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        n_img, n_valid, n_cls, n_real = fetch_one(
            con,
            "SELECT count(*), count(*) FILTER (WHERE valid), count(DISTINCT label), "
            "count(*) FILTER (WHERE real_labels IS NOT NULL) FROM images",
        )
        n_space = fetch_one(con, "SELECT count(*) FROM classes")[0]
        models = [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]
        n_flag = fetch_one(con, "SELECT count(*) FROM label_issues WHERE is_label_issue")[0]
        # Reviewed images are those with a decision in effect (one fully undone is unreviewed again).
        n_dec = fetch_one(con, f"WITH {_LAST} SELECT count(*) FILTER (WHERE reviewed) FROM last")[0]
        n_decisions = fetch_one(con, "SELECT count(*) FROM decisions")[0]
        last = fetch_one(
            con, "SELECT run_id, status, started_at, finished_at FROM runs ORDER BY started_at DESC LIMIT ?", [1]
        )
        n_runs = fetch_one(con, "SELECT count(*) FROM runs")[0]
        heads = _heads_warning(con)
    return {
        "dataset_root": meta.get("dataset_root"),
        "layout": meta.get("layout"),
        "label_space": meta.get("label_space"),
        "real_source": meta.get("real_source") or None,
        "images": n_img,
        "bad_images": n_img - n_valid,
        "classes_present": n_cls,
        "classes": n_space,
        "with_real": n_real,
        "models": models,
        "flagged": n_flag,
        "reviewed": n_dec,
        "decisions": n_decisions,
        "last_run": last,
        "runs": n_runs,
        "heads_warning": heads,
    }


def heads_warning(db: str | Path | Reader) -> str | None:
    """The newest finished run's warning that its heads are too weak to trust (audit.headmodels), or None."""
    with _open(db) as con:
        return _heads_warning(con)


def _heads_warning(con: duckdb.DuckDBPyConnection) -> str | None:
    row = fetch_one(
        con,
        "SELECT json_extract_string(params, ?) FROM runs WHERE status = ? ORDER BY finished_at DESC LIMIT ?",
        ["$.head_check.warning", "finished", 1],
    )
    return row[0] if row and row[0] else None


def runs_table(db: str | Path | Reader) -> pd.DataFrame:
    """Every ``audit run`` on the workspace, newest first: status, times, images, models and settings.

    ``status`` is ``running``, ``finished``, ``failed`` (it raised; ``params.error``
    says what) or ``interrupted`` (a run that died or was stopped; the next run
    marks it and resumes its finished shards).
    """
    with _open(db) as con:
        df = con.execute(
            "SELECT run_id, status, started_at, finished_at, "
            "round(epoch(finished_at - started_at), 1) AS seconds, n_images, models, "
            "coalesce(nullif(json_extract_string(params, '$.scoring.backend_used'), ''), "
            "json_extract_string(params, '$.config.scoring.backend'), json_extract_string(params, '$.backend')) "
            "AS backend, json_extract(params, '$.scoring.images_scored')::INTEGER AS images_scored, "
            # Runs before audit.config stored their settings flat ($.precision): read those too.
            "coalesce(json_extract_string(params, '$.config.scoring.precision'), "
            "json_extract_string(params, '$.precision')) AS precision, audit_version "
            "FROM runs ORDER BY started_at DESC"
        ).df()
    df["models"] = [",".join(_plain(m) or []) for m in df["models"]]
    return df


# --------------------------------------------------------------------------- metrics

# Each decided image's current label set and the decision in effect: the one fold of the
# review log (audit.store.current_sql), shared with the export and the relabeled metric.
_LAST = current_sql("last")
# The current label set of image ``i`` with ``last`` LEFT JOINed as ``l``.
_CURRENT = current_labels_sql("l", "i")
# Reviewed = some decision is in effect (undoing every decision returns an image to the unreviewed pile).
_REVIEWED = "l.reviewed"


def metrics_table(db: str | Path | Reader) -> pd.DataFrame:
    """The metrics table with ``relabeled`` recomputed from the current decisions.

    The one metrics path: ``audit run``, ``audit metrics`` and the dashboard all read it (columns
    model, evaluation, metric, value, low, high, n, params; the tests hold it equal to a from-scratch
    recomputation through reviews and undos). The relabeled counts
    start from each model's counts under the given labels (computed once per
    run) and are corrected on the decided images only, inside DuckDB, so the
    cost follows the number of decisions, not of images.
    """
    with _open(db) as con:
        run = _run(con, _path(db))
        stored = con.execute(
            "SELECT model, evaluation, metric, value, low, high, n, params FROM metrics WHERE evaluation <> ? "
            "ORDER BY model, evaluation, metric",
            ["relabeled"],
        ).df()
        evaluated = [r[0] for r in con.execute("SELECT DISTINCT model FROM metrics ORDER BY model").fetchall()]
        delta = {
            r[0]: r[1:]
            for r in con.execute(
                f"""
                WITH {_LAST}
                SELECT p.model,
                       count(*) FILTER (WHERE i.label >= 0),
                       count(*) FILTER (WHERE i.label >= 0 AND p.top_classes[1] = i.label),
                       count(*) FILTER (WHERE i.label >= 0 AND list_contains(p.top_classes[1:5], i.label)),
                       count(*) FILTER (WHERE len(l.labels) > 0),
                       count(*) FILTER (WHERE list_contains(l.labels, p.top_classes[1])),
                       count(*) FILTER (WHERE list_has_any(l.labels, p.top_classes[1:5]))
                FROM last l JOIN images i USING (image_index) JOIN predictions p USING (image_index)
                WHERE i.valid AND p.top_classes[1] >= 0 AND list_contains(?, p.model)
                GROUP BY p.model
                """,
                [evaluated],
            ).fetchall()
        }
    rows = []
    for model in evaluated:
        n, h1, h5, k = run.base.get(model, (0, 0, 0, 0))
        n0, h10, h50, n1, h11, h51 = delta.get(model, (0,) * 6)
        n, hits = n - n0 + n1, {1: h1 - h10 + h11, 5: h5 - h50 + h51}
        for kk in (1, 5):
            if kk > max(k, 1):
                continue
            low, high = wilson_interval(int(hits[kk]), int(n))
            rows.append(
                {
                    "model": model,
                    "evaluation": "relabeled",
                    "metric": f"top{kk}",
                    "value": hits[kk] / n if n else math.nan,
                    "low": low,
                    "high": high,
                    "n": int(n),
                    "params": "{}",
                }
            )
    out = pd.concat([stored, pd.DataFrame(rows, columns=stored.columns)], ignore_index=True) if rows else stored
    order = {e: i for i, e in enumerate(EVALUATIONS)}
    out["_o"] = out["evaluation"].map(order).fillna(9)
    return out.sort_values(["model", "_o", "metric"], kind="stable").drop(columns="_o").reset_index(drop=True)


def flags_vs_truth(metrics: pd.DataFrame) -> str | None:
    """One plain-text line on how the flags fare against ``--truth`` (precision, recall, AP), or None.

    Pure: takes :func:`metrics_table`'s frame (rows of evaluation ``flags_vs_truth``, see audit.truth).
    """
    rows = metrics[metrics["evaluation"] == "flags_vs_truth"].set_index("metric")
    if rows.empty or not {"precision", "recall", "ap", "wrong"} <= set(rows.index):

        return None

    def cell(name: str) -> str:
        r = rows.loc[name]
        if pd.isna(r["value"]):
            return "–"
        iv = "" if pd.isna(r["low"]) else f" ({100 * r['low']:.1f}–{100 * r['high']:.1f}%)"
        return f"{100 * r['value']:.1f}%{iv}"

    ap = rows.loc["ap"]["value"]
    return (
        f"flags against the truth labels: precision {cell('precision')}, recall {cell('recall')}, "
        f"AP {'–' if pd.isna(ap) else f'{ap:.3f}'} over {int(rows.loc['wrong']['n']):,} images, "
        f"{cell('wrong')} of them with a given label that differs from the truth (the AP of a random order)"
    )


def headline(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per model and evaluation: its :data:`HEADLINE` metric, with low/high/n."""
    keep = [(metrics["evaluation"] == e) & (metrics["metric"] == m) for e, m in HEADLINE.items()]
    sel = metrics[np.logical_or.reduce(keep)] if keep else metrics.iloc[:0]
    return sel[["model", "evaluation", "metric", "value", "low", "high", "n"]].reset_index(drop=True)


def rank_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rank of each model (1 = best; the ensemble left out) under each evaluation's headline metric.

    Returns a frame indexed by model with one int column per evaluation
    present, in :data:`EVALUATIONS` order; ties share the better rank.
    """
    h = headline(metrics)
    h = h[(h["model"] != ENSEMBLE) & h["value"].notna()]
    if h.empty:
        return pd.DataFrame()
    wide = h.pivot(index="model", columns="evaluation", values="value")
    wide = wide[[e for e in EVALUATIONS if e in wide.columns]]
    return wide.rank(ascending=False, method="min").astype("Int64")


def impact(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per model: original, relabeled, ReaL and truth top-1 (with intervals), deltas and rank changes.

    Pure: takes :func:`metrics_table`'s frame. Deltas are fractions
    (relabeled - original, relabeled - real); ranks leave the ensemble out;
    ``rank_change`` > 0 means the model moved up under the relabeled set.
    """
    top1 = metrics[metrics["metric"] == "top1"]
    if top1.empty:
        return pd.DataFrame()
    wide = top1.pivot(index="model", columns="evaluation", values="value")
    out = pd.DataFrame(index=wide.index)
    for e in ("original", "relabeled", "real", "truth"):
        if e in wide:
            out[e] = wide[e]
            rows = top1[top1["evaluation"] == e].set_index("model")
            out[f"{e}_low"] = rows["low"]
            out[f"{e}_high"] = rows["high"]
    if "relabeled" in out and "original" in out:
        out["delta_vs_original"] = out["relabeled"] - out["original"]
    if "relabeled" in out and "real" in out:
        out["delta_vs_real"] = out["relabeled"] - out["real"]
    ranks = rank_table(metrics)
    for e in ("original", "relabeled", "real"):
        if not ranks.empty and e in ranks:
            out[f"rank_{e}"] = ranks[e]
    if "rank_original" in out and "rank_relabeled" in out:
        out["rank_change"] = out["rank_original"] - out["rank_relabeled"]
    return out.reset_index()


# --------------------------------------------------------------------------- classes, models


def classes(db: str | Path | Reader) -> pd.DataFrame:
    """The label space: class_index, key (wnid), name. At most a few thousand rows."""
    with _open(db) as con:
        return con.execute("SELECT class_index, key, name FROM classes ORDER BY class_index").df()


def _model_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT model FROM models WHERE num_classes = (SELECT count(*) FROM classes) ORDER BY model"
    ).fetchall()
    has_ens = fetch_one(con, "SELECT count(*) > 0 FROM predictions WHERE model = ?", [ENSEMBLE])[0]
    return [r[0] for r in rows] + ([ENSEMBLE] if has_ens else [])


def model_names(db: str | Path | Reader) -> list[str]:
    """Models with predictions in the workspace's label space, the ensemble last."""
    with _open(db) as con:
        return _model_names(con)


# --------------------------------------------------------------------------- disagreements


@dataclass(frozen=True)
class Filters:
    """Which images the gallery shows and the review queue walks, and in what order.

    Attributes
    ----------
    kinds : keys of :data:`DISAGREEMENTS`; an image is kept when it shows any of them (empty = every image).
        ``"flagged"`` means an issue for any of ``checks``.
    checks : the checks whose issues ``"flagged"`` keeps and whose lowest score the ``"score"`` sort orders by
        (empty = every check in the workspace); the default, ``("label",)``, is the label check alone.
    issue_kinds : cleanlab issue kinds to keep (empty = any, flagged or not).
    model : the model whose disagreements count (None = any model; ``"ensemble"`` allowed).
    class_index : keep images whose given label, suggestion or some model's top-1 is this class.
    pair : (a, b): keep images labelled a with some model's top-1 b, or the other way round.
    quality : (low, high) range of cleanlab's label quality; (0, 1) keeps every image.
    reviewed : ``"all"``, ``"unreviewed"`` or ``"reviewed"``.
    sort : key of :data:`SORTS`.
    images : keep only these image indices (a selection on the Map page); None = no such restriction.
    """

    kinds: tuple[str, ...] = ("flagged",)
    checks: tuple[str, ...] = ("label",)
    issue_kinds: tuple[str, ...] = ()
    model: str | None = None
    class_index: int | None = None
    pair: tuple[int, int] | None = None
    quality: tuple[float, float] = (0.0, 1.0)
    reviewed: str = "unreviewed"
    sort: str = "quality"
    images: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in DISAGREEMENTS]
        if bad:
            raise ValueError(f"unknown disagreement kind(s) {bad}; use {list(DISAGREEMENTS)}")
        if isinstance(self.checks, str) or not all(isinstance(c, str) and c for c in self.checks):
            raise ValueError(f"checks must be a tuple of check names, not {self.checks!r}")
        if self.reviewed not in ("all", "unreviewed", "reviewed"):
            raise ValueError(f"reviewed must be all, unreviewed or reviewed, not {self.reviewed!r}")
        if self.sort not in SORTS:
            raise ValueError(f"unknown sort {self.sort!r}; use {list(SORTS)}")


def _selection(con: duckdb.DuckDBPyConnection, run: _Run, f: Filters) -> tuple[str, list[Any]]:
    """``WITH last, ci, f, sel``: the facts of valid images with their review state, filtered; and its parameters.

    Needs ``facts`` registered on the connection (:func:`_with_facts`); registers an image selection on it, as
    ``picked``. ``f`` adds ``check_issue`` and ``check_score`` (any issue, lowest score) over the checks the
    filter selects.
    """
    if f.model is None:
        dis_label, dis_real = "f.dis_label", "f.dis_real"
    elif f.model in run.models:
        k = run.models.index(f.model) + 1
        dis_label = "coalesce(f.top1s[?] <> f.label, false)"
        dis_real = "coalesce(len(f.real_labels) > 0 AND NOT list_contains(f.real_labels, f.top1s[?]), false)"
        params_label, params_real = [k], [k]
    else:
        raise UserError(f"model {f.model!r} has no predictions in this workspace; pick one of {list(run.models)}")
    kinds = {"flagged": "f.check_issue", "label": dis_label, "models": "f.dis_models", "real": dis_real}
    # The selected checks' rows of the issues table, one per image: any issue, lowest score (the "score" sort).
    # ([""]: never a check's name, and a typed list where no check is named.)
    params: list[Any] = [not f.checks, list(f.checks) or [""]]
    where: list[str] = []
    if f.kinds:
        parts = []
        for kind in f.kinds:
            parts.append(kinds[kind])
            if f.model is not None and kind == "label":
                params += params_label
            if f.model is not None and kind == "real":
                params += params_real
        where.append("(" + " OR ".join(parts) + ")")
    if f.issue_kinds:
        where.append("list_contains(?, f.issue_kind)")
        params.append(list(f.issue_kinds))
    if f.class_index is not None:
        where.append("(f.label = ? OR f.suggested_label = ? OR list_contains(f.top1s, ?))")
        params += [int(f.class_index)] * 3
    if f.pair is not None:
        a, b = (int(x) for x in f.pair)
        where.append("((f.label = ? AND list_contains(f.top1s, ?)) OR (f.label = ? AND list_contains(f.top1s, ?)))")
        params += [a, b, b, a]
    lo, hi = (float(x) for x in f.quality)
    if (lo, hi) != (0.0, 1.0):
        where.append("f.label_quality BETWEEN ? AND ?")
        params += [lo, hi]
    if f.images is not None:
        # A semi-join, not list_contains: a selection may hold 50,000 images. Registered as an Arrow column, not
        # bound as a list parameter: binding 23,404 Python ints took ~35 ms of every queue or gallery query after
        # a decision on a Map selection, the Arrow column ~1 ms.
        con.register("picked", pa.table({"image_index": pa.array(f.images, type=pa.int32())}))
        where.append("f.image_index IN (SELECT image_index FROM picked)")
    if f.reviewed == "unreviewed":
        where.append("NOT f.reviewed")
    elif f.reviewed == "reviewed":
        where.append("f.reviewed")
    sql = f"""
    WITH {_LAST},
    ci AS (
        SELECT image_index, bool_or(is_issue) AS check_issue, min(score) AS check_score
        FROM issues WHERE ? OR list_contains(?, "check") GROUP BY image_index),
    f AS (
        SELECT i.*, coalesce(ci.check_issue, false) AS check_issue, ci.check_score,
               coalesce({_REVIEWED}, false) AS reviewed, {_CURRENT} AS current_labels, l.action AS last_action
        FROM facts i LEFT JOIN last l USING (image_index) LEFT JOIN ci USING (image_index)),
    sel AS (SELECT * FROM f {"WHERE " + " AND ".join(where) if where else ""})
    """
    return sql, params


def gallery(db: str | Path | Reader, filters: Filters, page: int = 0, page_size: int = 24) -> tuple[int, pd.DataFrame]:
    """One page of the images matching ``filters``, in their sort order, and how many match in all.

    A page past the end gives the last page. The frame has one row per image:
    image_index, image_id, label, given (name), real_labels, real (names),
    label_quality, is_label_issue, issue_kind, suggested_label (a class index, or None where no
    class is suggested), suggested (its name; :data:`NO_FIT` where a flag suggests that
    no class fits), suggested_confidence, reviewed, current_labels, current (names),
    dis_label, dis_models, dis_real, n_wrong, check_issue and check_score (an issue for / the lowest
    score of the checks ``filters.checks`` selects), ``top3``: a list of
    (model, [(class, name, probability), ...]) for every model, the ensemble last, and ``findings``:
    the checks that flagged the image, as :func:`image_detail` gives them (its issues only).
    """
    order = SORTS[filters.sort][1]
    page, page_size = max(int(page), 0), max(int(page_size), 1)
    with _open(db) as con:
        run = _with_facts(con, _path(db))
        sql, params = _selection(con, run, filters)
        query = sql + f" SELECT *, count(*) OVER () AS total FROM sel f ORDER BY {order} LIMIT ? OFFSET ?"
        df = con.execute(query, [*params, page_size, page * page_size]).df()
        if df.empty and page > 0:
            total = fetch_one(con, sql + " SELECT count(*) FROM sel", params)[0]
            last_page = max(0, (int(total) - 1) // page_size)
            df = con.execute(query, [*params, page_size, last_page * page_size]).df()
        total = int(df["total"].iloc[0]) if len(df) else 0
        df = df.drop(columns=["total", "top1s"])
        _add_names(con, df)
        df["top3"] = _top_predictions(con, run, df["image_index"].tolist(), k=3)
        found = _findings(con, df["image_index"].tolist(), issues_only=True)
        df["findings"] = pd.Series([found[int(i)] for i in df["image_index"]], index=df.index, dtype=object)
    return total, df


def _missing(v: Any) -> bool:
    """True for SQL NULL as pandas hands it over: None, ``pd.NA``, NaN or NaT (never for a list or array)."""
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    """A value of a small result frame as plain Python: NULL -> None, arrays -> lists, numpy scalars -> Python.

    DuckDB's pandas conversion gives a NULL list as ``pd.NA``, a NULL string as
    NaN and a NULL integer as ``pd.NA`` (pandas 3); callers test ``is None`` and
    iterate lists, so every frame handed to the dashboard goes through this.
    """
    if isinstance(v, np.ndarray | list | tuple):
        return [_plain(x) for x in v]
    if _missing(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _int_list(v: Any) -> list[int] | None:
    """A list column's value as ``list[int]``; None for NULL (e.g. no ReaL set for this image)."""
    return None if _missing(v) else [int(x) for x in v]


def _joined(names: dict[int, str], v: Any, empty: str) -> str:
    """Class names of a label list, ``; ``-joined; ``empty`` for an empty list, '' for NULL (not known)."""
    xs = _int_list(v)
    if xs is None:
        return ""
    return "; ".join(names.get(x, str(x)) for x in xs) if xs else empty


def _add_names(con: duckdb.DuckDBPyConnection, df: pd.DataFrame) -> None:
    """Class names for the label columns of a small frame (one query for the classes it mentions).

    Also makes the frame's NULLs plain: list columns hold ``list[int]`` or None,
    and object / string columns None rather than ``pd.NA`` / NaN (see :func:`_plain`).
    """
    for col in ("real_labels", "current_labels"):
        if col in df:
            df[col] = pd.Series([_int_list(v) for v in df[col]], index=df.index, dtype=object)
    ids: set[int] = set()
    for col in ("label", "suggested_label"):
        if col in df:
            ids.update(int(x) for x in df[col] if not _missing(x) and int(x) >= 0)
    for col in ("real_labels", "current_labels"):
        if col in df:
            for v in df[col]:
                ids.update(v or [])
    names = _names(con, ids)

    def many(v: list[int] | None) -> str | None:
        return None if v is None else "; ".join(names.get(x, str(x)) for x in v)

    if "label" in df:
        df["given"] = pd.Series(
            [None if _missing(x) else names.get(int(x), str(x)) for x in df["label"]], index=df.index, dtype=object
        )
    if "suggested_label" in df:
        # label_issues stores -1 for "no class fits" (a no_fit flag) and for an image not assessed (a bad
        # one): never a class index, so callers get None there and never offer it as a class to pick.
        flagged = df["is_label_issue"] if "is_label_issue" in df else pd.Series(False, index=df.index)
        sug = [None if _missing(x) or int(x) < 0 else int(x) for x in df["suggested_label"]]
        df["suggested"] = pd.Series(
            [
                names.get(x, str(x)) if x is not None else NO_FIT if bool(f) else None
                for x, f in zip(sug, flagged, strict=True)
            ],
            index=df.index,
            dtype=object,
        )
        df["suggested_label"] = pd.Series(sug, index=df.index, dtype=object)
    for col, out in (("real_labels", "real"), ("current_labels", "current")):
        if col in df:
            df[out] = pd.Series([many(v) for v in df[col]], index=df.index, dtype=object)
    for col in df.columns:
        # pandas 3 stores a NULL string as NaN in its "str" dtype: make it None, which tests false.
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = pd.Series([_plain(v) for v in df[col]], index=df.index, dtype=object)


def _names(con: duckdb.DuckDBPyConnection, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = con.execute(
        "SELECT class_index, name FROM classes WHERE list_contains(?, class_index)", [sorted(ids)]
    ).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


def _top_predictions(
    con: duckdb.DuckDBPyConnection, run: _Run, images: Sequence[int], *, k: int
) -> list[list[tuple[str, list[tuple[int, str, float]]]]]:
    """Per image (in ``images`` order): [(model, [(class, name, prob), ...k]), ...], ensemble last."""
    if not images:
        return []
    rows = con.execute(
        """
        SELECT p.image_index, p.model, p.top_classes[1:?] AS cls, p.top_probs[1:?] AS prob
        FROM predictions p
        WHERE list_contains(?, p.image_index) AND list_contains(?, p.model) AND p.top1 >= 0
        ORDER BY p.image_index, p.model = ?, p.model
        """,
        [k, k, [int(i) for i in images], list(run.models), ENSEMBLE],
    ).fetchall()
    names = _names(con, {int(c) for r in rows for c in r[2] or []})
    by: dict[int, list[tuple[str, list[tuple[int, str, float]]]]] = {int(i): [] for i in images}
    for idx, model, cls, prob in rows:
        pairs = zip(cls or [], prob or [], strict=True)  # NULL lists (a foreign writer) show as no prediction
        by[int(idx)].append((model, [(int(c), names.get(int(c), str(c)), float(q)) for c, q in pairs]))
    return [by[int(i)] for i in images]


def queue_window(
    db: str | Path | Reader, filters: Filters, image_index: int | None, radius: int = 3
) -> tuple[int, int | None, pd.DataFrame]:
    """Where an image sits in the review queue ``filters`` defines, and its neighbours.

    Returns
    -------
    total : images in the queue.
    position : 0-based position of ``image_index`` in the queue, None when it is not in it.
    window : up to ``2 * radius + 1`` queue entries around it (the head of the
        queue when it is not in it): pos, image_index, image_id, label, given (name).
    """
    order = SORTS[filters.sort][1]
    with _open(db) as con:
        run = _with_facts(con, _path(db))
        sql, params = _selection(con, run, filters)
        # One statement: the queue's size, the image's place and the window around it (the head when the image is
        # not in the queue). The selection is the costly part (a Map selection holds up to 50,000 images), and it
        # runs every time a decision changes the data: once, not once for the place and again for the window.
        sql += f""", q AS (SELECT row_number() OVER (ORDER BY {order}) - 1 AS pos, f.image_index, f.image_id, f.label
                           FROM sel f),
            p AS (SELECT count(*) AS total, min(pos) FILTER (WHERE image_index = ?) AS place FROM q),
            w AS (SELECT CASE WHEN place IS NULL THEN 0 ELSE greatest(place - ?, 0) END AS lo,
                         CASE WHEN place IS NULL THEN 2 * ? ELSE place + ? END AS hi FROM p)"""
        rows = con.execute(
            sql + """ SELECT p.total, p.place, q.pos, q.image_index, q.image_id, q.label
                      FROM p CROSS JOIN w LEFT JOIN q ON q.pos BETWEEN w.lo AND w.hi ORDER BY q.pos""",
            [*params, -1 if image_index is None else int(image_index), radius, radius, radius],
        ).df()
        total, place = rows["total"].iloc[0], rows["place"].iloc[0]
        window = rows.loc[rows["pos"].notna(), ["pos", "image_index", "image_id", "label"]].astype(
            {"pos": "int64", "image_index": "int32", "label": "int32"}
        )
        window = window.reset_index(drop=True)
        _add_names(con, window)
    pos = None if pd.isna(place) else int(place)
    return int(total), pos, window


def image_detail(db: str | Path | Reader, image_index: int) -> dict[str, Any] | None:
    """Everything the review page shows about one image; None when the index is not in the workspace.

    Keys: the ``images`` and ``label_issues`` columns (suggested_label None where no class is
    suggested: a no_fit flag, or an image not assessed), bad_reason, given, suggested (as in
    :func:`gallery`), real (names), current_labels / current (the label set now),
    last_action (the action of the decision in effect, None when none is),
    reviewed (a decision is in effect), predictions (each model's top 5 with names and
    probabilities), history (every decision on it, oldest first) and imagenet (for a custom
    label space: each ImageNet model's top 3 as ``(model, [(ImageNet name, prob), ...])``,
    the context its stored, unevaluated ImageNet predictions give; empty otherwise) and findings
    (what every check of the newest run found on it, the label check first: check, score,
    is_issue, suggests, suggestion, suggested (the class name or partner image id it names),
    partners ([(image index, image id), ...]) and info; see :func:`finding_line`).
    """
    idx = int(image_index)
    with _open(db) as con:
        run = _run(con, _path(db))
        df = con.execute(
            f"""
            WITH {_LAST}
            SELECT i.image_index, i.image_id, i.label, i.real_labels, i.valid,
                   li.label_quality, coalesce(li.is_label_issue, false) AS is_label_issue, li.suggested_label,
                   li.suggested_confidence, nullif(li.issue_kind, '') AS issue_kind, li.scores, li.rank,
                   coalesce({_REVIEWED}, false) AS reviewed, {_CURRENT} AS current_labels,
                   l.action AS last_action, b.reason AS bad_reason
            FROM images i
            LEFT JOIN (SELECT * FROM last WHERE image_index = ?) l USING (image_index)
            LEFT JOIN label_issues li USING (image_index)
            LEFT JOIN bad_images b USING (image_index)
            WHERE i.image_index = ?
            """,
            [idx, idx],
        ).df()
        if df.empty:
            return None
        _add_names(con, df)
        top = _top_predictions(con, run, [idx], k=5)[0]
        hist = con.execute(
            "SELECT decision_id, decided_at, reviewer, action, old_labels, new_labels, reason "
            "FROM decisions WHERE image_index = ? ORDER BY decision_id",
            [idx],
        ).df()
        names = _names(con, {x for col in ("old_labels", "new_labels") for v in hist[col] for x in _int_list(v) or []})
        imagenet = _imagenet_top(con, idx)
        findings = _findings(con, [idx])[idx]
    for col in ("old_labels", "new_labels"):
        # An empty set is "no class fits", or for a duplicate decision a copy left out (its reason says of what).
        hist[col.replace("_labels", "")] = [
            _joined(names, v, _DUP_EXCLUDED if col == "new_labels" and a == "duplicate" else NO_FIT)
            for v, a in zip(hist[col], hist["action"], strict=True)
        ]
    row = {k: _plain(v) for k, v in df.iloc[0].items()}
    row["predictions"] = top
    row["history"] = hist
    row["imagenet"] = imagenet
    row["findings"] = findings
    return row


def imagenet_sees(detail: Mapping[str, Any]) -> list[str]:
    """Plain-text lines "ImageNet sees (model): Egyptian cat 71%, tabby 12%, ..." of :func:`image_detail`."""
    return [
        f"ImageNet sees ({model}): " + ", ".join(f"{name} {p:.0%}" for name, p in top)
        for model, top in detail.get("imagenet") or []
    ]


# --------------------------------------------------------------------------- neighbours in feature space

# Neighbours the review page shows unless asked for another number (up to the stored audit.neighbours.STORED_K).
NEIGHBOURS_K = 8
RERUN_FOR_NEIGHBOURS = "rerun audit run to compute neighbours"


def neighbour_summary(own: Sequence[int], neighbours: Sequence[Sequence[int]], names: Mapping[int, str]) -> str:
    """One plain-text line on how an image's neighbours are labelled, e.g. ``6 of 8 neighbours labelled pot``.

    ``own`` is the image's current label set, ``neighbours`` each neighbour's (a neighbour counts for
    every class of its set, once). Several own classes: one count each (``..., 2 labelled vase``); a
    class more common among the neighbours than any own class is named after them. Pure; the names
    in it are data (show it with ``st.text``).
    """
    n = len(neighbours)
    if n == 0:
        return "no neighbours"
    counts: dict[int, int] = {}
    for labels in neighbours:
        for c in dict.fromkeys(int(x) for x in labels):
            counts[c] = counts.get(c, 0) + 1
    word = "neighbour" if n == 1 else "neighbours"

    def name(c: int) -> str:
        return names.get(c, str(c))

    own = list(dict.fromkeys(int(x) for x in own))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not own:
        head = "this image is left out (no class fits); "
        if not ranked:
            return head + f"none of its {n} {word} has a label either"
        c, m = ranked[0]
        return head + f"the most common label of its {n} {word} is {name(c)} ({m} of {n})"
    shown_own = own[:3]
    parts = [f"{counts.get(shown_own[0], 0)} of {n} {word} labelled {name(shown_own[0])}"]
    parts += [f"{counts.get(c, 0)} labelled {name(c)}" for c in shown_own[1:]]
    line = ", ".join(parts)
    best_own = max(counts.get(c, 0) for c in own)
    other = next(((c, m) for c, m in ranked if c not in own), None)
    if other is not None and other[1] > best_own:
        line += f"; the most common is {name(other[0])} ({other[1]} of {n})"
    return line


def image_neighbours(db: str | Path | Reader, image_index: int, k: int = NEIGHBOURS_K) -> dict[str, Any]:
    """The ``k`` nearest images of one image in feature space, from the neighbours its newest run stored.

    Returns a dict: ``note`` (one line saying why there are none: no features in the run, an older
    workspace that stored none (:data:`RERUN_FOR_NEIGHBOURS`), an image without usable features;
    None when there are neighbours), ``summary`` (:func:`neighbour_summary`, or None) and
    ``neighbours``: a frame of rank (1 = nearest), image_index, image_id, similarity (cosine; None
    where not stored), duplicate (the duplicate check that paired the two, e.g. ``near duplicate``,
    else None), current_labels / current (each neighbour's current label set and its names: the
    review log's fold, :func:`audit.store.current_sql`; ``current`` None: left out, no class fits) and
    reviewed. The image's duplicate partners (the duplicate checks' findings) come first, nearest
    first, then its nearest others. One row of the stored file (:mod:`audit.neighbours`, read once per
    version of it) and four small queries: no search (on the 50,000-image bench workspace, CPU reference
    0.50 s: 14 ms median on an open :class:`Reader`, as the dashboard's page runs call it; 56 ms with a
    connection of its own, most of it opening the file).
    """
    idx = int(image_index)
    k = max(1, int(k))
    empty = pd.DataFrame(
        columns=["rank", "image_index", "image_id", "similarity", "duplicate", "current_labels", "current", "reviewed"]
    )

    def none(note: str) -> dict[str, Any]:
        return {"note": note, "summary": None, "neighbours": empty}

    stored = read_neighbours(_path(db))
    with _open(db) as con:
        if stored is None:
            return none(f"neighbours: none stored in this workspace (it predates them); {RERUN_FOR_NEIGHBOURS}")
        n_images, newest = fetch_one(
            con,
            "SELECT (SELECT count(*) FROM images), (SELECT run_id FROM runs WHERE status = ? "
            "ORDER BY finished_at DESC NULLS LAST, started_at DESC LIMIT 1)",
            ["finished"],
        )
        if stored.run_id != newest or stored.n != int(n_images):
            return none(f"neighbours: the stored ones belong to another run of this workspace; {RERUN_FOR_NEIGHBOURS}")
        if stored.reason:
            return none(f"neighbours: none, {stored.reason}; rerun audit run with features to compute them")
        if not 0 <= idx < stored.n:
            return none("neighbours: this image is not in the workspace")
        own_nbr = stored.index[idx]
        own_sim = stored.similarity[idx]
        near = [(int(j), float(s)) for j, s in zip(own_nbr, own_sim, strict=True) if j >= 0]
        if not near:
            return none("neighbours: none for this image: it has no usable features (unreadable, or not finite)")
        sim_of = dict(near)
        marks: dict[int, str] = {}
        for f in _findings(con, [idx], issues_only=True)[idx]:
            if f["suggests"] != "image":  # the duplicate checks suggest a partner image
                continue
            for p, _ in f["partners"]:
                if 0 <= p < stored.n:
                    marks.setdefault(int(p), str(f["check"]).replace("_", " "))

        def similarity(j: int) -> float | None:
            if j in sim_of:
                return sim_of[j]
            back = np.flatnonzero(stored.index[j] == idx)  # the partner's own list may hold this image
            s = float(stored.similarity[j, back[0]]) if len(back) else math.nan
            return s if math.isfinite(s) else None

        # Partners nearest first (one whose similarity is not stored last), then the nearest others.
        sims = {j: similarity(j) for j in marks}
        dups = sorted(marks, key=lambda j: (sims[j] is None, -(sims[j] or 0.0), j))
        order = [*dups, *(j for j, _ in near if j not in marks)][:k]

        # The review log's fold (audit.store.current_sql) over these images' decisions only: folding the whole log
        # made the answer ~2x slower on 50,000 images with 2,000 decisions.
        found = con.execute(
            f"""
            WITH src AS (SELECT image_index, decision_id, action, new_labels, reviewer FROM decisions
                         WHERE list_contains($ids, image_index)),
                 {current_sql("last", "src")}
            SELECT i.image_index, i.image_id, coalesce({_REVIEWED}, false) AS reviewed,
                   {_CURRENT} AS current_labels
            FROM images i LEFT JOIN last l USING (image_index)
            WHERE list_contains($ids, i.image_index)
            """,
            {"ids": [idx, *order]},
        ).fetchall()
        by = {int(i): (str(image_id), bool(rev), [int(x) for x in cur or []]) for i, image_id, rev, cur in found}
        names = _names(con, {x for _, _, cur in by.values() for x in cur})
    rows = [
        {
            "rank": r + 1,
            "image_index": j,
            "image_id": by[j][0],
            "similarity": similarity(j),
            "duplicate": marks.get(j),
            "current_labels": by[j][2],
            "current": "; ".join(names.get(x, str(x)) for x in by[j][2]) or None,  # None: left out (no class fits)
            "reviewed": by[j][1],
        }
        for r, j in enumerate(j for j in order if j in by)
    ]
    own = by[idx][2] if idx in by else []
    frame = _frame_with_none(rows, list(empty.columns), ("duplicate", "current"))
    summary = neighbour_summary(own, [r["current_labels"] for r in rows], names)
    return {"note": None, "summary": summary, "neighbours": frame}


def _frame_with_none(rows: Sequence[Mapping[str, Any]], columns: list[str], optional: Sequence[str]) -> pd.DataFrame:
    """``rows`` as a frame whose ``optional`` text columns are object columns holding None where a row has no value.

    Why: pandas 3 infers a string column from strings mixed with None and stores NaN in it, which is truthy; the
    Review page's neighbour cards then showed "nan" and marked every neighbour a duplicate once one was.
    """
    frame = pd.DataFrame(rows, columns=columns)
    for col in optional:
        frame[col] = pd.Series([r[col] for r in rows], index=frame.index, dtype=object)
    return frame


def _imagenet_top(con: duckdb.DuckDBPyConnection, idx: int, k: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    if meta_value(con, "label_space") != "custom":
        return []
    rows = con.execute(
        "SELECT p.model, p.top_classes[1:?], p.top_probs[1:?] FROM predictions p JOIN models m USING (model) "
        "WHERE p.image_index = ? AND m.num_classes = ? AND m.source IS DISTINCT FROM ? AND p.top1 >= 0 "
        "ORDER BY p.model",
        [k, k, idx, 1000, "head"],
    ).fetchall()
    if not rows:
        return []
    from audit.datasets import imagenet_label_space

    names = imagenet_label_space().names
    return [
        (m, [(names[int(c)], float(p)) for c, p in zip(cls or [], prob or [], strict=True) if 0 <= int(c) < 1000])
        for m, cls, prob in rows
    ]


def confused_pairs(db: str | Path | Reader, model: str = ENSEMBLE, limit: int = 20) -> pd.DataFrame:
    """The class pairs a model confuses most: given label a, top-1 b, counted both ways.

    Columns: a, a_name, b, b_name, a_to_b (labelled a, predicted b), b_to_a,
    total; pairs by total descending. Bad images are left out.
    """
    with _open(db) as con:
        run = _with_facts(con, _path(db))
        if model not in run.models:
            raise UserError(f"model {model!r} has no predictions in this workspace; pick one of {list(run.models)}")
        return con.execute(
            """
            WITH d AS (
                SELECT label AS given, top1s[?] AS pred, count(*) AS n
                FROM facts WHERE label >= 0 AND top1s[?] IS NOT NULL AND top1s[?] <> label
                GROUP BY ALL),
            u AS (
                SELECT least(given, pred) AS a, greatest(given, pred) AS b,
                       sum(n) FILTER (WHERE given < pred) AS a_to_b, sum(n) FILTER (WHERE given > pred) AS b_to_a
                FROM d GROUP BY ALL)
            SELECT u.a, ca.name AS a_name, u.b, cb.name AS b_name,
                   coalesce(u.a_to_b, 0)::BIGINT AS a_to_b, coalesce(u.b_to_a, 0)::BIGINT AS b_to_a,
                   (coalesce(u.a_to_b, 0) + coalesce(u.b_to_a, 0))::BIGINT AS total
            FROM u LEFT JOIN classes ca ON ca.class_index = u.a LEFT JOIN classes cb ON cb.class_index = u.b
            ORDER BY total DESC, u.a, u.b
            LIMIT ?
            """,
            [run.models.index(model) + 1] * 3 + [int(limit)],
        ).df()


# --------------------------------------------------------------------------- review


def record_decision(
    db: str | Path,
    image_index: int,
    action: str,
    *,
    labels: Sequence[int] = (),
    reviewer: str | None = None,
    reason: str = "",
    of: int | None = None,
    timeout: float = 30.0,
) -> int:
    """Append one review decision (:func:`audit.store.append_decision`), serialised with this process's reads."""
    with DB_LOCK:
        return append_decision(
            db, int(image_index), action, labels=labels, reviewer=reviewer, reason=reason, of=of, timeout=timeout
        )


def decision_counts(db: str | Path | Reader) -> dict[str, Any]:
    """What review has done so far, from the decision in effect on each image.

    Keys: decisions (rows in the log), reviewed (images), flagged,
    reviewed_flagged, accepted (flagged images given the suggested label, or left with
    none where the suggestion is that no class fits),
    rejected (flagged images kept as given), other_change (flagged images
    relabeled otherwise, multi-labelled or excluded), by_action (action of the
    decision in effect -> images; an undone decision no longer counts), duplicates
    (images excluded as copies of another, action ``duplicate``), and
    precision = (accepted + other_change) / reviewed_flagged with its Wilson
    interval (precision_low, precision_high).

    An image excluded as a duplicate is reviewed, but not a reviewed flag: leaving a copy out says
    nothing about whether its label was wrong, so it counts in neither the flag precision nor its sample.
    """
    with _open(db) as con:
        rows = con.execute(
            f"""
            WITH {_LAST}
            SELECT coalesce(li.is_label_issue, false) AS flagged, l.action,
                   coalesce(list_sort(l.labels) = [i.label], false) AS kept,
                   -- a no_fit flag suggests that no class fits (-1): taking it leaves the image no label
                   coalesce(CASE WHEN li.suggested_label < 0 THEN len(l.labels) = 0
                                 ELSE l.labels = [li.suggested_label] END, false) AS took_suggestion,
                   count(*) AS n
            FROM last l JOIN images i USING (image_index) LEFT JOIN label_issues li USING (image_index)
            WHERE {_REVIEWED}
            GROUP BY ALL
            """
        ).fetchall()
        n_dec = fetch_one(con, "SELECT count(*) FROM decisions")[0]
        n_flag = fetch_one(con, "SELECT count(*) FROM label_issues WHERE is_label_issue")[0]
    by_action: dict[str, int] = {}
    reviewed = reviewed_flagged = accepted = rejected = other = duplicates = 0
    for flagged, action, kept, took, n in rows:
        n = int(n)
        reviewed += n
        by_action[action] = by_action.get(action, 0) + n
        if action == "duplicate":
            duplicates += n
            continue
        if not flagged:
            continue
        reviewed_flagged += n
        if kept:
            rejected += n
        elif took:
            accepted += n
        else:
            other += n
    changed = accepted + other
    low, high = wilson_interval(changed, reviewed_flagged)
    return {
        "decisions": int(n_dec),
        "flagged": int(n_flag),
        "reviewed": reviewed,
        "reviewed_flagged": reviewed_flagged,
        "accepted": accepted,
        "rejected": rejected,
        "other_change": other,
        "by_action": by_action,
        "duplicates": duplicates,
        "precision": changed / reviewed_flagged if reviewed_flagged else math.nan,
        "precision_low": low,
        "precision_high": high,
    }


def recent_decisions(db: str | Path | Reader, limit: int = 50) -> pd.DataFrame:
    """The latest decisions, newest first, with class names (old, new)."""
    with _open(db) as con:
        df = con.execute(
            "SELECT decision_id, decided_at, reviewer, image_index, image_id, action, old_labels, new_labels, reason "
            "FROM decisions ORDER BY decision_id DESC LIMIT ?",
            [int(limit)],
        ).df()
        names = _names(con, {x for col in ("old_labels", "new_labels") for v in df[col] for x in _int_list(v) or []})
    for col in ("old_labels", "new_labels"):
        df[col.replace("_labels", "")] = [_joined(names, v, "(none)") for v in df[col]]
    return df.drop(columns=["old_labels", "new_labels"])


# --------------------------------------------------------------------------- export


def export_summary(db: str | Path | Reader) -> dict[str, Any]:
    """What ``audit export`` will report (images, changed by review, excluded), bad images, and its file names."""
    with _open(db) as con:
        n_img = fetch_one(con, "SELECT count(*) FROM images")[0]
        n_bad = fetch_one(con, "SELECT count(*) FROM bad_images")[0]
        # The same rule as audit.export.cleaned_labels: a bad image is excluded whatever review said.
        changed, excluded = fetch_one(
            con,
            f"""
            WITH {_LAST},
            e AS (
                SELECT CASE WHEN b.image_index IS NOT NULL THEN []::INTEGER[] ELSE {_CURRENT} END AS labels,
                       {given_sql("i")} AS given, coalesce({_REVIEWED}, false) AS reviewed
                FROM images i LEFT JOIN last l USING (image_index) LEFT JOIN bad_images b USING (image_index))
            SELECT count(*) FILTER (WHERE reviewed AND labels <> given), count(*) FILTER (WHERE len(labels) = 0)
            FROM e
            """,
        )
        # real.json is written when every id is an ILSVRC-2012 validation file (audit.datasets.real_index_of).
        ilsvrc = fetch_one(
            con,
            "SELECT count(*) > 0 AND bool_and(coalesce(TRY_CAST(regexp_extract(image_id, ?, 1) AS INTEGER), 0) "
            "BETWEEN 1 AND 50000) FROM images",
            [r"(?:^|/)ILSVRC2012_val_(\d{8})\.[A-Za-z]+$"],
        )[0]
    # The spreadsheet files first (the dashboard offers a button per file), then the lossless JSON lines.
    files = ["labels.csv", "classes.csv", "excluded.csv", "imagefolder.txt"] + (["real.json"] if ilsvrc else [])
    files += ["labels.jsonl", "classes.jsonl"]
    return {
        "images": int(n_img),
        "changed": int(changed),
        "excluded": int(excluded),
        "bad_images": int(n_bad),
        "files": files,
    }


def export_files(db: str | Path) -> dict[str, bytes]:
    """The files ``audit export`` writes, as bytes keyed by name: the same code path, without the folder."""
    from audit.export import cleaned_labels, render_exports

    with DB_LOCK:
        images, cls = cleaned_labels(db)
    return render_exports(images, cls)
