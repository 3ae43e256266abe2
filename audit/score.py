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
   with byte-identical outputs.
4. **Assemble**: the shards are streamed into one ``(N, C)`` float32 logits and
   one probability matrix per model (``.npy``, memory-mappable); memory does
   not grow with N.

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
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit._io import atomic_file, atomic_write
from audit.datasets import AuditDataset, decode_image
from audit.errors import ModelError
from audit.zoo import ModelSpec, Preprocess

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "ModelArrays",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "TorchRunner",
    "bad_images",
    "forward_batch",
    "load_models",
    "make_runner",
    "model_key",
    "normalize",
    "resize_crop",
    "resolve_backend",
    "score_dataset",
    "softmax",
]

_log = logging.getLogger(__name__)
# Bumped whenever what a shard holds could change: old shards are then recomputed.
_SHARD_FORMAT = 2
BACKENDS = ("auto", "openvino", "onnxruntime", "torch")
PRECISIONS = ("fp32", "bf16", "fp16")
_ONNX_OPSET = 17
_SHARD_SIZE = 1024


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


# --------------------------------------------------------------------------- preprocessing


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


def normalize(x: Any, pre: Preprocess, *, channels_last: bool = True) -> Any:
    """Turn a uint8 ``(B, H, W, 3)`` batch into the model's float input.

    The float operations are torchvision's ``ToDtype(float32, scale=True)`` then
    ``Normalize(mean, std)`` (``x * (1/255) - mean) / std``), so the result is
    bit-identical to ``pre.transform()`` on each image.

    Parameters
    ----------
    x : Tensor of uint8, shape (B, H, W, 3), on any device
    pre : Preprocess
    channels_last : bool
        True: the result has channels_last strides (free: it is the input
        layout); False: a contiguous NCHW tensor (for ONNX backends).

    Returns
    -------
    Tensor of float32, shape (B, 3, H, W), on ``x``'s device
    """
    import torch

    x = x.permute(0, 3, 1, 2)
    if not channels_last:
        x = x.contiguous()  # transposing uint8 moves a quarter of the bytes of float32
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


# --------------------------------------------------------------------------- runners


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend(backend: str, device: str) -> str:
    """The backend that will run: ``"auto"`` picks OpenVINO, then ONNX Runtime, then torch on the CPU; torch on GPUs.

    Raises
    ------
    ModelError
        Unknown backend, a CPU-only backend asked for a GPU, or one that is not installed.
    """
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cpu = device == "cpu"
    if backend == "auto":
        if on_cpu:
            for b in ("openvino", "onnxruntime"):
                if _installed(b):
                    return b
        return "torch"
    if backend != "torch":
        if not on_cpu:
            raise ModelError(f"backend {backend!r} runs on the CPU; use --backend torch with --device {device}")
        if not _installed(backend):
            raise ModelError(f"backend {backend!r} is not installed; run 'pip install {backend}' or pick another")
    return backend


def _check_precision(precision: str, backend: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device == "cpu":
        raise ModelError("fp16 needs a GPU; on the CPU use --precision bf16 (or fp32, the default)")
    if precision != "fp32" and backend == "onnxruntime":
        raise ModelError(f"backend onnxruntime runs fp32 only; use --backend openvino or torch for {precision}")


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TorchRunner:
    """A torch module on a device, fed uint8 batches: normalised on the device, channels_last, optional autocast.

    Calling it maps a uint8 ``(B, H, W, 3)`` batch (any device; pinned host
    memory copies without blocking) to float32 logits ``(B, C)`` on the
    runner's device.
    """

    backend = "torch"

    def __init__(
        self,
        module: Any,
        pre: Preprocess,
        device: str = "cpu",
        *,
        channels_last: bool = True,
        precision: str = "fp32",
    ):
        import torch

        self.pre = pre
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        module = module.to(self.device)
        self.module = (module.to(memory_format=torch.channels_last) if channels_last else module).eval()

    def __call__(self, x: Any) -> Any:
        import torch

        amp = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            x = normalize(x.to(self.device, non_blocking=True), self.pre, channels_last=self.channels_last)
            with amp:
                return self.module(x).float()


def export_onnx(module: Any, crop: int) -> bytes:
    """The fp32 module as an ONNX graph with a dynamic batch axis (input ``x``, output ``logits``)."""
    import torch

    module = module.to("cpu", memory_format=torch.contiguous_format).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, crop, crop),),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=_ONNX_OPSET,
        )
    return buf.getvalue()


