"""A reference set (``audit run --reference TRAIN_DIR``): images the audited set should not duplicate.

ImageNet's validation set has 797 images that duplicate training images (Kisel et al.,
"Flaws of ImageNet"): a model has seen them, so their predictions measure memory, not
generalisation. A reference set is read for exactly that question: its images go through the
same decode pass (pixel statistics and hashes, for ``exact_duplicate``) and the same zoo models'
forward pass (features, for ``near_duplicate``) as the audited set, and nothing else: its
labels are never scored, flagged or written to the workspace. Its arrays live apart, under
``<arrays>/reference/<digest of its folder>/``, cached and resumed as the set's are, so a rerun
with the same reference scores nothing again.

The layout is the audited set's (class folders, named as the set's classes, so that a duplicate
whose training label differs can be said) or any folder of images (then unlabelled).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from audit.datasets import AuditDataset, image_extensions, load_dataset
from audit.errors import DatasetError

__all__ = ["UNLABELLED", "load_reference", "reference_folder", "reference_inputs"]

_log = logging.getLogger(__name__)

UNLABELLED = "unlabelled"  # the layout of a reference that is a plain folder of images


def load_reference(root: str | Path, dataset: AuditDataset) -> AuditDataset:
    """The reference set at ``root``, its labels (where it has class folders) in ``dataset``'s classes.

    Parameters
    ----------
    root : path-like
        Class folders (as ``audit run`` reads an ImageFolder) or any folder holding images (unlabelled).
    dataset : AuditDataset
        The audited set: the reference must lie apart from it, and its class folders are mapped onto
        this set's classes by key (wnid or folder name); a class the set lacks maps to -1.

    Returns
    -------
    AuditDataset
        M images; ``labels`` (M,) in ``dataset.label_space`` (-1: unlabelled or a class the set lacks).

    Raises
    ------
    DatasetError
        The folder is missing, holds no image, or overlaps the audited set (every image would be its own
        duplicate).
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DatasetError(f"--reference {r}: no such folder; pass the training set's folder (class folders or images)")
    r, own = r.resolve(), dataset.root.resolve()
    if r == own or own in r.parents or r in own.parents:
        raise DatasetError(
            f"--reference {r} overlaps the audited set {own}; pass a folder apart from it (e.g. the training split)"
        )
    exts = image_extensions()
    is_image = lambda p: p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")  # noqa: E731
    # Images at the top: a dump, not class folders; any images under it, unlabelled (a scrape to check against).
    top = [p for p in r.iterdir() if not p.name.startswith(".")]
    folders = any(d.is_dir() and any(is_image(p) for p in d.iterdir()) for d in top)
    ref = _class_folders(r) if folders and not any(is_image(p) for p in top) else None
    if ref is None:
        ids = tuple(p.relative_to(r).as_posix() for p in sorted(r.rglob("*")) if is_image(p))
        if not ids:
            raise DatasetError(f"--reference {r}: no images found; pass a folder of class folders or of image files")
        return AuditDataset(
            root=r,
            image_ids=ids,
            labels=np.full(len(ids), -1, dtype=np.int64),
            label_space=dataset.label_space,
            layout=UNLABELLED,
        )
    # Class folders: their keys (wnids, or folder names for a custom space) onto the audited set's indices.
    index = {k: i for i, k in enumerate(dataset.label_space.keys)}
    to_set = np.array([index.get(k, -1) for k in ref.label_space.keys], dtype=np.int64)
    labels = to_set[ref.labels] if len(ref.labels) else ref.labels
    return AuditDataset(
        root=ref.root,
        image_ids=ref.image_ids,
        labels=labels.astype(np.int64),
        label_space=dataset.label_space,
        layout=ref.layout,
        stamps=ref.stamps,
    )


def _class_folders(root: Path) -> AuditDataset:
    """``root`` read as the audited set's ImageFolder is, its mistakes named as the reference's."""
    try:
        # Read as its own classes (folder names): mapped onto the set's by key below, wnids or not.
        return load_dataset(root, real=False, label_space="custom")
    except DatasetError as e:
        raise DatasetError(f"--reference: {e}") from None


def reference_folder(arrays: Path, ref: AuditDataset) -> Path:
    """Where a reference set's shards, features and pixel statistics live: one folder per reference folder."""
    digest = hashlib.sha1(str(ref.root).encode()).hexdigest()[:12]
    return Path(arrays) / "reference" / digest


def reference_inputs(
    ref: AuditDataset,
    specs: Sequence[Any],
    arrays: Path,
    *,
    feature_models: Sequence[str],
    models: Mapping[str, Any] | None = None,
    **score: Any,
) -> dict[str, Any]:
    """Score ``ref`` for the checks (pixel statistics; features of the models in ``feature_models``).

    Parameters
    ----------
    ref : AuditDataset
        From :func:`load_reference`.
    specs : sequence of ModelSpec
        The run's models, preprocessing already decided; only those in ``feature_models`` (the zoo models
        whose features the audited set has) are run, in that order, so the two sets' features line up.
    arrays : Path
        The workspace's arrays folder (see :func:`reference_folder`).
    **score
        Passed to :func:`audit.scoring.score_dataset` (batch size, workers, device, backend, progress...).

    Returns
    -------
    dict
        ``CheckInputs.reference``: ``image_ids``, ``features`` (per model (M, D_m), or None), ``pixels``
        (columns (M,), or None) and ``labels`` ((M,) or None when unlabelled or none maps onto the set).
    """
    from audit.headmodels import features_of
    from audit.scoring import load_pixel_stats, score_dataset

    by_name = {s.name: s for s in specs}
    run = [by_name[n] for n in feature_models if n in by_name]
    folder = reference_folder(arrays, ref)
    _log.info("reference set: %d images from %s, %d model(s)", len(ref), ref.root, len(run))
    loaded = {s.name: models[s.name] for s in run if models and s.name in models} or None
    done = score_dataset(ref, run, folder, models=loaded, features=True, pixels=True, **score)
    feats = [features_of(a) for a in done]
    labels = ref.labels if np.any(ref.labels >= 0) else None
    return {
        "image_ids": ref.image_ids,
        "features": feats if feats and all(f is not None for f in feats) else None,
        "pixels": load_pixel_stats(ref, folder),
        "labels": labels,
        "root": str(ref.root),
    }
