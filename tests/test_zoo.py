"""Tests of audit.zoo: names, preprocessing carried by weights, building, offline errors, checkpoints."""

from __future__ import annotations

import math
import os
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torchvision.models import get_model_weights

from audit.errors import ModelError, UserError, WeightsUnavailableError
from audit.zoo import (
    ModelRegistry,
    ModelSpec,
    Preprocess,
    build_model,
    default_registry,
    list_models,
    resolve_model,
    weights_status,
)


def smooth_image(w: int = 300, h: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (w + h)], -1) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def assert_matches_timm_cfg(pre: Preprocess, cfg) -> None:
    size = cfg.input_size[-1]
    assert pre.crop == size
    assert pre.resize == math.floor(size / cfg.crop_pct)
    assert pre.interpolation == cfg.interpolation
    assert pre.mean == pytest.approx(tuple(cfg.mean))
    assert pre.std == pytest.approx(tuple(cfg.std))


# --------------------------------------------------------------------------- the registry


def test_every_registered_model_is_complete_and_installed():
    specs = list(default_registry())
    assert [s.name for s in specs] == [
        "efficientnet_lite0.in1k",
        "efficientnet_lite1.in1k",
        "efficientnet_lite2.in1k",
        "squeezenet1_1.caffe_in1k",
    ]
    for spec in specs:
        pre = spec.preprocess
        assert pre is not None, spec.name
        assert 0 < pre.crop <= pre.resize, spec.name
        assert pre.interpolation in {"bilinear", "bicubic"}, spec.name
        assert len(pre.mean) == len(pre.std) == 3 and all(s > 0 for s in pre.std), spec.name
        assert spec.num_classes == 1000 and spec.label_space == "imagenet-1k", spec.name
        assert spec.loss == "softmax"
        assert weights_status(spec) == "available", spec.name
        assert spec.weights_file and Path(spec.weights_file).is_file(), spec.name
        assert spec.as_dict()["name"] == spec.name
    for spec in specs[:3]:
        # The Lite weights are carried by timm's tf_efficientnet_lite*: its config gives their preprocessing.
        assert spec.arch == "tf_" + spec.name.split(".")[0]
        assert_matches_timm_cfg(spec.preprocess, timm.models.get_pretrained_cfg(spec.arch))
        assert spec.preprocess.mean == spec.preprocess.std == (0.5, 0.5, 0.5)


def test_registry_defaults_and_duplicates():
    reg = default_registry()
    assert reg.get("efficientnet_lite0") is reg.get("efficientnet_lite0.in1k") is not None
    assert resolve_model("efficientnet_lite1") is reg.get("efficientnet_lite1.in1k")
    assert reg.get("nope") is None

    spec = reg.get("efficientnet_lite0")
    own = ModelRegistry()
    own.register(spec, default=True)
    with pytest.raises(ValueError, match="already registered"):
        own.register(spec)
    other = ModelSpec(**{**spec.as_dict(), "name": "efficientnet_lite0.other", "preprocess": spec.preprocess})
    with pytest.raises(ValueError, match="already has default weights"):
        own.register(other, default=True)
    own.register(other)
    assert own.names() == ["efficientnet_lite0.in1k", "efficientnet_lite0.other"]
    assert resolve_model("efficientnet_lite0", registry=own) is spec


def test_list_models_filters_by_pattern():
    lite = list_models("efficientnet_lite*")
    assert [s.name for s in lite] == [s.name for s in default_registry() if s.name.startswith("efficientnet_lite")]
    r18 = [s.name for s in list_models("resnet18.*")]
    assert r18 == ["resnet18.IMAGENET1K_V1"]


# --------------------------------------------------------------------------- resolving names


