"""Every check of ``audit run`` measured on a constructed set with known answers, and its top findings on two real sets.

1. **Constructed set.** From ``../shared/datasets/imagenet-val-1300`` a seeded sample of base images is
   laid out as an ImageFolder under ``--work`` (never inside the repository): the originals, and for
   disjoint groups of ``--per-kind`` bases one modified copy each, of a known kind (:data:`KINDS`), plus
   ``--cifar`` CIFAR-10N images (another domain, 32 px) dropped into random ImageNet class folders.
   ``audit run`` (``--models``) scores it with every default check; each check's ``is_issue`` is compared
   with the positives defined for it (:data:`POSITIVES`): precision, recall, and the average precision
   of its score (low = suspicious). The checks run with their defaults: nothing is tuned to this set.
2. **Real sets.** The shared 1,300 ImageNet val images and CIFAR-10N (given labels ``labels_aggre.csv``,
   truth ``labels_clean.csv``): ``audit run`` on each (or a workspace given with ``--in1300-db`` /
   ``--cifar-db``, continued by a bare rerun), then, per check, how many it flags and, for the label
   checks, the share of flags that the truth confirms (ReaL for ImageNet, the clean labels for CIFAR);
   a contact sheet per set (``reports/screenshots/checks-<set>.png``) shows each check's top
   (lowest-score) findings: thumbnail, file name, given label, score, suggestion.

Writes ``reports/CHECKS.md`` and ``reports/checks_constructed.csv`` (and the sheets). Observations written
by hand from the sheets, if any, are kept in ``reports/checks_observations.md`` and included verbatim.
Exits 0 with a message when ``../shared`` is absent.

Usage::

    .venv/bin/python reports/checks_report.py [--quick] [--work /tmp/checksrep] [--models efficientnet_lite0]
        [--in1300-db PATH] [--cifar-db PATH] [--cifar-limit 2000] [--skip-real]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
IN1300 = SHARED / "imagenet-val-1300"
CIFAR = SHARED / "cifar10n-train-10k"
OUT_MD = ROOT / "reports" / "CHECKS.md"
OUT_CSV = ROOT / "reports" / "checks_constructed.csv"
OBS_MD = ROOT / "reports" / "checks_observations.md"
SHOTS = ROOT / "reports" / "screenshots"
IN1300_MODELS = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,squeezenet1_1"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Kinds of modified copy: name -> what it is (the report's method section lists these).
KINDS: dict[str, str] = {
    "exact": "byte copy, same class folder",
    "relabeled": "byte copy filed under another (random) class folder: a duplicate whose label is wrong",
    "jpeg_q50": "re-encoded as JPEG quality 50",
    "half_size": "resized to 0.5x (bicubic)",
    "crop_80": "centre crop, 80% of each side",
    "dark": "darkened: pixels x 0.12",
    "washed_out": "brightened: 255 - (255 - x) x 0.12 (the mirror of `dark`)",
    "near_white": "nearly white: 255 - (255 - x) x 0.03",
    "low_contrast": "contrast cut to 3% around the image's mean colour",
    "blur": "Gaussian blur, radius 3 px",
    "grayscale": "converted to grayscale (saved as a one-band JPEG)",
    "strip": "extreme aspect ratio: a full-width centre strip 1/4 as high",
    "tiny": "thumbnail, 28 px on the long side",
}
_DUP = ("exact", "relabeled")
# Every copy of a photo is a near duplicate of it, whatever was done to it (CleanVision and fastdup count
# photometric edits too): the question a reviewer asks is "is this the same photo?". The strip keeps a quarter
# of the photo, so it is left out; "where the flags fell" below gives the recall per kind.
_NEAR = tuple(k for k in KINDS if k != "strip")
# Each check's positives: copies of these kinds; "+sources" adds the base image each was made from.
POSITIVES: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "exact_duplicate": (_DUP, True, "byte copies (same and other class) and their sources"),
    "near_duplicate": (_NEAR, True, "every copy (byte copies, re-encodes, resizes, crops, photometric edits, "
                       "thumbnails; not the quarter-height strips) and their sources"),
    "label": (("relabeled", "cifar"), False, "copies filed under another class, and the CIFAR intruders"),
    "knn_label": (("relabeled", "cifar"), False, "copies filed under another class, and the CIFAR intruders"),
    "label_knn": (("relabeled", "cifar"), False, "copies filed under another class, and the CIFAR intruders"),
    "outlier": (("cifar",), False, "the CIFAR intruders"),
    "dark": (("dark",), False, "darkened copies"),
    "light": (("washed_out", "near_white"), False, "washed-out and nearly white copies"),
    "blurry": (("blur",), False, "blurred copies"),
    "low_information": (("low_contrast", "near_white"), False, "copies whose contrast was cut to 3%"),
    "grayscale": (("grayscale",), False, "grayscale copies, and any image whose decoded pixels are grey"),
    "odd_aspect_ratio": (("strip",), False, "strips"),
    "odd_size": (("tiny", "cifar"), False, "thumbnails and the 32 px CIFAR intruders"),
}
LABEL_CHECKS = ("label", "knn_label", "label_knn")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- constructed set
def _modify(img: Any, kind: str) -> Any:
    from PIL import Image, ImageFilter

    w, h = img.size
    a = np.asarray(img, dtype=np.float64)
    if kind == "half_size":
        return img.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC)
    if kind == "crop_80":
        dx, dy = w // 10, h // 10
        return img.crop((dx, dy, w - dx, h - dy))
    if kind == "dark":
        return Image.fromarray(np.clip(np.rint(a * 0.12), 0, 255).astype(np.uint8))
    if kind in ("washed_out", "near_white"):
        keep = 0.12 if kind == "washed_out" else 0.03
        return Image.fromarray(np.clip(np.rint(255 - (255 - a) * keep), 0, 255).astype(np.uint8))
    if kind == "low_contrast":
        mean = a.reshape(-1, 3).mean(0)
        return Image.fromarray(np.clip(np.rint(mean + (a - mean) * 0.03), 0, 255).astype(np.uint8))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(3))
    if kind == "grayscale":
        return img.convert("L")
    if kind == "strip":
        sh = max(1, h // 4)
        top = (h - sh) // 2
        return img.crop((0, top, w, top + sh))
    if kind == "tiny":
        t = img.copy()
        t.thumbnail((28, 28), Image.BICUBIC)
        return t
    return img  # jpeg_q50: the same pixels, saved at quality 50


def build_constructed(root: Path, *, per_kind: int, plain: int, n_cifar: int, seed: int) -> list[dict[str, str]]:
    """Lay the set out under ``root`` (wiped first); returns the manifest, one row per image."""
    from PIL import Image

    if root.exists():
        shutil.rmtree(root)
    files = sorted((IN1300 / "val").glob("*/*.JPEG"))
    wnids = sorted({f.parent.name for f in files})
    rng = np.random.default_rng(seed)
    n_bases = per_kind * len(KINDS) + plain
    if n_bases > len(files):
        raise SystemExit(f"{n_bases} bases asked for, the shared set has {len(files)} images")
    bases = [files[i] for i in rng.choice(len(files), n_bases, replace=False)]
    rows: list[dict[str, str]] = []

    def add(path: Path, kind: str, source: str) -> None:
        # Ids as the audit gives them: relative to the ImageFolder's root, the val/ folder.
        rows.append({"image_id": path.relative_to(root / "val").as_posix(), "kind": kind, "source": source})

    for j, src in enumerate(bases):
        d = root / "val" / src.parent.name
        d.mkdir(parents=True, exist_ok=True)
        base_id = f"{src.parent.name}/{src.name}"
        shutil.copyfile(src, d / src.name)  # the original, byte for byte
        kind = list(KINDS)[j // per_kind] if j < per_kind * len(KINDS) else None
        add(d / src.name, f"source:{kind}" if kind else "original", "")
        if kind is None:
            continue
        if kind in ("exact", "relabeled"):
            folder = src.parent.name
            if kind == "relabeled":
                folder = str(rng.choice([w for w in wnids if w != src.parent.name]))
            dst = root / "val" / folder / f"{src.stem}_{kind}.JPEG"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        else:
            img = Image.open(src).convert("RGB")
            dst = d / f"{src.stem}_{kind}.JPEG"
            _modify(img, kind).save(dst, quality=50 if kind == "jpeg_q50" else 90)
        add(dst, kind, base_id)
    cifar = sorted((CIFAR / "images").glob("*.jpg"))
    present = sorted({f.parent.name for f in bases})
    for i in rng.choice(len(cifar), n_cifar, replace=False):
        dst = root / "val" / str(rng.choice(present)) / f"cifar_{cifar[i].name}"
        shutil.copyfile(cifar[i], dst)
        add(dst, "cifar", "")
    rows.sort(key=lambda r: r["image_id"])
    return rows


def _audit(args: list[str]) -> None:
    """``audit run ...`` in a child process (progress on this terminal); stops the report if it fails."""
    cmd = [sys.executable, "-m", "audit.cli", "run", *args]
    _log("$ audit run " + " ".join(args))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"audit run failed (exit {res.returncode}): {' '.join(cmd)}")
    _log(f"audit run done in {time.perf_counter() - t0:.0f} s")


def _read(db: Path) -> dict[str, Any]:
    """What the report needs from a workspace: images, each check's rows and summary, the run's settings."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        img = con.execute(
            "SELECT image_index, image_id, label, real_labels, valid FROM images ORDER BY image_index"
        ).df()
        iss = con.execute('SELECT "check", image_index, score, is_issue FROM issues').df()
        rows = con.execute('SELECT "check", CAST(params AS VARCHAR), CAST(summary AS VARCHAR) FROM checks').fetchall()
        checks = {r[0]: (json.loads(r[1] or "{}"), json.loads(r[2] or "{}")) for r in rows}
        run = con.execute(
            "SELECT dataset_root, models, CAST(params AS VARCHAR) FROM runs WHERE status = ? "
            "ORDER BY finished_at DESC LIMIT 1",
            ["finished"],
        ).fetchone()
        if run is None:
            run = con.execute("SELECT dataset_root, models, CAST(params AS VARCHAR) FROM runs "
                              "ORDER BY started_at DESC LIMIT 1").fetchone()
        classes = dict(con.execute("SELECT class_index, name FROM classes").fetchall())
    finally:
        con.close()
    n = len(img)
    per: dict[str, dict[str, np.ndarray]] = {}
    for name, g in iss.groupby("check"):
        score = np.full(n, np.nan)
        flag = np.zeros(n, dtype=bool)
        ix = g["image_index"].to_numpy()
        score[ix] = g["score"].to_numpy(dtype=np.float64, na_value=np.nan)
        flag[ix] = g["is_issue"].to_numpy(dtype=bool, na_value=False)
        per[str(name)] = {"score": score, "is_issue": flag}
    return {
        "images": img,
        "checks": checks,
        "rows": per,
        "root": Path(run[0]) if run else None,
        "models": list(run[1]) if run and run[1] is not None else [],
        "classes": classes,
    }


