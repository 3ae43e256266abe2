"""Duplicate groups for review (audit.duplicates_view): the group query, resolving a group in one step, the CLI.

One workspace made as a user makes one: an ImageFolder of seeded images (ImageNet wnids, so a zoo-shaped
random-weights SqueezeNet predicts its label space and the metrics exist) into which copies are planted,
and a training folder (``--reference``) holding a copy of one validation image under another class. The run
uses ``--no-features``: the groups come from identical pixels (``exact_duplicate``) and perceptual hashes
(``near_duplicate``'s phash half) alone, as they do for prediction-file models or a run without features.

Planted (see ``dup_ws``): a byte copy filed under another class (labels differ), a byte copy under the same
class, and a group of three joined by both checks (a byte copy, and a re-encoded copy under another class,
which only the phash joins); and a validation image copied into the training set under another class.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import duckdb
import pytest
from _synth import WNIDS, make_checkpoint, make_imagefolder
from PIL import Image

from audit import duplicates_view as dv
from audit import queries as q
from audit.cli import main
from audit.errors import DiskError, ReviewError
from audit.store import DecisionRequest, append_decision, append_decisions, connect, label_state

# Copies planted into the validation folder: (source class, source file number) -> (target class, new file).
PLANTED = {
    "differ": ((0, 1), (1, "ILSVRC2012_val_00000101.JPEG")),  # the same picture under two classes
    "same": ((2, 9), (2, "ILSVRC2012_val_00000102.JPEG")),  # a copy under its own class
    "triple_copy": ((3, 13), (3, "ILSVRC2012_val_00000103.JPEG")),
}
REENCODED = ((3, 13), (0, "ILSVRC2012_val_00000104.JPEG"))  # the third image of that group, phash only
LEAK = (1, 6)  # copied into the training set under class 2


def _val_file(val: Path, cls: int, k: int) -> Path:
    return val / WNIDS[cls] / f"ILSVRC2012_val_{k:08d}.JPEG"


def build_duplicates_workspace(base: Path) -> tuple[Path, dict[str, str]]:
    """The planted workspace (see the module docstring); returns (db, {name: image id})."""
    val = make_imagefolder(base / "val_set", per_class=4, seed=0) / "val"
    train = make_imagefolder(base / "train_set", per_class=2, seed=1) / "val"
    ids: dict[str, str] = {}
    for name, ((sc, sk), (tc, new)) in PLANTED.items():
        shutil.copyfile(_val_file(val, sc, sk), val / WNIDS[tc] / new)
        ids[name] = f"{WNIDS[sc]}/{_val_file(val, sc, sk).name}"
        ids[name + "_copy"] = f"{WNIDS[tc]}/{new}"
    (sc, sk), (tc, new) = REENCODED
    Image.open(_val_file(val, sc, sk)).save(val / WNIDS[tc] / new, quality=60)
    ids["reencoded"] = f"{WNIDS[tc]}/{new}"
    shutil.copyfile(_val_file(val, *LEAK), train / WNIDS[2] / "train_leak.JPEG")
    ids["leak"] = f"{WNIDS[LEAK[0]]}/{_val_file(val, *LEAK).name}"
    ids["leak_train"] = f"{WNIDS[2]}/train_leak.JPEG"
    model = make_checkpoint(base / "ckpt" / "squeezenet.pth", arch="squeezenet1_1")
    db = base / "w.duckdb"
    argv = ["run", str(val.parent), "--models", model, "--no-features", "--reference", str(train), "--db", str(db)]
    assert main([*argv, "-q"]) == 0
    return db, ids


@pytest.fixture(scope="session")
def dup_base(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return build_duplicates_workspace(tmp_path_factory.mktemp("dups"))


@pytest.fixture
def dup_ws(dup_base, tmp_path) -> tuple[Path, dict[str, int]]:
    """A fresh copy of the planted workspace (no decisions), and {name: image index}."""
    db = tmp_path / "w.duckdb"
    shutil.copy(dup_base[0], db)
    with connect(db, read_only=True) as con:
        index = dict(con.execute("SELECT image_id, image_index FROM images").fetchall())
    return db, {k: index[v] for k, v in dup_base[1].items() if v in index}


def _decisions(db: Path) -> list[tuple]:
    with connect(db, read_only=True) as con:
        sql = "SELECT image_index, action, new_labels, reason FROM decisions ORDER BY decision_id"
        return con.execute(sql).fetchall()


def _relabeled_n(db: Path) -> int:
    m = q.metrics_table(db)
    return int(m[(m.evaluation == "relabeled") & (m.metric == "top1")]["n"].iloc[0])


def _export(db: Path) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """excluded.csv by image, and labels.jsonl, as ``audit export`` writes them (the same code)."""
    files = q.export_files(db)
    excluded = {r["image"]: r for r in csv.DictReader(io.StringIO(files["excluded.csv"].decode()))}
    return excluded, [json.loads(x) for x in files["labels.jsonl"].decode().splitlines()]


def _images(db: Path) -> dict[int, tuple[str, int]]:
    """image index -> (image id, given label)."""
    with connect(db, read_only=True) as con:
        return {i: (n, lab) for i, n, lab in con.execute("SELECT image_index, image_id, label FROM images").fetchall()}


# --------------------------------------------------------------------------- the group query


def test_both_checks_make_one_set_of_groups_differing_labels_first(dup_ws):
    db, ix = dup_ws
    res = dv.duplicate_groups(db)
    assert res["note"] is None and res["checks"] == {"exact_duplicate": None, "near_duplicate": None}
    groups = {g["group"]: g for g in res["groups"]}
    members = {gid: sorted(g["members"]["image_index"]) for gid, g in groups.items()}
    want = {
        frozenset({ix["differ"], ix["differ_copy"]}),
        frozenset({ix["same"], ix["same_copy"]}),
        frozenset({ix["triple_copy"], ix["triple_copy_copy"], ix["reencoded"]}),  # exact pair + phash third
        frozenset({ix["leak"]}),  # a copy of a training image only
    }
    assert {frozenset(m) for m in members.values()} == want
    assert all(gid == min(m) for gid, m in members.items()), "a group's id is its lowest image index"
    triple = groups[min(ix["triple_copy"], ix["triple_copy_copy"], ix["reencoded"])]
    assert triple["checks"] == ["exact_duplicate", "near_duplicate"]
    by = dict(zip(triple["members"]["image_index"], triple["members"]["checks"], strict=True))
    assert by[ix["reencoded"]] == ["near_duplicate"]  # re-encoded pixels: no md5 match
    # The leak: its reference partner is named with its training label (another class).
    leak = groups[ix["leak"]]
    (ref,) = leak["reference"]
    assert ref["id"] == "n01484850/train_leak.JPEG" and ref["label"] == 2 and ref["of"] == [ix["leak"]]
    assert ref["label_name"] == q.classes(db)["name"][2] and set(ref["checks"]) == set(dv.DUPLICATE_CHECKS)
    assert res["reference_root"] and Path(res["reference_root"]).name == "val"
    # Order: every group is unresolved; those whose labels differ (with the reference's label) come first.
    order = [g["group"] for g in res["groups"]]
    differ = [g["group"] for g in res["groups"] if g["labels_differ"]]
    assert set(differ) == {ix["differ"] if ix["differ"] < ix["differ_copy"] else ix["differ_copy"], ix["leak"],
                           triple["group"]}
    assert order[: len(differ)] == differ and not groups[min(ix["same"], ix["same_copy"])]["labels_differ"]
    assert res["counts"] == {"groups": 4, "images": 8, "differ": 3, "unresolved": 4, "reference": 1}


def test_pages_and_selections(dup_ws):
    db, _ = dup_ws
    full = [g["group"] for g in dv.duplicate_groups(db)["groups"]]
    pages = [dv.duplicate_groups(db, "all", p, 1) for p in range(4)]
    assert [p["groups"][0]["group"] for p in pages] == full and all(p["total"] == 4 for p in pages)
    past = dv.duplicate_groups(db, "all", 99, 3)
    assert past["page"] == 1 and [g["group"] for g in past["groups"]] == full[3:]  # the last page
    assert dv.duplicate_groups(db, "reference")["total"] == 1
    assert dv.duplicate_groups(db, "differ")["total"] == 3
    listed = dv.duplicate_groups(db, "all", 0, 10, members=1)["groups"]
    triple = next(g for g in listed if g["size"] == 3)
    assert len(triple["members"]) == 1 and triple["more"] == 2
    with pytest.raises(ReviewError, match="unknown group selection"):
        dv.duplicate_groups(db, "bogus")


# --------------------------------------------------------------------------- resolving


def test_excluding_copies_is_one_step_that_reaches_metrics_and_export_and_undoes_per_image(dup_ws):
    db, ix = dup_ws
    n0 = _relabeled_n(db)
    triple = [ix["triple_copy"], ix["triple_copy_copy"], ix["reencoded"]]
    keep = ix["triple_copy"]
    ids = dv.resolve_group(db, ix["reencoded"], "exclude_copies", keep=keep, reviewer="r", reason="same shot")
    assert len(ids) == 3
    rows = _decisions(db)
    images = _images(db)
    kept_id = images[keep][0]
    assert {(i, a, tuple(lab)) for i, a, lab, _ in rows} == {
        (keep, "keep", (images[keep][1],)),
        *((i, "duplicate", ()) for i in triple if i != keep),
    }
    assert {r for i, a, _, r in rows if a == "duplicate"} == {f"duplicate of {kept_id}; same shot"}
    g = dv.group_of(db, keep)
    assert g["resolved"] and (g["n_kept"], g["n_copies"]) == (1, 2) and not g["labels_differ"]
    assert _relabeled_n(db) == n0 - 2  # the copies left the evaluation
    counts = q.decision_counts(db)
    assert counts["duplicates"] == 2 and counts["by_action"]["duplicate"] == 2
    assert q.export_summary(db)["excluded"] == 2
    excluded, jsonl = _export(db)
    names = {images[i][0] for i in triple if i != keep}
    assert set(excluded) == names and {r["reason"] for r in excluded.values()} == {f"duplicate of {kept_id}; same shot"}
    assert {o["image"]: o["status"] for o in jsonl if o["image"] in names} == dict.fromkeys(names, "excluded")
    # Resolving it again the same way changes nothing, so writes nothing.
    assert dv.resolve_group(db, keep, "exclude_copies", keep=keep, reviewer="r", reason="same shot") == []
    # Undo, per image as ever: that copy is back in evaluation, and in the export.
    back = ix["reencoded"]
    append_decision(db, back, "undo", reviewer="r")
    assert label_state(db, back).labels == (images[back][1],)
    assert _relabeled_n(db) == n0 - 1
    excluded, _ = _export(db)
    assert images[back][0] not in excluded and len(excluded) == 1
    assert not dv.group_of(db, keep)["resolved"]  # one image has no decision in effect again


def test_keep_all_brings_copies_back_and_one_label_settles_the_group(dup_ws):
    db, ix = dup_ws
    a, b = sorted([ix["differ"], ix["differ_copy"]])
    n0 = _relabeled_n(db)
    dv.resolve_group(db, a, "exclude_copies", keep=a)
    assert label_state(db, b).labels == ()
    ids = dv.resolve_group(db, b, "keep_all")  # b: an undo (its exclusion), then kept as given
    assert [r[1] for r in _decisions(db) if r[0] == b] == ["duplicate", "undo", "keep"] and len(ids) == 2
    g = dv.group_of(db, a)
    assert g["resolved"] and g["n_copies"] == 0 and g["labels_differ"] and _relabeled_n(db) == n0
    assert dv.resolve_group(db, a, "keep_all") == []
    # One label for the group: where it is the given label, a keep; otherwise a relabel.
    target = _images(db)[a][1]
    dv.resolve_group(db, b, "one_label", label=target)
    assert _decisions(db)[-1][:3] == (b, "relabel", [target])
    g = dv.group_of(db, a)
    assert not g["labels_differ"] and g["given_differ"] and g["resolved"]
    assert dv.resolve_group(db, a, "one_label", label=target) == []
    # The leak: no image of the set to keep; it is excluded as a copy of the training image.
    dv.resolve_group(db, ix["leak"], "exclude_copies")
    assert _decisions(db)[-1][1:] == ("duplicate", [], "duplicate of reference image n01484850/train_leak.JPEG")


def test_a_group_is_resolved_entirely_or_not_at_all(dup_ws, monkeypatch):
    db, ix = dup_ws
    triple = sorted([ix["triple_copy"], ix["triple_copy_copy"], ix["reencoded"]])
    # A mistake in the last decision of a batch: the ones before it are not written either.
    reqs = [DecisionRequest(triple[0], "keep"), DecisionRequest(triple[1], "relabel", (10_000,))]
    with pytest.raises(ReviewError, match="outside the"):
        append_decisions(db, reqs)
    with pytest.raises(ReviewError, match="not in this workspace"):
        append_decisions(db, [DecisionRequest(triple[0], "keep"), DecisionRequest(triple[1], "duplicate", of=10**6)])
    with pytest.raises(ReviewError, match="outside the"):
        dv.resolve_group(db, triple[0], "one_label", label=10_000)
    assert _decisions(db) == []
    # A commit that fails (a full disk) leaves the log as it was.
    from audit import store

    def full(con):
        raise duckdb.TransactionException(
            f'TransactionContext Error: Failed to commit: Could not write file "{db}.wal": No space left on device'
        )

    monkeypatch.setattr(store, "_commit", full)
    with pytest.raises(DiskError):
        dv.resolve_group(db, triple[0], "exclude_copies", keep=triple[0])
    monkeypatch.undo()
    assert _decisions(db) == [] and not dv.group_of(db, triple[0])["resolved"]


@pytest.mark.parametrize(
    ("how", "kw", "match"),
    [
        ("exclude_copies", {}, "needs the image to keep"),
        ("exclude_copies", {"keep": "other"}, "is not in duplicate group"),
        ("one_label", {}, "needs the label"),
        ("shuffle", {}, "unknown resolution"),
    ],
)
def test_resolution_mistakes_are_refused_before_anything_is_written(dup_ws, how, kw, match):
    db, ix = dup_ws
    kw = {k: ix["same"] if v == "other" else v for k, v in kw.items()}
    with pytest.raises(ReviewError, match=match):
        dv.resolve_group(db, ix["differ"], how, **kw)
    with pytest.raises(ReviewError, match="in no duplicate group"):
        dv.group_of(db, next(i for i in range(30) if i not in set(ix.values())))
    assert _decisions(db) == []


# --------------------------------------------------------------------------- no groups


def test_workspaces_without_groups_say_why(dup_ws, tmp_path):
    db, _ = dup_ws
    # The checks ran and found nothing.
    none = tmp_path / "none.duckdb"
    shutil.copy(db, none)
    with connect(none) as con:
        con.execute("UPDATE issues SET is_issue = false WHERE \"check\" IN ('exact_duplicate', 'near_duplicate')")
    res = dv.duplicate_groups(none)
    assert res["note"] is None and res["counts"]["groups"] == 0 and res["groups"] == []
    # The last run did not select them (an older workspace, or --checks without them): how to run them.
    unrun = tmp_path / "unrun.duckdb"
    shutil.copy(db, unrun)
    with connect(unrun) as con:
        con.execute("DELETE FROM checks WHERE \"check\" IN ('exact_duplicate', 'near_duplicate')")
        con.execute("DELETE FROM issues WHERE \"check\" IN ('exact_duplicate', 'near_duplicate')")
    note = dv.duplicate_groups(unrun)["note"]
    assert "did not select them" in note and f"audit run --db {unrun} --checks " in note
    wanted = note.rsplit("--checks ", 1)[1].split(",")
    assert {"label", *dv.DUPLICATE_CHECKS} <= set(wanted)  # the run's own checks, and the duplicate ones


def test_prediction_file_workspaces_say_the_checks_were_skipped(tmp_path):
    from _workspaces import build

    db = build("custom", tmp_path / "c")
    res = dv.duplicate_groups(db)
    assert res["groups"] == [] and "the duplicate checks were skipped" in res["note"]
    assert "zoo model" in res["note"] and set(res["checks"]) == set(dv.DUPLICATE_CHECKS)


# --------------------------------------------------------------------------- the command line


def test_cli_lists_and_resolves_groups(dup_ws, capsys):
    db, ix = dup_ws
    assert main(["duplicates", "--db", str(db), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert "4 duplicate group(s) of 8 images: 3 with different labels, 1 with copies in the reference set" in err
    assert {r["status"] for r in rows} == {"not reviewed", "reference set"}
    assert [r["image"] for r in rows if r["status"] == "reference set"] == ["n01484850/train_leak.JPEG"]
    a, b = sorted([ix["differ"], ix["differ_copy"]])
    argv = ["duplicates", str(b), "exclude_copies", "--keep", str(a), "--reviewer", "cli", "--db", str(db)]
    assert main(argv) == 0
    assert "2 decision(s) recorded" in capsys.readouterr().out
    assert main(["duplicates", str(a), "--db", str(db), "--format", "csv"]) == 0
    listed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    kept = _images(db)[a][0]
    assert {r["image_index"]: r["status"] for r in listed} == {
        str(a): "reviewed (keep)",
        str(b): f"excluded: duplicate of {kept}",
    }
    assert main(["review", str(b), "undo", "--db", str(db)]) == 0
    assert main(["review", str(b), "duplicate", "--of", str(a), "--db", str(db)]) == 0
    assert _decisions(db)[-1][1:] == ("duplicate", [], f"duplicate of {kept}")
    label = q.classes(db)["key"][0]
    assert main(["duplicates", str(a), "one_label", "--label", label, "--db", str(db)]) == 0
    assert {label_state(db, i).labels for i in (a, b)} == {(0,)}


@pytest.mark.parametrize(
    "argv",
    [
        ["duplicates", "0", "exclude_copies"],  # image 0 is in no group, or no image to keep
        ["duplicates", "999", "keep_all"],
        ["duplicates", "--keep", "3"],
        ["duplicates", "0", "one_label", "--label", "no such class"],
        ["duplicates", "0", "merge"],
        ["duplicates", "--show", "everything"],
        ["review", "3", "duplicate"],
        ["review", "3", "duplicate", "--of", "3"],
        ["review", "3", "keep", "--of", "4"],
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(dup_ws, capsys, argv):
    db, _ = dup_ws
    assert main([*argv, "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("audit: error: ") and "Traceback" not in err[0], err
    assert _decisions(db) == []
