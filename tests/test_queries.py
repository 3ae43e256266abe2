"""The dashboard's read side (audit.queries) on a small synthetic workspace, checked against brute force."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _oracle import naive_metrics
from _synth import make_imagefolder, make_predictions

from audit import queries as q
from audit.datasets import load_dataset
from audit.errors import StoreError, UserError
from audit.export import export_labels
from audit.pipeline import ENSEMBLE, run_audit
from audit.store import connect
from audit.zoo import resolve_model

ROOT = Path(__file__).resolve().parents[1]
FLIP = (1, 7, 13)  # every model's top-1 is label + 1 there: flagged wrong labels
ODD = (20,)  # only model c disagrees there: the models disagree with each other


def make_workspace(base: Path) -> tuple[Path, Path]:
    """24 images of 4 classes, three prediction files; returns (db, dataset root)."""
    root = make_imagefolder(base / "ds")
    ds = load_dataset(root)
    ids, labels = list(ds.image_ids), ds.labels
    flip = np.array(FLIP)
    specs = [
        make_predictions(base / "a.npy", ids, labels, flip=flip, seed=1),
        make_predictions(base / "b.npy", ids, labels, flip=flip, seed=2, probs=True),
        make_predictions(base / "c.npy", ids, labels, flip=np.array(FLIP + ODD), seed=3),
    ]
    db = base / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{p}") for p in specs], db, progress=False, checks="label")
    return db, ds.root


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_workspace(tmp_path_factory.mktemp("dash"))


@pytest.fixture
def ws(base_workspace: tuple[Path, Path], tmp_path: Path) -> Path:
    """A fresh copy of the session's workspace (decisions start empty)."""
    db = tmp_path / "copy.duckdb"
    shutil.copy(base_workspace[0], db)
    return db


def _labels(db: Path) -> dict[int, int]:
    with connect(db, read_only=True) as con:
        return dict(con.execute("SELECT image_index, label FROM images").fetchall())


def _top1(db: Path) -> dict[str, dict[int, int]]:
    with connect(db, read_only=True) as con:
        out: dict[str, dict[int, int]] = {}
        for m, i, t in con.execute("SELECT model, image_index, top1 FROM predictions").fetchall():
            out.setdefault(m, {})[i] = t
    return out


def _metric(df, model, evaluation, metric="top1"):
    row = df[(df.model == model) & (df.evaluation == evaluation) & (df.metric == metric)]
    assert len(row) == 1
    return row.iloc[0]


# --------------------------------------------------------------------------- metrics


def test_metrics_table_matches_a_recomputation_from_scratch_through_every_action(ws):
    labels = _labels(ws)
    cols = ["model", "evaluation", "metric", "n", "params"]

    def same():
        a, b = q.metrics_table(ws), naive_metrics(ws)
        assert a[cols].equals(b[cols])
        np.testing.assert_allclose(
            a[["value", "low", "high"]].to_numpy(float), b[["value", "low", "high"]].to_numpy(float)
        )

    same()
    q.record_decision(ws, 1, "accept", labels=[labels[1] + 1], reviewer="t")
    q.record_decision(ws, 7, "relabel", labels=[999], reviewer="t")
    q.record_decision(ws, 13, "multi", labels=[labels[13], labels[13] + 1], reviewer="t")
    q.record_decision(ws, 2, "no_fit", reviewer="t")
    q.record_decision(ws, 3, "keep", reviewer="t")
    same()
    q.record_decision(ws, 7, "undo", reviewer="t")
    q.record_decision(ws, 2, "undo", reviewer="t")
    same()
    m = q.metrics_table(ws)
    assert _metric(m, ENSEMBLE, "relabeled").n == 24
    # 1 accepted to the models' answer, 13 multi-labelled with it, 7 back to its (wrong) given label.
    assert _metric(m, ENSEMBLE, "relabeled").value == pytest.approx(23 / 24)


