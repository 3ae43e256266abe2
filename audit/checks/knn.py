"""``knn_label``: does an image's label agree with the labels of its nearest neighbours in feature space?

cleanlab's own neighbour-based label check is Datalab's ``LabelIssueManager`` given features
and no ``pred_probs`` (``cleanlab/datalab/internal/issue_manager/label.py``): a
``KNeighborsClassifier(k + 1)`` votes on every image, its own vote is subtracted (out of
sample), and the resulting ``pred_probs`` go through cleanlab's label quality and
confident-learning count. This check is that recipe on the run's shared neighbour graph
(:mod:`audit.checks._neighbors`: cosine, self excluded), with three changes, each for a
reason:

* **exact duplicates vote once** (a neighbouring group of identical rows is one vote, carrying
  the label mix of its members; an image's own exact copies are one vote at similarity 1):
  five copies of one photo are one piece of evidence, not five;
* **similarity-weighted votes** (``weights="similarity"``, the cosine clipped at 0): with ten
  uniform votes the score takes only eleven values, so thousands of images tie; weighting
  orders them by how close the agreeing and disagreeing neighbours are;
* **a prior pseudo-count** (``alpha``, spread over the classes by their frequency among the
  labels): an image with one labelled neighbour does not score 0 or 1 on that one vote.

The score is cleanlab's label quality (:func:`cleanlab.rank.get_label_quality_scores`) of
those neighbour probabilities, in [0, 1], low = the neighbours disagree; the suggestion is
the neighbours' weighted majority where it differs from the given label, else the best
other class they voted for. The number of issues is cleanlab's confident-learning estimate
(:func:`cleanlab.count.num_label_issues`) on the same probabilities, and the flagged images
are that many with the lowest score, as the label check flags.

:class:`LabelKnnCheck` (``label_knn``) combines it with the label check's score; see
:func:`combine_label_scores`.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np

from audit.checks import _memo
from audit.checks._base import Check, CheckInputs, CheckResult
from audit.checks._memo import result_key
from audit.checks._neighbors import BACKENDS, DEFAULT_REDUCE_TO, Neighbors, neighbors

__all__ = [
    "COMBINATIONS",
    "K_DEFAULT",
    "WEIGHT_DEFAULT",
    "KnnLabelCheck",
    "LabelKnnCheck",
    "combine_label_scores",
    "knn_label_probs",
    "result_key",
]

METHODS = ("self_confidence", "normalized_margin")
WEIGHTS = ("similarity", "uniform")
COMBINATIONS = ("mean", "min", "product")
# Neighbours that vote. Datalab's label manager uses 10; on CIFAR-10N's three noise levels 20 ranks
# wrong labels better alone (AP +0.06 / +0.06 / +0.04) and combined with the label check
# (reports/checks_features_cifar.md, where the variants are measured; chosen on that set).
K_DEFAULT = 20
# label_knn's weight of the knn_label score (the label check's is 1 - this); chosen on CIFAR-10N as above.
WEIGHT_DEFAULT = 0.3
_INFO_NEIGHBOURS = 5  # nearest neighbours named in an issue's info (the reviewer's evidence)
# Below this median number of labelled images per present class, knn_label flags nothing (its scores stay):
# an image of a class with one or two members has almost no same-class neighbour to agree with, so the vote
# says "wrong" for nearly every label. Measured: on the shared ImageNet 1,300 (1 to 7 images a class, median
# 2) it flagged 1,003 of 1,300 images, 13% of them wrong by ReaL (reports/CHECKS.md).
MIN_PER_CLASS = 5
_DENSE_ROWS = 4096  # rows of votes made dense at once (float64 temporaries of 4096 x C)


def _option(ok: bool, msg: str) -> None:
    if not ok:
        from audit.errors import OptionError

        raise OptionError(msg)


def _graph_options(params: dict[str, Any], k_default: int = 10) -> dict[str, Any]:
    """Validate and return the neighbour-graph options shared by the feature-space checks."""
    k = params.get("k", k_default)
    _option(isinstance(k, int) and not isinstance(k, bool) and k >= 1, f"k must be an int >= 1, got {k!r}")
    model = params.get("model")
    _option(model is None or isinstance(model, str), f"model must be a model name, got {model!r}")
    backend = params.get("backend", "auto")
    _option(backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    red = params.get("reduce_to", DEFAULT_REDUCE_TO)
    _option(
        red is None or (isinstance(red, int) and not isinstance(red, bool) and red >= 8),
        f"reduce_to must be None (exact search in the full space) or an int >= 8, got {red!r}",
    )
    return {"k": k, "model": model, "backend": backend, "reduce_to": red}


def _labels_of(inputs: CheckInputs) -> np.ndarray:
    lab = np.asarray(inputs.labels, dtype=np.int64)
    if lab.shape != (inputs.n,):
        raise ValueError(f"labels has shape {lab.shape}, expected ({inputs.n},)")
    return lab


def knn_label_probs(
    nb: Neighbors,
    labels: np.ndarray,
    n_classes: int,
    *,
    weights: str = "similarity",
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Out-of-sample neighbour class probabilities of every labelled row of ``nb.space``.

    Returns ``(rows, probs, votes)``: the image indices scored (labelled rows of the space
    with at least one labelled neighbour or copy), ``(n, C)`` float32 probabilities
    ``(votes + alpha * prior) / (sum(votes) + alpha)``, and the weighted votes as a
    ``scipy.sparse`` CSR ``(n, C)`` matrix (at most k + 1 classes per row, so the votes of
    50,000 images over 1,000 classes stay small; only the probabilities are dense).
    """
    from scipy import sparse

    sp = nb.space
    lab = labels[sp.rows]
    labelled = lab >= 0
    r_, u, k, c = len(sp.rows), sp.n_groups, nb.k, n_classes
    g = sp.group
    # Label mix of each group (its labelled members), one vote's worth: rows sum to 1 (or 0).
    counts = sparse.csr_matrix((np.ones(int(labelled.sum())), (g[labelled], lab[labelled])), shape=(u, c))
    size = np.asarray(counts.sum(1)).ravel()
    mix = sparse.diags(np.divide(1.0, size, out=np.zeros(u), where=size > 0)) @ counts

    w = np.nan_to_num(nb.sim.astype(np.float64), nan=0.0)
    w = np.clip(w, 0.0, None) if weights == "similarity" else np.ones_like(w)
    w[(nb.idx < 0) | (size[np.maximum(nb.idx, 0)] == 0)] = 0.0  # padding and unlabelled groups do not vote
    gi = np.maximum(nb.idx, 0)

    def graph(cols: int) -> Any:
        return sparse.csr_matrix(
            (w[:, :cols].ravel(), gi[:, :cols].ravel(), np.arange(0, u * cols + 1, cols)), shape=(u, u)
        )

    # Votes of the k nearest groups, and of the k-1 nearest for rows that have copies (their
    # copies take the k-th place as one vote at similarity 1).
    votes_k = (graph(k) @ mix).tocsr()
    # Own copies: the group's labels without the row's own (only rows whose group has others).
    multi = size[g] > 1
    mine = np.flatnonzero(labelled & multi)
    own = sparse.diags(multi.astype(np.float64)) @ counts[g] - sparse.csr_matrix(
        (np.ones(len(mine)), (mine, lab[mine])), shape=(r_, c)
    )
    own = own.tocsr()
    own.eliminate_zeros()
    own_n = np.asarray(own.sum(1)).ravel()
    has = own_n > 0
    votes = sparse.diags((~has).astype(np.float64)) @ votes_k[g]
    if has.any():
        votes_km1 = (graph(k - 1) @ mix).tocsr() if k > 1 else sparse.csr_matrix((u, c))
        extra = votes_km1[g] + sparse.diags(np.divide(1.0, own_n, out=np.zeros(r_), where=has)) @ own
        votes = votes + sparse.diags(has.astype(np.float64)) @ extra
    votes = votes.tocsr()

    total = np.asarray(votes.sum(1)).ravel()
    scored = labelled & (total > 0)
    prior = np.bincount(lab[labelled], minlength=c).astype(np.float64)
    prior /= max(prior.sum(), 1.0)
    v = votes[np.flatnonzero(scored)]
    probs = np.empty((v.shape[0], c), dtype=np.float32)
    denom = total[scored] + alpha
    for s in range(0, v.shape[0], _DENSE_ROWS):
        block = v[s : s + _DENSE_ROWS].toarray() + alpha * prior
        probs[s : s + _DENSE_ROWS] = block / denom[s : s + _DENSE_ROWS, None]
    return sp.rows[scored], probs, v


