"""The read side of the dataset map (the dashboard's Map page): points, their labels and flags, and selections.

One query joins the stored map (:mod:`audit.featuremap`) with each image's facts as every other
reader sees them (the review log's fold for the current label, :func:`audit.store.current_sql`;
the checks' issues), and a second gives the images the current filters keep (the same
selection the gallery and the review queue use, :func:`audit.queries._selection`), which the
page highlights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from audit.featuremap import current_maps, read_current, read_map
from audit.queries import ENSEMBLE, NO_FIT, Filters, Reader, _joined, _open, _path, _selection, _with_facts, per_run

__all__ = ["COLOURS", "map_maps", "map_points", "selected_images"]

# What the points can be coloured by: key -> label shown in the dashboard.
COLOURS = {
    "given": "given label",
    "current": "current label",
    "flagged": "flagged (label check)",
    "check": "flagged by any check",
    "reviewed": "reviewed",
    "confidence": "model confidence",
}
NO_MAP = "map: none stored in this workspace; rerun audit run (with features, 100 images or more) to compute it"


def map_maps(db: str | Path | Reader) -> dict[str, Any]:
    """The maps this workspace can show: ``maps`` [(model, method)], the default first, and ``note`` (why none)."""
    p = _path(db)
    cur = read_current(p)
    maps = current_maps(p)
    note = None
    if not maps:
        note = (cur or {}).get("note") or NO_MAP
    return {"maps": maps, "note": note}


def map_points(db: str | Path | Reader, model: str, method: str) -> pd.DataFrame:
    """Every placed image of one map with what the page colours and shows on hover.

    Columns: image_index, x, y, image_id, label (given class index), given (its name), current (the
    current label's name; ``(no class fits)`` when excluded; several joined by ``; ``), reviewed,
    flagged (the label check's flag), checks (names of the checks that flagged it, ``, ``-joined),
    confidence (the ensemble's top-1 probability, else the map model's). Images the map could not place
    (no finite features) are left out. Empty when the map is not stored for the current features.
    """
    p = _path(db)
    cur = read_current(p) or {}
    digest = (cur.get("digests") or {}).get(model)
    stored = read_map(p, model, method, digest) if digest else None
    cols = ["image_index", "x", "y", "image_id", "label", "given", "current", "reviewed", "flagged", "checks"]
    if stored is None:
        return pd.DataFrame(columns=[*cols, "confidence"])
    xy = stored.coords
    placed = np.flatnonzero(np.isfinite(xy).all(axis=1))
    pts = pd.DataFrame({"image_index": placed.astype(np.int64), "x": xy[placed, 0], "y": xy[placed, 1]})
    with _open(db) as con:
        run = _with_facts(con, p)
        base = _run_part(con, p, model)
        sql, params = _selection(con, run, Filters(kinds=(), checks=(), reviewed="all"))
        # What a decision changes: the review state and the current label (one label nearly always: named below by
        # one lookup; several fetched as a list only where there are several).
        live = con.execute(
            sql
            + """
            SELECT image_index, reviewed, len(current_labels) AS n_current, current_labels[1] AS current1,
                   CASE WHEN len(current_labels) > 1 THEN current_labels END AS current_labels
            FROM sel ORDER BY image_index
            """,
            params,
        ).df()
        names = dict(con.execute("SELECT class_index, name FROM classes").fetchall())
    df = pts.merge(base, on="image_index").merge(live, on="image_index")  # inner joins: valid, placed images
    n_current, first, several = df.pop("n_current").to_numpy(), df.pop("current1"), df.pop("current_labels")
    one = n_current == 1
    current = np.full(len(df), NO_FIT, dtype=object)
    if one.any():
        c1 = first[one].astype(np.int64)
        current[one] = c1.map(names).fillna(c1.astype(str)).to_numpy(dtype=object)
    for i in np.flatnonzero(n_current > 1):
        current[i] = _joined(names, several.iloc[i], NO_FIT)
    df["current"] = current
    return df[[*cols, "confidence"]]


# Per run (queries.run_key) and map model: the points' columns that only an ``audit run`` changes.
_RUN_PARTS: OrderedDict[tuple[Any, ...], dict[str, pd.DataFrame]] = OrderedDict()
_RUN_PARTS_LOCK = threading.Lock()


def _run_part(con: duckdb.DuckDBPyConnection, p: Path, model: str) -> pd.DataFrame:
    """Per valid image: image_id, label, given (its name), flagged, checks, confidence; built once per run and
    model (:func:`audit.queries.per_run`) and shared, never modified. A decision leaves these as they are, and the
    Map page runs again after every decision: building them was most of :func:`map_points`' time (0.15 s of
    0.19 s at 50,000 images)."""
    table = per_run(_RUN_PARTS, _RUN_PARTS_LOCK, con, p, lambda _con: {})
    with _RUN_PARTS_LOCK:
        hit = table.get(model)
    if hit is not None:
        return hit
    built = con.execute(
        """
        WITH chk AS (SELECT image_index, string_agg("check", ', ' ORDER BY "check") AS checks
                     FROM issues WHERE is_issue GROUP BY image_index),
        conf AS (SELECT image_index, max(top1_prob) FILTER (WHERE model = ?) AS ens,
                        max(top1_prob) FILTER (WHERE model = ?) AS own
                 FROM predictions GROUP BY image_index)
        SELECT f.image_index, f.image_id, f.label, g.name AS given, f.is_label_issue AS flagged,
               coalesce(chk.checks, '') AS checks, coalesce(conf.ens, conf.own) AS confidence
        FROM facts f
        LEFT JOIN classes g ON g.class_index = f.label
        LEFT JOIN chk USING (image_index) LEFT JOIN conf USING (image_index)
        ORDER BY f.image_index
        """,
        [ENSEMBLE, model],
    ).df()
    with _RUN_PARTS_LOCK:
        return table.setdefault(model, built)


def selected_images(db: str | Path | Reader, filters: Filters) -> np.ndarray:
    """Image indices the filters keep (the gallery's and the review queue's selection), sorted."""
    p = _path(db)
    with _open(db) as con:
        run = _with_facts(con, p)
        sql, params = _selection(con, run, filters)
        rows = con.execute(sql + " SELECT image_index FROM sel ORDER BY image_index", params).fetchnumpy()
    return np.asarray(rows["image_index"], dtype=np.int64)
