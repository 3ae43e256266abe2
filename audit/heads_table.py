"""``audit heads``: the seed's "+Sigmoid / +Clean / +Both" table, on cross-validated heads.

For every model of a workspace that has features, four heads: softmax or sigmoid
(:func:`audit.heads.cross_val_head`), trained on the given labels or on the cleaned
labels; each evaluated out of fold against the given labels and against the truth
(the ``--truth`` labels when the workspace has them, else ReaL for ImageNet), top-1
with 95% Wilson intervals. One row per model x head x training labels; with several
models, also heads on all their features together (model ``"a + b + c"``).

What "out of fold" means for each training set, precisely:

* ``given``: stratified K-fold over the valid images; each image is predicted by the
  head trained on the other K-1 folds (exactly what ``audit run`` stores for a head).
* ``clean``: the training set is the *cleaned* subset: valid images whose current label
  (:func:`audit.store.current_label_sets`, the one fold of the review log) is a single
  class, leaving out flagged images without a review decision in effect, and images a
  decision excluded or gave several labels. Its labels are the current ones (a relabel
  decision counts). ``C`` is chosen by inner cross-validation on that subset and the
  subset is cross-validated K-fold: each of its images is predicted by a head that never
  saw it. Every image outside the subset (the flagged ones, mostly) is predicted by the
  head trained on the whole subset with the same ``C`` (scikit-learn's logistic regression,
  the same objective), which never saw it either. So every image gets an
  out-of-sample prediction, and both training sets are evaluated on the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.evaluate import original_accuracy, real_accuracy
from audit.heads import HEAD_KINDS, cross_val_head
from audit.store import connect, current_label_sets
from audit.truth import read_truth

__all__ = ["TRAINING_LABELS", "heads_table"]

TRAINING_LABELS = ("given", "clean")
FeatureSource = Callable[[str, str], "np.ndarray | None"]


def _stored_features(model: str, logits_file: str) -> np.ndarray | None:
    """Scoring's stored features of ``model`` (its logits at ``logits_file``), memory-mapped, or None.

    Scoring keeps each model's ``(N, D)`` float16 features beside its logits
    (``<key>.features.npy`` beside ``<key>.logits.npy``: ``ModelArrays.features``).
    """
    if not logits_file or not logits_file.endswith(".logits.npy"):
        return None
    path = Path(logits_file[: -len(".logits.npy")] + ".features.npy")
    return np.load(path, mmap_mode="r") if path.is_file() else None


def heads_table(
    db: str | Path,
    *,
    folds: int = 10,
    seed: int = 0,
    features: Mapping[str, np.ndarray] | FeatureSource | None = None,
) -> pd.DataFrame:
    """The table of the module docstring for workspace ``db``.

    Parameters
    ----------
    db : path-like
        A finished workspace.
    folds, seed : int
        Outer folds and the seed of the fold assignment (the same for every row).
    features : mapping or callable, optional
        Model name -> ``(N, D)`` features, or ``(model, logits_file) -> array or None``;
        default: the features scoring stored (:func:`_stored_features`).

    Returns
    -------
    pandas.DataFrame
        Columns ``model, head, labels, n_train, C, given_top1, given_low, given_high, n_given,
        truth, truth_top1, truth_low, truth_high, n_truth`` (``truth`` names what the truth is:
        ``"truth"``, ``"ReaL"`` or None when neither applies, then NaN accuracies).
    """
    with connect(db, read_only=True) as con:
        img = con.execute("SELECT label, valid, real_labels FROM images ORDER BY image_index").fetchall()
        n_classes = int(con.execute("SELECT count(*) FROM classes").fetchone()[0])
        models = con.execute(
            "SELECT model, logits_file FROM models WHERE source IS DISTINCT FROM ? ORDER BY model", ["head"]
        ).fetchall()
        flagged = {r[0] for r in con.execute("SELECT image_index FROM label_issues WHERE is_label_issue").fetchall()}
        sets, decided = current_label_sets(con)
        truth = read_truth(con, len(img))
    n = len(img)
    given = np.array([r[0] for r in img], dtype=np.int64)
    valid = np.array([bool(r[1]) for r in img], dtype=bool)
    real = [list(r[2]) if r[2] is not None else None for r in img]
    clean = np.full(n, -1, dtype=np.int64)
    for i, s in enumerate(sets):
        if valid[i] and len(s) == 1 and (decided[i] or i not in flagged):
            clean[i] = s[0]
    truth_name = "truth" if truth is not None else "ReaL" if all(r is not None for r in real) else None
    get = _source(features)
    rows: list[dict[str, Any]] = []
    sets: list[tuple[str, np.ndarray]] = []
    for model, logits_file in models:
        x = get(model, logits_file or "")
        if x is not None:
            sets.append((model, np.asarray(x, dtype=np.float32)))
    if len(sets) > 1:
        # The third option: one head on the features of every model together (concatenated).
        sets.append((" + ".join(m for m, _ in sets), np.concatenate([x for _, x in sets], axis=1)))
    for model, x in sets:
        for kind in HEAD_KINDS:
            for train in TRAINING_LABELS:
                lab = np.where(valid, given if train == "given" else clean, -1)
                top1, c = _out_of_fold_top1(x, lab, valid, n_classes, kind, folds, seed)
                row: dict[str, Any] = {
                    "model": model, "head": kind, "labels": train, "n_train": int((lab >= 0).sum()), "C": c,
                }  # fmt: skip
                g = original_accuracy(top1[:, None], given, ks=(1,), valid=valid)[0]
                row.update(given_top1=g.value, given_low=g.low, given_high=g.high, n_given=g.n, truth=truth_name)
                t = None
                if truth is not None:
                    t = original_accuracy(top1[:, None], truth, ks=(1,), valid=valid)[0]
                elif truth_name == "ReaL":
                    t = real_accuracy(top1[:, None], [r or [] for r in real], ks=(1,), valid=valid)[0]
                row.update(
                    truth_top1=t.value if t else np.nan,
                    truth_low=t.low if t else np.nan,
                    truth_high=t.high if t else np.nan,
                    n_truth=t.n if t else 0,
                )
                rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS)


_COLUMNS = [
    "model", "head", "labels", "n_train", "C", "given_top1", "given_low", "given_high", "n_given",
    "truth", "truth_top1", "truth_low", "truth_high", "n_truth",
]  # fmt: skip


def _source(features: Mapping[str, np.ndarray] | FeatureSource | None) -> FeatureSource:
    if features is None:
        return _stored_features
    if callable(features):
        return features
    table = dict(features)
    return lambda model, _file: table.get(model)


def _out_of_fold_top1(
    x: np.ndarray, lab: np.ndarray, valid: np.ndarray, n_classes: int, kind: str, folds: int, seed: int
) -> tuple[np.ndarray, float]:
    """Top-1 of every valid image from a head that never saw it (module docstring); -1 elsewhere."""
    res = cross_val_head(x, lab, n_classes=n_classes, kind=kind, folds=folds, seed=seed)  # type: ignore[arg-type]
    top1 = np.full(len(lab), -1, dtype=np.int64)
    ok = np.isfinite(res.logits).all(axis=1)
    top1[ok] = res.logits[ok].argmax(axis=1)
    rest = np.flatnonzero(valid & ~ok & np.isfinite(x).all(axis=1))
    if len(rest):
        top1[rest] = _fit_all_predict(x, lab, res.fold >= 0, rest, kind, res.C)
    return top1, float(res.C)


def _fit_all_predict(
    x: np.ndarray, lab: np.ndarray, train: np.ndarray, rest: np.ndarray, kind: str, c: float
) -> np.ndarray:
    """Top-1 of images ``rest`` by the head fitted on every ``train`` image, with the C cross-validation chose.

    scikit-learn's L-BFGS logistic regression: the same objective as :mod:`audit.heads`
    (its ``C`` is scikit-learn's; the bias is not penalised; features standardised with the
    training images' statistics), multinomial for softmax, one-vs-rest for sigmoid.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from audit.heads import standardize

    rows = np.flatnonzero(train)
    xs = standardize(x, rows)
    base = LogisticRegression(C=c, max_iter=500)
    clf = base if kind == "softmax" else OneVsRestClassifier(base)
    clf.fit(xs[rows], lab[rows])
    d = np.asarray(clf.decision_function(xs[rest]))
    pick = (d > 0).astype(np.int64) if d.ndim == 1 else d.argmax(axis=1)  # two classes: one score column
    return np.asarray(clf.classes_)[pick].astype(np.int64)
