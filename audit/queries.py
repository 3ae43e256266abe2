"""Read-side queries over a workspace, shared by the CLI and the dashboard.

Each function opens the workspace briefly (see :mod:`audit.store`), runs
parameterised SQL in DuckDB and returns a small DataFrame; nothing here loads a
whole table into pandas to filter it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from audit.errors import UserError
from audit.store import connect, fetch_one, read_frame

__all__ = ["flagged_issues", "resolve_label", "run_summary"]


def flagged_issues(db: Path, *, limit: int | None = None) -> pd.DataFrame:
    """Flagged images, worst (lowest label quality) first."""
    return read_frame(
        db,
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
    )


def resolve_label(db: Path, token: str) -> int:
    """Class index of a wnid/key, index or class name in the workspace's label space."""
    tok = token.strip()
    with connect(db, read_only=True) as con:
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


def run_summary(db: Path) -> dict[str, object]:
    """Dataset and run facts for the overview."""
    with connect(db, read_only=True) as con:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        n_img, n_valid = fetch_one(con, "SELECT count(*), count(*) FILTER (WHERE valid) FROM images")
        n_cls = fetch_one(con, "SELECT count(DISTINCT label) FROM images")[0]
        models = [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]
        n_flag = fetch_one(con, "SELECT count(*) FROM label_issues WHERE is_label_issue")[0]
        n_dec = fetch_one(con, "SELECT count(DISTINCT image_index) FROM decisions")[0]
        last = fetch_one(
            con, "SELECT run_id, status, started_at, finished_at FROM runs ORDER BY started_at DESC LIMIT ?", [1]
        )
    return {
        "dataset_root": meta.get("dataset_root"),
        "layout": meta.get("layout"),
        "label_space": meta.get("label_space"),
        "images": n_img,
        "bad_images": n_img - n_valid,
        "classes_present": n_cls,
        "models": models,
        "flagged": n_flag,
        "reviewed": n_dec,
        "last_run": last,
    }