@functools.cache
def _openvino_core() -> Any:
    """The process's one ``openvino.Core``, kept for the life of the process.

    Why not a Core per model: OpenVINO's CPU plugin installs its own
    ``sigaltstack`` on the thread that creates it and puts back the previous
    one when it is destroyed. Two Cores alive at once and freed out of order
    leave the main thread's alternate signal stack pointing at unmapped
    memory; the next Python signal handler (CPython installs them with
    ``SA_ONSTACK``; PyTorch's DataLoader adds one for SIGCHLD) then kills the
    process with SIGSEGV when any child exits. One Core, never freed, is also
    what OpenVINO recommends.
    """
    import openvino as ov

    return ov.Core()


class OpenVINORunner:
    """An ONNX graph compiled by OpenVINO for the CPU, fed uint8 ``(B, H, W, 3)`` batches.

    The weights' normalisation runs inside the compiled graph (OpenVINO
    pre-processing: to float, ``/255``, ``-mean``, ``/std``, NHWC -> NCHW),
    where it fuses with the first convolution instead of costing a pass over
    every batch. fp32 is pinned explicitly: on CPUs with AVX512-BF16 or AMX
    OpenVINO would otherwise pick bf16 by itself. Batches run in chunks of
    ``chunk`` images: OpenVINO keeps activation memory for the largest batch
    it has seen, about 12 MiB per image at 260 px, and throughput does not
    grow past ~16 on a CPU.
    """

    backend = "openvino"

    def __init__(
        self, onnx: bytes, pre: Preprocess, *, threads: int | None = None, precision: str = "fp32", chunk: int = 16
    ):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        core = _openvino_core()
        ppp = PrePostProcessor(core.read_model(onnx))
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0).mean(list(pre.mean)).scale(
            list(pre.std)
        )
        cfg: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or _cpu_threads()),
        }
        self.compiled = core.compile_model(ppp.build(), "CPU", cfg)
        # What the plugin settled on: it falls back to f32 where the CPU lacks bf16 support.
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.request = self.compiled.create_infer_request()
        self.chunk = chunk

    def __call__(self, x: Any) -> Any:
        import torch

        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.uint8)
        out = []
        for s in range(0, len(arr), self.chunk):
            res = self.request.infer({0: arr[s : s + self.chunk]})
            out.append(np.array(res[0], dtype=np.float32))  # copied: the request reuses its buffer
        return torch.from_numpy(np.concatenate(out) if len(out) > 1 else out[0])


class OnnxRuntimeRunner:
    """An ONNX graph on ONNX Runtime's CPU execution provider (fp32), fed uint8 ``(B, H, W, 3)`` batches."""

    backend = "onnxruntime"

    def __init__(self, onnx: bytes, pre: Preprocess, *, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or _cpu_threads())
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx, so, providers=["CPUExecutionProvider"])
        self.pre = pre

    def __call__(self, x: Any) -> Any:
        import torch

        arr = normalize(x.cpu(), self.pre, channels_last=False).numpy()
        return torch.from_numpy(self.session.run(None, {"x": arr})[0])


