"""``--crop auto|weights|full`` (issue 10 §6 lever: the input resolution of small images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _synth import make_checkpoint

from audit.cli import main
from audit.datasets import load_dataset, typical_short_side
from audit.store import connect
from audit.zoo import Preprocess, apply_crop, resolve_model

PRE = Preprocess(resize=256, crop=224, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_whole_keeps_the_input_edge_and_drops_the_margin():
    w = PRE.whole()
    assert (w.resize, w.crop) == (224, 224) and (w.mean, w.std, w.interpolation) == (PRE.mean, PRE.std, "bilinear")


@pytest.mark.parametrize(
    ("mode", "side", "whole"),
    [("auto", 32, True), ("auto", 224, False), ("auto", 500, False), ("auto", None, False), ("weights", 32, False),
     ("full", 500, True)],
)
def test_apply_crop_rule(tmp_path, mode, side, whole):
    spec = resolve_model(make_checkpoint(tmp_path / "m.pth"))
    (out,), notes = apply_crop([spec], mode, side)
    assert (out.preprocess.resize == out.preprocess.crop) is whole
    assert out.preprocess.crop == spec.preprocess.crop  # the input edge is the weights', always
    assert bool(notes) is (whole and mode == "auto")
    if notes:
        assert f"median short side {side} px" in notes[0] and "--crop weights" in notes[0]


def test_apply_crop_leaves_imported_predictions_alone(tmp_path):
    preds = tmp_path / "p.npy"
    np.save(preds, np.full((3, 2), 0.5, dtype=np.float32))
    spec = resolve_model(f"preds:{preds}")
    (out,), notes = apply_crop([spec], "full", 10)
    assert out is spec and out.preprocess is None and not notes


def test_apply_crop_refuses_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="expected one of auto, weights, full"):
        apply_crop([], "middle", 10)


def test_typical_short_side_reads_headers(tmp_path, make_image):
    for k, size in enumerate([(40, 30), (50, 20), (64, 64)]):
        make_image(tmp_path / "d" / "c" / f"{k}.png", size=size, seed=k)
    (tmp_path / "d" / "c" / "broken.png").write_bytes(b"not an image")
    ds = load_dataset(tmp_path / "d", label_space="custom")
    assert typical_short_side(ds) == 30  # median of 20, 30, 64; the unreadable file is skipped


def _preprocess(db):
    with connect(db, read_only=True) as con:
        ((pre,),) = con.execute("SELECT preprocess FROM models WHERE weights_file IS NOT NULL").fetchall()
    return json.loads(pre)


def test_cli_auto_keeps_small_images_whole_and_a_rerun_with_weights_rescores(tmp_path, make_image, capsys):
    root = tmp_path / "tiny"
    rows = ["path,label"]
    for k in range(8):
        make_image(root / f"t{k}.png", size=(16, 16), seed=k)
        rows.append(f"t{k}.png,{'ab'[k % 2]}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    model = make_checkpoint(tmp_path / "m.pth")
    db = tmp_path / "ws.duckdb"
    base = [str(root), "--labels", str(tmp_path / "l.csv"), "--models", model, "--db", str(db), "--no-heads", "-q"]
    assert main(["run", *base]) == 0
    err = capsys.readouterr().err
    assert "median short side 16 px" in err
    pre = _preprocess(db)
    assert pre["resize"] == pre["crop"] == 224
    # A bare continuation keeps the recorded crop; --crop weights changes the preprocessing, so it rescores.
    assert main(["run", "--db", str(db), "-q"]) == 0
    assert _preprocess(db)["resize"] == 224
    capsys.readouterr()
    assert main(["run", *base, "--crop", "weights"]) == 0
    assert "median short side" not in capsys.readouterr().err
    assert _preprocess(db)["resize"] == 256
