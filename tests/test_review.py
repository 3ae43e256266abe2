"""The review log: undo walks back a stack of decisions, and every reader agrees on the current label set.

The reference model is a per-image stack: a decision pushes its label set, an undo
pops one, the current label set is the top (or the given label when the stack is
empty). Random sequences of decisions and undos, written through the CLI, the
dashboard's write path and the store, are checked against it on what the CLI
prints, the dashboard's queries (gallery, review page, impact counts and metrics,
export summary), the relabeled metric of ``audit metrics`` and the exported files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from _oracle import naive_metrics
from _synth import make_imagefolder, make_predictions
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import queries as q
from audit.cli import main
from audit.datasets import load_dataset
from audit.errors import StoreError
from audit.pipeline import ENSEMBLE, run_audit
from audit.store import append_decision, connect, current_label_sets, decision_history
from audit.zoo import resolve_model

FLIP = (1, 4)  # every model's top-1 is label + 1 there: flagged
IMAGES = (0, 1, 2, 3)  # the images decisions are drawn on
ALL = q.Filters(kinds=(), reviewed="all")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images of 4 classes, two prediction files; tests empty ``decisions`` before use."""
    base = tmp_path_factory.mktemp("review")
    ds = load_dataset(make_imagefolder(base / "ds", per_class=2))
    ids, labels = list(ds.image_ids), ds.labels
    flip = np.array(FLIP)
    specs = [
        make_predictions(base / "a.npy", ids, labels, flip=flip, seed=1),
        make_predictions(base / "b.npy", ids, labels, flip=flip, seed=2),
    ]
    db = base / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{p}") for p in specs], db, progress=False)
    return db


def _reset(db: Path) -> None:
    # Test set-up only: the product never deletes a decision.
    with connect(db) as con:
        con.execute("DELETE FROM decisions")


def _given(db: Path) -> dict[int, list[int]]:
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT image_index, label FROM images ORDER BY image_index").fetchall()
    return {int(i): ([int(y)] if y is not None and y >= 0 else []) for i, y in rows}



def _cli_metrics(db):
    """What `audit metrics --format json` prints, as a frame: the CLI's side of "one metrics path"."""
    import pandas as pd

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["metrics", "--db", str(db), "--format", "json"]) == 0
    return pd.DataFrame(json.loads(out.getvalue()))

@dataclass(frozen=True)
class State:
    labels: tuple[int, ...]
    reviewed: bool


def label_state(db: Path, img: int) -> State:
    """One image's current label set and whether a decision is in effect, by the store's fold."""
    with connect(db, read_only=True) as con:
        sets, decided = current_label_sets(con)
    return State(tuple(sets[img]), bool(decided[img]))


# --------------------------------------------------------------------------- the stack, case by case


def test_undo_walks_back_one_decision_at_a_time(ws):
    _reset(ws)
    y = _given(ws)[0][0]
    append_decision(ws, 0, "relabel", labels=[(y + 1) % 4], reviewer="a")
    append_decision(ws, 0, "multi", labels=[y, (y + 2) % 4], reviewer="b")
    append_decision(ws, 0, "no_fit", reviewer="c")
    seen = [label_state(ws, 0).labels]
    for _ in range(3):
        append_decision(ws, 0, "undo", reviewer="d")
        seen.append(label_state(ws, 0).labels)
    assert seen == [(), tuple(sorted([y, (y + 2) % 4])), ((y + 1) % 4,), (y,)]
    assert not label_state(ws, 0).reviewed  # every decision undone: unreviewed again
    with pytest.raises(StoreError, match="nothing to undo"):
        append_decision(ws, 0, "undo", reviewer="d")
    hist = decision_history(ws, 0)  # append-only: three decisions, three undos, the refused undo wrote nothing
    assert hist["action"].tolist() == ["relabel", "multi", "no_fit", "undo", "undo", "undo"]
    # Each undo row records what it restored, and the label set it left.
    assert [list(x) for x in hist["new_labels"]][3:] == [sorted([y, (y + 2) % 4]), [(y + 1) % 4], [y]]
    assert [list(x) for x in hist["old_labels"]][3:] == [[], sorted([y, (y + 2) % 4]), [(y + 1) % 4]]


