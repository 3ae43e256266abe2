"""The shard cache: resumable per-model shards, their stamps and checksums, assembled into ``(N, C)`` matrices.

The work is cut into shards of ``shard_size`` images. Each finished shard is
written atomically to ``<arrays>/shards/<model>/``: a run killed at any point
(``kill -9`` included) resumes where it stopped, recomputes nothing finished,
and ends with byte-identical outputs.

A shard holds one model's logits for ``shard_size`` consecutive images, the
``(size, mtime_ns)`` stamp each image had when it was read, the images that
could not be read, and SHA-256 sums (of the logits, of the features, and of
the rest). With features on, a shard also holds the model's penultimate
embedding of each image, ``(size, D)`` float16 (half the bytes; relative
rounding error below 1e-3, far under what a linear head can tell), computed in
the same forward pass as its logits and keyed by the same weights. A
cached shard is used only when its sums verify; a row is reused only while its
image keeps its stamp. The assembled ``(N, C)`` matrices carry SHA-256 sums
too, taken while they are written and checked before they are reused (about
0.2 s per 200 MB matrix, i.e. 50,000 x 1,000 float32), so a bit flipped or a
row moved on disk is rebuilt or rescored, never trusted; memory does not grow
with N.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit._io import atomic_file, atomic_write
from audit.datasets import AuditDataset
from audit.errors import StoreError
from audit.zoo import ModelSpec

__all__ = ["ModelArrays", "bad_images", "model_key", "softmax"]

_log = logging.getLogger(__name__)


# Bumped whenever what a shard holds could change: old shards are then recomputed.
# 3: per-image stamps and SHA-256 sums in every shard. 4: features beside the logits.
_SHARD_FORMAT = 4

_SHARD_SIZE = 1024

_META = ("stamps", "bad_index", "bad_reason")


@dataclass(frozen=True)
class ModelArrays:
    """Where one model's outputs for a dataset live."""

    spec: ModelSpec
    logits: Path  # (N, C) float32 .npy; NaN rows for images that could not be read
    probs: Path  # (N, C) float32 .npy, softmax of logits
    num_classes: int
    bad: Mapping[int, str] = field(default_factory=dict)  # images that could not be read: index -> reason
    # (N, D) float16 .npy, memory-mappable: the penultimate embedding of each image, from the same forward
    # pass as the logits (NaN rows for unreadable images); None when scored with features off or imported without.
    features: Path | None = None


def model_key(name: str) -> str:
    """A file-system-safe, collision-free key for a model name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60]
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (NaN rows stay NaN).

    Parameters
    ----------
    logits : ndarray, shape (n, C)
    """
    z = logits - np.max(logits, axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32, copy=False)


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not "*.npz": a file left half-written by a kill must never look like a shard.
    with atomic_file(path, prefix=".", suffix=".npz.tmp") as f:
        np.savez(f, **arrays)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode(), prefix=".", suffix=".tmp")


def _digest(**arrays: np.ndarray) -> str:
    """SHA-256 of named arrays: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fingerprint(
    ds: AuditDataset, spec: ModelSpec, shard_size: int, backend: str, precision: str, features: bool = True
) -> str:
    """What the cached shards of ``spec`` depend on: the weights' content (not their path), settings, image ids.

    The images' content is not in it: each shard row carries its image's stamp,
    so a changed image costs its batch, not every shard.
    """
    model = spec.as_dict()
    if spec.weights_file and Path(spec.weights_file).is_file():
        # By content: a checkpoint overwritten in place (a retrained best.pth) must be rescored,
        # and the same weights in another venv or on another machine must not be.
        with open(spec.weights_file, "rb") as f:
            model["weights_file"] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    settings = [_SHARD_FORMAT, shard_size, backend, precision, model, bool(features)]
    h.update(json.dumps(settings, sort_keys=True).encode())
    for i in ds.image_ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()


def _shard_dir(arrays: Path, spec: ModelSpec, fp: str) -> Path:
    return _fresh_dir(
        arrays / "shards" / model_key(spec.name),
        fp,
        f"{spec.name}: cached shards are for other images, weights or settings; recomputing",
        {"model": spec.name},
        also=("assembled.json",),
    )


def _fresh_dir(d: Path, fp: str, stale: str, manifest: Mapping[str, Any], *, also: Sequence[str] = ()) -> Path:
    """Folder ``d`` of shards for fingerprint ``fp``: half-written files removed; shards of another fingerprint
    removed with the one line ``stale`` on the log, and the manifest rewritten as ``{"fingerprint": fp, **manifest}``.
    Shared by the models' shards and the pixel statistics, so both caches invalidate by the same rule."""
    path = d / "manifest.json"
    try:
        old = json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        old = None
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob(".*.tmp"):  # left half-written by a killed run
        f.unlink(missing_ok=True)
    if old != fp:
        if old is not None:
            _log.warning("%s", stale)
        for f in [*d.glob("*.npz"), *(d / a for a in also)]:
            f.unlink(missing_ok=True)
        _atomic_write_text(path, json.dumps({"fingerprint": fp, **manifest}))
    return d