def _ap(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    if not y.any():
        return float("nan")
    s = np.where(np.isfinite(score), score, 2.0)  # not assessed: ranked after every assessed image
    return float(average_precision_score(y, -s))


def _real_disputed(ids: list[str], labels: np.ndarray, sources: list[str]) -> np.ndarray:
    """(N,) bool: ImageNet images (or copies of one) whose given label ReaL rejects (outside its set, or none fits)."""
    from audit.datasets import load_real_labels, real_index_of

    sets, _ = load_real_labels(None)
    out = np.zeros(len(ids), dtype=bool)
    for i, (iid, src) in enumerate(zip(ids, sources, strict=True)):
        k = real_index_of(Path(src or iid).name)
        if k is not None and labels[i] >= 0:
            out[i] = labels[i] not in sets[k]
    return out


def _grey_pixels(root: Path, ids: list[str]) -> np.ndarray:
    """(N,) bool: decoded RGB pixels with three equal channels (PIL), measured here, not by the audit."""
    from PIL import Image

    out = np.zeros(len(ids), dtype=bool)
    for i, iid in enumerate(ids):
        a = np.asarray(Image.open(root / iid).convert("RGB"))
        out[i] = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    return out


def measure_constructed(ws: dict[str, Any], manifest: list[dict[str, str]], root: Path) -> dict[str, Any]:
    img = ws["images"]
    ids = img["image_id"].tolist()
    by_id = {r["image_id"]: r for r in manifest}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"the workspace holds images the manifest lacks, first {missing[0]!r}")
    kind = np.array([by_id[i]["kind"] for i in ids])
    source = [by_id[i]["source"] for i in ids]
    labels = img["label"].to_numpy(dtype=np.int64, na_value=-1)
    grey = _grey_pixels(ws["root"] or root / "val", ids)
    disputed = _real_disputed(ids, labels, source)
    rows = []
    for check in sorted(ws["checks"], key=lambda c: (c not in POSITIVES, list(POSITIVES).index(c) if c in POSITIVES
                                                      else 0, c)):
        params, summary = ws["checks"][check]
        kinds, with_src, _ = POSITIVES.get(check, ((), False, ""))
        pos = np.isin(kind, kinds)
        if with_src:
            pos |= np.isin(kind, [f"source:{k}" for k in kinds])
        if check == "grayscale":
            pos |= grey
        r = ws["rows"].get(check)
        row: dict[str, Any] = {
            "check": check,
            "positives": int(pos.sum()),
            "skipped": summary.get("skipped") or "",
            "threshold": summary.get("threshold", params.get("threshold")),
        }
        if r is None or row["skipped"]:
            rows.append({**row, "flagged": 0, "tp": 0, "precision": float("nan"), "recall": float("nan"),
                         "ap": float("nan"), "by_kind": {}, "fp_disputed": 0, "grey_natural": 0})
            continue
        flag = r["is_issue"]
        tp = int((flag & pos).sum())
        miss = r["score"][pos & ~flag]
        miss = miss[np.isfinite(miss)]
        row["missed_scores"] = (float(miss.min()), float(np.median(miss)), float(miss.max())) if miss.size else None
        row.update(
            flagged=int(flag.sum()),
            tp=tp,
            precision=tp / flag.sum() if flag.sum() else float("nan"),
            recall=tp / pos.sum() if pos.sum() else float("nan"),
            ap=_ap(pos, r["score"]),
            assessed=int(np.isfinite(r["score"]).sum()),
            by_kind=dict(Counter(kind[flag].tolist())),
            fp_disputed=int((flag & ~pos & disputed).sum()),
            grey_natural=int((grey & ~np.isin(kind, ["grayscale"])).sum()) if check == "grayscale" else 0,
        )
        rows.append(row)
    return {
        "rows": rows,
        "kinds": dict(Counter(kind.tolist())),
        "n": len(ids),
        "disputed_originals": int((disputed & np.isin(kind, ["original"] + [f"source:{k}" for k in KINDS])).sum()),
    }


