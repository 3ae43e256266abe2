"""Label spaces (issue 10 §3): --label-space, --classes, --truth; synthetic flat sets with prediction files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _synth import make_predictions

from audit.cli import main
from audit.datasets import load_classes, load_dataset
from audit.errors import DatasetError, LabelFileError

FLOWERS = ("daisy", "rose", "tulip")  # "daisy" is also an ImageNet class name (985)


@pytest.fixture
def flowers(tmp_path, make_image) -> tuple[Path, Path]:
    root = tmp_path / "flowers"
    rows = ["path,label"]
    for k in range(12):
        make_image(root / f"f{k:02d}.png", seed=k)
        rows.append(f"f{k:02d}.png,{FLOWERS[k % 3]}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_flowers_file_with_an_imagenet_name_is_a_custom_space_in_auto_with_a_note(flowers):
    root, labels = flowers
    ds = load_dataset(root, label_file=labels)
    assert not ds.label_space.imagenet and ds.label_space.keys == ("daisy", "rose", "tulip")
    assert [ds.label_space.keys[i] for i in ds.labels[:3]] == ["daisy", "rose", "tulip"]
    (note,) = ds.notes
    assert "2 of 3 labels are not ImageNet classes" in note and "--label-space imagenet" in note


def test_label_space_custom_takes_imagenet_names_as_plain_classes(tmp_path, make_image):
    root = tmp_path / "flat"
    for k in range(4):
        make_image(root / f"i{k}.png", seed=k)
    labels = _write(tmp_path / "l.csv", "path,label\ni0.png,daisy\ni1.png,tench\ni2.png,daisy\ni3.png,tench\n")
    assert load_dataset(root, label_file=labels).label_space.imagenet  # every label is ImageNet's: auto says so
    ds = load_dataset(root, label_file=labels, label_space="custom")
    assert not ds.label_space.imagenet and ds.label_space.keys == ("daisy", "tench") and not ds.notes


def test_label_space_imagenet_refuses_labels_that_are_not_imagenet_classes(flowers):
    root, labels = flowers
    with pytest.raises(LabelFileError, match=r"2 label\(s\) are not ImageNet classes, first 'rose'.*custom"):
        load_dataset(root, label_file=labels, label_space="imagenet")


def test_auto_still_refuses_a_mistyped_wnid_among_wnids(tmp_path, make_image):
    root = tmp_path / "flat"
    for k in range(2):
        make_image(root / f"i{k}.png", seed=k)
    labels = _write(tmp_path / "l.csv", "path,label\ni0.png,n01440764\ni1.png,n0144076\n")
    with pytest.raises(LabelFileError, match=r"'n0144076'.*--label-space custom"):
        load_dataset(root, label_file=labels)


def test_imagefolder_label_spaces(tmp_path, make_image):
    wnid = tmp_path / "wnid"
    for k, w in enumerate(("n01440764", "n01443537")):
        make_image(wnid / w / f"{k}.png", seed=k)
    ds = load_dataset(wnid, label_space="custom")
    assert not ds.label_space.imagenet and ds.label_space.names == ("tench", "goldfish")
    custom = tmp_path / "custom"
    for k, c in enumerate(("scratch", "dent")):
        make_image(custom / c / f"{k}.png", seed=k)
    with pytest.raises(LabelFileError, match="not ImageNet classes, first 'dent'"):
        load_dataset(custom, label_space="imagenet")


def test_classes_file_fixes_the_order_and_allows_classes_without_images(flowers, tmp_path):
    root, labels = flowers
    classes = _write(tmp_path / "classes.txt", "tulip\nrose\nsunflower\ndaisy\n\n")
    ds = load_dataset(root, label_file=labels, classes=classes)
    assert ds.label_space.keys == ("tulip", "rose", "sunflower", "daisy") and not ds.label_space.imagenet
    assert [ds.label_space.keys[i] for i in ds.labels[:3]] == ["daisy", "rose", "tulip"]
    assert 2 not in set(ds.labels.tolist())  # sunflower: a class with no image


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("daisy\n\nrose\n", r"line 2 is empty"),
        ("daisy\nrose\ndaisy\n", r"line 3: 'daisy' is listed twice \(first on line 1\)"),
        ("daisy\n", r"lists 1 class"),
        ("daisy\nrose\n", r"1 label\(s\) are not in classes file .*, first 'tulip'"),
    ],
)
def test_bad_classes_files_are_refused(flowers, tmp_path, text, message):
    root, labels = flowers
    with pytest.raises(LabelFileError, match=message):
        load_dataset(root, label_file=labels, classes=_write(tmp_path / "c.txt", text))


def test_classes_and_label_space_imagenet_contradict(flowers, tmp_path):
    root, labels = flowers
    with pytest.raises(DatasetError, match="drop one of them"):
        load_dataset(root, label_file=labels, classes=_write(tmp_path / "c.txt", "daisy\nrose\ntulip\n"),
                     label_space="imagenet")  # fmt: skip


def test_load_classes_reads_a_bom_and_strips_spaces(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("\ufeff a \nb\r\n".encode())
    assert load_classes(p) == ("a", "b")


def _flower_preds(tmp_path: Path, root: Path, labels: Path, classes: Path | None = None) -> Path:
    ds = load_dataset(root, label_file=labels, classes=classes)
    return make_predictions(
        tmp_path / "p.npy", list(ds.image_ids), ds.labels, n_classes=len(ds.label_space), flip=np.array([4])
    )


def test_cli_classes_are_recorded_and_a_bare_rerun_keeps_them(flowers, tmp_path, capsys):
    root, labels = flowers
    (tmp_path / "meta").mkdir()
    classes = _write(tmp_path / "meta" / "classes.txt", "tulip\nrose\nsunflower\ndaisy\n")
    preds = _flower_preds(tmp_path, root, labels, classes)
    db = tmp_path / "w.duckdb"
    argv = ["run", str(root), "--labels", str(labels), "--classes", str(classes), "--models", f"preds:{preds}"]
    assert main([*argv, "--db", str(db), "-q", "--format", "json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[: out.rindex("flagged images")])
    top1 = next(r for r in rows if r["model"] == "ensemble" and r["evaluation"] == "original" and r["metric"] == "top1")
    assert top1["value"] == pytest.approx(11 / 12)
    assert main(["run", "--db", str(db), "-q"]) == 0  # bare: the same label file and classes file
    from audit.store import connect

    with connect(db, read_only=True) as con:
        keys = [r[0] for r in con.execute("SELECT key FROM classes ORDER BY class_index").fetchall()]
        params = json.loads(con.execute("SELECT params FROM runs ORDER BY started_at DESC").fetchone()[0])
    assert keys == ["tulip", "rose", "sunflower", "daisy"]
    assert params["inputs"]["classes"] == str(classes.resolve())
    # An export next to the classes file could overwrite it: refused like the label file's folder.
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "meta")]) == 2
    assert "classes file" in capsys.readouterr().err


def test_cli_auto_custom_space_prints_its_note(flowers, tmp_path, capsys):
    root, labels = flowers
    preds = _flower_preds(tmp_path, root, labels)
    db = tmp_path / "w.duckdb"
    assert main(["run", str(root), "--labels", str(labels), "--models", f"preds:{preds}", "--db", str(db), "-q"]) == 0
    assert "form a custom label space" in capsys.readouterr().err


def test_cli_bad_classes_file_is_one_line_exit_2(flowers, tmp_path, capsys):
    root, labels = flowers
    classes = _write(tmp_path / "classes.txt", "daisy\ndaisy\n")
    db = tmp_path / "w.duckdb"
    assert main(["run", str(root), "--labels", str(labels), "--classes", str(classes), "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "listed twice" in err[0] and not db.exists()


# --------------------------------------------------------------------------- --truth


def _truth_file(path: Path, root: Path, labels: Path, wrong: tuple[int, ...]) -> Path:
    """The given labels with the rows at ``wrong`` (0-based, sorted-id order) set to the next flower."""
    rows = labels.read_text().splitlines()
    out = [rows[0]]
    for k, row in enumerate(rows[1:]):
        p, lab = row.split(",")
        out.append(f"{p},{FLOWERS[(FLOWERS.index(lab) + 1) % 3] if k in wrong else lab}")
    return _write(path, "\n".join(out) + "\n")


def test_truth_is_checked_at_the_boundary(flowers, tmp_path):
    root, labels = flowers
    good = _truth_file(tmp_path / "t.csv", root, labels, ())
    ds = load_dataset(root, label_file=labels, truth=good)
    assert (ds.truth == ds.labels).all()
    lines = good.read_text().splitlines()
    cases = {
        "unknown image": ([*lines, "nope.png,rose"], r"name images that are not in the dataset, first 'nope"),
        "unknown class": ([*lines[:2], "f01.png,orchid", *lines[3:]], r"line 3: label 'orchid' is not a class"),
        "missing row": (lines[:-1], r"1 image\(s\) have no row, first 'f11.png'"),
        "twice": ([*lines, lines[1]], r"listed twice"),
    }
    for name, (rows, message) in cases.items():
        bad = _write(tmp_path / f"{name}.csv", "\n".join(rows) + "\n")
        with pytest.raises(LabelFileError, match=message):
            load_dataset(root, label_file=labels, truth=bad)
    # --limit keeps a subset; the truth file still describes the whole dataset, and is not refused for it.
    assert len(load_dataset(root, label_file=labels, truth=good, limit=4).truth) == 4


def test_truth_evaluates_every_model_and_scores_the_flags(flowers, tmp_path, capsys):
    from audit.store import connect

    root, labels = flowers
    ds = load_dataset(root, label_file=labels)
    # Both models' top-1 is label + 1 at rows 4 and 7: those are flagged. The truth says 4 and 9 are wrong.
    flip = np.array([4, 7])
    p1 = make_predictions(tmp_path / "a.npy", list(ds.image_ids), ds.labels, n_classes=3, flip=flip, seed=1)
    p2 = make_predictions(tmp_path / "b.npy", list(ds.image_ids), ds.labels, n_classes=3, flip=flip, seed=2)
    truth = _truth_file(tmp_path / "t.csv", root, labels, (4, 9))
    db = tmp_path / "w.duckdb"
    argv = ["run", str(root), "--labels", str(labels), "--truth", str(truth), "--models", f"preds:{p1},preds:{p2}"]
    assert main([*argv, "--db", str(db), "-q"]) == 0
    capsys.readouterr()
    assert main(["metrics", "--db", str(db), "--format", "json"]) == 0
    rows = {(r["model"], r["evaluation"], r["metric"]): r for r in json.loads(capsys.readouterr().out)}
    # Against the truth: rows 7 and 9 are wrong (4 is predicted as label+1, which is the truth there).
    for m in ("ensemble", next(k[0] for k in rows if k[0] != "ensemble")):
        assert rows[(m, "truth", "top1")]["value"] == pytest.approx(10 / 12)
        assert rows[(m, "truth", "top1")]["low"] < 10 / 12 < rows[(m, "truth", "top1")]["high"]
    with connect(db, read_only=True) as con:
        flagged = {r[0] for r in con.execute("SELECT image_index FROM label_issues WHERE is_label_issue").fetchall()}
        stored = [r[0] for r in con.execute("SELECT label FROM truth ORDER BY image_index").fetchall()]
    assert stored == load_dataset(root, label_file=labels, truth=truth).truth.tolist()
    wrong = {4, 9}
    f = rows[("ensemble", "flags_vs_truth", "precision")]
    assert f["value"] == pytest.approx(len(flagged & wrong) / len(flagged)) and f["n"] == len(flagged)
    assert rows[("ensemble", "flags_vs_truth", "recall")]["value"] == pytest.approx(len(flagged & wrong) / 2)
    assert 0 < rows[("ensemble", "flags_vs_truth", "ap")]["value"] <= 1
    assert rows[("ensemble", "flags_vs_truth", "wrong")]["value"] == pytest.approx(2 / 12)
    # A bare rerun keeps the truth file; a run of the same workspace without one... keeps it too (continues).
    assert main(["run", "--db", str(db), "-q"]) == 0
    capsys.readouterr()
    assert main(["metrics", "--db", str(db), "--format", "csv"]) == 0
    assert "flags_vs_truth" in capsys.readouterr().out


def test_cli_bad_truth_is_one_line_exit_2_and_writes_nothing(flowers, tmp_path, capsys):
    root, labels = flowers
    bad = _write(tmp_path / "t.csv", "path,label\nf00.png,daisy\n")
    db = tmp_path / "w.duckdb"
    assert main(["run", str(root), "--labels", str(labels), "--truth", str(bad), "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "11 image(s) have no row" in err[0] and not db.exists()


def test_flag_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, precision_score, recall_score

    from audit.truth import flag_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    truth = np.where(rng.random(200) < 0.2, (labels + 1) % 3, labels)
    q = np.clip(rng.random(200) - 0.5 * (labels != truth), 0, 1)
    flagged = q < 0.3
    valid = rng.random(200) > 0.05
    m = {r.metric: r for r in flag_metrics(q, flagged, labels, truth, valid)}
    w = (labels != truth)[valid]
    assert m["precision"].value == pytest.approx(precision_score(w, flagged[valid]))
    assert m["recall"].value == pytest.approx(recall_score(w, flagged[valid]))
    assert m["ap"].value == pytest.approx(average_precision_score(w, 1 - q[valid]))
    assert m["precision"].low < m["precision"].value < m["precision"].high


def test_dashboard_shows_truth_metrics_and_flag_scores(flowers, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from audit import queries as q

    root, labels = flowers
    ds = load_dataset(root, label_file=labels)
    p = make_predictions(tmp_path / "a.npy", list(ds.image_ids), ds.labels, n_classes=3, flip=np.array([4, 7]))
    truth = _truth_file(tmp_path / "t.csv", root, labels, (4, 9))
    db = tmp_path / "w.duckdb"
    argv = ["run", str(root), "--labels", str(labels), "--truth", str(truth), "--models", f"preds:{p}"]
    assert main([*argv, "--db", str(db), "-q"]) == 0
    m = q.metrics_table(db)
    assert set(m["evaluation"]) >= {"original", "truth", "flags_vs_truth"}
    line = q.flags_vs_truth(m)
    assert line.startswith("flags against the truth labels: precision") and "over 12 images" in line
    assert "truth" in set(q.impact(m).columns)
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert any(line == t.value for t in at.text)
    at.sidebar.radio(key="page").set_value("Impact").run()
    assert not at.exception, at.exception
    assert any(line == t.value for t in at.text)
