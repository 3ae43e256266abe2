"""Messy images: each case is generated here, scored by a real (random-weight) model, and either
handled as a person would expect or recorded in ``bad_images`` while the run goes on."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint
from PIL import Image

from audit import queries as q
from audit.datasets import decode_image, load_dataset
from audit.pipeline import run_audit
from audit.queries import run_summary
from audit.store import connect
from audit.zoo import resolve_model

WNID = "n01440764"


def _jpeg(size=(64, 48), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _write_cases(d: Path) -> dict[str, str | None]:
    """Write one file per case; value = expected bad-image reason fragment, or None when it must decode."""
    d.mkdir(parents=True)
    expect: dict[str, str | None] = {}

    def case(name: str, reason: str | None) -> Path:
        expect[name] = reason
        return d / name

    case("zero_byte.JPEG", "UnidentifiedImageError").write_bytes(b"")
    buf = io.BytesIO()
    _jpeg((200, 150)).save(buf, "JPEG")
    case("truncated.JPEG", "truncated").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    case("text.JPEG", "UnidentifiedImageError").write_text("this is not an image\n")
    _jpeg(seed=1, mode="CMYK").save(case("cmyk.JPEG", None), "JPEG")
    _jpeg(seed=2, mode="L").save(case("gray.JPEG", None), "JPEG")
    _jpeg(seed=3).convert("P", palette=Image.Palette.ADAPTIVE).save(case("palette.png", None))
    rgba = _jpeg(seed=4).convert("RGBA")
    rgba.putalpha(0)
    rgba.save(case("rgba.png", None))
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(case("gray16.png", None))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _jpeg((80, 40), seed=5).save(case("exif_rotated.JPEG", None), "JPEG", exif=exif.tobytes())
    _jpeg((1, 1), seed=6).save(case("one_pixel.png", None))
    # 400 M pixels: more than twice Pillow's MAX_IMAGE_PIXELS, refused before decoding.
    Image.new("1", (20_000, 20_000)).save(case("bomb.png", "DecompressionBomb"))
    os.symlink(d / "does-not-exist.JPEG", case("broken_link.JPEG", "FileNotFoundError"))
    for k in range(3):
        _jpeg(seed=10 + k).save(case(f"good_{k}.JPEG", None), "JPEG")
    return expect


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mnv3.pth")


def test_decode_handles_modes_as_a_person_would(tmp_path):
    expect = _write_cases(tmp_path / "imgs")
    for name, reason in expect.items():
        if reason is not None:
            continue
        im = decode_image(tmp_path / "imgs" / name)
        assert im.mode == "RGB", name
    assert decode_image(tmp_path / "imgs" / "exif_rotated.JPEG").size == (40, 80)
    g16 = np.asarray(decode_image(tmp_path / "imgs" / "gray16.png"))
    assert g16.min() < 10 and g16.max() > 200 and len(np.unique(g16)) > 50, "16-bit must be scaled, not clipped"
    assert np.asarray(decode_image(tmp_path / "imgs" / "rgba.png")).min() == 255, "transparent is white"
    cmyk = np.asarray(decode_image(tmp_path / "imgs" / "cmyk.JPEG")).astype(int)
    ref = np.asarray(_jpeg(seed=1)).astype(int)
    assert np.abs(cmyk - ref).mean() < 20, "CMYK converted back to the same picture"


def test_run_goes_on_and_records_bad_images(tmp_path, checkpoint):
    expect = _write_cases(tmp_path / "ds" / WNID)
    (tmp_path / "ds" / WNID / "unreadable.JPEG").write_bytes(b"")  # replaced below
    expect["unreadable.JPEG"] = "PermissionError"
    ds = load_dataset(tmp_path / "ds")
    db = tmp_path / "w.duckdb"

    import PIL.Image

    real_open = PIL.Image.open

    def guarded_open(fp, *a, **k):  # root reads any file, so simulate a permission problem
        if str(fp).endswith("unreadable.JPEG"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    PIL.Image.open = guarded_open
    try:
        res = run_audit(ds, [resolve_model(checkpoint)], db, workers=0, progress=False)
    finally:
        PIL.Image.open = real_open
    with connect(db, read_only=True) as con:
        bad = dict(con.execute("SELECT image_id, reason FROM bad_images").fetchall())
        valid = dict(con.execute("SELECT image_id, valid FROM images").fetchall())
    want_bad = {f"{WNID}/{n}": r for n, r in expect.items() if r is not None}
    assert set(bad) == set(want_bad)
    for image_id, fragment in want_bad.items():
        assert fragment.lower() in bad[image_id].lower(), (image_id, bad[image_id])
        assert valid[image_id] is False
    assert res.n_bad == len(want_bad)
    n_good = len(expect) - len(want_bad)
    top1 = q.metrics_table(db).query("evaluation == 'original' and metric == 'top1'")
    assert (top1["n"] == n_good).all(), "metrics leave bad images out"
    assert run_summary(db)["bad_images"] == len(want_bad)


def test_a_repaired_image_leaves_bad_images_and_a_broken_one_joins(tmp_path, checkpoint):
    d = tmp_path / "ds" / WNID
    d.mkdir(parents=True)
    for k in range(12):
        _jpeg(seed=20 + k).save(d / f"img{k:02d}.JPEG", "JPEG")
    good = (d / "img01.JPEG").read_bytes()
    (d / "img01.JPEG").write_bytes(good[: len(good) // 3])  # truncated: a bad image
    db = tmp_path / "w.duckdb"
    opts = {"workers": 0, "batch_size": 4, "progress": False, "backend": "torch"}

    def bad_ids() -> dict[str, bool]:
        with connect(db, read_only=True) as con:
            bad = {r[0] for r in con.execute("SELECT image_id FROM bad_images").fetchall()}
            valid = dict(con.execute("SELECT image_id, valid FROM images").fetchall())
        assert {i for i, v in valid.items() if not v} == bad, "images.valid agrees with bad_images"
        return bad

    run_audit(load_dataset(tmp_path / "ds"), [resolve_model(checkpoint)], db, **opts)
    assert bad_ids() == {f"{WNID}/img01.JPEG"}
    (d / "img01.JPEG").write_bytes(good)  # repaired in place
    (d / "img10.JPEG").write_bytes(b"")  # a good file breaks
    res = run_audit(load_dataset(tmp_path / "ds"), [resolve_model(checkpoint)], db, **opts)
    assert bad_ids() == {f"{WNID}/img10.JPEG"} and res.n_bad == 1
    with connect(db, read_only=True) as con:
        (params,) = con.execute("SELECT params FROM runs ORDER BY started_at DESC LIMIT 1").fetchall()[0]
    assert json.loads(params)["scoring"]["images_scored"] == 8, "their two batches of 4, not the third"