def test_rank_table_and_impact():
    import pandas as pd

    m = pd.DataFrame(
        [
            ("a", "original", "top1", 0.80),
            ("b", "original", "top1", 0.79),
            ("a", "real", "top1", 0.85),
            ("b", "real", "top1", 0.87),
            ("a", "relabeled", "top1", 0.81),
            ("b", "relabeled", "top1", 0.83),
            (ENSEMBLE, "original", "top1", 0.9),
            (ENSEMBLE, "relabeled", "top1", 0.9),
        ],
        columns=["model", "evaluation", "metric", "value"],
    ).assign(low=0.0, high=1.0, n=100)
    r = q.rank_table(m)
    assert ENSEMBLE not in r.index
    assert r.loc["a"].tolist() == [1, 2, 2] and r.loc["b"].tolist() == [2, 1, 1]
    imp = q.impact(m).set_index("model")
    assert imp.loc["b", "delta_vs_original"] == pytest.approx(0.04)
    assert imp.loc["b", "delta_vs_real"] == pytest.approx(-0.04)
    assert imp.loc["b", "rank_change"] == 1 and imp.loc["a", "rank_change"] == -1
    assert pd.isna(imp.loc[ENSEMBLE, "rank_original"])


# --------------------------------------------------------------------------- gallery and queue


def _brute(db: Path, f: q.Filters) -> list[int]:
    """Image indices matching f, recomputed in Python from the raw tables (order ignored)."""
    labels, top1 = _labels(db), _top1(db)
    base = [m for m in top1 if m != ENSEMBLE]
    with connect(db, read_only=True) as con:
        issues = {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT image_index, is_label_issue, label_quality, issue_kind, suggested_label FROM label_issues"
            ).fetchall()
        }
        real = dict(con.execute("SELECT image_index, real_labels FROM images").fetchall())
        log = con.execute("SELECT image_index, action FROM decisions ORDER BY decision_id").fetchall()
    depth: dict[int, int] = {}  # the review log is a stack per image: undo pops the newest decision in effect
    for i, action in log:
        depth[i] = max(0, depth.get(i, 0) + (-1 if action == "undo" else 1))
    out = []
    for i, y in labels.items():
        ms = base if f.model is None else [f.model]
        flagged, quality, kind, sugg = issues[i]
        shows = {
            "flagged": flagged,
            "label": any(top1[m][i] != y for m in ms),
            "models": len({top1[m][i] for m in base}) > 1,
            "real": bool(real[i]) and any(top1[m][i] not in real[i] for m in ms),
        }
        if f.kinds and not any(shows[k] for k in f.kinds):
            continue
        if f.issue_kinds and kind not in f.issue_kinds:
            continue
        if f.class_index is not None and f.class_index not in {y, sugg, *(top1[m][i] for m in top1)}:
            continue
        if f.quality != (0.0, 1.0) and not f.quality[0] <= quality <= f.quality[1]:
            continue
        reviewed = depth.get(i, 0) > 0
        if (f.reviewed == "reviewed" and not reviewed) or (f.reviewed == "unreviewed" and reviewed):
            continue
        out.append(i)
    return out


@pytest.mark.parametrize(
    "f",
    [
        q.Filters(),
        q.Filters(kinds=(), reviewed="all"),
        q.Filters(kinds=("label",), reviewed="all"),
        q.Filters(kinds=("models",), reviewed="all"),
        q.Filters(kinds=("real",), reviewed="all"),
        q.Filters(kinds=("label",), model="preds:c", reviewed="all"),
        q.Filters(kinds=("label", "real"), model=ENSEMBLE, reviewed="all"),
        q.Filters(kinds=(), class_index=1, reviewed="all"),
        q.Filters(kinds=(), quality=(0.0, 0.5), reviewed="all"),
        q.Filters(kinds=(), issue_kinds=("wrong_label",), reviewed="all"),
    ],
)
def test_gallery_filters_match_brute_force(ws, f):
    expected = _brute(ws, f)
    total, df = q.gallery(ws, f, 0, 100)
    assert total == len(expected)
    assert sorted(df.image_index.tolist()) == sorted(expected)


