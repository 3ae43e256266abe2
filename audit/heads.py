"""Cross-validated linear heads on network features: predictions for any label space.

A layer's outputs are a feature vector of the image, and a linear classifier trained
on an ImageNet model's features transfers to other collections (DeCAF). For a label
space that is not ImageNet's, a head fitted on the given labels stands in for the
model's own classifier; to audit those same labels, each image's prediction must come
from a head that never saw it, so heads are fitted K times (stratified K-fold) and
every image gets its out-of-fold probabilities.

Two heads:

* ``softmax``: multinomial logistic regression (cross-entropy), probabilities sum to 1;
* ``sigmoid``: one-vs-rest logistic regression (binary cross-entropy per class), the
  seed's "sigmoid loss"; its per-class scores feed the sigmoid (multi-label) evaluation,
  and they are normalised to sum to 1 where a probability vector is needed.

Both minimise ``mean loss + ||W||^2 / (2 C N)`` (scikit-learn's convention for ``C``,
inverse regularisation strength) by full-batch L-BFGS in torch on standardised
features, all folds (and all inner folds x ``C`` values) solved side by side as one
problem; it reaches ``sklearn.linear_model.LogisticRegression``'s optimum (tested)
(measured in ``reports/heads_speed.md``). ``C`` is chosen from a grid by an inner stratified
cross-validation on the given labels only (log-loss of held-out images), once per
feature set, before the outer folds.

Classes with fewer images than folds follow scikit-learn's ``StratifiedKFold``: a
class's images are spread over as many folds as it has images, so a class of 3 images
is held out in 3 folds and each is predicted by a head trained on the other 2. A class
with a single image can only be predicted by heads that never saw it; such images are
counted in ``params["unseen"]`` and their given label naturally gets a low probability
(they are flagged, which is right: one image cannot vouch for its own class).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["HEAD_KINDS", "HeadResult", "cross_val_head", "standardize"]

HEAD_KINDS = ("softmax", "sigmoid")
_C_GRID = (0.001, 0.01, 0.1, 1.0)
_EXTEND = 2  # grid steps the inner CV may take past an edge its best C lands on
_SMALL = 1_000_000  # N x D below which heads fit on one thread


@dataclass(frozen=True)
class HeadResult:
    """Out-of-fold predictions of one head kind on one feature set."""

    kind: str  # "softmax" or "sigmoid"
    logits: np.ndarray  # (N, C) float32 out-of-fold logits; NaN rows for images left out
    probs: np.ndarray  # (N, C) float32: softmax, or sigmoid scores normalised to sum to 1
    scores: np.ndarray  # (N, C) float32: softmax probabilities, or per-class sigmoid scores in [0, 1]
    fold: np.ndarray  # (N,) int16 outer fold that held each image out; -1 for images left out
    C: float  # inverse L2 strength chosen by the inner cross-validation
    params: dict[str, Any] = field(default_factory=dict)  # JSON-able: folds, seed, grid, inner losses, ...


def standardize(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Features centred and scaled with statistics of ``rows`` (no labels used), float32 ``(N, D)``."""
    x = np.asarray(features, dtype=np.float32)
    mu = x[rows].mean(0)
    sd = x[rows].std(0)
    sd[sd < 1e-6] = 1.0  # constant dimensions carry nothing; keep them at 0 instead of dividing by 0
    return (x - mu) / sd


