"""Read-side queries over a workspace, shared by the CLI and the dashboard.

Each function opens the workspace briefly (see :mod:`audit.store`), runs
parameterised SQL in DuckDB and returns a small result: one page of a gallery,
one image, one row per model. Nothing here loads a whole table into pandas to
filter or aggregate it; what pandas touches is at most a few hundred rows.

Concurrency. Every call opens the file, works and closes it, so the dashboard
never holds the DuckDB lock across reruns, and a running ``audit run`` or
``audit export`` waits at most for one short query. Within one process (the
Streamlit server serves every browser session from one process) DuckDB refuses a
read-write and a read-only connection to the same file at the same time, so
every open here, and every decision written through :func:`record_decision`,
goes through one process-wide lock (:data:`DB_LOCK`).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from audit.errors import UserError
from audit.evaluate import wilson_interval
from audit.store import append_decision, connect, fetch_one

__all__ = [
    "DB_LOCK",
    "DISAGREEMENTS",
    "ENSEMBLE",
    "EVALUATIONS",
    "HEADLINE",
    "ISSUE_KINDS",
    "SORTS",
    "Filters",
    "classes",
    "confused_pairs",
    "data_version",
    "decision_counts",
    "export_files",
    "export_summary",
    "flagged_issues",
    "gallery",
    "headline",
    "image_detail",
    "impact",
    "metrics_table",
    "model_names",
    "queue_window",
    "rank_table",
    "recent_decisions",
    "record_decision",
    "resolve_label",
    "run_summary",
]

ENSEMBLE = "ensemble"
EVALUATIONS = ("original", "real", "sigmoid", "clean", "relabeled")
# The one number per evaluation that the overview compares and ranks models by.
HEADLINE = {"original": "top1", "real": "top1", "sigmoid": "f1", "clean": "top1", "relabeled": "top1"}
ISSUE_KINDS = ("wrong_label", "multi_label", "no_fit", "model_disagreement")
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
}

DB_LOCK = threading.RLock()
# Seconds a read waits for another process's write lock; the dashboard lowers it
# and falls back to the data it last read.
READ_TIMEOUT = 30.0

Source = str | Path | "Reader"


class Reader:
    """One read connection shared by the queries of one page render.

    Opened on first use and closed by :meth:`close` (or leaving the ``with``
    block), so a page that needs five queries opens the file once, and holds it
    for no longer than the page takes to draw. Every function here accepts a
    Reader wherever it takes a workspace path.
    """

    def __init__(self, db: str | Path) -> None:
        self.db = Path(db)
        self._stack: contextlib.ExitStack | None = None
        self._con: duckdb.DuckDBPyConnection | None = None

    def connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            stack = contextlib.ExitStack()
            self._con = stack.enter_context(_open_file(self.db))
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
def _open(src: Source) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only connection (or the Reader's), serialised with every other open in this process."""
    if isinstance(src, Reader):
        yield src.connection()
        return
    with _open_file(src) as con:
        yield con


def _path(src: Source) -> Path:
    return src.db if isinstance(src, Reader) else Path(src)


def data_version(db: str | Path) -> tuple[int, ...]:
    """A token that changes whenever a transaction commits to ``db`` (file and WAL stat; opens nothing).

    The dashboard keys its caches on it, so a decision written by another
    reviewer or a finished ``audit run`` shows up on the next rerun, and an
    idle page costs no query at all.
    """
    p = Path(db)
    out: list[int] = []
    for f in (p, p.with_name(p.name + ".wal")):
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


def _run(con: duckdb.DuckDBPyConnection, db: Path) -> _Run:
    key = (
        str(db.resolve()),
        tuple(con.execute("SELECT value FROM meta WHERE key = ?", ["dataset_fingerprint"]).fetchall()),
        tuple(con.execute("SELECT run_id, status, finished_at FROM runs ORDER BY run_id").fetchall()),
    )
    with _RUNS_LOCK:
        hit = _RUNS.get(key)
        if hit is not None:
            _RUNS.move_to_end(key)
            return hit
    run = _build_run(con)
    with _RUNS_LOCK:
        _RUNS[key] = run
        while len(_RUNS) > 4:
            _RUNS.popitem(last=False)
    return run


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