def _shard_path(d: Path, s: int) -> Path:
    return d / f"{s:06d}.npz"


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}".strip().rstrip(":")


@dataclass
class _Cached:
    """A cached shard's verified stamps and unreadable images, and the sums its logits and features must match."""

    stamps: np.ndarray  # (size, 2) int64
    bad: dict[int, str]  # image index -> reason
    sum_logits: str
    sum_features: str = ""  # "": the shard holds no features


def _read_meta(path: Path, size: int) -> _Cached | str | None:
    """The shard's stamps and bad images, verified; None when it is missing; else why it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {k: z[k] for k in _META}
            sum_meta, sum_logits = str(z["sum_meta"]), str(z["sum_logits"])
            sum_features = str(z["sum_features"]) if "sum_features" in z.files else ""
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated or garbage bytes raise BadZipFile, ValueError, EOFError, KeyError, OSError...
        return _why(e)
    if _digest(**meta) != sum_meta:
        return "checksum mismatch"
    if meta["stamps"].shape != (size, 2) or meta["bad_index"].shape != meta["bad_reason"].shape:
        return "wrong shape"
    bad = dict(zip(meta["bad_index"].tolist(), meta["bad_reason"].tolist(), strict=True))
    return _Cached(meta["stamps"], bad, sum_logits, sum_features)


def _read_logits(path: Path, size: int, sum_logits: str) -> np.ndarray | str:
    """A cached shard's ``(size, C)`` logits, verified against their sum; else why they cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            lg = z["logits"]
    except Exception as e:  # as in _read_meta: any damage, one reason
        return _why(e)
    if lg.dtype != np.float32 or lg.ndim != 2 or len(lg) != size:
        return "wrong shape"
    if _digest(logits=lg) != sum_logits:
        return "checksum mismatch"
    return lg


def _read_features(path: Path, size: int, sum_features: str) -> np.ndarray | str:
    """A cached shard's ``(size, D)`` float16 features, verified against their sum; else why they cannot be used."""
    if not sum_features:
        return "no features"
    try:
        with np.load(path, allow_pickle=False) as z:
            f = z["features"]
    except Exception as e:  # as in _read_meta: any damage, one reason
        return _why(e)
    if f.dtype != np.float16 or f.ndim != 2 or len(f) != size:
        return "wrong shape"
    if _digest(features=f) != sum_features:
        return "checksum mismatch"
    return f


def _read_shard(path: Path, size: int, cached: _Cached, features: bool) -> tuple[np.ndarray, np.ndarray | None] | str:
    """A cached shard's logits (and features when ``features``), verified; else why they cannot be used."""
    lg = _read_logits(path, size, cached.sum_logits)
    if isinstance(lg, str):
        return lg
    if not features:
        return lg, None
    f = _read_features(path, size, cached.sum_features)
    return (lg, f) if isinstance(f, np.ndarray) else f