def cross_val_head(
    features: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    n_classes: int,
    kind: Literal["softmax", "sigmoid"] = "softmax",
    folds: int = 10,
    seed: int = 0,
    c_grid: Sequence[float] = _C_GRID,
    inner_folds: int = 3,
    max_iter: int = 200,
) -> HeadResult:
    """Fit a linear head with stratified K-fold cross-validation; return out-of-fold predictions.

    Parameters
    ----------
    features : float array (N, D), or a sequence of them (N, D_m)
        Penultimate features of each image; a sequence is concatenated (a head on
        several models' features together). Rows that are not finite are left out.
    labels : int array (N,)
        Given labels in ``0..n_classes-1``; ``-1`` leaves the image out.
    n_classes : int
        Width of the head (classes with no image keep a zero-probability column
        only up to regularisation: their bias is learned from no positives).
    kind : {"softmax", "sigmoid"}
        Cross-entropy (multinomial) or one-vs-rest binary cross-entropy.
    folds : int
        Outer folds, at least 2 (default 10).
    seed : int
        Seed of the fold assignment; the fit itself is deterministic.
    c_grid : sequence of float
        Candidate inverse L2 strengths; one value skips the inner cross-validation. When the best
        lies on an edge of the grid, up to 2 more values past that edge (by the grid's ratio) are
        tried (``params["c_evaluated"]``).
    inner_folds : int
        Folds of the inner cross-validation that chooses ``C``.
    max_iter : int
        L-BFGS iterations per fit.

    Returns
    -------
    HeadResult
        ``logits``/``probs``/``scores`` of shape (N, n_classes), ``fold`` (N,).

    Raises
    ------
    ValueError
        Shapes, dtypes or options that do not fit; says what was expected and seen.
    """
    x, lab, rows = _check(features, labels, n_classes, kind, folds, c_grid, inner_folds)
    import torch

    threads = torch.get_num_threads()
    if x.shape[0] * x.shape[1] < _SMALL:
        # OpenMP workers spin-wait between tiny matmuls: on small problems (and on a busy
        # machine) one thread is several times faster than two.
        torch.set_num_threads(1)
    try:
        return _cross_val(x, lab, rows, n_classes, kind, folds, seed, c_grid, inner_folds, max_iter)
    finally:
        torch.set_num_threads(threads)


def _cross_val(
    x: np.ndarray,
    lab: np.ndarray,
    rows: np.ndarray,
    n_classes: int,
    kind: str,
    folds: int,
    seed: int,
    c_grid: Sequence[float],
    inner_folds: int,
    max_iter: int,
) -> HeadResult:
    import torch

    xs = torch.from_numpy(standardize(x, rows))
    n = x.shape[0]
    in_rows = np.zeros(n, dtype=bool)
    in_rows[rows] = True
    xs[torch.from_numpy(~in_rows)] = 0.0  # rows left out (NaN) must not poison the masked sums
    y = torch.from_numpy(lab)
    fold_of = _assign_folds(lab, rows, folds, seed)

    inner: dict[str, float] = {}
    if len(c_grid) == 1:
        best_c = float(c_grid[0])
    else:
        # Inner cross-validation on the given labels: every (inner fold, C) pair is one
        # problem, all solved together (see _fit_many).
        inner_fold = _assign_folds(lab, rows, inner_folds, seed + 1)
        grid = [float(c) for c in sorted(c_grid)]
        total: dict[float, float] = {}

        def evaluate(values: Sequence[float]) -> None:
            masks = [in_rows & (inner_fold != k) for k in range(inner_folds) for _ in values]
            cs = [c for _ in range(inner_folds) for c in values]
            w, b = _fit_many(xs, y, masks, cs, n_classes, kind, max_iter)
            for p, (mask, c) in enumerate(zip(masks, cs, strict=True)):
                te = np.flatnonzero(in_rows & ~mask)
                total[c] = total.get(c, 0.0) + _heldout_loss(xs[te], y[te], (w[p], b[p]), kind) * len(te)

        evaluate(grid)
        # A best C on the grid's edge says the optimum may lie beyond it: step past that edge by the
        # grid's own ratio (at most _EXTEND steps) instead of settling on the boundary.
        for _ in range(_EXTEND):
            best_c = min(total, key=lambda c: total[c])
            lo, hi = min(total), max(total)
            if best_c not in (lo, hi) or len(grid) < 2:
                break
            ratio = grid[1] / grid[0]
            evaluate([lo / ratio] if best_c == lo else [hi * ratio])
        inner = {repr(c): v / len(rows) for c, v in sorted(total.items())}
        best_c = min(total, key=lambda c: total[c])

    logits = np.full((n, n_classes), np.nan, dtype=np.float32)
    masks = [in_rows & (fold_of != k) for k in range(folds)]
    w, b = _fit_many(xs, y, masks, [best_c] * folds, n_classes, kind, max_iter)
    unseen = 0
    for k in range(folds):
        te = np.flatnonzero(in_rows & (fold_of == k))
        if len(te) == 0:
            continue
        with torch.no_grad():
            logits[te] = _forward(xs[te], (w[k], b[k])).numpy()
        unseen += int(np.isin(lab[te], lab[masks[k]], invert=True).sum())
    scores, probs = _outputs(logits, kind)
    params = {
        "kind": kind,
        "folds": folds,
        "seed": seed,
        "c_grid": [float(c) for c in c_grid],
        "c_evaluated": sorted(float(c) for c in inner) if inner else [float(c) for c in c_grid],
        "inner_folds": inner_folds if len(c_grid) > 1 else 0,
        "inner_log_loss": inner,
        "C": best_c,
        "features_dim": int(x.shape[1]),
        "n_fitted": len(rows),
        "unseen": unseen,
        "standardize": "per-dimension mean/std over the fitted images (no labels used)",
        "optimizer": f"torch L-BFGS, strong Wolfe, at most {max_iter} iterations, folds solved together",
    }
    fold = np.full(n, -1, dtype=np.int16)
    fold[rows] = fold_of[rows]
    return HeadResult(kind=kind, logits=logits, probs=probs, scores=scores, fold=fold, C=best_c, params=params)