def make_runner(
    module: Any,
    spec: ModelSpec,
    *,
    backend: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    channels_last: bool = True,
) -> Any:
    """Wrap a built model for :func:`forward_batch` on ``backend`` (resolved as :func:`resolve_backend`).

    The runner takes the loader's uint8 ``(B, H, W, 3)`` batches and applies
    ``spec.preprocess``'s normalisation itself. A model the ONNX exporter
    cannot handle falls back to the torch runner, with a warning.
    """
    pre = spec.preprocess
    if pre is None:
        raise ModelError(f"{spec.name} is imported predictions, not a model to run")
    backend = resolve_backend(backend, device)
    _check_precision(precision, backend, device)
    if backend != "torch":
        try:
            onnx = export_onnx(module, pre.crop)
        except Exception as e:  # exporter gaps are model-specific; torch still runs it
            _log.warning("%s: ONNX export failed (%s); running it with torch", spec.name, str(e).splitlines()[0])
        else:
            if backend == "openvino":
                runner = OpenVINORunner(onnx, pre, threads=threads, precision=precision)
                if precision != "fp32" and runner.inference_precision == "f32":
                    _log.warning(
                        "%s: OpenVINO has no %s on this CPU and runs f32; --backend torch gives %s autocast",
                        spec.name, precision, precision,
                    )  # fmt: skip
                return runner
            return OnnxRuntimeRunner(onnx, pre, threads=threads)
    return TorchRunner(module, pre, device, channels_last=channels_last, precision=precision)


def forward_batch(models: Sequence[Any], inputs: Sequence[Any], *, channels_last: bool = True) -> list[Any]:
    """Logits of each model on its own input batch; a pure function.

    Parameters
    ----------
    models : sequence, length M
        Runners (see :func:`make_runner`), each taking a uint8 ``(B, H_m, W_m, 3)``
        batch; or bare ``torch.nn.Module``s, each taking a normalised float
        ``(B, 3, H_m, W_m)`` batch.
    inputs : sequence of Tensor, length M
    channels_last : bool
        For bare modules only: feed them channels_last input.

    Returns
    -------
    list of Tensor, length M, each (B, C_m) float32 on the CPU
    """
    import torch

    out = []
    with torch.inference_mode():
        for model, x in zip(models, inputs, strict=True):
            if isinstance(model, torch.nn.Module):
                dev = next(model.parameters()).device
                x = x.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    return out


# --------------------------------------------------------------------------- loading


class _Frames:
    """Map-style dataset: image index -> (index, one uint8 crop per model or None, bad reason)."""

    def __init__(self, ds: AuditDataset, pres: Sequence[Preprocess]):
        self.root = ds.root
        self.ids = ds.image_ids
        self.pres = list(pres)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, list[np.ndarray] | None, str]:
        try:
            img = decode_image(self.root / self.ids[i])
            return i, [resize_crop(img, p) for p in self.pres], ""
        except Exception as e:  # any unreadable image is recorded, never fatal
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _collate(items: list[tuple[int, list[np.ndarray] | None, str]]) -> dict[str, Any]:
    import torch

    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, r) for i, t, r in items if t is None]
    inputs = []
    if good:
        for m in range(len(good[0][1])):
            inputs.append(torch.from_numpy(np.stack([t[m] for _, t in good])))
    return {
        "first": items[0][0],
        "index": np.array([i for i, _ in good], dtype=np.int64),
        "inputs": inputs,
        "bad": bad,
    }