def flagged_issues(db: Path, *, limit: int | None = None) -> pd.DataFrame:
    """Flagged images, worst (lowest label quality) first."""
    with _open(db) as con:
        return con.execute(
            """
            SELECT li.rank, i.image_index, i.image_id, c.name AS given, s.name AS suggested,
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
            [limit if limit is not None else 2**62],
        ).df()


def resolve_label(db: Path, token: str) -> int:
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


def run_summary(db: Path) -> dict[str, Any]:
    """Dataset and run facts for the overview."""
    with _open(db) as con:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        n_img, n_valid = fetch_one(con, "SELECT count(*), count(*) FILTER (WHERE valid) FROM images")
        n_cls = fetch_one(con, "SELECT count(DISTINCT label) FROM images")[0]
        n_space = fetch_one(con, "SELECT count(*) FROM classes")[0]
        n_real = fetch_one(con, "SELECT count(*) FROM images WHERE real_labels IS NOT NULL")[0]
        models = [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]
        n_flag = fetch_one(con, "SELECT count(*) FROM label_issues WHERE is_label_issue")[0]
        n_dec = fetch_one(con, "SELECT count(DISTINCT image_index) FROM decisions")[0]
        n_decisions = fetch_one(con, "SELECT count(*) FROM decisions")[0]
        last = fetch_one(
            con, "SELECT run_id, status, started_at, finished_at FROM runs ORDER BY started_at DESC LIMIT ?", [1]
        )
        n_runs = fetch_one(con, "SELECT count(*) FROM runs")[0]
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
    }


# --------------------------------------------------------------------------- metrics


# The cleaned label set of every image (latest decision, else the given label), as SQL.
_CURRENT = """
    last AS (
        SELECT image_index, arg_max(new_labels, decision_id) AS labels, arg_max(action, decision_id) AS action,
               count(*) AS n_decisions
        FROM decisions GROUP BY image_index),
    cur AS (
        SELECT i.image_index, i.valid, i.label,
               CASE WHEN l.image_index IS NOT NULL THEN l.labels
                    WHEN i.label >= 0 THEN [i.label]
                    ELSE []::INTEGER[] END AS labels,
               l.action,
               -- undo back to the given label returns the image to the unreviewed pile
               coalesce(NOT (l.action = 'undo' AND list_sort(l.labels) = [i.label]), false) AS reviewed
        FROM images i LEFT JOIN last l USING (image_index))
"""


def metrics_table(db: str | Path) -> pd.DataFrame:
    """The metrics table with ``relabeled`` recomputed in SQL from the current decisions.

    Same rows and values as :func:`audit.pipeline.live_metrics` (columns model,
    evaluation, metric, value, low, high, n, params), but the relabeled top-k
    counts are aggregated inside DuckDB rather than over Python lists, so it
    stays fast on 50,000 images.
    """
    with _open(db) as con:
        stored = con.execute(
            "SELECT model, evaluation, metric, value, low, high, n, params FROM metrics WHERE evaluation <> ? "
            "ORDER BY model, evaluation, metric",
            ["relabeled"],
        ).df()
        counts = con.execute(
            f"""
            WITH {_CURRENT}
            SELECT m.model,
                   count(c.image_index) AS n,
                   count(c.image_index) FILTER (WHERE list_contains(c.labels, p.top_classes[1])) AS hit1,
                   count(c.image_index) FILTER (WHERE list_has_any(c.labels, p.top_classes[1:5])) AS hit5,
                   coalesce(min(len(p.top_classes)), 0) AS k
            FROM (SELECT DISTINCT model FROM metrics) m
            LEFT JOIN predictions p ON p.model = m.model
            LEFT JOIN cur c ON c.image_index = p.image_index AND c.valid AND len(c.labels) > 0
                             AND p.top_classes[1] >= 0
            GROUP BY m.model ORDER BY m.model
            """
        ).fetchall()
    rows = []
    for model, n, hit1, hit5, k in counts:
        for kk, hits in ((1, hit1), (5, hit5)):
            if kk > max(k, 1):
                continue
            low, high = wilson_interval(int(hits), int(n))
            rows.append(
                {
                    "model": model,
                    "evaluation": "relabeled",
                    "metric": f"top{kk}",
                    "value": hits / n if n else math.nan,
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


def headline(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per model, one value per evaluation (its :data:`HEADLINE` metric), with low/high/n."""
    keep = [(metrics["evaluation"] == e) & (metrics["metric"] == m) for e, m in HEADLINE.items()]
    sel = metrics[np.logical_or.reduce(keep)] if keep else metrics.iloc[:0]
    return sel[["model", "evaluation", "metric", "value", "low", "high", "n"]].reset_index(drop=True)


def rank_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rank of each model (1 = best; the ensemble left out) under each evaluation's headline metric.

    Returns a frame indexed by model with one int column per evaluation
    present, in :data:`EVALUATIONS` order; ties share the better rank.
    """
    h = headline(metrics)
    h = h[h["model"] != ENSEMBLE]
    if h.empty:
        return pd.DataFrame()
    wide = h.pivot(index="model", columns="evaluation", values="value")
    wide = wide[[e for e in EVALUATIONS if e in wide.columns]]
    return wide.rank(ascending=False, method="min").astype("Int64")


# --------------------------------------------------------------------------- classes, models


def classes(db: str | Path) -> pd.DataFrame:
    """The label space: class_index, key (wnid), name. At most a few thousand rows."""
    with _open(db) as con:
        return con.execute("SELECT class_index, key, name FROM classes ORDER BY class_index").df()


def model_names(db: str | Path) -> list[str]:
    """Models with predictions in the workspace's label space, the ensemble last."""
    with _open(db) as con:
        rows = con.execute(
            "SELECT model FROM models WHERE num_classes = (SELECT count(*) FROM classes) ORDER BY model"
        ).fetchall()
        has_ens = fetch_one(con, "SELECT count(*) FROM predictions WHERE model = ?", [ENSEMBLE])[0] > 0
    return [r[0] for r in rows] + ([ENSEMBLE] if has_ens else [])


# --------------------------------------------------------------------------- disagreements


@dataclass(frozen=True)
class Filters:
    """Which images the gallery shows and the review queue walks, and in what order.

    Attributes
    ----------
    kinds : keys of :data:`DISAGREEMENTS`; an image is kept when it shows any of them (empty = every image).
    issue_kinds : cleanlab issue kinds to keep (empty = any, flagged or not).
    model : the model whose disagreements count (None = any model; ``"ensemble"`` allowed).
    class_index : keep images whose given label, suggestion or some model's top-1 is this class.
    pair : (a, b): keep images labelled a with some model's top-1 b, or the other way round.
    quality : (low, high) range of cleanlab's label quality (images without a score are kept only at (0, 1)).
    reviewed : ``"all"``, ``"unreviewed"`` or ``"reviewed"``.
    sort : key of :data:`SORTS`.
    """

    kinds: tuple[str, ...] = ("flagged",)
    issue_kinds: tuple[str, ...] = ()
    model: str | None = None
    class_index: int | None = None
    pair: tuple[int, int] | None = None
    quality: tuple[float, float] = (0.0, 1.0)
    reviewed: str = "unreviewed"
    sort: str = "quality"

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in DISAGREEMENTS]
        if bad:
            raise ValueError(f"unknown disagreement kind(s) {bad}; use {list(DISAGREEMENTS)}")
        if self.reviewed not in ("all", "unreviewed", "reviewed"):
            raise ValueError(f"reviewed must be all, unreviewed or reviewed, not {self.reviewed!r}")
        if self.sort not in SORTS:
            raise ValueError(f"unknown sort {self.sort!r}; use {list(SORTS)}")