def test_a_decision_after_undo_goes_on_top_and_undone_ones_stay_undone(ws):
    _reset(ws)
    y = _given(ws)[2][0]
    append_decision(ws, 2, "relabel", labels=[(y + 1) % 4])  # d1
    append_decision(ws, 2, "relabel", labels=[(y + 2) % 4])  # d2
    append_decision(ws, 2, "undo")  # back to d1
    append_decision(ws, 2, "relabel", labels=[(y + 3) % 4])  # d3 on top of d1
    assert label_state(ws, 2).labels == ((y + 3) % 4,)
    append_decision(ws, 2, "undo")  # back to d1, not to the undone d2
    assert label_state(ws, 2).labels == ((y + 1) % 4,)
    append_decision(ws, 2, "undo")
    assert label_state(ws, 2).labels == (y,) and not label_state(ws, 2).reviewed


def test_undo_back_to_a_keep_leaves_the_image_reviewed(ws):
    """Keep, relabel, undo: the keep is in effect, so the image stays reviewed and counts as rejected."""
    _reset(ws)
    img = FLIP[0]
    y = _given(ws)[img][0]
    append_decision(ws, img, "keep", reviewer="ann")
    append_decision(ws, img, "relabel", labels=[(y + 1) % 4], reviewer="bob")
    append_decision(ws, img, "undo", reviewer="bob")
    d = q.image_detail(ws, img)
    assert d["reviewed"] and list(d["current_labels"]) == [y] and d["last_action"] == "keep"
    assert q.gallery(ws, q.Filters(reviewed="reviewed"), 0, 50)[1].image_index.tolist() == [img]
    c = q.decision_counts(ws)
    assert (c["reviewed"], c["rejected"], c["by_action"]) == (1, 1, {"keep": 1})
    assert q.run_summary(ws)["reviewed"] == 1
    labels = _labels_jsonl(q.export_files(ws))
    row = labels[_image_id(ws, img)]
    assert row["status"] == "kept" and row["source"].endswith("by ann") and row["labels"] == [y]


