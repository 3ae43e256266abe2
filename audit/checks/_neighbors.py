"""Nearest neighbours in feature space, computed once per run and shared by the feature-space checks.

``knn_label``, ``near_duplicate`` and ``outlier`` all read one k-nearest-neighbour graph, as
Datalab's issue managers share one ``weighted_knn_graph``; :func:`neighbors` builds it once per
:class:`~audit.checks.CheckInputs` (see :mod:`audit.checks._memo`) and hands later callers the
same graph, sliced to the ``k`` they ask for.

**The space.** Each zoo model's penultimate features are L2-normalised per image and the
normalised blocks are concatenated and divided by ``sqrt(M)``, so every row has unit length
and the cosine similarity of two images is the *mean of their per-model cosines*: every model
counts equally whatever its width or scale (SqueezeNet's 512 dimensions against Lite0's 1280,
activations of different magnitude), and two images are close only when the models agree
they are, the feature-space counterpart of the label check's ensemble of probabilities. One
model can be chosen instead (``model=``).

**Exact duplicates** (rows whose stored features are bit-identical) are collapsed into one
node before the search, so a photo present five times neither fills the neighbour lists of
its copies nor votes five times; each check sees the copies through
:attr:`FeatureSpace.group`. (cleanlab corrects its graph for exact duplicates after the
search, ``correct_knn_graph``; collapsing them first gives the same distances with a
smaller search.)

**The search** is exact cosine k-NN over the unique rows, self excluded: faiss
(``IndexFlatIP``) when it is installed, else scikit-learn's brute-force ``NearestNeighbors``
through cleanlab's ``features_to_knn``, the backend Datalab uses (``reports/knn_speed.md``
measures both). Wide features of many images are first projected by a truncated SVD (an
inner-product-preserving projection, so no centring) to ``reduce_to`` dimensions to find
``2k`` candidates, whose similarities are then recomputed exactly in the full space and
re-ranked: the graph's similarities are always exact, only a true neighbour that the
projection ranks below ``2k`` can be missed. Why: exact search costs ``N^2 D``; at 50,000
images x 3 x 1280 dimensions that is ~2e13 flops, minutes on two cores, against ~1e12 at 256
dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audit.checks import _memo
from audit.checks._base import CheckInputs

__all__ = [
    "BACKENDS",
    "GRAPH_K",
    "FeatureSpace",
    "Neighbors",
    "feature_space",
    "knn_search",
    "neighbors",
    "normalized_blocks",
    "reference_neighbors",
    "resolve_backend",
]

BACKENDS = ("auto", "faiss", "sklearn")
# Project to this many dimensions first when the exact search would cost more than _EXACT_FLOPS.
DEFAULT_REDUCE_TO = 256
# Exact search below this many flops (2 Q N D): the projection's randomized SVD costs about as much as
# 5e11 flops of search (measured on 10,000 x 1,792 CIFAR-10N features: exact search 7.8 s, projected
# 30 s), so it pays only for sets several times larger (50,000 x 3,840: 1.9e13).
_EXACT_FLOPS = 2e12
# Neighbours the shared graph holds at least: knn_label's default (20); near_duplicate and outlier
# (10, Datalab's) read its first 10, so one search serves all three.
GRAPH_K = 20
_SVD_FIT_ROWS = 5_000  # rows the projection is fitted on (seeded sample); the projection of the rest is a matmul
# Power iterations of the randomized SVD: the projection only has to rank 2k candidates (they are
# re-ranked exactly), so 2 iterations (scikit-learn's default is 5) are enough (recall in reports/knn_speed.md).
_SVD_ITER = 2
_RERANK_CHUNK = 128  # query rows re-ranked at once: 128 x 2k x D float32 stays in the tens of MiB


@dataclass(frozen=True)
class FeatureSpace:
    """Unit-length feature rows of the assessable images, and their exact-duplicate groups."""

    x: np.ndarray  # (R, D) float32, unit rows, for the images ``rows``
    rows: np.ndarray  # (R,) int64 image index of each row (valid images with finite, non-zero features)
    models: tuple[str, ...]  # models whose features were used, in order
    group: np.ndarray  # (R,) int64 exact-duplicate group of each row, 0..U-1
    reps: np.ndarray  # (U,) int64 row (into ``rows``) of each group's first member
    n: int  # images in the run, N

    @property
    def n_groups(self) -> int:
        return len(self.reps)

    def unique(self) -> np.ndarray:
        """One row per exact-duplicate group, (U, D): the space itself when it has no copies.

        Why not always ``x[reps]``: at 50,000 x 3,840 that fancy-index copy is another 0.7 GiB held
        through the whole search, for a set that usually has no exact copies at all.
        """
        if len(self.reps) == len(self.x):  # reps are numbered by first row, so no copies means 0..R-1
            return self.x
        return self.x[self.reps]

    def members(self) -> list[np.ndarray]:
        """Rows of every group with more than one member (exact copies), each sorted."""
        order = np.argsort(self.group, kind="stable")
        counts = np.bincount(self.group, minlength=self.n_groups)
        starts = np.cumsum(counts) - counts
        return [order[s : s + c] for s, c in zip(starts, counts, strict=True) if c > 1]


@dataclass(frozen=True)
class Neighbors:
    """The k nearest other groups of each group of a :class:`FeatureSpace` (self excluded)."""

    space: FeatureSpace
    k: int
    sim: np.ndarray  # (U, k) float32 exact cosine similarity, descending; NaN where fewer than k groups exist
    idx: np.ndarray  # (U, k) int64 neighbouring group; -1 where fewer than k groups exist
    params: dict[str, Any] = field(default_factory=dict)  # JSON-able: backend, reduction, k

    def first(self, k: int) -> Neighbors:
        """The same graph cut to its ``k`` nearest (``k <= self.k``)."""
        if k > self.k:
            raise ValueError(f"asked for {k} neighbours of a graph of {self.k}")
        return Neighbors(self.space, k, self.sim[:, :k], self.idx[:, :k], {**self.params, "k": k})

    def row_neighbors(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``k`` nearest other rows, exact copies first (similarity 1), then one row per group.

        Returns ``(sim, nbr)``, each (R, k): ``nbr`` holds rows of the space (-1 where fewer exist).
        The image-level view of the graph, as cleanlab's exact-duplicate correction gives it:
        a row's copies are its nearest neighbours at distance 0, and a neighbouring group counts once.
        """
        k = self.k if k is None else k
        sp = self.space
        sim = self.sim[sp.group, :k].astype(np.float64)
        g = self.idx[sp.group, :k]
        nbr = np.where(g >= 0, sp.reps[np.maximum(g, 0)], -1)
        for rows in sp.members():
            for r in rows:
                copies = rows[rows != r][:k]
                c = len(copies)
                rest_s, rest_n = sim[r, : k - c].copy(), nbr[r, : k - c].copy()
                sim[r, :c], nbr[r, :c] = 1.0, copies
                sim[r, c:], nbr[r, c:] = rest_s, rest_n
        return sim, nbr


