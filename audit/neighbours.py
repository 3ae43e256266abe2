"""Each image's nearest images in feature space, stored once per run for the review page.

At the end of a run with features, :func:`write_neighbours` takes the run's shared k-NN graph
(:func:`audit.checks._neighbors.neighbors`: exact cosine over every zoo model's normalised
features, exact copies first; the graph ``knn_label`` and ``near_duplicate`` already built,
so storing it costs no second search) and writes it beside the workspace's other arrays as
one file, ``<workspace>.arrays/neighbours.npz``: ``index`` (N, K) int32 image indices (-1
where an image has fewer than K neighbours, or none: an unreadable image, or one without
finite features), ``similarity`` (N, K) float32 cosine (NaN there), and the run id, the
feature models and the reason there are none (a run without features writes the file with
that reason and no rows, so the review page can tell "no features" from "an older
workspace that never stored neighbours").

Why a file and not a table: an (N, K) matrix is array data like the logits, read one row at a
time; a table would need a schema version and a migration for what only the dashboard reads.
Why not a memory map: ``.npz`` cannot be mapped, and the file is small (50,000 x 20: 4 MiB),
so :func:`read_neighbours` loads it once per version of the file (its stat is the cache key)
and every lookup after that is an index into memory.

Writes are atomic (:func:`audit._io.atomic_file`: a temporary file in the same folder, then
``os.replace``): a crash leaves the previous file or the new one, never half of one. The file
is written before the run's tables, and names its run: a reader whose workspace's newest
finished run is another (the run that wrote it failed afterwards, or an older file outlived a
crash) treats it as absent.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from audit._io import atomic_file
from audit.store import arrays_dir

if TYPE_CHECKING:  # the checks package is imported by writers only: the dashboard's read side never needs it
    from audit.checks._base import CheckInputs

__all__ = [
    "FILE",
    "FORMAT",
    "STORED_K",
    "StoredNeighbours",
    "image_neighbour_rows",
    "neighbours_path",
    "read_neighbours",
    "save_neighbours",
    "write_neighbours",
]

FILE = "neighbours.npz"
FORMAT = 1  # bumped when the file's fields change; a reader refuses other formats as absent
# Neighbours stored per image: the shared graph's size (audit.checks._neighbors.GRAPH_K), so storing them
# needs no second search and the review page can show up to this many.
STORED_K = 20


@dataclass(frozen=True)
class StoredNeighbours:
    """One run's stored neighbours (see the module doc)."""

    run_id: str
    n: int  # images in the workspace
    index: np.ndarray  # (N, K) int32 image indices, nearest first; -1 = none
    similarity: np.ndarray  # (N, K) float32 cosine; NaN where index is -1
    models: tuple[str, ...]  # the zoo models whose features made the space
    reason: str | None  # why this run stored none (no features), else None

    @property
    def k(self) -> int:
        return int(self.index.shape[1]) if self.index.ndim == 2 else 0


def neighbours_path(db: str | Path) -> Path:
    """Where workspace ``db`` keeps its neighbours file."""
    return arrays_dir(db) / FILE


def image_neighbour_rows(inputs: CheckInputs, k: int = STORED_K) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The run's graph as image indices: ``(index (N, k) int32, similarity (N, k) float32, models)``.

    Reuses the graph a feature check built for ``inputs`` (memoised per run); builds it when none did.
    """
    from audit.checks._neighbors import neighbors

    graph = neighbors(inputs, k=k)
    sim, nbr = graph.row_neighbors(k)  # rows of the space; exact copies first, at similarity 1
    rows = graph.space.rows
    index = np.full((inputs.n, k), -1, dtype=np.int32)
    similarity = np.full((inputs.n, k), np.nan, dtype=np.float32)
    index[rows] = np.where(nbr >= 0, rows[np.maximum(nbr, 0)], -1)
    similarity[rows] = np.where(nbr >= 0, sim, np.nan)
    models = tuple(inputs.feature_models) or tuple(graph.space.models)
    return index, similarity, models


def write_neighbours(db: str | Path, run_id: str, inputs: CheckInputs | None, *, k: int = STORED_K) -> Path:
    """Store the run's neighbours of every image (or, without features, why there are none); returns the file.

    ``inputs`` None or without features: the file records the reason and no rows.
    """
    if inputs is None or not inputs.features:
        n = 0 if inputs is None else inputs.n
        return save_neighbours(
            db,
            run_id,
            np.full((n, 0), -1, dtype=np.int32),
            np.full((n, 0), np.nan, dtype=np.float32),
            reason="this run recorded no features (--no-features, or models that give none)",
        )
    index, similarity, models = image_neighbour_rows(inputs, k)
    return save_neighbours(db, run_id, index, similarity, models=models)


def save_neighbours(
    db: str | Path,
    run_id: str,
    index: np.ndarray,
    similarity: np.ndarray,
    *,
    models: tuple[str, ...] = (),
    reason: str | None = None,
) -> Path:
    """Write the neighbours file of workspace ``db`` atomically (:func:`audit._io.atomic_file`: temporary file,
    fsync, ``os.replace``; a full disk is a :class:`~audit.errors.DiskError`)."""
    index = np.asarray(index, dtype=np.int32)
    similarity = np.asarray(similarity, dtype=np.float32)
    if index.ndim != 2 or index.shape != similarity.shape:
        raise ValueError(f"index {index.shape} and similarity {similarity.shape} must be the same (N, K)")
    path = neighbours_path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not "*.npz" while half-written (as scoring's shards): a kill leaves ".neighbours.npz.<random>.tmp" at most.
    with atomic_file(path, prefix=f".{FILE}.", suffix=".tmp") as f:
        np.savez(
            f,
            format=np.int32(FORMAT),
            run_id=np.str_(run_id),
            n=np.int64(len(index)),
            index=index,
            similarity=similarity,
            models=np.array(models, dtype=np.str_),
            reason=np.str_(reason or ""),
        )
    return path


# (path, stat) -> StoredNeighbours: the file read once per version of it, a few workspaces at a time.
_CACHE: OrderedDict[tuple[str, int, int, int], StoredNeighbours] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def read_neighbours(db: str | Path) -> StoredNeighbours | None:
    """The workspace's stored neighbours, or None when there is no readable file of this format.

    Loaded once per version of the file (keyed by its path, mtime, size and inode) and kept in memory.
    """
    path = neighbours_path(db)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != FORMAT:
                return None
            index = np.asarray(z["index"], dtype=np.int32)
            similarity = np.asarray(z["similarity"], dtype=np.float32)
            got = StoredNeighbours(
                run_id=str(z["run_id"]),
                n=int(z["n"]),
                index=index,
                similarity=similarity,
                models=tuple(str(m) for m in z["models"]),
                reason=str(z["reason"]) or None,
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # not ours, or damaged: as good as absent
        return None
    if got.index.ndim != 2 or got.index.shape != got.similarity.shape or got.index.shape[0] != got.n:
        return None
    with _CACHE_LOCK:
        _CACHE[key] = got
        while len(_CACHE) > 4:
            _CACHE.popitem(last=False)
    return got
