"""The scoring cache never gives a silent wrong result.

Cached shards and matrices carry checksums and are reused only when they
verify; an image changed in place is rescored (with its batch, nothing more);
every input of a run that changes between runs (images, label file, ReaL file,
weights, prediction files) shows in every table exactly as a workspace built
afresh on the new inputs would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder, make_predictions
from PIL import Image

from audit.datasets import load_dataset
from audit.pipeline import run_audit
from audit.scoring import ScoreStats, score_dataset
from audit.store import arrays_dir, connect
from audit.zoo import resolve_model

KW = {"batch_size": 4, "workers": 0, "shard_size": 8, "progress": False, "backend": "torch"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mnv3.pth")


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory, checkpoint):
    d = tmp_path_factory.mktemp("scored")
    root = make_imagefolder(d / "ds", per_class=4, size=(56, 44))
    (a,) = score_dataset(load_dataset(root), [resolve_model(checkpoint)], d / "arr", **KW)
    return d, _bytes(a)


@pytest.fixture
def scored(tmp_path, scored_once, checkpoint):
    """16 images scored into shards of 8 (batches of 4), copied for each test to damage."""
    d, before = scored_once
    for name in ("ds", "arr"):
        shutil.copytree(d / name, tmp_path / name, copy_function=shutil.copy2)  # copy2: stamps come along
    spec = resolve_model(checkpoint)
    logits = next((tmp_path / "arr").glob("*.logits.npy"))
    a = SimpleNamespace(logits=logits, probs=Path(str(logits).replace(".logits.", ".probs.")))
    return tmp_path / "ds", spec, a, before


def _bytes(a) -> tuple[bytes, bytes]:
    return Path(a.logits).read_bytes(), Path(a.probs).read_bytes()


def _shards(a) -> list[Path]:
    return sorted((Path(a.logits).parent / "shards").rglob("*.npz"))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _swap_rows(path: Path, i: int, j: int) -> None:
    m = np.load(path, mmap_mode="r+")
    m[[i, j]] = m[[j, i]]
    m.flush()
    del m


# --------------------------------------------------------------------------- damaged caches


def test_rows_swapped_in_a_cached_matrix_are_caught_and_rebuilt_from_the_shards(tmp_path, scored, caplog):
    root, spec, a, before = scored
    _swap_rows(a.logits, 0, 11)  # a disk fault or a bad copy: same bytes, wrong rows
    _swap_rows(a.probs, 0, 11)
    st = ScoreStats()
    (b,) = score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert _bytes(b) == before
    assert st.images == 0, "intact shards rebuild the matrices; nothing is rescored"
    (msg,) = _warnings(caplog)
    assert "fail their checksum" in msg and "rebuilding" in msg


def test_damaged_features_are_caught_in_the_matrix_and_in_a_shard(tmp_path, scored, caplog):
    root, spec, a, before = scored
    feats = Path(str(a.logits).replace(".logits.", ".features."))
    want = feats.read_bytes()
    _swap_rows(feats, 0, 11)  # the assembled features: rebuilt from the shards
    st = ScoreStats()
    (b,) = score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert b.features == feats and feats.read_bytes() == want and _bytes(b) == before and st.images == 0
    (msg,) = _warnings(caplog)
    assert "fail their checksum" in msg
    caplog.clear()
    shard = _shards(a)[1]  # a shard's features: the shard is rescored
    with np.load(shard) as z:
        members = {k: z[k] for k in z.files}
    members["features"] = members["features"][::-1].copy()
    np.savez(shard, **members)
    feats.unlink()
    st = ScoreStats()
    (b,) = score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert st.images == 8 and feats.read_bytes() == want and _bytes(b) == before
    (msg,) = _warnings(caplog)
    assert "damaged" in msg and shard.name in msg and "checksum mismatch" in msg


@pytest.mark.parametrize("damage", ["swap_rows", "truncate", "garbage", "empty", "foreign_npz"])
def test_a_damaged_shard_is_rescored_with_one_line_and_no_traceback(tmp_path, scored, caplog, damage):
    root, spec, a, before = scored
    shard = _shards(a)[1]
    data = shard.read_bytes()
    if damage == "swap_rows":  # a valid .npz whose logits rows moved, written by something other than audit
        with np.load(shard) as z:
            members = {k: z[k] for k in z.files}
        members["logits"] = members["logits"][::-1].copy()
        np.savez(shard, **members)
        # Intact matrices are reused without reading the shards' logits; rebuilding them reads and checks every one.
        Path(a.logits).unlink()
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        shard.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8)))
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        np.savez(shard, something=np.zeros(3))
    st = ScoreStats()
    (b,) = score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert st.images == 8, "only the damaged shard is rescored"
    assert _bytes(b) == before
    (msg,) = _warnings(caplog)
    assert "damaged" in msg and shard.name in msg and "rescoring their 8 image(s)" in msg
    caplog.clear()
    st = ScoreStats()
    score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert st.images == 0 and not _warnings(caplog), "healed: the next run reuses everything, silently"


def test_a_run_on_damaged_caches_says_one_line_and_gives_the_true_result(tmp_path, checkpoint, caplog, monkeypatch):
    monkeypatch.setenv("AUDIT_SHARD_SIZE", "8")
    root = make_imagefolder(tmp_path / "ds", per_class=4, size=(56, 44))
    db = tmp_path / "w.duckdb"
    opts = {"workers": 0, "batch_size": 4, "progress": False, "backend": "torch"}
    run_audit(load_dataset(root), [resolve_model(checkpoint)], db, **opts)
    want = _tables(db)
    # Rows of the matrices swapped: top-1 computed from them was silently wrong (71% for 93%).
    for m in arrays_dir(db).glob("*.npy"):
        _swap_rows(m, 1, 14)
    caplog.clear()
    run_audit(load_dataset(root), [resolve_model(checkpoint)], db, **opts)
    assert _tables(db) == want and _scored(db) == 0
    (msg,) = _warnings(caplog)
    assert "fail their checksum" in msg
    # A shard truncated: it used to crash the run with a traceback.
    shard = sorted((arrays_dir(db) / "shards").rglob("*.npz"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    caplog.clear()
    run_audit(load_dataset(root), [resolve_model(checkpoint)], db, **opts)
    assert _tables(db) == want and _scored(db) == 8
    (msg,) = _warnings(caplog)
    assert "1 cached shard(s) are damaged" in msg


# --------------------------------------------------------------------------- images changed in place


def _replace(path: Path, seed: int, size=(60, 50)) -> None:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=80)


def test_an_image_replaced_in_place_is_rescored_with_its_batch_only(tmp_path, scored, caplog):
    root, spec, a, _ = scored
    ds = load_dataset(root)
    stamps = {p: p.stat().st_mtime_ns for p in _shards(a)}
    target = ds.path(13)  # shard 1, batch 12..15
    _replace(target, seed=99)
    st = ScoreStats()
    (b,) = score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert st.images == 4, "the image's batch, not its shard, not the set"
    changed = [p for p in _shards(a) if p.stat().st_mtime_ns != stamps[p]]
    assert [p.name for p in changed] == ["000001.npz"]
    (msg,) = _warnings(caplog)
    assert "1 image(s) changed" in msg and ds.image_ids[13] in msg
    (fresh,) = score_dataset(load_dataset(root), [spec], tmp_path / "fresh", **KW)
    assert _bytes(b) == _bytes(fresh), "bit-identical to scoring the new images afresh"


def test_same_size_rewrite_is_caught_by_its_mtime(tmp_path, scored):
    root, spec, _, _ = scored
    ds = load_dataset(root)
    path = ds.path(2)
    data = bytearray(path.read_bytes())
    st0 = path.stat()
    data[-10] ^= 0xFF  # same length, other bytes
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns + 1))  # a nanosecond later
    st = ScoreStats()
    score_dataset(load_dataset(root), [spec], tmp_path / "arr", stats=st, **KW)
    assert st.images == 4


# --------------------------------------------------------------------------- every input, picked up everywhere

TABLES = {
    "images": "SELECT * FROM images ORDER BY image_index",
    "classes": "SELECT * FROM classes ORDER BY class_index",
    "predictions": "SELECT * FROM predictions ORDER BY model, image_index",
    "metrics": "SELECT * EXCLUDE (run_id) FROM metrics ORDER BY model, evaluation, metric",
    "label_issues": "SELECT * EXCLUDE (run_id) FROM label_issues ORDER BY image_index",
    "bad_images": "SELECT * EXCLUDE (run_id) FROM bad_images ORDER BY image_index",
    "models": "SELECT model, source, arch, num_classes, preprocess, weights_file FROM models ORDER BY model",
    "meta": "SELECT * FROM meta ORDER BY key",
}


def _tables(db: Path) -> dict[str, list]:
    with connect(db, read_only=True) as con:
        return {k: con.execute(q).fetchall() for k, q in TABLES.items()}


def _scored(db: Path) -> int:
    with connect(db, read_only=True) as con:
        params = con.execute("SELECT params FROM runs ORDER BY started_at DESC LIMIT 1").fetchall()[0][0]
    return json.loads(params)["scoring"]["images_scored"]


def _val(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


N_FLAT = 12


@pytest.fixture(scope="module")
def inputs_base(tmp_path_factory):
    """A flat folder with a label file, an explicit ReaL file, a checkpoint and a prediction file; one bad image."""
    d = tmp_path_factory.mktemp("inputs")
    root = d / "ds"
    root.mkdir()
    labels = [k % 4 for k in range(N_FLAT)]
    for k in range(N_FLAT):
        _replace(root / _val(k + 1), seed=k, size=(52 + k, 44))
    (root / _val(5)).write_bytes((root / _val(5)).read_bytes()[:200])  # truncated: a bad image
    (d / "labels.csv").write_text("path,label\n" + "".join(f"{_val(k + 1)},{labels[k]}\n" for k in range(N_FLAT)))
    real = [[] for _ in range(50_000)]
    for k in range(N_FLAT):
        real[k] = [labels[k]] if k % 3 else [labels[k], (labels[k] + 1) % 4]
    (d / "real.json").write_text(json.dumps(real))
    ckpt = _checkpoint(d / "mnv3.pth", seed=0)
    ds = _load(d)
    make_predictions(d / "p.npy", list(ds.image_ids), ds.labels, flip=np.array([3, 8]), seed=4)
    db = d / "ws" / "w.duckdb"
    _run(d, db, ckpt)
    return d, ckpt


def _load(d: Path):
    return load_dataset(d / "ds", label_file=d / "labels.csv", real=d / "real.json")


def _run(d: Path, db: Path, ckpt: str) -> None:
    specs = [resolve_model(ckpt), resolve_model(f"preds:{d / 'p.npy'}")]
    run_audit(_load(d), specs, db, workers=0, batch_size=4, progress=False, backend="torch")


def _edit_label(d: Path) -> None:
    text = (d / "labels.csv").read_text().replace(f"{_val(2)},1\n", f"{_val(2)},3\n")
    assert text != (d / "labels.csv").read_text()
    (d / "labels.csv").write_text(text)


def _edit_real(d: Path) -> None:
    real = json.loads((d / "real.json").read_text())
    real[0], real[6] = [2], []
    (d / "real.json").write_text(json.dumps(real))


def _edit_images(d: Path) -> None:
    root = d / "ds"
    _replace(root / _val(5), seed=50)  # the bad image repaired
    (root / _val(9)).write_bytes(b"not an image any more")  # a good image broken
    _replace(root / _val(2), seed=51, size=(70, 61))  # one replaced by another picture


def _checkpoint(path: Path, seed: int) -> str:
    """A random-weights checkpoint whose predictions depend on its weights.

    At random initialisation MobileNetV3's features are ~1e-7, its logits ~1e-9
    and every softmax exactly uniform in float32, whatever the seed; a scaled
    classifier makes the predictions follow the weights.
    """
    import torch

    name = make_checkpoint(path, seed=seed)
    sd = torch.load(path, weights_only=True)
    sd["classifier.3.weight"] *= 1e9
    torch.save(sd, path)
    return name


def _edit_weights(d: Path) -> None:
    _checkpoint(d / "mnv3.pth", seed=1)  # a retrained best.pth, overwritten in place


def _edit_predictions(d: Path) -> None:
    ds = _load(d)
    make_predictions(d / "p.npy", list(ds.image_ids), ds.labels, flip=np.array([0, 1, 2]), seed=9, probs=True)


@pytest.mark.parametrize(
    ("edit", "rescored"),
    [
        (_edit_label, 0),
        (_edit_real, 0),
        (_edit_images, 12),  # three batches of 4, one per changed image
        (_edit_weights, N_FLAT),
        (_edit_predictions, 0),
    ],
    ids=["label-file", "real-file", "images", "weights", "predictions"],
)
def test_every_input_changed_between_runs_shows_as_in_a_fresh_workspace(tmp_path, inputs_base, edit, rescored):
    base, ckpt_name = inputs_base
    d = tmp_path / "in"
    shutil.copytree(base, d, copy_function=shutil.copy2)  # copy2: the stamps (size, mtime) come along
    ckpt = ckpt_name.replace(str(base), str(d))  # the same file name: the same model, its shards reused
    db = d / "ws" / "w.duckdb"
    # The copied workspace remembers the old folder: move its records to the copy, as a user's would read.
    with connect(db) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = ?", [str(d / "ds"), "dataset_root"])
        con.execute("UPDATE meta SET value = ? WHERE key = ?", [str(d / "real.json"), "real_source"])
    before = _tables(db)
    edit(d)
    _run(d, db, ckpt)
    assert _scored(db) == rescored
    fresh = tmp_path / "fresh" / "w.duckdb"
    _run(d, fresh, ckpt)
    got, want = _tables(db), _tables(fresh)
    for table in TABLES:
        assert got[table] == want[table], f"{table} is stale after the {edit.__name__} edit"
    changed = {t for t in TABLES if before[t] != got[t]}
    expect = {
        _edit_label: {"images", "predictions", "metrics", "label_issues", "meta"},
        _edit_real: {"images", "metrics", "meta"},
        _edit_images: {"predictions", "metrics", "label_issues", "bad_images", "meta"},
        _edit_weights: {"predictions", "metrics", "label_issues"},
        _edit_predictions: {"predictions", "metrics", "label_issues"},
    }[edit]
    assert expect <= changed, f"{expect - changed} did not follow the edit"
    if edit is _edit_images:
        bad = {r[1] for r in got["bad_images"]}
        assert bad == {_val(9)}, "the repaired image left bad_images, the broken one joined"


def test_a_label_edit_that_changes_the_classes_rewrites_them_unless_decisions_name_them(tmp_path):
    from audit.errors import StoreError
    from audit.store import append_decision

    root = tmp_path / "ds"
    root.mkdir()
    for k in range(8):
        _replace(root / f"img{k}.jpg", seed=k)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"img{k}.jpg,{'cat' if k % 2 else 'dog'}\n" for k in range(8)))

    def run(db: Path) -> None:
        ds = load_dataset(root, label_file=csv)
        make_predictions(tmp_path / "p.npy", list(ds.image_ids), ds.labels, n_classes=len(ds.label_space))
        run_audit(ds, [resolve_model(f"preds:{tmp_path / 'p.npy'}")], db, progress=False)

    db = tmp_path / "w.duckdb"
    run(db)
    csv.write_text(csv.read_text().replace("img3.jpg,cat", "img3.jpg,bird"))  # a third class
    run(db)
    run(tmp_path / "fresh.duckdb")
    assert _tables(db) == _tables(tmp_path / "fresh.duckdb")
    append_decision(db, 0, "keep", reviewer="t")
    csv.write_text(csv.read_text().replace("img3.jpg,bird", "img3.jpg,cat"))
    with pytest.raises(StoreError, match=r"classes of workspace .* changed .* decisions"):
        run(db)