def _assign_folds(lab: np.ndarray, rows: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    out = np.full(lab.shape[0], -1, dtype=np.int64)
    if np.bincount(lab[rows]).max(initial=0) < folds:
        # StratifiedKFold refuses when every class is smaller than the folds (a custom set of 5 images a
        # class, 10 folds); the same rule by hand: shuffled within each class, the images of all classes
        # dealt round-robin in class order, so each class is spread over as many folds as it has images and
        # every fold gets one when there are at least as many images as folds.
        order = rows[np.random.default_rng(seed).permutation(len(rows))]
        order = order[np.argsort(lab[order], kind="stable")]
        out[order] = np.arange(len(order)) % folds
        return out
    with warnings.catch_warnings():
        # "The least populated class has only k members": the documented rule above handles it.
        warnings.simplefilter("ignore", UserWarning)
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for k, (_, te) in enumerate(skf.split(np.zeros(len(rows)), lab[rows])):
            out[rows[te]] = k
    return out


def _forward(x: Any, w: tuple[Any, Any]) -> Any:
    return x @ w[0] + w[1]


def _fit_many(
    x: Any, y: Any, masks: Sequence[np.ndarray], cs: Sequence[float], n_classes: int, kind: str, max_iter: int
) -> tuple[Any, Any]:
    """Solve P independent heads at once: problem p fits the rows of ``masks[p]`` with ``C = cs[p]``.

    The objective is the sum of the P problems' objectives, which share no
    parameter, so its minimum is every problem's minimum. Why together: one head
    is a skinny ``(N, D) @ (D, C)`` product that reads all of X for a few columns
    (memory-bound); P heads side by side make one ``(N, D) @ (D, P*C)`` product that
    reads X once, several times faster per head. Problems are grouped so that the
    logits of a group stay near 64 MiB.
    """
    import torch

    n, d = x.shape
    target = torch.nn.functional.one_hot(y.clamp_min(0), n_classes).to(torch.float32)
    group = max(1, min(len(masks), (16 << 20) // max(1, n * n_classes)))
    ws, bs = [], []
    for s in range(0, len(masks), group):
        m = torch.from_numpy(np.stack(masks[s : s + group]).T.astype(np.float32))  # (N, G)
        counts = m.sum(0).clamp_min(1.0)
        lam = torch.tensor([1.0 / (2.0 * c) for c in cs[s : s + group]]) / counts  # per problem
        g = m.shape[1]
        w, b = _solve_group(x, target, m, counts, lam, n_classes, kind, max_iter)
        ws.append(w.detach().view(d, g, n_classes).permute(1, 0, 2))
        bs.append(b.detach().view(g, n_classes))
    return torch.cat(ws), torch.cat(bs)


def _solve_group(
    x: Any, target: Any, m: Any, counts: Any, lam: Any, n_classes: int, kind: str, max_iter: int
) -> tuple[Any, Any]:
    import torch

    n, d = x.shape
    g = m.shape[1]
    w = torch.zeros(d, g * n_classes, requires_grad=True)
    b = torch.zeros(g * n_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-5, history_size=20
    )

    def closure() -> Any:
        opt.zero_grad()
        z = (x @ w + b).view(n, g, n_classes)
        if kind == "softmax":
            per = torch.logsumexp(z, 2) - (z * target[:, None, :]).sum(2)  # (N, G) cross-entropy
        else:
            per = torch.nn.functional.binary_cross_entropy_with_logits(
                z, target[:, None, :].expand_as(z), reduction="none"
            ).sum(2)  # (N, G): each class its own binary problem, summed over classes
        # Each problem: mean loss over its rows + ||W||^2 / (2 C n_p), as scikit-learn's C means.
        loss = ((per * m).sum(0) / counts).sum() + (lam * (w.view(d, g, n_classes) ** 2).sum((0, 2))).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w, b


def _heldout_loss(x: Any, y: Any, w: tuple[Any, Any], kind: str) -> float:
    import torch

    with torch.no_grad():
        z = _forward(x, w)
        if kind == "softmax":
            return float(torch.nn.functional.cross_entropy(z, y))
        # Compare heads by the log-loss of the normalised scores, the probabilities they feed downstream.
        p = torch.sigmoid(z)
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        return float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean())


def _outputs(logits: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    z = logits.astype(np.float64)
    if kind == "softmax":
        # Rows left out are all NaN and stay NaN; max over them would warn.
        top = np.max(np.where(np.isnan(z), -np.inf, z), axis=1, keepdims=True)
        z = z - np.where(np.isfinite(top), top, 0.0)
        e = np.exp(z)
        p = e / e.sum(1, keepdims=True)
        return p.astype(np.float32), p.astype(np.float32)
    s = 1.0 / (1.0 + np.exp(-z))
    p = s / np.clip(s.sum(1, keepdims=True), 1e-12, None)
    return s.astype(np.float32), p.astype(np.float32)


def _check(
    features: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    n_classes: int,
    kind: str,
    folds: int,
    c_grid: Sequence[float],
    inner_folds: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = [features] if isinstance(features, np.ndarray) else list(features)
    if not blocks:
        raise ValueError("features is an empty sequence, expected an (N, D) array or a sequence of them")
    arrs = [np.asarray(f) for f in blocks]
    for i, a in enumerate(arrs):
        if a.ndim != 2:
            raise ValueError(f"features[{i}] has shape {a.shape}, expected (N, D)")
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise ValueError(f"features have {[a.shape[0] for a in arrs]} rows, expected the same N in each")
    x = np.concatenate(arrs, axis=1) if len(arrs) > 1 else arrs[0]
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"features have dtype {x.dtype}, expected floats")
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind is {kind!r}, expected one of {HEAD_KINDS}")
    if not (isinstance(n_classes, int) and n_classes >= 2):
        raise ValueError(f"n_classes is {n_classes!r}, expected an int >= 2")
    if not (isinstance(folds, int) and folds >= 2) or not (isinstance(inner_folds, int) and inner_folds >= 2):
        raise ValueError(f"folds={folds!r}, inner_folds={inner_folds!r}: expected ints >= 2")
    if not c_grid or not all(isinstance(c, int | float) and math.isfinite(c) and c > 0 for c in c_grid):
        raise ValueError(f"c_grid is {list(c_grid)!r}, expected positive finite numbers")
    from audit._checks import as_labels

    lab = as_labels(labels, n, n_classes - 1)
    rows = np.flatnonzero((lab >= 0) & np.isfinite(x).all(axis=1))
    if len(np.unique(lab[rows])) < 2:
        raise ValueError("fewer than 2 classes among the labelled, finite rows: a head needs at least 2")
    if len(rows) < folds:
        raise ValueError(f"{len(rows)} labelled, finite rows, fewer than folds={folds}")
    return x, lab, rows