def _suggest(given: np.ndarray, probs: np.ndarray, votes: Any) -> np.ndarray:
    """The neighbours' weighted majority where it is not the given label, else the best other class voted for."""
    rows = np.arange(len(given))
    best = np.asarray(votes.argmax(axis=1)).ravel()
    alt = np.empty(len(given), dtype=np.int64)
    for s in range(0, len(given), _DENSE_ROWS):  # a masked copy of a block at a time, not of all (n, C)
        block = probs[s : s + _DENSE_ROWS].copy()
        block[np.arange(len(block)), given[s : s + _DENSE_ROWS]] = -1.0
        alt[s : s + _DENSE_ROWS] = block.argmax(1)
    alt_voted = np.asarray(votes[rows, alt]).ravel() > 0
    return np.where(best != given, best, np.where(alt_voted, alt, -1)).astype(np.int64)


def _quality(labels: np.ndarray, probs: np.ndarray, method: str) -> np.ndarray:
    from cleanlab.rank import get_label_quality_scores

    if len(labels) == 0:
        return np.zeros(0)
    return np.asarray(get_label_quality_scores(labels, probs, method=method), dtype=np.float64)


def _issue_count(labels: np.ndarray, probs: np.ndarray) -> int:
    """cleanlab's confident-learning estimate of the number of label errors, on the present classes."""
    present = np.unique(labels)
    if len(labels) == 0 or len(present) < 2:
        return 0
    from cleanlab.count import num_label_issues

    # Only classes someone was labelled with: cleanlab gives an absent class the threshold 2
    # (never confidently predicted), so its column only adds work; the probabilities of the
    # present classes are renormalised.
    if len(present) == probs.shape[1]:
        return int(num_label_issues(labels, probs, estimation_method="off_diagonal"))
    lab = np.searchsorted(present, labels)
    p = probs[:, present]
    p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    return int(num_label_issues(lab, p, estimation_method="off_diagonal"))