@pytest.mark.parametrize(
    ("name", "arch", "tag"),
    [
        ("resnet50", "resnet50", None),
        ("resnet50.IMAGENET1K_V1", "resnet50", "IMAGENET1K_V1"),
        ("resnet50.IMAGENET1K_V2", "resnet50", "IMAGENET1K_V2"),
        ("efficientnet_b0", "efficientnet_b0", None),
        (" mobilenet_v3_small ", "mobilenet_v3_small", None),
    ],
)
def test_torchvision_names_carry_the_weights_transforms(name, arch, tag):
    enum = get_model_weights(arch)
    weights = enum.DEFAULT if tag is None else enum[tag]

    spec = resolve_model(name)

    assert spec.name == f"{arch}.{weights.name}"
    assert spec.source == "torchvision" and spec.arch == arch and spec.tag == weights.name
    t = weights.transforms()
    assert spec.preprocess == Preprocess(
        resize=t.resize_size[0],
        crop=t.crop_size[0],
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )
    assert spec.num_classes == len(weights.meta["categories"]) == 1000
    assert spec.label_space == "imagenet-1k"
    assert spec.weights_url == weights.url
    assert spec.weights_file == str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url))


def test_resnet50_default_is_v2():
    assert resolve_model("resnet50").name == "resnet50.IMAGENET1K_V2"
    assert resolve_model("resnet50.DEFAULT").name == "resnet50.IMAGENET1K_V2"
    assert resolve_model("resnet50.IMAGENET1K_V1").preprocess.resize == 256
    assert resolve_model("resnet50").preprocess.resize == 232


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet51", r"unknown model 'resnet51'; run 'audit models'.*'timm:' prefix"),
        ("resnet50.IMAGENET1K_V9", r"'resnet50' has no weights 'IMAGENET1K_V9'; choose one of: IMAGENET1K_V1, IMAGE"),
        ("fcn_resnet50", r"'fcn_resnet50' is a torchvision model but not an image classifier"),
        ("raft_small", r"not an image classifier"),
        ("timm:not_a_model", r"unknown timm model 'not_a_model'"),
        ("timm:mobileone_s0.no_such_tag", r"timm has no weights 'mobileone_s0.no_such_tag'.*mobileone_s0.apple_in1k"),
        ("", r"empty model name"),
        ("   ", r"empty model name"),
    ],
)
def test_bad_names_raise_model_error(name, message):
    with pytest.raises(ModelError, match=message) as info:
        resolve_model(name)
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize("arch", ["legacy_seresnet18", "mobilenetv1_100", "mobileone_s0", "repvgg_a0"])
def test_timm_names_carry_the_pretrained_config(arch):
    cfg = timm.models.get_pretrained_cfg(arch)

    spec = resolve_model(f"timm:{arch}")

    assert spec.name == f"timm:{arch}.{cfg.tag}"
    assert spec.source == "timm" and spec.arch == arch and spec.tag == cfg.tag
    assert spec.num_classes == cfg.num_classes == 1000
    assert spec.label_space == "imagenet-1k" and spec.loss == "softmax"
    assert_matches_timm_cfg(spec.preprocess, cfg)
    assert resolve_model(spec.name) == spec  # the canonical name resolves to itself
    if cfg.hf_hub_id:
        assert spec.weights_url == f"https://huggingface.co/{cfg.hf_hub_id}"
    else:
        assert spec.weights_url == cfg.url
        assert spec.weights_file.endswith(os.path.basename(cfg.url))


def test_timm_explicit_tag():
    spec = resolve_model("timm:resnet50.a1_in1k")
    assert spec.name == "timm:resnet50.a1_in1k" and spec.tag == "a1_in1k"
    assert spec.loss in {"softmax", "sigmoid"}
    assert_matches_timm_cfg(spec.preprocess, timm.models.get_pretrained_cfg("resnet50.a1_in1k"))


