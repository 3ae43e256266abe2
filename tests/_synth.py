"""Seeded synthetic datasets and prediction files for tests (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # ImageNet classes 0, 1, 2, 3


def make_imagefolder(
    root: Path, *, per_class: int = 6, wnids: tuple[str, ...] = WNIDS, seed: int = 0, size: tuple[int, int] = (48, 40)
) -> Path:
    """wnid folders of small JPEGs named like ILSVRC-2012 validation files."""
    rng = np.random.default_rng(seed)
    k = 1
    for w in wnids:
        d = root / "val" / w
        d.mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"ILSVRC2012_val_{k:08d}.JPEG", quality=85)
            k += 1
    return root


def make_predictions(
    path: Path,
    image_ids: list[str],
    labels: np.ndarray,
    *,
    n_classes: int = 1000,
    flip: np.ndarray | None = None,
    seed: int = 1,
    probs: bool = False,
) -> Path:
    """Logits that favour the given label, except at ``flip`` rows (favour label+1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(image_ids), n_classes)).astype(np.float32)
    target = labels.copy()
    if flip is not None:
        target[flip] = (labels[flip] + 1) % n_classes
    logits[np.arange(len(labels)), target] += 9.0
    out = logits
    if probs:
        e = np.exp(logits - logits.max(1, keepdims=True))
        out = (e / e.sum(1, keepdims=True)).astype(np.float32)
    np.save(path, out)
    path.with_suffix(".ids.txt").write_text("\n".join(image_ids) + "\n")
    return path


def make_checkpoint(path: Path, *, arch: str = "mobilenet_v3_small", seed: int = 0) -> str:
    """A seeded random-weights torchvision state dict at ``path``; returns its zoo name ``arch@path``."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
    return f"{arch}@{path}"


def make_named_images(root: Path, folders: dict[str, list[str]], *, seed: int = 0) -> Path:
    """Small seeded PNGs at ``root/<folder>/<file>`` for any names (hostile ones included)."""
    rng = np.random.default_rng(seed)
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for f in files:
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / folder / f, format="PNG")
    return root


def make_parquet_predictions(path: Path, image_ids: list[str], labels: np.ndarray, **kw: object) -> Path:
    """:func:`make_predictions` as a ``.parquet`` file (``image``, ``logits``): ids may hold any character."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    logits = np.load(make_predictions(path.with_suffix(".npy"), image_ids, labels, **kw))  # type: ignore[arg-type]
    pq.write_table(pa.table({"image": list(image_ids), "logits": logits.tolist()}), path)
    return path
