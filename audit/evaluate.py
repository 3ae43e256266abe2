"""Evaluate image-classification predictions under several views of the labels.

Five evaluations, each a list of :class:`Metric` rows:

* ``original``: top-k accuracy against the given single label.
* ``real``: top-k accuracy against the ReaL multi-label sets of Beyer et al.
  2020, "Are we done with ImageNet?", as computed by
  ``timm.data.RealLabelsImagenet``: an image is right at k when any of its top k
  classes is in its ReaL set; images with an empty set are left out.
* ``sigmoid``: multi-label precision / recall / F1 / exact match of a
  thresholded set of per-class scores against the ReaL sets.
* ``clean``: top-1 accuracy against the given label, on only the images whose
  given label is inside their ReaL set (the labels both sources agree on).
* ``relabeled``: top-k accuracy against the cleaned label sets produced by
  review.

Conventions shared by every function (N images, K ranked classes, C classes):

* ``topk``: int (N, K), class indices by decreasing score.
* ``labels``: int (N,), the given label; ``-1`` excludes the image.
* ``real_sets`` / ``label_sets``: N lists of int; an empty list excludes the
  image.
* ``valid``: bool (N,), False for images that could not be scored (their
  predictions may be garbage or NaN and are never read); default all True.

Inputs are checked once, at the public boundary; the private ``_`` functions
trust what they are given so :func:`evaluate_all` validates each input only once.
All values are fractions in [0, 1], never percentages.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from audit._checks import as_labels, as_mask

__all__ = [
    "Metric",
    "choose_threshold",
    "clean_accuracy",
    "confusion_pairs",
    "evaluate_all",
    "mean_interval",
    "original_accuracy",
    "real_accuracy",
    "relabeled_accuracy",
    "sigmoid_evaluation",
    "wilson_interval",
]

# A (row, class) pair is packed into one int64 as row * 2**32 + class, so that
# membership in ragged per-image sets becomes a binary search in one sorted array.
_SHIFT = 32
_MAX_CLASS = 2**31 - 1
# Rows of (N, C) scores handled at once: bounds the temporaries of the top-k
# selection to a few MiB whatever N is.
_CHUNK_ELEMENTS = 2**20
# Evenly spaced in logit space, sigmoid(-4) .. sigmoid(14): a model trained with
# softmax has logits offset by an arbitrary per-image constant, so its useful
# sigmoid thresholds sit far above 0.98; a probability grid would never reach them.
_LOGIT_GRID = np.arange(-4.0, 14.0001, 0.25)
_DEFAULT_GRID = 1.0 / (1.0 + np.exp(-_LOGIT_GRID))
_SCALES = ("probability", "logit")
_CROSS_FIT = "2-fold cross-fit, max F1"


@dataclass(frozen=True)
class Metric:
    """One row of a metrics table.

    Attributes
    ----------
    evaluation : str
        ``"original"``, ``"real"``, ``"sigmoid"``, ``"clean"`` or ``"relabeled"``.
    metric : str
        E.g. ``"top1"``, ``"top5"``, ``"precision"``, ``"f1"``.
    value : float
        The estimate, a fraction in [0, 1]; NaN when ``n == 0``.
    low, high : float
        Confidence interval of ``value`` (95% by default); NaN when ``n == 0``.
    n : int
        Number of images the value is averaged over.
    params : dict
        Settings the value depends on, e.g. ``{"threshold": 0.3}``.
    """

    evaluation: str
    metric: str
    value: float
    low: float
    high: float
    n: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Sets:
    """Ragged per-image class sets, deduplicated.

    ``keys`` is the sorted unique array of ``row * 2**32 + class``; ``sizes`` is
    int (N,), the number of distinct classes of each image.
    """

    keys: np.ndarray
    sizes: np.ndarray


@dataclass(frozen=True)
class _Ranked:
    """The ``max_set`` best classes of M images, for thresholding.

    ``scores`` is float (M, m), sorted decreasing along each row;
    ``cum_hits[i, j]`` counts the right answers among the first ``j + 1`` of
    row i; ``set_sizes`` is int (M,), the size of each image's true set.
    """

    scores: np.ndarray
    cum_hits: np.ndarray
    set_sizes: np.ndarray

    def take(self, rows: np.ndarray) -> _Ranked:
        return _Ranked(self.scores[rows], self.cum_hits[rows], self.set_sizes[rows])


# --------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Parameters
    ----------
    successes : int
        Number of successes, ``0 <= successes <= n``.
    n : int
        Number of trials.
    confidence : float, keyword-only
        Two-sided coverage, in (0, 1).

    Returns
    -------
    (low, high) : tuple of float
        Bounds in [0, 1]; ``(nan, nan)`` when ``n == 0``.
    """
    z = _z(confidence)
    successes, n = operator.index(successes), operator.index(n)
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"expected 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    # The bounds reach 0 and 1 exactly in exact arithmetic; rounding must not
    # leave an all-correct value sitting just above its own upper bound.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mean_interval(values: np.ndarray, *, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the mean of per-image scores in [0, 1].

    Uses the normal approximation ``mean ± z * sd / sqrt(n)`` clipped to
    [0, 1]. When every value is 0 or 1 the mean is a proportion and the Wilson
    interval is used instead, since the normal one collapses at 0% and 100%.

    Parameters
    ----------
    values : array of float, shape (n,)
        Per-image scores in [0, 1], e.g. precision, recall or F1.
    confidence : float, keyword-only
        Two-sided coverage, in (0, 1).

    Returns
    -------
    (low, high) : tuple of float
        ``(nan, nan)`` when ``n == 0``; ``(0.0, 1.0)`` when ``n == 1`` and the
        value is fractional, as no spread can be estimated from one image.
    """
    z = _z(confidence)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values has shape {v.shape}, expected (n,)")
    if not np.all((v >= 0) & (v <= 1)):
        raise ValueError("values must lie in [0, 1] and not be NaN")
    n = v.size
    if n == 0:
        return math.nan, math.nan
    if np.all((v == 0) | (v == 1)):
        return wilson_interval(int(np.count_nonzero(v)), n, confidence=confidence)
    if n == 1:
        return 0.0, 1.0
    mean = float(v.mean())
    half = z * float(v.std(ddof=1)) / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    # statistics.NormalDist gives the same quantile as scipy.stats.norm.ppf
    # without the second or so that importing scipy.stats costs every caller.
    return NormalDist().inv_cdf(0.5 + confidence / 2)


# --------------------------------------------------------------------------- accuracies


def original_accuracy(
    topk: np.ndarray,
    labels: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
    valid: np.ndarray | None = None,
) -> list[Metric]:
    """Top-k accuracy against the given labels (evaluation ``"original"``).

    Parameters
    ----------
    topk : array of int, shape (N, K)
        Class indices sorted by decreasing score.
    labels : array of int, shape (N,)
        Given labels; ``-1`` leaves the image out.
    ks : sequence of int, keyword-only
        Which k to report; those above K are skipped.
    valid : array of bool, shape (N,), optional
        Images that may be evaluated; default all.

    Returns
    -------
    list of Metric
        ``"top1"``, ``"top5"``, ... with ``n`` the number of valid images with a
        label.
    """
    topk, valid = _as_topk_valid(topk, valid)
    labels = _as_labels(labels, len(topk))
    return _original(topk, labels, valid, _as_ks(ks))


def real_accuracy(
    topk: np.ndarray,
    real_sets: Sequence[Sequence[int]],
    *,
    ks: Sequence[int] = (1, 5),
    valid: np.ndarray | None = None,
) -> list[Metric]:
    """Top-k accuracy against ReaL label sets (evaluation ``"real"``).

    Matches ``timm.data.RealLabelsImagenet``: an image is right at k when any
    of ``topk[i, :k]`` is in its ReaL set, and images with an empty set are
    left out.

    Parameters
    ----------
    topk : array of int, shape (N, K)
        Class indices sorted by decreasing score.
    real_sets : sequence of N lists of int
        ReaL labels of each image; ``[]`` when no class fits.
    ks : sequence of int, keyword-only
        Which k to report; those above K are skipped.
    valid : array of bool, shape (N,), optional
        Images that may be evaluated; default all.

    Returns
    -------
    list of Metric
        ``"top1"``, ``"top5"``, ...
    """
    topk, valid = _as_topk_valid(topk, valid)
    sets = _as_sets(real_sets, len(topk), "real_sets")
    return _set_accuracy("real", topk, sets, valid, _as_ks(ks))


def clean_accuracy(
    topk: np.ndarray,
    labels: np.ndarray,
    real_sets: Sequence[Sequence[int]],
    *,
    valid: np.ndarray | None = None,
) -> list[Metric]:
    """Top-1 accuracy on the images whose given label is in their ReaL set.

    Evaluation ``"clean"``: those are the images on which the original and the
    ReaL annotation agree, so errors there are the model's, not the label's.

    Parameters
    ----------
    topk : array of int, shape (N, K)
        Class indices sorted by decreasing score.
    labels : array of int, shape (N,)
        Given labels; ``-1`` leaves the image out.
    real_sets : sequence of N lists of int
        ReaL labels of each image; ``[]`` leaves the image out.
    valid : array of bool, shape (N,), optional
        Images that may be evaluated; default all.

    Returns
    -------
    list of Metric
        One row, ``"top1"``.
    """
    topk, valid = _as_topk_valid(topk, valid)
    labels = _as_labels(labels, len(topk))
    sets = _as_sets(real_sets, len(topk), "real_sets")
    return _clean(topk, labels, sets, valid)


def relabeled_accuracy(
    topk: np.ndarray,
    label_sets: Sequence[Sequence[int]],
    *,
    ks: Sequence[int] = (1, 5),
    valid: np.ndarray | None = None,
) -> list[Metric]:
    """Top-k accuracy against the cleaned label sets (evaluation ``"relabeled"``).

    Parameters
    ----------
    topk : array of int, shape (N, K)
        Class indices sorted by decreasing score.
    label_sets : sequence of N lists of int
        Labels after review; ``[]`` means excluded or no class fits, and
        leaves the image out.
    ks : sequence of int, keyword-only
        Which k to report; those above K are skipped.
    valid : array of bool, shape (N,), optional
        Images that may be evaluated; default all.

    Returns
    -------
    list of Metric
        ``"top1"``, ``"top5"``, ...
    """
    topk, valid = _as_topk_valid(topk, valid)
    sets = _as_sets(label_sets, len(topk), "label_sets")
    return _set_accuracy("relabeled", topk, sets, valid, _as_ks(ks))


def _original(topk: np.ndarray, labels: np.ndarray, valid: np.ndarray, ks: tuple[int, ...]) -> list[Metric]:
    return _accuracy("original", topk == labels[:, None], valid & (labels >= 0), ks)


def _set_accuracy(
    evaluation: str, topk: np.ndarray, sets: _Sets, valid: np.ndarray, ks: tuple[int, ...]
) -> list[Metric]:
    rows = np.arange(len(topk))[:, None]
    return _accuracy(evaluation, _contains(sets, rows, topk), valid & (sets.sizes > 0), ks)


def _clean(topk: np.ndarray, labels: np.ndarray, sets: _Sets, valid: np.ndarray) -> list[Metric]:
    agreed = (labels >= 0) & _contains(sets, np.arange(len(labels)), labels)
    return _accuracy("clean", topk[:, :1] == labels[:, None], valid & agreed, (1,))


def _accuracy(evaluation: str, hits: np.ndarray, include: np.ndarray, ks: tuple[int, ...]) -> list[Metric]:
    """Top-k rows from ``hits`` (bool (N, K), True where ``topk[i, j]`` is right)."""
    h = hits[include]
    big_k = h.shape[1]
    # Rank of the first right answer (K when none) answers every k at once.
    first = np.where(h.any(axis=1), h.argmax(axis=1), big_k)
    return [_rate(evaluation, f"top{k}", int(np.count_nonzero(first < k)), len(h)) for k in ks if k <= big_k]


def _rate(evaluation: str, name: str, successes: int, n: int, params: dict[str, Any] | None = None) -> Metric:
    low, high = wilson_interval(successes, n)
    value = successes / n if n else math.nan
    return Metric(evaluation, name, value, low, high, n, dict(params or {}))


def _mean(evaluation: str, name: str, values: np.ndarray, params: dict[str, Any]) -> Metric:
    low, high = mean_interval(values)
    value = float(values.mean()) if len(values) else math.nan
    return Metric(evaluation, name, value, low, high, len(values), dict(params))


# --------------------------------------------------------------------------- sigmoid


def sigmoid_evaluation(
    scores: np.ndarray,
    real_sets: Sequence[Sequence[int]],
    *,
    threshold: float | None = None,
    valid: np.ndarray | None = None,
    max_set: int = 20,
    seed: int = 0,
    scale: str = "probability",
) -> list[Metric]:
    """Multi-label evaluation of thresholded per-class scores against ReaL sets.

    The predicted set of image i is ``{c : scores[i, c] > threshold}`` plus the
    argmax (so it is never empty), capped to the ``max_set`` highest scores.
    The cap keeps the work and memory at O(N * max_set) rather than O(N * C),
    and costs nothing in practice: ReaL sets rarely hold more than a few
    classes, so a prediction of 20+ classes is already scored as poor.

    With ``threshold=None`` the threshold is cross-fitted so the reported
    figures are not tuned on the images they are measured on: the images are
    split in two folds by a permutation seeded with ``seed``, each fold's
    threshold maximising mean F1 (see :func:`choose_threshold`) is applied to
    the *other* fold, and the per-image results of both folds are pooled.
    The reported threshold is the mean of the two chosen ones.

    Parameters
    ----------
    scores : array of float, shape (N, C)
        Independent per-class probabilities, e.g. ``sigmoid(logits)``, in [0, 1].
    real_sets : sequence of N lists of int
        ReaL labels of each image; ``[]`` leaves the image out.
    threshold : float, keyword-only, optional
        Fixed threshold; default cross-fitted.
    valid : array of bool, shape (N,), optional
        Images that may be evaluated; rows that are not valid are never read.
    max_set : int, keyword-only
        Largest predicted set.
    seed : int, keyword-only
        Seed of the fold split.
    scale : {"probability", "logit"}, keyword-only
        ``"probability"``: scores are sigmoid outputs in [0, 1] and the
        cross-fit grid is sigmoid(-4), ..., sigmoid(14). ``"logit"``: scores
        are the logits themselves (any finite value; sigmoid is monotone, so
        the predicted sets are the same), and the grid also takes quantiles of
        the observed top scores. Why: a model whose logits sit far above 14
        (SqueezeNet's end in a ReLU, 0 to 66) saturates a float32 sigmoid at
        exactly 1.0 for dozens of classes, which erases their order and puts
        every useful threshold off the fixed grid. ``threshold`` is on the
        same scale.

    Returns
    -------
    list of Metric
        Means of the per-image ``"precision"`` (|P∩R| / |P|), ``"recall"``
        (|P∩R| / |R|), ``"f1"`` (2|P∩R| / (|P| + |R|)) and ``"exact_match"``
        (P == R), each with ``params={"threshold": t, "threshold_method": m}``
        where m is ``"fixed"`` or ``"2-fold cross-fit, max F1"``.

    Raises
    ------
    ValueError
        On malformed input, or when cross-fitting is asked for with only one
        evaluable image.
    """
    scores, sets, valid = _as_sigmoid_inputs(scores, real_sets, valid, max_set)
    threshold = _as_threshold(threshold)
    return _sigmoid(scores, sets, valid, threshold, max_set, seed, _as_scale(scale))


def choose_threshold(
    scores: np.ndarray,
    real_sets: Sequence[Sequence[int]],
    *,
    grid: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    max_set: int = 20,
) -> float:
    """The threshold of ``grid`` that maximises mean per-image F1.

    Predicted sets are built as in :func:`sigmoid_evaluation`. Ties go to the
    smallest threshold.

    Parameters
    ----------
    scores : array of float, shape (N, C)
        Independent per-class probabilities in [0, 1].
    real_sets : sequence of N lists of int
        ReaL labels of each image; ``[]`` leaves the image out.
    grid : array of float, shape (G,), keyword-only, optional
        Candidate thresholds; default sigmoid(-4), sigmoid(-3.75), ..., sigmoid(14).
    valid : array of bool, shape (N,), optional
        Images that may be used; default all.
    max_set : int, keyword-only
        Largest predicted set.

    Returns
    -------
    float
        The chosen threshold.
    """
    scores, sets, valid = _as_sigmoid_inputs(scores, real_sets, valid, max_set)
    grid = _DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
        raise ValueError(f"grid must be a non-empty 1-D array of finite floats, got {grid!r}")
    rows = np.flatnonzero(valid & (sets.sizes > 0))
    if rows.size == 0:
        raise ValueError("no valid image with a non-empty ReaL set to choose a threshold on")
    return _best_threshold(_rank(scores, sets, rows, max_set), grid)


def _sigmoid(
    scores: np.ndarray,
    sets: _Sets,
    valid: np.ndarray,
    threshold: float | None,
    max_set: int,
    seed: int,
    scale: str = "probability",
) -> list[Metric]:
    rows = np.flatnonzero(valid & (sets.sizes > 0))
    if threshold is None and rows.size == 1:
        raise ValueError(
            "cross-fitting the threshold needs at least 2 valid images with a non-empty "
            "ReaL set, got 1; pass threshold= explicitly"
        )
    ranked = _rank(scores, sets, rows, max_set, scale)
    if threshold is not None:
        stats, method = _per_image(ranked, threshold), "fixed"
    elif rows.size == 0:
        stats, threshold, method = _per_image(ranked, 0.5), math.nan, _CROSS_FIT
    else:
        perm = np.random.default_rng(seed).permutation(rows.size)
        fold_a, fold_b = ranked.take(perm[: rows.size // 2]), ranked.take(perm[rows.size // 2 :])
        # The logit grid's quantiles come from every image's scores, never from labels.
        grid = _DEFAULT_GRID if scale == "probability" else _logit_grid(ranked)
        t_a, t_b = _best_threshold(fold_a, grid), _best_threshold(fold_b, grid)
        on_a, on_b = _per_image(fold_a, t_b), _per_image(fold_b, t_a)
        stats = {name: np.concatenate([on_a[name], on_b[name]]) for name in on_a}
        threshold, method = (t_a + t_b) / 2, _CROSS_FIT
    params = {"threshold": float(threshold), "threshold_method": method, "threshold_scale": scale}
    return [_mean("sigmoid", name, values, params) for name, values in stats.items()]


def _logit_grid(ranked: _Ranked) -> np.ndarray:
    top = ranked.scores[np.isfinite(ranked.scores)]
    quantiles = np.quantile(top, np.linspace(0.0, 1.0, 201)) if top.size else np.empty(0)
    return np.unique(np.concatenate([_LOGIT_GRID, quantiles]))


def _rank(scores: np.ndarray, sets: _Sets, rows: np.ndarray, max_set: int, scale: str = "probability") -> _Ranked:
    """Top ``max_set`` classes of ``scores[rows]``, read in chunks of rows."""
    c = scores.shape[1]
    m = min(max_set, c)
    top_idx = np.empty((rows.size, m), dtype=np.int64)
    top_val = np.empty((rows.size, m), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // c)
    for start in range(0, rows.size, step):
        chunk = rows[start : start + step]
        block = np.asarray(scores[chunk], dtype=np.float64)
        if scale == "probability":
            _check_probabilities(block, chunk)
        else:
            _check_finite(block, chunk)
        cand = np.argpartition(block, c - m, axis=1)[:, c - m :]
        vals = np.take_along_axis(block, cand, axis=1)
        # Ties go to the lower class index, as np.argmax would.
        order = np.lexsort((cand, -vals), axis=1)
        top_idx[start : start + step] = np.take_along_axis(cand, order, axis=1)
        top_val[start : start + step] = np.take_along_axis(vals, order, axis=1)
    hits = _contains(sets, rows[:, None], top_idx)
    return _Ranked(top_val, np.cumsum(hits, axis=1), sets.sizes[rows])


def _per_image(ranked: _Ranked, threshold: float) -> dict[str, np.ndarray]:
    # Scores are sorted, so the predicted set is a prefix of each row and
    # |P∩R| is read off the running count of hits.
    size = np.maximum(1, np.count_nonzero(ranked.scores > threshold, axis=1))
    inter = np.take_along_axis(ranked.cum_hits, size[:, None] - 1, axis=1)[:, 0]
    truth = ranked.set_sizes
    return {
        "precision": inter / size,
        "recall": inter / truth,
        "f1": 2 * inter / (size + truth),
        "exact_match": ((inter == size) & (size == truth)).astype(np.float64),
    }


def _best_threshold(ranked: _Ranked, grid: np.ndarray) -> float:
    f1 = [float(_per_image(ranked, float(t))["f1"].mean()) for t in grid]
    return float(grid[int(np.argmax(f1))])


# --------------------------------------------------------------------------- all at once


def evaluate_all(
    topk: np.ndarray,
    labels: np.ndarray,
    *,
    real_sets: Sequence[Sequence[int]] | None = None,
    scores: np.ndarray | None = None,
    label_sets: Sequence[Sequence[int]] | None = None,
    valid: np.ndarray | None = None,
    threshold: float | None = None,
    scores_scale: str = "probability",
) -> list[Metric]:
    """Every evaluation the inputs allow, each input validated once.

    ``original`` always; ``real`` and ``clean`` when ``real_sets`` is given;
    ``sigmoid`` when both ``real_sets`` and ``scores`` are given; ``relabeled``
    when ``label_sets`` is given. k is 1 and 5 (where K allows).

    Parameters
    ----------
    topk : array of int, shape (N, K)
        Class indices sorted by decreasing score.
    labels : array of int, shape (N,)
        Given labels; ``-1`` leaves the image out.
    real_sets, label_sets : sequence of N lists of int, keyword-only, optional
        ReaL sets and reviewed label sets; ``[]`` leaves the image out.
    scores : array of float, shape (N, C), keyword-only, optional
        Per-class probabilities for the sigmoid evaluation.
    valid : array of bool, shape (N,), keyword-only, optional
        Images that may be evaluated; default all.
    threshold : float, keyword-only, optional
        Fixed sigmoid threshold, on ``scores_scale``; default cross-fitted.
    scores_scale : {"probability", "logit"}, keyword-only
        What ``scores`` hold (see :func:`sigmoid_evaluation`'s ``scale``).

    Returns
    -------
    list of Metric
        In the order original, real, clean, sigmoid, relabeled.
    """
    topk, valid = _as_topk_valid(topk, valid)
    n, ks = len(topk), (1, 5)
    labels = _as_labels(labels, n)
    real = None if real_sets is None else _as_sets(real_sets, n, "real_sets")
    relabeled = None if label_sets is None else _as_sets(label_sets, n, "label_sets")
    sigmoid = real is not None and scores is not None
    if sigmoid:
        scores = _as_scores(scores, n)
        _check_set_classes(real, scores.shape[1], "real_sets")
        threshold = _as_threshold(threshold)
    out = _original(topk, labels, valid, ks)
    if real is not None:
        out += _set_accuracy("real", topk, real, valid, ks)
        out += _clean(topk, labels, real, valid)
    if sigmoid:
        out += _sigmoid(scores, real, valid, threshold, 20, 0, _as_scale(scores_scale))
    if relabeled is not None:
        out += _set_accuracy("relabeled", topk, relabeled, valid, ks)
    return out


def confusion_pairs(
    top1: np.ndarray,
    labels: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    limit: int | None = 50,
) -> list[tuple[int, int, int]]:
    """The most frequent (given label, top-1 prediction) disagreements.

    Parameters
    ----------
    top1 : array of int, shape (N,) or (N, K)
        Top-1 predictions; of a (N, K) ``topk`` only column 0 is used.
    labels : array of int, shape (N,)
        Given labels; ``-1`` leaves the image out.
    valid : array of bool, shape (N,), keyword-only, optional
        Images that may be counted; default all.
    limit : int or None, keyword-only
        Most pairs returned; None for all.

    Returns
    -------
    list of (given, predicted, count)
        Pairs with ``given != predicted``, by count descending, then given and
        predicted ascending.
    """
    top1 = np.asarray(top1)
    topk, valid = _as_topk_valid(top1[:, None] if top1.ndim == 1 else top1, valid)
    labels = _as_labels(labels, len(topk))
    if limit is not None and operator.index(limit) < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    pred = topk[:, 0]
    keep = valid & (labels >= 0) & (pred != labels)
    keys, counts = np.unique(labels[keep] * 2**_SHIFT + pred[keep], return_counts=True)
    # np.unique sorted the keys by (given, predicted); a stable sort keeps that order
    # within equal counts.
    order = np.argsort(-counts, kind="stable")[:limit]
    given, predicted = keys[order] >> _SHIFT, keys[order] & (2**_SHIFT - 1)
    return list(zip(given.tolist(), predicted.tolist(), counts[order].tolist(), strict=True))


# --------------------------------------------------------------------------- validation


def _as_topk_valid(topk: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(topk)
    if t.ndim != 2 or t.shape[1] < 1:
        raise ValueError(f"topk has shape {t.shape}, expected (N, K) with K >= 1")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"topk has dtype {t.dtype}, expected integer class indices")
    t = t.astype(np.int64, copy=False)
    mask = _as_valid(valid, len(t))
    used = t[mask]
    if used.size and (used.min() < 0 or used.max() > _MAX_CLASS):
        raise ValueError(
            f"topk holds class indices in [{used.min()}, {used.max()}] on valid images, expected [0, {_MAX_CLASS}]"
        )
    return t, mask


def _as_valid(valid: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if valid is None else as_mask(valid, n)


def _as_labels(labels: np.ndarray, n: int) -> np.ndarray:
    return as_labels(labels, n, _MAX_CLASS)


def _as_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({operator.index(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {tuple(ks)}")
    return out


def _as_sets(sets: Sequence[Sequence[int]], n: int, name: str) -> _Sets:
    try:
        count = len(sets)
        sizes = np.fromiter((len(s) for s in sets), dtype=np.int64, count=count)
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of N lists of ints ({e})") from None
    if count != n:
        raise ValueError(f"{name} has {count} entries, expected N={n}")
    flat = np.asarray(list(itertools.chain.from_iterable(sets)))
    if flat.size == 0:
        return _Sets(np.empty(0, dtype=np.int64), np.zeros(n, dtype=np.int64))
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"{name} must hold ints, found values of dtype {flat.dtype}")
    bad = np.flatnonzero((flat < 0) | (flat > _MAX_CLASS))
    if bad.size:
        row = int(np.searchsorted(np.cumsum(sizes), bad[0], side="right"))
        raise ValueError(f"{name}[{row}] holds class {flat[bad[0]]}, expected classes in [0, {_MAX_CLASS}]")
    rows = np.repeat(np.arange(n, dtype=np.int64), sizes)
    keys = np.unique(rows * 2**_SHIFT + flat.astype(np.int64))
    return _Sets(keys, np.bincount(keys >> _SHIFT, minlength=n))


def _contains(sets: _Sets, rows: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Whether ``classes`` is in the set of ``rows``, elementwise (broadcast) -> bool."""
    query = rows * 2**_SHIFT + classes
    if sets.keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sets.keys, query), sets.keys.size - 1)
    return sets.keys[pos] == query


