"""Property and fuzz tests: export/re-import identity, and the label-file parser never crashes."""

from __future__ import annotations

import csv
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from _synth import WNIDS, make_imagefolder, make_named_images, make_parquet_predictions, make_predictions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.datasets import load_dataset
from audit.errors import UserError
from audit.export import export_labels
from audit.pipeline import run_audit
from audit.store import append_decision, arrays_dir
from audit.zoo import resolve_model

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One audited workspace; each example decides on its own copy (a run per example was ~50 s of the suite)."""
    tmp = tmp_path_factory.mktemp("rt-base")
    ds = load_dataset(make_imagefolder(tmp / "ds", per_class=3))
    preds = make_predictions(tmp / "m.npy", list(ds.image_ids), ds.labels)
    db = tmp / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    return ds, db


def _copy(db: Path, tmp: Path) -> Path:
    """The workspace file and its arrays folder, copied beside each other (a workspace is those two)."""
    shutil.copy2(db, tmp / db.name)
    shutil.copytree(arrays_dir(db), arrays_dir(tmp / db.name))
    return tmp / db.name


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.integers(0, 11), st.integers(0, 3), max_size=8))
def test_export_then_reimport_is_identity(tmp_path_factory, audited, changes):
    tmp = tmp_path_factory.mktemp("rt")
    ds, db = audited[0], _copy(audited[1], tmp)
    expected = ds.labels.copy()
    for i, lab in changes.items():
        append_decision(db, i, "relabel", labels=[lab], reviewer="prop")
        expected[i] = lab
    export_labels(db, tmp / "out")
    again = load_dataset(ds.root, label_file=tmp / "out" / "labels.csv")
    assert again.image_ids == ds.image_ids
    assert np.array_equal(again.labels, expected)


# Names a spreadsheet would take for a formula (OWASP's = + - @, tab, CR first), with quotes and separators inside.
_hostile = st.builds(
    str.__add__,
    st.sampled_from(["=", "+", "-", "@", "\t", "\r"]),
    st.text(alphabet=string.ascii_letters + string.digits + "=+-@\"',;|()! _\t", max_size=8),
).filter(lambda s: not s[-1].isspace())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    folders=st.lists(_hostile, min_size=2, max_size=3, unique=True),
    files=st.lists(_hostile, min_size=2, max_size=2, unique=True),
    changes=st.dictionaries(st.integers(0, 5), st.integers(0, 2), max_size=4),
)
def test_export_then_reimport_is_identity_with_hostile_names(tmp_path_factory, folders, files, changes):
    """Class folders and files named like formulas: the exported labels.csv still names every file."""
    tmp = tmp_path_factory.mktemp("hostile")
    root = make_named_images(tmp / "ds", {d: [f + ".png" for f in files] for d in folders})
    ds = load_dataset(root)
    preds = make_parquet_predictions(tmp / "p.parquet", list(ds.image_ids), ds.labels, n_classes=len(folders))
    db = tmp / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    expected = dict(zip(ds.image_ids, ds.labels.tolist(), strict=True))
    for i, lab in changes.items():
        if i < len(ds) and lab < len(folders):
            append_decision(db, i, "relabel", labels=[lab], reviewer="=prop")
            expected[ds.image_ids[i]] = lab
    export_labels(db, tmp / "out")
    again = load_dataset(ds.root, label_file=tmp / "out" / "labels.csv")
    assert dict(zip(again.image_ids, again.labels.tolist(), strict=True)) == expected
    with open(tmp / "out" / "labels.csv", newline="") as f:
        assert all(not c or c[0] not in "=+-@\t\r" for row in csv.reader(f) for c in row)


_cell = st.text(alphabet=string.printable + "éß\u00a0\x00", max_size=12)


@_SETTINGS
@given(
    header=st.sampled_from(["path,label", "image,label", "label,path", "path;label", "", "x,y", "path,label,extra"]),
    rows=st.lists(st.tuples(_cell, _cell), max_size=6),
    raw=st.binary(max_size=64),
    use_raw=st.booleans(),
)
def test_label_file_parser_never_crashes(tmp_path_factory, header, rows, raw, use_raw):
    root = tmp_path_factory.mktemp("fz")
    make_imagefolder(root, per_class=1, wnids=WNIDS[:2])
    flat = root / "val"
    f = root / "labels.csv"
    if use_raw:
        f.write_bytes(raw)
    else:
        body = "\n".join(f"{a},{b}" for a, b in rows)
        f.write_text(header + "\n" + body + "\n", encoding="utf-8")
    try:
        ds = load_dataset(flat, label_file=f)
    except UserError as e:
        assert "\n" not in str(e).strip() or "line" in str(e), "one clear line"
        return
    assert len(ds) == len(ds.labels) > 0
    assert all((flat / i).exists() for i in ds.image_ids)