def outlier_halves(db: Path, work: Path, manifest: list[dict[str, str]], root: Path) -> list[dict[str, Any]]:
    """Diagnosis, not tuning: the outlier check's two halves alone (``use=features`` / ``use=probs``), on a copy."""
    out = []
    for use in ("features", "probs"):
        copy = work / f"diag_{use}.duckdb"
        for src, dst in ((db, copy), (Path(f"{db}.arrays"), Path(f"{copy}.arrays"))):
            if dst.is_dir():
                shutil.rmtree(dst)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
        _audit(["--db", str(copy), "--checks", "outlier", "--check-option", f"outlier.use={use}", "-q"])
        m = measure_constructed(_read(copy), manifest, root)
        row = next(r for r in m["rows"] if r["check"] == "outlier")
        out.append({**row, "use": use})
    return out


def phash_pairs(manifest: list[dict[str, str]], root: Path) -> dict[str, Any]:
    """Diagnosis: Hamming distance of the perceptual hash (CleanVision's phash, 64 bits, as the decode pass stores
    it) between each copy and its source, by kind, and between distinct originals (what near_duplicate could use)."""
    from cleanvision.issue_managers.duplicate_issue_manager import get_hash
    from PIL import Image

    def ph(iid: str) -> int:
        return int(get_hash(Image.open(root / iid).convert("L"), {"hash_type": "phash", "hash_size": 8}), 16)

    h = {r["image_id"]: ph(r["image_id"]) for r in manifest}
    by: dict[str, list[int]] = {}
    for r in manifest:
        if r["source"]:
            by.setdefault(r["kind"], []).append(bin(h[r["image_id"]] ^ h[r["source"]]).count("1"))
    bases = [r["image_id"] for r in manifest if r["kind"] == "original" or r["kind"].startswith("source:")]
    hb = np.array([h[b] for b in bases], dtype=np.uint64)
    nearest = []
    for i in range(len(hb)):
        x = np.bitwise_xor(hb[i], np.delete(hb, i))
        nearest.append(int(np.unpackbits(x.view(np.uint8)).reshape(len(x), 64).sum(1).min()))
    return {"by_kind": by, "nearest_distinct": nearest}