def _shard_batches(shards: Sequence[int], n: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches covering ``shards`` in order, never straddling a shard boundary."""
    out = []
    for k in shards:
        stop = min(n, (k + 1) * shard_size)
        for s in range(k * shard_size, stop, batch_size):
            out.append(list(range(s, min(stop, s + batch_size))))
    return out


# --------------------------------------------------------------------------- shards


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not "*.npz": a file left half-written by a kill must never look like a shard.
    with atomic_file(path, prefix=".", suffix=".npz.tmp") as f:
        np.savez(f, **arrays)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode(), prefix=".", suffix=".tmp")


def _fingerprint(ds: AuditDataset, spec: ModelSpec, shard_size: int, backend: str, precision: str) -> str:
    """What the cached shards of ``spec`` depend on: the weights' content (not their path), settings, image ids."""
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
    except (OSError, ValueError, KeyError):
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


def load_models(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """Build every model that runs (not imported predictions), failing before any scoring."""
    from audit.zoo import build_model

    return {s.name: build_model(s) for s in specs if s.source != "predictions"}


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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = resolve_backend(backend, device)
    _check_precision(precision, backend, device)
    st = stats if stats is not None else ScoreStats()
    st.backend, st.precision = backend, precision
    n = len(ds)
    n_shards = (n + shard_size - 1) // shard_size
    run_specs = [s for s in specs if s.source != "predictions"]
    fps = {s.name: _fingerprint(ds, s, shard_size, backend, precision) for s in run_specs}
    dirs = {s.name: _shard_dir(arrays, s, fps[s.name]) for s in run_specs}
    todo = {s.name: {k for k in range(n_shards) if not _shard_path(dirs[s.name], k).exists()} for s in run_specs}
    needed = sorted(set().union(*todo.values())) if todo else []
    if needed:
        # Build only what still has work: a resumed run skips finished models.
        active = [s for s in run_specs if todo[s.name]]
        t = time.perf_counter()
        built = models if models is not None else load_models(active)
        st.build += time.perf_counter() - t
        _score_shards(
            ds, active, built, dirs, todo, needed, shard_size, batch_size, workers, device, channels_last,
            backend, precision, threads, progress, st,
        )  # fmt: skip
    t = time.perf_counter()
    out = []
    for s in specs:
        if s.source == "predictions":
            out.append(_import_predictions(ds, s, arrays))
        else:
            out.append(_assemble(s, dirs[s.name], fps[s.name], n_shards, n, arrays))
    st.assemble += time.perf_counter() - t
    st.total += time.perf_counter() - t_start
    return out


@dataclass
class _Shard:
    size: int
    mats: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size, C) logits
    bad: dict[int, str] = field(default_factory=dict)
    done: int = 0


def _score_shards(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    built: Mapping[str, Any],
    dirs: dict[str, Path],
    todo: dict[str, set[int]],
    needed: list[int],
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
) -> None:
    import torch

    n = len(ds)
    pres = [s.preprocess for s in specs]
    assert all(p is not None for p in pres)
    batches = _shard_batches(needed, n, shard_size, batch_size)
    on_gpu = device != "cpu"
    loader = torch.utils.data.DataLoader(
        _Frames(ds, pres),  # type: ignore[arg-type]
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
        )
        for s in specs
    ]
    st.prepare += time.perf_counter() - t
    pending: dict[int, _Shard] = {}
    bar = _progress(sum(len(b) for b in batches), f"scoring {len(specs)} model(s)", progress)
    try:
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            st.wait += time.perf_counter() - t
            k = batch["first"] // shard_size
            start = k * shard_size
            shard = pending.setdefault(k, _Shard(size=min(n, start + shard_size) - start))
            rows = batch["index"] - start
            if len(rows):
                for m, spec in enumerate(specs):
                    if k not in todo[spec.name]:
                        continue  # finished before an interruption; the batch is shared with models that are not
                    t = time.perf_counter()
                    (y,) = forward_batch([runners[m]], [batch["inputs"][m]])
                    st.forward[spec.name] = st.forward.get(spec.name, 0.0) + time.perf_counter() - t
                    mat = shard.mats.get(m)
                    if mat is None:
                        mat = shard.mats[m] = np.full((shard.size, y.shape[1]), np.nan, dtype=np.float32)
                    mat[rows] = y.numpy()
            shard.bad.update(batch["bad"])
            shard.done += len(rows) + len(batch["bad"])
            st.images += len(rows) + len(batch["bad"])
            st.batches += 1
            bar.update(len(rows) + len(batch["bad"]))
            if shard.done == shard.size:
                t = time.perf_counter()
                _write_shard(pending.pop(k), k, specs, dirs, todo)
                st.write += time.perf_counter() - t
    finally:
        bar.close()
        del it
    if pending:
        raise RuntimeError(f"scoring ended with unfinished shards {sorted(pending)}")


