"""Flag suspicious labels from an ensemble of models' out-of-sample probabilities.

:func:`find_label_issues` turns M models' ``(N, C)`` probability matrices and
the given labels into one row per image: a label-quality score (low = more
suspicious), whether the label is flagged for review, what a reviewer should
probably pick instead, and which kind of issue it looks like.

How it works, in order:

1. **Calibrate each model.** Every model's probabilities are temperature
   scaled (``p ** (1/T)``, renormalised; the same as ``softmax(logits / T)``)
   with ``T`` fitted by minimising the negative log-likelihood of the given
   labels (Guo et al. 2017, "On calibration of modern neural networks"). The
   given labels are mostly right, so this fit needs no clean labels; it
   undoes the softening of label-smoothed training, which otherwise spreads
   ~10% of every row over a thousand tail classes and blurs the margin below.
2. **Ensemble.** The calibrated matrices are averaged: a uniform model average
   by default; ``weights="fit"`` weights each model by how well it explains the
   given labels (see :func:`find_label_issues`).
3. **Score.** ``label_quality`` is one of cleanlab's label-quality scores of the
   ensemble (:mod:`cleanlab.rank`); the default is ``"normalized_margin"``,
   ``(p[given] - max_{k != given} p[k] + 1) / 2``.
4. **Flag.** The number of issues is cleanlab's confident-learning estimate
   (the off-diagonal count of :func:`cleanlab.count.num_label_issues`), and
   the flagged images are that many with the lowest ``label_quality``, so the
   flagged set is always a prefix of the ranking. ``frac_flagged`` replaces the
   estimate by a fixed fraction.
5. **Classify.** Issue kinds are plug-ins (:class:`IssueKind`), like cleanlab's
   issue managers: each turns the ensemble summary into a ``<name>_score`` in
   [0, 1] and ``is_<name>_issue`` booleans. A flagged image gets the kind with
   the highest score (ties go to the kind listed first). The per-kind booleans
   are diagnostics computed for every image; only ``is_label_issue`` flags.

Measured on 1,300 ImageNet validation images with three EfficientNet-Lite
models (``reports/flag_quality.md``), the calibrated margin ranks ReaL-confirmed
label errors slightly better than cleanlab's normalized margin on the raw mean
probabilities.

Conventions: ``labels`` are ints in ``0..C-1`` with ``-1`` excluding an image;
``valid`` is bool (N,), False for images that could not be scored (their rows
may be NaN and are ignored). Excluded and invalid images get a row with NaN
scores and are never flagged.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from audit._checks import as_labels, as_mask

__all__ = [
    "DEFAULT_KINDS",
    "METHODS",
    "WEIGHTS",
    "Ensemble",
    "IssueKind",
    "ModelDisagreement",
    "MultiLabel",
    "NoFit",
    "WrongLabel",
    "find_label_issues",
    "flag_params",
]

METHODS = ("normalized_margin", "self_confidence", "confidence_weighted_entropy")
# How the calibrated models are averaged (see find_label_issues).
WEIGHTS = ("equal", "fit", "softmax")
# EM for the mixture weights: stop when no weight moves more than this, or after so many steps.
_EM_TOL = 1e-9
_EM_STEPS = 1000
# Rows handled at once: bounds each float32 temporary to ~4 MiB (cache-sized) whatever N is.
_CHUNK_ELEMENTS = 2**20
# One scalar per model is fitted; a few thousand rows pin it down to ~1%.
_FIT_ROWS = 4096
_T_BOUNDS = (0.05, 20.0)
# Zero probabilities (float32 underflow) get this floor before taking logs.
_TINY = 1e-30
# Rows must sum to 1 within this; float32 softmax over 1,000 classes is off by ~1e-6.
_SUM_TOL = 1e-3
# cleanlab.count._reduce_issues: the given label counts as the argmax within this.
_ARGMAX_TOL = 1e-6


# --------------------------------------------------------------------------- ensemble summary


@dataclass(frozen=True)
class Ensemble:
    """Per-image summary of the calibrated ensemble, the input of every issue kind.

    Covers only the ``n`` assessed images (valid, with a label). Every array is
    indexed by assessed image, in input order.

    Attributes
    ----------
    index : ndarray of int64, shape (n,)
        Row of each assessed image in the caller's arrays.
    labels : ndarray of int64, shape (n,)
        Given label.
    p_given : ndarray of float64, shape (n,)
        Ensemble probability of the given label.
    top_class, p_top : ndarray, shape (n,)
        Ensemble argmax and its probability.
    other_class, p_other : ndarray, shape (n,)
        Most probable class other than the given label, and its probability.
    entropy : ndarray of float64, shape (n,)
        Entropy of the ensemble row divided by ``log(C)``, in [0, 1].
    model_top : ndarray of int64, shape (M, n)
        Each model's argmax.
    disagreement : ndarray of float64, shape (n,)
        Jensen-Shannon divergence among the M calibrated models divided by
        ``log(M)``, in [0, 1]; 0 when M = 1.
    num_classes : int
        C.
    temperatures : tuple of float, length M
        Temperature applied to each model.
    weights : tuple of float, length M
        Weight of each model in the ensemble average (summing to 1).
    """

    index: np.ndarray
    labels: np.ndarray
    p_given: np.ndarray
    top_class: np.ndarray
    p_top: np.ndarray
    other_class: np.ndarray
    p_other: np.ndarray
    entropy: np.ndarray
    model_top: np.ndarray
    disagreement: np.ndarray
    num_classes: int
    temperatures: tuple[float, ...]
    weights: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def n_models(self) -> int:
        return len(self.temperatures)


# --------------------------------------------------------------------------- issue kinds


class IssueKind(abc.ABC):
    """An issue-kind plug-in: one kind of label problem, scored per image.

    The contract, like cleanlab's ``IssueManager``: a class attribute ``name``
    (a Python identifier; it names the output columns ``<name>_score`` and
    ``is_<name>_issue``), and :meth:`score`, a pure vectorised function of an
    :class:`Ensemble` returning float (n,) in [0, 1], 1 = strongly this kind.
    :meth:`find_issues` thresholds the score; :meth:`suggest` says which label
    a reviewer should probably pick when an image is of this kind.

    Parameters
    ----------
    threshold : float, optional
        Score at or above which the kind fires; default ``default_threshold``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.5

    def __init__(self, threshold: float | None = None) -> None:
        t = self.default_threshold if threshold is None else threshold
        if not isinstance(t, numbers.Real) or not 0 <= t <= 1:
            raise ValueError(f"{type(self).__name__} threshold must be a float in [0, 1], got {t!r}")
        self.threshold = float(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"

    @abc.abstractmethod
    def score(self, ens: Ensemble) -> np.ndarray:
        """Float (n,) in [0, 1]: how strongly each image shows this kind."""

    def find_issues(self, ens: Ensemble) -> tuple[np.ndarray, np.ndarray]:
        """``(<name>_score, is_<name>_issue)``, each of shape (n,)."""
        s = np.asarray(self.score(ens), dtype=np.float64)
        return s, s >= self.threshold

    def suggest(self, ens: Ensemble) -> tuple[np.ndarray, np.ndarray]:
        """``(label, confidence)``, each (n,): what to pick when an image is of this kind.

        Default: the best class other than the given one, with its probability.
        """
        return ens.other_class, ens.p_other

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "class": type(self).__name__, "threshold": self.threshold}


