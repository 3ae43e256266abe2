"""``preds:`` files: anything that is not finite, well-typed predictions for these images is one line, exit 2,
before the workspace is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _synth import make_imagefolder, make_predictions

from audit.cli import main
from audit.datasets import load_dataset
from audit.errors import ModelError
from audit.pipeline import run_audit
from audit.store import connect
from audit.zoo import resolve_model


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(make_imagefolder(tmp_path_factory.mktemp("ds"), per_class=2))


def _logits(ds, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (len(ds), 1000)).astype(np.float32)
    x[np.arange(len(ds)), ds.labels] += 5
    return x


def _probs(ds) -> np.ndarray:
    x = _logits(ds).astype(np.float64)
    e = np.exp(x - x.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def _npy(path: Path, mat, ids) -> Path:
    np.save(path, mat, allow_pickle=True)
    path.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
    return path


def _parquet(path: Path, ids, rows, col: str = "logits") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ids, col: rows}), path)
    return path


def _case(name: str, ds, d: Path) -> Path:
    ids = list(ds.image_ids)
    x = _logits(ds)
    if name == "nan":
        x[3, 7] = np.nan
        return _npy(d / "m.npy", x, ids)
    if name == "inf":
        x[2, 0] = np.inf
        return _npy(d / "m.npy", x, ids)
    if name == "minus_inf":
        x[2, 0] = -np.inf
        return _npy(d / "m.npy", x, ids)
    if name == "float64_overflow":
        y = x.astype(np.float64)
        y[1, 1] = 1e300  # finite in the file, infinite as the float32 it is scored as
        return _npy(d / "m.npy", y, ids)
    if name == "probs_not_summing_to_1":
        p = _probs(ds)
        p[4] *= 0.5
        return _npy(d / "m.npy", p, ids)
    if name == "int_dtype":
        return _npy(d / "m.npy", (x * 10).astype(np.int64), ids)
    if name == "bool_dtype":
        return _npy(d / "m.npy", x > 0, ids)
    if name == "object_dtype":
        return _npy(d / "m.npy", np.array([list(r) for r in x], dtype=object), ids)
    if name == "one_dimensional":
        return _npy(d / "m.npy", x[:, 0], ids)
    if name == "three_dimensional":
        return _npy(d / "m.npy", x[:, :, None], ids)
    if name == "too_few_ids":
        return _npy(d / "m.npy", x, ids[:-1])
    if name == "duplicate_id":
        return _npy(d / "m.npy", x, [*ids[:-1], ids[0]])
    if name == "empty_id":
        return _npy(d / "m.npy", x, ["", *ids[1:]])
    if name == "missing_image":
        return _npy(d / "m.npy", x, [*ids[:-1], "someone/else.JPEG"])
    if name == "wrong_columns":
        return _npy(d / "m.npy", x[:, :999], ids)
    if name == "garbage_npy":
        (d / "m.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
        (d / "m.ids.txt").write_text("\n".join(ids))
        return d / "m.npy"
    if name == "ids_not_utf8":
        p = _npy(d / "m.npy", x, ids)
        p.with_suffix(".ids.txt").write_bytes(b"\xff\xfe" + "\n".join(ids).encode())
        return p
    if name == "no_ids_file":
        np.save(d / "m.npy", x)
        return d / "m.npy"
    if name == "parquet_negative_probs":
        p = _probs(ds)
        p[0, :2] = [-0.1, p[0, 0] + p[0, 1] + 0.1]
        return _parquet(d / "m.parquet", ids, list(p), "probs")
    if name == "parquet_probs_not_summing_to_1":
        return _parquet(d / "m.parquet", ids, list(_probs(ds) * 2), "probs")
    if name == "parquet_nan":
        x[5, 5] = np.nan
        return _parquet(d / "m.parquet", ids, list(x))
    if name == "parquet_null_score":
        rows = [list(r) for r in x.astype(float)]
        rows[1][3] = None
        return _parquet(d / "m.parquet", ids, rows)
    if name == "parquet_ragged":
        rows = [list(r) for r in x.astype(float)]
        rows[2] = rows[2][:-1]
        return _parquet(d / "m.parquet", ids, rows)
    if name == "parquet_int_ids":
        return _parquet(d / "m.parquet", list(range(len(ids))), list(x))
    if name == "parquet_int_scores":
        return _parquet(d / "m.parquet", ids, [list(r) for r in (x * 10).astype(np.int64)])
    if name == "not_parquet":
        (d / "m.parquet").write_text("image,logits\n")
        return d / "m.parquet"
    raise AssertionError(name)


CASES = {
    "nan": r"holds NaN; predictions must be finite",
    "inf": r"holds an infinite value",
    "minus_inf": r"holds an infinite value",
    "float64_overflow": r"holds an infinite value",
    "probs_not_summing_to_1": r"holds probabilities, but the row of .* sums to 0\.5",
    "int_dtype": r"holds int64, expected floating-point",
    "bool_dtype": r"holds bool, expected floating-point",
    "object_dtype": r"cannot read .* as a \.npy matrix",
    "one_dimensional": r"\(8,\) predictions for 8 ids",
    "three_dimensional": r"\(8, 1000, 1\) predictions",
    "too_few_ids": r"predictions for 7 ids; expected one row per id",
    "duplicate_id": r"has two rows \(0 and 7\)",
    "empty_id": r"id of row 0 is ''",
    "missing_image": r"has no row for 1 images",
    "wrong_columns": r"has 999 columns but the dataset has 1000 classes",
    "garbage_npy": r"cannot read .* as a \.npy matrix",
    "ids_not_utf8": r"m\.ids\.txt is not UTF-8",
    "no_ids_file": r"needs m\.ids\.txt beside it",
    "parquet_negative_probs": r"negative probabilities",
    "parquet_probs_not_summing_to_1": r"sums to 2, not 1",
    "parquet_nan": r"holds NaN",
    "parquet_null_score": r"has nulls or rows of different lengths",
    "parquet_ragged": r"has nulls or rows of different lengths",
    "parquet_int_ids": r"column 'image' must hold image ids as text",
    "parquet_int_scores": r"holds int64, expected floating-point",
    "not_parquet": r"cannot read .* as parquet",
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_prediction_files_stop_before_the_workspace_is_written(tmp_path, ds, name):
    path = _case(name, ds, tmp_path)
    db = tmp_path / "w.duckdb"
    with pytest.raises(ModelError, match=CASES[name]) as info:
        run_audit(ds, [resolve_model(f"preds:{path}")], db, progress=False)
    assert "\n" not in str(info.value)
    assert not db.exists(), "validated before anything is written"


def test_the_cli_says_one_line_and_exits_2(tmp_path, ds, capsys):
    path = _case("nan", ds, tmp_path)
    db = tmp_path / "w.duckdb"
    assert main(["run", str(ds.root), "--models", f"preds:{path}", "--db", str(db), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("audit: error: ") and "NaN" in err[-1] and "Traceback" not in "\n".join(err)
    assert not db.exists()


def test_good_files_in_every_form_still_load(tmp_path, ds):
    ids = list(ds.image_ids)
    x = _logits(ds)
    p = _probs(ds)
    forms = {
        "logits": _npy(tmp_path / "a.npy", x, ids),
        "probs": _npy(tmp_path / "b.npy", p, ids),
        "float16_probs": _npy(tmp_path / "c.npy", p.astype(np.float16), ids),
        "float64_shuffled_superset": _npy(
            tmp_path / "d.npy", np.concatenate([x, x[:1]])[::-1].astype(np.float64), [*ids, "extra.JPEG"][::-1]
        ),
        "parquet_probs": _parquet(tmp_path / "e.parquet", ids, list(p), "probs"),
    }
    crlf = _npy(tmp_path / "f.npy", x, ids)
    crlf.with_suffix(".ids.txt").write_bytes("\r\n".join(ids).encode() + b"\r\n")
    forms["crlf_ids"] = crlf
    db = tmp_path / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{f}") for f in forms.values()], db, progress=False)
    with connect(db, read_only=True) as con:
        top1 = dict(
            con.execute("SELECT model, avg((top1 = label)::INT) FROM predictions JOIN images USING (image_index) "
                        "GROUP BY model").fetchall()
        )  # fmt: skip
    assert set(top1.values()) == {1.0}, top1


def test_an_id_may_hold_any_character_but_a_newline(tmp_path, make_image):
    root = tmp_path / "ds"
    make_image(root / "n01440764" / "a\u2028b.png")  # str.splitlines() would cut this id in two
    make_image(root / "n01440764" / "c\x1cd.png", seed=1)
    ds = load_dataset(root)
    p = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    run_audit(ds, [resolve_model(f"preds:{p}")], tmp_path / "w.duckdb", progress=False)
