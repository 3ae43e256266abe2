"""Cross-validated heads as models of a run: ``<model>+softmax-head`` and ``<model>+sigmoid-head``.

For a custom label space (and on request, ``--heads``, for any dataset), each scored
model that brings penultimate features gets two linear heads fitted on the given
labels by :func:`audit.heads.cross_val_head` (stratified K-fold; see that module for
the rule on classes with fewer images than folds). Each image's out-of-fold logits
and probabilities become that head's predictions, stored like a scored model's
(``(N, C)`` float32 .npy files in the arrays folder, written atomically), so
evaluation, the ensemble, the flags, review, impact and export treat a head as any
other model. The sigmoid head's logits are its one-vs-rest logits, so the sigmoid of
them (what the sigmoid evaluation scores) is its per-class score; its probabilities
are those scores normalised to sum to 1.

Only valid images (those every model could read) are fitted; the others get NaN rows.
Fits are cached by what they depend on (head kind, folds, seed, C grid, the given
labels of the fitted images and the features' bytes): a rerun with the same inputs
reads them back instead of fitting again, and an interrupted run resumes with the
heads it had finished.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit import _io
from audit.datasets import AuditDataset
from audit.heads import _C_GRID, HEAD_KINDS, cross_val_head
from audit.scoring import ModelArrays, model_key
from audit.zoo import ModelSpec

__all__ = [
    "HEADS_MIN_AGREEMENT",
    "HEAD_SOURCE",
    "HeadModels",
    "features_of",
    "fit_heads",
    "head_agreement",
    "head_name",
    "weak_heads_warning",
]

HEAD_SOURCE = "head"  # models.source of a head; models.arch names the model whose features it reads
# Below this share of images on which the heads' ensemble agrees with the given labels, the heads are
# too weak to audit the labels: with 15% of its top-1 predictions against the given labels, most of
# what cleanlab flags are the heads' own mistakes rather than wrong labels (human label noise in
# curated sets is typically a few to ~10%: CIFAR-10N's aggregate labels are 9% wrong). The issue's
# baseline on CIFAR-10N, Lite0 features with logistic regression, reaches 76% and was judged too weak.
HEADS_MIN_AGREEMENT = 0.85


def head_name(model: str, kind: str) -> str:
    """``efficientnet_lite0.in1k+softmax-head``: the model whose features, and the head's loss."""
    return f"{model}+{kind}-head"


def features_of(arrays: ModelArrays) -> np.ndarray | None:
    """The ``(N, D)`` penultimate features scoring stored for a model, memory-mapped, or None.

    The seam to scoring: ``ModelArrays.features`` (a path to an ``(N, D)`` .npy beside
    the logits, float16 allowed) where scoring records it; None for models without
    features (imported predictions without them, scoring that predates features).
    """
    path = getattr(arrays, "features", None)
    if path is None:
        return None
    return np.load(path, mmap_mode="r")


@dataclass(frozen=True)
class HeadModels:
    """What :func:`fit_heads` made: the heads' arrays, their models-table parameters, notes for the run."""

    arrays: list[ModelArrays]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # model name -> JSON-able head parameters
    notes: list[str] = field(default_factory=list)


