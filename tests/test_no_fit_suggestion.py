"""A flag's suggestion that is not a class: "no class fits" (a no_fit flag) or none (an image not assessed).

label_issues stores both as ``suggested_label = -1``. The read side hands neither to the dashboard as a class:
the Review page offered -1 as a default label and stopped with StreamlitDefaultNotInOptionsError on every
no_fit flag (weak heads in a custom space give many) and on every unreadable image; the gallery showed
"→ -1". Now the suggestion reads "(no class fits)", accepting it records ``no_fit``, and the impact page
counts that as taking the suggestion.
"""

from __future__ import annotations

from pathlib import Path

from _synth import make_checkpoint, make_imagefolder
from streamlit.testing.v1 import AppTest
from test_headmodels import _setup, parts  # noqa: F401 - the parts fixture

from audit import queries as q
from audit.cli import main
from audit.store import connect

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _review(db: Path, image: int, monkeypatch) -> AppTest:
    monkeypatch.setenv("AUDIT_DB", str(db))
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "review"
    at.query_params["image"] = str(image)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["image"] == image
    return at


def test_a_no_fit_flag_suggests_no_class_and_accepting_it_records_no_fit(tmp_path, parts, monkeypatch):  # noqa: F811
    argv, _ = _setup(tmp_path, parts, monkeypatch, sep=0.0)  # weak heads: flat predictions, no_fit flags
    db = tmp_path / "w.duckdb"
    assert main([*argv, "--db", str(db)]) == 0
    with connect(db, read_only=True) as con:
        no_fit = [
            r[0]
            for r in con.execute(
                "SELECT image_index FROM label_issues WHERE is_label_issue AND suggested_label < 0 "
                "ORDER BY label_quality, image_index"
            ).fetchall()
        ]
    assert no_fit, "the weak heads were expected to flag images that no class fits"
    img = no_fit[0]
    d = q.image_detail(db, img)
    assert d["issue_kind"] == "no_fit" and d["suggested_label"] is None and d["suggested"] == q.NO_FIT
    _, g = q.gallery(db, q.Filters(kinds=("flagged",), reviewed="all"), 0, 100)
    row = g.set_index("image_index").loc[img]
    assert row["suggested_label"] is None and row["suggested"] == q.NO_FIT
    assert q.flagged_issues(db).set_index("image_index").at[img, "suggested"] == q.NO_FIT  # audit issues
    at = _review(db, img, monkeypatch)
    assert any(f"suggested {q.NO_FIT} (" in t.value for t in at.text)
    assert -1 not in at.multiselect(key=f"multi_to_{img}").value
    at.button(key="do_accept").click().run()
    assert not at.exception, [e.value for e in at.exception]
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT image_index, action, new_labels FROM decisions").fetchall() == [(img, "no_fit", [])]
    c = q.decision_counts(db)
    assert (c["accepted"], c["other_change"], c["reviewed_flagged"]) == (1, 0, 1)


def test_an_unreadable_image_has_no_suggestion_and_its_review_page_renders(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "ds", per_class=3)
    bad = sorted((root / "val").rglob("*.JPEG"))[1]
    bad.write_bytes(b"not an image")
    db = tmp_path / "w.duckdb"
    model = make_checkpoint(tmp_path / "m.pth")
    assert main(["run", str(root), "--models", model, "--db", str(db), "-q"]) == 0
    with connect(db, read_only=True) as con:
        (img,) = con.execute("SELECT image_index FROM bad_images").fetchone()
        assert con.execute("SELECT suggested_label FROM label_issues WHERE image_index = ?", [img]).fetchone() == (-1,)
    d = q.image_detail(db, img)
    assert d["bad_reason"] and d["suggested_label"] is None and d["suggested"] is None
    at = _review(db, img, monkeypatch)
    assert at.button(key="do_accept").disabled
    offered = at.multiselect(key=f"multi_to_{img}").value  # the given label and its ReaL labels, never -1
    assert offered[0] == d["label"] and all(x >= 0 for x in offered)