def test_prediction_names(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(f"preds:{tmp_path / 'missing.npy'}")
    npy = tmp_path / "mine.npy"
    np.save(npy, np.zeros((2, 1000), dtype=np.float32))
    spec = resolve_model(f"preds:{npy}")  # no mine.ids.txt yet: that is checked when the file is read
    assert spec.source == "predictions" and spec.name == "preds:mine" and spec.preprocess is None
    assert spec.weights_file == str(npy.resolve())
    with pytest.raises(ModelError, match="not a model to build"):
        build_model(spec)
    csv = tmp_path / "mine.csv"
    csv.write_text("image,label\n")
    with pytest.raises(ModelError, match=r"must be \.npy"):
        resolve_model(f"preds:{csv}")


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "efficientnet_lite0", "timm:mobilenetv1_100"])
def test_transform_shape_dtype_and_mid_grey(name):
    pre = resolve_model(name).preprocess
    tf = pre.transform()

    out = tf(smooth_image(300, 200))
    assert out.shape == (3, pre.crop, pre.crop) and out.dtype == torch.float32
    assert tf(smooth_image(90, 130)).shape == (3, pre.crop, pre.crop)  # smaller than the crop: upscaled

    grey = tf(Image.new("RGB", (320, 240), (128, 128, 128)))
    want = (128 / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert torch.allclose(grey, want[:, None, None].expand_as(grey), atol=1e-3)


def test_transform_matches_torchvision_weights_transforms():
    img = smooth_image()
    ours = resolve_model("resnet50").preprocess.transform()(img)
    theirs = get_model_weights("resnet50").DEFAULT.transforms()(img)
    assert torch.allclose(ours, theirs, atol=1e-3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "timm:mobileone_s0"])
def test_transform_matches_timm_eval_transform(name):
    spec = resolve_model(name)
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    theirs = timm.data.create_transform(
        input_size=cfg.input_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        is_training=False,
    )
    img = smooth_image(260, 333, seed=1)
    assert torch.allclose(spec.preprocess.transform()(img), theirs(img), atol=1e-5)


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenet_v3_small",
        "squeezenet1_1",
        "squeezenet1_1.IMAGENET1K_V1",
        "timm:mobileone_s0",
        "timm:repvgg_a0",
    ],
)
def test_build_without_weights_maps_a_batch_to_1000_logits(name):
    spec = resolve_model(name)
    torch.manual_seed(0)
    model = build_model(spec, pretrained=False)
    assert isinstance(model, torch.nn.Module)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        out = model(torch.randn(2, 3, spec.preprocess.crop, spec.preprocess.crop))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["mobileone_s0", "repvgg_a0"])
