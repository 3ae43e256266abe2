"""The shard cache: resumable per-model shards, their stamps and checksums, assembled into ``(N, C)`` matrices.

The work is cut into shards of ``shard_size`` images. Each finished shard is
written atomically to ``<arrays>/shards/<model>/``: a run killed at any point
(``kill -9`` included) resumes where it stopped, recomputes nothing finished,
and ends with byte-identical outputs.

A shard holds one model's logits for ``shard_size`` consecutive images, the
``(size, mtime_ns)`` stamp each image had when it was read, the images that
could not be read, and two SHA-256 sums (of the logits, and of the rest). A
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

import numpy as np

from audit._io import atomic_file, atomic_write
from audit.datasets import AuditDataset
from audit.errors import StoreError
from audit.zoo import ModelSpec

__all__ = ["ModelArrays", "bad_images", "model_key", "softmax"]

_log = logging.getLogger(__name__)


_SHARD_FORMAT = 3

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


def _fingerprint(ds: AuditDataset, spec: ModelSpec, shard_size: int, backend: str, precision: str) -> str:
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
    h.update(json.dumps([_SHARD_FORMAT, shard_size, backend, precision, model], sort_keys=True).encode())
    for i in ds.image_ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()


def _shard_dir(arrays: Path, spec: ModelSpec, fp: str) -> Path:
    d = arrays / "shards" / model_key(spec.name)
    manifest = d / "manifest.json"
    try:
        old = json.loads(manifest.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        old = None
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob(".*.tmp"):  # left half-written by a killed run
        f.unlink(missing_ok=True)
    if old != fp:
        if old is not None:
            _log.warning("%s: cached shards are for other images, weights or settings; recomputing", spec.name)
        for f in [*d.glob("*.npz"), d / "assembled.json"]:
            f.unlink(missing_ok=True)
        _atomic_write_text(manifest, json.dumps({"fingerprint": fp, "model": spec.name}))
    return d


def _shard_path(d: Path, s: int) -> Path:
    return d / f"{s:06d}.npz"


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}".strip().rstrip(":")


@dataclass
class _Cached:
    """A cached shard's verified stamps and unreadable images, and the sum its logits must match."""

    stamps: np.ndarray  # (size, 2) int64
    bad: dict[int, str]  # image index -> reason
    sum_logits: str


