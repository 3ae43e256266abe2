"""Independent recomputations the tests compare the product's read side against.

:func:`naive_metrics` recomputes every relabeled row from scratch (the current label sets of all
images, each model's stored top-5) with :func:`audit.evaluate.relabeled_accuracy`, the way the
pipeline computed them before :func:`audit.queries.metrics_table` became the one metrics path
the CLI and the dashboard share; the tests hold the two equal through reviews and undos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from audit.evaluate import relabeled_accuracy
from audit.store import connect, current_label_sets


def naive_metrics(db: Path) -> pd.DataFrame:
    """The metrics table with ``relabeled`` recomputed from the current decisions.

    Relabeled accuracy moves with every review decision, so it is computed at
    read time from the stored top-5 predictions rather than stored.
    """
    with connect(db, read_only=True) as con:
        stored = con.execute(
            "SELECT model, evaluation, metric, value, low, high, n, params FROM metrics WHERE evaluation <> ? "
            "ORDER BY model, evaluation, metric",
            ["relabeled"],
        ).df()
        sets, _ = current_label_sets(con)
        valid = np.array(
            [r[0] for r in con.execute("SELECT valid FROM images ORDER BY image_index").fetchall()], dtype=bool
        )
        models = [r[0] for r in con.execute("SELECT DISTINCT model FROM metrics ORDER BY model").fetchall()]
        rows = []
        for m in models:
            top = con.execute(
                "SELECT top_classes FROM predictions WHERE model = ? ORDER BY image_index", [m]
            ).fetchall()
            cls = np.array([t[0] for t in top], dtype=np.int64)
            for r in relabeled_accuracy(cls, sets, valid=valid & (cls[:, 0] >= 0)):
                rows.append(
                    {
                        "model": m,
                        "evaluation": r.evaluation,
                        "metric": r.metric,
                        "value": r.value,
                        "low": r.low,
                        "high": r.high,
                        "n": r.n,
                        "params": json.dumps(r.params),
                    }
                )
    out = pd.concat([stored, pd.DataFrame(rows)], ignore_index=True) if rows else stored
    order = {"original": 0, "real": 1, "sigmoid": 2, "clean": 3, "relabeled": 4, "truth": 5, "flags_vs_truth": 6}
    out["_o"] = out["evaluation"].map(order).fillna(9)
    return out.sort_values(["model", "_o", "metric"], kind="stable").drop(columns="_o").reset_index(drop=True)
