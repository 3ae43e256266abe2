"""The one-decode loader: every image read and decoded once, then resized and cropped for each model.

A DataLoader with ``workers`` processes reads each image once
(:func:`audit.datasets.decode_image`: EXIF orientation, RGB) and resizes and
centre-crops it *from the decoded image* for each model by that model's own
:class:`~audit.zoo.Preprocess` (:func:`resize_crop`). Batches travel as uint8
``(B, H, W, 3)`` tensors, a quarter of float32, and never straddle a shard
(:func:`_shard_batches`), so a resumed run recomputes exactly the batches an
uninterrupted one would.

With pixel statistics on, the same decoded image is also measured for the
image checks (:func:`audit.scoring.pixels.image_stats`: CleanVision's
properties and the duplicate hashes), so no image is read twice. Which images
need crops (some model still has to score their batch) and which need their
pixels measured is known before the loader starts: a batch whose models are
all cached is decoded for its pixel statistics only, and one whose pixel
statistics are cached is not measured again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from audit.datasets import AuditDataset, decode_image
from audit.scoring.pixels import _timed_stats
from audit.zoo import Preprocess

__all__ = ["load_batch", "resize_crop"]


def resize_crop(img: Any, pre: Preprocess) -> np.ndarray:
    """Resize the short side and centre-crop, as ``pre.transform()`` does, stopping at uint8.

    Parameters
    ----------
    img : PIL.Image.Image, RGB
    pre : Preprocess
        The weights' preprocessing.

    Returns
    -------
    ndarray of uint8, shape (crop, crop, 3)
        The pixels ``pre.transform()`` would normalise (same PIL resize, same crop).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    img = F.resize(img, [pre.resize], interpolation=InterpolationMode(pre.interpolation), antialias=True)
    img = F.center_crop(img, [pre.crop])
    return np.array(img, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays


# One loaded image: index, one uint8 crop per model (empty: no model needs it) or None (unreadable),
# the reason it is unreadable, its pixel statistics (None: not asked for), the seconds they took.
_Item = tuple[int, list[np.ndarray] | None, str, dict[str, Any] | None, float]


class _Frames:
    """Map-style dataset: image index -> :data:`_Item`.

    ``crops`` and ``pixels``, (N,) bool: which images need their crops for the
    models (None: every image) and which their pixel statistics (None: none).
    """

    def __init__(
        self,
        ds: AuditDataset,
        pres: Sequence[Preprocess],
        crops: np.ndarray | None = None,
        pixels: np.ndarray | None = None,
    ):
        self.root = ds.root
        self.ids = ds.image_ids
        self.pres = list(pres)
        self.crops = crops
        self.pixels = pixels if pixels is not None else np.zeros(len(self.ids), dtype=bool)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> _Item:
        crop = self.crops is None or bool(self.crops[i])
        return _load_item(self.root, self.ids[i], i, self.pres, crop, bool(self.pixels[i]))


def _load_item(root: Path, image_id: str, i: int, pres: Sequence[Preprocess], crop: bool, measure: bool) -> _Item:
    """Image ``i`` (``root / image_id``) decoded once: its crop for each model (``crop``), its pixel statistics
    (``measure``), or why it cannot be read. The one loading step of both engines (local and Ray)."""
    try:
        img = decode_image(root / image_id)
        crops = [resize_crop(img, p) for p in pres] if crop else []
    except Exception as e:  # any unreadable image is recorded, never fatal
        return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip(), None, 0.0
    stats, secs = _timed_stats(img) if measure else (None, 0.0)
    return i, crops, "", stats, secs


def load_batch(
    root: Path, ids: Sequence[str], first: int, pres: Sequence[Preprocess], *, crop: bool, measure: bool
) -> dict[str, Any]:
    """One batch as the local loader gives it (:func:`_collate`): images ``first .. first + len(ids) - 1``.

    What a Ray decode task runs (:mod:`audit.scoring.ray_engine`), so that both engines load every batch by
    the same code.
    """
    return _collate([_load_item(root, image_id, first + j, pres, crop, measure) for j, image_id in enumerate(ids)])


def _collate(items: list[_Item]) -> dict[str, Any]:
    import torch

    good = [(i, t) for i, t, *_ in items if t is not None]
    bad = [(i, r) for i, t, r, *_ in items if t is None]
    inputs = []
    if good:
        for m in range(len(good[0][1])):
            inputs.append(torch.from_numpy(np.stack([t[m] for _, t in good])))
    return {
        "first": items[0][0],
        "index": np.array([i for i, _ in good], dtype=np.int64),
        "inputs": inputs,
        "bad": bad,
        # Per good image, in "index" order: its pixel statistics (None where not measured) and their seconds.
        "pixels": [s for _, t, _, s, _ in items if t is not None],
        "pixel_seconds": sum(x for *_, x in items),
    }


def _shard_batches(shards: Sequence[int], n: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches covering ``shards`` in order, never straddling a shard boundary."""
    out = []
    for k in shards:
        stop = min(n, (k + 1) * shard_size)
        for s in range(k * shard_size, stop, batch_size):
            out.append(list(range(s, min(stop, s + batch_size))))
    return out
