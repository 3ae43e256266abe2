"""Pixel statistics from the single decode pass: CleanVision's image properties and duplicate hashes, per image.

The loader (:mod:`audit.scoring.loader`) decodes every image once for all
models; :func:`image_stats` measures the decoded image right there, so the
image checks (:mod:`audit.checks.pixels`) never read an image a second time.

What is measured, per image (the columns of :data:`COLUMNS`):

* ``width``, ``height``: of the decoded image (EXIF orientation applied).
* CleanVision's raw property values, from its own property classes
  (``cleanvision.issue_managers.image_property``): ``brightness`` (mean, the
  dataset statistic), ``brightness_perc_5`` (what ``light`` scores) and
  ``brightness_perc_99`` (what ``dark`` scores), ``aspect_ratio``, ``size``,
  ``entropy`` (``low_information``), ``blurriness`` and
  ``blurriness_grayscale_std`` (``blurry``), and ``grayscale`` (``grayscale``).
* Hashes: ``md5`` of the decoded pixels (CleanVision's exact-duplicate hash),
  ``phash`` and ``dhash`` (64-bit perceptual hashes, CleanVision's
  near-duplicate hash and its alternative), as unsigned 64-bit integers whose
  hex digits are CleanVision's hash strings.

They are stored as the models' logits are (:mod:`audit.scoring.shards`): per
shard of ``shard_size`` images, atomically, stamped with each image's
``(size, mtime_ns)`` and SHA-256 summed, in ``<arrays>/pixels/`` beside the
models' ``<arrays>/shards/``. Pixel statistics depend on the images alone, not
on any model, backend or setting: kept apart from the models' shards, they
survive a change of models and need no model at all (a decode-only pass).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit.datasets import AuditDataset
from audit.errors import StoreError
from audit.scoring.shards import _atomic_save_npz, _bounds, _digest, _fresh_dir, _shard_path, _why

__all__ = ["COLUMNS", "PIXELS_DIR", "image_stats", "load_pixel_stats"]

_log = logging.getLogger(__name__)

# Bumped whenever what a pixel shard holds, or how a value is computed, could change: old shards are recomputed.
_PIXEL_FORMAT = 1

PIXELS_DIR = "pixels"  # <arrays>/pixels/: beside <arrays>/shards/<model>/, never inside it

# Column name -> (dtype, value for an image that could not be decoded).
COLUMNS: dict[str, tuple[np.dtype, Any]] = {
    "ok": (np.dtype(bool), False),  # measured: False for an unreadable image (every other value is then its fill)
    "width": (np.dtype(np.int32), -1),
    "height": (np.dtype(np.int32), -1),
    "brightness": (np.dtype(np.float64), np.nan),
    "brightness_perc_5": (np.dtype(np.float64), np.nan),
    "brightness_perc_99": (np.dtype(np.float64), np.nan),
    "aspect_ratio": (np.dtype(np.float64), np.nan),
    "size": (np.dtype(np.float64), np.nan),
    "entropy": (np.dtype(np.float64), np.nan),
    "blurriness": (np.dtype(np.float64), np.nan),
    "blurriness_grayscale_std": (np.dtype(np.float64), np.nan),
    "grayscale": (np.dtype(bool), False),
    "md5": (np.dtype("<U32"), ""),
    "phash": (np.dtype(np.uint64), 0),
    "dhash": (np.dtype(np.uint64), 0),
}

# The brightness percentiles CleanVision scores: dark on the 99th, light on the 5th
# (BrightnessProperty.score_columns). Its calculate() also takes the 1st, 10th, 15th, 90th and 95th,
# which no score reads: they are not computed here.
_PERCENTILES = (5, 99)
_HASH_SIZE = 8  # CleanVision's near-duplicate default (phash, hash_size 8): 64 bits


def _versions() -> dict[str, str]:
    # From the installed metadata: importing cleanvision costs 1.5 s (it loads matplotlib for its plots).
    from importlib.metadata import version

    return {"cleanvision": version("cleanvision"), "imagehash": version("ImageHash")}


_loaded = False  # per process: _preload() has run


def _preload() -> None:
    """Import what :func:`image_stats` uses (1 to 3 s: CleanVision loads matplotlib, imagehash scipy.fft).

    Called by the main process before the loader workers fork, so that they
    inherit the modules: imported in each worker instead, the import costs
    once per worker (measured: +11 to +15 s of CPU-bound preparation with 2
    workers on a loaded 2-core machine, and +140 MiB per worker, unshared).
    """
    global _loaded
    if _loaded:
        return
    import importlib

    # scipy.fftpack: imagehash.phash imports it at its first call.
    for mod in ("cleanvision.issue_managers.image_property", "cleanvision.issue_managers.duplicate_issue_manager",
                "scipy.fftpack"):  # fmt: skip
        importlib.import_module(mod)
    _loaded = True


def _brightness_percentiles(arr: np.ndarray) -> list[float]:
    """CleanVision's ``calc_percentile_brightness`` at :data:`_PERCENTILES`, 3.5x faster, same values.

    Written by hand for speed, not meaning: CleanVision computes each pixel's
    brightness ``sqrt(0.241 r^2 + 0.691 g^2 + 0.068 b^2) / 255`` in float64 for
    the whole image and sorts it (7.6 ms for a 500 x 375 image here, more than
    every other statistic together; the pixel checks' budget is 10% of
    scoring). Brightness is increasing in the integer ``241 r^2 + 691 g^2 +
    68 b^2``, so the order statistics ``np.percentile`` interpolates between
    are found by partitioning those integers (no sort, no float per pixel) and
    interpolated exactly as numpy's "linear" method does. The result agrees
    with CleanVision's to float64 rounding (``tests/test_scoring_pixels.py``).
    """
    a = arr.reshape(-1, 3).astype(np.int32)
    a *= a
    q = a[:, 0] * 241 + a[:, 1] * 691 + a[:, 2] * 68
    n = q.size
    pos = [(n - 1) * (p / 100) for p in _PERCENTILES]
    lo = [int(np.floor(x)) for x in pos]
    kth = sorted({k for x in lo for k in (x, min(x + 1, n - 1))})
    part = np.partition(q, kth)
    out = []
    for x, k in zip(pos, lo, strict=True):
        va, vb = (float(np.sqrt(part[j] / 1000.0) / 255) for j in (k, min(k + 1, n - 1)))
        t = x - k
        # numpy's _lerp: from the nearer end, so that t = 1 gives exactly vb
        out.append(vb - (vb - va) * (1 - t) if t >= 0.5 else va + (vb - va) * t)
    return out


def _is_grayscale(arr: np.ndarray) -> bool:
    """All three channels equal: CleanVision's own test for an image whose mode it cannot read (get_image_mode).

    By hand because :func:`audit.datasets.decode_image` hands every image on
    as RGB, so CleanVision's first test (``image.mode == "L"``) would never
    fire; a grey image stored as RGB is caught too.
    """
    flat = arr.reshape(-1, 3)
    head = flat[:64]  # most colour images show it in their first pixels: no pass over the whole image
    if not ((head[:, 0] == head[:, 1]).all() and (head[:, 1] == head[:, 2]).all()):
        return False
    return bool((flat[:, 0] == flat[:, 1]).all() and (flat[:, 1] == flat[:, 2]).all())


def _hash64(hex_str: str) -> int:
    return int(hex_str, 16)


def image_stats(img: Any) -> dict[str, Any]:
    """Every column of :data:`COLUMNS` for one decoded image.

    Parameters
    ----------
    img : PIL.Image.Image, RGB
        As :func:`audit.datasets.decode_image` returns it.

    Returns
    -------
    dict of column name to a Python scalar.
    """
    from cleanvision.issue_managers.duplicate_issue_manager import get_hash
    from cleanvision.issue_managers.image_property import (
        AspectRatioProperty,
        BlurrinessProperty,
        EntropyProperty,
        SizeProperty,
        calc_avg_brightness,
    )

    arr = np.asarray(img)
    gray = img.convert("L")
    is_gray = _is_grayscale(arr)
    out: dict[str, Any] = {"ok": True, "width": img.width, "height": img.height}
    out["brightness"] = float(calc_avg_brightness(img))
    out["brightness_perc_5"], out["brightness_perc_99"] = _brightness_percentiles(arr)
    out.update(AspectRatioProperty().calculate(img))
    out.update(SizeProperty().calculate(img))
    # A grey image is measured as CleanVision measures a mode-"L" file: PIL's entropy of an RGB image
    # concatenates three equal histograms, log2(3) = 1.58 bits more than the one band holds.
    out.update(EntropyProperty().calculate(gray if is_gray else img))
    out.update(BlurrinessProperty().calculate(img))
    out["grayscale"] = is_gray
    # CleanVision's exact-duplicate hash is md5 of the pixel bytes alone, under which a black 10 x 20 and a
    # black 20 x 10 image are one image; the shape goes in first.
    h = hashlib.md5(f"{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr))  # the buffer itself: no copy of the pixels
    out["md5"] = h.hexdigest()
    # Both hashes start by converting to "L": given the grey image once, they skip it.
    out["phash"] = _hash64(get_hash(gray, {"hash_type": "phash", "hash_size": _HASH_SIZE}))
    out["dhash"] = _hash64(get_hash(gray, {"hash_type": "dhash", "hash_size": _HASH_SIZE}))
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items() if k in COLUMNS}


def _timed_stats(img: Any) -> tuple[dict[str, Any], float]:
    """:func:`image_stats` and the seconds it took (the one-off imports left out, :func:`_preload`).

    A failure gives ``{"_error": reason}``: a property that fails on a strange
    image costs that image its statistics (said once on the log), never the run
    nor the image's model scores.
    """
    _preload()
    t = time.perf_counter()
    try:
        s = image_stats(img)
    except Exception as e:
        s = {"_error": _why(e)}
    return s, time.perf_counter() - t


def _empty_columns(size: int) -> dict[str, np.ndarray]:
    """``size`` rows of every column, each at its fill value (an image not measured)."""
    return {k: np.full(size, fill, dtype=dt) for k, (dt, fill) in COLUMNS.items()}


# --------------------------------------------------------------------------- shards


def _fingerprint(ds: AuditDataset, shard_size: int) -> str:
    """What cached pixel shards depend on: the code that measured them and the image ids (not any model)."""
    h = hashlib.sha256()
    h.update(json.dumps([_PIXEL_FORMAT, shard_size, _versions(), sorted(COLUMNS)], sort_keys=True).encode())
    for i in ds.image_ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()


def _pixel_dir(arrays: Path, fp: str, shard_size: int) -> Path:
    """``<arrays>/pixels``, emptied of shards made for other images or by other code (one line on the log)."""
    return _fresh_dir(
        arrays / PIXELS_DIR,
        fp,
        "pixel statistics: cached shards are for other images or another version; recomputing",
        {"shard_size": shard_size, **_versions()},
    )


@dataclass
class _PixelShard:
    """A cached pixel shard, verified: its stamps, unreadable images and columns."""

    stamps: np.ndarray  # (size, 2) int64
    bad: dict[int, str]
    columns: dict[str, np.ndarray]


def _read(path: Path, size: int) -> _PixelShard | str | None:
    """A pixel shard, verified against its sums; None when missing; else why it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {k: z[k] for k in ("stamps", "bad_index", "bad_reason")}
            cols = {k: z[f"px_{k}"] for k in COLUMNS}
            sum_meta, sum_cols = str(z["sum_meta"]), str(z["sum_pixels"])
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated or garbage bytes, a foreign .npz: any damage, one reason
        return _why(e)
    if _digest(**meta) != sum_meta or _digest(**cols) != sum_cols:
        return "checksum mismatch"
    if meta["stamps"].shape != (size, 2) or any(
        c.shape != (size,) or c.dtype != COLUMNS[k][0] for k, c in cols.items()
    ):
        return "wrong shape"
    bad = dict(zip(meta["bad_index"].tolist(), meta["bad_reason"].tolist(), strict=True))
    return _PixelShard(meta["stamps"], bad, cols)


