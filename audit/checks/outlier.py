"""``outlier``: an image no class fits, far from every other image in feature space or with diffuse probabilities.

Datalab's ``OutlierIssueManager`` (``cleanlab/datalab/internal/issue_manager/outlier.py``), both halves:

* **features**: the mean cosine distance to the k = 10 nearest neighbours (the run's shared graph,
  :mod:`audit.checks._neighbors`; exact copies at distance 0, as cleanlab's corrected graph), turned
  into a score by cleanlab's ``transform_distances_to_scores`` (``exp(-t d / median d)``, ``t = 1``)
  and ``correct_precision_errors``; an issue where the mean distance exceeds Datalab's rule
  ``Q3 + (1 / 0.37037 - 1) x IQR`` of the mean distances (threshold ``features_threshold``).
* **probabilities**: :class:`cleanlab.outlier.OutOfDistribution` on the run's probabilities (the
  mean over models), its ``entropy`` score of the class-threshold-adjusted probabilities (a row
  spread over many classes scores low); an issue below ``0.13 x`` the median score, Datalab's
  ``pred_probs`` rule (``probs_threshold``). The confident thresholds are fitted on the labelled
  images; a class nobody is labelled with gets the mean self-confidence instead of cleanlab's 2
  (which would subtract the class away entirely), the label check's rule.

Datalab uses the features when it has them and the probabilities only otherwise; with both, this
check uses both and **combines** them: the score is their geometric mean ``sqrt(s_f x s_p)`` (low
when either is low, lowest when both are), and an image is an issue when either rule fires (the
issue says which in ``info["by"]``). Why both: the feature half sees an image unlike the others
(another domain, a blank frame), the probability half an image the classifier cannot place, and
for a custom label space the second is the "no class fits" signal the feature half may miss when
such images cluster together.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np

from audit.checks._base import Check, CheckInputs, CheckResult
from audit.checks._neighbors import neighbors
from audit.checks.knn import _graph_options, _option

__all__ = ["FEATURES_THRESHOLD", "PROBS_THRESHOLD", "OutlierCheck"]

# Datalab's OutlierIssueManager.DEFAULT_THRESHOLDS.
FEATURES_THRESHOLD = 0.37037
PROBS_THRESHOLD = 0.13
OOD_METHODS = ("entropy", "least_confidence")


class OutlierCheck(Check):
    """``outlier``: far from every image in feature space, or with probabilities no class stands out in.

    Needs features or probabilities (either suffices; both are combined).

    Parameters
    ----------
    k : int
        Neighbours whose mean distance is the feature score (default 10, Datalab's).
    features_threshold, probs_threshold : float
        Datalab's thresholds (0.37037: ``Q3 + (1/t - 1) IQR`` of the mean distances; 0.13: ``t x``
        the median probability score).
    method : {"entropy", "least_confidence"}
        cleanlab ``OutOfDistribution`` score of the probabilities (default ``entropy``, Datalab's).
    use : {"both", "features", "probs"}
        Which halves to use when both inputs exist.
    model, backend, reduce_to
        The neighbour graph (see :func:`audit.checks._neighbors.neighbors`).
    """

    name: ClassVar[str] = "outlier"
    needs: ClassVar[frozenset[str]] = frozenset({"features", "probs"})
    needs_any: ClassVar[bool] = True
    default: ClassVar[bool] = True
    description: ClassVar[str] = "far from all other images in feature space, or no class fits (needs either input)"

    def __init__(self, **params: Any) -> None:
        graph = _graph_options(params)
        ft = params.get("features_threshold", FEATURES_THRESHOLD)
        pt = params.get("probs_threshold", PROBS_THRESHOLD)
        for name, t in (("features_threshold", ft), ("probs_threshold", pt)):
            _option(
                isinstance(t, numbers.Real) and not isinstance(t, bool) and 0 < t <= 1,
                f"{name} must be a number in (0, 1], got {t!r}",
            )
        method = params.get("method", "entropy")
        _option(method in OOD_METHODS, f"method must be one of {', '.join(OOD_METHODS)}, got {method!r}")
        use = params.get("use", "both")
        _option(use in ("both", "features", "probs"), f"use must be both, features or probs, got {use!r}")
        unknown = set(params) - {*graph, "features_threshold", "probs_threshold", "method", "use"}
        _option(not unknown, f"outlier has no option(s) {', '.join(sorted(unknown))}")
        super().__init__(**graph, features_threshold=float(ft), probs_threshold=float(pt), method=method, use=use)

    def missing(self, inputs: CheckInputs) -> frozenset[str]:
        """Empty when features or probabilities are there (either half can run alone)."""
        have = inputs.available()
        if self.params["use"] != "both":
            return frozenset({self.params["use"]}) - have
        return frozenset() if have & self.needs else self.needs - have

    def run(self, inputs: CheckInputs) -> CheckResult:
        n = inputs.n
        have = inputs.available()
        use = self.params["use"]
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        summary: dict[str, Any] = {}
        if "features" in have and use in ("both", "features"):
            parts["features"] = self._features(inputs, summary)
        if "probs" in have and use in ("both", "probs"):
            parts["probs"] = self._probs(inputs, summary)
        if not parts:
            raise ValueError("outlier ran without features or probabilities (missing() should have skipped it)")
        if len(parts) == 2:
            sf, _f_issue = parts["features"]
            sp_, _p_issue = parts["probs"]
            score = np.sqrt(np.clip(sf, 0, 1) * np.clip(sp_, 0, 1))
            # Where one half could not assess an image, the other decides alone.
            score = np.where(np.isnan(sf), sp_, np.where(np.isnan(sp_), sf, score))
            summary["combination"] = "geometric mean of the two scores; issue when either rule fires"
        else:
            ((score, _),) = parts.values()
        is_issue = np.zeros(n, dtype=bool)
        for _, hit in parts.values():
            is_issue |= hit
        info: list[dict[str, Any] | None] = [None] * n
        for i in np.flatnonzero(is_issue):
            by = [name for name, (_, hit) in parts.items() if hit[i]]
            info[i] = {"by": by, **{f"{name}_score": round(float(s[i]), 4) for name, (s, _) in parts.items()}}
        summary["issues"] = int(is_issue.sum())
        summary["inputs_used"] = list(parts)
        return CheckResult(
            check=self.name,
            score=np.clip(score, 0.0, 1.0),
            is_issue=is_issue,
            info=info,
            params=dict(self.params),
            summary=summary,
        )

    def _features(self, inputs: CheckInputs, summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        from cleanlab.internal.outlier import correct_precision_errors
        from cleanlab.outlier import transform_distances_to_scores
        from scipy.stats import iqr

        p = self.params
        nb = neighbors(inputs, model=p["model"], k=p["k"], backend=p["backend"], reduce_to=p["reduce_to"])
        sim, nbr = nb.row_neighbors()
        dist = np.where(nbr >= 0, np.clip(1.0 - sim, 0.0, 2.0), np.nan)
        score = np.full(inputs.n, np.nan)
        hit = np.zeros(inputs.n, dtype=bool)
        ok = np.isfinite(dist).any(1)
        if not ok.any():
            return score, hit
        avg = np.nanmean(dist[ok], axis=1)
        scaling = float(max(np.median(avg), 100 * np.finfo(np.float64).eps))
        s = transform_distances_to_scores(avg, t=1, scaling_factor=scaling)
        s = correct_precision_errors(s, avg, "cosine")
        t = p["features_threshold"]
        limit = float(np.percentile(avg, 75) + (1.0 / t - 1.0) * iqr(avg))
        rows = nb.space.rows[ok]
        score[rows] = s
        hit[rows] = avg > limit
        summary["features_issues"] = int(hit.sum())
        summary["features_mean_distance_limit"] = round(limit, 6)
        summary["features_scaling_factor"] = round(scaling, 6)
        summary.update({f"graph_{k}": v for k, v in nb.params.items()})
        return score, hit

    def _probs(self, inputs: CheckInputs, summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        from cleanlab.internal.constants import CONFIDENT_THRESHOLDS_LOWER_BOUND
        from cleanlab.outlier import OutOfDistribution

        n = inputs.n
        probs = list(inputs.probs or ())
        c = probs[0].shape[1]
        for q in probs:
            if q.shape != (n, c):
                raise ValueError(f"probs of shape {q.shape}, expected ({n}, {c}) like the first model's")
        valid = np.ones(n, dtype=bool) if inputs.valid is None else np.asarray(inputs.valid, dtype=bool)
        labels = None if inputs.labels is None else np.asarray(inputs.labels, dtype=np.int64)
        # Two passes over row blocks, never the (N, C) mean as a whole: at 50,000 x 1,000 the mean, its
        # normalised copy and cleanlab's adjusted copy and entropy terms were 2 GiB at once. Both
        # cleanlab steps are row-wise given the class thresholds, so blocks give the same scores.
        ok = np.zeros(n, dtype=bool)
        self_conf = np.full(n, np.nan)
        for s, e in _blocks(n):
            p = _mean_block(probs, s, e)
            good = valid[s:e] & np.isfinite(p).all(1)
            ok[s:e] = good
            if labels is not None:
                lab = labels[s:e]
                has = good & (lab >= 0)
                self_conf[s:e][has] = p[np.flatnonzero(has), lab[has]]
        rows = np.flatnonzero(ok)
        score = np.full(n, np.nan)
        hit = np.zeros(n, dtype=bool)
        if len(rows) == 0:
            return score, hit
        labelled = ok & np.isfinite(self_conf) if labels is not None else np.zeros(n, dtype=bool)
        fit = int(labelled.sum()) >= 2
        if fit:
            lab = labels[labelled]  # type: ignore[index]
            conf = self_conf[labelled]
            # cleanlab's get_confident_thresholds (the mean self-confidence of each class's labelled images,
            # floored at its lower bound) from the self-confidences alone, so it needs no (N, C) matrix;
            # tests hold it equal to cleanlab's on the full matrix.
            counts = np.bincount(lab, minlength=c)
            sums = np.bincount(lab, weights=conf, minlength=c)
            thr = np.where(counts > 0, sums / np.maximum(counts, 1), 2.0)
            thr = np.clip(thr, CONFIDENT_THRESHOLDS_LOWER_BOUND, None)
            thr[counts == 0] = max(float(conf.mean()), CONFIDENT_THRESHOLDS_LOWER_BOUND)
            ood = OutOfDistribution(params={"method": self.params["method"], "confident_thresholds": thr})
        else:
            # No labels: nothing to fit class thresholds on, so the raw probabilities are scored.
            ood = OutOfDistribution(params={"method": self.params["method"], "adjust_pred_probs": False})
        raw = np.full(n, np.nan)
        for s, e in _blocks(n):
            good = np.flatnonzero(ok[s:e])
            if len(good):
                p = _mean_block(probs, s, e)[good]
                raw[s + good] = np.asarray(ood.score(pred_probs=p), dtype=np.float64)
        sc = np.clip(raw[rows], 0.0, 1.0)
        limit = float(self.params["probs_threshold"] * np.median(sc))
        score[rows] = sc
        hit[rows] = sc < limit
        summary["probs_issues"] = int(hit.sum())
        summary["probs_score_limit"] = round(limit, 6)
        summary["probs_adjusted_by_class_thresholds"] = bool(fit)
        return score, hit


_BLOCK = 4096  # rows of the probability matrices handled at once: 4,096 x 1,000 float64 is 31 MiB


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + _BLOCK)) for s in range(0, n, _BLOCK)]


def _mean_block(probs: list[np.ndarray], s: int, e: int) -> np.ndarray:
    """Rows ``s:e`` of the models' mean probabilities, clipped at 0 and renormalised (float64)."""
    mean = np.zeros((e - s, probs[0].shape[1]), dtype=np.float64)
    for q in probs:
        mean += np.asarray(q[s:e], dtype=np.float64)
    mean /= len(probs)
    with np.errstate(invalid="ignore"):
        np.clip(mean, 0.0, None, out=mean)
        mean /= np.clip(mean.sum(1, keepdims=True), 1e-12, None)
    return mean