def normalized_blocks(features: Sequence[np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
    """The concatenation of per-model L2-normalised features over ``sqrt(M)``: float32, unit rows.

    Rows whose features are not finite or have zero length in any block come back as NaN.
    Written block by block, a few thousand rows at a time, into one preallocated array: at
    50,000 x 3 x 1,280 the per-model float32 copies plus their concatenation would hold
    three times the result (2.3 GiB) at once.
    """
    m = len(features)
    n = (features[0].shape[0] if rows is None else len(rows)) if m else 0
    widths = [int(f.shape[1]) for f in features]
    out = np.empty((n, sum(widths)), dtype=np.float32)
    scale = np.float32(1.0 / math.sqrt(m)) if m > 1 else np.float32(1.0)
    step = 8192
    col = 0
    for f, w in zip(features, widths, strict=True):
        for s in range(0, n, step):
            e = min(n, s + step)
            a = np.asarray(f[s:e] if rows is None else f[rows[s:e]], dtype=np.float32)
            with np.errstate(invalid="ignore", over="ignore"):
                norm = np.linalg.norm(a, axis=1, keepdims=True)
            bad = ~np.isfinite(norm) | (norm <= 0)
            blk = out[s:e, col : col + w]
            np.divide(a, np.where(bad, np.float32(1.0), norm / scale), out=blk)
            blk[bad[:, 0]] = np.nan
        col += w
    return out


def _select(
    inputs: CheckInputs, model: str | None, features: Sequence[np.ndarray]
) -> tuple[list[int], tuple[str, ...]]:
    """Which feature blocks to use: every one (default), or the one of ``model``."""
    names = tuple(inputs.model_names[: len(features)]) if len(inputs.model_names) >= len(features) else ()
    if model is None:
        return list(range(len(features))), names or tuple(f"features[{i}]" for i in range(len(features)))
    from audit.errors import OptionError

    if model not in names:
        known = ", ".join(names) or "(the run names no models)"
        raise OptionError(f"model {model!r} has no features in this run; choose one of: {known}")
    i = names.index(model)
    return [i], (model,)


def feature_space(inputs: CheckInputs, model: str | None = None) -> FeatureSpace:
    """The unit-length feature rows of the valid images (memoised per ``inputs``)."""
    return _memo.memo(inputs, ("feature_space", model), lambda: _feature_space(inputs, model))


def _feature_space(inputs: CheckInputs, model: str | None) -> FeatureSpace:
    feats = list(inputs.features or ())
    if not feats:
        raise ValueError("feature_space needs inputs.features")
    n = inputs.n
    for i, f in enumerate(feats):
        if f.ndim != 2 or f.shape[0] != n:
            raise ValueError(f"features[{i}] has shape {f.shape}, expected (N, D) with N={n}")
    which, names = _select(inputs, model, feats)
    valid = np.ones(n, dtype=bool) if inputs.valid is None else np.asarray(inputs.valid, dtype=bool)
    cand = np.flatnonzero(valid)
    x = normalized_blocks([feats[i] for i in which], cand)
    ok = np.isfinite(x).all(axis=1)
    # Boolean indexing copies even when it keeps every row: skip it then (0.7 GiB at 50,000 x 3,840).
    rows, x = (cand, x) if ok.all() else (cand[ok], np.ascontiguousarray(x[ok]))
    group, reps = _exact_groups([feats[i] for i in which], rows)
    return FeatureSpace(x=x, rows=rows.astype(np.int64), models=names, group=group, reps=reps, n=n)


def _exact_groups(blocks: Sequence[np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group ``rows`` whose stored features are bit-identical in every block.

    Returns ``(group (R,), first row of each group (U,))``, groups numbered by first row. Rows are
    compared by a 128-bit BLAKE2 digest of their stored bytes (float16 as scoring keeps them; a
    collision between two different rows is as likely as guessing a random 128-bit key): sorting
    the normalised 15 KiB rows themselves (``np.unique(axis=0)``, cleanlab's way) took 10 s at
    50,000 x 3,840.
    """
    import hashlib

    group = np.empty(len(rows), dtype=np.int64)
    first: dict[bytes, int] = {}
    reps: list[int] = []
    step = 4096
    for s in range(0, len(rows), step):
        chunk = [np.ascontiguousarray(b[rows[s : s + step]]) for b in blocks]
        for j in range(len(chunk[0])):
            h = hashlib.blake2b(digest_size=16)
            for c in chunk:
                h.update(memoryview(c[j]))
            key = h.digest()
            g = first.get(key)
            if g is None:
                g = first[key] = len(reps)
                reps.append(s + j)
            group[s + j] = g
    return group, np.asarray(reps, dtype=np.int64)


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``faiss`` when importable, else ``sklearn``; an explicit choice must be available."""
    from audit.errors import OptionError

    if backend not in BACKENDS:
        raise OptionError(f"knn backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "sklearn":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise OptionError("knn backend 'faiss' is not installed; pip install faiss-cpu, or use 'sklearn'") from None
        return "sklearn"
    return "faiss"


def neighbors(
    inputs: CheckInputs,
    *,
    model: str | None = None,
    k: int = 10,
    backend: str = "auto",
    reduce_to: int | None = DEFAULT_REDUCE_TO,
) -> Neighbors:
    """The k-NN graph over the unique feature rows of ``inputs``; built once per run and option set.

    Built with at least :data:`GRAPH_K` neighbours; a call asking for fewer gets the stored graph
    cut to ``k``, one asking for more rebuilds it and stores the larger graph.
    """
    be = resolve_backend(backend)
    key = ("neighbors", model, be, reduce_to)
    have = _memo.peek(inputs, key)
    if have is None or have.k < k:
        space = feature_space(inputs, model)
        x = space.unique()
        kb = max(k, GRAPH_K)
        sim, idx, params = knn_search(x, None, kb, backend=be, reduce_to=reduce_to, seed=inputs.seed)
        have = Neighbors(space, kb, sim, idx, {**params, "k": kb, "models": list(space.models)})
        _memo.store(inputs, key, have)
    return have.first(k) if have.k > k else have


def reference_neighbors(
    inputs: CheckInputs,
    *,
    model: str | None = None,
    k: int = 1,
    backend: str = "auto",
    reduce_to: int | None = DEFAULT_REDUCE_TO,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Each unique row's ``k`` nearest reference images: ``(sim (U, k), reference index (U, k), ids)``.

    ``inputs.reference`` holds ``{"image_ids": (M,) ids, "features": [per model (M, D_m)]}`` in the
    run's model order; the reference rows are normalised the same way.
    """
    from audit.errors import OptionError

    ref = inputs.reference or {}
    rfeats = list(ref.get("features") or ())
    if not rfeats:
        raise OptionError("the reference set has no features; score it with the same zoo models as the set")
    space = feature_space(inputs, model)
    feats = list(inputs.features or ())
    if len(rfeats) != len(feats):
        raise OptionError(
            f"the reference set has features of {len(rfeats)} models, the set of {len(feats)}: score both with "
            "the same zoo models"
        )
    which, _ = _select(inputs, model, feats)
    for i in which:
        if rfeats[i].ndim != 2 or rfeats[i].shape[1] != feats[i].shape[1]:
            raise OptionError(
                f"reference features[{i}] have shape {rfeats[i].shape}, the set's have width {feats[i].shape[1]}: "
                "score both with the same zoo models"
            )
    ids = tuple(str(i) for i in ref.get("image_ids", range(rfeats[which[0]].shape[0])))
    r = normalized_blocks([rfeats[i] for i in which])
    keep = np.flatnonzero(np.isfinite(r).all(axis=1))
    be = resolve_backend(backend)
    sim, idx, _ = knn_search(
        np.ascontiguousarray(r[keep]), space.unique(), k, backend=be, reduce_to=reduce_to, seed=inputs.seed
    )
    idx = np.where(idx >= 0, keep[np.maximum(idx, 0)], -1)
    return sim, idx, ids


def knn_search(
    base: np.ndarray,
    query: np.ndarray | None,
    k: int,
    *,
    backend: str,
    reduce_to: int | None = DEFAULT_REDUCE_TO,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Exact cosine k-NN of unit rows: ``query``'s neighbours in ``base``, or ``base``'s own without self.

    Returns ``(sim (Q, k) float32 descending, idx (Q, k) int64, params)``; NaN / -1 pad rows
    with fewer than ``k`` candidates. Ties are broken by the lower index, so results do not
    depend on the backend.
    """
    self_query = query is None
    q = base if self_query else query
    nb, d = base.shape
    avail = nb - 1 if self_query else nb
    kk = max(0, min(k, avail))
    sim = np.full((len(q), k), np.nan, dtype=np.float32)
    idx = np.full((len(q), k), -1, dtype=np.int64)
    params: dict[str, Any] = {"backend": backend, "metric": "cosine", "reduced_to": None}
    if kk == 0 or len(q) == 0:
        return sim, idx, params
    reduce = bool(reduce_to) and d > int(reduce_to) and 2.0 * len(q) * nb * d > _EXACT_FLOPS
    if reduce:
        kc = min(avail, 2 * kk)
        bq, qq = _project(base, None if self_query else q, int(reduce_to), seed)  # type: ignore[arg-type]
        _, cand = _search(bq, qq, kc, backend)
        s, i = _rerank(base, q, cand)
        params["reduced_to"] = int(reduce_to)  # type: ignore[arg-type]
        params["candidates"] = kc
    else:
        s, i = _search(base, None if self_query else q, kk, backend)
    # Sort by (similarity desc, index asc): backends disagree on tie order otherwise.
    s = s.astype(np.float32)
    order = np.lexsort((i, -s), axis=1)
    s = np.take_along_axis(s, order, 1)[:, :kk]
    i = np.take_along_axis(i, order, 1)[:, :kk]
    sim[:, :kk] = np.clip(s, -1.0, 1.0)
    idx[:, :kk] = i
    return sim, idx, params


def _project(base: np.ndarray, query: np.ndarray | None, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    from sklearn.decomposition import TruncatedSVD

    rng = np.random.default_rng(seed)
    fit = base if len(base) <= _SVD_FIT_ROWS else base[np.sort(rng.choice(len(base), _SVD_FIT_ROWS, replace=False))]
    svd = TruncatedSVD(
        n_components=min(dims, base.shape[1] - 1), algorithm="randomized", n_iter=_SVD_ITER, random_state=seed
    )
    svd.fit(fit)
    comp = svd.components_.T.astype(np.float32)  # (D, dims)

    def proj(a: np.ndarray) -> np.ndarray:
        p = a @ comp
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(p, dtype=np.float32)

    return proj(base), None if query is None else proj(query)


def _search(base: np.ndarray, query: np.ndarray | None, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """k nearest by cosine (rows are unit length); self excluded when ``query`` is None."""
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(base.shape[1])
        index.add(np.ascontiguousarray(base, dtype=np.float32))
        if query is not None:
            s, i = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
            return s, i.astype(np.int64)
        s, i = index.search(np.ascontiguousarray(base, dtype=np.float32), k + 1)
        return _drop_self(s, i.astype(np.int64), k)
    from cleanlab.internal.neighbor import features_to_knn

    knn = features_to_knn(base, n_neighbors=k, metric="cosine", algorithm="brute")
    dist, i = knn.kneighbors(query, n_neighbors=k)  # query None: each row's neighbours without itself
    return 1.0 - dist, i.astype(np.int64)


def _drop_self(s: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k+1 results (or the last one where ties pushed self out)."""
    own = i == np.arange(len(i))[:, None]
    drop = np.where(own.any(1), own.argmax(1), k)
    keep = np.ones_like(own)
    keep[np.arange(len(i)), drop] = False
    return s[keep].reshape(len(i), k), i[keep].reshape(len(i), k)


def _rerank(base: np.ndarray, query: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact similarities of each query row to its candidates in the full space."""
    out = np.empty(cand.shape, dtype=np.float32)
    for s in range(0, len(query), _RERANK_CHUNK):
        c = cand[s : s + _RERANK_CHUNK]
        out[s : s + _RERANK_CHUNK] = np.einsum("qd,qkd->qk", query[s : s + _RERANK_CHUNK], base[np.maximum(c, 0)])
    out[cand < 0] = -np.inf
    return out, cand
