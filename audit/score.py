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
   one probability matrix per model (``.npy``, memory-mappable); memory does
   not grow with N. Their SHA-256 sums are taken while they are written and
   checked before they are reused (about 0.2 s per 200 MB matrix, i.e. 50,000
   x 1,000 float32); matrices that fail are rebuilt from the shards.

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
from audit.errors import ModelError, StoreError
from audit.zoo import ModelSpec, Preprocess

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "ModelArrays",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "TorchRunner",
    "bad_images",
    "check_predictions",
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
# 3: per-image stamps and SHA-256 sums in every shard.
_SHARD_FORMAT = 3
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
    bad: Mapping[int, str] = field(default_factory=dict)  # images that could not be read: index -> reason


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
#
# A shard holds one model's logits for ``shard_size`` consecutive images, the
# ``(size, mtime_ns)`` stamp each image had when it was read, the images that
# could not be read, and two SHA-256 sums (of the logits, and of the rest). A
# cached shard is used only when its sums verify; a row is reused only while its
# image keeps its stamp. The assembled ``(N, C)`` matrices carry SHA-256 sums
# too, taken while they are written and checked before they are reused, so a
# bit flipped or a row moved on disk is rebuilt or rescored, never trusted.

_META = ("stamps", "bad_index", "bad_reason")


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not "*.npz": a file left half-written by a kill must never look like a shard.
    with atomic_file(path, prefix=".", suffix=".npz.tmp") as f:
        np.savez(f, **arrays)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode(), prefix=".", suffix=".tmp")


def _digest(**arrays: np.ndarray) -> str:
    """SHA-256 of named arrays: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fingerprint(ds: AuditDataset, spec: ModelSpec, shard_size: int, backend: str, precision: str) -> str:
    """What the cached shards of ``spec`` depend on: the weights' content (not their path), settings, image ids.

    The images' content is not in it: each shard row carries its image's stamp,
    so a changed image costs its batch, not every shard.
    """
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
    except (OSError, ValueError, KeyError, TypeError):
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


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}".strip().rstrip(":")


@dataclass
class _Cached:
    """A cached shard's verified stamps and unreadable images, and the sum its logits must match."""

    stamps: np.ndarray  # (size, 2) int64
    bad: dict[int, str]  # image index -> reason
    sum_logits: str


def _read_meta(path: Path, size: int) -> _Cached | str | None:
    """The shard's stamps and bad images, verified; None when it is missing; else why it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {k: z[k] for k in _META}
            sum_meta, sum_logits = str(z["sum_meta"]), str(z["sum_logits"])
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated or garbage bytes raise BadZipFile, ValueError, EOFError, KeyError, OSError...
        return _why(e)
    if _digest(**meta) != sum_meta:
        return "checksum mismatch"
    if meta["stamps"].shape != (size, 2) or meta["bad_index"].shape != meta["bad_reason"].shape:
        return "wrong shape"
    bad = dict(zip(meta["bad_index"].tolist(), meta["bad_reason"].tolist(), strict=True))
    return _Cached(meta["stamps"], bad, sum_logits)


def _read_logits(path: Path, size: int, sum_logits: str) -> np.ndarray | str:
    """A cached shard's ``(size, C)`` logits, verified against their sum; else why they cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            lg = z["logits"]
    except Exception as e:  # as in _read_meta: any damage, one reason
        return _why(e)
    if lg.dtype != np.float32 or lg.ndim != 2 or len(lg) != size:
        return "wrong shape"
    if _digest(logits=lg) != sum_logits:
        return "checksum mismatch"
    return lg


def _save_shard(path: Path, logits: np.ndarray, bad: Mapping[int, str], stamps: np.ndarray) -> str:
    """Write one shard atomically; return the sum of its logits."""
    idx = sorted(bad)
    meta = {
        "stamps": np.ascontiguousarray(stamps, dtype=np.int64),
        "bad_index": np.array(idx, dtype=np.int64),
        "bad_reason": np.array([bad[i] for i in idx], dtype=np.str_),
    }
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    sum_logits = _digest(logits=logits)
    _atomic_save_npz(
        path, logits=logits, **meta, sum_meta=np.array(_digest(**meta)), sum_logits=np.array(sum_logits)
    )
    return sum_logits


