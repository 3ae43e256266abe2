"""Scoring: one decode pass over the images, feeding every model.

Data flow for N images and M models:

1. **Load** (a DataLoader with ``workers`` processes): every image is read and
   decoded once (:func:`audit.datasets.decode_image`: EXIF orientation, RGB),
   then resized and centre-cropped *from the decoded image* for each model by
   that model's own :class:`~audit.zoo.Preprocess` (:func:`resize_crop`).
   Batches travel as uint8 ``(B, H, W, 3)`` tensors, a quarter of float32.
2. **Forward** (main process): each model's runner (:func:`make_runner`)
   normalises its batch with the weights' mean and std and runs the model
   (:func:`forward_batch`). The torch runner normalises on its device with
   the same float32 operations as torchvision's ``ToDtype(scale=True)`` +
   ``Normalize`` (:func:`normalize`); the OpenVINO runner does it inside the
   compiled graph.
3. **Shards**: the work is cut into shards of ``shard_size`` images and no
   batch straddles a shard, so a resumed run recomputes exactly the batches an
   uninterrupted one would. Each finished shard is written atomically to
   ``<arrays>/shards/<model>/``: a run killed at any point (``kill -9``
   included) resumes where it stopped, recomputes nothing finished, and ends
   with byte-identical outputs. A shard records each image's ``(size,
   mtime_ns)`` stamp and SHA-256 sums of its contents: a damaged shard is
   rescored, and an image changed in place is rescored with its batch (only
   that batch), each said in one line on the log.
4. **Assemble**: the shards are streamed into one ``(N, C)`` float32 logits and
   one probability matrix per model, and (features on, the default) one
   ``(N, D)`` float16 features matrix, the model's penultimate embedding from
   the same forward pass (``.npy``, memory-mappable); memory does
   not grow with N. Their SHA-256 sums are taken while they are written and
   checked before they are reused (about 0.2 s per 200 MB matrix, i.e. 50,000
   x 1,000 float32); matrices that fail are rebuilt from the shards.
5. **Pixels** (``pixels=``; on unless every model is an imported prediction
   file, which reads no image): the same decoded image is measured in the
   loader for the image checks (CleanVision's properties and the duplicate
   hashes, :mod:`audit.scoring.pixels`), stored per shard with stamps and sums
   in ``<arrays>/pixels/`` apart from any model, and read back by
   :func:`load_pixel_stats`. When every model is cached (or there are none)
   and pixel statistics are missing, the images are decoded for them alone.

Backends (``backend=``):

* ``"openvino"``, the CPU default when installed: the PyTorch model is
  exported to ONNX once per run and compiled by OpenVINO in fp32 (on a 2-core
  CPU, 2.5x channels_last PyTorch end to end, identical argmaxes; ``reports/PERF.md``).
* ``"onnxruntime"``: the same ONNX graph on ONNX Runtime's CPU provider.
* ``"torch"``: eager PyTorch, channels_last; the CUDA path (pinned host
  memory, non-blocking copies, normalisation on the GPU).

``precision="bf16"`` (or ``"fp16"`` on CUDA) is an opt-in fast mode. It moves
probabilities enough to change which labels get flagged, so it is never the
default, and its shards are never mixed with fp32 ones.

:func:`forward_batch` is a pure function of (models, inputs): a distributed
engine can call it unchanged.

The package's modules, one concern each:

* :mod:`audit.scoring.runners`: backend runners (torch, OpenVINO, ONNX Runtime), ONNX export.
* :mod:`audit.scoring.loader`: the one-decode loader and its batching.
* :mod:`audit.scoring.shards`: the shard cache (format, stamps, checksums, assembly).
* :mod:`audit.scoring.predictions`: imported ``preds:`` files and their validation.
* :mod:`audit.scoring.pixels`: pixel statistics from the decode pass, their shards and :func:`load_pixel_stats`.
* :mod:`audit.scoring.ray_engine`: the same batches decoded and scored on a Ray cluster (``engine=``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit.datasets import AuditDataset
from audit.errors import ModelError
from audit.scoring.loader import _collate, _Frames, _shard_batches, resize_crop
from audit.scoring.pixels import (
    _add_batch,
    _empty_columns,
    _PendingPixels,
    _PixelPlan,
    _plan_pixels,
    _preload,
    _write_pixel_shard,
    load_pixel_stats,
)
from audit.scoring.predictions import _import_predictions, _read_predictions, check_predictions
from audit.scoring.runners import (
    BACKENDS,
    PRECISIONS,
    OnnxRuntimeRunner,
    OpenVINORunner,
    TorchRunner,
    check_precision,
    export_onnx,
    forward_batch,
    load_models,
    make_runner,
    normalize,
    resolve_backend,
)
from audit.scoring.shards import (
    _SHARD_SIZE,
    ModelArrays,
    _assemble,
    _bounds,
    _fingerprint,
    _Plan,
    _plan,
    _Shard,
    _shard_dir,
    _write_shard,
    bad_images,
    model_key,
    softmax,
)
from audit.zoo import ModelSpec

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "ModelArrays",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "ScoreStats",
    "TorchRunner",
    "bad_images",
    "check_precision",
    "check_predictions",
    "export_onnx",
    "forward_batch",
    "load_models",
    "load_pixel_stats",
    "make_runner",
    "model_key",
    "normalize",
    "resize_crop",
    "resolve_backend",
    "score_dataset",
    "softmax",
]

_log = logging.getLogger(__name__)
_F16_LOW = 6.1e-2  # 1e-3 of it is float16's smallest normal number
_F16_HIGH = float(np.finfo(np.float16).max)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


@dataclass
class ScoreStats:
    """Where a :func:`score_dataset` call spent its wall time, in seconds (main process).

    ``wait`` is time the main process sat waiting for the loader: the part of
    loading (read, decode, resize) not hidden behind compute.
    """

    backend: str = ""
    precision: str = ""
    images: int = 0
    batches: int = 0
    build: float = 0.0  # building the torch models
    prepare: float = 0.0  # ONNX export and backend compilation
    wait: float = 0.0
    forward: dict[str, float] = field(default_factory=dict)  # per model, normalisation included
    write: float = 0.0  # shards to disk
    assemble: float = 0.0  # shards -> (N, C) logits, softmax -> probabilities
    total: float = 0.0
    # CPU seconds the loader processes spent measuring pixel statistics (summed over workers: hidden
    # behind the forward passes where cores are free), and the images measured.
    pixels: float = 0.0
    pixel_images: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


def score_dataset(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    arrays: Path,
    *,
    batch_size: int = 64,
    workers: int = 2,
    shard_size: int | None = None,
    device: str | None = None,
    channels_last: bool = True,
    progress: bool = True,
    models: Mapping[str, Any] | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    stats: ScoreStats | None = None,
    features: bool = True,
    pixels: bool | None = None,
    engine: Any = None,
) -> list[ModelArrays]:
    """Score every image with every model, reusing what is cached and still valid.

    Cached shards and matrices are reused only when their checksums verify;
    an image whose ``(size, mtime_ns)`` stamp changed since it was scored is
    rescored with the rest of its batch (the batch an uninterrupted run would
    give it, so the result is bit-identical to scoring afresh), and only that
    batch. Damage and changes are reported in one line each on the log.

    Parameters
    ----------
    ds : AuditDataset
        N images.
    specs : sequence of ModelSpec
        Models to run; ``predictions`` specs are imported instead of run
        (validated first, before anything is scored).
    arrays : Path
        Folder for shards and the assembled ``(N, C)`` matrices.
    batch_size, workers : int
        Images per forward pass; loader processes (0: load in this process).
    shard_size : int, optional
        Images per resumable shard; default ``$AUDIT_SHARD_SIZE`` or 1024.
    device : str, optional
        torch device; default ``"cuda"`` when present, else ``"cpu"``.
    channels_last : bool
        Torch backend: channels_last memory format (faster on CPU and GPU).
    models : mapping of name to torch.nn.Module, optional
        Already-built models (see :func:`load_models`); built here otherwise.
    backend : {"auto", "openvino", "onnxruntime", "torch"}
        See the module docstring; ``"auto"`` picks the fastest installed.
    precision : {"fp32", "bf16", "fp16"}
        fp32 unless you accept changed probabilities for speed.
    threads : int, optional
        Compute threads of the OpenVINO / ONNX Runtime backends (default: the CPUs available).
    stats : ScoreStats, optional
        Filled with where the time went.
    features : bool
        Also record each model's penultimate embedding, from the same forward
        pass as its logits (:func:`audit.scoring.runners.with_features`), as an
        ``(N, D)`` float16 ``.npy`` beside the logits (``ModelArrays.features``;
        float16 rounding moves a feature by under 1e-3 of its size). Off: no
        features, and ``ModelArrays.features`` is None. Shards scored with and
        without features are kept apart (switching rescores once).
    pixels : bool, optional
        Also measure each image's pixel statistics (CleanVision's image
        properties, exact and perceptual hashes) from the same decode, for the
        image checks; read them with :func:`load_pixel_stats`. Cached and
        resumed as the logits are, apart from any model: with every model
        cached (or ``specs`` empty) and statistics missing, the images are
        decoded for them alone, never resized for a model. False: nothing is
        measured, and statistics cached earlier are left as they are. None
        (the default): True, except for a run whose every spec is an imported
        prediction file: that run reads no image, and a decode pass over
        every image for its statistics alone is asked for with True.
    engine : audit.scoring.ray_engine.RayEngine, optional
        A connected Ray engine (:func:`audit.scoring.ray_engine.connect`): the
        batches are decoded in Ray Data tasks and scored by per-model actor
        pools on its cluster, and come back here to the same shards (same
        batches, same fingerprints: a run resumes on either engine). ``device``
        is then the actors' (the engine's), and ``workers``, ``threads`` and
        ``models`` are not used. None: this machine (the DataLoader).

    Returns
    -------
    list of ModelArrays, one per spec, in order.
    """
    import torch

    t_start = time.perf_counter()
    if batch_size < 1:
        raise ModelError(f"--batch-size must be at least 1, got {batch_size}")
    if shard_size is None:
        shard_size = int(os.environ.get("AUDIT_SHARD_SIZE", _SHARD_SIZE))
    if shard_size < 1:
        raise ModelError(f"shard size must be at least 1, got {shard_size}")
    if engine is not None:
        device = engine.device  # where the actors run, not this machine
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = resolve_backend(backend, device)
    check_precision(precision, backend, device)
    st = stats if stats is not None else ScoreStats()
    st.backend, st.precision = backend, precision
    n = len(ds)
    # Imported predictions are checked before any image is scored: a NaN found after hours of scoring helps no one.
    imported = {s.name: _read_predictions(ds, s) for s in specs if s.source == "predictions"}
    run_specs = [s for s in specs if s.source != "predictions"]
    if pixels is None:
        # Prediction files spare the user a read of every image (10 ms each); pixel statistics alone do not undo that.
        pixels = bool(run_specs) or not specs
    fps = {s.name: _fingerprint(ds, s, shard_size, backend, precision, features) for s in run_specs}
    dirs = {s.name: _shard_dir(arrays, s, fps[s.name]) for s in run_specs}
    stamps = ds.file_stamps() if run_specs or pixels else np.empty((n, 2), dtype=np.int64)
    changed: set[int] = set()
    plans = {
        s.name: _plan(s, dirs[s.name], fps[s.name], stamps, shard_size, batch_size, arrays, changed, features)
        for s in run_specs
    }
    pplan = _plan_pixels(ds, arrays, stamps, shard_size, batch_size, changed) if pixels else None
    if changed:
        first = ds.image_ids[min(changed)]
        _log.warning("%d image(s) changed since they were scored (e.g. %r); rescoring them", len(changed), first)
    needed = {b for p in plans.values() for starts in p.todo.values() for b in starts}
    if pplan is not None:
        needed |= {b for starts in pplan.todo.values() for b in starts}
    if needed:
        # Build only what still has work: a resumed run skips finished models.
        active = [s for s in run_specs if plans[s.name].todo]
        built: Mapping[str, Any] = {}
        if active and engine is None:  # none: the pass decodes for pixel statistics alone; Ray: the actors build
            t = time.perf_counter()
            built = models if models is not None else load_models(active)
            st.build += time.perf_counter() - t
        _score_shards(
            ds, active, built, dirs, plans, sorted(needed), stamps, shard_size, batch_size, workers, device,
            channels_last, backend, precision, threads, progress, st, features, pplan, engine,
        )  # fmt: skip
    t = time.perf_counter()
    out = []
    for s in specs:
        if s.source == "predictions":
            out.append(_import_predictions(s, imported[s.name], arrays, features))
        else:
            reuse = plans[s.name].reuse
            out.append(
                reuse if reuse is not None else _assemble(s, dirs[s.name], fps[s.name], shard_size, n, arrays, features)
            )
    st.assemble += time.perf_counter() - t
    st.total += time.perf_counter() - t_start
    return out


def _score_shards(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    built: Mapping[str, Any],
    dirs: dict[str, Path],
    plans: dict[str, _Plan],
    needed: list[int],
    stamps: np.ndarray,
    shard_size: int,
    batch_size: int,
    workers: int,
    device: str,
    channels_last: bool,
    backend: str,
    precision: str,
    threads: int | None,
    progress: bool,
    st: ScoreStats,
    features: bool = True,
    pplan: _PixelPlan | None = None,
    engine: Any = None,
) -> None:
    import torch

    n = len(ds)
    pres = [s.preprocess for s in specs]
    assert all(p is not None for p in pres)
    want = set(needed)
    batches = [
        b for b in _shard_batches(sorted({s // shard_size for s in want}), n, shard_size, batch_size) if b[0] in want
    ]
    # Which images need crops for a model and which their pixels measured, decided per batch as the plans say:
    # a batch loaded for its pixel statistics alone is decoded and measured, never resized for a model.
    for_models = {b for s in specs for starts in plans[s.name].todo.values() for b in starts}
    for_pixels = {b for starts in pplan.todo.values() for b in starts} if pplan is not None else set()
    what = f"scoring {len(specs)} model(s)" if specs else "decoding for pixel statistics"
    if engine is not None:
        what += " on Ray"
    bar = _progress(sum(len(b) for b in batches), what, progress)
    sink = _Collector(ds, specs, dirs, plans, stamps, shard_size, batches, pplan, features, st, bar)
    if engine is not None:
        try:
            engine.score(ds, specs, batches, for_models, for_pixels, sink, backend=backend, precision=precision,
                         channels_last=channels_last, features=features)  # fmt: skip
        finally:
            bar.close()
        sink.finish()
        return
    crops, measure = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for b in batches:
        crops[b] = b[0] in for_models
        measure[b] = b[0] in for_pixels
    if for_pixels:
        _preload()  # before the workers fork: they inherit the modules instead of importing them each
    on_gpu = device != "cpu"
    loader = torch.utils.data.DataLoader(
        _Frames(ds, pres, crops, measure),  # type: ignore[arg-type]
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=on_gpu and device.startswith("cuda"),
        prefetch_factor=2 if workers else None,
    )
    # Start the workers (fork) before compiling: they decode the first batches
    # while the models are exported and compiled, and no backend thread pool
    # exists yet when they fork.
    it = iter(loader)
    t = time.perf_counter()
    runners = [
        make_runner(
            built[s.name],
            s,
            backend=backend,
            device=device,
            precision=precision,
            threads=threads,
            channels_last=channels_last,
            features=features,
        )
        for s in specs
    ]
    st.prepare += time.perf_counter() - t
    try:
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            st.wait += time.perf_counter() - t
            first = int(batch["first"])
            outputs: dict[int, _Output] = {}
            if len(batch["index"]):
                for m, spec in enumerate(specs):
                    if not sink.wants(m, first):
                        continue  # cached and valid for this model; the batch is shared with models that need it
                    t = time.perf_counter()
                    (y,) = forward_batch([runners[m]], [batch["inputs"][m]])
                    st.forward[spec.name] = st.forward.get(spec.name, 0.0) + time.perf_counter() - t
                    outputs[m] = _output(y, features)
            sink.add(first, batch["index"], batch["bad"], outputs, batch["pixels"], batch["pixel_seconds"])
    finally:
        bar.close()
        del it
    sink.finish()


# One model's results for the good images of one batch: logits (B, C) float32, features (B, D) float16 or None
# (features off), and the largest |feature| before float16 rounding (0.0 with features off).
_Output = tuple[np.ndarray, np.ndarray | None, float]


def _output(y: Any, features: bool) -> _Output:
    """A runner's result (:func:`forward_batch`) as numpy: what both engines hand :meth:`_Collector.add`."""
    if not features:
        return y.numpy(), None, 0.0
    y, f = y
    # float16 here, as the shard stores it (the same rounding as assigning into the shard's float16 rows).
    return y.numpy(), f.numpy().astype(np.float16), float(f.abs().max()) if len(f) else 0.0


