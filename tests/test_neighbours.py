"""Neighbours in review: each image's nearest images in feature space, stored by ``audit run`` and shown on the
review page (audit.neighbours writes and reads the file, audit.queries.image_neighbours answers for one image).

The store (round trip, atomic write, a damaged file), the graph as image indices (exact copies first, -1 padding
on a tiny set, an image without finite features), the summary line, and whole runs: an ImageNet-style
ImageFolder and a custom label space (heads) of hostile class and file names, each scored by a random-weights
SqueezeNet (a random MobileNetV3 gives all-zero features), a run with ``--no-features``, and a workspace without
the file (as an older one is); then the review page under Streamlit's AppTest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder, make_named_images
from test_app import click_strip, markdown_leaks, ok, start, strip_cards, texts

from audit import neighbours as nb
from audit import queries as q
from audit.checks import CheckInputs
from audit.checks._neighbors import normalized_blocks
from audit.cli import main
from audit.dashboard.ui import shown
from audit.store import connect

MARK = "zq"
# Custom class folders and file names a user controls: Markdown, HTML, a formula (each carries MARK).
HOSTILE = {"**x** zqc0": "`a` zqf", "<b>b zqc1": "<img src=x> zqf", "=1+1 zqc2": "[l](http:) zqf"}


def _inputs(features: np.ndarray, valid: np.ndarray | None = None) -> CheckInputs:
    n = len(features)
    return CheckInputs(
        n=n,
        labels=np.zeros(n, dtype=np.int64),
        n_classes=2,
        class_names=("a", "b"),
        valid=np.ones(n, dtype=bool) if valid is None else valid,
        features=[features],
        model_names=("m",),
        feature_models=("m",),
        image_ids=tuple(f"i{j}" for j in range(n)),
    )


# --------------------------------------------------------------------------- the store


def test_save_and_read_round_trip_and_read_once_per_version(tmp_path):
    db = tmp_path / "w.duckdb"
    rng = np.random.default_rng(0)
    index = rng.integers(-1, 50, (50, 8)).astype(np.int32)
    sim = rng.random((50, 8)).astype(np.float32)
    path = nb.save_neighbours(db, "run-1", index, sim, models=("a", "b"))
    assert path == nb.neighbours_path(db) and path.parent.name == "w.duckdb.arrays"
    got = nb.read_neighbours(db)
    assert got.run_id == "run-1" and got.n == 50 and got.k == 8 and got.models == ("a", "b") and got.reason is None
    assert np.array_equal(got.index, index) and np.array_equal(got.similarity, sim)
    assert nb.read_neighbours(db) is got  # one read per version of the file
    nb.save_neighbours(db, "run-2", index[:, :3], sim[:, :3], reason="no features")
    again = nb.read_neighbours(db)
    assert again.run_id == "run-2" and again.k == 3 and again.reason == "no features"


def test_a_missing_damaged_or_foreign_file_reads_as_none(tmp_path):
    db = tmp_path / "w.duckdb"
    assert nb.read_neighbours(db) is None
    nb.neighbours_path(db).parent.mkdir()
    nb.neighbours_path(db).write_bytes(b"PK\x03\x04 not a zip")
    assert nb.read_neighbours(db) is None
    np.savez(nb.neighbours_path(db), format=np.int32(nb.FORMAT + 1), index=np.zeros((1, 1)))
    assert nb.read_neighbours(db) is None
    with pytest.raises(ValueError, match="same"):
        nb.save_neighbours(db, "r", np.zeros((3, 2)), np.zeros((3, 1)))


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    db = tmp_path / "w.duckdb"
    nb.save_neighbours(db, "old", np.zeros((4, 2), dtype=np.int32), np.ones((4, 2), dtype=np.float32))
    before = nb.neighbours_path(db).read_bytes()

    def crash(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nb.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        nb.save_neighbours(db, "new", np.zeros((4, 2), dtype=np.int32), np.ones((4, 2), dtype=np.float32))
    assert nb.neighbours_path(db).read_bytes() == before
    assert [p.name for p in nb.neighbours_path(db).parent.iterdir()] == [nb.FILE]


# --------------------------------------------------------------------------- the graph as image indices


def test_rows_are_image_indices_exact_copies_first_and_match_a_brute_force_search():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(40, 16)).astype(np.float32)
    f[7] = f[3]  # an exact copy
    f[20] = f[3]
    index, sim, models = nb.image_neighbour_rows(_inputs(f), k=6)
    assert models == ("m",) and index.shape == sim.shape == (40, 6) and index.dtype == np.int32
    assert set(index[3, :2]) == {7, 20} and np.allclose(sim[3, :2], 1.0)
    assert set(index[7, :2]) == {3, 20}
    x = normalized_blocks([f])
    cos = x @ x.T
    for i in (0, 11, 39):
        assert i not in index[i]  # self excluded
        assert np.allclose(sim[i], np.sort(np.delete(cos[i], i))[::-1][: len(sim[i])], atol=1e-5)
        assert np.allclose(sim[i], cos[i, index[i]], atol=1e-5)


def test_storing_reuses_the_graph_the_checks_built(monkeypatch):
    from audit.checks import _neighbors

    inputs = _inputs(np.random.default_rng(3).normal(size=(30, 8)).astype(np.float32))
    _neighbors.neighbors(inputs, k=10)  # what knn_label / near_duplicate do in the run (the graph holds 20)
    calls = []
    real = _neighbors.knn_search
    monkeypatch.setattr(_neighbors, "knn_search", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    index, _, _ = nb.image_neighbour_rows(inputs)
    assert calls == [] and index.shape == (30, nb.STORED_K)
    nb.image_neighbour_rows(_inputs(np.random.default_rng(4).normal(size=(30, 8)).astype(np.float32)))
    assert calls == [1]  # a run whose checks built none: one search


def test_a_tiny_set_is_padded_and_an_image_without_features_has_none():
    f = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    f[2] = np.nan  # features not finite
    valid = np.array([True, True, True, False])  # image 3 unreadable
    index, sim, _ = nb.image_neighbour_rows(_inputs(f, valid), k=5)
    assert index[0].tolist() == [1, -1, -1, -1, -1] and index[1].tolist() == [0, -1, -1, -1, -1]
    assert np.isnan(sim[0, 1:]).all() and np.isfinite(sim[0, 0])
    assert (index[2] == -1).all() and (index[3] == -1).all() and np.isnan(sim[2:]).all()


# --------------------------------------------------------------------------- the summary line


def test_optional_text_columns_hold_none_not_nan():
    """Strings mixed with None: pandas 3 would infer a string column holding NaN (truthy); the neighbours' frame
    keeps None, as documented, so a card neither shows "nan" nor marks a neighbour that is no duplicate."""
    rows = [{"i": 1, "duplicate": "near duplicate", "current": None}, {"i": 2, "duplicate": None, "current": "cat"}]
    got = q._frame_with_none(rows, ["i", "duplicate", "current"], ("duplicate", "current"))
    assert got["duplicate"].tolist() == ["near duplicate", None] and got["current"].tolist() == [None, "cat"]
    assert got["i"].tolist() == [1, 2] and got["duplicate"].dtype == object
    assert q._frame_with_none([], ["i", "duplicate", "current"], ("duplicate", "current")).empty


def test_summary_line_counts_the_neighbours_current_labels():
    names = {0: "pot", 1: "vase", 2: "cup"}
    assert q.neighbour_summary([0], [[0]] * 6 + [[1], [2]], names) == "6 of 8 neighbours labelled pot"
    assert (
        q.neighbour_summary([2], [[0]] * 5 + [[2]] * 2 + [[]], names)
        == "2 of 8 neighbours labelled cup; the most common is pot (5 of 8)"
    )
    # A multi-label image counts each class; a neighbour with several classes counts for each, once.
    assert q.neighbour_summary([0, 1], [[0, 1], [0], [1, 1], [2]], names) == (
        "2 of 4 neighbours labelled pot, 2 labelled vase"
    )
    assert q.neighbour_summary([], [[1], [1], [0]], names) == (
        "this image is left out (no class fits); the most common label of its 3 neighbours is vase (2 of 3)"
    )
    assert q.neighbour_summary([9], [[9]], {}) == "1 of 1 neighbour labelled 9"
    assert q.neighbour_summary([0], [], names) == "no neighbours"


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def imagenet_ws(tmp_path_factory):
    """An ImageNet-style ImageFolder with one photo copied into another class, scored with features."""
    tmp = tmp_path_factory.mktemp("nbr_imagenet")
    root = make_imagefolder(tmp / "ds", per_class=5, size=(40, 36))
    folders = sorted((root / "val").iterdir())
    src = sorted(folders[0].iterdir())[0]
    shutil.copyfile(src, folders[1] / "ILSVRC2012_val_00000999.JPEG")
    model = make_checkpoint(tmp / "ckpt" / "m.pth", arch="squeezenet1_1")
    db = tmp / "w.duckdb"
    assert main(["run", str(root), "--models", model, "--db", str(db), "-q"]) == 0
    return db, root, model, f"{folders[0].name}/{src.name}", f"{folders[1].name}/ILSVRC2012_val_00000999.JPEG"


def _index(db: Path, image_id: str) -> int:
    with connect(db, read_only=True) as con:
        return int(con.execute("SELECT image_index FROM images WHERE image_id = ?", [image_id]).fetchone()[0])


def _newest_run(db: Path) -> str:
    with connect(db, read_only=True) as con:
        return con.execute("SELECT run_id FROM runs WHERE status = 'finished' ORDER BY finished_at DESC").fetchone()[0]


def test_a_run_stores_every_images_neighbours_from_its_features(imagenet_ws):
    db, *_ = imagenet_ws
    stored = nb.read_neighbours(db)
    n = len(q.gallery(db, q.Filters(kinds=(), reviewed="all"), 0, 100)[1])
    assert stored.run_id == _newest_run(db) and stored.n == n and stored.k == nb.STORED_K and stored.reason is None
    with connect(db, read_only=True) as con:
        (logits_file,) = con.execute("SELECT logits_file FROM models WHERE source <> 'head'").fetchone()
    # The stored similarities are the exact cosines of the run's own features (scoring's file beside the logits).
    x = normalized_blocks([np.load(logits_file.replace(".logits.npy", ".features.npy"))])
    cos = x @ x.T
    for i in range(n):
        have = stored.index[i] >= 0  # a pair of exact copies counts once in another image's list
        assert have.sum() >= n - 2 and have[: have.sum()].all()  # -1 pads the end only
        s = stored.similarity[i, have]
        assert np.allclose(s, cos[i, stored.index[i, have]], atol=1e-4) and (np.diff(s) <= 1e-6).all()
        assert s[0] == pytest.approx(np.delete(cos[i], i).max(), abs=1e-4)


def test_image_neighbours_puts_the_duplicate_first_with_current_labels(imagenet_ws):
    db, _, _, src, dst = imagenet_ws
    i, j = _index(db, src), _index(db, dst)
    got = q.image_neighbours(db, i)
    df = got["neighbours"]
    assert got["note"] is None and len(df) == q.NEIGHBOURS_K and df["rank"].tolist() == list(range(1, 9))
    first = df.iloc[0]
    assert first.image_index == j and first.image_id == dst and first.similarity == pytest.approx(1.0)
    assert first.duplicate == "exact duplicate"
    # Every near/exact duplicate partner of the image comes before every other neighbour.
    partners = {
        p
        for f in q.image_detail(db, i)["findings"]
        if f["suggests"] == "image" and f["is_issue"]
        for p, _ in f["partners"]
    }
    # None where a neighbour is no duplicate, as documented (not the NaN pandas 3 stores in an inferred string
    # column, which is truthy: every card was marked a duplicate and showed "nan").
    wide = q.image_neighbours(db, i, 50)["neighbours"]
    assert wide.duplicate.dtype == object and all(v is None or isinstance(v, str) for v in wide.duplicate)
    marked = df.duplicate.notna().tolist()
    assert marked == sorted(marked, reverse=True) and set(df.image_index[df.duplicate.notna()]) <= partners
    assert i not in set(df.image_index)
    # The summary counts the neighbours' current labels; a decision on a neighbour changes it.
    own = q.image_detail(db, i)["current_labels"]
    same = sum(own[0] in labels for labels in df.current_labels)
    names = q.classes(db).set_index("class_index")["name"]
    assert got["summary"].startswith(f"{same} of 8 neighbours labelled {names[own[0]]}")
    q.record_decision(db, j, "relabel", labels=[own[0]], reviewer="t")
    after = q.image_neighbours(db, i)
    row = after["neighbours"].iloc[0]
    assert row.current_labels == [own[0]] and row.reviewed and row.current == names[own[0]]
    assert after["summary"].startswith(f"{same + 1} of 8 neighbours labelled")
    q.record_decision(db, j, "no_fit", reviewer="t")  # left out: its current is None beside the others' names
    cur = q.image_neighbours(db, i)["neighbours"]["current"].tolist()
    assert cur[0] is None and all(isinstance(v, str) for v in cur[1:])
    q.record_decision(db, j, "undo", reviewer="t")
    q.record_decision(db, j, "undo", reviewer="t")
    assert q.image_neighbours(db, i)["summary"] == got["summary"]
    # k: fewer, or all that are stored.
    assert len(q.image_neighbours(db, i, 3)["neighbours"]) == 3
    n = nb.read_neighbours(db).n
    assert len(q.image_neighbours(db, i, 50)["neighbours"]) == min(nb.STORED_K, n - 1)


def test_stale_missing_and_featureless_workspaces_say_so_in_one_line(imagenet_ws, tmp_path):
    db, root, model, src, _ = imagenet_ws
    copy = tmp_path / "c.duckdb"
    shutil.copy(db, copy)
    i = _index(db, src)
    # No file (a workspace made before neighbours were stored, e.g. version 1).
    old = q.image_neighbours(copy, i)
    assert q.RERUN_FOR_NEIGHBOURS in old["note"] and old["neighbours"].empty and old["summary"] is None
    # A file of another run (one that failed after writing it).
    shutil.copytree(db.with_name(db.name + ".arrays"), copy.with_name(copy.name + ".arrays"))
    assert q.image_neighbours(copy, i)["note"] is None
    s = nb.read_neighbours(copy)
    nb.save_neighbours(copy, "another-run", s.index, s.similarity)
    assert q.RERUN_FOR_NEIGHBOURS in q.image_neighbours(copy, i)["note"]
    # A run without features: the file says why, and the answer says so.
    bare = tmp_path / "bare.duckdb"
    assert main(["run", str(root), "--models", model, "--db", str(bare), "--no-features", "-q"]) == 0
    stored = nb.read_neighbours(bare)
    assert stored.k == 0 and "no features" in stored.reason and stored.run_id == _newest_run(bare)
    note = q.image_neighbours(bare, i)["note"]
    assert "no features" in note and "\n" not in note


def test_an_image_without_usable_features_has_a_line_not_a_crash(imagenet_ws, tmp_path):
    db, *_ = imagenet_ws
    copy = tmp_path / "c.duckdb"
    shutil.copy(db, copy)
    s = nb.read_neighbours(db)
    index, sim = s.index.copy(), s.similarity.copy()
    index[0], sim[0] = -1, np.nan
    nb.save_neighbours(copy, s.run_id, index, sim)
    got = q.image_neighbours(copy, 0)
    assert "no usable features" in got["note"] and got["neighbours"].empty
    assert "not in the workspace" in q.image_neighbours(copy, 10_000)["note"]


@pytest.fixture(scope="module")
def custom_ws(tmp_path_factory):
    """A custom label space (heads on the SqueezeNet features) of hostile class and file names."""
    tmp = tmp_path_factory.mktemp("nbr_custom")
    root = make_named_images(tmp / "pets", {c: [f"{f} {k}.png" for k in range(10)] for c, f in HOSTILE.items()}, seed=3)
    model = make_checkpoint(tmp / "ckpt" / "m.pth", arch="squeezenet1_1")
    db = tmp / "w.duckdb"
    assert main(["run", str(root), "--models", model, "--db", str(db), "-q"]) == 0
    return db


def test_a_custom_label_space_with_heads_has_neighbours_named_as_given(custom_ws):
    db = custom_ws
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'label_space'").fetchone()[0] == "custom"
        sources = {r[0] for r in con.execute("SELECT source FROM models").fetchall()}
    assert "head" in sources
    got = q.image_neighbours(db, 0)
    assert got["note"] is None and len(got["neighbours"]) == q.NEIGHBOURS_K
    assert set(got["neighbours"].current) <= set(HOSTILE)
    assert any(c in got["summary"] for c in HOSTILE)


# --------------------------------------------------------------------------- the review page


@pytest.fixture
def _env(monkeypatch):
    monkeypatch.setenv("AUDIT_READ_WAIT", "0.8")
    monkeypatch.setenv("AUDIT_REVIEWER", "tester")
    monkeypatch.delenv("AUDIT_DASHBOARD_TOKEN", raising=False)


def test_review_page_shows_the_neighbours_and_opens_one(custom_ws, _env, monkeypatch, tmp_path):
    db = tmp_path / "w.duckdb"
    shutil.copy(custom_ws, db)
    shutil.copytree(custom_ws.with_name(custom_ws.name + ".arrays"), db.with_name(db.name + ".arrays"))
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = start(page="review", image="0")
    body = texts(at)
    got = q.image_neighbours(db, 0)
    assert "Nearest images in feature space" in body and shown(got["summary"]) in body
    first = got["neighbours"].iloc[0]
    assert f"{first.similarity:.3f}" in body and f"#{first.image_index}" in body
    assert markdown_leaks(at, MARK) == []
    cards = strip_cards(at, "nbr_strip")
    assert [c["idx"] for c in cards] == got["neighbours"]["image_index"].tolist()
    assert {c["button"] for c in cards} == {"Open"} and all(c["thumb"].startswith("data:image/jpeg") for c in cards)
    # Only duplicates are marked; no card reads "nan" (a missing value shown as text).
    assert [c["mark"] for c in cards] == got["neighbours"]["duplicate"].notna().tolist()
    assert not [ln for c in cards for ln in c["lines"] if "nan" in ln.split(" · ")]
    click_strip(at, "nbr_strip", int(first.image_index))
    assert at.session_state["image"] == first.image_index and f"image #{first.image_index}" in texts(at)
    assert markdown_leaks(at, MARK) == []
    # Fewer or more at once.
    at.selectbox(key="n_k").set_value(4)
    ok(at)
    assert len(strip_cards(at, "nbr_strip")) == 4
    # Without the file: the one line naming the fix.
    shutil.rmtree(db.with_name(db.name + ".arrays"))
    at = start(page="review", image="0")
    assert q.RERUN_FOR_NEIGHBOURS in texts(at) and not strip_cards(at, "nbr_strip")


def test_a_run_summary_of_the_neighbours_is_json_free(imagenet_ws):
    """The answer is small and plain: what the dashboard caches (pickled) and shows."""
    db, _, _, src, _ = imagenet_ws
    got = q.image_neighbours(db, _index(db, src))
    json.dumps({k: v for k, v in got.items() if k != "neighbours"})
    assert {type(x) for x in got["neighbours"].current_labels} == {list}
