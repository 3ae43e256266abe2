"""Small finished workspaces of every kind the dashboard must serve, built from prediction files (seconds).

* ``real``: wnid ImageFolder of ILSVRC-2012 file names, so ReaL sets apply (test_queries.make_workspace).
* ``noreal``: a flat folder with a label file of wnids and ordinary file names: ImageNet classes, no ReaL.
* ``custom``: an ImageFolder of custom class folders (4 classes), predictions with 4 columns.
* ``hostile``: like ``custom``, with every name a user controls made of Markdown, KaTeX, colour directives,
  HTML, remote images, spreadsheet formulas, bidi overrides, newlines, quotes and spaces (see HOSTILE).

Every kind flips the labels at ``FLIP`` (each model's top-1 is label + 1 there), so those images are flagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _synth import make_predictions
from PIL import Image

from audit.datasets import load_dataset
from audit.pipeline import run_audit
from audit.zoo import resolve_model

__all__ = [
    "BAD_REASON",
    "CLASSES",
    "FLIP",
    "KINDS",
    "MARK",
    "MODELS",
    "NAMES",
    "REASON",
    "REMOTE",
    "REVIEWER",
    "add_hostile_review",
    "build",
]

FLIP = (1, 7, 13)
KINDS = ("real", "noreal", "custom", "hostile")
N_IMAGES = 24
# Every hostile string carries MARK ("zq"), so a test can find user text wherever a page put it.
MARK = "zq"
# Class names come from the label file: any text, slashes and a newline included.
CLASSES = (
    "`tick` **bold** _em_ zqc0",
    "$x^2$ :red[red] ![](http://203.0.113.1/c.png) zqc1",
    "<img src=http://example.invalid/c.png> =cmd|' /C calc'!A0 zqc2",
    "line one\nline two \u202egnp.exe zqc3",
)
# Folder and file names (no '/'; a newline where the filesystem allows it, see build()).
NAMES = (
    "`b` **bold** zqf0",
    "$x^2$ :red[red] zqf1",
    "<img src=x onerror=alert(1)> zqf2",
    "=cmd|' C calc'!A0 zqf3",
    "[link](http:) \"quoted\" 'single' zqf4",
    ":smile: :material/home: ~~strike~~ zqf5",
    "# heading > quote \u202egpj.exe zqf6",
    "two\nlines zqf7",
)
# A folder path that spells a remote Markdown image: browsers read http:/host/x as http://host/x.
REMOTE = "![](http:/203.0.113.1/x.png) zqf8.jpg"
MODELS = ("m `**x**` $y$ zqm0", "m :red[r] <b>b zqm1")
REVIEWER = "<b>rev</b> `r` **r** zqr"
REASON = ":red[why] $z$ ![](http://203.0.113.1/r.png) =1+1 zqs"
BAD_REASON = "cannot identify image file '![](http://203.0.113.1/bad.png) `x` zqbad'"


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30, 36, 3), dtype=np.uint8)).save(path, format="JPEG", quality=80)


def _run(ds, specs: list[Path], db: Path) -> Path:
    run_audit(ds, [resolve_model(f"preds:{p}") for p in specs], db, progress=False)
    return db


def _preds(base: Path, ds, n_classes: int, names: tuple[str, str] = ("a", "b")) -> list[Path]:
    ids, labels = list(ds.image_ids), ds.labels
    flip = np.array(FLIP)
    return [
        make_predictions(base / f"{names[0]}.npy", ids, labels, n_classes=n_classes, flip=flip, seed=1),
        make_predictions(base / f"{names[1]}.npy", ids, labels, n_classes=n_classes, flip=flip, seed=2, probs=True),
    ]


def _noreal(base: Path) -> Path:
    from _synth import WNIDS

    root = base / "flat"
    rows = ["path,label"]
    for k in range(N_IMAGES):
        _image(root / f"photo_{k:03d}.jpg", k)
        rows.append(f"photo_{k:03d}.jpg,{WNIDS[k % len(WNIDS)]}")
    (base / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(root, label_file=base / "labels.csv")
    assert ds.real is None and ds.label_space.imagenet
    return _run(ds, _preds(base, ds, 1000), base / "w.duckdb")


def _custom(base: Path) -> Path:
    root = base / "pets"
    for k in range(N_IMAGES):
        _image(root / ("cat", "dog", "bird", "fish")[k % 4] / f"pic{k:02d}.png", k)
    ds = load_dataset(root)
    assert ds.layout == "imagefolder-custom" and ds.real is None
    return _run(ds, _preds(base, ds, 4), base / "w.duckdb")


def _hostile(base: Path) -> Path:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = base / "data `root` **x** zqroot"
    newline_ok = _newline_names_allowed(base)
    rows = []
    for k in range(N_IMAGES):
        name = NAMES[k % len(NAMES)] if newline_ok else NAMES[k % len(NAMES)].replace("\n", " ")
        rel = REMOTE if k == 0 else f"{NAMES[(k + 3) % 6]}/{name} {k:02d}.jpg"
        _image(root / rel, k)
        rows.append((rel, CLASSES[k % 4]))
    with open(base / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "label"))
        w.writerows(rows)
    ds = load_dataset(root, label_file=base / "labels.csv")
    assert ds.layout == "label-file" and sorted(ds.label_space.names) == sorted(CLASSES)
    ids, labels = list(ds.image_ids), ds.labels
    specs = []
    for j, stem in enumerate(MODELS):
        rng = np.random.default_rng(j)
        logits = rng.normal(0, 1, (len(ids), 4)).astype(np.float32)
        target = labels.copy()
        target[list(FLIP)] = (labels[list(FLIP)] + 1) % 4
        logits[np.arange(len(ids)), target] += 9.0
        path = base / f"{stem}.parquet"
        pq.write_table(pa.table({"image": ids, "logits": [r.tolist() for r in logits]}), path)
        specs.append(path)
    return _run(ds, specs, base / "w `db` **x** zqdb.duckdb")


def add_hostile_review(db: Path, bad: int = 5) -> None:
    """Decisions by a hostile reviewer with a hostile reason, and image ``bad`` recorded as unreadable."""
    from audit import queries as q
    from audit.store import connect

    q.record_decision(db, FLIP[0], "keep", reviewer=REVIEWER, reason=REASON)
    q.record_decision(db, FLIP[1], "no_fit", reviewer=REVIEWER, reason=REASON)
    with connect(db) as con:  # what a scored model records for a file it cannot decode
        image_id = con.execute("SELECT image_id FROM images WHERE image_index = ?", [bad]).fetchone()[0]
        con.execute("INSERT INTO bad_images VALUES (?, ?, ?, ?)", [bad, image_id, BAD_REASON, "r"])
        con.execute("UPDATE images SET valid = false WHERE image_index = ?", [bad])


def _newline_names_allowed(base: Path) -> bool:
    """Whether this filesystem takes a newline in a file name (Linux does)."""
    p = base / "nl\ntest"
    try:
        p.write_text("")
    except OSError:
        return False
    p.unlink()
    return True


def build(kind: str, base: Path) -> Path:
    """A finished workspace of ``kind`` (one of :data:`KINDS`) under ``base``; returns the DuckDB path."""
    base.mkdir(parents=True, exist_ok=True)
    if kind == "real":
        from test_queries import make_workspace

        return make_workspace(base)[0]
    return {"noreal": _noreal, "custom": _custom, "hostile": _hostile}[kind](base)