# ---------------------------------------------------------------------------------------------- real sets
def _truth_cifar(ids: list[str], classes: dict[int, str]) -> np.ndarray:
    """(N,) int: CIFAR-10's clean label of each image, in the workspace's class indices (-1 unknown)."""
    rows = {r["path"]: r["label"] for r in csv.DictReader((CIFAR / "labels_clean.csv").open())}
    index = {v: k for k, v in classes.items()}
    return np.array([index.get(rows.get(i, rows.get(f"images/{Path(i).name}", "")), -1) for i in ids])


def measure_real(ws: dict[str, Any], which: str) -> dict[str, Any]:
    """Per check: flags, and for the label checks the share of flags the truth confirms."""
    img = ws["images"]
    labels = img["label"].to_numpy(dtype=np.int64, na_value=-1)
    if which == "cifar":
        truth = _truth_cifar(img["image_id"].tolist(), ws["classes"])
        wrong = (truth >= 0) & (truth != labels)
        truth_note = "given != CIFAR-10 clean label"
    else:
        real = img["real_labels"].tolist()
        wrong = np.array([r is not None and int(lab) not in list(r) for r, lab in zip(real, labels, strict=True)])
        truth_note = "label outside its ReaL set, or an empty ReaL set"
    out = []
    for check in sorted(ws["checks"]):
        _, summary = ws["checks"][check]
        r = ws["rows"].get(check)
        flagged = int(r["is_issue"].sum()) if r is not None else 0
        row = {"check": check, "flagged": flagged, "skipped": summary.get("skipped") or "",
               "assessed": int(np.isfinite(r["score"]).sum()) if r is not None else 0}
        if check in LABEL_CHECKS and r is not None and flagged:
            row["confirmed"] = float(wrong[r["is_issue"]].mean())
            row["ap"] = _ap(wrong, r["score"])
        out.append(row)
    return {"rows": out, "n": len(img), "wrong": int(wrong.sum()), "truth_note": truth_note,
            "models": ws["models"]}