class _Collector:
    """Where scored batches go, from either engine, in any order: each shard is written once its last batch is in.

    One place for what a batch contributes (rows scored per model, logits, features, unreadable images, pixel
    statistics) and for writing the shards, so the local and the Ray engine write the same shards.
    """

    def __init__(
        self,
        ds: AuditDataset,
        specs: Sequence[ModelSpec],
        dirs: dict[str, Path],
        plans: dict[str, _Plan],
        stamps: np.ndarray,
        shard_size: int,
        batches: Sequence[Sequence[int]],
        pplan: _PixelPlan | None,
        features: bool,
        st: ScoreStats,
        bar: Any,
    ):
        self.ds, self.specs, self.dirs, self.plans, self.stamps = ds, list(specs), dirs, plans, stamps
        self.shard_size, self.pplan, self.features, self.st, self.bar = shard_size, pplan, features, st, bar
        self.n = len(ds)
        self.per_shard: dict[int, int] = {}
        for b in batches:
            self.per_shard[b[0] // shard_size] = self.per_shard.get(b[0] // shard_size, 0) + 1
        self.pending: dict[int, _Shard] = {}
        self.pending_px: dict[int, _PendingPixels] = {}
        self.seen: set[int] = set()  # batches taken (by first index): a batch a retried task delivers again is not
        self.failed: list[tuple[int, str]] = []  # images decoded whose pixel statistics could not be measured
        self.top: dict[int, float] = {}  # model position -> largest |feature| seen

    def wants(self, m: int, first: int) -> bool:
        """Whether model ``m`` scores the batch starting at image ``first`` (False: its cached rows stand)."""
        return first in self.plans[self.specs[m].name].todo.get(first // self.shard_size, ())

    def add(
        self,
        first: int,
        index: np.ndarray,
        bad: Sequence[Sequence[Any]],
        outputs: Mapping[int, _Output],
        pixels: Sequence[dict[str, Any] | None],
        pixel_seconds: float,
    ) -> None:
        """One batch: ``index`` its good images (global indices), ``bad`` its unreadable ones ``(index, reason)``,
        ``outputs`` per model that scores it (:meth:`wants`; none when no image is good), ``pixels`` per good
        image in ``index`` order."""
        shard_size, st = self.shard_size, self.st
        if first in self.seen:
            _log.debug("batch at image %d delivered twice (a retried task); taken once", first)
            return
        self.seen.add(first)
        k = first // shard_size
        start, stop = _bounds(k, shard_size, self.n)
        shard = self.pending.setdefault(k, _Shard(size=stop - start, left=self.per_shard[k]))
        rows = np.asarray(index, dtype=np.int64) - start
        bad = [(int(i), str(r)) for i, r in bad]
        count = len(rows) + len(bad)
        for m in range(len(self.specs)):
            if not self.wants(m, first):
                continue
            shard.scored.setdefault(m, np.zeros(shard.size, dtype=bool))[first - start : first - start + count] = True
            if not len(rows):
                continue
            y, f, top = outputs[m]
            if self.features:
                assert f is not None
                self.top[m] = max(self.top.get(m, 0.0), top)
                fm = shard.feats.get(m)
                if fm is None:
                    fm = shard.feats[m] = np.full((shard.size, f.shape[1]), np.nan, dtype=np.float16)
                fm[rows] = f
            mat = shard.mats.get(m)
            if mat is None:
                mat = shard.mats[m] = np.full((shard.size, y.shape[1]), np.nan, dtype=np.float32)
            mat[rows] = y
        pplan = self.pplan
        if pplan is not None and first in pplan.todo.get(k, ()):
            px = self.pending_px.get(k)
            if px is None:
                px = self.pending_px[k] = _PendingPixels(_empty_columns(shard.size), np.zeros(shard.size, dtype=bool))
            self.failed += [(start + r, why) for r, why in _add_batch(px, rows, list(pixels), first - start, count)]
            px.bad.update(bad)
            st.pixels += pixel_seconds
            st.pixel_images += count
        shard.bad.update(bad)
        shard.left -= 1
        st.images += count
        st.batches += 1
        self.bar.update(count)
        if shard.left == 0:
            t = time.perf_counter()
            _write_shard(self.pending.pop(k), k, start, self.specs, self.dirs, self.plans, self.stamps, self.features)
            if k in self.pending_px:
                _write_pixel_shard(pplan, self.pending_px.pop(k), k, start, self.stamps)  # type: ignore[arg-type]
            st.write += time.perf_counter() - t

    def finish(self) -> None:
        """After the last batch: every shard written, and the run's one-line notes on the log."""
        if self.pending or self.pending_px:
            raise RuntimeError(f"scoring ended with unfinished shards {sorted({*self.pending, *self.pending_px})}")
        if self.failed:
            i, why = min(self.failed)
            _log.warning(
                "pixel statistics could not be measured for %d image(s) (e.g. %r: %s); the image checks skip them",
                len(self.failed), self.ds.image_ids[i], why,
            )  # fmt: skip
        for m, t in self.top.items():
            # float16 keeps 1e-3 relative precision from 6.1e-5 (its smallest normal) to 65504: features whose
            # largest value is under 6.1e-2 lose their small entries, over 65504 become inf. Trained models sit
            # well inside (their features are of order 0.1 to 10); untrained weights may not.
            if not _F16_LOW <= t <= _F16_HIGH:  # info, not a warning: the logits, what runs use today, are unaffected
                _log.info(
                    "%s: its features reach at most %.3g, outside what float16 storage keeps to 1e-3 (%.3g to %.3g); "
                    "expected of untrained weights, not of a trained model: check the checkpoint",
                    self.specs[m].name, t, _F16_LOW, _F16_HIGH,
                )  # fmt: skip