def _save_shard(
    path: Path, logits: np.ndarray, bad: Mapping[int, str], stamps: np.ndarray, features: np.ndarray | None = None
) -> str:
    """Write one shard atomically; return the sum of its logits."""
    idx = sorted(bad)
    meta = {
        "stamps": np.ascontiguousarray(stamps, dtype=np.int64),
        "bad_index": np.array(idx, dtype=np.int64),
        "bad_reason": np.array([bad[i] for i in idx], dtype=np.str_),
    }
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    sum_logits = _digest(logits=logits)
    extra: dict[str, np.ndarray] = {}
    if features is not None:
        f = np.ascontiguousarray(features, dtype=np.float16)
        extra = {"features": f, "sum_features": np.array(_digest(features=f))}
    _atomic_save_npz(
        path, logits=logits, **meta, sum_meta=np.array(_digest(**meta)), sum_logits=np.array(sum_logits), **extra
    )
    return sum_logits


def _npy_sum(path: Path, shape: tuple[int, int], dtype: type = np.float32) -> str | None:
    """SHA-256 of a ``dtype`` ``.npy`` matrix's data, streamed; None when it is not that matrix."""
    try:
        m = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # any damage to the header: not the matrix we wrote
        return None
    if m.shape != shape or m.dtype != dtype or not m.flags.c_contiguous:
        return None
    h = hashlib.sha256()
    step = max(1, 2**24 // max(1, m.itemsize * shape[1]))  # 16 MiB at a time: memory stays flat
    for s in range(0, shape[0], step):
        h.update(m[s : s + step])
    return h.hexdigest()


@dataclass
class _Plan:
    """One model's work: batch starts to score per shard, the shards that keep some cached rows, or a reuse."""

    todo: dict[int, set[int]] = field(default_factory=dict)
    partial: set[int] = field(default_factory=set)
    reuse: ModelArrays | None = None


def _bounds(k: int, shard_size: int, n: int) -> tuple[int, int]:
    return k * shard_size, min(n, (k + 1) * shard_size)


def _plan(
    spec: ModelSpec,
    d: Path,
    fp: str,
    stamps: np.ndarray,
    shard_size: int,
    batch_size: int,
    arrays: Path,
    changed: set[int],
    features: bool = True,
) -> _Plan:
    """Which batches of ``spec`` need scoring: missing or damaged shards, and the batches of changed images."""
    n = len(stamps)
    plan = _Plan()
    cached: dict[int, _Cached] = {}
    damaged: list[tuple[int, str]] = []
    every: dict[int, set[int]] = {}
    for k in range((n + shard_size - 1) // shard_size):
        lo, hi = _bounds(k, shard_size, n)
        every[k] = set(range(lo, hi, batch_size))
        c = _read_meta(_shard_path(d, k), hi - lo)
        if c is None or isinstance(c, str):
            if c is not None:
                damaged.append((k, c))
            plan.todo[k] = every[k]
            continue
        cached[k] = c
        rows = (np.flatnonzero((c.stamps != stamps[lo:hi]).any(axis=1)) + lo).tolist()
        if rows:
            changed.update(rows)
            # The whole batch: its other images are scored beside it again, exactly as a fresh run would.
            plan.todo[k] = {lo + (r - lo) // batch_size * batch_size for r in rows}
    if not plan.todo:
        plan.reuse = _reuse(spec, d, fp, [cached[k] for k in sorted(cached)], n, arrays, features)
        if plan.reuse is not None:
            return plan
    # The matrices will be assembled: every cached shard kept must be intact, its logits and features included.
    for k, c in cached.items():
        if plan.todo.get(k) == every[k]:
            continue
        lo, hi = _bounds(k, shard_size, n)
        got = _read_shard(_shard_path(d, k), hi - lo, c, features)
        if isinstance(got, str):
            damaged.append((k, got))
            plan.todo[k] = every[k]
        elif k in plan.todo:
            plan.partial.add(k)
    if damaged:
        k, why = min(damaged)
        size = sum(len(range(*_bounds(j, shard_size, n))) for j, _ in damaged)
        _log.warning(
            "%s: %d cached shard(s) are damaged (%s: %s); rescoring their %d image(s)",
            spec.name, len(damaged), _shard_path(d, k).name, why, size,
        )  # fmt: skip
    return plan


def _array_paths(spec: ModelSpec, arrays: Path) -> tuple[Path, Path, Path]:
    """Where a model's assembled logits, probabilities and features go."""
    key = model_key(spec.name)
    return arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy", arrays / f"{key}.features.npy"


def _reuse(
    spec: ModelSpec, d: Path, fp: str, cached: list[_Cached], n: int, arrays: Path, features: bool = True
) -> ModelArrays | None:
    """The assembled matrices, when they were built from exactly these shards and their checksums verify."""
    lpath, ppath, fpath = _array_paths(spec, arrays)
    try:
        done = json.loads((d / "assembled.json").read_text())
        c = int(done["num_classes"])
        dim = int(done["feature_dim"]) if features else 0
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if done.get("fingerprint") != fp or done.get("shards") != [[x.sum_logits, x.sum_features] for x in cached]:
        return None
    if not (lpath.exists() and ppath.exists() and (fpath.exists() or not features)):
        return None
    ok = _npy_sum(lpath, (n, c)) == done.get("logits_sha256") and _npy_sum(ppath, (n, c)) == done.get("probs_sha256")
    if ok and features:
        ok = _npy_sum(fpath, (n, dim), np.float16) == done.get("features_sha256")
    if not ok:
        _log.warning(
            "%s: its cached logits, probabilities or features in %s fail their checksum; rebuilding them from shards",
            spec.name, arrays,
        )  # fmt: skip
        return None
    bad: dict[int, str] = {}
    for x in cached:
        bad.update(x.bad)
    return ModelArrays(spec, lpath, ppath, c, bad, fpath if features else None)


@dataclass
class _Shard:
    size: int
    left: int  # batches of this shard still to come
    mats: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size, C) logits
    feats: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size, D) float16 features
    scored: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size,) rows scored now
    bad: dict[int, str] = field(default_factory=dict)