def _lowest(score: np.ndarray, rows: np.ndarray, count: int, n: int) -> np.ndarray:
    """Bool (N,): the ``count`` rows with the lowest score (ties by index), so flags are a prefix of the ranking."""
    out = np.zeros(n, dtype=bool)
    if count > 0 and len(rows):
        order = np.lexsort((rows, score[rows]))
        out[rows[order[:count]]] = True
    return out


class KnnLabelCheck(Check):
    """``knn_label``: an image's label against its k nearest neighbours' labels (out of sample).

    Parameters
    ----------
    k : int
        Neighbours that vote (default :data:`K_DEFAULT`, 20; Datalab's is 10).
    model : str, optional
        One model's features; default every zoo model's, concatenated (see :mod:`audit.checks._neighbors`).
    weights : {"similarity", "uniform"}
        Votes weighted by cosine similarity (default) or equal, as ``KNeighborsClassifier``'s.
    alpha : float
        Prior pseudo-count added to the votes (default 1).
    method : {"self_confidence", "normalized_margin"}
        cleanlab label-quality score of the neighbour probabilities.
    backend, reduce_to
        The neighbour search (see :func:`audit.checks._neighbors.neighbors`).
    """

    name: ClassVar[str] = "knn_label"
    suggests: ClassVar[str | None] = "label"  # the neighbours' majority class
    needs: ClassVar[frozenset[str]] = frozenset({"labels", "features"})
    default: ClassVar[bool] = True
    description: ClassVar[str] = "label disagrees with its nearest neighbours' labels in feature space"

    def __init__(self, **params: Any) -> None:
        graph = _graph_options(params, K_DEFAULT)
        weights = params.get("weights", "similarity")
        _option(weights in WEIGHTS, f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        alpha = params.get("alpha", 1.0)
        _option(
            isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and np.isfinite(alpha) and alpha >= 0,
            f"alpha must be a number >= 0, got {alpha!r}",
        )
        method = params.get("method", "self_confidence")
        _option(method in METHODS, f"method must be one of {', '.join(METHODS)}, got {method!r}")
        least = params.get("min_per_class", MIN_PER_CLASS)
        _option(
            isinstance(least, int) and not isinstance(least, bool) and least >= 0,
            f"min_per_class must be an int >= 0, got {least!r}",
        )
        unknown = set(params) - {*graph, "weights", "alpha", "method", "min_per_class"}
        _option(not unknown, f"knn_label has no option(s) {', '.join(sorted(unknown))}")
        super().__init__(**graph, weights=weights, alpha=float(alpha), method=method, min_per_class=least)

    def scores(self, inputs: CheckInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, Neighbors, np.ndarray]:
        """``(score (N,) NaN where not assessed, rows, probs (n, C), graph, votes)``; memoised per run."""
        p = self.params
        key = ("knn_label", p["model"], p["backend"], p["reduce_to"], p["k"], p["weights"], p["alpha"], p["method"])
        return _memo.memo(inputs, key, lambda: self._scores(inputs))

    def _scores(self, inputs: CheckInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, Neighbors, np.ndarray]:
        p = self.params
        labels = _labels_of(inputs)
        c = int(inputs.n_classes) or int(labels.max(initial=-1)) + 1
        nb = neighbors(inputs, model=p["model"], k=p["k"], backend=p["backend"], reduce_to=p["reduce_to"])
        rows, probs, votes = knn_label_probs(nb, labels, c, weights=p["weights"], alpha=p["alpha"])
        score = np.full(inputs.n, np.nan)
        score[rows] = np.clip(_quality(labels[rows], probs, p["method"]), 0.0, 1.0)
        return score, rows, probs, nb, votes

    def run(self, inputs: CheckInputs) -> CheckResult:
        score, rows, probs, nb, votes = self.scores(inputs)
        labels = _labels_of(inputs)
        n = inputs.n
        count = _issue_count(labels[rows], probs)
        per_class = np.bincount(labels[rows]) if len(rows) else np.zeros(0, dtype=np.int64)
        median = float(np.median(per_class[per_class > 0])) if (per_class > 0).any() else 0.0
        too_few = median < self.params["min_per_class"]
        is_issue = _lowest(score, rows, 0 if too_few else count, n)

        suggestion = np.full(n, -1, dtype=np.int64)
        if len(rows):
            suggestion[rows] = _suggest(labels[rows], probs, votes)

        info: list[dict[str, Any] | None] = [None] * n
        pos = {int(r): i for i, r in enumerate(rows)}
        sp = nb.space
        _, nbr = nb.row_neighbors(min(nb.k, _INFO_NEIGHBOURS))
        row_of = {int(img): i for i, img in enumerate(sp.rows)}
        for img in np.flatnonzero(is_issue):
            i, r = pos[int(img)], row_of[int(img)]
            v = votes[i]
            info[img] = {
                "neighbours": [int(sp.rows[j]) for j in nbr[r] if j >= 0],
                "agree": round(float(v[0, int(labels[img])] / max(v.sum(), 1e-12)), 4),
            }
        summary = {
            "assessed": len(rows),
            "issues": int(is_issue.sum()),
            "issue_count_source": "cleanlab.count.num_label_issues (off_diagonal) on the neighbour probabilities",
            "mean_score": float(np.nanmean(score)) if len(rows) else None,
            "exact_duplicate_rows": int(len(sp.rows) - sp.n_groups),
            "median_images_per_class": median,
            **{f"graph_{k}": v for k, v in nb.params.items()},
        }
        if too_few:
            summary["note"] = (
                f"nothing flagged: a median of {median:g} labelled images a class is too few for a neighbour vote "
                f"(min_per_class {self.params['min_per_class']}); scores kept for ranking"
            )
        return CheckResult(
            check=self.name,
            score=score,
            is_issue=is_issue,
            suggestion=suggestion,
            info=info,
            params=dict(self.params),
            summary=summary,
        )


def combine_label_scores(
    label: np.ndarray, knn: np.ndarray, *, how: str = "mean", weight: float = WEIGHT_DEFAULT
) -> np.ndarray:
    """One label-quality score from the label check's and ``knn_label``'s, both in [0, 1], low = suspicious.

    ``mean``: ``(1 - weight) * label + weight * knn``; ``min``: the lower of the two (either
    check alone can raise the alarm); ``product``: ``label^(1-weight) * knn^weight`` (a
    weighted geometric mean). Where one score is NaN (not assessed by that check) the other
    is used; NaN where both are.
    """
    if how not in COMBINATIONS:
        raise ValueError(f"how must be one of {COMBINATIONS}, got {how!r}")
    a = np.asarray(label, dtype=np.float64)
    b = np.asarray(knn, dtype=np.float64)
    if how == "mean":
        out = (1.0 - weight) * a + weight * b
    elif how == "min":
        out = np.minimum(a, b)
    else:
        out = np.clip(a, 0, 1) ** (1.0 - weight) * np.clip(b, 0, 1) ** weight
    out = np.where(np.isnan(a), b, np.where(np.isnan(b), a, out))
    return np.clip(out, 0.0, 1.0)


# Where a runner leaves each check's result for the checks after it (audit.checks._memo):
# ``_memo.store(inputs, result_key(name), result)``. label_knn reads the label check's there, so it
# combines the very scores the run's label check produced (its options, its model weights).
class LabelKnnCheck(Check):
    """``label_knn``: the label check's score combined with ``knn_label``'s (:func:`combine_label_scores`).

    The label score is the run's label check's, read from where the runner leaves results
    (:func:`result_key`), or, when the label check has not run, :func:`audit.flag.find_label_issues`'s
    ``label_quality`` on the run's probabilities (its defaults); the number flagged is the label check's
    (cleanlab's estimate of how many labels are wrong, a property of the set), and the
    combined score chooses which images: it only re-orders the ranking.
    """

    name: ClassVar[str] = "label_knn"
    suggests: ClassVar[str | None] = "label"  # the label check's suggestion, else the neighbours'
    needs: ClassVar[frozenset[str]] = frozenset({"labels", "probs", "features"})
    default: ClassVar[bool] = True
    description: ClassVar[str] = "the label check's score combined with knn_label's"

    def __init__(self, **params: Any) -> None:
        how = params.pop("how", "mean")
        _option(how in COMBINATIONS, f"how must be one of {', '.join(COMBINATIONS)}, got {how!r}")
        weight = params.pop("weight", WEIGHT_DEFAULT)
        _option(
            isinstance(weight, numbers.Real) and not isinstance(weight, bool) and 0 <= weight <= 1,
            f"weight must be a number in [0, 1], got {weight!r}",
        )
        self._knn = KnnLabelCheck(**params)
        super().__init__(how=how, weight=float(weight), knn=dict(self._knn.params))

    def _label(self, inputs: CheckInputs, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """The label check's ``(score, is_issue, suggestion, source)``: its result in this run, else recomputed."""
        done = _memo.peek(inputs, result_key("label"))
        if isinstance(done, CheckResult):
            sug = np.full(inputs.n, -1, dtype=np.int64) if done.suggestion is None else np.asarray(done.suggestion)
            return np.asarray(done.score, dtype=np.float64), np.asarray(done.is_issue, dtype=bool), sug, "label check"
        from audit.flag import find_label_issues

        valid = None if inputs.valid is None else np.asarray(inputs.valid, dtype=bool)
        frame = _memo.memo(
            inputs, ("label_frame_defaults",), lambda: find_label_issues(list(inputs.probs or ()), labels, valid=valid)
        )
        return (
            frame["label_quality"].to_numpy(dtype=np.float64),
            frame["is_label_issue"].to_numpy(dtype=bool),
            frame["suggested_label"].to_numpy(dtype=np.int64),
            "audit.flag.find_label_issues (defaults)",
        )

    def run(self, inputs: CheckInputs) -> CheckResult:
        labels = _labels_of(inputs)
        label, flagged, label_sug, source = self._label(inputs, labels)
        knn, rows, probs, _, votes = self._knn.scores(inputs)
        score = combine_label_scores(label, knn, how=self.params["how"], weight=self.params["weight"])
        assessed = np.flatnonzero(np.isfinite(score))
        is_issue = _lowest(score, assessed, int(flagged.sum()), inputs.n)
        # Suggestion: the label check's where it flags (its models saw the image), else the neighbours'.
        suggestion = label_sug.copy()
        if len(rows):
            empty = suggestion[rows] < 0
            suggestion[rows[empty]] = _suggest(labels[rows], probs, votes)[empty]
        summary = {
            "assessed": len(assessed),
            "issues": int(is_issue.sum()),
            "issue_count_source": "the label check's count",
            "label_scores_from": source,
            "label_issues": int(flagged.sum()),
            "changed_vs_label": int((is_issue != flagged).sum() // 2),
        }
        return CheckResult(
            check=self.name,
            score=score,
            is_issue=is_issue,
            suggestion=suggestion,
            params=dict(self.params),
            summary=summary,
        )