def _filtered_sql(f: Filters) -> tuple[str, list[Any]]:
    """``WITH ... , f AS (facts), sel AS (filtered f)``: one row per valid image, and its parameters."""
    params: list[Any] = []
    if f.model is None:
        sel_models = "p.model <> ?"
        params.append(ENSEMBLE)
    else:
        sel_models = "p.model = ?"
        params.append(f.model)
    sql = f"""
    WITH {_CURRENT},
    pa AS (
        SELECT p.image_index,
               bool_or(p.top1 <> i.label) FILTER (WHERE {sel_models}) AS dis_label,
               count(DISTINCT p.top1) FILTER (WHERE p.model <> ?) > 1 AS dis_models,
               bool_or(len(i.real_labels) > 0 AND NOT list_contains(i.real_labels, p.top1))
                   FILTER (WHERE {sel_models}) AS dis_real,
               count(*) FILTER (WHERE p.top1 <> i.label AND p.model <> ?) AS n_wrong,
               list(p.top1) FILTER (WHERE p.model <> ?) AS top1s
        FROM predictions p JOIN images i USING (image_index)
        WHERE p.top1 >= 0
        GROUP BY p.image_index),
    f AS (
        SELECT i.image_index, i.image_id, i.label, i.real_labels,
               li.label_quality, coalesce(li.is_label_issue, false) AS is_label_issue, li.suggested_label,
               li.suggested_confidence, nullif(li.issue_kind, '') AS issue_kind,
               coalesce(pa.dis_label, false) AS dis_label, coalesce(pa.dis_models, false) AS dis_models,
               coalesce(pa.dis_real, false) AS dis_real, coalesce(pa.n_wrong, 0) AS n_wrong,
               coalesce(pa.top1s, []::INTEGER[]) AS top1s,
               c.reviewed, c.labels AS current_labels, c.action AS last_action
        FROM images i
        JOIN cur c USING (image_index)
        LEFT JOIN label_issues li USING (image_index)
        LEFT JOIN pa USING (image_index)
        WHERE i.valid)
    """
    params += [ENSEMBLE]  # dis_models
    params += [params[0]]  # dis_real uses the same model selection
    params += [ENSEMBLE, ENSEMBLE]  # n_wrong, top1s
    where: list[str] = []
    kinds = {
        "flagged": "f.is_label_issue",
        "label": "f.dis_label",
        "models": "f.dis_models",
        "real": "f.dis_real",
    }
    if f.kinds:
        where.append("(" + " OR ".join(kinds[k] for k in f.kinds) + ")")
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
    if f.reviewed == "unreviewed":
        where.append("NOT f.reviewed")
    elif f.reviewed == "reviewed":
        where.append("f.reviewed")
    sql += ", sel AS (SELECT * FROM f" + (" WHERE " + " AND ".join(where) if where else "") + ")"
    return sql, params


