"""Scoring: one decode pass over the images, feeding every model.

Each image is read and decoded once (EXIF orientation applied, converted to
RGB) and resized per model by that model's own :class:`~audit.zoo.Preprocess`.
Work is cut into shards of ``shard_size`` images; each finished shard is
written atomically to ``<arrays>/shards/<model>/`` so an interrupted run
resumes where it stopped and recomputes nothing finished. When every shard is
there they are assembled into one ``(N, C)`` float32 logits and probability
matrix per model (``.npy``, memory-mappable).

:func:`forward_batch` is a pure function of (models, inputs): a distributed
engine can call it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit.datasets import AuditDataset, decode_image
from audit.errors import ModelError
from audit.zoo import ModelSpec

__all__ = [
    "ModelArrays",
    "forward_batch",
    "load_models",
    "model_key",
    "score_dataset",
    "softmax",
]

_log = logging.getLogger(__name__)
_SHARD_FORMAT = 1


@dataclass(frozen=True)
class ModelArrays:
    """Where one model's outputs for a dataset live."""

    spec: ModelSpec
    logits: Path  # (N, C) float32 .npy; NaN rows for images that could not be read
    probs: Path  # (N, C) float32 .npy, softmax of logits
    num_classes: int


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


class _Frames:
    """Map-style dataset: index -> (index, per-model tensors or None, bad reason)."""

    def __init__(self, ds: AuditDataset, indices: np.ndarray, transforms: Sequence[Callable]):
        self.root = ds.root
        self.ids = ds.image_ids
        self.indices = indices
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, list[Any] | None, str]:
        i = int(self.indices[j])
        path = self.root / self.ids[i]
        try:
            img = decode_image(path)
            return i, [t(img) for t in self.transforms], ""
        except Exception as e:  # any unreadable image is recorded, never fatal
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _collate(items: list[tuple[int, list[Any] | None, str]]) -> dict[str, Any]:
    import torch

    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, r) for i, t, r in items if t is None]
    inputs = []
    if good:
        for m in range(len(good[0][1])):
            inputs.append(torch.stack([t[m] for _, t in good]))
    return {"index": [i for i, _ in good], "inputs": inputs, "bad": bad}


def forward_batch(models: Sequence[Any], inputs: Sequence[Any], *, channels_last: bool = True) -> list[Any]:
    """Logits of each model on its own input batch; a pure function.

    Parameters
    ----------
    models : sequence of torch.nn.Module, length M
    inputs : sequence of Tensor, length M, each (B, 3, H_m, W_m)

    Returns
    -------
    list of Tensor, length M, each (B, C_m) float32 on the CPU
    """
    import torch

    out = []
    with torch.inference_mode():
        for model, x in zip(models, inputs, strict=True):
            dev = next(model.parameters()).device
            x = x.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    return out


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fingerprint(ds: AuditDataset, spec: ModelSpec, shard_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_SHARD_FORMAT, shard_size, spec.as_dict()], sort_keys=True).encode())
    for i in ds.image_ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()