def test_timm_multibranch_models_are_reparameterised(arch):
    torch.manual_seed(0)
    model = build_model(resolve_model(f"timm:{arch}"), pretrained=False)
    torch.manual_seed(0)
    branched = timm.create_model(arch, pretrained=False).eval()  # same init, not reparameterised

    blocks = [m for m in model.modules() if hasattr(m, "reparameterize")]
    assert blocks, "no reparameterisable blocks found"
    for b in blocks:
        assert isinstance(getattr(b, "reparam_conv", None), torch.nn.Conv2d), type(b).__name__
        assert getattr(b, "conv_kxk", None) is None and getattr(b, "identity", None) is None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # folded into the convs
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in branched.modules())

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), branched(x), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- offline behaviour


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached weights and no network: every download raises URLError, every DNS lookup fails."""
    import huggingface_hub.constants
    import timm.models._hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    attempts: list[str] = []

    def refuse(*args, **kwargs):  # download_url_to_file(url, dst, ...) and hf_hub_download(repo_id=..., ...)
        attempts.append(str(args[0] if args else kwargs.get("repo_id")))
        raise urllib.error.URLError("network is unreachable (test)")

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: no DNS in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return attempts


def test_torchvision_weights_missing_offline(offline, tmp_path):
    spec = resolve_model("resnet18")
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(spec.weights_url)
    assert spec.weights_file == str(ckpt)
    assert weights_status(spec) == "missing"

    with pytest.raises(WeightsUnavailableError) as info:
        build_model(spec, pretrained=True)

    msg = str(info.value)
    assert offline == [spec.weights_url]  # it did try the download
    assert ckpt.name in msg and str(ckpt.parent) in msg
    assert spec.weights_url in msg and "resnet18@FILE.pth" in msg
    assert "URLError" in msg
    assert isinstance(info.value, ModelError)


@pytest.mark.parametrize("arch", ["mobileone_s0", "legacy_seresnet18"])
def test_timm_weights_missing_without_dns(offline, arch):
    spec = resolve_model(f"timm:{arch}")
    assert weights_status(spec) == "missing"

    with pytest.raises(WeightsUnavailableError) as info:
        build_model(spec, pretrained=True)

    msg = str(info.value)
    assert offline == []  # gave up at once, without trying the download
    assert spec.weights_file in msg and spec.weights_url in msg
    assert f"timm:{arch}@FILE.pth" in msg
    assert "download host unreachable" in msg


@pytest.mark.parametrize("arch", ["mobileone_s0", "legacy_seresnet18"])
def test_timm_weights_download_fails(offline, monkeypatch, arch):
    resolved = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: resolved)
    spec = resolve_model(f"timm:{arch}")

    with pytest.raises(WeightsUnavailableError) as info:
        build_model(spec, pretrained=True)

    assert offline and all(a in spec.weights_url for a in offline)  # the download was tried, and failed
    msg = str(info.value)
    assert spec.weights_file in msg and f"timm:{arch}@FILE.pth" in msg


# --------------------------------------------------------------------------- local checkpoints


@pytest.fixture(scope="module")
def resnet18_10(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("ckpt") / "r18-10.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_checkpoint_loads(resnet18_10):
    original, path = resnet18_10
    spec = resolve_model(f"resnet18@{path}")
    assert spec.source == "checkpoint" and spec.library == "torchvision" and spec.arch == "resnet18"
    assert spec.num_classes == 10 and spec.label_space == "custom" and spec.tag is None
    assert spec.weights_file == str(path.resolve())
    assert spec.preprocess == resolve_model("resnet18").preprocess

    model = build_model(spec)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert not model.training


def test_wrapped_state_dicts_are_unwrapped(resnet18_10, tmp_path):
    original, _ = resnet18_10
    for key in ("state_dict", "model"):
        path = tmp_path / f"{key}.pth"
        torch.save({key: original.state_dict(), "epoch": 3}, path)
        model = build_model(resolve_model(f"resnet18@{path}"))
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), original(x))


def test_timm_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    original = timm.create_model("mobilenetv1_100", pretrained=False, num_classes=5).eval()
    path = tmp_path / "mnv1-5.pth"
    torch.save(original.state_dict(), path)

    spec = resolve_model(f"timm:mobilenetv1_100@{path}")
    assert spec.library == "timm" and spec.num_classes == 5
    model = build_model(spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-6)


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.bias": NotATensor()}, path)
    with pytest.raises(ModelError, match=r"cannot load checkpoint .*evil\.pth as a plain state dict"):
        resolve_model(f"resnet18@{path}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot load checkpoint"),
        (b"hello world" * 10, "cannot load checkpoint"),
        (b"PK\x03\x04 truncated zip", "cannot load checkpoint"),
    ],
)
def test_corrupt_checkpoints_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        resolve_model(f"resnet18@{path}")


def test_non_state_dict_checkpoints_are_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ModelError, match="holds a list, expected a state dict"):
        resolve_model(f"resnet18@{path}")
    path = tmp_path / "nobias.pth"
    torch.save({"w": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match="no classifier bias"):
        resolve_model(f"resnet18@{path}")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(f"resnet18@{tmp_path / 'missing.pth'}")
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        resolve_model(f"nope@{path}")


def test_state_dict_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), path)
    spec = resolve_model(f"resnet18@{path}")
    with pytest.raises(ModelError, match="does not fit resnet18") as info:
        build_model(spec)
    assert len(str(info.value)) < 600  # one readable line, not every missing key


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_lite0_predicts_real_images(shared_dir):
    from audit.datasets import decode_image, load_dataset

    root = shared_dir / "datasets" / "imagenet-val-1300"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ds = load_dataset(root)
    spec = resolve_model("efficientnet_lite0")
    model = build_model(spec)
    tf = spec.preprocess.transform()
    x = torch.stack([tf(decode_image(ds.path(i))) for i in range(5)])
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 1000)
    hits = (logits.argmax(1).numpy() == ds.labels[:5]).sum()
    assert hits >= 4, (logits.argmax(1).tolist(), ds.labels[:5].tolist())
