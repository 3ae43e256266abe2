"""A 2-D map of the dataset from one zoo model's features (UMAP, or t-SNE), stored in the workspace.

Images that a network sees alike land together; a class forms a cloud; an image inside another
class's cloud is a hard case or a wrong label. The dashboard's Map page draws it.

**The computation** (:func:`compute_map`): the model's penultimate features, L2-normalised per
image (the cosine geometry the neighbour checks use), projected to ``pca_dims`` (50) by a seeded
PCA, rows renormalised; then umap-learn's ``UMAP`` (seeded, ``n_neighbors`` 15, ``min_dist``
0.1: its defaults) or scikit-learn's ``TSNE`` (``init="pca"``, seeded). Two shortcuts, both for
time on a 2-core machine:

* the PCA first (common practice for UMAP and t-SNE on wide features): the map is made of the
  leading directions, and every later step costs 50 dimensions instead of 1,280;
* UMAP's k nearest neighbours are computed exactly (faiss, else scikit-learn: the checks'
  :func:`audit.checks._neighbors.knn_search`) and handed over as ``precomputed_knn``, in place of
  its approximate NN-descent: on 50,000 images the descent was 60 of 134 s (its numba code is
  compiled on every process start), the exact search of 50-d rows takes seconds.

A seeded UMAP runs single-threaded (umap-learn's rule for reproducibility); the same features
and settings give the same map.

**Storage.** ``<workspace>.arrays/maps/``: one ``.npz`` per (model, method) holding the
coordinates (N, 2) float32 (NaN for an image without finite features), the model, method,
settings and the **digest of the features** it was made from; and ``current.json``, written by
every run that records features: its run id, the default map, and the digest of each feature
model's current features. A map is used only where its digest is the current one, so a map is
recomputed only when the features change (a rerun with cached scores reuses it), and one made
from features that have since changed is never shown. All writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit._io import atomic_file, atomic_write
from audit.store import arrays_dir

__all__ = [
    "FORMAT",
    "METHODS",
    "MIN_IMAGES",
    "MapSettings",
    "StoredMap",
    "compute_map",
    "current_maps",
    "features_digest",
    "map_path",
    "maps_dir",
    "read_map",
    "save_map",
    "strongest_model",
    "workspace_map",
    "write_current",
    "write_maps",
]

FORMAT = 1  # bumped when the files' fields change; readers treat other formats as absent
METHODS = ("umap", "tsne")
# Below this many images with features no map is made: UMAP needs more images than neighbours, and a
# map of a few dozen points shows nothing the gallery does not (and costs the numba start-up, ~20 s).
MIN_IMAGES = 100
_CURRENT = "current.json"


@dataclass(frozen=True)
class MapSettings:
    """How a map is computed; part of a stored map's identity (a change recomputes it)."""

    method: str = "umap"  # "umap" (umap-learn) or "tsne" (scikit-learn)
    seed: int = 0  # PCA, UMAP and t-SNE seed
    n_neighbors: int = 15  # UMAP's neighbourhood size (its default)
    min_dist: float = 0.1  # UMAP's minimum distance between embedded points (its default)
    pca_dims: int = 50  # dimensions kept by the PCA before UMAP / t-SNE

    def __post_init__(self) -> None:
        from audit.errors import OptionError

        if self.method not in METHODS:
            raise OptionError(f"--map-method {self.method!r}: expected one of {', '.join(METHODS)}")
        for name, v, lo in (("n_neighbors", self.n_neighbors, 2), ("pca_dims", self.pca_dims, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise OptionError(f"map {name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.min_dist, int | float) and 0 <= float(self.min_dist) <= 1):
            raise OptionError(f"map min_dist must be a number in [0, 1], got {self.min_dist!r}")

    def to_params(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": int(self.seed),
            "n_neighbors": int(self.n_neighbors),
            "min_dist": float(self.min_dist),
            "pca_dims": int(self.pca_dims),
        }


@dataclass(frozen=True)
class StoredMap:
    """One stored map (see the module doc)."""

    model: str  # the zoo model whose features made it
    method: str  # "umap" or "tsne"
    digest: str  # features_digest of the features it was made from
    coords: np.ndarray  # (N, 2) float32; NaN rows: images without finite features
    params: dict[str, Any]  # MapSettings.to_params, plus seconds and library versions
    run_id: str  # the run that computed it


def maps_dir(db: str | Path) -> Path:
    """Where workspace ``db`` keeps its maps."""
    return arrays_dir(db) / "maps"


def map_path(db: str | Path, model: str, method: str) -> Path:
    """The file of one (model, method) map: named by a hash, since model names may hold any character."""
    key = hashlib.sha256(json.dumps([model, method]).encode()).hexdigest()[:16]
    return maps_dir(db) / f"map-{key}.npz"


def features_digest(features: np.ndarray, valid: np.ndarray | None = None) -> str:
    """SHA-256 of a model's stored features (and the valid mask): a map is reused only while it matches."""
    h = hashlib.sha256()
    h.update(json.dumps([list(features.shape), str(features.dtype)]).encode())
    step = 8192
    for s in range(0, features.shape[0], step):
        h.update(np.ascontiguousarray(features[s : s + step]).tobytes())
    if valid is not None:
        h.update(np.packbits(np.asarray(valid, dtype=bool)).tobytes())
    return h.hexdigest()


def strongest_model(
    feature_models: Sequence[str],
    probs: Mapping[str, np.ndarray],
    arch_of: Mapping[str, str],
    labels: np.ndarray,
    valid: np.ndarray,
) -> str | None:
    """The feature model whose predictions (its own, or a head's on its features) agree most with the labels.

    ``probs`` maps each evaluable model or head to its (N, C) probabilities; ``arch_of`` maps a head to the
    feature model it reads. Ties go to the earlier model; None when there are no feature models; the first
    one when nothing is evaluable (no model predicts the set's classes).
    """
    if not feature_models:
        return None
    labels = np.asarray(labels)
    ok = np.asarray(valid, dtype=bool) & (labels >= 0)
    best, best_acc = feature_models[0], -1.0
    for m in feature_models:
        accs = []
        for name, p in probs.items():
            if name == m or arch_of.get(name) == m:
                top1 = np.concatenate([np.argmax(p[s : s + 8192], axis=1) for s in range(0, len(p), 8192)])
                accs.append(float(np.mean(top1[ok] == labels[ok])) if ok.any() else 0.0)
        if accs and max(accs) > best_acc:
            best, best_acc = m, max(accs)
    return best


def compute_map(
    features: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    settings: MapSettings = MapSettings(),
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """2-D coordinates of every image from one model's features.

    Parameters
    ----------
    features : (N, D) array (memory-mapped float16 as scoring stores it is fine)
    valid : (N,) bool, optional
        Images to place; others (and rows without finite, non-zero features) get NaN.
    settings : MapSettings

    Returns
    -------
    coords : (N, 2) float32
    info : dict, JSON-able: the settings, images placed, seconds, library versions
    """
    from sklearn.decomposition import PCA

    from audit.checks._neighbors import normalized_blocks

    t0 = time.perf_counter()
    n = int(features.shape[0])
    mask = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    cand = np.flatnonzero(mask)
    x = normalized_blocks([features], cand)
    ok = np.isfinite(x).all(axis=1)
    rows, x = cand[ok], x[ok]
    coords = np.full((n, 2), np.nan, dtype=np.float32)
    info: dict[str, Any] = {**settings.to_params(), "placed": len(rows)}
    if len(rows) < 3:
        info["seconds"] = round(time.perf_counter() - t0, 2)
        return coords, info
    dims = min(settings.pca_dims, x.shape[1], len(rows) - 1)
    y = PCA(n_components=dims, svd_solver="randomized", random_state=settings.seed).fit_transform(x)
    y = np.ascontiguousarray(y, dtype=np.float32)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    del x
    if log:
        took = time.perf_counter() - t0
        log(f"map: PCA to {dims} dimensions ({took:.1f} s); {settings.method} of {len(rows):,} images")
    info["pca_seconds"] = round(time.perf_counter() - t0, 2)
    if settings.method == "umap":
        out = _umap(y, settings, info)
        import umap

        info["umap_version"] = umap.__version__
    else:
        from sklearn.manifold import TSNE

        out = TSNE(n_components=2, init="pca", random_state=settings.seed, perplexity=min(30.0, (len(rows) - 1) / 3))
        out = out.fit_transform(y)
    coords[rows] = np.asarray(out, dtype=np.float32)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return coords, info


def _umap(y: np.ndarray, settings: MapSettings, info: dict[str, Any]) -> np.ndarray:
    import warnings

    import umap

    from audit.checks._neighbors import knn_search, resolve_backend

    t0 = time.perf_counter()
    k = min(settings.n_neighbors, len(y) - 1)
    sim, idx, _ = knn_search(y, None, k - 1, backend=resolve_backend("auto"), reduce_to=None, seed=settings.seed)
    # UMAP's graph lists each point as its own nearest neighbour, at distance 0.
    self_idx = np.arange(len(y), dtype=np.int64)[:, None]
    knn_idx = np.concatenate([self_idx, idx], axis=1)
    # Unit rows: the euclidean distance is sqrt(2 - 2 cos).
    knn_dist = np.concatenate([np.zeros((len(y), 1)), np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, None))], axis=1)
    knn_idx = np.where(knn_idx < 0, 0, knn_idx)  # fewer neighbours than asked (tiny sets): point at self
    knn_dist = np.where(np.isfinite(knn_dist), knn_dist, 0.0).astype(np.float32)
    info["knn_seconds"] = round(time.perf_counter() - t0, 2)
    reducer = umap.UMAP(
        n_neighbors=k,
        min_dist=float(settings.min_dist),
        metric="euclidean",
        random_state=settings.seed,
        precomputed_knn=(knn_idx, knn_dist, None),
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # "n_jobs overridden by random_state" and the precomputed-knn "no transform" notice: both expected.
        warnings.simplefilter("ignore")
        return reducer.fit_transform(y)


def save_map(
    db: str | Path, run_id: str, model: str, digest: str, coords: np.ndarray, params: Mapping[str, Any]
) -> Path:
    """Write one map atomically; returns its file."""
    coords = np.asarray(coords, dtype=np.float32)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got {coords.shape}")
    method = str(params["method"])
    path = map_path(db, model, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, prefix=f".{path.name}.", suffix=".tmp") as f:
        np.savez(
            f,
            format=np.int32(FORMAT),
            run_id=np.str_(run_id),
            model=np.str_(model),
            method=np.str_(method),
            digest=np.str_(digest),
            params=np.str_(json.dumps(dict(params))),
            coords=coords,
        )
    return path


def write_current(
    db: str | Path, run_id: str, digests: Mapping[str, str], default: tuple[str, str] | None, note: str | None
) -> None:
    """Record which features are current (and the default map, or why there is none) for this run."""
    body = {
        "format": FORMAT,
        "run_id": run_id,
        "digests": dict(digests),
        "default": list(default) if default else None,
        "note": note,
    }
    d = maps_dir(db)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / _CURRENT, json.dumps(body).encode(), prefix=f".{_CURRENT}.", suffix=".tmp")


def read_current(db: str | Path) -> dict[str, Any] | None:
    """The newest run's ``current.json``, or None (absent, damaged, another format)."""
    try:
        body = json.loads((maps_dir(db) / _CURRENT).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("format") == FORMAT else None


def read_map(db: str | Path, model: str, method: str, digest: str | None = None) -> StoredMap | None:
    """One stored map; None when absent, damaged, of another format, or (``digest`` given) from other features."""
    path = map_path(db, model, method)
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != FORMAT:
                return None
            got = StoredMap(
                model=str(z["model"]),
                method=str(z["method"]),
                digest=str(z["digest"]),
                coords=np.asarray(z["coords"], dtype=np.float32),
                params=json.loads(str(z["params"])),
                run_id=str(z["run_id"]),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if got.model != model or got.method != method or got.coords.ndim != 2 or got.coords.shape[1] != 2:
        return None
    if digest is not None and got.digest != digest:
        return None
    return got


def current_maps(db: str | Path) -> list[tuple[str, str]]:
    """The (model, method) maps made from the current features, the default first."""
    cur = read_current(db)
    if cur is None:
        return []
    digests = cur.get("digests") or {}
    out = []
    for model, digest in digests.items():
        for method in METHODS:
            m = read_map(db, model, method, digest)
            if m is not None:
                out.append((model, method))
    default = tuple(cur["default"]) if cur.get("default") else None
    out.sort(key=lambda mm: mm != default)
    return out


def write_maps(
    db: str | Path,
    run_id: str,
    features: Mapping[str, np.ndarray],
    valid: np.ndarray,
    *,
    default: str | None,
    settings: MapSettings = MapSettings(),
    extra: Sequence[str] = (),
    enabled: bool = True,
    log: Callable[[str], None] | None = None,
) -> str | None:
    """At the end of a run: record the current features, and compute the default model's map (and ``extra``).

    A map already stored for the same features and settings is reused. Returns a one-line note when no
    map is made (no features, too few images, switched off), else None.
    """
    digests = {m: features_digest(f, valid) for m, f in features.items()}
    note = None
    placed = int(np.count_nonzero(valid))
    if not features or default is None:
        note = "map: none, this run recorded no features"
    elif not enabled:
        note = "map: not computed (--no-map)"
    elif placed < MIN_IMAGES:
        note = f"map: none, {placed} images (a map needs at least {MIN_IMAGES}; the gallery shows them all)"
    todo = [] if note else list(dict.fromkeys([default, *extra]))
    for model in todo:
        want = {**settings.to_params()}
        have = read_map(db, model, settings.method, digests[model])
        if have is not None and all(have.params.get(k) == v for k, v in want.items()):
            continue
        coords, info = compute_map(features[model], valid, settings=settings, log=log)
        save_map(db, run_id, model, digests[model], coords, info)
        if log:
            log(f"map: {model} ({settings.method}) in {info['seconds']:.1f} s")
    dflt = (default, settings.method) if default is not None and not note else None
    write_current(db, run_id, digests, dflt, note)
    return note


def workspace_map(
    db: str | Path,
    *,
    model: str | None = None,
    settings: MapSettings = MapSettings(),
    log: Callable[[str], None] | None = None,
) -> tuple[str | None, str | None]:
    """``audit map``: compute (or reuse) a map of a finished workspace from its stored features, no rescoring.

    Reads the newest finished run's models, their features beside their logits in the arrays folder, the
    valid mask and the given labels; ``model`` None takes the best-fitting one, as a run does. Returns
    ``(model, note)``: the model mapped (None when none could be) and the one-line reason when none was.

    Raises
    ------
    StoreError
        No finished run in the workspace.
    OptionError
        ``model`` is not a model of the workspace with features.
    """
    from audit.errors import OptionError, StoreError
    from audit.store import connect, fetch_one

    with connect(db, read_only=True) as con:
        row = fetch_one(
            con,
            "SELECT run_id FROM runs WHERE status = ? ORDER BY finished_at DESC NULLS LAST, started_at DESC LIMIT 1",
            ["finished"],
        )
        if row is None:
            raise StoreError(f"{db} has no finished run; run audit run first")
        run_id = str(row[0])
        models = con.execute(
            "SELECT model, source, arch, logits_file, probs_file FROM models ORDER BY model"
        ).fetchall()
        img = con.execute("SELECT label, valid FROM images ORDER BY image_index").fetchnumpy()
        n_classes = int(fetch_one(con, "SELECT count(*) FROM classes", [])[0])
    labels = np.asarray(img["label"], dtype=np.int64)
    valid = np.asarray(img["valid"], dtype=bool)
    feats: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    arch_of: dict[str, str] = {}
    for name, source, arch, logits_file, probs_file in models:
        lp = Path(str(logits_file or ""))
        fp = lp.with_name(lp.name.removesuffix(".logits.npy") + ".features.npy")
        if source != "head" and lp.name.endswith(".logits.npy") and fp.exists():
            f = np.load(fp, mmap_mode="r")
            if f.ndim == 2 and f.shape[0] == len(labels):
                feats[str(name)] = f
        if probs_file and Path(probs_file).exists():
            p = np.load(probs_file, mmap_mode="r")
            if p.ndim == 2 and p.shape[0] == len(labels):
                probs[str(name)] = p
                if source == "head" and arch:
                    arch_of[str(name)] = str(arch)
    if model is not None and model not in feats:
        known = ", ".join(feats) or "(no model of this workspace has stored features)"
        raise OptionError(f"--model {model!r} has no stored features in {db}; choose one of: {known}")
    # Only predictions of the set's own classes say how well a model fits its labels (a custom space: the heads).
    evaluable = {k: v for k, v in probs.items() if v.shape[1] == n_classes}
    default = model or strongest_model(list(feats), evaluable, arch_of, labels, valid)
    note = write_maps(db, run_id, feats, valid, default=default, settings=settings, log=log)
    return (None if note else default), note