class WrongLabel(IssueKind):
    """The ensemble prefers one other class: score ``max(0, p[other] - p[given])``.

    Fires when another class beats the given one by half the probability mass.
    """

    name = "wrong_label"
    description = "another single class is clearly more probable than the given label"
    default_threshold = 0.5

    def score(self, ens: Ensemble) -> np.ndarray:
        return np.clip(ens.p_other - ens.p_given, 0.0, 1.0)


class MultiLabel(IssueKind):
    """Two classes both fit: score ``2 * min(p[given], p[other])``.

    1 at a 0.5 / 0.5 split. Fires when both hold at least 0.25; the suggestion
    is the other class, as a label to add rather than a replacement.
    """

    name = "multi_label"
    description = "the given label and another class both hold substantial probability"
    default_threshold = 0.5

    def score(self, ens: Ensemble) -> np.ndarray:
        return np.clip(2.0 * np.minimum(ens.p_given, ens.p_other), 0.0, 1.0)


class NoFit(IssueKind):
    """No class is confidently predicted: score ``1 - max_k p[k]``.

    Fires when no class reaches 0.25; the suggestion is ``-1`` (no class fits)
    with confidence equal to the score.
    """

    name = "no_fit"
    description = "no class is confidently predicted; perhaps none of the classes fits"
    default_threshold = 0.75

    def score(self, ens: Ensemble) -> np.ndarray:
        return np.clip(1.0 - ens.p_top, 0.0, 1.0)

    def suggest(self, ens: Ensemble) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(ens), -1, dtype=np.int64), self.score(ens)


class ModelDisagreement(IssueKind):
    """The models disagree: score = Jensen-Shannon divergence / log(M).

    The divergence is the mutual information between "which model" and "which
    class", so it is high only when the models are each confident about
    different classes. Fires when the models' argmaxes are not unanimous and
    the score reaches the threshold; the suggestion is the ensemble's argmax.
    """

    name = "model_disagreement"
    description = "the models' top classes differ"
    default_threshold = 0.0

    def score(self, ens: Ensemble) -> np.ndarray:
        return np.clip(ens.disagreement, 0.0, 1.0)

    def find_issues(self, ens: Ensemble) -> tuple[np.ndarray, np.ndarray]:
        s = self.score(ens)
        split = (ens.model_top != ens.model_top[:1]).any(axis=0)
        return s, split & (s >= self.threshold)

    def suggest(self, ens: Ensemble) -> tuple[np.ndarray, np.ndarray]:
        return ens.top_class, ens.p_top