def _read_meta(path: Path, size: int) -> _Cached | str | None:
    """The shard's stamps and bad images, verified; None when it is missing; else why it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {k: z[k] for k in _META}
            sum_meta, sum_logits = str(z["sum_meta"]), str(z["sum_logits"])
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated or garbage bytes raise BadZipFile, ValueError, EOFError, KeyError, OSError...
        return _why(e)
    if _digest(**meta) != sum_meta:
        return "checksum mismatch"
    if meta["stamps"].shape != (size, 2) or meta["bad_index"].shape != meta["bad_reason"].shape:
        return "wrong shape"
    bad = dict(zip(meta["bad_index"].tolist(), meta["bad_reason"].tolist(), strict=True))
    return _Cached(meta["stamps"], bad, sum_logits)


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


def _save_shard(path: Path, logits: np.ndarray, bad: Mapping[int, str], stamps: np.ndarray) -> str:
    """Write one shard atomically; return the sum of its logits."""
    idx = sorted(bad)
    meta = {
        "stamps": np.ascontiguousarray(stamps, dtype=np.int64),
        "bad_index": np.array(idx, dtype=np.int64),
        "bad_reason": np.array([bad[i] for i in idx], dtype=np.str_),
    }
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    sum_logits = _digest(logits=logits)
    _atomic_save_npz(path, logits=logits, **meta, sum_meta=np.array(_digest(**meta)), sum_logits=np.array(sum_logits))
    return sum_logits


def _npy_sum(path: Path, shape: tuple[int, int]) -> str | None:
    """SHA-256 of a float32 ``.npy`` matrix's data, streamed; None when it is not that matrix."""
    try:
        m = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # any damage to the header: not the matrix we wrote
        return None
    if m.shape != shape or m.dtype != np.float32 or not m.flags.c_contiguous:
        return None
    h = hashlib.sha256()
    step = max(1, 2**24 // max(1, 4 * shape[1]))  # 16 MiB at a time: memory stays flat
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
        plan.reuse = _reuse(spec, d, fp, [cached[k] for k in sorted(cached)], n, arrays)
        if plan.reuse is not None:
            return plan
    # The matrices will be assembled: every cached shard kept must be intact, its logits included.
    for k, c in cached.items():
        if plan.todo.get(k) == every[k]:
            continue
        lo, hi = _bounds(k, shard_size, n)
        lg = _read_logits(_shard_path(d, k), hi - lo, c.sum_logits)
        if isinstance(lg, str):
            damaged.append((k, lg))
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


def _array_paths(spec: ModelSpec, arrays: Path) -> tuple[Path, Path]:
    key = model_key(spec.name)
    return arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy"


def _reuse(spec: ModelSpec, d: Path, fp: str, cached: list[_Cached], n: int, arrays: Path) -> ModelArrays | None:
    """The assembled matrices, when they were built from exactly these shards and their checksums verify."""
    lpath, ppath = _array_paths(spec, arrays)
    try:
        done = json.loads((d / "assembled.json").read_text())
        c = int(done["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if done.get("fingerprint") != fp or done.get("shards") != [x.sum_logits for x in cached]:
        return None
    if not (lpath.exists() and ppath.exists()):
        return None
    if _npy_sum(lpath, (n, c)) != done.get("logits_sha256") or _npy_sum(ppath, (n, c)) != done.get("probs_sha256"):
        _log.warning(
            "%s: its cached logits or probabilities in %s fail their checksum; rebuilding them from its shards",
            spec.name, arrays,
        )  # fmt: skip
        return None
    bad: dict[int, str] = {}
    for x in cached:
        bad.update(x.bad)
    return ModelArrays(spec, lpath, ppath, c, bad)


@dataclass
class _Shard:
    size: int
    left: int  # batches of this shard still to come
    mats: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size, C) logits
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
) -> None:
    for m, spec in enumerate(specs):
        scored = shard.scored.get(m)
        if scored is None:
            continue
        d = dirs[spec.name]
        path = _shard_path(d, k)
        (d / "assembled.json").unlink(missing_ok=True)  # the matrices are stale from now on
        mat = shard.mats.get(m)
        bad = {i: r for i, r in shard.bad.items() if scored[i - start]}
        if k in plans[spec.name].partial:
            # Rows of batches left alone keep their cached logits and their cached verdict.
            cached = _read_meta(path, shard.size)
            lg = _read_logits(path, shard.size, cached.sum_logits) if isinstance(cached, _Cached) else cached
            if not isinstance(lg, np.ndarray):
                raise StoreError(f"{path} changed on disk during this run ({lg}); run the same command again")
            if mat is None:
                mat = np.full(lg.shape, np.nan, dtype=np.float32)
            keep = ~scored
            mat[keep] = lg[keep]
            bad.update({i: r for i, r in cached.bad.items() if keep[i - start]})  # type: ignore[union-attr]
        if mat is None:  # every image scored was unreadable
            mat = np.full((shard.size, spec.num_classes or 1), np.nan, dtype=np.float32)
        _save_shard(path, mat, bad, stamps[start : start + shard.size])


def _assemble(spec: ModelSpec, d: Path, fp: str, shard_size: int, n: int, arrays: Path) -> ModelArrays:
    """Stream the verified shards into the ``(N, C)`` logits and probabilities, summing them as they are written."""
    from numpy.lib.format import open_memmap

    lpath, ppath = _array_paths(spec, arrays)
    n_shards = (n + shard_size - 1) // shard_size

    def load(k: int) -> tuple[_Cached, np.ndarray]:
        path = _shard_path(d, k)
        cached = _read_meta(path, len(range(*_bounds(k, shard_size, n))))
        lg = (
            _read_logits(path, len(range(*_bounds(k, shard_size, n))), cached.sum_logits)
            if isinstance(cached, _Cached)
            else (cached or "missing")
        )
        if not isinstance(lg, np.ndarray):
            raise StoreError(f"{path} changed on disk during this run ({lg}); run the same command again")
        return cached, lg  # type: ignore[return-value]

    # Every shard has the model's width; one whose every image was unreadable may carry a guessed one.
    c = spec.num_classes or max(load(k)[1].shape[1] for k in range(n_shards))
    tmp_l, tmp_p = lpath.with_suffix(".tmp.npy"), ppath.with_suffix(".tmp.npy")
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    hl, hp = hashlib.sha256(), hashlib.sha256()
    sums: list[str] = []
    bad: dict[int, str] = {}
    for k in range(n_shards):
        cached, lg = load(k)
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
        sums.append(cached.sum_logits)
        bad.update(cached.bad)
    lm.flush()
    pm.flush()
    del lm, pm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    record = {
        "num_classes": c,
        "fingerprint": fp,
        "shards": sums,
        "logits_sha256": hl.hexdigest(),
        "probs_sha256": hp.hexdigest(),
    }
    _atomic_write_text(d / "assembled.json", json.dumps(record))
    return ModelArrays(spec, lpath, ppath, c, bad)


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
