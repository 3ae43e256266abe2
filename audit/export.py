"""Export the cleaned label set: the same workspace in, byte-identical files out.

Files written into ``--out``:

* ``labels.csv`` — ``image,label,labels,status,source`` for every image, sorted
  by image id. ``label`` is the primary class index (empty when excluded),
  ``labels`` every valid class index separated by spaces. It loads back as a
  label file (``audit run --labels labels.csv``).
* ``classes.csv`` — ``index,key,name`` of the label space.
* ``excluded.csv`` — ``image,reason`` for images left out: unreadable (the decoder's message), no class
  fits (review), no label, or ``duplicate of <image id>`` (a copy excluded in review, the reviewer's note
  after ``;``; ``duplicate of reference image <id>`` for a copy of a reference-set image).
* ``labels.jsonl`` / ``classes.jsonl`` — the same rows (labels.jsonl adds ``reason``)
  as JSON lines: the lossless machine-readable form.
* ``real.json`` — ReaL-style list of label lists in file-name order, when every
  image id is an ``ILSVRC2012_val_XXXXXXXX`` file.
* ``imagefolder.txt`` — ImageFolder-style listing ``<class key>/<file name>``,
  one line per valid label of each kept image, escaped by :func:`escape_listing`.

The CSV files are for spreadsheets: a text cell beginning with ``= + - @``, tab,
CR, LF or NUL is prefixed with ``'`` and text cells are quoted (OWASP's
CSV-injection guidance, :mod:`audit._csvsafe`); an image path is prefixed with
``./`` instead, so it still names its file. Read the JSON lines when you need every
name exactly as it is.

Nothing time-dependent goes into the files, and each is written to a temporary
name and renamed, so an interrupted export never leaves a half-written file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from audit._csvsafe import path_cell, rows_to_csv
from audit._io import atomic_write
from audit.datasets import real_index_of
from audit.store import connect, current_labels_sql, current_sql

__all__ = ["ExportResult", "cleaned_labels", "escape_listing", "export_labels", "render_exports", "unescape_listing"]


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
        image, label, labels (list of int), status, source, reason (why an excluded image is left out).
    classes : DataFrame with index, key, name.
    """
    with connect(db, read_only=True) as con:
        # The current label set comes from the one fold of the review log that every reader uses.
        df = con.execute(
            f"""
            WITH {current_sql("l")}
            SELECT i.image_id AS image, i.label AS given, {current_labels_sql("l", "i")} AS labels,
                   coalesce(l.reviewed, false) AS reviewed, l.reviewer, l.decision_id, l.action,
                   d.reason AS decision_reason, b.reason AS bad_reason, coalesce(li.is_label_issue, false) AS flagged
            FROM images i
            LEFT JOIN l USING (image_index)
            LEFT JOIN decisions d ON d.decision_id = l.decision_id
            LEFT JOIN bad_images b USING (image_index)
            LEFT JOIN label_issues li USING (image_index)
            ORDER BY i.image_id
            """
        ).df()
        classes = con.execute("SELECT class_index AS index, key, name FROM classes ORDER BY class_index").df()
    rows = []
    for r in df.itertuples(index=False):
        given = [int(r.given)] if pd.notna(r.given) and r.given >= 0 else []
        decided = bool(r.reviewed)
        labels = [int(x) for x in r.labels]
        if isinstance(r.bad_reason, str):
            status, labels, reason = "bad_image", [], r.bad_reason
        elif not labels and decided and r.action == "duplicate":
            # "duplicate of <image id>" (audit.store.duplicate_reason): written as data, like every name here.
            status, reason = "excluded", str(r.decision_reason or "duplicate")
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
    primary = [None if p is None or pd.isna(p) else int(p) for p in images["label"].tolist()]
    sets = [[int(c) for c in x] for x in images["labels"].tolist()]
    status = images["status"].tolist()
    source = images["source"].tolist()
    reason = images["reason"].tolist()
    cls = [(int(i), str(k), str(n)) for i, k, n in classes[["index", "key", "name"]].itertuples(index=False)]
    out: dict[str, bytes] = {}
    out["labels.csv"] = rows_to_csv(
        ["image", "label", "labels", "status", "source"],
        (
            [path_cell(i), p, " ".join(map(str, s)), st, so]
            for i, p, s, st, so in zip(ids, primary, sets, status, source, strict=True)
        ),
    )
    out["classes.csv"] = rows_to_csv(["index", "key", "name"], cls)
    out["excluded.csv"] = rows_to_csv(
        ["image", "reason"],
        ([path_cell(i), r] for i, r, st in zip(ids, reason, status, strict=True) if st in ("excluded", "bad_image")),
    )
    out["labels.jsonl"] = _jsonl(
        {"image": i, "label": p, "labels": s, "status": st, "source": so, "reason": r}
        for i, p, s, st, so, r in zip(ids, primary, sets, status, source, reason, strict=True)
    )
    out["classes.jsonl"] = _jsonl({"index": i, "key": k, "name": n} for i, k, n in cls)
    listing = [
        f"{escape_listing(keys[c])}/{escape_listing(PurePosixPath(i).name)}"
        for i, s in zip(ids, sets, strict=True)
        for c in s
    ]
    out["imagefolder.txt"] = ("\n".join(listing) + "\n").encode()
    idx = [real_index_of(i) for i in ids]
    if idx and all(i is not None for i in idx):
        order = sorted(range(len(idx)), key=lambda j: idx[j])
        out["real.json"] = json.dumps([sets[j] for j in order], separators=(", ", ": ")).encode()
    return out


def _jsonl(objs: Iterable[dict[str, Any]]) -> bytes:
    # ASCII-only JSON: every name survives exactly, and no character in it can break a line.
    return "".join(json.dumps(o, ensure_ascii=True) + "\n" for o in objs).encode()


# Escapes of imagefolder.txt, as in Python string literals.
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSHORT = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPED = re.compile(r"\\(?:([\\nrt])|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def escape_listing(name: str) -> str:
    """One name as it appears in ``imagefolder.txt``: a line of printable text, reversible.

    A backslash is written ``\\\\``, newline / CR / tab ``\\n`` ``\\r`` ``\\t``, and every
    other character that is not printable (control characters, line and paragraph
    separators, non-ASCII spaces, lone surrogates) ``\\xHH``, ``\\uHHHH`` or
    ``\\UHHHHHHHH`` (lower-case hex), as in a Python string literal. A line is
    ``<class key>/<file name>``; a file name has no ``/``, so split at the last one.
    """
    out = []
    for ch in name:
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def unescape_listing(text: str) -> str:
    """Inverse of :func:`escape_listing`."""

    def one(m: re.Match[str]) -> str:
        short, *hexes = m.groups()
        return _UNSHORT[short] if short else chr(int(next(h for h in hexes if h), 16))

    return _ESCAPED.sub(one, text)


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