DEFAULT_KINDS: tuple[IssueKind, ...] = (WrongLabel(), MultiLabel(), NoFit(), ModelDisagreement())


# --------------------------------------------------------------------------- public API


def flag_params(
    *,
    method: str = "normalized_margin",
    temperature: float | Sequence[float] | str = "fit",
    frac_flagged: float | None = None,
    kinds: Sequence[IssueKind] | None = None,
    weights: str | Sequence[float] = "equal",
) -> dict[str, Any]:
    """Every setting :func:`find_label_issues` uses, as a JSON-able dict.

    Store it beside the results; :func:`find_label_issues` attaches it, plus
    what it fitted on the data (temperatures, issue count), as
    ``df.attrs["flag_params"]``.

    Parameters
    ----------
    method, temperature, frac_flagged, kinds, weights
        As for :func:`find_label_issues`.

    Returns
    -------
    dict
    """
    import cleanlab

    from audit import __version__

    _check_method(method)
    _check_temperature(temperature, None)
    _check_frac(frac_flagged)
    kinds = _check_kinds(kinds)
    _check_weights(weights, None)
    return {
        "cleanlab_version": cleanlab.__version__,
        "numpy_version": np.__version__,
        "audit_version": __version__,
        "method": method,
        "temperature": temperature if isinstance(temperature, str | numbers.Real) else [float(t) for t in temperature],
        "temperature_fit": {
            "objective": "negative log-likelihood of the given labels",
            "bounds": list(_T_BOUNDS),
            "max_rows": _FIT_ROWS,
            "rows": "evenly spaced over the assessed images",
        },
        "ensemble": _ENSEMBLE_RULES[weights] if isinstance(weights, str) else "given weights",
        "weights": weights if isinstance(weights, str) else [float(w) for w in weights],
        "frac_flagged": frac_flagged,
        "flag_rule": (
            f"the {frac_flagged} fraction of assessed images with the lowest label_quality"
            if frac_flagged is not None
            else "the k images with the lowest label_quality, k = cleanlab confident-learning off-diagonal "
            "count (cleanlab.count.num_label_issues, estimation_method='off_diagonal'), with classes absent "
            "from the labels given the mean self-confidence as their confident threshold; plus every image "
            "whose wrong_label kind fires"
        ),
        "kinds": [k.params() for k in kinds],
        "kind_rule": "a flagged image gets the kind with the highest score; ties go to the kind listed first",
    }