def _shard_dir(arrays: Path, spec: ModelSpec, fp: str) -> Path:
    d = arrays / "shards" / model_key(spec.name)
    manifest = d / "manifest.json"
    if d.exists():
        try:
            old = json.loads(manifest.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            old = None
        if old != fp:
            _log.warning("%s: cached shards are for other images or weights; recomputing", spec.name)
            for f in d.glob("*.npz"):
                f.unlink()
    d.mkdir(parents=True, exist_ok=True)
    if not manifest.exists() or json.loads(manifest.read_text()).get("fingerprint") != fp:
        tmp = d / ".manifest.tmp"
        tmp.write_text(json.dumps({"fingerprint": fp, "model": spec.name}))
        os.replace(tmp, manifest)
    return d


def _shard_path(d: Path, s: int) -> Path:
    return d / f"{s:06d}.npz"


def load_models(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """Build every model that runs (not imported predictions), failing before any scoring."""
    from audit.zoo import build_model

    return {s.name: build_model(s) for s in specs if s.source != "predictions"}


def _prepare(model: Any, device: str, channels_last: bool) -> Any:
    import torch

    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _iter_batches(
    ds: AuditDataset, indices: np.ndarray, specs: Sequence[ModelSpec], batch_size: int, workers: int, pin: bool
) -> Iterator[dict[str, Any]]:
    import torch

    frames = _Frames(ds, indices, [s.preprocess.transform() for s in specs])  # type: ignore[union-attr]
    loader = torch.utils.data.DataLoader(
        frames,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


def score_dataset(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    arrays: Path,
    *,
    batch_size: int = 64,
    workers: int = 2,
    shard_size: int = 1024,
    device: str | None = None,
    channels_last: bool = True,
    progress: bool = True,
    models: Mapping[str, Any] | None = None,
) -> list[ModelArrays]:
    """Score every image with every model, resuming from finished shards.

    Parameters
    ----------
    ds : AuditDataset
        N images.
    specs : sequence of ModelSpec
        Models to run; ``predictions`` specs are imported instead of run.
    arrays : Path
        Folder for shards and the assembled ``(N, C)`` matrices.
    models : mapping of name to torch.nn.Module, optional
        Already-built models (see :func:`load_models`); built here otherwise.

    Returns
    -------
    list of ModelArrays, one per spec, in order.
    """
    import torch

    if batch_size < 1:
        raise ModelError(f"--batch-size must be at least 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = len(ds)
    n_shards = (n + shard_size - 1) // shard_size
    run_specs = [s for s in specs if s.source != "predictions"]
    dirs = {s.name: _shard_dir(arrays, s, _fingerprint(ds, s, shard_size)) for s in run_specs}
    todo = {s.name: [k for k in range(n_shards) if not _shard_path(dirs[s.name], k).exists()] for s in run_specs}
    needed = sorted({k for v in todo.values() for k in v})
    if needed:
        # Build only what still has work: a resumed run skips finished models.
        active = [s for s in run_specs if todo[s.name]]
        built = models if models is not None else load_models(active)
        nets = [_prepare(built[s.name], device, channels_last) for s in active]
        _score_shards(
            ds, active, nets, dirs, todo, needed, shard_size, batch_size, workers, device, channels_last, progress
        )
    out = []
    for s in specs:
        if s.source == "predictions":
            out.append(_import_predictions(ds, s, arrays))
        else:
            out.append(_assemble(s, dirs[s.name], n_shards, n, arrays))
    return out


def _score_shards(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    models: Sequence[Any],
    dirs: dict[str, Path],
    todo: dict[str, list[int]],
    needed: list[int],
    shard_size: int,
    batch_size: int,
    workers: int,
    device: str,
    channels_last: bool,
    progress: bool,
) -> None:
    n = len(ds)
    indices = np.concatenate([np.arange(k * shard_size, min(n, (k + 1) * shard_size)) for k in needed])
    pending: dict[int, dict[str, Any]] = {}
    bar = _progress(len(indices), f"scoring {len(specs)} model(s)", progress)
    for batch in _iter_batches(ds, indices, specs, batch_size, workers, device == "cuda"):
        logits = forward_batch(models, batch["inputs"], channels_last=channels_last) if batch["index"] else []
        for pos, i in enumerate(batch["index"]):
            buf = _shard_buf(pending, i // shard_size, shard_size, n)
            for spec, lg in zip(specs, logits, strict=True):
                buf["logits"].setdefault(spec.name, {})[i] = lg[pos].numpy()
            buf["done"] += 1
        for i, reason in batch["bad"]:
            buf = _shard_buf(pending, i // shard_size, shard_size, n)
            buf["bad"][i] = reason
            buf["done"] += 1
        bar.update(len(batch["index"]) + len(batch["bad"]))
        for k in [k for k, b in pending.items() if b["done"] == b["size"]]:
            _write_shard(pending.pop(k), k, specs, dirs, todo, shard_size)
    bar.close()


def _shard_buf(pending: dict[int, dict[str, Any]], k: int, shard_size: int, n: int) -> dict[str, Any]:
    if k not in pending:
        size = min(n, (k + 1) * shard_size) - k * shard_size
        pending[k] = {"size": size, "done": 0, "logits": {}, "bad": {}}
    return pending[k]


def _write_shard(
    buf: dict[str, Any],
    k: int,
    specs: Sequence[ModelSpec],
    dirs: dict[str, Path],
    todo: dict[str, list[int]],
    shard_size: int,
) -> None:
    start = k * shard_size
    bad = sorted(buf["bad"])
    for spec in specs:
        if k not in todo[spec.name]:
            continue
        rows = buf["logits"].get(spec.name, {})
        c = len(next(iter(rows.values()))) if rows else spec.num_classes or 1
        mat = np.full((buf["size"], c), np.nan, dtype=np.float32)
        for i, v in rows.items():
            mat[i - start] = v
        _atomic_save_npz(
            _shard_path(dirs[spec.name], k),
            logits=mat,
            bad_index=np.array(bad, dtype=np.int64),
            bad_reason=np.array([buf["bad"][i] for i in bad], dtype=np.str_),
        )


def _assemble(spec: ModelSpec, d: Path, n_shards: int, n: int, arrays: Path) -> ModelArrays:
    from numpy.lib.format import open_memmap

    key = model_key(spec.name)
    lpath, ppath = arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy"
    stamp = d / "assembled.json"
    if lpath.exists() and ppath.exists() and stamp.exists():
        c = int(json.loads(stamp.read_text())["num_classes"])
        return ModelArrays(spec, lpath, ppath, c)
    first = np.load(_shard_path(d, 0))["logits"]
    c = first.shape[1]
    tmp_l, tmp_p = lpath.with_suffix(".tmp.npy"), ppath.with_suffix(".tmp.npy")
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    pos = 0
    for k in range(n_shards):
        lg = np.load(_shard_path(d, k))["logits"]
        lm[pos : pos + len(lg)] = lg
        pm[pos : pos + len(lg)] = softmax(lg.copy())
        pos += len(lg)
    lm.flush()
    pm.flush()
    del lm, pm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    stamp.write_text(json.dumps({"num_classes": c}))
    return ModelArrays(spec, lpath, ppath, c)


def bad_images(arrays: Path, spec: ModelSpec) -> dict[int, str]:
    """Images a model's shards recorded as unreadable: index -> reason."""
    d = arrays / "shards" / model_key(spec.name)
    out: dict[int, str] = {}
    for f in sorted(d.glob("*.npz")):
        z = np.load(f)
        out.update(zip(z["bad_index"].tolist(), z["bad_reason"].tolist(), strict=True))
    return out


def _import_predictions(ds: AuditDataset, spec: ModelSpec, arrays: Path) -> ModelArrays:
    path = Path(spec.weights_file or "")
    if path.suffix == ".npy":
        mat = np.load(path, mmap_mode="r")
        ids_file = path.with_suffix(".ids.txt")
        if not ids_file.exists():
            raise ModelError(f"{path} needs {ids_file.name} beside it: one image id per line, in row order")
        ids = ids_file.read_text().splitlines()
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = "logits" if "logits" in table.column_names else "probs"
        if "image" not in table.column_names or col not in table.column_names:
            raise ModelError(f"{path} needs columns 'image' and 'logits' (or 'probs'); has {table.column_names}")
        ids = table.column("image").to_pylist()
        mat = np.asarray(table.column(col).to_pylist(), dtype=np.float32)
    if mat.ndim != 2 or len(ids) != mat.shape[0]:
        raise ModelError(f"{path}: {mat.shape} predictions for {len(ids)} ids; expected one row per id")
    row = {i: r for r, i in enumerate(ids)}
    missing = [i for i in ds.image_ids if i not in row]
    if missing:
        raise ModelError(f"{path} has no row for {len(missing)} images, e.g. {missing[0]!r}; score them too")
    sel = np.asarray(mat[[row[i] for i in ds.image_ids]], dtype=np.float32)
    is_prob = bool(np.all(sel >= 0) and np.allclose(sel.sum(1), 1.0, atol=1e-3))
    # Probabilities only: log p gives back p under softmax, which is what every
    # downstream stage needs; the sigmoid evaluation then ranks by p.
    logits = np.log(np.clip(sel, 1e-12, None)) if is_prob else sel
    key = model_key(spec.name)
    lpath, ppath = arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy"
    arrays.mkdir(parents=True, exist_ok=True)
    np.save(lpath, logits.astype(np.float32))
    np.save(ppath, softmax(logits.astype(np.float32).copy()))
    return ModelArrays(spec, lpath, ppath, sel.shape[1])