def _npy_sum(path: Path, shape: tuple[int, int]) -> str | None:
    """SHA-256 of a float32 ``.npy`` matrix's data, streamed; None when it is not that matrix."""
    try:
        m = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # any damage to the header: not the matrix we wrote
        return None
    if m.shape != shape or m.dtype != np.float32 or not m.flags.c_contiguous:
        return None
    h = hashlib.sha256()
    step = max(1, 2**24 // max(1, 4 * shape[1]))  # 16 MiB at a time: memory stays flat
    for s in range(0, shape[0], step):
        h.update(m[s : s + step])
    return h.hexdigest()


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
    # Imported predictions are checked before any image is scored: a NaN found after hours of scoring helps no one.
    imported = {s.name: _read_predictions(ds, s) for s in specs if s.source == "predictions"}
    run_specs = [s for s in specs if s.source != "predictions"]
    fps = {s.name: _fingerprint(ds, s, shard_size, backend, precision) for s in run_specs}
    dirs = {s.name: _shard_dir(arrays, s, fps[s.name]) for s in run_specs}
    stamps = ds.file_stamps() if run_specs else np.empty((n, 2), dtype=np.int64)
    changed: set[int] = set()
    plans = {
        s.name: _plan(s, dirs[s.name], fps[s.name], stamps, shard_size, batch_size, arrays, changed) for s in run_specs
    }
    if changed:
        first = ds.image_ids[min(changed)]
        _log.warning("%d image(s) changed since they were scored (e.g. %r); rescoring them", len(changed), first)
    needed = sorted({b for p in plans.values() for starts in p.todo.values() for b in starts})
    if needed:
        # Build only what still has work: a resumed run skips finished models.
        active = [s for s in run_specs if plans[s.name].todo]
        t = time.perf_counter()
        built = models if models is not None else load_models(active)
        st.build += time.perf_counter() - t
        _score_shards(
            ds, active, built, dirs, plans, needed, stamps, shard_size, batch_size, workers, device, channels_last,
            backend, precision, threads, progress, st,
        )  # fmt: skip
    t = time.perf_counter()
    out = []
    for s in specs:
        if s.source == "predictions":
            out.append(_import_predictions(s, imported[s.name], arrays))
        else:
            reuse = plans[s.name].reuse
            out.append(reuse if reuse is not None else _assemble(s, dirs[s.name], fps[s.name], shard_size, n, arrays))
    st.assemble += time.perf_counter() - t
    st.total += time.perf_counter() - t_start
    return out


@dataclass
class _Plan:
    """One model's work: batch starts to score per shard, the shards that keep some cached rows, or a reuse."""

    todo: dict[int, set[int]] = field(default_factory=dict)
    partial: set[int] = field(default_factory=set)
    reuse: ModelArrays | None = None


def _bounds(k: int, shard_size: int, n: int) -> tuple[int, int]:
    return k * shard_size, min(n, (k + 1) * shard_size)


def _plan(
    spec: ModelSpec,
    d: Path,
    fp: str,
    stamps: np.ndarray,
    shard_size: int,
    batch_size: int,
    arrays: Path,
    changed: set[int],
) -> _Plan:
    """Which batches of ``spec`` need scoring: missing or damaged shards, and the batches of changed images."""
    n = len(stamps)
    plan = _Plan()
    cached: dict[int, _Cached] = {}
    damaged: list[tuple[int, str]] = []
    every: dict[int, set[int]] = {}
    for k in range((n + shard_size - 1) // shard_size):
        lo, hi = _bounds(k, shard_size, n)
        every[k] = set(range(lo, hi, batch_size))
        c = _read_meta(_shard_path(d, k), hi - lo)
        if c is None or isinstance(c, str):
            if c is not None:
                damaged.append((k, c))
            plan.todo[k] = every[k]
            continue
        cached[k] = c
        rows = (np.flatnonzero((c.stamps != stamps[lo:hi]).any(axis=1)) + lo).tolist()
        if rows:
            changed.update(rows)
            # The whole batch: its other images are scored beside it again, exactly as a fresh run would.
            plan.todo[k] = {lo + (r - lo) // batch_size * batch_size for r in rows}
    if not plan.todo:
        plan.reuse = _reuse(spec, d, fp, [cached[k] for k in sorted(cached)], n, arrays)
        if plan.reuse is not None:
            return plan
    # The matrices will be assembled: every cached shard kept must be intact, its logits included.
    for k, c in cached.items():
        if plan.todo.get(k) == every[k]:
            continue
        lo, hi = _bounds(k, shard_size, n)
        lg = _read_logits(_shard_path(d, k), hi - lo, c.sum_logits)
        if isinstance(lg, str):
            damaged.append((k, lg))
            plan.todo[k] = every[k]
        elif k in plan.todo:
            plan.partial.add(k)
    if damaged:
        k, why = min(damaged)
        size = sum(len(range(*_bounds(j, shard_size, n))) for j, _ in damaged)
        _log.warning(
            "%s: %d cached shard(s) are damaged (%s: %s); rescoring their %d image(s)",
            spec.name, len(damaged), _shard_path(d, k).name, why, size,
        )  # fmt: skip
    return plan


def _array_paths(spec: ModelSpec, arrays: Path) -> tuple[Path, Path]:
    key = model_key(spec.name)
    return arrays / f"{key}.logits.npy", arrays / f"{key}.probs.npy"


def _reuse(spec: ModelSpec, d: Path, fp: str, cached: list[_Cached], n: int, arrays: Path) -> ModelArrays | None:
    """The assembled matrices, when they were built from exactly these shards and their checksums verify."""
    lpath, ppath = _array_paths(spec, arrays)
    try:
        done = json.loads((d / "assembled.json").read_text())
        c = int(done["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if done.get("fingerprint") != fp or done.get("shards") != [x.sum_logits for x in cached]:
        return None
    if not (lpath.exists() and ppath.exists()):
        return None
    if _npy_sum(lpath, (n, c)) != done.get("logits_sha256") or _npy_sum(ppath, (n, c)) != done.get("probs_sha256"):
        _log.warning(
            "%s: its cached logits or probabilities in %s fail their checksum; rebuilding them from its shards",
            spec.name, arrays,
        )  # fmt: skip
        return None
    bad: dict[int, str] = {}
    for x in cached:
        bad.update(x.bad)
    return ModelArrays(spec, lpath, ppath, c, bad)


@dataclass
class _Shard:
    size: int
    left: int  # batches of this shard still to come
    mats: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size, C) logits
    scored: dict[int, np.ndarray] = field(default_factory=dict)  # model position -> (size,) rows scored now
    bad: dict[int, str] = field(default_factory=dict)


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
) -> None:
    import torch

    n = len(ds)
    pres = [s.preprocess for s in specs]
    assert all(p is not None for p in pres)
    want = set(needed)
    batches = [
        b for b in _shard_batches(sorted({s // shard_size for s in want}), n, shard_size, batch_size) if b[0] in want
    ]
    per_shard: dict[int, int] = {}
    for b in batches:
        per_shard[b[0] // shard_size] = per_shard.get(b[0] // shard_size, 0) + 1
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
            first = int(batch["first"])
            k = first // shard_size
            start, stop = _bounds(k, shard_size, n)
            shard = pending.setdefault(k, _Shard(size=stop - start, left=per_shard[k]))
            rows = batch["index"] - start
            count = len(rows) + len(batch["bad"])
            for m, spec in enumerate(specs):
                if first not in plans[spec.name].todo.get(k, ()):
                    continue  # cached and valid for this model; the batch is shared with models that need it
                shard.scored.setdefault(m, np.zeros(shard.size, dtype=bool))[first - start : first - start + count] = (
                    True
                )
                if not len(rows):
                    continue
                t = time.perf_counter()
                (y,) = forward_batch([runners[m]], [batch["inputs"][m]])
                st.forward[spec.name] = st.forward.get(spec.name, 0.0) + time.perf_counter() - t
                mat = shard.mats.get(m)
                if mat is None:
                    mat = shard.mats[m] = np.full((shard.size, y.shape[1]), np.nan, dtype=np.float32)
                mat[rows] = y.numpy()
            shard.bad.update(batch["bad"])
            shard.left -= 1
            st.images += count
            st.batches += 1
            bar.update(count)
            if shard.left == 0:
                t = time.perf_counter()
                _write_shard(pending.pop(k), k, start, specs, dirs, plans, stamps)
                st.write += time.perf_counter() - t
    finally:
        bar.close()
        del it
    if pending:
        raise RuntimeError(f"scoring ended with unfinished shards {sorted(pending)}")


def _write_shard(
    shard: _Shard,
    k: int,
    start: int,
    specs: Sequence[ModelSpec],
    dirs: dict[str, Path],
    plans: dict[str, _Plan],
    stamps: np.ndarray,
) -> None:
    for m, spec in enumerate(specs):
        scored = shard.scored.get(m)
        if scored is None:
            continue
        d = dirs[spec.name]
        path = _shard_path(d, k)
        (d / "assembled.json").unlink(missing_ok=True)  # the matrices are stale from now on
        mat = shard.mats.get(m)
        bad = {i: r for i, r in shard.bad.items() if scored[i - start]}
        if k in plans[spec.name].partial:
            # Rows of batches left alone keep their cached logits and their cached verdict.
            cached = _read_meta(path, shard.size)
            lg = _read_logits(path, shard.size, cached.sum_logits) if isinstance(cached, _Cached) else cached
            if not isinstance(lg, np.ndarray):
                raise StoreError(f"{path} changed on disk during this run ({lg}); run the same command again")
            if mat is None:
                mat = np.full(lg.shape, np.nan, dtype=np.float32)
            keep = ~scored
            mat[keep] = lg[keep]
            bad.update({i: r for i, r in cached.bad.items() if keep[i - start]})  # type: ignore[union-attr]
        if mat is None:  # every image scored was unreadable
            mat = np.full((shard.size, spec.num_classes or 1), np.nan, dtype=np.float32)
        _save_shard(path, mat, bad, stamps[start : start + shard.size])


def _assemble(spec: ModelSpec, d: Path, fp: str, shard_size: int, n: int, arrays: Path) -> ModelArrays:
    """Stream the verified shards into the ``(N, C)`` logits and probabilities, summing them as they are written."""
    from numpy.lib.format import open_memmap

    lpath, ppath = _array_paths(spec, arrays)
    n_shards = (n + shard_size - 1) // shard_size

    def load(k: int) -> tuple[_Cached, np.ndarray]:
        path = _shard_path(d, k)
        cached = _read_meta(path, len(range(*_bounds(k, shard_size, n))))
        lg = _read_logits(path, len(range(*_bounds(k, shard_size, n))), cached.sum_logits) if isinstance(
            cached, _Cached
        ) else (cached or "missing")
        if not isinstance(lg, np.ndarray):
            raise StoreError(f"{path} changed on disk during this run ({lg}); run the same command again")
        return cached, lg  # type: ignore[return-value]

    # Every shard has the model's width; one whose every image was unreadable may carry a guessed one.
    c = spec.num_classes or max(load(k)[1].shape[1] for k in range(n_shards))
    tmp_l, tmp_p = lpath.with_suffix(".tmp.npy"), ppath.with_suffix(".tmp.npy")
    lm = open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, c))
    pm = open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, c))
    hl, hp = hashlib.sha256(), hashlib.sha256()
    sums: list[str] = []
    bad: dict[int, str] = {}
    for k in range(n_shards):
        cached, lg = load(k)
        lo, hi = _bounds(k, shard_size, n)
        if lg.shape[1] != c:
            if not np.isnan(lg).all():
                raise StoreError(f"{_shard_path(d, k)} has {lg.shape[1]} classes, expected {c}; delete {d} to rescore")
            lg = np.full((hi - lo, c), np.nan, dtype=np.float32)
        p = softmax(lg.copy())
        lm[lo:hi] = lg
        pm[lo:hi] = p
        hl.update(np.ascontiguousarray(lg))
        hp.update(np.ascontiguousarray(p))
        sums.append(cached.sum_logits)
        bad.update(cached.bad)
    lm.flush()
    pm.flush()
    del lm, pm
    os.replace(tmp_l, lpath)
    os.replace(tmp_p, ppath)
    record = {
        "num_classes": c,
        "fingerprint": fp,
        "shards": sums,
        "logits_sha256": hl.hexdigest(),
        "probs_sha256": hp.hexdigest(),
    }
    _atomic_write_text(d / "assembled.json", json.dumps(record))
    return ModelArrays(spec, lpath, ppath, c, bad)


def bad_images(arrays: Path, spec: ModelSpec) -> dict[int, str]:
    """Images a model's intact shards recorded as unreadable: index -> reason (also ``ModelArrays.bad``)."""
    d = arrays / "shards" / model_key(spec.name)
    out: dict[int, str] = {}
    for f in sorted(d.glob("*.npz")):
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = {k: z[k] for k in _META}
                ok = _digest(**meta) == str(z["sum_meta"])
        except Exception:  # a damaged shard is rescored by the next run; it vouches for nothing
            continue
        if ok:
            out.update(zip(meta["bad_index"].tolist(), meta["bad_reason"].tolist(), strict=True))
    return out


# --------------------------------------------------------------------------- imported predictions


@dataclass
class _Preds:
    """A validated prediction file: its matrix, the row of each dataset image, and what the values are."""

    path: Path
    mat: Any  # (rows, C) floating array or memory map
    order: np.ndarray  # (N,) int64
    is_prob: bool

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


def _load_matrix(path: Path) -> tuple[Any, list[Any], bool | None]:
    """The raw matrix, the ids and whether the file says it holds probabilities (None: to be inferred)."""
    if path.suffix == ".npy":
        try:
            mat = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # a truncated header, an object array, not a .npy at all
            raise ModelError(f"cannot read {path} as a .npy matrix ({_why(e)}); save it with numpy.save") from e
        return mat, _read_ids(path, path.with_suffix(".ids.txt")), None
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
    values = table.column(col).combine_chunks()
    t = values.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ModelError(f"{path}: column {col!r} must hold one list of class scores per image (has {t})")
    flat = values.flatten()
    lengths = set(pa.compute.list_value_length(values).to_pylist()) if len(values) else set()
    if values.null_count or flat.null_count or len(lengths) > 1:
        raise ModelError(f"{path}: column {col!r} has nulls or rows of different lengths; give every image C scores")
    if not pa.types.is_floating(flat.type):
        raise ModelError(f"{path}: column {col!r} holds {flat.type}, expected floating-point logits or probabilities")
    c = lengths.pop() if lengths else 0
    mat = flat.to_numpy(zero_copy_only=False).reshape(len(values), c)
    return mat, image.to_pylist(), col == "probs"


def _read_predictions(ds: AuditDataset, spec: ModelSpec) -> _Preds:
    """Read and check a ``preds:`` file against ``ds``; every fault is a :class:`ModelError` naming the fix."""
    path = Path(spec.weights_file or "")
    mat, ids, declared = _load_matrix(path)
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
    pr = _Preds(path, mat, order, bool(declared))
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


def _import_predictions(spec: ModelSpec, pr: _Preds, arrays: Path) -> ModelArrays:
    from numpy.lib.format import open_memmap

    n, c = len(pr.order), pr.num_classes
    lpath, ppath = _array_paths(spec, arrays)
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
    return ModelArrays(spec, lpath, ppath, c)