def fit_heads(
    ds: AuditDataset,
    arrays: Sequence[ModelArrays],
    out_dir: Path,
    *,
    valid: np.ndarray,
    folds: int = 10,
    seed: int = 0,
    kinds: Sequence[str] = HEAD_KINDS,
    features: Callable[[ModelArrays], np.ndarray | None] | None = None,
) -> HeadModels:
    """Fit both heads on the features of every model of ``arrays`` that has them.

    Parameters
    ----------
    ds : AuditDataset
        Its given labels (valid images only) are what the heads learn.
    arrays : sequence of ModelArrays
        The run's scored models; heads are never fitted on heads.
    out_dir : Path
        The workspace's arrays folder; heads go in its ``heads/`` subfolder.
    valid : bool (N,)
        Images every model could read.
    folds, seed : int
        Outer folds and the seed of the fold assignment.
    features : callable, optional
        ``ModelArrays -> (N, D) array or None``; default :func:`features_of`.

    Returns
    -------
    HeadModels
    """
    get = features or features_of
    labels = np.where(valid, ds.labels, -1).astype(np.int64)
    n_classes = len(ds.label_space)
    folder = Path(out_dir) / "heads"
    folder.mkdir(parents=True, exist_ok=True)
    out: list[ModelArrays] = []
    params: dict[str, dict[str, Any]] = {}
    without = []
    for a in arrays:
        if a.spec.source == HEAD_SOURCE:
            continue
        feats = get(a)
        if feats is None:
            without.append(a.spec.name)
            continue
        if feats.ndim != 2 or feats.shape[0] != len(ds):
            raise ValueError(f"{a.spec.name}: features of shape {feats.shape}, expected ({len(ds)}, D)")
        digest = _digest(feats)
        for kind in kinds:
            name = head_name(a.spec.name, kind)
            key = hashlib.sha256(
                json.dumps([kind, folds, seed, list(_C_GRID), n_classes, digest]).encode() + labels.tobytes()
            ).hexdigest()[:16]
            stem = folder / f"{model_key(name)}-{key}"
            logits_p, probs_p, meta_p = (Path(f"{stem}.{x}") for x in ("logits.npy", "probs.npy", "json"))
            if meta_p.exists() and logits_p.exists() and probs_p.exists():
                p = json.loads(meta_p.read_text())  # written last: its presence means both arrays are whole
            else:
                res = cross_val_head(feats, labels, n_classes=n_classes, kind=kind, folds=folds, seed=seed)  # type: ignore[arg-type]
                _save(logits_p, res.logits)
                _save(probs_p, res.probs)
                p = {**res.params, "features": a.spec.name, "features_dim": int(feats.shape[1])}
                _io.atomic_write(meta_p, json.dumps(p).encode())
            spec = ModelSpec(
                name=name,
                source=HEAD_SOURCE,
                arch=a.spec.name,
                tag=None,
                preprocess=None,
                num_classes=n_classes,
                label_space="imagenet-1k" if ds.label_space.imagenet else "custom",
                loss=kind,
                weights_file=None,
            )
            out.append(ModelArrays(spec=spec, logits=logits_p, probs=probs_p, num_classes=n_classes, bad=dict(a.bad)))
            params[name] = p
    notes = []
    if without:
        notes.append(
            f"{', '.join(without)}: no features stored, so no heads on them (heads need a zoo model scored "
            "by this audit, which records its penultimate features)"
        )
    return HeadModels(out, params, notes)


def head_agreement(probs: Sequence[np.ndarray], labels: np.ndarray, valid: np.ndarray) -> float:
    """Share of valid images whose given label is the top-1 of the mean of ``probs`` (the heads' ensemble)."""
    mean = np.zeros(np.asarray(probs[0]).shape, dtype=np.float64)
    for p in probs:
        mean += np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.0)
    keep = valid & (labels >= 0)
    if not keep.any():
        return float("nan")
    return float(np.mean(mean[keep].argmax(1) == labels[keep]))


def weak_heads_warning(agreement: float, threshold: float = HEADS_MIN_AGREEMENT) -> str | None:
    """The warning for heads too weak to trust (agreement below ``threshold``), or None."""
    if not np.isfinite(agreement) or agreement >= threshold:
        return None
    return (
        f"heads agree with the given labels on {100 * agreement:.0f}% of images (below {100 * threshold:.0f}%): "
        "many flags will be the heads' own errors; add stronger models"
    )


def _digest(feats: np.ndarray) -> str:
    h = hashlib.sha256(str((feats.shape, str(feats.dtype))).encode())
    step = 4096
    for s in range(0, feats.shape[0], step):
        h.update(np.ascontiguousarray(feats[s : s + step]).tobytes())
    return h.hexdigest()


def _save(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    _io.atomic_write(path, buf.getvalue())
