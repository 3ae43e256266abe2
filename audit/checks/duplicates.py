"""``near_duplicate``: images that are (nearly) the same photo, by their features or their perceptual hashes, as groups.

Two signals, either of which joins a pair:

* **features**, modelled on Datalab's ``NearDuplicateIssueManager``
  (``cleanlab/datalab/internal/issue_manager/duplicate.py``): the run's k-NN graph (k = 10, cosine,
  exact duplicates at distance 0; :mod:`audit.checks._neighbors`), a pair closer than a threshold is a
  duplicate pair, and the score is Datalab's ``1 - exp(-d / median_nn_distance)`` of the distance ``d``
  to the nearest neighbour (0 for an exact copy; low = more suspicious), so the ranking matches Datalab's.
* **perceptual hashes**: the 64-bit phash the decode pass stores (``inputs.pixels["phash"]``,
  CleanVision's near-duplicate hash, ``hash_size`` 8): a pair whose hashes differ in at most
  ``hash_distance`` bits (default :data:`DEFAULT_HASH_DISTANCE`) is a duplicate pair. Why both: on
  ``reports/CHECKS.md``'s constructed set the features alone missed every half-size copy (0/15), 7 of 15
  JPEG-q50 re-encodes and 9 of 15 80% crops, while the phash of a half-size or re-encoded copy lies
  within 2 bits of its source's (median 0) and the nearest two distinct originals 14 bits apart; the
  features in turn join crops and flips, which move a phash by 16 bits and more. The pairs within the
  distance are found by multi-index hashing (:mod:`audit.checks._hashes`), exact and well under a second
  at 50,000 images. An image's hash score is the fraction of bits in which it differs from its nearest
  hash partner (``h / 64``; 1 where it has none within the distance), and its score is the lower of its
  two scores.

The check runs on whichever of the two inputs the run has: features only (pixel statistics not
gathered, or ``hash_distance=-1``), pixel statistics only (``--no-features``, prediction-file models),
or both. Its own departures from Datalab, each for a reason:

* **the feature threshold is an absolute cosine similarity** (``threshold``, default
  :data:`DEFAULT_THRESHOLD`) instead of Datalab's ``0.13 x`` the median nearest-neighbour
  distance: the relative rule moves with how crowded the set is (a set of near-identical
  product shots gets a tighter threshold than a varied one), while a copy's similarity to its
  original is a property of the transformation and the models; ``reports/near_duplicate_calibration.md``
  measures where re-encoded, resized, cropped and flipped copies fall and what the relative rule
  would have given. ``relative=0.13`` selects Datalab's rule instead.
* **groups are connected components** of all duplicate pairs, of both signals (Datalab lists each
  example's own set): a reviewer resolves a group once. Each image's ``info`` names its ``group``, its
  ``partners``, whether the group's labels differ, which signals joined it (``by``: ``features``,
  ``phash``), its feature ``similarity`` to its nearest neighbour and its ``hash_distance`` to its nearest
  partner where known; ``suggestion`` is its nearest partner (in feature space first, else by hash).

"Duplicates with different labels" is its own finding: ``info["labels_differ"]`` and the summary's
``groups_with_different_labels``. With ``inputs.reference`` (``--reference TRAIN_DIR``: its ids,
features and pixel statistics) an image whose nearest reference image is above the feature threshold,
or whose phash is within ``hash_distance`` of a reference image's, is an issue too (leakage between
the sets), its ``info["reference"]`` naming that image; the reference's labels are never scored.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from audit.checks._base import Check, CheckInputs, CheckResult
from audit.checks._hashes import HASH_BITS, hamming, hamming_pairs
from audit.checks._neighbors import FeatureSpace, neighbors, reference_neighbors
from audit.checks.knn import _graph_options, _option

__all__ = [
    "DEFAULT_HASH_DISTANCE",
    "DEFAULT_THRESHOLD",
    "MAX_HASH_DISTANCE",
    "NearDuplicateCheck",
    "duplicate_groups",
]

# Cosine similarity (mean over models) at or above which two images are the same photo;
# see reports/near_duplicate_calibration.md for where copies and distinct images fall.
DEFAULT_THRESHOLD = 0.90
# Differing phash bits (of 64) at or below which two images are the same photo. CleanVision's own rule is
# equal hashes (0). Measured on reports/CHECKS.md's constructed set (real ImageNet photos): half-size,
# JPEG-q50, blurred, darkened and grayscale copies lie at median 0 and at most 2 bits from their source,
# low-contrast ones at most 8; the nearest two distinct originals are 14 bits apart (1st percentile 14,
# median 20). 4 takes every resized and re-encoded copy with a bit-flip's margin over the largest seen, where
# equality misses those at 2, and keeps 10 bits below the nearest distinct pair measured.
DEFAULT_HASH_DISTANCE = 4
# The largest distance allowed: the pairing's cost grows with it (d + 1 bands of 64 / (d + 1) bits; ~4 s at
# 50,000 hashes for d = 10 on two cores, against 0.1 s at 4), and beyond it distinct photos meet (14 above).
MAX_HASH_DISTANCE = 10
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


@dataclass(frozen=True)
class _FeaturePairs:
    """What the feature half found, per image of the set (N,) and per row of the space."""

    space: FeatureSpace
    pairs: np.ndarray  # (P, 2) image indices at or above the threshold
    score: np.ndarray  # (N,) Datalab's score, NaN outside the space
    nn_sim: np.ndarray  # (N,) similarity to the nearest other image, NaN outside the space
    nbr_img: np.ndarray  # (R, k) neighbours' image indices of each row, nearest first, -1 pads
    row_of: np.ndarray  # (N,) row of each image in the space, -1 outside
    threshold: float
    median: float


@dataclass(frozen=True)
class _HashPairs:
    """What the hash half found: pairs within the distance among the images with a phash."""

    assessed: np.ndarray  # (A,) images with a phash (decoded, valid)
    pairs: np.ndarray  # (P, 2) image indices joined (identical hashes chained to their first image)
    nearest: np.ndarray  # (N,) distance to the nearest hash partner, -1 = none within the distance
    partner: np.ndarray  # (N,) that partner's image index, -1 = none
    score: np.ndarray  # (N,) nearest / 64, 1 without a partner, NaN unassessed
    unique: np.ndarray  # (U,) the distinct hashes of the assessed images
    inverse: np.ndarray  # (A,) each assessed image's distinct hash


def _phashes(pixels: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """(N,) uint64 phash column, or None when the pixel statistics lack one."""
    if pixels is None or "phash" not in pixels:
        return None
    return np.asarray(pixels["phash"], dtype=np.uint64)


def _hashed(inputs: CheckInputs) -> np.ndarray:
    """(N,) bool: images with a phash, decoded (``pixels["ok"]``) and valid for the run."""
    px = inputs.pixels
    if _phashes(px) is None:
        return np.zeros(inputs.n, dtype=bool)
    assert px is not None
    ok = np.asarray(px["ok"], dtype=bool).copy() if "ok" in px else np.ones(inputs.n, dtype=bool)
    if inputs.valid is not None:
        ok &= np.asarray(inputs.valid, dtype=bool)
    return ok


class NearDuplicateCheck(Check):
    """``near_duplicate``: groups of images with features above ``threshold`` or phashes within ``hash_distance``.

    Needs features or pixel statistics (either suffices; with both, a pair joined by either counts).

    Parameters
    ----------
    threshold : float
        Cosine similarity (mean over the models) at or above which two images are duplicates;
        default :data:`DEFAULT_THRESHOLD`.
    relative : float, optional
        Datalab's rule instead: distance below ``relative x`` the median nearest-neighbour
        distance (Datalab's default 0.13).
    hash_distance : int or None
        Differing phash bits (of 64) at or below which two images are duplicates, 0..
        :data:`MAX_HASH_DISTANCE`; default :data:`DEFAULT_HASH_DISTANCE`; 0 is CleanVision's rule (equal
        hashes); -1 or None uses the features only.
    k, model, backend, reduce_to
        The neighbour graph (see :func:`audit.checks._neighbors.neighbors`); k = 10 as Datalab's.
    """

    name: ClassVar[str] = "near_duplicate"
    suggests: ClassVar[str | None] = "image"  # the nearest partner's image index
    needs: ClassVar[frozenset[str]] = frozenset({"features", "pixels"})
    needs_any: ClassVar[bool] = True
    default: ClassVar[bool] = True
    description: ClassVar[str] = (
        "near-identical images: feature cosine or phash distance (groups; also against --reference; needs either)"
    )

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
        hd = params.get("hash_distance", DEFAULT_HASH_DISTANCE)
        is_int = isinstance(hd, numbers.Integral) and not isinstance(hd, bool)
        _option(
            hd is None or (is_int and -1 <= hd <= MAX_HASH_DISTANCE),
            f"hash_distance must be an int in 0..{MAX_HASH_DISTANCE} (differing bits of the 64-bit phash; 0 = "
            f"CleanVision's equal hashes), or -1 or null for the features only, got {hd!r}",
        )
        unknown = set(params) - {*graph, "threshold", "relative", "hash_distance"}
        _option(not unknown, f"near_duplicate has no option(s) {', '.join(sorted(unknown))}")
        super().__init__(
            **graph,
            threshold=float(t),
            relative=None if rel is None else float(rel),
            hash_distance=None if hd is None or hd < 0 else int(hd),
        )

    def _usable(self, inputs: CheckInputs) -> frozenset[str]:
        """The signals this run can feed: features, and pixels when they hold a phash and hashing is on."""
        have = set(inputs.available() & {"features"})
        if self.params["hash_distance"] is not None and _phashes(inputs.pixels) is not None:
            have.add("pixels")
        return frozenset(have)

    def missing(self, inputs: CheckInputs) -> frozenset[str]:
        """Empty when features or pixel statistics (with a phash) are there: either half runs alone."""
        wanted = frozenset({"features"} | ({"pixels"} if self.params["hash_distance"] is not None else set()))
        return frozenset() if self._usable(inputs) else wanted

    def run(self, inputs: CheckInputs) -> CheckResult:
        n = inputs.n
        usable = self._usable(inputs)
        if not usable:
            raise ValueError("near_duplicate ran without features or phashes (missing() should have skipped it)")
        summary: dict[str, Any] = {"inputs_used": sorted(usable)}
        fp = self._features(inputs, summary) if "features" in usable else None
        hp = self._hashes(inputs, summary) if "pixels" in usable else None
        nothing = np.zeros((0, 2), dtype=np.int64)
        pairs = np.concatenate([fp.pairs if fp else nothing, hp.pairs if hp else nothing])
        comp = duplicate_groups(pairs, n)
        by_f = np.zeros(n, dtype=bool)
        by_h = np.zeros(n, dtype=bool)
        if fp is not None:
            by_f[fp.pairs.ravel()] = True
        if hp is not None:
            by_h[hp.pairs.ravel()] = True
        score = np.full(n, np.nan)
        for part in (fp, hp):
            if part is not None:
                score = np.fmin(score, part.score)  # the lower of the two; NaN only where neither assessed
        ph = _phashes(inputs.pixels)
        hashed = _hashed(inputs)

        is_issue = np.zeros(n, dtype=bool)
        suggestion = np.full(n, -1, dtype=np.int64)
        info: list[dict[str, Any] | None] = [None] * n
        labels = None if inputs.labels is None else np.asarray(inputs.labels, dtype=np.int64)
        order = np.argsort(comp, kind="stable")
        starts = np.searchsorted(comp[order], np.arange(int(comp.max(initial=-1)) + 1))
        ends = np.append(starts[1:], n)[: len(starts)]
        differ_groups = 0
        differ_images = 0
        for g, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            imgs = order[a:b].tolist()  # ascending image index (stable sort of an arange)
            labs = {int(labels[i]) for i in imgs if labels[i] >= 0} if labels is not None else set()
            differ = len(labs) > 1
            differ_groups += differ
            differ_images += len(imgs) * differ
            in_group = set(imgs)
            for img in imgs:
                nearest = -1
                if fp is not None and fp.row_of[img] >= 0:
                    nearest = next((int(x) for x in fp.nbr_img[fp.row_of[img]] if x in in_group and x != img), -1)
                if nearest < 0 and hp is not None and hp.partner[img] >= 0:
                    nearest = int(hp.partner[img])
                if nearest < 0:
                    nearest = next(x for x in imgs if x != img)
                is_issue[img] = True
                suggestion[img] = nearest
                entry: dict[str, Any] = {
                    "group": g,
                    "size": len(imgs),
                    # The first few only: a blank frame in 5,000 copies must not cost 25M list entries.
                    "partners": [i for i in imgs[: _MAX_PARTNERS + 1] if i != img][:_MAX_PARTNERS],
                    "by": [name for name, hit in (("features", by_f[img]), ("phash", by_h[img])) if hit],
                }
                if fp is not None and np.isfinite(fp.nn_sim[img]):
                    entry["similarity"] = round(float(fp.nn_sim[img]), 4)
                if hp is not None and hp.nearest[img] >= 0:
                    entry["hash_distance"] = int(hp.nearest[img])
                elif ph is not None and hashed[img] and hashed[nearest]:
                    entry["hash_distance"] = int(hamming(ph[img], ph[nearest]))
                entry["labels_differ"] = differ
                info[img] = entry

        members = int(comp.max(initial=-1)) + 1
        summary.update(
            {
                "duplicate_groups": members,
                "images_in_groups": int(is_issue.sum()),
                "largest_group": int((ends - starts).max(initial=0)),
                "groups_with_different_labels": differ_groups,
                "images_in_groups_with_different_labels": differ_images,
                "joined_by": {
                    "features_only": int((by_f & ~by_h).sum()),
                    "phash_only": int((by_h & ~by_f).sum()),
                    "both": int((by_f & by_h).sum()),
                },
            }
        )
        if inputs.reference is not None:
            self._reference(inputs, fp, hp, score, is_issue, info, summary)
        return CheckResult(
            check=self.name,
            score=np.clip(score, 0.0, 1.0),
            is_issue=is_issue,
            suggestion=suggestion,
            info=info,
            params=dict(self.params),
            summary=summary,
        )

    def _features(self, inputs: CheckInputs, summary: dict[str, Any]) -> _FeaturePairs:
        """Datalab's half: pairs at or above the cosine threshold on the shared k-NN graph."""
        p = self.params
        n = inputs.n
        nb = neighbors(inputs, model=p["model"], k=p["k"], backend=p["backend"], reduce_to=p["reduce_to"])
        sp = nb.space
        sim, nbr = nb.row_neighbors()  # (R, k): copies first (1.0), then one row per group
        nn_sim = sim[:, 0] if sim.shape[1] else np.full(len(sp.rows), np.nan)
        nn_dist = np.clip(1.0 - np.nan_to_num(nn_sim, nan=-1.0), 0.0, 2.0)
        median = max(float(np.median(nn_dist)) if len(nn_dist) else 0.0, _EPS)
        threshold = p["threshold"] if p["relative"] is None else 1.0 - p["relative"] * median
        hit = (nbr >= 0) & (np.nan_to_num(sim, nan=-1.0) >= threshold)
        r, j = np.nonzero(hit)
        pairs = np.stack([sp.rows[r], sp.rows[nbr[r, j]]], axis=1) if len(r) else np.zeros((0, 2), dtype=np.int64)
        score = np.full(n, np.nan)
        # Datalab's score: 1 - exp(-d / median nearest-neighbour distance), exactly 0 for an exact copy.
        s = 1.0 - np.exp(-nn_dist / median)
        s[np.isclose(nn_dist, 0.0)] = 0.0
        score[sp.rows] = s
        sims = np.full(n, np.nan)
        sims[sp.rows] = nn_sim
        row_of = np.full(n, -1, dtype=np.int64)
        row_of[sp.rows] = np.arange(len(sp.rows))
        summary.update(
            {
                "threshold": round(float(threshold), 6),
                "threshold_rule": "absolute cosine similarity"
                if p["relative"] is None
                else f"Datalab's: distance < {p['relative']} x median nearest-neighbour distance",
                "median_nn_similarity": round(1.0 - median, 6) if len(nn_dist) else None,
                "exact_duplicate_groups": len(sp.members()),
                **{f"graph_{k}": v for k, v in nb.params.items()},
            }
        )
        nbr_img = np.where(nbr >= 0, sp.rows[np.maximum(nbr, 0)], -1)
        return _FeaturePairs(sp, pairs, score, sims, nbr_img, row_of, float(threshold), median)

    def _hashes(self, inputs: CheckInputs, summary: dict[str, Any]) -> _HashPairs:
        """The hash half: pairs of images whose phashes differ in at most ``hash_distance`` bits."""
        n = inputs.n
        d = int(self.params["hash_distance"])
        ph = _phashes(inputs.pixels)
        assert ph is not None
        idx = np.flatnonzero(_hashed(inputs))
        # Identical hashes collapse first (a blank frame repeated 5,000 times is one entry, not 12.5M pairs);
        # np.unique's index is each value's first occurrence, so ``rep`` is its lowest image.
        uniq, first, inv, count = np.unique(ph[idx], return_index=True, return_inverse=True, return_counts=True)
        rep = idx[first]
        same = idx != rep[inv]
        exact = np.stack([rep[inv][same], idx[same]], axis=1)
        i, j, dist = hamming_pairs(uniq, d)
        near = np.stack([rep[i], rep[j]], axis=1)

        # Each distinct hash's nearest other distinct hash within d (ties: the lower image), then per image.
        u = len(uniq)
        best_d = np.full(u, -1, dtype=np.int64)
        best_u = np.full(u, -1, dtype=np.int64)
        if len(i):
            a, b, dd = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([dist, dist])
            o = np.lexsort((rep[b], dd, a))
            a, b, dd = a[o], b[o], dd[o]
            lead = np.r_[True, a[1:] != a[:-1]]
            best_d[a[lead]], best_u[a[lead]] = dd[lead], b[lead]
        nearest = np.full(n, -1, dtype=np.int64)
        partner = np.full(n, -1, dtype=np.int64)
        nearest[idx], partner[idx] = best_d[inv], np.where(best_u[inv] >= 0, rep[np.maximum(best_u[inv], 0)], -1)
        # An image sharing its hash: distance 0 to its group's first image (the first to the second).
        shared = count[inv] > 1
        second = np.full(u, np.iinfo(np.int64).max, dtype=np.int64)  # a shared hash's second-lowest image
        np.minimum.at(second, inv[same], idx[same])
        nearest[idx[shared]] = 0
        partner[idx[shared]] = np.where(same[shared], rep[inv[shared]], second[inv[shared]])
        score = np.full(n, np.nan)
        score[idx] = np.where(nearest[idx] >= 0, nearest[idx] / HASH_BITS, 1.0)
        summary.update(
            {
                "hash": "phash, 64 bits (CleanVision's near-duplicate hash)",
                "hash_distance": d,
                "hash_assessed": len(idx),
                "identical_hash_groups": int((count > 1).sum()),
                "hash_pairs_within_distance": len(i),
            }
        )
        return _HashPairs(idx, np.concatenate([exact, near]), nearest, partner, score, uniq, inv)

    def _reference(
        self,
        inputs: CheckInputs,
        fp: _FeaturePairs | None,
        hp: _HashPairs | None,
        score: np.ndarray,
        is_issue: np.ndarray,
        info: list[dict[str, Any] | None],
        summary: dict[str, Any],
    ) -> None:
        """Leakage: images whose nearest reference image is a duplicate by either signal (the reference is unscored)."""
        ref = inputs.reference or {}
        n = inputs.n
        ids: tuple[str, ...] | None = None
        # Per image: the reference index each signal names, and what it measured.
        f_ref = np.full(n, -1, dtype=np.int64)
        f_sim = np.full(n, np.nan)
        f_score = np.full(n, np.nan)
        h_ref = np.full(n, -1, dtype=np.int64)
        h_dist = np.full(n, -1, dtype=np.int64)
        used = []
        if fp is not None and ref.get("features"):
            p = self.params
            rsim, ridx, ids = reference_neighbors(
                inputs, model=p["model"], k=1, backend=p["backend"], reduce_to=p["reduce_to"]
            )
            sp = fp.space
            s = np.nan_to_num(rsim[sp.group, 0].astype(np.float64), nan=-1.0)
            r = ridx[sp.group, 0]
            d = np.clip(1.0 - s, 0.0, 2.0)
            rs = 1.0 - np.exp(-d / fp.median)
            rs[np.isclose(d, 0.0)] = 0.0
            leaked = (r >= 0) & (s >= fp.threshold)
            imgs = sp.rows[leaked]
            f_ref[imgs], f_sim[imgs], f_score[imgs] = r[leaked], s[leaked], rs[leaked]
            used.append("features")
        rph = _phashes(ref.get("pixels"))
        if hp is not None and rph is not None:
            rpx = ref["pixels"]
            rok = np.flatnonzero(np.asarray(rpx.get("ok", np.ones(len(rph), dtype=bool)), dtype=bool))
            runiq, rfirst = np.unique(rph[rok], return_index=True)
            rrep = rok[rfirst]  # each distinct reference hash's lowest reference index
            u = len(hp.unique)
            both = np.concatenate([hp.unique, runiq])
            side = np.r_[np.zeros(u, dtype=bool), np.ones(len(runiq), dtype=bool)]
            i, j, dist = hamming_pairs(both, int(self.params["hash_distance"]), side)  # i < j: i the set's
            best_d = np.full(u, -1, dtype=np.int64)
            best_r = np.full(u, -1, dtype=np.int64)
            if len(i):
                rj = rrep[j - u]
                o = np.lexsort((rj, dist, i))
                i, rj, dist = i[o], rj[o], dist[o]
                lead = np.r_[True, i[1:] != i[:-1]]
                best_d[i[lead]], best_r[i[lead]] = dist[lead], rj[lead]
            h_ref[hp.assessed], h_dist[hp.assessed] = best_r[hp.inverse], best_d[hp.inverse]
            used.append("phash")
        if not used:
            summary["reference_note"] = (
                "the reference set has no features or pixel statistics this run can compare: leakage not checked"
            )
            return
        if ids is None:
            raw = ref.get("image_ids")
            ids = tuple(str(x) for x in (range(len(rph) if rph is not None else 0) if raw is None else raw))
        ref_labels = ref.get("labels")
        ref_labels = None if ref_labels is None else np.asarray(ref_labels)
        leaked_f = f_ref >= 0
        leaked_h = h_ref >= 0
        for img in np.flatnonzero(leaked_f | leaked_h).tolist():
            named = int(f_ref[img]) if leaked_f[img] else int(h_ref[img])
            s_ref = np.fmin(f_score[img], h_dist[img] / HASH_BITS if leaked_h[img] else np.nan)
            is_issue[img] = True
            score[img] = np.fmin(score[img], s_ref)
            entry = dict(info[img] or {})
            entry["reference"] = ids[named]
            entry["reference_by"] = [k for k, hit in (("features", leaked_f[img]), ("phash", leaked_h[img])) if hit]
            if leaked_f[img]:
                entry["reference_similarity"] = round(float(f_sim[img]), 4)
            if leaked_h[img]:
                entry["reference_hash_distance"] = int(h_dist[img])
                if int(h_ref[img]) != named:  # the hash's nearest reference image is another one
                    entry["reference_phash"] = ids[int(h_ref[img])]
            if ref_labels is not None:
                entry["reference_label"] = int(ref_labels[named])
            info[img] = entry
        summary["reference_images"] = len(ids)
        summary["reference_inputs_used"] = used
        summary["duplicates_of_reference"] = int((leaked_f | leaked_h).sum())
        summary["duplicates_of_reference_by"] = {
            "features_only": int((leaked_f & ~leaked_h).sum()),
            "phash_only": int((leaked_h & ~leaked_f).sum()),
            "both": int((leaked_f & leaked_h).sum()),
        }