def test_cli_undo_with_nothing_to_undo_is_one_line_and_exit_2(ws, capsys):
    _reset(ws)
    assert main(["review", "3", "undo", "--db", str(ws)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("audit: error:") and "nothing to undo" in err and "\n" not in err
    assert main(["review", "3", "no_fit", "--db", str(ws), "--reviewer", "t"]) == 0
    assert "labels now: none (excluded)" in capsys.readouterr().out
    assert main(["review", "3", "undo", "--db", str(ws)]) == 0
    y = _given(ws)[3][0]
    assert f"labels now: {y} (no decision in effect" in capsys.readouterr().out
    assert main(["review", "3", "undo", "--db", str(ws)]) == 2
    assert "nothing to undo" in capsys.readouterr().err


def test_logs_written_before_the_stack_fold_by_the_same_rule(ws):
    """Rows an older audit wrote (an undo on an empty stack, an undo that re-applied) fold as a stack."""
    _reset(ws)
    given = _given(ws)
    y = given[0][0]
    rows = [  # image, action, new_labels as stored
        (0, "undo", [y]),  # undo with nothing to undo: pops nothing
        (0, "relabel", [(y + 1) % 4]),
        (0, "relabel", [(y + 2) % 4]),
        (0, "undo", [(y + 1) % 4]),
        (0, "undo", [(y + 2) % 4]),  # the old bug re-applied d2; the stack says: back to the given label
        (1, "keep", given[1]),
        (1, "undo", given[1]),
        (1, "undo", given[1]),  # pops nothing
        (1, "multi", [0, 1]),
    ]
    with connect(ws) as con:
        for img, action, new in rows:
            con.execute(
                "INSERT INTO decisions (image_index, image_id, old_labels, new_labels, action, reviewer, decided_at, "
                "reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [img, f"x{img}", [], new, action, "old", datetime(2024, 1, 1), ""],
            )
        sets, decided = current_label_sets(con)
    assert sets[0] == [y] and not decided[0]
    assert sets[1] == [0, 1] and decided[1]
    assert label_state(ws, 0).labels == (y,) and not label_state(ws, 0).reviewed
    with pytest.raises(StoreError, match="nothing to undo"):
        append_decision(ws, 0, "undo")
    append_decision(ws, 1, "undo")
    assert label_state(ws, 1).labels == tuple(given[1]) and not label_state(ws, 1).reviewed


# --------------------------------------------------------------------------- random sequences against a model


@dataclass
class Model:
    """The reference: a stack of (decision id, action, labels, reviewer) per image."""

    given: dict[int, list[int]]
    stacks: dict[int, list[tuple[int, str, list[int], str]]] = field(default_factory=dict)
    rows: int = 0

    def apply(self, img: int, did: int, action: str, labels: list[int], who: str) -> None:
        self.rows += 1
        stack = self.stacks.setdefault(img, [])
        if action == "undo":
            stack.pop()
            return
        new = {"multi": sorted(set(labels)), "no_fit": [], "duplicate": [], "keep": self.given[img]}.get(action, labels)
        stack.append((did, action, new, who))

    def can_undo(self, img: int) -> bool:
        return bool(self.stacks.get(img))

    def top(self, img: int) -> tuple[int, str, list[int], str] | None:
        stack = self.stacks.get(img)
        return stack[-1] if stack else None

    def current(self, img: int) -> list[int]:
        t = self.top(img)
        return self.given[img] if t is None else t[2]


_step = st.tuples(
    st.sampled_from(IMAGES),
    st.sampled_from(["accept", "relabel", "multi", "no_fit", "keep", "duplicate", "undo", "undo"]),
    st.lists(st.integers(0, 3), min_size=2, max_size=2, unique=True),
    st.sampled_from(["cli", "app", "store"]),
)


def _of(img: int) -> int | None:
    """The image a ``duplicate`` decision on ``img`` names: the next of IMAGES."""
    return IMAGES[(IMAGES.index(img) + 1) % len(IMAGES)]


def _write(db: Path, img: int, action: str, labels: list[int], via: str) -> tuple[int | None, str]:
    """Record one decision through ``via``; (decision id or None when refused, what the CLI printed)."""
    labels = labels[:1] if action in ("accept", "relabel") else labels if action == "multi" else []
    of = _of(img) if action == "duplicate" else None
    if via == "cli":
        out, err = io.StringIO(), io.StringIO()
        argv = ["review", str(img), action, "--db", str(db), "--reviewer", "cli"]
        argv += ["--labels", ",".join(map(str, labels))] if labels else []
        argv += ["--of", str(of)] if of is not None else []
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        if rc != 0:
            assert rc == 2 and "nothing to undo" in err.getvalue() and err.getvalue().count("\n") == 1
            return None, ""
        return int(re.match(r"decision (\d+) recorded", out.getvalue()).group(1)), out.getvalue()
    write = q.record_decision if via == "app" else append_decision
    try:
        return write(db, img, action, labels=labels, reviewer=via, of=of), ""
    except StoreError as e:
        assert "nothing to undo" in str(e)
        return None, ""


def _image_id(db: Path, img: int) -> str:
    with connect(db, read_only=True) as con:
        return con.execute("SELECT image_id FROM images WHERE image_index = ?", [img]).fetchall()[0][0]


def _labels_jsonl(files: dict[str, bytes]) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, files["labels.jsonl"].decode().splitlines())}


@dataclass(frozen=True)
class Facts:
    """What the checks need from the workspace, read once."""

    given: dict[int, list[int]]
    ids: dict[int, str]
    suggested: dict[int, int]
    flagged: set[int]
    top1: dict[str, dict[int, int]]  # model -> image -> top-1, for the models with metrics


@pytest.fixture(scope="module")
def facts(ws: Path) -> Facts:
    with connect(ws, read_only=True) as con:
        ids = dict(con.execute("SELECT image_index, image_id FROM images").fetchall())
        suggested = dict(con.execute("SELECT image_index, suggested_label FROM label_issues").fetchall())
        flagged = {r[0] for r in con.execute("SELECT image_index FROM label_issues WHERE is_label_issue").fetchall()}
        top1: dict[str, dict[int, int]] = {}
        for (m,) in con.execute("SELECT DISTINCT model FROM metrics").fetchall():
            sql = "SELECT image_index, top_classes[1] FROM predictions WHERE model = ?"
            top1[m] = dict(con.execute(sql, [m]).fetchall())
    return Facts(_given(ws), ids, suggested, flagged, top1)