def find_label_issues(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    method: str = "normalized_margin",
    temperature: float | Sequence[float] | str = "fit",
    frac_flagged: float | None = None,
    kinds: Sequence[IssueKind] | None = None,
    weights: str | Sequence[float] = "equal",
) -> pd.DataFrame:
    """Score every label and flag the suspicious ones.

    Parameters
    ----------
    probs : sequence of M arrays, each float (N, C)
        Out-of-sample class probabilities of each model, rows summing to 1.
        Memory-mapped arrays are read in chunks, never copied whole; the
        calibrated ensemble is held as one float32 (N, C) matrix (200 MB at
        50,000 x 1,000). Rows of invalid images may hold anything (NaN) and
        are ignored.
    labels : array of int, shape (N,)
        Given labels in ``0..C-1``; ``-1`` leaves the image out.
    valid : array of bool, shape (N,), optional
        False for images that could not be scored. Default: the images whose
        rows are finite in every model.
    method : {"normalized_margin", "self_confidence", "confidence_weighted_entropy"}
        cleanlab label-quality score of the calibrated ensemble
        (:func:`cleanlab.rank.get_label_quality_scores`). Default
        ``"normalized_margin"``: it ranked real label errors best (see
        ``reports/flag_quality.md``).
    temperature : "fit", float or sequence of M floats
        ``"fit"`` (default) fits one temperature per model on the given labels;
        a number applies that temperature to every model; 1.0 leaves the
        probabilities as they are.
    frac_flagged : float in [0, 1], optional
        Flag this fraction of the assessed images instead of cleanlab's
        estimate of the number of label issues.
    kinds : sequence of IssueKind, optional
        Issue-kind plug-ins; default :data:`DEFAULT_KINDS`.
    weights : {"equal", "fit", "softmax"} or sequence of M non-negative floats
        How the calibrated models are averaged. ``"equal"`` (default): the
        uniform mean. ``"fit"``: the convex combination that maximises the
        likelihood of the given labels, ``sum_i log sum_m w_m q_m(y_i)`` over
        the simplex (the linear opinion pool of stacking; a concave objective,
        so EM reaches its maximum), fitted on the same rows as the
        temperatures: a model that explains the labels better counts more,
        a model that adds nothing the others lack drops towards 0, and no
        parameter is chosen by hand. ``"softmax"``: ``w_m`` proportional to
        ``exp(-NLL_m)``, each model's mean negative log-likelihood of the
        given labels on its own (cheaper to explain, but blind to
        redundancy between models). M numbers: those weights, normalised.
        The ``model_disagreement`` kind then measures the weighted
        Jensen-Shannon divergence, divided by the entropy of the weights.
        Measured against ReaL (``reports/flag_quality.md``) neither fitted
        weighting beats the uniform mean: the likelihood of the given labels
        rewards agreeing with them, not the diversity that exposes errors.

    Returns
    -------
    pandas.DataFrame
        N rows in input order, columns:

        - ``index`` (int64): row in the inputs.
        - ``label_quality`` (float64 in [0, 1]): low = more suspicious; NaN
          for excluded or invalid images.
        - ``is_label_issue`` (bool).
        - ``suggested_label`` (int64): the label a reviewer should probably
          pick; ``-1`` when no class fits or the image was not assessed. It is
          the given label for unflagged images.
        - ``suggested_confidence`` (float64 in [0, 1]): ensemble probability of
          the suggestion (for ``-1`` on a flagged image, the no-fit score).
        - ``issue_kind`` (str): a kind's ``name`` for flagged images, else ``""``.
        - ``rank`` (Int64): 1 = lowest label quality among flagged; null for
          unflagged images.
        - ``<name>_score`` (float64 in [0, 1]) and ``is_<name>_issue`` (bool)
          for each kind.

        ``df.attrs["flag_params"]`` holds :func:`flag_params` plus the fitted
        temperatures and counts.

    Raises
    ------
    ValueError
        With what was expected and what was seen, for malformed inputs.
    """
    probs = _check_probs(probs)
    n_rows, n_classes = probs[0].shape
    labels = _check_labels(labels, n_rows, n_classes)
    _check_method(method)
    _check_frac(frac_flagged)
    kinds = _check_kinds(kinds)
    temps = _check_temperature(temperature, len(probs))
    given_weights = _check_weights(weights, len(probs))
    valid = _check_valid(valid, n_rows)
    rows = _assessed_rows(probs, labels, valid)

    if temps is None:
        temps = tuple(_fit_temperature(p, labels, rows) for p in probs)
    # None: the uniform mean, computed exactly as before weights existed.
    w = _fit_weights(probs, labels, rows, temps, given_weights) if isinstance(given_weights, str) else given_weights
    ens, matrix = _summarize(probs, labels, rows, temps, w)
    quality = _label_quality(ens, method)
    n_flag, count_info = _issue_count(ens, matrix, frac_flagged)
    del matrix
    # Stable: equal qualities keep input order, so the ranking is deterministic.
    order = np.argsort(quality, kind="stable")
    flagged = np.zeros(len(ens), dtype=bool)
    flagged[order[:n_flag]] = True

    columns = _kind_columns(kinds, ens)
    if frac_flagged is None:
        # Confident learning's count is an estimate and undercounts on small sets;
        # an image the ensemble confidently gives to another single class is
        # flagged whatever the count says. (On the 1,300-image set it adds none.)
        for kind, (_, is_issue) in zip(kinds, columns, strict=True):
            if kind.name == "wrong_label":
                flagged |= np.asarray(is_issue, dtype=bool)
    n_flag = int(flagged.sum())
    kind_idx = _assign_kinds(kinds, columns, flagged)

    sug_label = ens.labels.copy()
    sug_conf = ens.p_given.copy()
    for j, kind in enumerate(kinds):
        sel = kind_idx == j
        if sel.any():
            lab, conf = kind.suggest(ens)
            sug_label[sel] = np.asarray(lab)[sel]
            sug_conf[sel] = np.asarray(conf)[sel]

    out = _frame(n_rows, ens, quality, flagged, order[flagged[order]], sug_label, sug_conf, kinds, kind_idx, columns)
    params = flag_params(
        method=method, temperature=temperature, frac_flagged=frac_flagged, kinds=kinds, weights=weights
    )
    params.update(
        temperatures_used=[float(t) for t in temps],
        weights_used=list(ens.weights),
        n_images=int(n_rows),
        n_assessed=len(ens),
        n_flagged=int(n_flag),
        **count_info,
    )
    out.attrs["flag_params"] = params
    return out


# --------------------------------------------------------------------------- computation


def _chunk_rows(n_classes: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(n_classes, 1))