@pytest.mark.parametrize("reviewed", ["reviewed", "unreviewed"])
def test_reviewed_filter_follows_the_undo_stack(ws, reviewed):
    """Reviewed = a decision is in effect: undoing back onto a keep stays reviewed, undoing everything does not."""
    labels = _labels(ws)
    a, b, c = FLIP
    q.record_decision(ws, a, "keep", reviewer="t")
    q.record_decision(ws, a, "relabel", labels=[labels[a] + 2], reviewer="t")
    q.record_decision(ws, a, "undo", reviewer="t")  # the keep is in effect again
    q.record_decision(ws, b, "accept", labels=[labels[b] + 1], reviewer="t")
    q.record_decision(ws, b, "no_fit", reviewer="t")
    q.record_decision(ws, b, "undo", reviewer="t")
    q.record_decision(ws, b, "undo", reviewer="t")  # every decision undone
    q.record_decision(ws, c, "no_fit", reviewer="t")
    f = q.Filters(kinds=(), reviewed=reviewed)
    expected = _brute(ws, f)
    assert ({a, c} <= set(expected)) == (reviewed == "reviewed") and (b in expected) == (reviewed == "unreviewed")
    total, df = q.gallery(ws, f, 0, 100)
    assert total == len(expected) and sorted(df.image_index.tolist()) == sorted(expected)
    assert q.queue_window(ws, f, a)[0] == len(expected)


def test_gallery_rows_carry_what_a_card_shows(ws):
    _, df = q.gallery(ws, q.Filters(), 0, 24)
    assert set(FLIP) <= set(df.image_index)
    row = df.set_index("image_index").loc[FLIP[0]]
    assert row.given and row.suggested and row.issue_kind == "wrong_label" and not row.reviewed
    models = [m for m, _ in row.top3]
    assert models[-1] == ENSEMBLE and len(models) == 4
    assert all(len(top) == 3 for _, top in row.top3)
    assert row.top3[0][1][0][0] == row.suggested_label  # every model's top-1 is the suggestion
    assert df.label_quality.is_monotonic_increasing  # worst first


def test_gallery_sorts_pages_and_reviewed_filter(ws):
    f = q.Filters(kinds=(), reviewed="all", sort="image")
    total, first = q.gallery(ws, f, 0, 10)
    _, second = q.gallery(ws, f, 1, 10)
    _, last = q.gallery(ws, f, 2, 10)
    _, beyond = q.gallery(ws, f, 99, 10)  # past the end: the last page
    assert total == 24 and first.image_id.tolist() == sorted(first.image_id)
    assert first.image_id.iloc[-1] < second.image_id.iloc[0] and second.image_id.iloc[-1] < last.image_id.iloc[0]
    assert len(last) == 4 and beyond.image_id.tolist() == last.image_id.tolist()
    desc = q.gallery(ws, q.Filters(kinds=(), reviewed="all", sort="quality_desc"), 0, 24)[1]
    assert desc.label_quality.is_monotonic_decreasing
    q.record_decision(ws, FLIP[0], "keep", reviewer="t")
    assert FLIP[0] not in q.gallery(ws, q.Filters(), 0, 50)[1].image_index.tolist()
    rev = q.gallery(ws, q.Filters(reviewed="reviewed"), 0, 50)[1]
    assert rev.image_index.tolist() == [FLIP[0]] and bool(rev.reviewed.iloc[0])
    q.record_decision(ws, FLIP[0], "undo", reviewer="t")  # back to the given label: unreviewed again
    assert FLIP[0] in q.gallery(ws, q.Filters(), 0, 50)[1].image_index.tolist()


def test_pair_filter_and_confused_pairs(ws):
    labels = _labels(ws)
    pairs = q.confused_pairs(ws, ENSEMBLE, 10)
    expected: dict[tuple[int, int], int] = {}
    for i in FLIP:
        a, b = labels[i], labels[i] + 1
        expected[(min(a, b), max(a, b))] = expected.get((min(a, b), max(a, b)), 0) + 1
    got = {(r.a, r.b): r.total for r in pairs.itertuples()}
    assert got == expected
    assert (pairs.a_to_b + pairs.b_to_a == pairs.total).all() and pairs.a_name.notna().all()
    a, b = next(iter(expected))
    total, _ = q.gallery(ws, q.Filters(kinds=(), pair=(a, b), reviewed="all"), 0, 50)
    assert total == expected[(a, b)]
    with pytest.raises(UserError, match="no predictions"):
        q.confused_pairs(ws, "nope'; DROP TABLE images; --", 5)


