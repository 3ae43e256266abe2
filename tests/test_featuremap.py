"""The dataset map (audit.featuremap computes and stores it, audit.mapview reads it, mapfig draws it).

Seeded synthetic features with planted classes: the map is reproducible and keeps the classes apart;
a stored map is reused while the features are unchanged and never shown once they change; a run writes
the default model's map (the one whose predictions fit best) and says why it wrote none; hostile names
stay data in the figure; the Map page under Streamlit's AppTest.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from _synth import WNIDS, make_imagefolder, make_predictions

from audit import featuremap as fm
from audit import mapview
from audit.cli import main
from audit.config import MapConfig, RunConfig
from audit.dashboard import mapfig
from audit.datasets import load_dataset
from audit.errors import OptionError
from audit.queries import Filters


def _clusters(n_per: int = 40, k: int = 3, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, d)) * 4
    y = np.repeat(np.arange(k), n_per)
    x = np.maximum(centres[y] + rng.normal(0, 1, (len(y), d)), 0)
    return x.astype(np.float16), y


def _centroid_accuracy(xy: np.ndarray, y: np.ndarray) -> float:
    cents = np.stack([xy[y == c].mean(0) for c in np.unique(y)])
    pred = np.argmin(((xy[:, None, :] - cents[None]) ** 2).sum(-1), axis=1)
    return float((pred == y).mean())


# --------------------------------------------------------------------------- the computation


def test_umap_map_is_seeded_keeps_classes_apart_and_skips_unusable_rows():
    x, y = _clusters()
    x[5] = 0  # zero features: no direction, not placed
    x[6, 0] = np.inf
    valid = np.ones(len(x), dtype=bool)
    valid[7] = False
    a, info = fm.compute_map(x, valid)
    b, _ = fm.compute_map(x, valid)
    assert np.array_equal(a, b, equal_nan=True)  # seeded
    assert np.isnan(a[[5, 6, 7]]).all() and info["placed"] == len(x) - 3
    ok = np.isfinite(a).all(1)
    assert _centroid_accuracy(a[ok], y[ok]) > 0.95
    assert info["method"] == "umap" and info["umap_version"] and info["seconds"] >= 0


def test_tsne_is_the_option_and_a_tiny_set_gets_no_map():
    x, y = _clusters(n_per=15)
    a, info = fm.compute_map(x, settings=fm.MapSettings(method="tsne"))
    assert info["method"] == "tsne" and _centroid_accuracy(a, y) > 0.9
    tiny, info = fm.compute_map(x[:2])
    assert np.isnan(tiny).all() and info["placed"] == 2


def test_settings_and_config_refuse_bad_values_and_round_trip():
    with pytest.raises(OptionError, match="--map-method"):
        MapConfig(method="pca")
    with pytest.raises(OptionError, match="--map-model"):
        MapConfig(model=" ")
    with pytest.raises(OptionError, match="n_neighbors"):
        fm.MapSettings(n_neighbors=1)
    cfg = RunConfig.from_options(map=False, map_model="m", map_method="tsne")
    assert cfg.map == MapConfig(enabled=False, model="m", method="tsne")
    assert RunConfig.from_params(cfg.to_params()) == cfg
    old = {k: v for k, v in cfg.to_params().items() if k != "map"}  # a run stored before maps
    assert RunConfig.from_params(old).map == MapConfig()


def test_strongest_model_counts_a_heads_predictions_for_its_features_model():
    labels = np.array([0, 1, 0, 1, 0, 1])
    good = np.eye(2)[labels]
    bad = np.eye(2)[1 - labels]
    valid = np.ones(6, dtype=bool)
    assert fm.strongest_model(["a", "b"], {"a": bad, "b": good}, {}, labels, valid) == "b"
    # A custom space: the zoo models predict no class of it, their heads do.
    probs = {"a.head": good, "b.head": bad}
    assert fm.strongest_model(["a", "b"], probs, {"a.head": "a", "b.head": "b"}, labels, valid) == "a"
    assert fm.strongest_model(["a", "b"], {}, {}, labels, valid) == "a"
    assert fm.strongest_model([], {}, {}, labels, valid) is None


# --------------------------------------------------------------------------- storage: recomputed when features change


def test_a_map_is_reused_until_its_features_change(tmp_path, monkeypatch):
    db = tmp_path / "w.duckdb"
    x, _ = _clusters(n_per=50)
    valid = np.ones(len(x), dtype=bool)
    calls: list[str] = []

    def fake(features, valid, *, settings, log=None):
        calls.append("x")
        return np.zeros((len(features), 2), np.float32) + len(calls), {**settings.to_params(), "seconds": 0.0}

    monkeypatch.setattr(fm, "compute_map", fake)
    assert fm.write_maps(db, "r1", {"m": x, "n": x}, valid, default="m") is None
    assert calls == ["x"] and fm.current_maps(db) == [("m", "umap")]
    fm.write_maps(db, "r2", {"m": x, "n": x}, valid, default="m")
    assert calls == ["x"]  # same features, same settings: the stored map is used
    fm.write_maps(db, "r3", {"m": x, "n": x}, valid, default="m", extra=["n"])
    assert len(calls) == 2 and fm.current_maps(db) == [("m", "umap"), ("n", "umap")]
    changed = x.copy()
    changed[0, 0] += 1
    fm.write_maps(db, "r4", {"m": x, "n": changed}, valid, default="m")
    # n's features changed and nobody asked for its map again: the old one is never shown.
    assert len(calls) == 2 and fm.current_maps(db) == [("m", "umap")]
    assert fm.read_map(db, "n", "umap", fm.read_current(db)["digests"]["n"]) is None
    fm.write_maps(db, "r5", {"m": x}, valid, default="m", settings=fm.MapSettings(seed=3))
    assert len(calls) == 3  # another seed is another map


@pytest.mark.parametrize(
    ("kwargs", "note"),
    [
        ({"features": {}, "default": None}, "no features"),
        ({"enabled": False}, "--no-map"),
        ({"valid_n": 99}, "at least 100"),
    ],
)
def test_why_no_map_is_recorded_and_shown(tmp_path, kwargs, note):
    db = tmp_path / "w.duckdb"
    x, _ = _clusters(n_per=50)
    valid = np.ones(len(x), dtype=bool)
    valid[kwargs.pop("valid_n", len(x)) :] = False
    args = {"features": {"m": x}, "default": "m", **kwargs}
    got = fm.write_maps(db, "r", args.pop("features"), valid, default=args.pop("default"), **args)
    assert note in got
    assert fm.current_maps(db) == [] and note in mapview.map_maps(db)["note"]


def test_a_damaged_or_foreign_map_file_reads_as_absent(tmp_path):
    db = tmp_path / "w.duckdb"
    assert fm.read_map(db, "m", "umap") is None and fm.read_current(db) is None
    assert mapview.map_maps(db)["note"] == mapview.NO_MAP
    p = fm.map_path(db, "m", "umap")
    p.parent.mkdir(parents=True)
    p.write_bytes(b"PK\x03\x04 broken")
    assert fm.read_map(db, "m", "umap") is None
    (p.parent / "current.json").write_text("{not json")
    assert fm.read_current(db) is None
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        fm.save_map(db, "r", "m", "d", np.zeros((3, 3)), {"method": "umap"})
    # Model names may hold any character: the file is named by a hash.
    assert fm.map_path(db, "../x/y", "umap").parent == fm.maps_dir(db)


# --------------------------------------------------------------------------- a run, the read side and the figure

HOSTILE = ("<b>bold</b>", "=1+1", "**x**", "<img src=x onerror=alert(1)>")


@pytest.fixture(scope="module")
def map_ws(tmp_path_factory):
    """A 120-image ImageFolder with prediction files carrying clustered features, one of them near-random."""
    base = tmp_path_factory.mktemp("map")
    root = make_imagefolder(base / "ds", per_class=30)
    ds = load_dataset(root)
    good = make_predictions(base / "good.npy", list(ds.image_ids), ds.labels, flip=np.arange(0, 120, 17))
    weak = make_predictions(base / "weak.npy", list(ds.image_ids), ds.labels, flip=np.arange(0, 120, 2), seed=3)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (len(WNIDS), 24)) * 4
    for p in (good, weak):
        f = np.maximum(centres[ds.labels] + rng.normal(0, 1, (len(ds), 24)), 0).astype(np.float32)
        np.save(p.with_suffix(".features.npy"), f)
    db = base / "w.duckdb"
    models = f"preds:{weak},preds:{good}"
    assert main(["run", str(root), "--models", models, "--db", str(db), "-q"]) == 0
    return root, db, ds, good, weak, models


def test_a_run_stores_the_best_fitting_models_map_and_the_read_side_joins_labels(map_ws):
    _, db, ds, good, _, _ = map_ws
    maps = mapview.map_maps(db)
    assert maps["note"] is None and len(maps["maps"]) == 1
    model, method = maps["maps"][0]
    assert method == "umap" and model == f"preds:{good.stem}"  # the model whose predictions agree most with the labels
    pts = mapview.map_points(db, model, method)
    assert len(pts) == len(ds) and pts["image_index"].tolist() == list(range(len(ds)))
    assert set(pts["given"]) == {ds.label_space.names[i] for i in ds.labels} and pts["confidence"].between(0, 1).all()
    flagged = set(mapview.selected_images(db, Filters()).tolist())
    assert flagged == set(pts.loc[pts["flagged"], "image_index"])  # the default filter: flagged, unreviewed
    assert _centroid_accuracy(pts[["x", "y"]].to_numpy(), ds.labels) > 0.9
    only = mapview.selected_images(db, Filters(kinds=(), reviewed="all", images=(3, 5, 999)))
    assert only.tolist() == [3, 5]


def test_the_maps_current_label_follows_decisions_one_label_several_or_none(map_ws):
    """A point's ``current`` is the current label's name, several joined by '; ', or queries.NO_FIT when excluded: one
    vectorised lookup for single labels, the rest one by one, the same names either way."""
    from audit.queries import NO_FIT, record_decision

    _, db, ds, _, _, _ = map_ws
    names = ds.label_space.names
    model, method = mapview.map_maps(db)["maps"][0]
    before = mapview.map_points(db, model, method)
    done = []
    try:
        done.append(record_decision(db, 0, "multi", labels=[2, 1], reviewer="t"))
        done.append(record_decision(db, 1, "no_fit", reviewer="t"))
        done.append(record_decision(db, 2, "relabel", labels=[3], reviewer="t"))
        pts = mapview.map_points(db, model, method).set_index("image_index")
        assert set(pts.loc[0, "current"].split("; ")) == {names[1], names[2]}
        assert pts.loc[1, "current"] == NO_FIT
        assert pts.loc[2, "current"] == names[3] and bool(pts.loc[2, "reviewed"])
        rest = pts.drop(index=[0, 1, 2])
        assert (rest["current"] == [names[i] for i in ds.labels[rest.index.to_numpy()]]).all()
        assert not rest["reviewed"].any() and len(pts) == len(before)
        # What only a run changes was built once for this run and is shared: the decisions did not rebuild it.
        here = str(db.resolve())  # the first part of the run key (queries.run_key)
        parts = [t[model] for k, t in mapview._RUN_PARTS.items() if k[0] == here and model in t]
        assert len(parts) == 1 and parts[0]["image_index"].tolist() == sorted(pts.index)
    finally:
        for i in range(len(done)):  # images 0, 1, 2 were decided in turn; the module's other tests share them
            record_decision(db, i, "undo", reviewer="t")
    assert mapview.map_points(db, model, method).equals(before)


def test_a_rerun_reuses_the_map_and_map_options_are_checked_first(map_ws, capsys):
    root, db, _, _, weak, models = map_ws
    before = {p.name: p.stat().st_mtime_ns for p in fm.maps_dir(db).glob("map-*.npz")}
    assert main(["run", "--db", str(db), "-q"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in fm.maps_dir(db).glob("map-*.npz")} == before
    capsys.readouterr()
    assert main(["run", str(root), "--models", models, "--db", str(db), "--map-model", "nope", "-q"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "--map-model 'nope'" in errors[0] and "Traceback" not in err
    # Another model's map on request: both are offered, the requested one first.
    assert main(["run", str(root), "--models", models, "--db", str(db), "--map-model", f"preds:{weak.stem}", "-q"]) == 0
    got = mapview.map_maps(db)["maps"]
    assert len(got) == 2 and got[0][0] == f"preds:{weak.stem}"


def test_the_figure_escapes_names_and_outlines_the_filter():
    import pandas as pd

    n = 8
    frame = pd.DataFrame(
        {
            "image_index": np.arange(n),
            "x": np.arange(n, dtype=float),
            "y": np.arange(n, dtype=float),
            "image_id": [f"{HOSTILE[i % 4]}.png" for i in range(n)],
            "label": np.arange(n) % 4,
            "given": [HOSTILE[i % 4] for i in range(n)],
            "current": [HOSTILE[(i + 1) % 4] for i in range(n)],
            "reviewed": np.arange(n) % 2 == 0,
            "flagged": np.arange(n) % 3 == 0,
            "checks": ["label" if i % 3 == 0 else "" for i in range(n)],
            "confidence": np.linspace(0, 1, n),
        }
    )
    for colour in mapview.COLOURS:
        fig = mapfig.map_figure(frame, colour, highlight=[1, 2])
        blob = json.dumps(fig.to_plotly_json(), default=str)
        for h in HOSTILE:
            if "<" in h:
                assert h not in blob  # never raw HTML in hover text or legend names
        assert html.escape(HOSTILE[0]) in blob
        names = [t.name for t in fig.data]
        assert any(nm.startswith("filter matches (2)") for nm in names)
    with pytest.raises(ValueError, match="colour"):
        mapfig.map_figure(frame, "nope")
    event = {"selection": {"points": [{"customdata": 4}, {"customdata": [2]}, {"x": 1}]}}
    assert mapfig.selected_from_event(event) == [2, 4]
    assert mapfig.selected_from_event(None) == [] and mapfig.selected_from_event({"selection": {}}) == []


def test_map_page_draws_and_a_selection_goes_to_review(map_ws, monkeypatch):
    from streamlit.testing.v1 import AppTest

    _, db, _, _, _, _ = map_ws
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.query_params["page"] = "map"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("images. Draw a lasso" in c.value for c in at.caption)
    for colour in mapview.COLOURS:
        at.selectbox(key="m_colour").set_value(colour).run()
        assert not at.exception, [e.value for e in at.exception]
    # A lasso around cluster 0's points (the canvas element's selection state, in data coordinates) selects
    # every image inside it; a click selects one point; garbage selects nothing.
    pts = mapview.map_points(db, *mapview.map_maps(db)["maps"][0])
    inner = pts[pts["label"] == 0]
    x0, x1, y0, y1 = inner["x"].min() - 1e-3, inner["x"].max() + 1e-3, inner["y"].min() - 1e-3, inner["y"].max() + 1e-3
    at.session_state["m_canvas"] = {"selection": {"lasso": {"x": [x0, x1, x1, x0], "y": [y0, y0, y1, y1]}}}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    want = int(((pts["x"] >= x0) & (pts["x"] <= x1) & (pts["y"] >= y0) & (pts["y"] <= y1)).sum())
    assert want >= len(inner) and {m.label: m.value for m in at.metric}["selected images"] == f"{want:,}"
    # Its first images as the gallery's cards (the same lines: runtime.card_lines), in one strip; Review opens one.
    from test_app import click_strip, strip_cards

    from audit import queries as q
    from audit.dashboard.pages.mappage import SELECTION_CARDS

    cards = strip_cards(at, "m_sel_strip")
    f = q.Filters(kinds=(), checks=(), reviewed="all", sort="image", images=tuple(pts.loc[
        (pts["x"] >= x0) & (pts["x"] <= x1) & (pts["y"] >= y0) & (pts["y"] <= y1), "image_index"]))  # fmt: skip
    _, rows = q.gallery(db, f, 0, SELECTION_CARDS)
    assert [c["idx"] for c in cards] == rows["image_index"].tolist() and {c["button"] for c in cards} == {"Review"}
    assert all(c["thumb"].startswith("data:image/jpeg;base64,") for c in cards)
    assert cards[0]["lines"][0].startswith("given ") and f"#{cards[0]['idx']}" in cards[0]["lines"][1]
    click_strip(at, "m_sel_strip", cards[1]["idx"])
    assert at.session_state["page"] == "Review" and at.session_state["image"] == cards[1]["idx"]
    at.sidebar.radio(key="page").set_value("Map").run()
    at.session_state["m_canvas"] = {"selection": {"points": [int(inner["image_index"].iloc[0])]}}
    at.run()
    assert {m.label: m.value for m in at.metric}["selected images"] == "1"
    at.session_state["m_canvas"] = {"selection": {"lasso": {"x": ["<b>"], "y": None}}}
    at.run()
    assert not at.exception and "selected images" not in {m.label for m in at.metric}
    # AppTest cannot drag a lasso: this is what the page's "Send these to the review queue" button does.
    from importlib import import_module

    assert import_module("audit.dashboard.mapfig").selected_from_event({"selection": {"points": []}}) == []
    at.session_state["f_images"] = [1, 2, 3]
    at.session_state["f_kinds"] = []
    at.session_state["f_reviewed"] = "all"
    at.sidebar.radio(key="page").set_value("Review").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("of 3" in c.value for c in at.caption)
    at.sidebar.radio(key="page").set_value("Disagreements").run()
    assert any("selected on the Map page" in i.value for i in at.info)


def test_the_maps_selection_is_kept_while_the_reviewer_visits_other_pages(map_ws, monkeypatch):
    """Streamlit drops the canvas's state once another page has run; the selection (and its gallery) is drawn
    again on return, until the reviewer clears it."""
    from streamlit.testing.v1 import AppTest

    _, db, _, _, _, _ = map_ws
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.query_params["page"] = "map"
    at.run()
    box = {"box": {"x": [-1e9, 1e9], "y": [-1e9, 1e9]}}  # every point
    at.session_state["m_canvas"] = {"selection": box}
    at.run()
    n = len(mapview.map_points(db, *mapview.map_maps(db)["maps"][0]))

    def selected() -> str | None:
        return {m.label: m.value for m in at.metric}.get("selected images")

    assert selected() == f"{n:,}"
    for page in ("Overview", "Review", "Map"):
        at.sidebar.radio(key="page").set_value(page).run()
        assert not at.exception, [e.value for e in at.exception]
    assert "m_canvas" not in at.session_state or at.session_state["m_canvas"]["selection"] == box
    assert selected() == f"{n:,}"
    (el,) = [e for e in at.main if e.type == "bidi_component" and e.proto.component_name == "audit_map"]
    assert json.loads(el.proto.mixed.json)["selection"] == box  # the element draws it again
    at.session_state["m_canvas"] = {"selection": None}  # "Clear selection"
    at.run()
    assert selected() is None
    for page in ("Overview", "Map"):
        at.sidebar.radio(key="page").set_value(page).run()
    assert selected() is None and not at.exception


def test_hovering_a_point_hands_its_thumbnail_and_labels_to_the_card(map_ws, monkeypatch):
    """The hover element's state (the point the pointer rests on) reruns the page; the element's data then holds
    that image's JPEG thumbnail and labels. AppTest sets the state a browser's hover would (the browser test
    hovers for real)."""
    from streamlit.testing.v1 import AppTest

    _, db, ds, _, _, _ = map_ws
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.query_params["page"] = "map"
    at.run()

    def card() -> dict:
        (el,) = [e for e in at.main if e.type == "bidi_component" and e.proto.component_name == "audit_map_hover"]
        return json.loads(el.proto.json)

    assert card()["idx"] is None and card()["thumb"] is None
    at.session_state["m_hover"] = {"hovered": 7}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    got = card()
    assert got["idx"] == 7 and got["thumb"].startswith("data:image/jpeg;base64,")
    assert got["lines"][:3] == [ds.image_ids[7], f"given: {ds.label_space.names[ds.labels[7]]}", got["lines"][2]]
    assert got["lines"][2].startswith("current: ")
    at.session_state["m_hover"] = {"hovered": 10_000}  # not an image of this map (a stale state): no card
    at.run()
    assert card()["idx"] is None and not at.exception


def test_the_canvas_payload_groups_colours_like_the_figure_and_keeps_names_as_text():
    import pandas as pd

    from audit.dashboard import mapcanvas

    n = 60
    rng = np.random.default_rng(0)
    pts = pd.DataFrame(
        {"image_index": np.arange(n), "x": rng.normal(size=n), "y": rng.normal(size=n),
         "given": [HOSTILE[i % 4] for i in range(n)], "current": ["a\u200bb"] * n,
         "flagged": np.arange(n) % 5 == 0, "checks": ["label" if i % 5 == 0 else "" for i in range(n)],
         "reviewed": np.zeros(n, dtype=bool), "confidence": np.linspace(0, 1, n)}
    )  # fmt: skip
    got = mapcanvas.payload(pts, "given", highlight=[1, 2, 3])
    # One group per class, as the static figure's traces; the names exactly as typed (the legend sets textContent).
    names = [e["name"] for e in got["legend"]]
    assert names[:4] == [f"{h} (15)" for h in sorted(HOSTILE)] and names[4] == "filter matches (3)"
    # The points go as one frame (Arrow): typed columns the element reads as typed arrays; int32, never int64
    # (BigInt in JavaScript).
    pt = got["points"]
    assert list(pt.columns) == ["x", "y", "idx", "g", "ring"] and len(pt) == n
    assert [str(pt[c].dtype) for c in pt.columns] == ["float32", "float32", "int32", "int16", "uint8"]
    assert np.flatnonzero(pt["ring"]).tolist() == [1, 2, 3] and pt["idx"].tolist() == list(range(n))
    assert np.allclose(pt["x"], pts["x"], atol=1e-6) and np.allclose(pt["y"], pts["y"], atol=1e-6)
    assert [got["colours"][g] for g in pt["g"][:4]] == [
        got["legend"][sorted(HOSTILE).index(HOSTILE[i])]["colour"] for i in range(4)
    ]
    assert "\u200b" not in mapcanvas.payload(pts, "current")["legend"][0]["name"]  # invisible: shown visibly
    flags = mapcanvas.payload(pts, "flagged")
    assert flags["points"]["g"].tolist()[:2] == [1, 0] and flags["colours"][1] != flags["colours"][0]
    conf = mapcanvas.payload(pts, "confidence")  # a colour scale, cut into steps: low confidence, low step
    g = conf["points"]["g"].tolist()
    assert len(conf["colours"]) == mapcanvas.SCALE_STEPS and g[0] == 0 and g[-1] == 47
    # What is drawn has a key: a colour change changes it; the kept selection does not (no redraw on a rerun).
    sel = {"points": [3]}
    assert got["key"] != flags["key"] and mapcanvas.payload(pts, "given", [1, 2, 3], selection=sel)["key"] == got["key"]
    empty = mapcanvas.payload(pts.iloc[:0], "given")
    assert empty["points"].empty and empty["legend"] == []
    # Moving one point changes the key too (the digest covers the points, not only the small parts).
    moved = pts.copy()
    moved.loc[7, "x"] += 0.5
    assert mapcanvas.payload(moved, "given", [1, 2, 3])["key"] != got["key"]


def test_the_outline_legend_counts_the_filters_images_on_the_map_not_only_the_drawn_ones():
    import pandas as pd

    from audit.dashboard import mapcanvas

    pts = pd.DataFrame(
        {"image_index": np.arange(6), "x": np.arange(6.0), "y": np.arange(6.0), "given": ["a"] * 6,
         "current": ["a"] * 6, "flagged": [False] * 6, "checks": [""] * 6, "reviewed": [False] * 6,
         "confidence": np.ones(6)}
    )  # fmt: skip
    legend = [e["name"] for e in mapcanvas.payload(pts, "given", [1, 2], matches=40)["legend"]]
    assert legend[-1] == "filter matches (40; 2 drawn)"
    assert mapcanvas.payload(pts, "given", [1, 2], matches=2)["legend"][-1]["name"] == "filter matches (2)"
    assert mapcanvas.payload(pts, "given", [1, 2])["legend"][-1]["name"] == "filter matches (2)"


def test_the_map_page_legend_counts_every_filter_match_when_it_draws_a_sample(map_ws, monkeypatch):
    """Beyond the drawing limit the page draws a sample; the outline's legend still counts every image of the map
    the filter keeps (the limit lowered here, as a 50,000-image workspace would need)."""
    from streamlit.testing.v1 import AppTest

    from audit import queries as q
    from audit.dashboard import mapfig

    _, db, _, _, _, _ = map_ws
    monkeypatch.setenv("AUDIT_DB", str(db))
    pts = mapview.map_points(db, *mapview.map_maps(db)["maps"][0])
    # Here every image is flagged by some check (the synthetic images are near-duplicates), so the drawn half of the
    # map is a sample of all of them, and of the filter's images.
    keep = mapview.selected_images(db, q.Filters(kinds=(), checks=(), reviewed="all", images=tuple(range(0, 40, 2))))
    limit = len(pts) // 2
    real = mapfig.shown_points
    monkeypatch.setattr(mapfig, "shown_points", lambda p, k=None: real(p, k, limit=limit))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.query_params["page"] = "map"
    at.session_state["f_images"] = [int(i) for i in keep]
    at.session_state["f_kinds"] = []
    at.session_state["f_reviewed"] = "all"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    (el,) = [e for e in at.main if e.type == "bidi_component" and e.proto.component_name == "audit_map"]
    names = [e["name"] for e in json.loads(el.proto.mixed.json)["legend"]]  # the points go apart, as Arrow
    on_map = int(np.isin(pts["image_index"], keep).sum())
    (entry,) = [nm for nm in names if nm.startswith("filter matches")]
    drawn = int(np.isin(real(pts, keep, limit=limit)["image_index"], keep).sum())
    assert on_map == len(keep) and 0 < drawn < on_map and entry == f"filter matches ({on_map:,}; {drawn:,} drawn)"


@pytest.mark.parametrize(
    ("state", "want"),
    [({"selection": {"lasso": {"x": [0, 1, 1.5], "y": [0, 0, 1]}}},
      {"lasso": [{"x": [0.0, 1.0, 1.5], "y": [0.0, 0.0, 1.0]}]}),
     ({"selection": {"box": {"x": [0, 1], "y": [2, 3]}}}, {"box": [{"x": [0.0, 1.0], "y": [2.0, 3.0]}]}),
     ({"selection": {"points": [4, True, -1, "7"]}}, {"points": [{"customdata": 4}]}),
     ({"selection": {"lasso": {"x": [0, float("nan")], "y": [0, 1]}}}, {}),
     ({"selection": {"lasso": {"x": [0, 1], "y": [0]}}}, {}), ({"selection": {"box": {"x": [1], "y": [1]}}}, {}),
     ({"selection": None}, {}), (None, {}), ("x", {}), ({"selection": "<b>"}, {})],
)  # fmt: skip
def test_the_canvas_selection_becomes_the_event_the_page_reads(state, want):
    from audit.dashboard.mapcanvas import selection_event

    assert selection_event(state) == {"selection": {"points": [], "box": [], "lasso": [], **want}}


@pytest.mark.parametrize(
    ("state", "want"),
    [({"hovered": 3}, 3), ({"hovered": 3.0}, 3), ({"hovered": None}, None), ({"hovered": -1}, None),
     ({"hovered": True}, None), ({"hovered": "3"}, None), ({"hovered": float("nan")}, None), ({}, None),
     (None, None), ("x", None)],
)  # fmt: skip
def test_hovered_index_takes_only_a_non_negative_number(state, want):
    from audit.dashboard.maphover import hovered_index

    assert hovered_index(state) == want


def test_the_hover_card_shows_names_as_typed_and_no_card_without_a_thumbnail():
    import pandas as pd

    from audit.dashboard.maphover import hover_payload

    pts = pd.DataFrame(
        {"image_index": [0, 1], "image_id": [HOSTILE[3], "b\u200bc.jpg"], "given": [HOSTILE[0], "x"],
         "current": [HOSTILE[1], "y"], "checks": [None, "label"]}
    )  # fmt: skip
    got = hover_payload(pts, 0, lambda i: b"\xff\xd8jpeg")
    # Text, not markup: the card sets textContent, so the lines carry the names exactly (invisible ones shown).
    assert got["lines"] == [HOSTILE[3], f"given: {HOSTILE[0]}", f"current: {HOSTILE[1]}"]
    assert "flagged by: label" in hover_payload(pts, 1, lambda i: b"j")["lines"]
    assert "\u200b" not in "".join(hover_payload(pts, 1, lambda i: b"j")["lines"])
    assert hover_payload(pts, 0, lambda i: None)["idx"] is None  # an unreadable image: no card
    assert hover_payload(pts.iloc[:0], 0, lambda i: b"j")["idx"] is None


def test_audit_map_computes_from_stored_features_without_rescoring(map_ws, capsys):
    _, db, _, good, _, _ = map_ws
    assert main(["map", "--db", str(db)]) == 0
    assert f"map of preds:{good.stem} (umap)" in capsys.readouterr().out
    assert main(["map", "--db", str(db), "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--model 'nope' has no stored features" in err and "Traceback" not in err
    assert main(["map", "--db", str(db.with_name("missing.duckdb"))]) == 2


def test_a_sampled_drawing_keeps_flags_and_a_lasso_selects_every_image_inside():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 400
    pts = pd.DataFrame(
        {
            "image_index": np.arange(n),
            "x": rng.uniform(-1, 1, n),
            "y": rng.uniform(-1, 1, n),
            "flagged": np.arange(n) % 50 == 0,
            "checks": ["label" if i % 50 == 0 else "" for i in range(n)],
        }
    )
    drawn = mapfig.shown_points(pts, keep=[3, 7], limit=100)
    assert len(drawn) == 100 and {3, 7} | set(range(0, n, 50)) <= set(drawn["image_index"])
    assert drawn.equals(mapfig.shown_points(pts, keep=[3, 7], limit=100))  # the same sample on every rerun
    assert mapfig.shown_points(pts, limit=1000) is pts
    # A filter larger than the room left: every flagged point, then a sample of the filter, and nothing else.
    many = list(range(1, n, 2))
    capped = mapfig.shown_points(pts, keep=many, limit=100)
    got = set(capped["image_index"])
    assert len(capped) == 100 and set(range(0, n, 50)) <= got and got - set(range(0, n, 50)) <= set(many)
    assert capped.equals(mapfig.shown_points(pts, keep=many, limit=100))
    assert len(mapfig.shown_points(pts, keep=many, limit=5)) == 5  # the flagged tier itself sampled
    x, y = pts["x"].to_numpy(), pts["y"].to_numpy()
    box = {"selection": {"points": [], "box": [{"x": [0.5, -0.5], "y": [-0.5, 0.5]}], "lasso": []}}
    want = np.flatnonzero((np.abs(x) <= 0.5) & (np.abs(y) <= 0.5)).tolist()
    assert mapfig.selected_from_event(box, pts) == want and len(want) > 50
    tri = {"selection": {"points": [], "box": [], "lasso": [{"x": [0, 1, 0], "y": [0, 0, 1]}]}}
    want = np.flatnonzero((x > 0) & (y > 0) & (x + y < 1)).tolist()
    assert mapfig.selected_from_event(tri, pts) == want