def _write_shard(
    shard: _Shard,
    k: int,
    start: int,
    specs: Sequence[ModelSpec],
    dirs: dict[str, Path],
    plans: dict[str, _Plan],
    stamps: np.ndarray,
    features: bool = True,
) -> None:
    for m, spec in enumerate(specs):
        scored = shard.scored.get(m)
        if scored is None:
            continue
        d = dirs[spec.name]
        path = _shard_path(d, k)
        (d / "assembled.json").unlink(missing_ok=True)  # the matrices are stale from now on
        mat = shard.mats.get(m)
        feat = shard.feats.get(m) if features else None
        bad = {i: r for i, r in shard.bad.items() if scored[i - start]}
        if k in plans[spec.name].partial:
            # Rows of batches left alone keep their cached logits, features and verdict.
            cached = _read_meta(path, shard.size)
            got = _read_shard(path, shard.size, cached, features) if isinstance(cached, _Cached) else cached
            if not isinstance(got, tuple):
                raise StoreError(f"{path} changed on disk during this run ({got}); run the same command again")
            lg, old_feat = got
            if mat is None:
                mat = np.full(lg.shape, np.nan, dtype=np.float32)
            keep = ~scored
            mat[keep] = lg[keep]
            if old_feat is not None:
                if feat is None:
                    feat = np.full(old_feat.shape, np.nan, dtype=np.float16)
                if feat.shape[1] == old_feat.shape[1]:
                    feat[keep] = old_feat[keep]
                elif not np.isnan(old_feat[keep]).all():  # a width guessed for unreadable images only is not kept
                    raise StoreError(f"{path} has features of another width; delete {d} to rescore")
            bad.update({i: r for i, r in cached.bad.items() if keep[i - start]})  # type: ignore[union-attr]
        if mat is None:  # every image scored was unreadable
            mat = np.full((shard.size, spec.num_classes or 1), np.nan, dtype=np.float32)
        if features and feat is None:  # every image unreadable: a placeholder width, widened when assembled
            feat = np.full((shard.size, 1), np.nan, dtype=np.float16)
        _save_shard(path, mat, bad, stamps[start : start + shard.size], feat)


