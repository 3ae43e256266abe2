"""``near_duplicate``: images that are (nearly) the same photo in feature space, reported as groups.

Modelled on Datalab's ``NearDuplicateIssueManager``
(``cleanlab/datalab/internal/issue_manager/duplicate.py``): the run's k-NN graph (k = 10, cosine,
exact duplicates at distance 0; :mod:`audit.checks._neighbors`), a pair closer than a threshold
is a duplicate pair, and the score is Datalab's ``1 - exp(-d / median_nn_distance)`` of the
distance ``d`` to the nearest neighbour (0 for an exact copy; low = more suspicious), so the
ranking matches Datalab's. Two differences, each for a reason:

* **the threshold is an absolute cosine similarity** (``threshold``, default
  :data:`DEFAULT_THRESHOLD`) instead of Datalab's ``0.13 x`` the median nearest-neighbour
  distance: the relative rule moves with how crowded the set is (a set of near-identical
  product shots gets a tighter threshold than a varied one), while a copy's similarity to its
  original is a property of the transformation and the models; ``reports/near_duplicate_calibration.md``
  measures where re-encoded, resized, cropped and flipped copies fall and what the relative rule
  would have given. ``relative=0.13`` selects Datalab's rule instead.
* **groups are connected components** of the duplicate pairs (Datalab lists each example's own
  set): a reviewer resolves a group once. Each image's ``info`` names its ``group``, its
  ``partners`` and whether the group's labels differ; ``suggestion`` is its nearest partner.

"Duplicates with different labels" is its own finding: ``info["labels_differ"]`` and the summary's
``groups_with_different_labels``. With ``inputs.reference`` (``--reference TRAIN_DIR``: its ids and
features) an image whose nearest reference image is above the threshold is an issue too
(leakage between the sets), its ``info["reference"]`` naming that image; the reference's labels are
never scored.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np

from audit.checks._base import Check, CheckInputs, CheckResult
from audit.checks._neighbors import neighbors, reference_neighbors
from audit.checks.knn import _graph_options, _option

__all__ = ["DEFAULT_THRESHOLD", "NearDuplicateCheck", "duplicate_groups"]

# Cosine similarity (mean over models) at or above which two images are the same photo;
# see reports/near_duplicate_calibration.md for where copies and distinct images fall.
DEFAULT_THRESHOLD = 0.90
_MAX_PARTNERS = 20  # partners named in one image's info; the group's size is always given
_EPS = 1e-12


def duplicate_groups(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected components of ``pairs`` (P, 2) over ``n`` nodes; -1 for nodes in no pair.

    Components are numbered 0.. in order of their lowest node, so the numbering is deterministic.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out = np.full(n, -1, dtype=np.int64)
    if len(pairs) == 0:
        return out
    a = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(a, directed=False)
    size = np.bincount(comp)
    inpair = size[comp] > 1
    # Renumber by lowest member.
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    keep = np.flatnonzero(size > 1)
    order = keep[np.argsort(first[keep], kind="stable")]
    rank = np.full(comp.max() + 1, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    out[inpair] = rank[comp[inpair]]
    return out


class NearDuplicateCheck(Check):
    """``near_duplicate``: groups of images closer in feature space than ``threshold`` (cosine).

    Parameters
    ----------
    threshold : float
        Cosine similarity (mean over the models) at or above which two images are duplicates;
        default :data:`DEFAULT_THRESHOLD`.
    relative : float, optional
        Datalab's rule instead: distance below ``relative x`` the median nearest-neighbour
        distance (Datalab's default 0.13).
    k, model, backend, reduce_to
        The neighbour graph (see :func:`audit.checks._neighbors.neighbors`); k = 10 as Datalab's.
    """

    name: ClassVar[str] = "near_duplicate"
    suggests: ClassVar[str | None] = "image"  # the nearest partner's image index
    needs: ClassVar[frozenset[str]] = frozenset({"features"})
    default: ClassVar[bool] = True
    description: ClassVar[str] = "near-identical images in feature space (groups; also against --reference)"

    def __init__(self, **params: Any) -> None:
        graph = _graph_options(params)
        t = params.get("threshold", DEFAULT_THRESHOLD)
        _option(
            isinstance(t, numbers.Real) and not isinstance(t, bool) and 0 < t <= 1,
            f"threshold must be a cosine similarity in (0, 1], got {t!r}",
        )
        rel = params.get("relative")
        _option(
            rel is None or (isinstance(rel, numbers.Real) and not isinstance(rel, bool) and 0 < rel < 1),
            f"relative must be None or a number in (0, 1) (Datalab's 0.13), got {rel!r}",
        )
        unknown = set(params) - {*graph, "threshold", "relative"}
        _option(not unknown, f"near_duplicate has no option(s) {', '.join(sorted(unknown))}")
        super().__init__(**graph, threshold=float(t), relative=None if rel is None else float(rel))

    def run(self, inputs: CheckInputs) -> CheckResult:
        p = self.params
        n = inputs.n
        nb = neighbors(inputs, model=p["model"], k=p["k"], backend=p["backend"], reduce_to=p["reduce_to"])
        sp = nb.space
        sim, nbr = nb.row_neighbors()  # (R, k): copies first (1.0), then one row per group
        nn_sim = sim[:, 0] if sim.shape[1] else np.full(len(sp.rows), np.nan)
        nn_dist = np.clip(1.0 - np.nan_to_num(nn_sim, nan=-1.0), 0.0, 2.0)
        median = max(float(np.median(nn_dist)) if len(nn_dist) else 0.0, _EPS)
        threshold = p["threshold"] if p["relative"] is None else 1.0 - p["relative"] * median

        # Duplicate pairs between rows of the space; groups are their connected components.
        hit = (nbr >= 0) & (np.nan_to_num(sim, nan=-1.0) >= threshold)
        r, j = np.nonzero(hit)
        pairs = np.stack([r, nbr[r, j]], axis=1) if len(r) else np.zeros((0, 2), dtype=np.int64)
        comp = duplicate_groups(pairs, len(sp.rows))

        score = np.full(n, np.nan)
        # Datalab's score: 1 - exp(-d / median nearest-neighbour distance), exactly 0 for an exact copy.
        s = 1.0 - np.exp(-nn_dist / median)
        s[np.isclose(nn_dist, 0.0)] = 0.0
        score[sp.rows] = s
        is_issue = np.zeros(n, dtype=bool)
        suggestion = np.full(n, -1, dtype=np.int64)
        info: list[dict[str, Any] | None] = [None] * n
        labels = None if inputs.labels is None else np.asarray(inputs.labels, dtype=np.int64)

        members: dict[int, list[int]] = {}
        for row in np.flatnonzero(comp >= 0):
            members.setdefault(int(comp[row]), []).append(int(row))
        differ_groups = 0
        differ_images = 0
        for g, rows in members.items():
            imgs = [int(sp.rows[x]) for x in rows]
            labs = {int(labels[i]) for i in imgs if labels[i] >= 0} if labels is not None else set()
            differ = len(labs) > 1
            differ_groups += differ
            differ_images += len(imgs) * differ
            in_group = set(rows)
            for row, img in zip(rows, imgs, strict=True):
                partner_rows = [int(x) for x in nbr[row] if x >= 0 and int(x) in in_group and x != row]
                nearest = partner_rows[0] if partner_rows else next(x for x in rows if x != row)
                partners = [i for i in imgs if i != img]
                is_issue[img] = True
                suggestion[img] = int(sp.rows[nearest])
                info[img] = {
                    "group": g,
                    "size": len(imgs),
                    "partners": partners[:_MAX_PARTNERS],
                    "similarity": round(float(sim[row, 0]), 4),
                    "labels_differ": differ,
                }

        summary: dict[str, Any] = {
            "threshold": round(float(threshold), 6),
            "threshold_rule": "absolute cosine similarity"
            if p["relative"] is None
            else f"Datalab's: distance < {p['relative']} x median nearest-neighbour distance",
            "median_nn_similarity": round(1.0 - median, 6) if len(nn_dist) else None,
            "duplicate_groups": len(members),
            "images_in_groups": int(is_issue.sum()),
            "exact_duplicate_groups": len(sp.members()),
            "largest_group": max((len(v) for v in members.values()), default=0),
            "groups_with_different_labels": differ_groups,
            "images_in_groups_with_different_labels": differ_images,
            **{f"graph_{k}": v for k, v in nb.params.items()},
        }
        if inputs.reference is not None and inputs.reference.get("features"):
            self._reference(inputs, threshold, median, score, is_issue, info, summary)
        return CheckResult(
            check=self.name,
            score=np.clip(score, 0.0, 1.0),
            is_issue=is_issue,
            suggestion=suggestion,
            info=info,
            params=dict(self.params),
            summary=summary,
        )

    def _reference(
        self,
        inputs: CheckInputs,
        threshold: float,
        median: float,
        score: np.ndarray,
        is_issue: np.ndarray,
        info: list[dict[str, Any] | None],
        summary: dict[str, Any],
    ) -> None:
        """Leakage: images whose nearest reference image is a duplicate (the reference is not scored)."""
        p = self.params
        rsim, ridx, ids = reference_neighbors(
            inputs, model=p["model"], k=1, backend=p["backend"], reduce_to=p["reduce_to"]
        )
        sp = neighbors(inputs, model=p["model"], k=p["k"], backend=p["backend"], reduce_to=p["reduce_to"]).space
        s = np.nan_to_num(rsim[sp.group, 0].astype(np.float64), nan=-1.0)
        ref = ridx[sp.group, 0]
        ref_labels = inputs.reference.get("labels") if inputs.reference else None
        d = np.clip(1.0 - s, 0.0, 2.0)
        rs = 1.0 - np.exp(-d / median)
        rs[np.isclose(d, 0.0)] = 0.0
        leaked = (ref >= 0) & (s >= threshold)
        for row in np.flatnonzero(leaked):
            img = int(sp.rows[row])
            is_issue[img] = True
            score[img] = min(score[img], rs[row]) if np.isfinite(score[img]) else rs[row]
            entry = dict(info[img] or {})
            entry["reference"] = ids[int(ref[row])]
            entry["reference_similarity"] = round(float(s[row]), 4)
            if ref_labels is not None:
                entry["reference_label"] = int(np.asarray(ref_labels)[int(ref[row])])
            info[img] = entry
        summary["reference_images"] = len(ids)
        summary["duplicates_of_reference"] = int(leaked.sum())
