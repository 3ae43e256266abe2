"""A custom label space end to end in real headless Chromium (issue 10's "Done when").

The workspace is made the way a user makes one: a flat folder of seeded images, a label file of the team's
own classes (``daisy`` among them, which is also an ImageNet class, hence ``--label-space custom``), a
``--truth`` file that corrects some of the given labels, and a zoo-shaped model (a random-weights
SqueezeNet 1.1 checkpoint, 1000 ImageNet logits and penultimate features) run through ``audit run``. The
run fits cross-validated softmax and sigmoid heads on the features; random weights make them weak. Every
page must render without an exception and show what the workspace holds: the heads as models, the truth
evaluation and the flags scored against it, the weak-heads warning, the custom classes as the review's
choices with what the ImageNet logits see; a relabel to a custom class recorded in the browser must reach
the impact page and the export.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from _synth import make_checkpoint
from test_browser import TIMEOUT_MS, browser, open_options, settled, visit_page  # noqa: F401 - the browser fixture

from audit import queries as q
from audit.cli import main
from audit.dashboard.serve import serve
from audit.store import connect

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOT = ROOT / "reports" / "screenshots" / "custom-space-review.png"
CLASSES = ("scratch", "dent", "ok", "daisy")  # "daisy" is also ImageNet class 985
N = 48  # 12 images a class: the default 10 folds apply
WRONG = (3, 10, 17, 25, 34, 41)  # the truth file says these given labels are wrong (rows in file-name order)
# The accessible <table> Streamlit's data grid keeps beside its canvas: rows of cell texts, header first.
_TABLE_JS = (
    "e => [...e.querySelectorAll('table tr')]"
    ".map(r => [...r.querySelectorAll('th, td')].map(c => c.textContent))"
)


@pytest.fixture
def custom_ws(tmp_path, make_image, capsys) -> Path:
    root = tmp_path / "parts"
    given, truth = ["path,label"], ["path,label"]
    for k in range(N):
        make_image(root / f"part{k:02d}.png", size=(40, 32), seed=k)
        c = k % len(CLASSES)
        truth.append(f"part{k:02d}.png,{CLASSES[c]}")
        given.append(f"part{k:02d}.png,{CLASSES[(c + 1) % len(CLASSES) if k in WRONG else c]}")
    (tmp_path / "labels.csv").write_text("\n".join(given) + "\n")
    (tmp_path / "truth.csv").write_text("\n".join(truth) + "\n")
    model = make_checkpoint(tmp_path / "ckpt" / "squeezenet.pth", arch="squeezenet1_1")
    db = tmp_path / "w.duckdb"
    argv = ["run", str(root), "--labels", str(tmp_path / "labels.csv"), "--truth", str(tmp_path / "truth.csv")]
    assert main([*argv, "--label-space", "custom", "--models", model, "--db", str(db), "-q"]) == 0
    assert "heads agree with the given labels" in capsys.readouterr().err
    return db


def _cells(page, index: int = 0) -> dict[str, dict[str, str]]:
    """The ``index``-th data grid of the page as {first cell of a row: {column: cell}}."""
    grid = page.get_by_test_id("stDataFrame").nth(index)
    grid.locator("table tr").nth(1).wait_for(state="attached")  # the grid draws its table after the frame
    rows = grid.evaluate(_TABLE_JS)
    head, *body = rows
    return {r[0]: dict(zip(head, r, strict=True)) for r in body}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def test_custom_space_workspace_reviewed_end_to_end_in_chromium(custom_ws, browser, tmp_path):  # noqa: F811
    db = custom_ws
    summary, m = q.run_summary(db), q.metrics_table(db)
    (base,) = [x for x in summary["models"] if "+" not in x]
    heads = [f"{base}+softmax-head", f"{base}+sigmoid-head"]
    assert set(summary["models"]) == {base, *heads} and summary["flagged"] > 0
    warning, flag_line = q.heads_warning(db), q.flags_vs_truth(m)
    assert warning and flag_line and "over 48 images" in flag_line
    classes = q.classes(db)
    options = [f"{n} · {i}" for i, n in zip(classes["class_index"], classes["name"], strict=True)]
    assert sorted(classes["name"]) == sorted(CLASSES)  # the label file's names, not ImageNet's
    with serve(db, log=tmp_path / "streamlit.log", env={"AUDIT_REVIEWER": "browser"}) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)


        # Overview: the heads are the evaluated models, weak ones are said to be; the truth evaluation.
        body = visit_page(page, url, "page=overview", "Overview")
        assert "Heads too weak to trust" in body and warning in body
        assert f"models: {', '.join(summary['models'])}" in body and "custom)" in body
        assert flag_line in body and "truth 48" in body
        table = _cells(page)
        assert set(table) == {*heads, q.ENSEMBLE}  # the ImageNet model is stored, not evaluated
        truth = m[(m["evaluation"] == "truth") & (m["metric"] == "top1")].set_index("model")["value"]
        for model, row in table.items():
            assert row["truth top1"].startswith(_pct(truth[model]) + " ("), (model, row)
        visit_page(page, url, "page=disagreements", "Disagreements")
        # Streamlit loads some widgets' code lazily: a finished script run can show the gallery before the
        # metric and the filters have mounted, so wait for the element the assertion reads.
        page.get_by_test_id("stMetric").filter(has_text="matching images").wait_for()
        body = settled(page)
        assert f"{summary['flagged']:,}" in body and "\ngiven " in body

        # Review: a flagged image, the custom classes as choices, what the zoo's ImageNet logits see.
        body = visit_page(page, url, "page=review", "Review")
        # The image checks ran too (real pixels), so the queue names the check filter: the label check's issues.
        page.get_by_text(re.compile(r"^Queue: an issue of the checks selected")).wait_for()
        assert "checks selected: label" in settled(page)
        first = int(re.search(r"image #(\d+)", page.get_by_text(re.compile(r"· image #\d+")).inner_text()).group(1))
        d = q.image_detail(db, first)
        assert d["is_label_issue"] and f"given label: {d['given']} · {d['label']}" in body
        assert f"suggested {d['suggested']} (" in body  # a class, or "(no class fits)": never "-1"
        (seen,) = q.imagenet_sees(d)  # the checkpoint's 1000 logits; the heads are not ImageNet's
        assert seen.startswith(f"ImageNet sees ({base}): ") and seen.count("%") == 3 and seen in body
        # The main area only: the sidebar shows the workspace path, a new temporary folder on every run.
        page.get_by_test_id("stMain").screenshot(path=str(SHOT))
        picker = page.get_by_role("combobox", name=re.compile("Relabel to one class"))
        open_options(page, picker)
        assert page.get_by_role("option").all_inner_texts() == options
        target = next(c for c in ("daisy", "scratch") if c != d["given"])
        page.get_by_role("option", name=f"{target} · ", exact=False).click()
        page.get_by_role("button", name=re.compile(r"^Relabel")).click()
        page.get_by_text(re.compile(r"Decision 1 saved: relabel")).wait_for()
        settled(page)
        # The next flagged image: accept its suggestion, which for a no_fit flag is that no class fits.
        second = int(re.search(r"image #(\d+)", page.get_by_text(re.compile(r"· image #\d+")).inner_text()).group(1))
        assert second != first
        d2 = q.image_detail(db, second)
        took = "accept" if d2["suggested_label"] is not None else "no_fit"
        page.get_by_role("button", name="Accept suggestion").click()
        page.get_by_text(re.compile(rf"Decision 2 saved: {took} on image #{second}")).wait_for()
        settled(page)

        # Impact: both decisions, both on flags, both took the flag's suggestion or changed the label.
        body = visit_page(page, url, "page=impact", "Impact of the review")
        reviewed = page.get_by_test_id("stMetric").filter(has_text="flags reviewed").inner_text()
        assert f"2 / {summary['flagged']}" in reviewed and flag_line in body
        imp = q.impact(q.metrics_table(db)).set_index("model")
        impact = _cells(page)
        assert set(impact) == {*heads, q.ENSEMBLE}
        for model, row in impact.items():
            assert row["relabeled top-1"].startswith(_pct(imp.at[model, "relabeled"]) + " ("), (model, row)
            assert row["truth top-1"].startswith(_pct(imp.at[model, "truth"]) + " ("), (model, row)

        # Export: the cleaned labels, downloaded from the page, are what `audit export` writes.
        visit_page(page, url, "page=export", "Export the cleaned labels")
        with page.expect_download() as download:
            page.get_by_role("button", name="labels.csv").click()
        downloaded = Path(download.value.path()).read_bytes()
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT image_index, action, new_labels, reviewer FROM decisions ORDER BY 1").fetchall()
    index = dict(zip(classes["name"], classes["class_index"], strict=True))
    want = {first: ("relabel", [index[target]]), second: (took, [d2["suggested_label"]] if took == "accept" else [])}
    assert {i: (a, lab) for i, a, lab, _ in rows} == want and {r[3] for r in rows} == {"browser"}
    assert q.decision_counts(db)["accepted"] == 1  # the second decision took the suggestion, whichever it was
    assert SHOT.stat().st_size > 10_000
    out = tmp_path / "export"
    assert main(["export", "--db", str(db), "--out", str(out)]) == 0
    assert downloaded == (out / "labels.csv").read_bytes()
    by_image = {r["image"]: r for r in csv.DictReader(io.StringIO(downloaded.decode()))}
    row = by_image[d["image_id"]]
    assert (row["label"], row["status"]) == (str(index[target]), "relabeled") and "browser" in row["source"]
    second_row = by_image[d2["image_id"]]
    assert second_row["status"] == ("excluded" if took == "no_fit" else "relabeled")
    assert second_row["label"] == ("" if took == "no_fit" else str(d2["suggested_label"]))
    assert f"{target}/{d['image_id']}" in (out / "imagefolder.txt").read_text().splitlines()