def _write_shard(shard: _Shard, k: int, specs: Sequence[ModelSpec], dirs: dict[str, Path], todo: dict[str, set[int]]):
    bad = sorted(shard.bad)
    for m, spec in enumerate(specs):
        if k not in todo[spec.name]:
            continue
        (dirs[spec.name] / "assembled.json").unlink(missing_ok=True)  # the matrices are stale from now on
        mat = shard.mats.get(m)
        if mat is None:  # every image of the shard was unreadable
            mat = np.full((shard.size, spec.num_classes or 1), np.nan, dtype=np.float32)
        _atomic_save_npz(
            _shard_path(dirs[spec.name], k),
            logits=mat,
            bad_index=np.array(bad, dtype=np.int64),
            bad_reason=np.array([shard.bad[i] for i in bad], dtype=np.str_),
        )


def _assemble(spec: ModelSpec, d: Path, fp: str, n_shards: int, n: int, arrays: Path) -> ModelArrays:
    from numpy.lib.format import open_memmap

    key = model_key(spec.name)
    lpath, ppath = arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy"
    stamp = d / "assembled.json"
    try:
        done = json.loads(stamp.read_text())
    except (OSError, ValueError):
        done = {}
    if lpath.exists() and ppath.exists() and done.get("fingerprint") == fp:
        return ModelArrays(spec, lpath, ppath, int(done["num_classes"]))
    # Widest shard wins: a shard whose every image was unreadable is all-NaN with a guessed width.
    c = max(int(np.load(_shard_path(d, k))["logits"].shape[1]) for k in range(n_shards))
    tmp_l, tmp_p = lpath.with_suffix(".tmp.npy"), ppath.with_suffix(".tmp.npy")
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    pos = 0
    for k in range(n_shards):
        lg = np.load(_shard_path(d, k))["logits"]
        if lg.shape[1] != c:
            lg = np.full((len(lg), c), np.nan, dtype=np.float32)
        lm[pos : pos + len(lg)] = lg
        pm[pos : pos + len(lg)] = softmax(lg.copy())
        pos += len(lg)
    lm.flush()
    pm.flush()
    del lm, pm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    _atomic_write_text(stamp, json.dumps({"num_classes": c, "fingerprint": fp}))
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
    order = np.fromiter((row[i] for i in ds.image_ids), dtype=np.int64, count=len(ds))
    in_order = bool(np.array_equal(order, np.arange(len(order))))
    n, c = len(order), int(mat.shape[1])
    step = max(1, 2**20 // max(c, 1))  # rows per chunk: memory stays flat whatever N is

    def rows(s: int) -> np.ndarray:
        sel = mat[s : min(n, s + step)] if in_order else mat[order[s : s + step]]
        return np.asarray(sel, dtype=np.float32)

    # Probabilities only: log p gives back p under softmax, which is what every
    # downstream stage needs; the sigmoid evaluation then ranks by p.
    is_prob = all(
        bool(np.all(b >= 0) and np.allclose(b.sum(1), 1.0, atol=1e-3)) for b in (rows(s) for s in range(0, n, step))
    )
    from numpy.lib.format import open_memmap

    key = model_key(spec.name)
    lpath, ppath = arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy"
    arrays.mkdir(parents=True, exist_ok=True)
    tmp_l, tmp_p = lpath.with_suffix(".tmp.npy"), ppath.with_suffix(".tmp.npy")
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    for s in range(0, n, step):
        b = rows(s)
        lg = np.log(np.clip(b, 1e-12, None)) if is_prob else b
        lm[s : s + len(b)] = lg
        pm[s : s + len(b)] = softmax(lg.copy())
    lm.flush()
    pm.flush()
    del lm, pm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    return ModelArrays(spec, lpath, ppath, c)