def _as_scores(scores: np.ndarray, n: int) -> np.ndarray:
    # No copy or cast here: scores may be a large float32 array or a memmap,
    # and is read chunk by chunk.
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        scores = np.asarray(scores)
    if len(scores.shape) != 2 or scores.shape[0] != n or scores.shape[1] < 1:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected (N, C)=({n}, C)")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores has dtype {scores.dtype}, expected floats")
    return scores


def _as_sigmoid_inputs(
    scores: np.ndarray, real_sets: Sequence[Sequence[int]], valid: np.ndarray | None, max_set: int
) -> tuple[np.ndarray, _Sets, np.ndarray]:
    if operator.index(max_set) < 1:
        raise ValueError(f"max_set must be >= 1, got {max_set}")
    try:
        n = len(real_sets)
    except TypeError:
        raise ValueError("real_sets must be a sequence of N lists of ints") from None
    scores = _as_scores(scores, n)
    sets = _as_sets(real_sets, n, "real_sets")
    _check_set_classes(sets, scores.shape[1], "real_sets")
    return scores, sets, _as_valid(valid, n)


def _as_threshold(threshold: float | None) -> float | None:
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite float or None, got {threshold}")
    return None if threshold is None else float(threshold)


def _check_set_classes(sets: _Sets, c: int, name: str) -> None:
    # A class the scores have no column for can never be predicted: the sets and
    # the scores come from different label spaces.
    if sets.keys.size:
        top = int((sets.keys & (2**_SHIFT - 1)).max())
        if top >= c:
            raise ValueError(f"{name} holds class {top}, but scores has only C={c} columns")


def _as_scale(scale: str) -> str:
    if scale not in _SCALES:
        raise ValueError(f"scale is {scale!r}, expected one of {_SCALES}")
    return scale


def _check_finite(block: np.ndarray, rows: np.ndarray) -> None:
    ok = np.isfinite(block)
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise ValueError(f"scores[{rows[i]}, {j}] is {block[i, j]}, expected a finite logit")


def _check_probabilities(block: np.ndarray, rows: np.ndarray) -> None:
    ok = (block >= 0) & (block <= 1)  # False for NaN too
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise ValueError(
            f"scores[{rows[i]}, {j}] is {block[i, j]}, expected a probability in [0, 1] "
            "(pass sigmoid(logits), not logits)"
        )
