"""The feature-space checks on CIFAR-10N's real label noise: knn_label, label + knn_label, near_duplicate, outlier.

Reads the penultimate features the product stored for the shared CIFAR-10N 10k set
(``reports/workspace/cifar10n.duckdb.arrays/*.features.npy``, written by ``reports/cifar10n.py``;
rows in the sorted order of the image ids; opened read-only, memory-mapped) and the label sets of
``../shared/datasets/cifar10n-train-10k`` (aggre 9%, random1 17%, worst 40% wrong; clean = truth).
For each noisy set:

* ``knn_label`` (defaults, and a few variants: Datalab's plain uniform fraction of 10, k = 10 / 30,
  normalized margin, one model's features, the projected search forced on): AP of ``1 - score`` against
  ``given != clean``, and the precision / recall of its flags;
* the label check's score: :func:`audit.flag.find_label_issues` on the out-of-fold probabilities of
  the product's heads (softmax and sigmoid heads on each model's features, ``audit.heads.cross_val_head``,
  10 folds; read back from the workspace's head cache when the product already fitted them on these
  labels, else fitted here), and its AP;
* ``label`` + ``knn_label`` combined (:func:`audit.checks.knn.combine_label_scores`, several rules),
  with a paired bootstrap interval (1,000 resamples of the images) of the AP gain over the label
  check alone;
* ``near_duplicate`` and ``outlier`` summaries, and each check's wall time.

Writes ``reports/checks_features_cifar.md`` and ``.csv``. Exits 0 with a message when the shared set
or the features are absent.

Usage::

    .venv/bin/python reports/checks_features_cifar.py [--arrays reports/workspace/cifar10n.duckdb.arrays] [--models all]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "cifar10n-train-10k"
ARRAYS = ROOT / "reports" / "workspace" / "cifar10n.duckdb.arrays"
OUT_MD = ROOT / "reports" / "checks_features_cifar.md"
OUT_CSV = ROOT / "reports" / "checks_features_cifar.csv"
SETS = ("aggre", "random1", "worst")
BOOT = 1000

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# knn_label variants: (label, options). The first is the default.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default (k=20, similarity weights, alpha=1, self_confidence)", {}),
    ("Datalab's: k=10, uniform votes, no prior", {"k": 10, "weights": "uniform", "alpha": 0.0}),
    ("k=10", {"k": 10}),
    ("k=30", {"k": 30}),
    ("normalized_margin", {"method": "normalized_margin"}),
    ("k=10, normalized_margin", {"k": 10, "method": "normalized_margin"}),
    ("projected search (SVD to 256 + exact re-rank; forced)", {"_force_projection": True}),
]
COMBOS: list[tuple[str, dict[str, Any]]] = [
    ("mean, weight 0.2", {"how": "mean", "weight": 0.2}),
    ("mean, weight 0.3 (default)", {"how": "mean", "weight": 0.3}),
    ("mean, weight 0.5", {"how": "mean", "weight": 0.5}),
    ("min", {"how": "min"}),
    ("product, weight 0.3", {"how": "product", "weight": 0.3}),
]


def _labels(path: Path, ids: list[str], classes: list[str]) -> np.ndarray:
    rows = {r["path"]: r["label"] for r in csv.DictReader(path.open())}
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[rows[f"images/{i}"]] for i in ids], dtype=np.int64)


def _ap(wrong: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    ok = np.isfinite(score)
    return float(average_precision_score(wrong[ok], 1.0 - score[ok]))


def _num(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.4f}"


def _prf(wrong: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    tp = int((wrong & flagged).sum())
    return tp / max(int(flagged.sum()), 1), tp / max(int(wrong.sum()), 1)


def _boot_gain(wrong: np.ndarray, base: np.ndarray, new: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of AP(new) - AP(base), resampling images."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    n = len(wrong)
    gains = []
    for _ in range(BOOT):
        i = rng.integers(0, n, n)
        if not wrong[i].any():
            continue
        gains.append(average_precision_score(wrong[i], 1 - new[i]) - average_precision_score(wrong[i], 1 - base[i]))
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return float(lo), float(hi)


def _head_probs(feats: dict[str, np.ndarray], given: np.ndarray, n_classes: int, arrays: Path) -> tuple[list, str]:
    """Out-of-fold probabilities of the product's four heads: from its head cache if there, else fitted."""
    from audit.headmodels import _digest, head_name
    from audit.heads import _C_GRID, HEAD_KINDS, cross_val_head
    from audit.scoring import model_key

    out, sources = [], set()
    for model, f in feats.items():
        digest = _digest(f)
        for kind in HEAD_KINDS:
            # The cache key audit.headmodels.fit_heads uses (10 folds, seed 0, its C grid).
            key = hashlib.sha256(
                json.dumps([kind, 10, 0, list(_C_GRID), n_classes, digest]).encode() + given.tobytes()
            ).hexdigest()[:16]
            cached = arrays / "heads" / f"{model_key(head_name(model, kind))}-{key}.probs.npy"
            if cached.exists() and cached.with_suffix("").with_suffix(".json").exists():
                out.append(np.load(cached, mmap_mode="r"))
                sources.add("the product's head cache")
            else:
                out.append(cross_val_head(f, given, n_classes=n_classes, kind=kind, folds=10, seed=0).probs)
                sources.add("fitted here")
    return out, " and ".join(sorted(sources))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arrays", type=Path, default=ARRAYS)
    ap.add_argument(
        "--models",
        default="efficientnet_lite0.in1k,squeezenet1_1.caffe_in1k",
        help="comma-separated models whose stored features to use ('all': every *.features.npy there)",
    )
    args = ap.parse_args()
    files = sorted(Path(args.arrays).glob("*.features.npy"))
    if args.models != "all":
        want = args.models.split(",")
        files = [f for f in files if f.name.split("-")[0] in want]
    if not DATASET.is_dir() or not files:
        print(f"{DATASET} or features under {args.arrays} absent; run reports/cifar10n.py first")
        return 0
    from audit.checks import CheckInputs, _memo
    from audit.checks import _neighbors as nbm
    from audit.checks.duplicates import NearDuplicateCheck
    from audit.checks.knn import WEIGHT_DEFAULT, KnnLabelCheck, LabelKnnCheck, combine_label_scores
    from audit.checks.outlier import OutlierCheck
    from audit.flag import find_label_issues

    ids = sorted(p.name for p in (DATASET / "images").iterdir())
    feats = {f.name.split("-")[0]: np.load(f, mmap_mode="r") for f in files}
    names = tuple(feats)
    classes = sorted({r["label"] for r in csv.DictReader((DATASET / "labels_clean.csv").open())})
    clean = _labels(DATASET / "labels_clean.csv", ids, classes)
    n, c = len(ids), len(classes)
    for m, f in feats.items():
        if f.shape[0] != n:
            raise SystemExit(f"{m}: {f.shape[0]} feature rows, {n} images")

    rows: list[dict[str, Any]] = []
    dup_lines: list[str] = []
    out_lines: list[str] = []
    knn_notes: list[str] = []
    for s in SETS:
        given = _labels(DATASET / f"labels_{s}.csv", ids, classes)
        wrong = given != clean
        probs, source = _head_probs(feats, given, c, Path(args.arrays))
        inputs = CheckInputs(
            n=n,
            labels=given,
            n_classes=c,
            class_names=tuple(classes),
            valid=np.ones(n, dtype=bool),
            probs=probs,
            features=list(feats.values()),
            model_names=names,
            image_ids=tuple(ids),
        )

        def row(
            check: str,
            variant: str,
            score: np.ndarray,
            flagged: np.ndarray | None,
            secs: float,
            s: str = s,
            wrong: np.ndarray = wrong,
            **kw: Any,
        ) -> None:
            p, r = _prf(wrong, flagged) if flagged is not None else (float("nan"), float("nan"))
            rows.append(
                {
                    "labels": s,
                    "noise": round(float(wrong.mean()), 4),
                    "check": check,
                    "variant": variant,
                    "ap": round(_ap(wrong, score), 4),
                    "flagged": int(flagged.sum()) if flagged is not None else "",
                    "precision": round(p, 4),
                    "recall": round(r, 4),
                    "seconds": round(secs, 2),
                    **kw,
                }
            )

        t = time.perf_counter()
        frame = find_label_issues(probs, given)
        label_s = frame["label_quality"].to_numpy(dtype=np.float64)
        row("label", f"find_label_issues on 4 heads ({source})", label_s, frame["is_label_issue"].to_numpy(), 0.0)

        knn_default = None
        for v, opts in VARIANTS:
            t = time.perf_counter()
            opts = dict(opts)
            if opts.pop("_force_projection", False):
                # At 10,000 images the exact search is the cheaper one, so the default never projects
                # here; force the projection (on a fresh memo, so the exact graph is not reused) to show
                # what it would cost in ranking quality.
                saved = nbm._EXACT_FLOPS
                nbm._EXACT_FLOPS = 0.0
                _memo.forget(inputs)
                try:
                    res = KnnLabelCheck(**opts).run(inputs)
                finally:
                    nbm._EXACT_FLOPS = saved
                    _memo.forget(inputs)
            else:
                res = KnnLabelCheck(**opts).run(inputs)
            secs = time.perf_counter() - t
            row("knn_label", v, res.score, res.is_issue, secs)
            if v == VARIANTS[0][0]:
                knn_default = res
                sug = res.suggestion[res.is_issue & wrong]
                knn_notes.append(
                    f"{s}: of the {int((res.is_issue & wrong).sum())} flagged images whose label is wrong, the "
                    f"suggestion is the clean label for {float(np.mean(sug == clean[res.is_issue & wrong])):.3f}."
                )
        for m in names:
            t = time.perf_counter()
            res = KnnLabelCheck(model=m).run(inputs)
            row("knn_label", f"{m} features only", res.score, res.is_issue, time.perf_counter() - t)

        assert knn_default is not None
        for v, opts in COMBOS:
            comb = combine_label_scores(label_s, knn_default.score, **opts)
            lo, hi = _boot_gain(wrong, label_s, comb)
            row("label+knn_label", v, comb, None, 0.0, ap_gain_vs_label_95ci=f"[{lo:+.4f}, {hi:+.4f}]")
        t = time.perf_counter()
        lk = LabelKnnCheck().run(inputs)
        lo, hi = _boot_gain(wrong, label_s, lk.score)
        row(
            "label_knn",
            f"the check (mean, weight {WEIGHT_DEFAULT}, the label check's count)",
            lk.score,
            lk.is_issue,
            time.perf_counter() - t,
            ap_gain_vs_label_95ci=f"[{lo:+.4f}, {hi:+.4f}]",
        )

        t = time.perf_counter()
        dup = NearDuplicateCheck().run(inputs)
        dsecs = time.perf_counter() - t
        groups: dict[int, list[int]] = {}
        for i, inf in enumerate(dup.info or ()):
            if inf and "group" in inf:
                groups.setdefault(inf["group"], []).append(i)
        clean_differ = sum(len({int(clean[i]) for i in g}) > 1 for g in groups.values())
        sm = dup.summary
        dup_lines.append(
            f"| {s} | {sm['threshold']} | {sm['duplicate_groups']} | {sm['images_in_groups']} | {sm['largest_group']} "
            f"| {sm['groups_with_different_labels']} | {clean_differ} | {sm['exact_duplicate_groups']} | {dsecs:.2f} |"
        )
        t = time.perf_counter()
        out = OutlierCheck().run(inputs)
        osecs = time.perf_counter() - t
        om = out.summary
        flagged = out.is_issue
        out_lines.append(
            f"| {s} | {om['issues']} | {om.get('features_issues', '')} | {om.get('probs_issues', '')} "
            f"| {float(wrong[flagged].mean()) if flagged.any() else float('nan'):.3f} | {float(wrong.mean()):.3f} "
            f"| {osecs:.2f} |"
        )

    keys = ["labels", "noise", "check", "variant", "ap", "flagged", "precision", "recall", "seconds"]
    keys += ["ap_gain_vs_label_95ci"]
    with OUT_CSV.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)

    def table(check_names: tuple[str, ...]) -> list[str]:
        lines = [
            "| labels | noise | check | variant | AP | flagged | precision | recall | AP gain vs label, 95% CI | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["check"] in check_names:
                lines.append(
                    f"| {r['labels']} | {r['noise']:.3f} | {r['check']} | {r['variant']} | {r['ap']:.4f} | "
                    f"{r['flagged']} | {_num(r['precision'])} | {_num(r['recall'])} "
                    f"| {r.get('ap_gain_vs_label_95ci', '')} | {r['seconds']} |"
                )
        return lines

    md = [
        "# Feature-space checks on CIFAR-10N",
        "",
        f"Generated by `reports/checks_features_cifar.py` on the features of {', '.join(names)} stored for the "
        f"shared CIFAR-10N 10k set ({n} images, {c} classes). AP = average precision of `1 - score` against "
        "`given != clean`; precision / recall of each check's own flags. Seconds are wall time on the shared "
        "2-core machine (other work running), the first knn_label row of a set including its neighbour graph.",
        "",
        "## knn_label, and the label check",
        "",
        *table(("label", "knn_label")),
        "",
        *knn_notes,
        "",
        "## label + knn_label",
        "",
        "`combine_label_scores(label_quality, knn_label score)`; the interval is a paired bootstrap over images "
        f"({BOOT} resamples) of AP(combined) - AP(label). `label_knn` flags as many images as the label check.",
        "",
        *table(("label", "label+knn_label", "label_knn")),
        "",
        "## near_duplicate",
        "",
        "| labels | threshold | groups | images in groups | largest | groups whose given labels differ | "
        "groups whose clean labels differ | exact-copy groups | s |",
        "|---|---|---|---|---|---|---|---|---|",
        *dup_lines,
        "",
        "## outlier",
        "",
        "Features and the heads' probabilities combined (geometric mean; issue when either of Datalab's rules "
        "fires). CIFAR-10N has no out-of-distribution truth; the share of flagged images whose given label is "
        "wrong is shown beside the set's noise rate.",
        "",
        "| labels | issues | by features | by probs | wrong among flagged | noise | s |",
        "|---|---|---|---|---|---|---|",
        *out_lines,
        "",
    ]
    OUT_MD.write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
