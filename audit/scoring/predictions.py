"""Imported predictions: ``preds:`` files (``.npy`` + ``.ids.txt``, or parquet) validated and stored as matrices.

Every fault of a prediction file is a :class:`~audit.errors.ModelError`
naming the fix, raised before any image is scored.

A prediction file may bring features (the model's embedding of each image,
``(N, D)``): a ``.npy`` logits file's sibling ``<stem>.features.npy`` (rows in
the order of the ``.ids.txt``), or a parquet column ``features`` (one list of
floats per image). They must be finite, 2-D, one row per id, and within
float16's range (they are stored as float16, like scored features).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit.datasets import AuditDataset
from audit.errors import ModelError
from audit.scoring.shards import ModelArrays, _array_paths, _why, softmax
from audit.zoo import ModelSpec

__all__ = ["check_predictions"]


@dataclass
class _Preds:
    """A validated prediction file: its matrix, the row of each dataset image, and what the values are."""

    path: Path
    mat: Any  # (rows, C) floating array or memory map
    order: np.ndarray  # (N,) int64
    is_prob: bool
    features: Any = None  # (rows, D) floating array or memory map, or None

    @property
    def num_classes(self) -> int:
        return int(self.mat.shape[1])

    def chunks(self) -> Any:
        """``(start, (b, C) float32 rows)`` in dataset order; memory stays flat whatever N is."""
        n, c = len(self.order), self.num_classes
        in_order = bool(np.array_equal(self.order, np.arange(n))) and len(self.mat) >= n
        step = max(1, 2**20 // max(c, 1))
        for s in range(0, n, step):
            sel = self.mat[s : min(n, s + step)] if in_order else self.mat[self.order[s : s + step]]
            with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: caught as such
                yield s, np.asarray(sel, dtype=np.float32)


def _read_ids(path: Path, ids_file: Path) -> list[str]:
    if not ids_file.exists():
        raise ModelError(f"{path} needs {ids_file.name} beside it: one image id per line, in row order")
    try:
        text = ids_file.read_bytes().decode("utf-8")
    except OSError as e:
        raise ModelError(f"cannot read {ids_file}: {e.strerror}; check its permissions") from e
    except UnicodeDecodeError as e:
        raise ModelError(f"{ids_file} is not UTF-8 (byte {e.start}); write the ids as UTF-8") from e
    # "\n" only: str.splitlines() would also split ids at \x1c, \x85, \u2028 and other characters a file name may hold.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [x[:-1] if x.endswith("\r") else x for x in lines]


def _features_file(path: Path) -> Path:
    """Where a ``.npy`` prediction file's features live: ``<stem>.features.npy`` beside it."""
    return path.with_name(path.stem + ".features.npy")


def _list_column(path: Path, table: Any, col: str, what: str, each: str, expected: str) -> np.ndarray:
    """A parquet column of equal-length float lists as a ``(rows, k)`` array; a :class:`ModelError` otherwise."""
    import pyarrow as pa

    values = table.column(col).combine_chunks()
    t = values.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ModelError(f"{path}: column {col!r} must hold one list of {what} per image (has {t})")
    flat = values.flatten()
    lengths = set(pa.compute.list_value_length(values).to_pylist()) if len(values) else set()
    if values.null_count or flat.null_count or len(lengths) > 1:
        raise ModelError(f"{path}: column {col!r} has nulls or rows of different lengths; give every image {each}")
    if not pa.types.is_floating(flat.type):
        raise ModelError(f"{path}: column {col!r} holds {flat.type}, expected floating-point {expected}")
    c = lengths.pop() if lengths else 0
    return flat.to_numpy(zero_copy_only=False).reshape(len(values), c)


