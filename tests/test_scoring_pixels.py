"""Pixel statistics: measured inside the one decode pass, equal to CleanVision's, cached and resumed like logits."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder, make_predictions
from PIL import Image

import audit.scoring as scoring
import audit.scoring.loader as loader
from audit.datasets import decode_image, load_dataset
from audit.scoring import ScoreStats, load_pixel_stats, score_dataset
from audit.scoring.pixels import COLUMNS, PIXELS_DIR, image_stats
from audit.zoo import resolve_model

# Decode only (no model): 20 images, shards of 8, batches of 4.
KW = {"batch_size": 4, "workers": 0, "shard_size": 8, "progress": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pth")


@pytest.fixture
def small(tmp_path):
    return load_dataset(make_imagefolder(tmp_path / "ds", per_class=5, size=(40, 30)))


def _pixel_shards(arrays: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((arrays / PIXELS_DIR).glob("*.npz"))}


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) == set(COLUMNS)
    for k in COLUMNS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------------- the values


def _cleanvision(img) -> dict:
    from cleanvision.issue_managers.image_property import (
        AspectRatioProperty,
        BlurrinessProperty,
        BrightnessProperty,
        EntropyProperty,
        SizeProperty,
    )

    out = {}
    props = (BrightnessProperty("dark"), AspectRatioProperty(), SizeProperty(), EntropyProperty(), BlurrinessProperty())
    for p in props:
        out.update(p.calculate(img))
    return out


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (37, 23), (300, 200)])
def test_image_stats_are_cleanvisions_values(size):
    import hashlib

    import imagehash

    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got, want = image_stats(img), _cleanvision(img)
    for k in ("brightness", "aspect_ratio", "size", "entropy", "blurriness", "blurriness_grayscale_std"):
        assert got[k] == want[k], k
    for p in (5, 99):  # percentiles by partition instead of a float sort: the same to float64 rounding
        np.testing.assert_allclose(got[f"brightness_perc_{p}"], want[f"brightness_perc_{p}"], rtol=1e-13, atol=1e-15)
    assert (got["width"], got["height"], got["ok"], got["grayscale"]) == (*size, True, False)
    assert f"{got['phash']:016x}" == str(imagehash.phash(img)) and f"{got['dhash']:016x}" == str(imagehash.dhash(img))
    arr = np.asarray(img)
    assert got["md5"] == hashlib.md5(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()


def test_brightness_percentiles_at_the_extremes_and_on_real_photos(shared_dir):
    from cleanvision.issue_managers.image_property import calc_percentile_brightness

    imgs = [Image.new("RGB", (5, 4), c) for c in ((0, 0, 0), (255, 255, 255), (255, 0, 0))]
    imgs += [decode_image(p) for p in sorted((shared_dir / "datasets" / "imagenet-val-1300").rglob("*.JPEG"))[:5]]
    for img in imgs:
        got = image_stats(img)
        want = calc_percentile_brightness(img, [5, 99])
        np.testing.assert_allclose([got["brightness_perc_5"], got["brightness_perc_99"]], want, rtol=1e-13, atol=1e-15)


def test_a_grey_image_is_measured_as_cleanvision_measures_a_grey_file():
    from cleanvision.issue_managers.image_property import EntropyProperty

    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8))  # mode "L"
    got = image_stats(grey.convert("RGB"))  # decode_image hands every image on as RGB
    assert got["grayscale"] is True
    assert got["entropy"] == EntropyProperty().calculate(grey)["entropy"]
    assert image_stats(Image.new("RGB", (4, 4), (10, 10, 11)))["grayscale"] is False


def test_two_constant_images_of_other_shapes_are_not_one_image():
    a, b = image_stats(Image.new("RGB", (10, 20))), image_stats(Image.new("RGB", (20, 10)))
    assert a["md5"] != b["md5"]  # the same bytes; CleanVision's pixel md5 alone would call them one image
    assert image_stats(Image.new("RGB", (10, 20)))["md5"] == a["md5"]


# --------------------------------------------------------------------------- the decode pass


def test_models_and_pixels_share_one_decode_of_each_image(tmp_path, small, monkeypatch, checkpoint):
    calls: list[Path] = []
    real = loader.decode_image
    monkeypatch.setattr(loader, "decode_image", lambda p: calls.append(p) or real(p))
    spec = resolve_model(checkpoint)
    st = ScoreStats()
    (a,) = score_dataset(small, [spec], tmp_path / "arr", backend="torch", stats=st, **KW)
    assert sorted(calls) == sorted(small.root / i for i in small.image_ids), "each image decoded once, for both"
    assert st.pixel_images == len(small) and st.pixels > 0
    px = load_pixel_stats(small, tmp_path / "arr")
    assert px is not None and px["ok"].all()
    for i in (0, 7, 19):
        want = image_stats(decode_image(small.path(i)))
        assert {k: px[k][i].item() for k in COLUMNS} == want
    assert np.isfinite(np.load(a.logits)).all()
    _equal(load_pixel_stats(small, [a]), px)  # the folder found from what score_dataset returned
    assert load_pixel_stats(small, []) is None


def test_models_cached_and_pixels_missing_decodes_for_the_pixels_alone(tmp_path, small, monkeypatch, checkpoint):
    spec = resolve_model(checkpoint)
    (a,) = score_dataset(small, [spec], tmp_path / "arr", backend="torch", pixels=False, **KW)
    assert load_pixel_stats(small, tmp_path / "arr") is None and not (tmp_path / "arr" / PIXELS_DIR).exists()
    logits = Path(a.logits).read_bytes()
    crops = []
    real = loader.resize_crop
    monkeypatch.setattr(loader, "resize_crop", lambda img, p: crops.append(1) or real(img, p))
    st = ScoreStats()
    score_dataset(small, [spec], tmp_path / "arr", backend="torch", stats=st, **KW)
    assert st.forward == {} and st.build == 0 and not crops, "no model built, run or fed"
    assert st.pixel_images == len(small)
    assert Path(a.logits).read_bytes() == logits
    assert load_pixel_stats(small, tmp_path / "arr") is not None
    st = ScoreStats()
    score_dataset(small, [spec], tmp_path / "arr", backend="torch", stats=st, **KW)
    assert st.images == 0, "all cached: nothing loaded"


def test_a_run_on_prediction_files_reads_no_image_unless_pixels_are_asked_for(tmp_path, small, monkeypatch):
    spec = resolve_model(f"preds:{make_predictions(tmp_path / 'p.npy', list(small.image_ids), small.labels)}")
    calls = []
    real = loader.decode_image
    monkeypatch.setattr(loader, "decode_image", lambda p: calls.append(p) or real(p))
    st = ScoreStats()
    score_dataset(small, [spec], tmp_path / "arr", stats=st, **KW)
    assert not calls and st.images == 0 and load_pixel_stats(small, tmp_path / "arr") is None
    score_dataset(small, [spec], tmp_path / "arr", stats=st, pixels=True, **KW)
    assert len(calls) == len(small) and st.pixel_images == len(small)
    assert load_pixel_stats(small, tmp_path / "arr") is not None


def test_workers_measure_the_same_values(tmp_path, small):
    score_dataset(small, [], tmp_path / "w0", **KW)
    score_dataset(small, [], tmp_path / "w2", **{**KW, "workers": 2})
    _equal(load_pixel_stats(small, tmp_path / "w0"), load_pixel_stats(small, tmp_path / "w2"))


# --------------------------------------------------------------------------- resume and cache


def test_an_interrupted_run_resumes_to_the_same_stats_measuring_nothing_twice(tmp_path, small, monkeypatch):
    score_dataset(small, [], tmp_path / "ref", **KW)
    want = load_pixel_stats(small, tmp_path / "ref")
    written = []
    real = scoring._write_pixel_shard

    def die_after_two(*a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt  # a Ctrl-C between shards
        written.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(scoring, "_write_pixel_shard", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(small, [], tmp_path / "arr", **{**KW, "shard_size": 4})
    monkeypatch.undo()
    done = _pixel_shards(tmp_path / "arr")
    assert len(done) == 2 and load_pixel_stats(small, tmp_path / "arr") is None, "incomplete: not handed out"
    st = ScoreStats()
    score_dataset(small, [], tmp_path / "arr", stats=st, **{**KW, "shard_size": 4})
    assert st.pixel_images == len(small) - 8
    assert all(_pixel_shards(tmp_path / "arr")[p] == t for p, t in done.items()), "finished shards kept"
    _equal(load_pixel_stats(small, tmp_path / "arr"), want)


def test_a_changed_image_is_measured_again_with_its_batch_only(tmp_path, small, caplog):
    score_dataset(small, [], tmp_path / "arr", **KW)
    before = load_pixel_stats(small, tmp_path / "arr")
    shards = _pixel_shards(tmp_path / "arr")
    i = 9  # shard 1 (images 8-15), batch 8-11
    Image.new("RGB", (40, 30)).save(small.path(i), format="JPEG")  # blacked out in place
    os.utime(small.path(i), ns=(1, 10**18))
    ds = load_dataset(small.root)
    assert load_pixel_stats(ds, tmp_path / "arr") is None, "stale statistics are never handed out"
    st = ScoreStats()
    score_dataset(ds, [], tmp_path / "arr", stats=st, **KW)
    assert st.pixel_images == 4, "the changed image's batch, nothing more"
    assert any("changed since" in r.getMessage() for r in caplog.records)
    now = _pixel_shards(tmp_path / "arr")
    assert [p.name for p in now if now[p] != shards[p]] == ["000001.npz"]
    after = load_pixel_stats(ds, tmp_path / "arr")
    assert {k: after[k][i].item() for k in COLUMNS} == image_stats(decode_image(ds.path(i)))
    assert after["brightness_perc_99"][i] == 0.0
    keep = np.arange(len(ds)) != i
    for k in COLUMNS:
        np.testing.assert_array_equal(after[k][keep], before[k][keep], err_msg=k)


@pytest.mark.parametrize("damage", ["garbage", "swap_rows", "foreign_npz"])
def test_a_damaged_pixel_shard_is_measured_again_with_one_line(tmp_path, small, caplog, damage):
    score_dataset(small, [], tmp_path / "arr", **KW)
    want = load_pixel_stats(small, tmp_path / "arr")
    shard = sorted((tmp_path / "arr" / PIXELS_DIR).glob("*.npz"))[1]
    if damage == "garbage":
        shard.write_bytes(b"\0" * 100)
    elif damage == "swap_rows":  # a valid .npz whose rows moved, written by something other than audit
        with np.load(shard) as z:
            members = {k: z[k] for k in z.files}
        members["px_brightness"] = members["px_brightness"][::-1].copy()
        np.savez(shard, **members)
    else:
        np.savez(shard, something=np.zeros(3))
    assert load_pixel_stats(small, tmp_path / "arr") is None
    caplog.clear()
    st = ScoreStats()
    score_dataset(small, [], tmp_path / "arr", stats=st, **KW)
    assert st.pixel_images == 8
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "damaged" in msg and shard.name in msg
    _equal(load_pixel_stats(small, tmp_path / "arr"), want)


def test_an_unreadable_image_has_no_stats_and_the_rest_do(tmp_path, small):
    root = tmp_path / "copy"
    shutil.copytree(small.root, root)
    ds = load_dataset(root)
    ds.path(3).write_bytes(b"not an image")
    score_dataset(ds, [], tmp_path / "arr", **KW)
    px = load_pixel_stats(ds, tmp_path / "arr")
    assert not px["ok"][3] and px["ok"].sum() == len(ds) - 1
    assert np.isnan(px["entropy"][3]) and px["md5"][3] == "" and px["width"][3] == -1


def test_a_statistic_that_fails_costs_that_image_its_stats_with_one_line(tmp_path, small, monkeypatch, caplog):
    import audit.scoring.pixels as pixels

    real, calls = pixels.image_stats, []

    def flaky(img):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("a property broke")
        return real(img)

    monkeypatch.setattr(pixels, "image_stats", flaky)
    score_dataset(small, [], tmp_path / "arr", **KW)
    px = load_pixel_stats(small, tmp_path / "arr")
    assert not px["ok"][2] and px["ok"].sum() == len(small) - 1
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "could not be measured for 1 image(s)" in msg and small.image_ids[2] in msg and "a property broke" in msg


def test_other_images_or_settings_never_reuse_the_stats(tmp_path, small):
    score_dataset(small, [], tmp_path / "arr", **KW)
    fewer = load_dataset(small.root, limit=10)
    assert load_pixel_stats(fewer, tmp_path / "arr") is None, "other image ids"
    st = ScoreStats()
    score_dataset(small, [], tmp_path / "arr", stats=st, **{**KW, "shard_size": 5})
    assert st.pixel_images == len(small), "another shard size: measured afresh, never mixed"
    assert load_pixel_stats(small, tmp_path / "arr") is not None