def gallery(db: str | Path, filters: Filters, page: int = 0, page_size: int = 24) -> tuple[int, pd.DataFrame]:
    """One page of the images matching ``filters``, in their sort order, and how many match in all.

    The frame has one row per image: image_index, image_id, label, given (name),
    real_labels, real (names), label_quality, is_label_issue, issue_kind,
    suggested_label, suggested (name), suggested_confidence, reviewed,
    current_labels, current (names), dis_label, dis_models, dis_real, n_wrong,
    and ``top3``: a list of (model, [(class name, probability), ...]) for every model.
    """
    sql, params = _filtered_sql(filters)
    order = SORTS[filters.sort][1]
    page, page_size = max(int(page), 0), max(int(page_size), 1)
    with _open(db) as con:
        total = fetch_one(con, sql + " SELECT count(*) FROM sel", params)[0]
        df = con.execute(
            sql + f" SELECT * FROM sel f ORDER BY {order} LIMIT ? OFFSET ?", [*params, page_size, page * page_size]
        ).df()
        _add_names(con, df)
        df["top3"] = _top_predictions(con, df["image_index"].tolist(), k=3)
    return int(total), df


def _add_names(con: duckdb.DuckDBPyConnection, df: pd.DataFrame) -> None:
    """Class names for the label columns of a small frame (one query for the classes it mentions)."""
    ids: set[int] = set()
    for col in ("label", "suggested_label"):
        if col in df:
            ids.update(int(x) for x in df[col].dropna())
    for col in ("real_labels", "current_labels"):
        if col in df:
            for v in df[col]:
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    ids.update(int(x) for x in v)
    names = _names(con, ids)

    def one(x: Any) -> str | None:
        return None if x is None or pd.isna(x) else names.get(int(x), str(x))

    def many(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return "; ".join(names.get(int(x), str(x)) for x in v)

    if "label" in df:
        df["given"] = df["label"].map(one)
    if "suggested_label" in df:
        df["suggested"] = df["suggested_label"].map(one)
    if "real_labels" in df:
        df["real"] = df["real_labels"].map(many)
    if "current_labels" in df:
        df["current"] = df["current_labels"].map(many)


def _names(con: duckdb.DuckDBPyConnection, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = con.execute(
        "SELECT class_index, name FROM classes WHERE list_contains(?, class_index)", [sorted(ids)]
    ).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


def _top_predictions(
    con: duckdb.DuckDBPyConnection, images: Sequence[int], *, k: int
) -> list[list[tuple[str, list[tuple[int, str, float]]]]]:
    """Per image (in ``images`` order): [(model, [(class, name, prob), ...k]), ...], ensemble last."""
    if not images:
        return []
    rows = con.execute(
        """
        SELECT p.image_index, p.model, p.top_classes[1:?] AS cls, p.top_probs[1:?] AS prob
        FROM predictions p
        WHERE list_contains(?, p.image_index) AND p.top1 >= 0
        ORDER BY p.image_index, p.model = ?, p.model
        """,
        [k, k, [int(i) for i in images], ENSEMBLE],
    ).fetchall()
    names = _names(con, {int(c) for r in rows for c in r[2]})
    by: dict[int, list[tuple[str, list[tuple[int, str, float]]]]] = {int(i): [] for i in images}
    for idx, model, cls, prob in rows:
        by[int(idx)].append(
            (model, [(int(c), names.get(int(c), str(c)), float(q)) for c, q in zip(cls, prob, strict=True)])
        )
    return [by[int(i)] for i in images]


def queue_window(
    db: str | Path, filters: Filters, image_index: int | None, *, radius: int = 3
) -> tuple[int, int | None, list[tuple[int, int]]]:
    """Where an image sits in the review queue ``filters`` defines, and its neighbours.

    Returns
    -------
    total : images in the queue.
    position : 0-based position of ``image_index`` in the queue, None when it is not in it.
    window : (position, image_index) of up to ``2 * radius + 1`` queue entries around it
        (the head of the queue when the image is not in it).
    """
    sql, params = _filtered_sql(filters)
    order = SORTS[filters.sort][1]
    sql += f", q AS (SELECT f.image_index, row_number() OVER (ORDER BY {order}) - 1 AS pos FROM sel f)"
    with _open(db) as con:
        total, pos = fetch_one(
            con,
            sql + " SELECT (SELECT count(*) FROM q), (SELECT min(pos) FROM q WHERE image_index = ?)",
            [*params, -1 if image_index is None else int(image_index)],
        )
        centre = 0 if pos is None else int(pos)
        lo = max(0, centre - radius)
        hi = lo + 2 * radius if pos is None else centre + radius
        rows = con.execute(
            sql + " SELECT pos, image_index FROM q WHERE pos BETWEEN ? AND ? ORDER BY pos", [*params, lo, hi]
        ).fetchall()
    return int(total), (None if pos is None else int(pos)), [(int(a), int(b)) for a, b in rows]


def image_detail(db: str | Path, image_index: int) -> dict[str, Any] | None:
    """Everything the review page shows about one image; None when the index is not in the workspace."""
    with _open(db) as con:
        df = con.execute(
            f"""
            WITH {_CURRENT}
            SELECT i.image_index, i.image_id, i.label, i.real_labels, i.valid,
                   li.label_quality, coalesce(li.is_label_issue, false) AS is_label_issue, li.suggested_label,
                   li.suggested_confidence, nullif(li.issue_kind, '') AS issue_kind, li.scores, li.rank,
                   c.reviewed, c.labels AS current_labels, c.action AS last_action, b.reason AS bad_reason
            FROM images i JOIN cur c USING (image_index)
            LEFT JOIN label_issues li USING (image_index)
            LEFT JOIN bad_images b USING (image_index)
            WHERE i.image_index = ?
            """,
            [int(image_index)],
        ).df()
        if df.empty:
            return None
        _add_names(con, df)
        top = _top_predictions(con, [int(image_index)], k=5)[0]
        hist = con.execute(
            "SELECT decision_id, decided_at, reviewer, action, old_labels, new_labels, reason "
            "FROM decisions WHERE image_index = ? ORDER BY decision_id",
            [int(image_index)],
        ).df()
        ids = {int(x) for col in ("old_labels", "new_labels") for v in hist[col] for x in v}
        names = _names(con, ids)
    for col in ("old_labels", "new_labels"):
        hist[col.replace("_labels", "")] = [
            "; ".join(names.get(int(x), str(x)) for x in v) if len(v) else "(no class fits)" for v in hist[col]
        ]
    row = df.iloc[0].to_dict()
    row["predictions"] = top
    row["history"] = hist
    return row


def confused_pairs(db: str | Path, model: str = ENSEMBLE, limit: int = 20) -> pd.DataFrame:
    """The class pairs a model confuses most: given label a, top-1 b, counted both ways.

    Columns: a, a_name, b, b_name, a_to_b (labelled a, predicted b), b_to_a, total;
    pairs by total descending.
    """
    with _open(db) as con:
        return con.execute(
            """
            WITH d AS (
                SELECT i.label AS given, p.top1 AS pred, count(*) AS n
                FROM predictions p JOIN images i USING (image_index)
                WHERE p.model = ? AND i.valid AND i.label >= 0 AND p.top1 >= 0 AND p.top1 <> i.label
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
            [model, int(limit)],
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
    timeout: float = 30.0,
) -> int:
    """Append one review decision (:func:`audit.store.append_decision`), serialised with this process's reads."""
    with DB_LOCK:
        return append_decision(
            db, int(image_index), action, labels=labels, reviewer=reviewer, reason=reason, timeout=timeout
        )


def decision_counts(db: str | Path) -> dict[str, Any]:
    """What review has done so far, from each image's latest decision.

    Keys: decisions (rows in the log), reviewed (images), reviewed_flagged,
    flagged, accepted (flagged images given the suggested label), rejected
    (flagged images kept as given), other_change (flagged images relabeled
    otherwise, multi-labelled or excluded), by_action (latest action -> images),
    precision (changed / reviewed_flagged) with a Wilson interval.
    """
    with _open(db) as con:
        rows = con.execute(
            f"""
            WITH {_CURRENT}
            SELECT coalesce(li.is_label_issue, false) AS flagged, c.action,
                   list_sort(c.labels) = [c.label] AS kept,
                   c.labels = [li.suggested_label] AS took_suggestion,
                   count(*) AS n
            FROM cur c LEFT JOIN label_issues li USING (image_index)
            WHERE c.reviewed
            GROUP BY ALL
            """
        ).fetchall()
        n_dec = fetch_one(con, "SELECT count(*) FROM decisions")[0]
        n_flag = fetch_one(con, "SELECT count(*) FROM label_issues WHERE is_label_issue")[0]
    by_action: dict[str, int] = {}
    reviewed = reviewed_flagged = accepted = rejected = other = 0
    for flagged, action, kept, took, n in rows:
        n = int(n)
        reviewed += n
        by_action[action] = by_action.get(action, 0) + n
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
        "precision": changed / reviewed_flagged if reviewed_flagged else math.nan,
        "precision_low": low,
        "precision_high": high,
    }


def impact(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per model: original, relabeled and ReaL top-1 (with intervals), deltas and rank changes.

    Pure: takes :func:`metrics_table`'s frame. Deltas are in fractions
    (relabeled - original, relabeled - real); ranks leave the ensemble out.
    """
    top1 = metrics[metrics["metric"] == "top1"]
    wide = top1.pivot(index="model", columns="evaluation", values="value")
    out = pd.DataFrame(index=wide.index)
    for e in ("original", "relabeled", "real"):
        if e in wide:
            out[e] = wide[e]
            lows = top1[top1["evaluation"] == e].set_index("model")
            out[f"{e}_low"] = lows["low"]
            out[f"{e}_high"] = lows["high"]
    if "relabeled" in out and "original" in out:
        out["delta_vs_original"] = out["relabeled"] - out["original"]
    if "relabeled" in out and "real" in out:
        out["delta_vs_real"] = out["relabeled"] - out["real"]
    ranks = rank_table(metrics)
    for e in ("original", "relabeled", "real"):
        if not ranks.empty and e in ranks:
            out[f"rank_{e}"] = ranks[e]
    if "rank_original" in out and "rank_relabeled" in out:
        out["rank_change"] = out["rank_original"] - out["rank_relabeled"]  # > 0: moved up
    return out.reset_index()


def recent_decisions(db: str | Path, limit: int = 50) -> pd.DataFrame:
    """The latest decisions, newest first, with class names."""
    with _open(db) as con:
        df = con.execute(
            "SELECT decision_id, decided_at, reviewer, image_index, image_id, action, old_labels, new_labels, reason "
            "FROM decisions ORDER BY decision_id DESC LIMIT ?",
            [int(limit)],
        ).df()
        names = _names(con, {int(x) for col in ("old_labels", "new_labels") for v in df[col] for x in v})
    for col in ("old_labels", "new_labels"):
        df[col.replace("_labels", "")] = [
            "; ".join(names.get(int(x), str(x)) for x in v) if len(v) else "(none)" for v in df[col]
        ]
    return df.drop(columns=["old_labels", "new_labels"])


# --------------------------------------------------------------------------- export


def export_summary(db: str | Path) -> dict[str, Any]:
    """What ``audit export`` will report: images, changed by review, excluded, bad images, and its file names."""
    with _open(db) as con:
        row = fetch_one(
            con,
            f"""
            WITH {_CURRENT},
            e AS (
                SELECT c.action IS NOT NULL AS decided, b.image_index IS NOT NULL AS bad,
                       CASE WHEN b.image_index IS NOT NULL THEN []::INTEGER[] ELSE c.labels END AS labels,
                       CASE WHEN c.label >= 0 THEN [c.label] ELSE []::INTEGER[] END AS given
                FROM cur c LEFT JOIN bad_images b USING (image_index))
            SELECT count(*), count(*) FILTER (WHERE decided AND labels <> given),
                   count(*) FILTER (WHERE len(labels) = 0), count(*) FILTER (WHERE bad)
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
    files = ["labels.csv", "classes.csv", "excluded.csv", "imagefolder.txt"] + (["real.json"] if ilsvrc else [])
    return {
        "images": int(row[0]),
        "changed": int(row[1]),
        "excluded": int(row[2]),
        "bad_images": int(row[3]),
        "files": files,
    }


def export_files(db: str | Path) -> dict[str, bytes]:
    """The files ``audit export`` writes, as bytes keyed by name: the same code path, without the folder."""
    from audit.export import cleaned_labels, render_exports

    with DB_LOCK:
        images, cls = cleaned_labels(db)
    return render_exports(images, cls)