def _load_matrix(path: Path) -> tuple[Any, list[Any], bool | None, Any]:
    """The raw matrix, the ids, whether the file says it holds probabilities (None: to be inferred), the features."""
    if path.suffix == ".npy":
        try:
            mat = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # a truncated header, an object array, not a .npy at all
            raise ModelError(f"cannot read {path} as a .npy matrix ({_why(e)}); save it with numpy.save") from e
        ff, feats = _features_file(path), None
        if ff.exists():
            try:
                feats = np.load(ff, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # as above
                raise ModelError(f"cannot read {ff} as a .npy matrix ({_why(e)}); save it with numpy.save") from e
        return mat, _read_ids(path, path.with_suffix(".ids.txt")), None, feats
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid, OSError: not a parquet file
        raise ModelError(f"cannot read {path} as parquet ({_why(e)}); write it with pandas or pyarrow") from e
    col = "logits" if "logits" in table.column_names else "probs"
    if "image" not in table.column_names or col not in table.column_names:
        raise ModelError(f"{path} needs columns 'image' and 'logits' (or 'probs'); has {table.column_names}")
    image = table.column("image")
    if not (pa.types.is_string(image.type) or pa.types.is_large_string(image.type)) or image.null_count:
        raise ModelError(f"{path}: column 'image' must hold image ids as text, with no nulls (has {image.type})")
    mat = _list_column(path, table, col, "class scores", "C scores", "logits or probabilities")
    feats = (
        _list_column(path, table, "features", "features", "D features", "features")
        if "features" in table.column_names
        else None
    )
    return mat, image.to_pylist(), col == "probs", feats


def _read_predictions(ds: AuditDataset, spec: ModelSpec) -> _Preds:
    """Read and check a ``preds:`` file against ``ds``; every fault is a :class:`ModelError` naming the fix."""
    path = Path(spec.weights_file or "")
    mat, ids, declared, feats = _load_matrix(path)
    if mat.ndim != 2 or len(ids) != mat.shape[0]:
        raise ModelError(f"{path}: {mat.shape} predictions for {len(ids)} ids; expected one row per id")
    if not np.issubdtype(mat.dtype, np.floating):
        raise ModelError(f"{path} holds {mat.dtype}, expected floating-point logits or probabilities; save float32")
    row: dict[str, int] = {}
    for r, i in enumerate(ids):
        if not isinstance(i, str) or not i:
            raise ModelError(f"{path}: id of row {r} is {i!r}; every row needs an image id")
        if i in row:
            raise ModelError(f"{path}: image id {i!r} has two rows ({row[i]} and {r}); keep one row per image")
        row[i] = r
    missing = [i for i in ds.image_ids if i not in row]
    if missing:
        raise ModelError(f"{path} has no row for {len(missing)} images, e.g. {missing[0]!r}; score them too")
    k = len(ds.label_space)
    c = int(mat.shape[1])
    if c != k and not (c == 1000 and spec.label_space == "imagenet-1k"):
        also = " (or 1000 ImageNet classes)" if not ds.label_space.imagenet else ""
        raise ModelError(f"{path} has {c} columns but the dataset has {k} classes{also}; give one column per class")
    order = np.fromiter((row[i] for i in ds.image_ids), dtype=np.int64, count=len(ds))
    pr = _Preds(path, mat, order, bool(declared), _check_features(path, feats, len(ids), order, ds.image_ids))
    lo, hi = np.inf, -np.inf
    sums = np.empty(len(order), dtype=np.float64)
    for s, b in pr.chunks():
        finite = np.isfinite(b).all(axis=1)
        if not finite.all():
            r = s + int(np.flatnonzero(~finite)[0])
            what = "NaN" if np.isnan(b[r - s]).any() else "an infinite value"
            raise ModelError(f"{path}: the row of {ds.image_ids[r]!r} holds {what}; predictions must be finite numbers")
        if b.size:
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
        sums[s : s + len(b)] = b.sum(axis=1, dtype=np.float64)
    # An .npy says nothing of what it holds: values all within [0, 1] are probabilities (logits never are).
    pr.is_prob = declared if declared is not None else bool(len(order) and lo >= 0 and hi <= 1)
    if pr.is_prob:
        if lo < 0:
            raise ModelError(f"{path} holds negative probabilities (down to {lo:.3g}); give probabilities in [0, 1]")
        off = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
        if len(off):
            r = int(off[0])
            raise ModelError(
                f"{path} holds probabilities, but the row of {ds.image_ids[r]!r} sums to {sums[r]:.4g}, not 1; "
                "give softmax probabilities, or logits (any real numbers) instead"
            )
    return pr


def _check_features(path: Path, feats: Any, rows: int, order: np.ndarray, ids: Sequence[str]) -> Any:
    """The imported features, checked: 2-D floats, one row per id, finite and within float16's range."""
    if feats is None:
        return None
    where = _features_file(path) if path.suffix == ".npy" else f"{path}: column 'features'"
    if feats.ndim != 2 or len(feats) != rows:
        raise ModelError(f"{where}: {feats.shape} features for {rows} ids; expected one row (a vector) per id")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ModelError(f"{where} holds {feats.dtype}, expected floating-point features; save float32")
    big = float(np.finfo(np.float16).max)
    step = max(1, 2**20 // max(int(feats.shape[1]), 1))
    for s in range(0, len(order), step):
        b = np.asarray(feats[order[s : s + step]], dtype=np.float64)
        bad = ~(np.isfinite(b) & (np.abs(b) <= big)).all(axis=1)
        if bad.any():
            r = s + int(np.flatnonzero(bad)[0])
            raise ModelError(
                f"{where}: the features of {ids[r]!r} are not finite numbers within +-{big:g} (float16, as stored); "
                "give finite features (scale them down if they are that large)"
            )
    return feats


def check_predictions(ds: AuditDataset, specs: Sequence[ModelSpec]) -> None:
    """Check every ``preds:`` file of ``specs`` against ``ds`` (see :func:`score_dataset`), before anything is written.

    Raises
    ------
    ModelError
        A file that cannot be read, has the wrong dtype or shape, ids that do
        not match the images, NaN or infinite values, or probabilities that are
        negative or do not sum to 1.
    """
    for s in specs:
        if s.source == "predictions":
            _read_predictions(ds, s)


def _import_predictions(spec: ModelSpec, pr: _Preds, arrays: Path, features: bool = True) -> ModelArrays:
    from numpy.lib.format import open_memmap

    n, c = len(pr.order), pr.num_classes
    lpath, ppath, fpath = _array_paths(spec, arrays)
    arrays.mkdir(parents=True, exist_ok=True)
    tmp_l, tmp_p = lpath.with_suffix(".tmp.npy"), ppath.with_suffix(".tmp.npy")
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    # Probabilities: log p gives back p under softmax, which is what every
    # downstream stage needs; the sigmoid evaluation then ranks by p.
    for s, b in pr.chunks():
        lg = np.log(np.clip(b, 1e-12, None)) if pr.is_prob else b
        lm[s : s + len(b)] = lg
        pm[s : s + len(b)] = softmax(lg.copy())
    lm.flush()
    pm.flush()
    del lm, pm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    if not features or pr.features is None:
        fpath.unlink(missing_ok=True)  # never left from an earlier import to pass as this one's
        return ModelArrays(spec, lpath, ppath, c)
    d = int(pr.features.shape[1])
    tmp_f = fpath.with_suffix(".tmp.npy")
    fm = open_memmap(tmp_f, mode="w+", dtype=np.float16, shape=(n, d))
    step = max(1, 2**20 // max(d, 1))
    for s in range(0, n, step):
        fm[s : s + step] = np.asarray(pr.features[pr.order[s : s + step]], dtype=np.float16)
    fm.flush()
    del fm
    os.replace(tmp_f, fpath)
    return ModelArrays(spec, lpath, ppath, c, features=fpath)
