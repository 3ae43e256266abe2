"""A second, trusted label set (``--truth``): storage, evaluation against it, and the flags scored by it.

ReaL does this for ImageNet; for any other dataset a re-annotation or a clean set
plays its part. Models (and the ensemble) are evaluated against it (evaluation
``"truth"``: top-1 / top-5 with Wilson intervals), and the flags against the
images whose given label differs from the trusted one (evaluation
``"flags_vs_truth"``): precision and recall of ``is_label_issue`` (Wilson
intervals) and the average precision of ``1 - label_quality`` (no interval).

Storage: the table ``truth (image_index, label)``, created ``IF NOT EXISTS``
outside :data:`audit.store.SCHEMA`, so that workspaces made before it open
unchanged (a missing table reads as "no truth"). Each run replaces its rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from audit.evaluate import Metric, original_accuracy, wilson_interval

__all__ = ["FLAGS_VS_TRUTH", "TRUTH", "flag_metrics", "read_truth", "truth_metrics", "write_truth"]

TRUTH = "truth"
FLAGS_VS_TRUTH = "flags_vs_truth"
_DDL = "CREATE TABLE IF NOT EXISTS truth (image_index INTEGER PRIMARY KEY, label INTEGER)"


def write_truth(con: Any, truth: np.ndarray | None) -> None:
    """Make the ``truth`` table hold ``truth`` (none: empty), inside the caller's transaction."""
    con.execute(_DDL)
    con.execute("DELETE FROM truth")
    if truth is None:
        return
    frame = pd.DataFrame({"image_index": np.arange(len(truth), dtype=np.int32), "label": truth.astype(np.int32)})
    con.register("truth_df", frame)
    con.execute("INSERT INTO truth SELECT image_index, label FROM truth_df")
    con.unregister("truth_df")


def read_truth(con: Any, n: int) -> np.ndarray | None:
    """The stored trusted labels, ``(n,)`` int64 (``-1`` where none), or None when the workspace has none."""
    has = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND table_name = ?",
        ["truth"],
    ).fetchone()[0]
    if not has:
        return None
    rows = con.execute("SELECT image_index, label FROM truth").fetchall()
    if not rows:
        return None
    out = np.full(n, -1, dtype=np.int64)
    for i, lab in rows:
        if 0 <= i < n:
            out[i] = lab
    return out


def truth_metrics(topk: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> list[Metric]:
    """Top-1 / top-5 accuracy against the trusted labels (evaluation ``"truth"``)."""
    rows = original_accuracy(topk, truth, valid=valid & (topk[:, 0] >= 0))
    return [Metric(TRUTH, m.metric, m.value, m.low, m.high, m.n, m.params) for m in rows]


def flag_metrics(
    quality: np.ndarray, flagged: np.ndarray, labels: np.ndarray, truth: np.ndarray, valid: np.ndarray
) -> list[Metric]:
    """How well the flags find the images whose given label is not the trusted one.

    Parameters
    ----------
    quality : float (N,)
        ``label_quality`` (low = suspicious); NaN where the image was not assessed.
    flagged : bool (N,)
        ``is_label_issue``.
    labels, truth : int (N,)
        Given and trusted labels; ``-1`` leaves the image out.
    valid : bool (N,)
        Images that were scored.

    Returns
    -------
    list of Metric
        ``precision`` (flagged images whose label is wrong), ``recall`` (wrong labels
        flagged), ``ap`` (average precision of ``1 - label_quality``; NaN interval), and
        ``wrong`` (the share of wrong given labels, the AP of a random ranking), over the
        assessed valid images.
    """
    from sklearn.metrics import average_precision_score

    q = np.asarray(quality, dtype=np.float64)
    keep = valid & (labels >= 0) & (truth >= 0) & np.isfinite(q)
    wrong = (labels != truth)[keep]
    flag = np.asarray(flagged, dtype=bool)[keep]
    n_flag, n_wrong, hits = int(flag.sum()), int(wrong.sum()), int((flag & wrong).sum())
    out = []
    for name, k, n in (("precision", hits, n_flag), ("recall", hits, n_wrong), ("wrong", n_wrong, len(wrong))):
        low, high = wilson_interval(k, n)
        out.append(Metric(FLAGS_VS_TRUTH, name, k / n if n else math.nan, low, high, n))
    ap = float(average_precision_score(wrong, 1.0 - q[keep])) if n_wrong and n_wrong < len(wrong) else math.nan
    out.append(Metric(FLAGS_VS_TRUTH, "ap", ap, math.nan, math.nan, len(wrong), {"score": "1 - label_quality"}))
    return out
