"""``python -m audit.bench heads``: how long cross-validated heads take, and how that grows.

Times :func:`audit.heads.cross_val_head` (softmax and sigmoid, 10 outer folds, a
4-value ``C`` grid chosen by a 3-fold inner cross-validation) for M models' features:

* ``--features a.npy,b.npy,...`` with ``--labels labels.npy``: real features, e.g. the
  ``<model>.features.npy`` matrices ``audit run`` keeps beside a workspace;
* otherwise synthetic features of the same shape (``--n``, ``--dim``, ``--classes``):
  class clusters with 10% of labels flipped, seeded.

``--grow`` adds rows at other sizes (images and classes) so the growth to 50,000 images
and 100 classes is measured, not guessed. Writes ``reports/perf_heads.{md,csv,json}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import REPORTS, machine, machine_md, md_table, write_csv, write_json

__all__ = ["heads"]


def _synthetic(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = (centers[y] * 0.15 + rng.normal(size=(n, dim))).astype(np.float32)
    flip = rng.random(n) < 0.1
    y[flip] = rng.integers(0, classes, int(flip.sum()))
    return x, y


def _time_heads(feats: list[np.ndarray], labels: np.ndarray, classes: int, folds: int) -> dict[str, Any]:
    from audit.heads import cross_val_head

    row: dict[str, Any] = {"images": len(labels), "dim": feats[0].shape[1], "classes": classes, "models": len(feats)}
    total = 0.0
    for kind in ("softmax", "sigmoid"):
        seconds = 0.0
        for x in feats:
            t = time.perf_counter()
            r = cross_val_head(x, labels, n_classes=classes, kind=kind, folds=folds)
            seconds += time.perf_counter() - t
        row[f"{kind}_s"] = round(seconds, 2)
        row[f"{kind}_C_last"] = r.C
        total += seconds
    row["total_s"] = round(total, 2)
    return row


def heads(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default=None, help="comma-separated (N, D) .npy files, one per model")
    p.add_argument("--labels", type=Path, default=None, help="(N,) int .npy of given labels (with --features)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--grow", action="store_true", help="also time 2,500 / 5,000 images and 100 classes")
    p.add_argument("--out", type=Path, default=REPORTS / "perf_heads")
    a = p.parse_args(argv)

    rows = []
    if a.features:
        if a.labels is None:
            p.error("--features needs --labels")
        labels = np.load(a.labels)
        feats = [np.load(f, mmap_mode="r").astype(np.float32) for f in a.features.split(",")]
        classes = int(labels.max()) + 1
        rows.append({"data": "real", **_time_heads(feats, labels, classes, a.folds)})
    else:
        x, y = _synthetic(a.n, a.dim, a.classes, 0)
        rows.append({"data": "synthetic", **_time_heads([x] * a.models, y, a.classes, a.folds)})
    if a.grow:
        for n, classes in ((2_500, a.classes), (5_000, a.classes), (5_000, 100)):
            x, y = _synthetic(n, a.dim, classes, 1)
            print(f"heads: {n} images x {classes} classes", flush=True)
            rows.append({"data": "synthetic", **_time_heads([x], y, classes, a.folds)})
    info = machine()
    write_csv(a.out.with_suffix(".csv"), rows)
    write_json(a.out.with_suffix(".json"), {"machine": info, "rows": rows, "argv": argv or []})
    md = [
        "# Cross-validated heads: time",
        "",
        f"`python -m audit.bench heads {' '.join(argv or [])}`. Per row: both heads (softmax, sigmoid), "
        f"{a.folds} outer folds, C from a 4-value grid by 3-fold inner cross-validation, for each model's features.",
        "",
        md_table(rows),
        "",
        machine_md(info),
    ]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0