def _assessed_rows(probs: list[np.ndarray], labels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Indices of the images to assess, after checking their probabilities."""
    n, c = probs[0].shape
    step = _chunk_rows(c)
    keep = labels >= 0 if valid is None else (labels >= 0) & valid
    finite = np.ones(n, dtype=bool)
    for m, p in enumerate(probs):
        for s in range(0, n, step):
            block = np.asarray(p[s : s + step])
            fin = np.isfinite(block).all(axis=1)
            finite[s : s + step] &= fin
            look = keep[s : s + step].copy()
            if valid is None:
                look &= fin
            else:
                bad = np.flatnonzero(look & ~fin)
                if bad.size:
                    raise ValueError(
                        f"probs[{m}] row {s + bad[0]} is not finite but valid[{s + bad[0]}] is True; "
                        "expected finite probabilities on valid rows (set valid False for unscored images)"
                    )
            _check_block(block[look], np.flatnonzero(look) + s, m)
    return np.flatnonzero(keep & finite)


def _check_block(block: np.ndarray, rows: np.ndarray, m: int) -> None:
    if not block.size:
        return
    low, high = block.min(axis=1), block.max(axis=1)
    bad = np.flatnonzero((low < 0) | (high > 1))
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"probs[{m}] row {rows[i]} holds values in [{low[i]:.4g}, {high[i]:.4g}], expected probabilities "
            "in [0, 1] (pass softmax(logits), not logits)"
        )
    sums = block.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(np.abs(sums - 1) > _SUM_TOL)
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"probs[{m}] row {rows[i]} sums to {sums[i]:.6g}, expected rows of probabilities summing to 1 "
            f"(within {_SUM_TOL})"
        )


def _fit_temperature(p: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    """Temperature minimising the NLL of the given labels, on up to _FIT_ROWS rows."""
    if rows.size < 2:
        return 1.0
    pick = rows[np.unique(np.linspace(0, rows.size - 1, min(rows.size, _FIT_ROWS)).round().astype(np.int64))]
    logp = np.log(np.maximum(np.asarray(p[pick], dtype=np.float32), np.float32(_TINY)))
    logp_y = logp[np.arange(len(pick)), labels[pick]].astype(np.float64)
    # The NLL is convex in beta = 1/T with derivative E_q[log p] - log p_y and
    # second derivative Var_q[log p]: safeguarded Newton converges in a few steps.
    lo, hi = 1 / _T_BOUNDS[1], 1 / _T_BOUNDS[0]
    beta = 1.0
    q = np.empty_like(logp)
    for _ in range(60):
        np.multiply(logp, np.float32(beta), out=q)
        q -= q.max(axis=1, keepdims=True)
        np.exp(q, out=q)
        total = q.sum(axis=1, dtype=np.float64)
        q *= logp
        mean_l = q.sum(axis=1, dtype=np.float64) / total
        q *= logp
        var_l = np.maximum(q.sum(axis=1, dtype=np.float64) / total - mean_l**2, 0.0)
        grad, hess = float(np.mean(mean_l - logp_y)), float(np.mean(var_l))
        if grad > 0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / hess if hess > 0 else math.nan
        new = step if lo < step < hi else math.sqrt(lo * hi)
        done = abs(new - beta) <= 1e-6 * beta or hi / lo < 1 + 1e-9
        beta = new
        if done:
            break
    return float(1 / min(max(beta, 1 / _T_BOUNDS[1]), 1 / _T_BOUNDS[0]))


def _fit_weights(
    probs: list[np.ndarray], labels: np.ndarray, rows: np.ndarray, temps: tuple[float, ...], how: str
) -> tuple[float, ...] | None:
    """Ensemble weights from the given labels (``how`` "fit" or "softmax"; "equal" gives None).

    Both read each calibrated model's probability of the given label on the
    rows the temperatures were fitted on.
    """
    m = len(probs)
    if how == "equal" or m == 1 or rows.size < 2:
        return None
    pick = rows[np.unique(np.linspace(0, rows.size - 1, min(rows.size, _FIT_ROWS)).round().astype(np.int64))]
    lab = labels[pick]
    py = np.empty((pick.size, m))
    for j, (p, t) in enumerate(zip(probs, temps, strict=True)):
        z = np.log(np.maximum(np.asarray(p[pick], dtype=np.float64), _TINY)) / t
        z -= z.max(axis=1, keepdims=True)
        py[:, j] = np.exp(z[np.arange(pick.size), lab] - np.log(np.exp(z).sum(axis=1)))
    py = np.maximum(py, _TINY)
    if how == "softmax":
        nll = -np.log(py).mean(axis=0)
        w = np.exp(-(nll - nll.min()))
        return tuple(float(x) for x in w / w.sum())
    # EM for the weights of a mixture with fixed components: each step raises the likelihood,
    # and the objective is concave in w, so it converges to the maximum (Dempster et al. 1977).
    w = np.full(m, 1.0 / m)
    for _ in range(_EM_STEPS):
        resp = py * w
        resp /= resp.sum(axis=1, keepdims=True)
        new = resp.mean(axis=0)
        done = np.abs(new - w).max() <= _EM_TOL
        w = new
        if done:
            break
    return tuple(float(x) for x in w / w.sum())


def _entropy(q: np.ndarray) -> np.ndarray:
    return -(q * np.log(np.maximum(q, _TINY))).sum(axis=1, dtype=np.float64)


def _summarize(
    probs: list[np.ndarray],
    labels: np.ndarray,
    rows: np.ndarray,
    temps: tuple[float, ...],
    weights: tuple[float, ...] | None = None,
) -> tuple[Ensemble, np.ndarray]:
    """One chunked pass: the calibrated ensemble matrix (n, C) float32 and its summary.

    ``weights`` None is the uniform mean, summed then divided by M (the arithmetic the
    flags were measured with); otherwise each model's matrix is added times its weight.
    """
    n, c, m = rows.size, probs[0].shape[1], len(probs)
    matrix = np.zeros((n, c), dtype=np.float32)
    model_top = np.zeros((m, n), dtype=np.int64)
    mean_h = np.zeros(n)
    step = _chunk_rows(c)
    for s in range(0, n, step):
        idx = rows[s : s + step]
        # A contiguous run is read as a slice: no fancy-indexing copy of a memmap.
        sel: slice | np.ndarray = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == idx.size else idx
        acc = matrix[s : s + step]
        for j, (p, t) in enumerate(zip(probs, temps, strict=True)):
            q = np.asarray(p[sel], dtype=np.float32)
            if t == 1.0:
                # Renormalise all the same: rows summing to 1 within _SUM_TOL become exact.
                q = q / q.sum(axis=1, keepdims=True)
                if m > 1:
                    mean_h[s : s + step] += _entropy(q) * (1.0 if weights is None else weights[j])
            else:
                z = np.log(np.maximum(q, np.float32(_TINY)))
                z *= np.float32(1 / t)
                z -= z.max(axis=1, keepdims=True)
                # A fresh array: q may be a view of the caller's probabilities.
                q = np.exp(z)
                total = q.sum(axis=1, keepdims=True)
                q /= total
                if m > 1:
                    # log q = z - log(total): the entropy needs no second log.
                    z *= q
                    h = np.log(total[:, 0], dtype=np.float64) - z.sum(axis=1, dtype=np.float64)
                    mean_h[s : s + step] += h * (1.0 if weights is None else weights[j])
            model_top[j, s : s + step] = q.argmax(axis=1)
            if weights is None:
                acc += q
            else:
                acc += q * np.float32(weights[j])
        if weights is None:
            acc /= np.float32(m)
    lab = labels[rows]
    r = np.arange(n)
    p_given = matrix[r, lab].astype(np.float64)
    top = matrix.argmax(axis=1)
    p_top = matrix[r, top].astype(np.float64)
    # The best class other than the given one: hide the given label, take the argmax, restore.
    matrix[r, lab] = -1.0
    other = matrix.argmax(axis=1)
    p_other = matrix[r, other].astype(np.float64)
    matrix[r, lab] = p_given
    ens_h = np.zeros(n)
    for s in range(0, n, step):
        ens_h[s : s + step] = _entropy(matrix[s : s + step])
    if weights is None:
        disagreement = np.clip((ens_h - mean_h / m) / math.log(m), 0.0, 1.0) if m > 1 else np.zeros(n)
    else:
        # The weighted Jensen-Shannon divergence is at most the entropy of the weights.
        h_w = -sum(w * math.log(w) for w in weights if w > 0)
        disagreement = np.clip((ens_h - mean_h) / h_w, 0.0, 1.0) if m > 1 and h_w > 0 else np.zeros(n)
    ens = Ensemble(
        index=rows,
        labels=lab,
        p_given=p_given,
        top_class=top.astype(np.int64),
        p_top=p_top,
        other_class=other.astype(np.int64),
        p_other=p_other,
        entropy=np.clip(ens_h / math.log(c), 0.0, 1.0),
        model_top=model_top,
        disagreement=disagreement,
        num_classes=c,
        temperatures=tuple(float(t) for t in temps),
        weights=tuple(float(w) for w in weights) if weights is not None else (1.0 / m,) * m,
    )
    return ens, matrix


def _label_quality(ens: Ensemble, method: str) -> np.ndarray:
    # The formulas of cleanlab.rank, on the summary instead of the (n, C) matrix
    # (cleanlab's normalized margin copies the whole matrix through np.delete).
    if method == "normalized_margin":
        return (ens.p_given - ens.p_other + 1) / 2
    if method == "self_confidence":
        return ens.p_given.copy()
    # confidence_weighted_entropy, as cleanlab.rank.get_confidence_weighted_entropy_for_each_label
    from cleanlab.internal.constants import CLIPPING_LOWER_BOUND

    x = ens.entropy / np.clip(ens.p_given, CLIPPING_LOWER_BOUND, None)
    return np.log(x + 1) / np.clip(x, CLIPPING_LOWER_BOUND, None)


def _issue_count(ens: Ensemble, matrix: np.ndarray, frac: float | None) -> tuple[int, dict[str, Any]]:
    n = len(ens)
    if frac is not None:
        return round(frac * n), {"issue_count_source": "frac_flagged"}
    if n == 0:
        return 0, {"issue_count_source": "cleanlab", "n_absent_classes": ens.num_classes}
    from cleanlab.count import compute_confident_joint, get_confident_thresholds
    from cleanlab.internal.constants import CONFIDENT_THRESHOLDS_LOWER_BOUND

    thresholds = np.asarray(get_confident_thresholds(ens.labels, matrix), dtype=np.float64)
    absent = np.bincount(ens.labels, minlength=ens.num_classes) == 0
    # cleanlab gives a class nobody was labelled with the threshold 2, so an
    # image can never count as confidently belonging to it: on a subset (725 of
    # 1,000 ImageNet classes) every mislabel whose true class is absent would go
    # uncounted. Such classes get the mean self-confidence instead.
    fallback = max(float(ens.p_given.mean()), CONFIDENT_THRESHOLDS_LOWER_BOUND)
    thresholds[absent] = fallback
    _, off = compute_confident_joint(
        ens.labels, matrix, thresholds=thresholds, calibrate=False, return_indices_of_off_diagonals=True
    )
    off = np.asarray(off, dtype=np.int64)
    # As cleanlab.count.num_label_issues: no issue where the given label is (about) the argmax.
    off = off[ens.p_top[off] - ens.p_given[off] > _ARGMAX_TOL]
    return int(off.size), {
        "issue_count_source": "cleanlab",
        "n_absent_classes": int(absent.sum()),
        "absent_class_threshold": fallback,
    }


def _kind_columns(kinds: Sequence[IssueKind], ens: Ensemble) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for kind in kinds:
        score, hit = kind.find_issues(ens)
        score = np.asarray(score, dtype=np.float64)
        hit = np.asarray(hit)
        if score.shape != (len(ens),) or hit.shape != (len(ens),) or hit.dtype != bool:
            raise ValueError(
                f"issue kind {kind.name!r} returned score {score.shape} and flags {hit.shape} {hit.dtype}, "
                f"expected float ({len(ens)},) and bool ({len(ens)},)"
            )
        if score.size and not ((score >= 0) & (score <= 1)).all():
            raise ValueError(f"issue kind {kind.name!r} returned scores outside [0, 1] (or NaN)")
        out.append((score, hit))
    return out


def _assign_kinds(
    kinds: Sequence[IssueKind], columns: list[tuple[np.ndarray, np.ndarray]], flagged: np.ndarray
) -> np.ndarray:
    """Index into ``kinds`` of the highest score for each flagged image, -1 for the rest."""
    if not kinds or not flagged.size:
        return np.full(flagged.size, -1, dtype=np.int64)
    # argmax takes the first of equal scores: ties go to the kind listed first.
    best = np.stack([s for s, _ in columns]).argmax(axis=0)
    return np.where(flagged, best, -1)


def _frame(
    n_rows: int,
    ens: Ensemble,
    quality: np.ndarray,
    flagged: np.ndarray,
    worst_first: np.ndarray,
    sug_label: np.ndarray,
    sug_conf: np.ndarray,
    kinds: Sequence[IssueKind],
    kind_idx: np.ndarray,
    columns: list[tuple[np.ndarray, np.ndarray]],
) -> pd.DataFrame:
    at = ens.index

    def full(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        a = np.full(n_rows, fill, dtype=dtype)
        a[at] = values
        return a

    rank = np.zeros(len(ens), dtype=np.int64)
    rank[worst_first] = np.arange(1, worst_first.size + 1)
    names = np.array([k.name for k in kinds] + [""], dtype=object)
    data: dict[str, Any] = {
        "index": np.arange(n_rows, dtype=np.int64),
        "label_quality": full(quality, np.nan, np.float64),
        "is_label_issue": full(flagged, False, bool),
        "suggested_label": full(sug_label, -1, np.int64),
        "suggested_confidence": full(np.clip(sug_conf, 0.0, 1.0), np.nan, np.float64),
        "issue_kind": full(names[kind_idx], "", object),
        "rank": pd.arrays.IntegerArray(full(rank, 0, np.int64), ~full(flagged, False, bool)),
    }
    for kind, (score, hit) in zip(kinds, columns, strict=True):
        data[f"{kind.name}_score"] = full(score, np.nan, np.float64)
        data[f"is_{kind.name}_issue"] = full(hit, False, bool)
    return pd.DataFrame(data)


# --------------------------------------------------------------------------- validation


def _check_probs(probs: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(probs, np.ndarray) or not isinstance(probs, Sequence):
        seen = f"an array of shape {probs.shape}" if isinstance(probs, np.ndarray) else type(probs).__name__
        raise ValueError(f"probs must be a list of M (N, C) arrays, one per model; got {seen}")
    if not probs:
        raise ValueError("probs is empty; expected a list of M >= 1 (N, C) probability arrays")
    out = []
    for m, p in enumerate(probs):
        if not hasattr(p, "shape") or not hasattr(p, "dtype"):
            p = np.asarray(p)
        if len(p.shape) != 2:
            raise ValueError(f"probs[{m}] has shape {tuple(p.shape)}, expected (N, C)")
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"probs[{m}] has dtype {p.dtype}, expected floats (probabilities)")
        if tuple(p.shape) != tuple(out[0].shape if out else p.shape):
            raise ValueError(
                f"probs[{m}] has shape {tuple(p.shape)} but probs[0] has {tuple(out[0].shape)}; "
                "expected every model to score the same N images over the same C classes"
            )
        out.append(p)
    if out[0].shape[1] < 2:
        raise ValueError(f"probs have C={out[0].shape[1]} classes, expected at least 2")
    return out


def _check_labels(labels: np.ndarray, n: int, c: int) -> np.ndarray:
    return as_labels(labels, n, c - 1, shape_hint=" to match probs", range_hint=f" (probs have C={c} columns)")


def _check_valid(valid: np.ndarray | None, n: int) -> np.ndarray | None:
    # None stays None: unscored (non-finite) rows are then skipped instead of refused.
    return None if valid is None else as_mask(valid, n)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method is {method!r}, expected one of {', '.join(map(repr, METHODS))}")


def _check_frac(frac: float | None) -> None:
    if frac is not None and (not isinstance(frac, numbers.Real) or not 0 <= frac <= 1):
        raise ValueError(f"frac_flagged is {frac!r}, expected None or a fraction in [0, 1]")


def _check_temperature(temperature: float | Sequence[float] | str, m: int | None) -> tuple[float, ...] | None:
    """None for "fit", else one temperature per model (M unknown when m is None)."""
    if isinstance(temperature, str):
        if temperature != "fit":
            raise ValueError(f"temperature is {temperature!r}, expected 'fit', a positive number or M numbers")
        return None
    if isinstance(temperature, numbers.Real):
        values: tuple[Any, ...] = (temperature,) * (m or 1)
    else:
        values = tuple(temperature)
        if m is not None and len(values) != m:
            raise ValueError(f"temperature has {len(values)} values, expected one per model (M={m})")
    for t in values:
        if not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature holds {t!r}, expected finite positive numbers")
    return tuple(float(t) for t in values)


_ENSEMBLE_RULES = {
    "equal": "uniform mean of temperature-scaled probabilities",
    "fit": "weighted mean of temperature-scaled probabilities, weights maximising the likelihood of the given "
    "labels under the mixture (EM), fitted on the temperature-fit rows",
    "softmax": "weighted mean of temperature-scaled probabilities, weights proportional to exp(-mean NLL of the "
    "given labels) per model, on the temperature-fit rows",
}


def _check_weights(weights: str | Sequence[float], m: int | None) -> str | tuple[float, ...]:
    """A name in WEIGHTS, or M non-negative weights normalised to sum 1 (M unknown when m is None)."""
    if isinstance(weights, str):
        if weights not in WEIGHTS:
            raise ValueError(
                f"weights is {weights!r}, expected one of {', '.join(map(repr, WEIGHTS))} or one number per model"
            )
        return weights
    if isinstance(weights, numbers.Real) or not isinstance(weights, Sequence | np.ndarray):
        raise ValueError(f"weights is {weights!r}, expected one of {', '.join(map(repr, WEIGHTS))} or M numbers")
    values = tuple(weights)
    if m is not None and len(values) != m:
        raise ValueError(f"weights has {len(values)} values, expected one per model (M={m})")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights holds {w!r}, expected finite non-negative numbers")
    total = float(sum(values))
    if values and total <= 0:
        raise ValueError("weights are all 0; give at least one model a positive weight")
    return tuple(float(w) / total for w in values)


def _check_kinds(kinds: Sequence[IssueKind] | None) -> tuple[IssueKind, ...]:
    if kinds is None:
        return DEFAULT_KINDS
    out = tuple(kinds)
    seen: set[str] = set()
    for k in out:
        if not isinstance(k, IssueKind):
            raise ValueError(f"kinds holds {k!r}, expected IssueKind instances (e.g. WrongLabel())")
        name = getattr(k, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{type(k).__name__}.name is {name!r}, expected a Python identifier")
        if name in seen:
            raise ValueError(f"two issue kinds are named {name!r}; names must be unique")
        seen.add(name)
    return out