def _top(db: Path, check: str, k: int) -> list[dict[str, Any]]:
    """The top ``k`` findings of a check as the CLI's `audit issues --check` lists them."""
    from audit.queries import check_issues

    df = check_issues(str(db), check, limit=k)
    out = []
    for r in df.to_dict("records"):
        score = r.get("label_quality", r.get("score"))
        sugg = r.get("suggested")
        out.append(
            {"image_id": r["image_id"], "given": r.get("given"), "score": score,
             "suggested": None if sugg is None or (isinstance(sugg, float) and np.isnan(sugg)) else str(sugg),
             "kind": r.get("issue_kind"), "info": r.get("info")}
        )
    return out


def contact_sheet(db: Path, ws: dict[str, Any], title: str, out: Path, *, k: int, truth: Callable[[str], str] | None,
                  truth_name: str = "truth") -> dict[str, list[dict[str, Any]]]:
    """One PNG: a row per check with issues, its ``k`` lowest-score findings with their captions."""
    from PIL import Image, ImageDraw, ImageFont

    tops = {c: _top(db, c, k) for c in sorted(ws["checks"]) if ws["rows"].get(c) is not None
            and ws["rows"][c]["is_issue"].any()}
    thumb, cw, lab_w, line = 96, 150, 120, 11
    ch = thumb + 5 * line + 16
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (lab_w + k * cw, 28 + ch * max(1, len(tops))), "white")
    d = ImageDraw.Draw(sheet)
    d.text((6, 8), title, fill="black", font=font)
    for row, (check, items) in enumerate(tops.items()):
        y0 = 28 + row * ch
        d.line([(0, y0), (sheet.width, y0)], fill=(200, 200, 200))
        d.text((6, y0 + 6), check, fill="black", font=font)
        d.text((6, y0 + 6 + line), f"{int(ws['rows'][check]['is_issue'].sum())} flagged", fill=(90, 90, 90),
               font=font)
        for j, it in enumerate(items):
            x0 = lab_w + j * cw
            try:
                im = Image.open(ws["root"] / it["image_id"]).convert("RGB")
                im.thumbnail((thumb, thumb), Image.BICUBIC)
                if max(im.size) < thumb // 2:  # a 32 px image: show it larger, pixels kept sharp
                    f = (thumb // 2) // max(im.size)
                    im = im.resize((im.width * f * 2, im.height * f * 2), Image.NEAREST)
                    im.thumbnail((thumb, thumb), Image.NEAREST)
                sheet.paste(im, (x0 + (cw - im.width) // 2, y0 + 4))
            except OSError as e:
                d.text((x0 + 4, y0 + 30), f"unreadable: {e}"[:24], fill="red", font=font)
            name = Path(it["image_id"]).name
            cap = [
                name if len(name) <= 24 else name[:10] + ".." + name[-12:],
                f"given: {it['given']}"[:24],
                f"score: {it['score']:.3f}" if it["score"] is not None and np.isfinite(it["score"]) else "score: -",
                f"sugg.: {it['suggested']}"[:24] if it["suggested"] else "",
                f"{truth_name}: {truth(it['image_id'])}"[:24] if truth else "",
            ]
            for m, t in enumerate(c for c in cap if c):
                d.text((x0 + 4, y0 + thumb + 8 + m * line), t, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A palette keeps the sheet small (photos in a PNG are large); 256 colours are plenty for thumbnails.
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return tops


# ---------------------------------------------------------------------------------------------- the report
def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if not np.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def _finding(check: str, it: dict[str, Any]) -> str:
    """One finding in words, from its own fields (for the generated part of the top-findings text)."""
    info = json.loads(it["info"]) if isinstance(it.get("info"), str) else None
    name = Path(it["image_id"]).name
    if check in LABEL_CHECKS:
        return f"`{name}` given *{it['given']}*, suggested *{it['suggested'] or '-'}*"
    if check in ("exact_duplicate", "near_duplicate") and info:
        differ = " (labels differ)" if info.get("labels_differ") else ""
        return f"`{name}` ~ `{Path(str(it['suggested'] or '')).name}`{differ}"
    return f"`{name}` ({it['given']}, score {_f(it['score'])})"


def write_report(args: argparse.Namespace, con: dict[str, Any] | None, real: dict[str, dict[str, Any]],
                 cmd: str) -> None:
    L: list[str] = ["# Checks: precision and recall on a constructed set, top findings on real sets", ""]
    L += [f"Generated by `reports/checks_report.py`; reproduce with `{cmd}`. Every check runs with its defaults "
          "(`audit checks`); nothing was tuned to these sets.", ""]
    if con is not None:
        m = con["measure"]
        L += ["## 1. Constructed set with known answers", "", "### Method", ""]
        L += [
            f"A seeded (seed {args.seed}) sample of {args.per_kind * len(KINDS) + args.plain} images of the shared "
            f"1,300 ImageNet val set, laid out as an ImageFolder under `{args.work}` (outside the repository). "
            f"{args.plain} stay as they are; each of {len(KINDS)} disjoint groups of {args.per_kind} also gets one "
            f"modified copy of one kind, in the same class folder unless said otherwise; {args.cifar} CIFAR-10N "
            f"training images (32 px, another domain) are dropped into random ImageNet class folders. "
            f"{m['n']} images in all, scored by `audit run --models {args.models}` with every default check.",
            "",
            "| kind | images | what |",
            "|---|---|---|",
        ]
        for k, what in KINDS.items():
            L.append(f"| {k} | {m['kinds'].get(k, 0)} | {what} (sources: kind `source:{k}`) |")
        L.append(f"| cifar | {m['kinds'].get('cifar', 0)} | CIFAR-10N image filed under a random ImageNet class |")
        L.append(f"| original | {m['kinds'].get('original', 0)} | unmodified, no copy |")
        L += ["", "Positives of each check (what it should flag):", ""]
        for c, (_, _, what) in POSITIVES.items():
            L.append(f"- `{c}`: {what}.")
        L += [
            "",
            "Precision = flagged positives / flagged; recall = flagged positives / positives; AP = average "
            "precision of the score ranking (low score = suspicious; images a check did not assess ranked last). "
            "A positive of one check is a negative for every other: e.g. a resized copy flagged by `odd_size` "
            "counts against `odd_size`'s precision. The table after it says where each check's flags fell.",
            "",
            "### Results",
            "",
            "| check | positives | flagged | correct | precision | recall | AP | threshold |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            if r["skipped"]:
                L.append(f"| {r['check']} | {r['positives']} | skipped: {r['skipped']} | | | | | |")
                continue
            L.append(f"| {r['check']} | {r['positives']} | {r['flagged']} | {r['tp']} | {_f(r['precision'])} | "
                     f"{_f(r['recall'])} | {_f(r['ap'])} | {_f(r['threshold'], 4)} |")
        kinds = [*KINDS, "cifar", *[f"source:{k}" for k in KINDS], "original"]
        shown = [r for r in m["rows"] if not r["skipped"]]
        L += ["", "### Where the flags fell (flagged images of each kind)", "",
              "| kind | images | " + " | ".join(r["check"] for r in shown) + " |",
              "|---|---|" + "---|" * len(shown)]
        for k in kinds:
            tot = m["kinds"].get(k, 0)
            if tot:
                L.append(f"| {k} | {tot} | " + " | ".join(str(r["by_kind"].get(k, 0) or "") for r in shown) + " |")
        L += ["", "### Comments (computed from the figures above)", ""]
        L += _comments(m)
        halves = con.get("outlier_halves") or []
        if halves:
            L += ["", "Diagnosis of `outlier` (not a tuning: its two halves run alone with "
                  "`--check-option outlier.use=features|probs`, everything else default):", "",
                  "| outlier half | flagged | correct | recall | AP | where its flags fell |",
                  "|---|---|---|---|---|---|"]
            for h in halves:
                fell = ", ".join(f"{k} {v}" for k, v in sorted(h["by_kind"].items(), key=lambda kv: -kv[1])) or "-"
                L.append(f"| {h['use']} | {h['flagged']} | {h['tp']} | {_f(h['recall'])} | {_f(h['ap'])} | {fell} |")
            base = m["kinds"].get("cifar", 0) / max(m["n"], 1)
            L += ["", f"(An AP near the share of positives, {base:.3f}, is a random ranking.)"]
        ph = con.get("phash")
        if ph:
            near = np.array(ph["nearest_distinct"])
            L += ["", "Diagnosis: the Hamming distance (of 64 bits) "
                  "between the perceptual hash (phash, CleanVision's; the decode pass already stores it) of each "
                  "copy and its source, against the distance of each distinct original to its nearest other "
                  f"original (min {near.min()}, 1st percentile {np.percentile(near, 1):.0f}, median "
                  f"{np.median(near):.0f}):", "", "| kind | copies | median | max |", "|---|---|---|---|"]
            for k, v in ph["by_kind"].items():
                L.append(f"| {k} | {len(v)} | {np.median(v):.0f} | {max(v)} |")
    L += ["", "## 2. Top findings on the real sets", ""]
    for which, rep in real.items():
        L += _real_section(which, rep)
    if OBS_MD.exists():
        L += ["", "## Observations (written by hand from the contact sheets)", "", OBS_MD.read_text().strip()]
    OUT_MD.write_text("\n".join(L) + "\n")
    _log(f"wrote {OUT_MD.relative_to(ROOT)}")


def _comments(m: dict[str, Any]) -> list[str]:
    """Honest remarks derived from the measurements: misses, and where false positives came from."""
    out = []
    for r in m["rows"]:
        if r["skipped"] or not r["positives"]:
            continue
        kinds, with_src, _ = POSITIVES[r["check"]]
        pos_kinds = set(kinds) | ({f"source:{k}" for k in kinds} if with_src else set())
        missed = r["positives"] - r["tp"]
        fps = {k: v for k, v in r["by_kind"].items() if k not in pos_kinds}
        if r["check"] == "grayscale":
            fps = {}  # grey originals are positives by measurement; the rest are listed below
        parts = [f"recall {_f(r['recall'])}: {missed} of {r['positives']} positives missed"]
        recall_by = []
        for k in sorted(pos_kinds):
            tot = m["kinds"].get(k, 0)
            if tot:
                recall_by.append(f"{k} {r['by_kind'].get(k, 0)}/{tot}")
        parts.append("flagged per positive kind: " + ", ".join(recall_by))
        if fps:
            fp_txt = ", ".join(f"{k} {v}" for k, v in sorted(fps.items(), key=lambda kv: -kv[1]))
            parts.append(f"{sum(fps.values())} false positives: {fp_txt}")
        if r.get("missed_scores") and isinstance(r["threshold"], (int, float)):
            lo, med, hi = r["missed_scores"]
            parts.append(f"the missed positives score {lo:.3f} to {hi:.3f} (median {med:.3f}) against its threshold "
                         f"{r['threshold']:.3f} (flagged below it)")
        if r["check"] in LABEL_CHECKS and r["fp_disputed"]:
            parts.append(f"{r['fp_disputed']} of the false positives are images whose ImageNet label ReaL "
                         "rejects (real label errors, not mistakes of the check)")
        if r["check"] == "blurry":
            from cleanvision.utils.constants import MAX_RESOLUTION_FOR_BLURRY_DETECTION as side

            parts.append(f"CleanVision measures edges after shrinking an image to {side} px on its long side, where "
                         "a blur of a few pixels at full size is under one pixel")
        if r["check"] == "grayscale" and r["grey_natural"]:
            parts.append(f"{r['grey_natural']} images other than the grayscale copies are grey in their pixels and "
                         "count as positives")
        out.append(f"- `{r['check']}`: " + "; ".join(parts) + ".")
    out.append(f"- Of the ImageNet originals in the set, {m['disputed_originals']} carry a label ReaL rejects: a "
               "label check flagging them is right, though they count as false positives above.")
    return out


def _real_section(which: str, rep: dict[str, Any]) -> list[str]:
    m = rep["measure"]
    title = {"in1300": "Shared ImageNet val, 1,300 images", "cifar": "CIFAR-10N (given: aggregate labels)"}[which]
    sheet = rep["sheet"].relative_to(ROOT / "reports").as_posix()
    L = [f"### {title}", "", rep["note"], "",
         f"Models: {', '.join(m['models'])}. {m['n']} images; {m['wrong']} wrong by the truth "
         f"({m['truth_note']}). Contact sheet: [`{sheet}`]({sheet}) (each check's top findings, lowest score first).",
         "", "| check | assessed | flagged | flags confirmed by the truth | AP vs truth |", "|---|---|---|---|---|"]
    for r in m["rows"]:
        if r["skipped"]:
            L.append(f"| {r['check']} | skipped: {r['skipped']} | | | |")
            continue
        L.append(f"| {r['check']} | {r['assessed']} | {r['flagged']} | {_f(r.get('confirmed'))} | {_f(r.get('ap'))} |")
    L += ["", "Top findings, as `audit issues --check NAME` lists them:", ""]
    for check, items in rep["tops"].items():
        shown = "; ".join(_finding(check, it) for it in items[:3])
        L.append(f"- `{check}`: {shown}.")
    L.append("")
    return L


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/checksrep"), help="folder for the sets and workspaces")
    ap.add_argument("--per-kind", type=int, default=15, help="bases per kind of modified copy")
    ap.add_argument("--plain", type=int, default=105, help="bases left without a copy")
    ap.add_argument("--cifar", type=int, default=25, help="CIFAR-10N intruders")
    ap.add_argument("--models", default="efficientnet_lite0", help="models for the constructed set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small constructed set (5 per kind), CIFAR limit 500")
    ap.add_argument("--skip-constructed", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--in1300-db", type=Path, help="workspace of the 1,300 set (created or continued)")
    ap.add_argument("--in1300-models", default=IN1300_MODELS)
    ap.add_argument("--cifar-db", type=Path, help="an existing CIFAR-10N workspace, continued by a bare rerun")
    ap.add_argument("--cifar-limit", type=int, default=2000, help="images of CIFAR-10N to score without --cifar-db")
    ap.add_argument("--cifar-models", default="efficientnet_lite0")
    ap.add_argument("--reuse", action="store_true", help="read the workspaces as they are (no audit run)")
    ap.add_argument("--top", type=int, default=6, help="findings per check on the contact sheets")
    args = ap.parse_args()
    if not IN1300.is_dir() or not CIFAR.is_dir():
        print(f"{SHARED} is absent (needs imagenet-val-1300 and cifar10n-train-10k); nothing to report")
        return 0
    if args.quick:
        args.per_kind, args.plain, args.cifar = 5, 35, 8
        args.cifar_limit = min(args.cifar_limit, 500)
    args.work.mkdir(parents=True, exist_ok=True)
    cmd = " ".join([".venv/bin/python reports/checks_report.py", *sys.argv[1:]])

    con = None
    if not args.skip_constructed:
        root = args.work / "constructed"
        db = args.work / "constructed.duckdb"
        if not (args.reuse and db.exists()):
            _log(f"building the constructed set under {root}")
            manifest = build_constructed(root, per_kind=args.per_kind, plain=args.plain, n_cifar=args.cifar,
                                         seed=args.seed)
            (args.work / "constructed_manifest.json").write_text(json.dumps(manifest))
            _log(f"{len(manifest)} images; scoring")
            for p in (db, Path(f"{db}.arrays"), Path(f"{db}.wal")):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            _audit([str(root), "--db", str(db), "--models", args.models, "-q"])
        manifest = json.loads((args.work / "constructed_manifest.json").read_text())
        con = {"measure": measure_constructed(_read(db), manifest, root)}
        con["outlier_halves"] = outlier_halves(db, args.work, manifest, root)
        _log("perceptual hashes of the copies (diagnosis)")
        con["phash"] = phash_pairs(manifest, root / "val")
        with OUT_CSV.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["check", "positives", "flagged", "correct", "precision", "recall", "ap", "threshold",
                        "skipped"])
            for r in con["measure"]["rows"]:
                w.writerow([r["check"], r["positives"], r["flagged"], r["tp"], _f(r["precision"], 4),
                            _f(r["recall"], 4), _f(r["ap"], 4), _f(r["threshold"], 4), r["skipped"]])
        _log(f"wrote {OUT_CSV.relative_to(ROOT)}")

    real: dict[str, dict[str, Any]] = {}
    if not args.skip_real:
        db = args.in1300_db or args.work / "in1300.duckdb"
        if not args.reuse:
            _audit([str(IN1300), "--db", str(db), "--models", args.in1300_models, "-q"])
        ws = _read(db)
        real_of = {
            i: " / ".join(ws["classes"].get(int(c), "?") for c in list(r)[:2]) if r is not None and len(r) else "none"
            for i, r in zip(ws["images"]["image_id"], ws["images"]["real_labels"], strict=True)
        }
        tops = contact_sheet(db, ws, "ImageNet val 1,300: top findings per check (lowest score first)",
                             SHOTS / "checks-imagenet1300.png", k=args.top, truth=real_of.get, truth_name="ReaL")
        note = f"`audit run ../shared/datasets/imagenet-val-1300 --models {args.in1300_models}`."
        real["in1300"] = {"measure": measure_real(ws, "in1300"), "tops": tops,
                          "sheet": SHOTS / "checks-imagenet1300.png", "note": note}
        if args.cifar_db:
            db = args.cifar_db
            note = (
                "The full shared CIFAR-10N 10k workspace of `reports/cifar10n.py` (4 zoo models, heads), its last run "
                "on `--labels labels_aggre.csv --truth labels_clean.csv`."
            )
            if not args.reuse:
                _audit(["--db", str(db), "-q"])
        else:
            db = args.work / "cifar.duckdb"
            note = (f"A subset: `--limit {args.cifar_limit}` of the 10,000 images (evenly spaced), "
                    f"`--models {args.cifar_models}`.")
            if not args.reuse:
                _audit([str(CIFAR), "--labels", str(CIFAR / "labels_aggre.csv"), "--truth",
                        str(CIFAR / "labels_clean.csv"), "--limit", str(args.cifar_limit), "--models",
                        args.cifar_models, "--db", str(db), "-q"])
        ws = _read(db)
        img = ws["images"]
        truth_arr = _truth_cifar(img["image_id"].tolist(), ws["classes"])
        truth_of = {i: ws["classes"].get(int(t), "?") for i, t in zip(img["image_id"], truth_arr, strict=True)}
        tops = contact_sheet(db, ws, "CIFAR-10N (aggregate labels): top findings per check (lowest score first)",
                             SHOTS / "checks-cifar10n.png", k=args.top, truth=truth_of.get)
        real["cifar"] = {"measure": measure_real(ws, "cifar"), "tops": tops, "sheet": SHOTS / "checks-cifar10n.png",
                         "note": note}
    write_report(args, con, real, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