def _feature_width(path: Path) -> int:
    """The width of a shard's features, read without the rest (0 when unreadable: verified when loaded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["features"].shape[1])
    except Exception:  # damage is caught, and said, by the verified read that follows
        return 0


def _assemble(
    spec: ModelSpec, d: Path, fp: str, shard_size: int, n: int, arrays: Path, features: bool = True
) -> ModelArrays:
    """Stream the verified shards into the ``(N, C)`` logits and probabilities and the ``(N, D)`` features.

    Each matrix is summed as it is written; the sums go in ``assembled.json``
    and are checked before the matrices are reused.
    """
    from numpy.lib.format import open_memmap

    lpath, ppath, fpath = _array_paths(spec, arrays)
    n_shards = (n + shard_size - 1) // shard_size

    def load(k: int) -> tuple[_Cached, np.ndarray, np.ndarray | None]:
        path = _shard_path(d, k)
        size = len(range(*_bounds(k, shard_size, n)))
        cached = _read_meta(path, size)
        got = _read_shard(path, size, cached, features) if isinstance(cached, _Cached) else (cached or "missing")
        if not isinstance(got, tuple):
            raise StoreError(f"{path} changed on disk during this run ({got}); run the same command again")
        return cached, got[0], got[1]  # type: ignore[return-value]

    # Every shard has the model's widths; one whose every image was unreadable may carry guessed ones.
    c = spec.num_classes or max(load(k)[1].shape[1] for k in range(n_shards))
    dim = max(_feature_width(_shard_path(d, k)) for k in range(n_shards)) if features else 0
    tmp_l, tmp_p, tmp_f = (x.with_suffix(".tmp.npy") for x in (lpath, ppath, fpath))
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    fm = open_memmap(tmp_f, mode="w+", dtype=np.float16, shape=(n, dim)) if features else None
    hl, hp, hf = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    sums: list[list[str]] = []
    bad: dict[int, str] = {}
    for k in range(n_shards):
        cached, lg, f = load(k)
        lo, hi = _bounds(k, shard_size, n)
        if lg.shape[1] != c:
            if not np.isnan(lg).all():
                raise StoreError(f"{_shard_path(d, k)} has {lg.shape[1]} classes, expected {c}; delete {d} to rescore")
            lg = np.full((hi - lo, c), np.nan, dtype=np.float32)
        p = softmax(lg.copy())
        lm[lo:hi] = lg
        pm[lo:hi] = p
        hl.update(np.ascontiguousarray(lg))
        hp.update(np.ascontiguousarray(p))
        if fm is not None and f is not None:
            if f.shape[1] != dim:
                if not np.isnan(f).all():
                    raise StoreError(f"{_shard_path(d, k)} has {f.shape[1]} features, expected {dim}; delete {d}")
                f = np.full((hi - lo, dim), np.nan, dtype=np.float16)
            fm[lo:hi] = f
            hf.update(np.ascontiguousarray(f))
        sums.append([cached.sum_logits, cached.sum_features])
        bad.update(cached.bad)
    for mm in (lm, pm, fm):
        if mm is not None:
            mm.flush()
    del lm, pm, fm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    record = {
        "num_classes": c,
        "fingerprint": fp,
        "shards": sums,
        "logits_sha256": hl.hexdigest(),
        "probs_sha256": hp.hexdigest(),
    }
    if features:
        os.replace(tmp_f, fpath)
        record.update(feature_dim=dim, features_sha256=hf.hexdigest())
    _atomic_write_text(d / "assembled.json", json.dumps(record))
    return ModelArrays(spec, lpath, ppath, c, bad, fpath if features else None)


def bad_images(arrays: Path, spec: ModelSpec) -> dict[int, str]:
    """Images a model's intact shards recorded as unreadable: index -> reason (also ``ModelArrays.bad``)."""
    d = arrays / "shards" / model_key(spec.name)
    out: dict[int, str] = {}
    for f in sorted(d.glob("*.npz")):
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = {k: z[k] for k in _META}
                ok = _digest(**meta) == str(z["sum_meta"])
        except Exception:  # a damaged shard is rescored by the next run; it vouches for nothing
            continue
        if ok:
            out.update(zip(meta["bad_index"].tolist(), meta["bad_reason"].tolist(), strict=True))
    return out