def _save(path: Path, cols: Mapping[str, np.ndarray], bad: Mapping[int, str], stamps: np.ndarray) -> None:
    idx = sorted(bad)
    meta = {
        "stamps": np.ascontiguousarray(stamps, dtype=np.int64),
        "bad_index": np.array(idx, dtype=np.int64),
        "bad_reason": np.array([bad[i] for i in idx], dtype=np.str_),
    }
    cols = {k: np.ascontiguousarray(cols[k], dtype=COLUMNS[k][0]) for k in COLUMNS}
    _atomic_save_npz(
        path,
        **meta,
        **{f"px_{k}": v for k, v in cols.items()},
        sum_meta=np.array(_digest(**meta)),
        sum_pixels=np.array(_digest(**cols)),
    )


@dataclass
class _PixelPlan:
    """The pixel work of a run: batch starts to measure per shard, and the cached shards kept in part."""

    d: Path
    todo: dict[int, set[int]] = field(default_factory=dict)
    partial: set[int] = field(default_factory=set)  # shards whose batches left alone keep their cached rows


def _plan_pixels(
    ds: AuditDataset, arrays: Path, stamps: np.ndarray, shard_size: int, batch_size: int, changed: set[int]
) -> _PixelPlan:
    """Which batches need their pixel statistics measured: missing or damaged shards, and changed images' batches."""
    d = _pixel_dir(arrays, _fingerprint(ds, shard_size), shard_size)
    n = len(stamps)
    plan = _PixelPlan(d)
    damaged: list[tuple[int, str]] = []
    for k in range((n + shard_size - 1) // shard_size):
        lo, hi = _bounds(k, shard_size, n)
        got = _read(_shard_path(d, k), hi - lo)
        if not isinstance(got, _PixelShard):
            if got is not None:
                damaged.append((k, got))
            plan.todo[k] = set(range(lo, hi, batch_size))
            continue
        rows = (np.flatnonzero((got.stamps != stamps[lo:hi]).any(axis=1)) + lo).tolist()
        if rows:
            changed.update(rows)
            # Its batch, as for the models: a changed image is measured again with the batch it was loaded in.
            plan.todo[k] = {lo + (r - lo) // batch_size * batch_size for r in rows}
            plan.partial.add(k)
    if damaged:
        k, why = min(damaged)
        size = sum(len(range(*_bounds(j, shard_size, n))) for j, _ in damaged)
        _log.warning(
            "pixel statistics: %d cached shard(s) are damaged (%s: %s); measuring their %d image(s) again",
            len(damaged), _shard_path(d, k).name, why, size,
        )  # fmt: skip
    return plan


@dataclass
class _PendingPixels:
    """One shard's pixel statistics while its batches come in."""

    columns: dict[str, np.ndarray]
    measured: np.ndarray  # (size,) bool: rows loaded for their pixels in this run
    bad: dict[int, str] = field(default_factory=dict)


def _add_batch(
    pend: _PendingPixels, rows: np.ndarray, stats: list[dict[str, Any] | None], lo: int, count: int
) -> list[tuple[int, str]]:
    """Put one batch's statistics (``stats[j]`` for shard row ``rows[j]``) into the pending shard.

    Returns the shard rows whose statistics failed, with the reason (they keep ``ok`` False).
    """
    pend.measured[lo : lo + count] = True
    failed = []
    for r, s in zip(rows.tolist(), stats, strict=True):
        if s is None:
            continue
        if "_error" in s:
            failed.append((r, s["_error"]))
            continue
        for key, v in s.items():
            pend.columns[key][r] = v
    return failed


def _write_pixel_shard(plan: _PixelPlan, pend: _PendingPixels, k: int, start: int, stamps: np.ndarray) -> None:
    """Write shard ``k``: the rows measured now, and (a changed image's shard) the cached rows left alone."""
    size = len(pend.measured)
    cols, bad = pend.columns, dict(pend.bad)
    if k in plan.partial:
        cached = _read(_shard_path(plan.d, k), size)
        if not isinstance(cached, _PixelShard):
            why = cached or "missing"
            raise StoreError(
                f"{_shard_path(plan.d, k)} changed on disk during this run ({why}); run the same command again"
            )
        keep = ~pend.measured
        for key in COLUMNS:
            cols[key][keep] = cached.columns[key][keep]
        bad.update({i: r for i, r in cached.bad.items() if keep[i - start]})
    _save(_shard_path(plan.d, k), cols, bad, stamps[start : start + size])


def load_pixel_stats(ds: AuditDataset, arrays: str | Path | Sequence[Any]) -> dict[str, np.ndarray] | None:
    """The pixel statistics of every image of ``ds``, from the decode pass of :func:`audit.scoring.score_dataset`.

    Parameters
    ----------
    ds : AuditDataset
        N images, as scored.
    arrays : path-like, or sequence of ModelArrays
        The arrays folder ``score_dataset`` wrote into (``<arrays>/pixels``),
        or what it returned (the folder holding their logits). Pass the folder
        where there may be no model (a decode-only run returns none).

    Returns
    -------
    dict of column name (see :data:`COLUMNS`) to an (N,) array, or None
        None when the statistics are not all there and current: never
        measured, measured for other images or by another version, a shard
        missing or damaged, or an image changed since (said on the log); the
        next ``score_dataset`` with ``pixels=True`` measures what is missing.
        ``ok`` is False for images that could not be decoded.
    """
    if isinstance(arrays, (str, Path)):
        d = Path(arrays) / PIXELS_DIR
    else:
        folders = {Path(a.logits).parent for a in arrays}
        if len(folders) != 1:  # none (no model), or models from several workspaces: no one folder to read
            return None
        d = folders.pop() / PIXELS_DIR
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        shard_size, fp = int(manifest["shard_size"]), manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if shard_size < 1 or fp != _fingerprint(ds, shard_size):
        _log.info("pixel statistics in %s are for other images or another version", d)
        return None
    n = len(ds)
    stamps = ds.file_stamps()
    out = _empty_columns(n)
    for k in range((n + shard_size - 1) // shard_size):
        lo, hi = _bounds(k, shard_size, n)
        got = _read(_shard_path(d, k), hi - lo)
        if not isinstance(got, _PixelShard):
            _log.warning("pixel statistics: %s is %s; run scoring again", _shard_path(d, k).name, got or "missing")
            return None
        if (got.stamps != stamps[lo:hi]).any():
            _log.warning("pixel statistics: images changed since they were measured; run scoring again")
            return None
        for key in COLUMNS:
            out[key][lo:hi] = got.columns[key]
    return out