# Few, long-ish examples: each write and each check opens the workspace (tens of ms apiece).
@settings(max_examples=10, deadline=None)
@given(steps=st.lists(_step, max_size=9))
def test_random_decisions_and_undos_agree_everywhere(ws, facts, steps):
    _reset(ws)
    model = Model(facts.given)
    for img, action, labels, via in steps:
        did, printed = _write(ws, img, action, labels, via)
        if action == "undo" and not model.can_undo(img):
            assert did is None
            continue
        assert did is not None
        model.apply(img, did, action, labels[:1] if action in ("accept", "relabel") else labels, via)
        if via == "cli":
            now = model.current(img)
            assert f"labels now: {' '.join(map(str, now)) if now else 'none (excluded)'} (" in printed
    images = sorted(model.given)
    current = {i: model.current(i) for i in images}
    tops = {i: model.top(i) for i in images}
    reviewed = {i for i in images if tops[i]}
    # The store's fold (what `audit metrics` and `audit run` read for the relabeled metric).
    with connect(ws, read_only=True) as con:
        sets, decided = current_label_sets(con)
    assert sets == [current[i] for i in images]
    assert {i for i in images if decided[i]} == reviewed
    # The dashboard's queries, on one connection as a page render uses them.
    with q.Reader(ws) as r:
        _, g = q.gallery(r, ALL, 0, 100)
        g = g.set_index("image_index")
        assert {i: list(g.loc[i, "current_labels"]) for i in images} == current
        assert {i for i in images if g.loc[i, "reviewed"]} == reviewed
        assert set(q.gallery(r, q.Filters(kinds=(), reviewed="reviewed"), 0, 100)[1].image_index) == reviewed
        for i in sorted({s[0] for s in steps}):
            d = q.image_detail(r, i)
            assert list(d["current_labels"]) == current[i] and bool(d["reviewed"]) == (i in reviewed)
            assert d["last_action"] == (tops[i][1] if tops[i] else None)
        c = q.decision_counts(r)
        dash_metrics = q.metrics_table(r)
        summary = q.export_summary(r)
    assert c["decisions"] == model.rows and c["reviewed"] == len(reviewed)
    by_action: dict[str, int] = {}
    for i in reviewed:
        by_action[tops[i][1]] = by_action.get(tops[i][1], 0) + 1
    assert c["by_action"] == by_action
    # A copy excluded as a duplicate is reviewed, but says nothing of its flag: not a reviewed flag.
    rf = [i for i in reviewed if i in facts.flagged and tops[i][1] != "duplicate"]
    assert c["duplicates"] == sum(tops[i][1] == "duplicate" for i in reviewed)
    kept = sum(sorted(current[i]) == facts.given[i] for i in rf)
    took = sum(current[i] == [facts.suggested[i]] and sorted(current[i]) != facts.given[i] for i in rf)
    assert (c["reviewed_flagged"], c["rejected"], c["accepted"]) == (len(rf), kept, took)
    # The relabeled metric, brute force from the model, as the dashboard and `audit metrics` compute it.
    n = sum(bool(current[i]) for i in images)
    expected = {m: sum(t[i] in current[i] for i in images) / n for m, t in facts.top1.items()}
    assert ENSEMBLE in expected
    for table in (dash_metrics, naive_metrics(ws), _cli_metrics(ws)):
        rows = table[(table.evaluation == "relabeled") & (table.metric == "top1")].set_index("model")
        assert {m: int(rows.loc[m, "n"]) for m in expected} == {m: n for m in expected}
        assert {m: float(rows.loc[m, "value"]) for m in expected} == pytest.approx(expected)
    # The export, as `audit export` writes it and the dashboard offers it.
    files = q.export_files(ws)
    ids = facts.ids
    js = _labels_jsonl(files)
    assert {i: js[ids[i]]["labels"] for i in images} == current
    assert {i: js[ids[i]]["reason"] for i in reviewed if tops[i][1] == "duplicate"} == {
        i: f"duplicate of {ids[_of(i)]}" for i in reviewed if tops[i][1] == "duplicate"
    }
    assert {i: js[ids[i]]["source"] for i in images} == {
        i: f"decision {t[0]} by {t[3]}" if t else "given" for i, t in tops.items()
    }
    table = list(csv.DictReader(io.StringIO(files["labels.csv"].decode())))
    assert {r["image"]: r["labels"] for r in table} == {ids[i]: " ".join(map(str, current[i])) for i in images}
    assert summary["changed"] == sum(i in reviewed and current[i] != facts.given[i] for i in images)
    assert summary["excluded"] == sum(not current[i] for i in images)
    listing = files["imagefolder.txt"].decode().splitlines()
    assert len(listing) == sum(len(current[i]) for i in images)