def test_queue_window_follows_gallery_order(ws):
    f = q.Filters(kinds=("label", "real"), reviewed="all", sort="disagree")
    total, order = q.gallery(ws, f, 0, 100)
    ids = order.image_index.tolist()
    n, pos, window = q.queue_window(ws, f, ids[2], 2)
    assert (n, pos) == (total, 2)
    assert window.image_index.tolist() == ids[0:5] and window.pos.tolist() == list(range(5))
    assert window.given.notna().all()
    outside = next(i for i in range(24) if i not in ids) if len(ids) < 24 else None
    n, pos, window = q.queue_window(ws, f, outside, 1)  # not in the queue: its head
    assert pos is None and window.image_index.tolist() == ids[:3]
    for k in (0, len(ids) // 2, len(ids) - 1):  # the head, the middle and the tail: the window is cut at the ends
        n, pos, window = q.queue_window(ws, f, ids[k], 3)
        assert (n, pos) == (total, k) and window.image_index.tolist() == ids[max(0, k - 3) : k + 4]
        assert window.pos.tolist() == list(range(max(0, k - 3), min(len(ids), k + 4)))
    n, pos, window = q.queue_window(ws, q.Filters(images=()), None)  # an empty queue
    assert (n, pos) == (0, None) and window.empty
    assert list(window.columns) == ["pos", "image_index", "image_id", "label", "given"]


def test_selection_keeps_exactly_its_images_in_queue_order(ws):
    f = q.Filters(kinds=(), reviewed="all")
    _, order = q.gallery(ws, f, 0, 100)
    ids = order.image_index.tolist()
    picked = (ids[5], ids[1], ids[9], 10_000)  # any order; an index not in the workspace matches nothing
    sel = q.Filters(kinds=(), reviewed="all", images=picked)
    total, page = q.gallery(ws, sel, 0, 100)
    assert total == 3 and page.image_index.tolist() == [ids[1], ids[5], ids[9]]  # the sort's order, not the pick's
    n, pos, window = q.queue_window(ws, sel, ids[5])
    assert (n, pos) == (3, 1) and window.image_index.tolist() == [ids[1], ids[5], ids[9]]


def test_dataset_root_is_the_run_summarys(ws):
    assert q.dataset_root(ws) == q.run_summary(ws)["dataset_root"] is not None


def test_image_detail_and_history(ws):
    labels = _labels(ws)
    d = q.image_detail(ws, FLIP[0])
    assert d["image_index"] == FLIP[0] and d["is_label_issue"] and not d["reviewed"]
    assert [m for m, _ in d["predictions"]][-1] == ENSEMBLE and len(d["predictions"][0][1]) == 5
    assert d["history"].empty and list(d["current_labels"]) == [labels[FLIP[0]]]
    q.record_decision(ws, FLIP[0], "accept", labels=[labels[FLIP[0]] + 1], reviewer="ann", reason="clearly")
    q.record_decision(ws, FLIP[0], "no_fit", reviewer="bob")
    d = q.image_detail(ws, FLIP[0])
    assert d["reviewed"] and list(d["current_labels"]) == [] and d["last_action"] == "no_fit"
    h = d["history"]
    assert h.action.tolist() == ["accept", "no_fit"] and h.reviewer.tolist() == ["ann", "bob"]
    assert h.reason.iloc[0] == "clearly" and h.new.iloc[1] == "(no class fits)"
    assert q.image_detail(ws, 10_000) is None


def test_decision_counts_and_precision(ws):
    labels = _labels(ws)
    c = q.decision_counts(ws)
    assert c["reviewed"] == 0 and np.isnan(c["precision"]) and c["flagged"] >= len(FLIP)
    q.record_decision(ws, FLIP[0], "accept", labels=[labels[FLIP[0]] + 1], reviewer="t")
    q.record_decision(ws, FLIP[1], "no_fit", reviewer="t")
    q.record_decision(ws, FLIP[2], "keep", reviewer="t")
    unflagged = next(i for i in range(24) if i not in FLIP and i not in ODD)
    q.record_decision(ws, unflagged, "relabel", labels=[5], reviewer="t")
    c = q.decision_counts(ws)
    assert (c["reviewed"], c["reviewed_flagged"], c["accepted"], c["rejected"], c["other_change"]) == (4, 3, 1, 1, 1)
    assert c["precision"] == pytest.approx(2 / 3) and c["precision_low"] < 2 / 3 < c["precision_high"]
    assert c["decisions"] == 4 and c["by_action"]["keep"] == 1
    q.record_decision(ws, FLIP[0], "undo", reviewer="t")
    assert q.decision_counts(ws)["reviewed_flagged"] == 2
    rec = q.recent_decisions(ws, 2)
    assert rec.action.tolist() == ["undo", "relabel"] and "old" in rec and "new" in rec


def test_export_summary_and_files_match_audit_export(ws, tmp_path):
    labels = _labels(ws)
    q.record_decision(ws, FLIP[0], "accept", labels=[labels[FLIP[0]] + 1], reviewer="t")
    q.record_decision(ws, FLIP[1], "no_fit", reviewer="t")
    q.record_decision(ws, FLIP[2], "keep", reviewer="t")
    res = export_labels(ws, tmp_path / "out")
    s = q.export_summary(ws)
    assert (s["images"], s["changed"], s["excluded"]) == (res.n_images, res.n_changed, res.n_excluded) == (24, 2, 1)
    files = q.export_files(ws)
    assert sorted(files) == sorted(res.files) == sorted(s["files"])
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data


def test_user_input_never_reaches_sql_text(ws):
    with pytest.raises(ValueError, match="unknown sort"):
        q.Filters(sort="image_id; DROP TABLE images")
    with pytest.raises(ValueError, match="disagreement"):
        q.Filters(kinds=("1=1) OR (1=1",))
    with pytest.raises(UserError):
        q.gallery(ws, q.Filters(model="x' OR '1'='1"))
    assert q.gallery(ws, q.Filters(kinds=(), issue_kinds=("x') OR ('1'='1",), reviewed="all"))[0] == 0
    assert q.resolve_label(ws, "n01443537") == 1
    with pytest.raises(UserError):
        q.resolve_label(ws, "' OR 1=1 --")
    assert q.run_summary(ws)["images"] == 24


def test_run_facts_follow_a_new_run(ws, base_workspace):
    """Per-run facts are cached, and a new run into the same workspace replaces them."""
    _db, root = base_workspace
    before = q.gallery(ws, q.Filters(kinds=(), reviewed="all"), 0, 1)[0]
    assert before == 24
    ds = load_dataset(root)
    p = make_predictions(ws.parent / "agree.npy", list(ds.image_ids), ds.labels, seed=9)
    run_audit(ds, [resolve_model(f"preds:{p}")], ws, progress=False)
    assert "preds:agree" in q.model_names(ws)
    m = q.metrics_table(ws)
    assert _metric(m, "preds:agree", "relabeled").value == pytest.approx(1.0)


# --------------------------------------------------------------------------- concurrency


def _hold_lock_script(db: Path, seconds: float, ready: Path) -> str:
    return textwrap.dedent(
        f"""
        import time, duckdb, pathlib
        con = duckdb.connect({str(db)!r})
        con.execute("BEGIN TRANSACTION")
        con.execute("INSERT INTO meta VALUES ('lock_test', 'x') ON CONFLICT (key) DO UPDATE SET value = 'y'")
        pathlib.Path({str(ready)!r}).write_text("held")
        time.sleep({seconds})
        con.execute("COMMIT")
        con.close()
        """
    )


def _start_holder(db: Path, seconds: float, tmp: Path) -> subprocess.Popen:
    ready = tmp / "held"
    proc = subprocess.Popen([sys.executable, "-c", _hold_lock_script(db, seconds, ready)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, "lock holder died"
        assert time.monotonic() < deadline, "lock holder never took the lock"
        time.sleep(0.02)
    return proc


def test_reads_wait_out_another_process_holding_the_write_lock(ws, tmp_path):
    holder = _start_holder(ws, 1.5, tmp_path)
    t = time.monotonic()
    total, _ = q.gallery(ws, q.Filters(kinds=(), reviewed="all"), 0, 5)
    waited = time.monotonic() - t
    assert holder.wait(30) == 0
    assert total == 24 and waited > 0.3, waited


def test_short_read_timeout_gives_up_with_a_clear_error(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(q, "READ_TIMEOUT", 0.2)
    holder = _start_holder(ws, 1.5, tmp_path)
    try:
        with pytest.raises(StoreError, match="locked"):
            q.run_summary(ws)
    finally:
        assert holder.wait(30) == 0
    assert q.run_summary(ws)["images"] == 24


def test_decision_appended_while_another_process_ingests_a_run(tmp_path):
    """`audit run` writes its results while a reviewer saves decisions: both land, neither errors."""
    # Custom class names keep the child process light (no ImageNet label space to load).
    root = make_imagefolder(tmp_path / "ds", wnids=("cat", "dog", "eel", "fox"), per_class=4)
    ds = load_dataset(root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels, n_classes=4, flip=np.array([1, 5]))
    db = tmp_path / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    ready = tmp_path / "ingesting"
    script = textwrap.dedent(
        f"""
        import contextlib, pathlib, time
        import audit.pipeline as pl
        from audit.datasets import load_dataset
        from audit.zoo import resolve_model
        real = pl.connect
        calls = []

        @contextlib.contextmanager
        def slow(db, **kw):
            with real(db, **kw) as con:
                calls.append(db)
                if len(calls) == 2:  # the second write is the ingest of the results
                    pathlib.Path({str(ready)!r}).write_text("in")
                    time.sleep(1.5)  # hold the write lock, as a long ingest would
                yield con

        pl.connect = slow
        ds = load_dataset({str(root)!r})
        pl.run_audit(ds, [resolve_model("preds:{preds}")], pathlib.Path({str(db)!r}), progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, "run died before ingesting"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ids = [q.record_decision(db, i, "accept", labels=[(ds.labels[i] + 1) % 4], reviewer="rev") for i in (1, 5)]
    assert proc.wait(120) == 0
    with connect(db, read_only=True) as con:
        saved = [r[0] for r in con.execute("SELECT decision_id FROM decisions ORDER BY 1").fetchall()]
        runs = con.execute("SELECT status FROM runs ORDER BY started_at").fetchall()
    assert saved == ids and runs == [("finished",), ("finished",)]
    assert _metric(q.metrics_table(db), "preds:m", "relabeled").value == pytest.approx(1.0)


def test_two_reviewers_in_two_processes_lose_nothing(ws):
    script = textwrap.dedent(
        f"""
        import sys
        from audit.queries import record_decision
        for k in range(8):
            record_decision({str(ws)!r}, k, "keep" if k % 2 else "no_fit", reviewer=sys.argv[1])
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, who], cwd=ROOT) for who in ("ann", "bob")]
    assert [p.wait(120) for p in procs] == [0, 0]
    with connect(ws, read_only=True) as con:
        rows = con.execute("SELECT reviewer, count(*) FROM decisions GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("ann", 8), ("bob", 8)]


def test_threads_of_one_server_read_and_write_together(ws):
    """Streamlit serves every session from one process: its reads and writes must not collide in DuckDB."""
    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(4):
                q.gallery(ws, q.Filters(kinds=(), reviewed="all"), 0, 5)
                q.metrics_table(ws)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer():
        try:
            for k in range(6):
                q.record_decision(ws, k, "keep", reviewer="w")
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=reader), threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert q.decision_counts(ws)["decisions"] == 6


def test_reader_shares_one_connection_and_releases_it(ws):
    with q.Reader(ws) as r:
        q.run_summary(r)
        q.gallery(r, q.Filters(), 0, 5)
        assert r.is_open
    assert not r.is_open
    q.record_decision(ws, 0, "keep", reviewer="t")  # the file is free again
