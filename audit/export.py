"""Export the cleaned label set: the same workspace in, byte-identical files out.

Files written into ``--out``:

* ``labels.csv`` — ``image,label,labels,status,source`` for every image, sorted
  by image id. ``label`` is the primary class index (empty when excluded),
  ``labels`` every valid class index separated by spaces.
* ``classes.csv`` — ``index,key,name`` of the label space.
* ``real.json`` — ReaL-style list of label lists in file-name order, when every
  image id is an ``ILSVRC2012_val_XXXXXXXX`` file.
* ``imagefolder.txt`` — ImageFolder-style listing ``<class key>/<file name>``,
  one line per valid label of each kept image.
* ``excluded.csv`` — ``image,reason`` for images left out.

Nothing time-dependent goes into the files, and each is written to a temporary
name and renamed, so an interrupted export never leaves a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from audit._io import atomic_write
from audit.datasets import real_index_of
from audit.store import connect

__all__ = ["ExportResult", "cleaned_labels", "export_labels", "render_exports"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: tuple[str, ...]
    n_images: int
    n_changed: int
    n_excluded: int


def cleaned_labels(db: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Current label state of every image, and the class table.

    Returns
    -------
    images : DataFrame, one row per image sorted by image id, with columns
        image, label, labels (list of int), status, source, reason.
    classes : DataFrame with index, key, name.
    """
    with connect(db, read_only=True) as con:
        df = con.execute(
            """
            WITH last AS (
                SELECT image_index, new_labels, action, reviewer, decision_id,
                       row_number() OVER (PARTITION BY image_index ORDER BY decision_id DESC) AS rn
                FROM decisions)
            SELECT i.image_id AS image, i.label AS given, l.new_labels, l.action, l.reviewer, l.decision_id,
                   b.reason AS bad_reason, coalesce(li.is_label_issue, false) AS flagged
            FROM images i
            LEFT JOIN last l ON l.image_index = i.image_index AND l.rn = ?
            LEFT JOIN bad_images b ON b.image_index = i.image_index
            LEFT JOIN label_issues li ON li.image_index = i.image_index
            ORDER BY i.image_id
            """,
            [1],
        ).df()
        classes = con.execute("SELECT class_index AS index, key, name FROM classes ORDER BY class_index").df()
    rows = []
    for r in df.itertuples(index=False):
        given = [int(r.given)] if pd.notna(r.given) and r.given >= 0 else []
        decided = pd.notna(r.decision_id)
        labels = [int(x) for x in r.new_labels] if decided else given
        if isinstance(r.bad_reason, str):
            status, labels, reason = "bad_image", [], r.bad_reason
        elif not labels:
            status, reason = "excluded", "no class fits (review)" if decided else "no label"
        elif not decided:
            status, reason = ("flagged" if r.flagged else "original"), ""
        elif labels == given:
            status, reason = "kept", ""
        else:
            status, reason = ("multi_label" if len(labels) > 1 else "relabeled"), ""
        source = f"decision {int(r.decision_id)} by {r.reviewer}" if decided else "given"
        rows.append(
            {
                "image": r.image,
                "label": labels[0] if labels else None,
                "labels": labels,
                "status": status,
                "source": source,
                "reason": reason,
                "changed": decided and labels != given,
            }
        )
    return pd.DataFrame(rows), classes


def render_exports(images: pd.DataFrame, classes: pd.DataFrame) -> dict[str, bytes]:
    """The export files as bytes, keyed by file name (pure; no I/O)."""
    keys = classes["key"].tolist()
    # Plain Python lists: row access on Arrow-backed frames costs seconds at 50,000 images.
    ids = images["image"].tolist()
    primary = images["label"].tolist()
    sets = [list(x) for x in images["labels"].tolist()]
    status = images["status"].tolist()
    source = images["source"].tolist()
    reason = images["reason"].tolist()
    out: dict[str, bytes] = {}
    out["labels.csv"] = _csv(
        ["image", "label", "labels", "status", "source"],
        (
            [i, "" if p is None or pd.isna(p) else int(p), " ".join(map(str, s)), st, so]
            for i, p, s, st, so in zip(ids, primary, sets, status, source, strict=True)
        ),
    )
    out["classes.csv"] = _csv(["index", "key", "name"], classes.itertuples(index=False))
    out["excluded.csv"] = _csv(
        ["image", "reason"],
        ([i, r] for i, r, st in zip(ids, reason, status, strict=True) if st in ("excluded", "bad_image")),
    )
    listing = [f"{keys[c]}/{PurePosixPath(i).name}" for i, s in zip(ids, sets, strict=True) for c in s]
    out["imagefolder.txt"] = ("\n".join(listing) + "\n").encode()
    idx = [real_index_of(i) for i in ids]
    if idx and all(i is not None for i in idx):
        order = sorted(range(len(idx)), key=lambda j: idx[j])
        out["real.json"] = json.dumps([sets[j] for j in order], separators=(", ", ": ")).encode()
    return out


def _csv(header: list[str], rows: object) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)  # type: ignore[arg-type]
    return buf.getvalue().encode()


def export_labels(db: str | Path, out: str | Path) -> ExportResult:
    """Write the cleaned label set of workspace ``db`` into folder ``out``."""
    images, classes = cleaned_labels(db)
    files = render_exports(images, classes)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob(".tmp-*"):  # left by an export killed mid-write
        stale.unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write(target / name, data)
    return ExportResult(
        out=target,
        files=tuple(sorted(files)),
        n_images=len(images),
        n_changed=int(images["changed"].sum()),
        n_excluded=int(images["status"].isin(["excluded", "bad_image"]).sum()),
    )
