"""Backend runners: a built model fed the loader's uint8 batches on torch, OpenVINO or ONNX Runtime.

Backends (``backend=``):

* ``"openvino"``, the CPU default when installed: the PyTorch model is
  exported to ONNX once per run and compiled by OpenVINO in fp32 (on a 2-core
  CPU, 2.5x channels_last PyTorch end to end, identical argmaxes; ``reports/PERF.md``).
* ``"onnxruntime"``: the same ONNX graph on ONNX Runtime's CPU provider.
* ``"torch"``: eager PyTorch, channels_last; the CUDA path (pinned host
  memory, non-blocking copies, normalisation on the GPU).

The torch runner normalises on its device with the same float32 operations as
torchvision's ``ToDtype(scale=True)`` + ``Normalize`` (:func:`normalize`); the
OpenVINO runner does it inside the compiled graph. :func:`forward_batch` is a
pure function of (models, inputs): a distributed engine can call it unchanged.

Features: a runner made with ``features=True`` returns ``(logits, features)``
from one forward pass, the model's penultimate embedding ``(B, D)`` beside its
logits (:func:`with_features`): timm's ``forward_head(pre_logits=True)``, or
for any other model the (globally average-pooled) input of its final
classifier layer. The ONNX graph then has two outputs, ``logits`` and
``features``, both with a dynamic batch axis; every backend runs both in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from audit.errors import ModelError
from audit.zoo import ModelSpec, Preprocess

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "OnnxRuntimeRunner",
    "OpenVINORunner",
    "TorchRunner",
    "check_precision",
    "export_onnx",
    "forward_batch",
    "graph_runner",
    "load_models",
    "make_runner",
    "normalize",
    "resolve_backend",
]

_log = logging.getLogger(__name__)


BACKENDS = ("auto", "openvino", "onnxruntime", "torch")

PRECISIONS = ("fp32", "bf16", "fp16")

_ONNX_OPSET = 17


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


def check_precision(precision: str, backend: str, device: str) -> None:
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
    runner's device; with ``features``, to ``(logits, features (B, D))``.
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
        features: bool = False,
        num_classes: int | None = None,
    ):
        import torch

        if features:
            module = with_features(module, num_classes)
        self.features = features
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
                y = self.module(x)
            return (y[0].float(), y[1].float()) if self.features else y.float()


def _classifier_layer(module: Any, num_classes: int | None) -> Any:
    """The model's final classifier: the last ``Linear`` or 1x1 ``Conv2d`` (with ``num_classes`` outputs when given).

    Why this rule: torchvision's classifiers all end in one (resnet ``fc``,
    efficientnet / mobilenet / convnext ``classifier[-1]``, vgg / alexnet
    ``classifier[6]``, squeezenet's ``Conv2d(512, C, 1)`` before its ReLU and
    pooling), and the modules are registered in the order they run.
    """
    import torch

    found = None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            out = m.out_features
        elif isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1):
            out = m.out_channels
        else:
            continue
        if num_classes is None or out == num_classes:
            found = m
    if found is None:
        raise ModelError(
            f"{type(module).__name__} has no final Linear or 1x1 convolution with {num_classes} outputs to take "
            "features from; score it with features off (--no-features)"
        )
    return found


def with_features(module: Any, num_classes: int | None = None) -> Any:
    """``module`` wrapped so that its forward returns ``(logits, features)`` from the same pass.

    * timm models (``forward_features`` / ``forward_head``): the features are
      ``forward_head(forward_features(x), pre_logits=True)`` and the logits
      ``get_classifier()`` of them, the very operations of timm's own forward.
    * any other model: the input of its final classifier layer
      (:func:`_classifier_layer`), captured by a forward pre-hook and
      globally average-pooled when it is spatial (squeezenet's 512 x 13 x 13);
      the logits are the model's own output, untouched.

    Parameters
    ----------
    module : torch.nn.Module
    num_classes : int, optional
        Picks the classifier among candidate layers by its output width.

    Returns
    -------
    torch.nn.Module
        Its forward maps ``(B, 3, H, W)`` to ``(logits (B, C), features (B, D))``.
    """
    cls = _features_class()
    if isinstance(module, cls):
        return module
    if all(hasattr(module, a) for a in ("forward_features", "forward_head", "get_classifier")):
        return cls(module, None).eval()
    return cls(module, _classifier_layer(module, num_classes)).eval()


@functools.cache
def _features_class() -> type:
    """The wrapper class of :func:`with_features`, made on first use (torch is imported only to run a model)."""
    import torch

    class WithFeatures(torch.nn.Module):
        """``forward(x) -> (logits, features)``; ``layer`` None: a timm model."""

        def __init__(self, model: Any, layer: Any):
            super().__init__()
            self.model = model
            self._layer = [layer]  # in a list: not registered a second time as a submodule

        def forward(self, x: Any) -> tuple[Any, Any]:
            layer = self._layer[0]
            if layer is None:
                f = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                return self.model.get_classifier()(f), f
            seen: list[Any] = []
            # Hooked for this call only: a model wrapped twice (two runners) never feeds a stale wrapper.
            handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            try:
                logits = self.model(x)
            finally:
                handle.remove()
            if not seen:
                raise ModelError(f"{type(self.model).__name__}: its classifier layer did not run; use --no-features")
            f = seen[-1]
            if f.ndim == 4:  # a 1x1-conv classifier on a feature map: its global average pool
                f = f.mean(dim=(2, 3))
            return logits, f.flatten(1)

    return WithFeatures


def export_onnx(module: Any, crop: int, *, features: bool = False, num_classes: int | None = None) -> bytes:
    """The fp32 module as an ONNX graph with a dynamic batch axis.

    Input ``x``; output ``logits``, and with ``features`` a second output
    ``features`` (see :func:`with_features`), both ``(batch, ...)``.
    """
    import torch

    module = module.to("cpu", memory_format=torch.contiguous_format).eval()
    if features:
        module = with_features(module, num_classes).eval()
    outputs = ["logits", "features"] if features else ["logits"]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, crop, crop),),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=outputs,
            dynamic_axes={"x": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
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
        self.features = len(self.compiled.outputs) > 1  # exported with features=True

    def __call__(self, x: Any) -> Any:
        import torch

        ys = [torch.from_numpy(y) for y in self.infer(x.detach().cpu().numpy())]
        return tuple(ys) if self.features else ys[0]

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """A uint8 ``(B, H, W, 3)`` array -> ``[logits]`` or ``[logits, features]``, float32 numpy: what a Ray actor
        calls, without torch (the import alone is seconds of CPU for each actor)."""
        arr = np.ascontiguousarray(x, dtype=np.uint8)
        outs: list[list[np.ndarray]] = [[] for _ in range(2 if self.features else 1)]
        for s in range(0, len(arr), self.chunk):
            res = self.request.infer({0: arr[s : s + self.chunk]})
            for j, o in enumerate(outs):
                o.append(np.array(res[j], dtype=np.float32))  # copied: the request reuses its buffer
        return [np.concatenate(o) if len(o) > 1 else o[0] for o in outs]


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
        self.features = len(self.session.get_outputs()) > 1  # exported with features=True

    def __call__(self, x: Any) -> Any:
        import torch

        arr = normalize(x.cpu(), self.pre, channels_last=False).numpy()
        ys = [torch.from_numpy(y) for y in self.session.run(None, {"x": arr})]
        return (ys[0], ys[1]) if self.features else ys[0]


def make_runner(
    module: Any,
    spec: ModelSpec,
    *,
    backend: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    channels_last: bool = True,
    features: bool = False,
) -> Any:
    """Wrap a built model for :func:`forward_batch` on ``backend`` (resolved as :func:`resolve_backend`).

    The runner takes the loader's uint8 ``(B, H, W, 3)`` batches and applies
    ``spec.preprocess``'s normalisation itself. A model the ONNX exporter
    cannot handle falls back to the torch runner, with a warning. With
    ``features`` the runner returns ``(logits, features)`` (:func:`with_features`).
    """
    pre = spec.preprocess
    if pre is None:
        raise ModelError(f"{spec.name} is imported predictions, not a model to run")
    backend = resolve_backend(backend, device)
    check_precision(precision, backend, device)
    if backend != "torch":
        try:
            onnx = export_onnx(module, pre.crop, features=features, num_classes=spec.num_classes)
        except Exception as e:  # exporter gaps are model-specific; torch still runs it
            _log.warning("%s: ONNX export failed (%s); running it with torch", spec.name, str(e).splitlines()[0])
        else:
            return graph_runner(onnx, spec, backend=backend, precision=precision, threads=threads)
    return TorchRunner(
        module,
        pre,
        device,
        channels_last=channels_last,
        precision=precision,
        features=features,
        num_classes=spec.num_classes,
    )


def graph_runner(
    onnx: bytes, spec: ModelSpec, *, backend: str, precision: str = "fp32", threads: int | None = None
) -> OpenVINORunner | OnnxRuntimeRunner:
    """The runner of ``backend`` (``"openvino"`` or ``"onnxruntime"``) for a graph :func:`export_onnx` made of
    ``spec``'s model: the part of :func:`make_runner` after the export, for a graph exported elsewhere."""
    pre = spec.preprocess
    if pre is None:
        raise ModelError(f"{spec.name} is imported predictions, not a model to run")
    if backend == "openvino":
        runner = OpenVINORunner(onnx, pre, threads=threads, precision=precision)
        if precision != "fp32" and runner.inference_precision == "f32":
            _log.warning(
                "%s: OpenVINO has no %s on this CPU and runs f32; --backend torch gives %s autocast",
                spec.name, precision, precision,
            )  # fmt: skip
        return runner
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(onnx, pre, threads=threads)
    raise ModelError(f"backend {backend!r} does not run an exported graph; use openvino or onnxruntime")


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
    list, length M, of (B, C_m) float32 Tensors on the CPU, or of ``(logits, features (B, D_m))``
    pairs from runners made with ``features=True``
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
            y = model(x)
            out.append(tuple(t.float().cpu() for t in y) if isinstance(y, tuple) else y.float().cpu())
    return out


def load_models(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """Build every model that runs (not imported predictions), failing before any scoring."""
    from audit.zoo import build_model

    return {s.name: build_model(s) for s in specs if s.source != "predictions"}
