"""`audit run`: dataset -> scores -> evaluations -> checks (label issues and more) -> workspace.

Everything a user can get wrong (dataset layout, label files, model names,
weights, a workspace made for other images) is checked before any scoring
starts. Scoring writes only resumable shards; the database sees one short
transaction at the start (the run is registered) and one at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit import __version__, _options
from audit.checks import CheckInputs, CheckResult, run_checks
from audit.checks.label import label_issues_frame
from audit.config import HeadsConfig, RunConfig
from audit.datasets import AuditDataset, typical_short_side
from audit.errors import ModelError, OptionError, StoreError
from audit.evaluate import Metric, evaluate_all, relabeled_accuracy
from audit.headmodels import HEADS_MIN_AGREEMENT, features_of, fit_heads, head_agreement, weak_heads_warning
from audit.neighbours import write_neighbours
from audit.scoring import ModelArrays, ScoreStats, check_predictions, load_models, score_dataset
from audit.store import (
    arrays_dir,
    check_workspace,
    connect,
    fetch_one,
    insert_frame,
    is_new_workspace,
    mark_interrupted_runs,
    meta_value,
    now,
    to_json,
    transaction,
    workspace_lock,
    workspace_path,
)
from audit.truth import flag_metrics, truth_metrics, write_truth
from audit.zoo import ModelSpec, apply_crop

__all__ = [
    "ENSEMBLE",
    "CheckOutcome",
    "RunResult",
    "check_export_target",
    "check_workspace_outside",
    "last_run_inputs",
    "run_audit",
    "topk_of",
    "workspace_inputs",
]

_log = logging.getLogger(__name__)
ENSEMBLE = "ensemble"
_TOPK = 5
# The files a run reads beside the images, by their key in the recorded inputs: an export must not overwrite one.
_INPUT_FILES = {"labels": "label file", "real": "ReaL file", "classes": "classes file", "truth": "truth file"}
_CHUNK = 4096


@dataclass(frozen=True)
class CheckOutcome:
    """What one selected check did in a run: found ``n_issues`` of ``n_assessed`` images, or was skipped."""

    check: str
    n_issues: int | None  # None: skipped
    n_assessed: int | None
    skipped: str | None = None  # the one-line reason (audit.checks.skip_note)
    note: str | None = None  # what the check said about its own result (its summary's "note"), e.g. why none

    def line(self) -> str:
        """One line for the run summary."""
        if self.skipped is not None:
            return f"check {self.check}: {self.skipped}"
        said = f" ({self.note})" if self.note else ""
        return f"check {self.check}: {self.n_issues} issue(s) among {self.n_assessed} assessed image(s){said}"


@dataclass(frozen=True)
class RunResult:
    run_id: str
    db: Path
    metrics: pd.DataFrame
    n_flagged: int  # images the label check flagged (0 when it did not run)
    n_bad: int
    skipped: tuple[str, ...]  # evaluations that could not run, with why
    warnings: tuple[str, ...] = ()  # what the user must not miss (heads too weak to trust)
    checks: tuple[CheckOutcome, ...] = ()  # one per selected check, in order


def dataset_fingerprint(ds: AuditDataset) -> str:
    """SHA-256 of every input a run takes from the dataset.

    Image ids, given labels, ReaL sets, the classes, and each file's ``(size,
    mtime_ns)``: any image repaired or replaced, any label or ReaL set edited,
    changes it. Which images are *rescored* is decided per image by
    :func:`audit.scoring.score_dataset` from the same stamps.
    """
    h = hashlib.sha256()
    h.update(json.dumps([ds.layout, list(ds.label_space.keys), list(ds.label_space.names)]).encode())
    for i, lab in zip(ds.image_ids, ds.labels.tolist(), strict=True):
        h.update(f"{i}\0{lab}\n".encode())
    h.update(json.dumps(ds.real).encode())
    h.update(np.ascontiguousarray(ds.file_stamps(), dtype=np.int64).tobytes())
    if ds.truth is not None:  # only then: a workspace without truth keeps the fingerprint it always had
        h.update(b"truth\0" + np.ascontiguousarray(ds.truth, dtype=np.int64).tobytes())
    return h.hexdigest()


def topk_of(probs: np.ndarray, k: int = _TOPK) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes and probabilities per row, streamed in chunks.

    Parameters
    ----------
    probs : ndarray, shape (N, C), may be a memory map; NaN rows give -1 / NaN.

    Returns
    -------
    classes : int32 (N, k), probabilities : float32 (N, k), by decreasing probability.
    """
    n, c = probs.shape
    k = min(k, c)
    cls = np.full((n, k), -1, dtype=np.int32)
    val = np.full((n, k), np.nan, dtype=np.float32)
    for s in range(0, n, _CHUNK):
        p = np.asarray(probs[s : s + _CHUNK])
        ok = ~np.isnan(p).any(axis=1)
        q = np.where(ok[:, None], p, -np.inf)
        part = np.argpartition(-q, k - 1, axis=1)[:, :k]
        pv = np.take_along_axis(q, part, axis=1)
        order = np.argsort(-pv, axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
        cls[s : s + len(p)][ok] = top[ok]
        val[s : s + len(p)][ok] = np.take_along_axis(pv, order, axis=1)[ok]
    return cls, val


def _check_compatible(ds: AuditDataset, specs: Sequence[ModelSpec]) -> list[str]:
    notes = []
    for s in specs:
        if s.source == "predictions":
            continue
        if ds.label_space.imagenet and s.num_classes != 1000:
            raise ModelError(
                f"{s.name} predicts {s.num_classes} classes but the dataset uses the 1,000 ImageNet classes; "
                "pass a model with an ImageNet head"
            )
        if not ds.label_space.imagenet and s.num_classes != len(ds.label_space):
            if s.label_space == "imagenet-1k":
                notes.append(
                    f"{s.name}: dataset has a custom label space ({len(ds.label_space)} classes), "
                    "so its ImageNet predictions are stored but not evaluated"
                )
            else:
                raise ModelError(
                    f"{s.name} predicts {s.num_classes} classes but the dataset has {len(ds.label_space)}; "
                    "pass a checkpoint trained on these classes"
                )
    return notes


def _register_run(db: Path, ds: AuditDataset, specs: Sequence[ModelSpec], run_id: str, params: dict) -> None:
    fp = dataset_fingerprint(ds)
    with connect(db, create=True) as con, transaction(con):
        problem = _dataset_mismatch(con, ds, db)
        if problem:
            raise StoreError(problem)
        if not fetch_one(con, "SELECT count(*) FROM images")[0]:
            _write_dataset(con, ds, fp)
        con.execute(
            "INSERT INTO runs VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                now(),
                "running",
                "audit run",
                str(ds.root),
                len(ds),
                [s.name for s in specs],
                __version__,
                to_json(params),
            ],
        )


def _dataset_mismatch(con: Any, ds: AuditDataset, db: Path) -> str | None:
    """Why ``ds`` cannot continue workspace ``db``, or None.

    A workspace is its images: its ids (image indices, which review decisions
    name) must be the same. Labels, ReaL sets, file contents and the root may
    change and are taken up by the run (:func:`_sync_dataset`); the classes
    too, unless review decisions name the old ones.
    """
    stored = [r[0] for r in con.execute("SELECT image_id FROM images ORDER BY image_index").fetchall()]
    if not stored:
        return None
    if stored != list(ds.image_ids):
        where = meta_value(con, "dataset_root") or "?"
        return f"workspace {db} was made for other images ({where}); pass a new --db for this dataset"
    keys = [r[0] for r in con.execute("SELECT key FROM classes ORDER BY class_index").fetchall()]
    if keys != list(ds.label_space.keys) and fetch_one(con, "SELECT count(*) FROM decisions")[0]:
        gone = sorted(set(keys) - set(ds.label_space.keys)) or sorted(set(ds.label_space.keys) - set(keys)) or keys
        return (
            f"the classes of workspace {db} changed (e.g. {gone[0]!r}) and its review decisions name the old "
            "ones; restore the labels or pass a new --db"
        )
    return None


def _refuse_other_dataset(db: Path, ds: AuditDataset) -> None:
    """:func:`_dataset_mismatch` read-only, before anything is written; registration checks again."""
    import duckdb

    if is_new_workspace(db):  # nothing there yet, or a half-made file that registration rebuilds
        return
    with connect(db, read_only=True) as con:
        try:
            problem = _dataset_mismatch(con, ds, db)
        except duckdb.CatalogException:
            return  # not (yet) a complete workspace: registration decides
    if problem:
        raise StoreError(problem)


def _sync_dataset(con: Any, ds: AuditDataset) -> None:
    """Make the workspace's dataset tables describe this run's inputs: labels, ReaL sets, classes, root.

    Runs inside the run's final transaction, so the tables change together
    with the predictions and flags computed from the same inputs.
    """
    fp = dataset_fingerprint(ds)
    if fetch_one(con, "SELECT value FROM meta WHERE key = ?", ["dataset_fingerprint"]) == (fp,):
        _write_meta(con, ds, fp)  # the same inputs; the root may have moved
        return
    keys = con.execute("SELECT key, name FROM classes ORDER BY class_index").fetchall()
    if [tuple(r) for r in keys] != list(zip(ds.label_space.keys, ds.label_space.names, strict=True)):
        con.execute("DELETE FROM classes")
        insert_frame(con, "classes", _classes_frame(ds))
    inputs = pd.DataFrame(
        {
            "image_index": np.arange(len(ds), dtype=np.int32),
            "label": ds.labels.astype(np.int32),
            "real_labels": ds.real if ds.real is not None else [None] * len(ds),
        }
    )
    con.register("inputs_df", inputs)
    # Only the rows that changed: a rewrite of every row costs about a second at 50,000 images.
    con.execute(
        "UPDATE images SET label = d.label, real_labels = CAST(d.real_labels AS INTEGER[]) "
        "FROM inputs_df AS d WHERE images.image_index = d.image_index AND (images.label IS DISTINCT FROM d.label "
        "OR images.real_labels IS DISTINCT FROM CAST(d.real_labels AS INTEGER[]))"
    )
    con.unregister("inputs_df")
    _write_meta(con, ds, fp)


def _classes_frame(ds: AuditDataset) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "class_index": np.arange(len(ds.label_space), dtype=np.int32),
            "key": list(ds.label_space.keys),
            "name": list(ds.label_space.names),
        }
    )


def _write_meta(con: Any, ds: AuditDataset, fp: str) -> None:
    for key, value in (
        ("dataset_fingerprint", fp),
        ("dataset_root", str(ds.root)),
        ("layout", ds.layout),
        ("label_space", "imagenet-1k" if ds.label_space.imagenet else "custom"),
        ("real_source", ds.real_source or ""),
        ("truth_source", ds.truth_source or ""),
    ):
        con.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value]
        )


def _write_dataset(con: Any, ds: AuditDataset, fp: str) -> None:
    _write_meta(con, ds, fp)
    classes = _classes_frame(ds)
    images = pd.DataFrame(
        {
            "image_index": np.arange(len(ds), dtype=np.int32),
            "image_id": list(ds.image_ids),
            "label": ds.labels.astype(np.int32),
            "real_labels": ds.real if ds.real is not None else [None] * len(ds),
            "valid": np.ones(len(ds), dtype=bool),
        }
    )
    insert_frame(con, "classes", classes)
    insert_frame(con, "images", images)


def run_audit(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    db: Path,
    config: RunConfig | None = None,
    *,
    progress: bool = True,
    reference: AuditDataset | None = None,
    inputs: Mapping[str, Any] | None = None,
    **options: Any,
) -> RunResult:
    """Score ``ds`` with ``specs`` and write everything into the workspace ``db``.

    One run at a time per workspace: a second ``audit run`` on the same
    workspace stops with a clear error instead of racing on the shards. A run
    that died (kill -9, power cut) is marked ``interrupted`` by the next one,
    which resumes its finished shards.

    Parameters
    ----------
    config : RunConfig, optional
        The run's settings (:mod:`audit.config`), stored whole in ``runs.params["config"]``.
        Default ``RunConfig()``; or pass the flat keywords of :meth:`RunConfig.from_options`
        (``batch_size=``, ``workers=``, ``device=``, ``backend=``, ``precision=``, ``features=``,
        ``crop=``, ``heads=``, ``folds=``, ``checks=``, ``check_options=``, ``sigmoid_threshold=``)
        instead, not both.
    progress : bool
        Progress bars on stderr.
    reference : AuditDataset, optional
        From :func:`audit.reference.load_reference`: the duplicate checks also compare against it;
        its labels are never scored.
    inputs : mapping, optional
        What the user passed (paths, model names), so that a bare ``audit run --db WS`` continues.
    """
    if options and config is not None:
        raise TypeError("pass either config or run options as keywords, not both")
    # Every option and path is checked before the workspace is touched: a refused run writes nothing.
    config = RunConfig.from_options(**options) if options else config or RunConfig()
    db = check_workspace(db, create=True)
    if os.environ.get("AUDIT_SHARD_SIZE") is not None:  # read by scoring, after the run is registered
        _options.check_int("$AUDIT_SHARD_SIZE", os.environ["AUDIT_SHARD_SIZE"], lo=1)
    _check_heads(ds, config.heads)
    check_workspace_outside(ds.root, db)
    _check_compatible(ds, specs)
    if len({s.name for s in specs}) != len(specs):
        raise ModelError("the same model is listed twice in --models; list each once")
    if config.map.model is not None and config.map.model not in {s.name for s in specs}:
        names = ", ".join(s.name for s in specs)
        raise OptionError(f"--map-model {config.map.model!r} is not one of --models: {names}")
    # Weights problems surface here, before the workspace (even its lock) is touched or any image scored.
    models = load_models(specs)
    run_id = now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # The cluster is reached and checked (its size, every node seeing the images) before the workspace is touched.
    with _engine(config, specs, ds, reference) as engine, workspace_lock(db):
        mark_interrupted_runs(db)
        try:
            return _run_audit(
                ds,
                specs,
                db,
                config,
                run_id=run_id,
                models=models,
                progress=progress,
                reference=reference,
                inputs=inputs,
                engine=engine,
            )
        except BaseException as e:
            _end_unfinished_run(db, run_id, e)
            raise


def _engine(
    config: RunConfig, specs: Sequence[ModelSpec], ds: AuditDataset, reference: AuditDataset | None
) -> contextlib.AbstractContextManager[Any]:
    """The scoring engine of the run: None for this machine, or a connected Ray cluster (audit.scoring.ray_engine)."""
    if config.scoring.engine != "ray":
        return contextlib.nullcontext(None)
    from audit.scoring import ray_engine

    verbose = logging.getLogger("audit").isEnabledFor(logging.INFO)
    return ray_engine.connect(config.scoring, specs, [ds, reference], verbose=verbose)


def wants_heads(ds: AuditDataset, heads: bool | None) -> bool:
    """Whether a run fits heads: asked for (``--heads``), or by default for a custom label space."""
    return bool(heads) if heads is not None else not ds.label_space.imagenet


def _check_heads(ds: AuditDataset, heads: HeadsConfig) -> None:
    """``--heads`` with ``--folds`` against the dataset: every outer fold needs images (:class:`OptionError`).

    Only when heads were asked for; the default heads of a custom space are skipped with a note instead
    (:func:`_heads_note`), so a tiny custom set still gets its predictions stored.
    """
    if heads.enabled and len(ds) < heads.folds:
        raise OptionError(
            f"--folds {heads.folds}: the dataset has only {len(ds)} images, too few to hold out one per fold; "
            "pass a smaller --folds (at least 2)"
        )


def _heads_note(ds: AuditDataset, valid: np.ndarray, folds: int) -> str | None:
    """Why no heads can be fitted on this dataset's valid images, or None."""
    lab = ds.labels[valid]
    if len(lab) < folds or len(np.unique(lab)) < 2:
        return (
            f"no heads: {len(lab)} readable images in {len(np.unique(lab))} classes, and {folds}-fold "
            "cross-validation needs at least one image per fold and 2 classes; pass a smaller --folds or more images"
        )
    return None


def _end_unfinished_run(db: Path, run_id: str, e: BaseException) -> None:
    """Close a run that raised: ``interrupted`` (Ctrl-C) or ``failed`` with its error, never left ``running``."""
    status = "interrupted" if isinstance(e, KeyboardInterrupt | SystemExit) else "failed"
    try:
        if is_new_workspace(db):
            return  # it failed before the run was registered: nothing to close
        with connect(db, timeout=5.0) as con:
            con.execute(
                "UPDATE runs SET finished_at = ?, status = ?, params = json_merge_patch(params, ?) "
                "WHERE run_id = ? AND status = ?",
                [now(), status, to_json({"error": f"{type(e).__name__}: {e}"}), run_id, "running"],
            )
    except Exception as why:  # the disk may be what failed; the run's own error matters more
        _log.warning("could not mark run %s %s (%s); the next run marks it interrupted", run_id, status, why)


def _run_audit(
    ds: AuditDataset,
    specs: Sequence[ModelSpec],
    db: Path,
    config: RunConfig,
    *,
    run_id: str,
    models: Mapping[str, Any] | None = None,
    progress: bool = True,
    reference: AuditDataset | None = None,
    inputs: Mapping[str, Any] | None = None,
    engine: Any = None,
) -> RunResult:
    sc, hc = config.scoring, config.heads
    batch_size, workers, device, backend, precision = sc.batch_size, sc.workers, sc.device, sc.backend, sc.precision
    features, crop, heads, folds = sc.features, sc.crop, hc.enabled, hc.folds
    sigmoid_threshold = config.sigmoid_threshold
    selected = config.checks.make()
    # The crop rule changes each spec's preprocessing (and so its shard fingerprint) before anything is scored.
    specs, crop_notes = apply_crop(specs, crop, typical_short_side(ds) if crop == "auto" else None)
    notes = [*ds.notes, *crop_notes, *_check_compatible(ds, specs)]
    if len({s.name for s in specs}) != len(specs):
        raise ModelError("the same model is listed twice in --models; list each once")
    params = {
        # The run's settings, whole (audit.config.RunConfig.to_params; read back by RunConfig.from_params).
        "config": config.to_params(),
        # The reference set the duplicate checks compared against (never scored for its labels).
        "reference": None if reference is None else {"root": str(reference.root), "images": len(reference)},
        # What the user passed, so that a bare `audit run --db WS` can continue this workspace.
        "inputs": dict(inputs or {}),
    }
    # Weights problems surface here, before the workspace is touched or any image scored.
    models = models if models is not None else load_models(specs)
    _refuse_other_dataset(db, ds)  # before reading prediction files at length: the more basic mistake first
    check_predictions(ds, specs)
    _register_run(db, ds, specs, run_id, params)
    stats = ScoreStats()
    arrays = score_dataset(
        ds,
        specs,
        arrays_dir(db),
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
        models=models,
        backend=backend,
        precision=precision,
        stats=stats,
        features=features,
        engine=engine,
    )
    scored = list(arrays)  # the scored models, before any heads join them
    # Each scored model's features (memory-mapped), asked of the seam once a run: the heads and the checks share them.
    feats = {a.spec.name: _features_of(a) for a in scored}
    bad: dict[int, str] = {}
    for a in arrays:
        bad.update(a.bad)
    valid = np.ones(len(ds), dtype=bool)
    valid[list(bad)] = False
    head_params: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    heads_info: dict[str, Any] = {}
    why_not = _heads_note(ds, valid, folds) if wants_heads(ds, heads) else None
    if why_not:
        notes.append(why_not)
    elif wants_heads(ds, heads):
        made = fit_heads(ds, arrays, arrays_dir(db), valid=valid, folds=folds, features=lambda a: feats[a.spec.name])
        arrays = [*arrays, *made.arrays]
        notes += made.notes
        head_params = made.params
        if made.arrays:
            agree = head_agreement([np.load(a.probs, mmap_mode="r") for a in made.arrays], ds.labels, valid)
            warn = weak_heads_warning(agree)
            heads_info = {"agreement": agree, "threshold": HEADS_MIN_AGREEMENT, "warning": warn}
            warnings += [warn] if warn else []
    evaluable = [a for a in arrays if a.num_classes == len(ds.label_space)]
    _log.info("post-processing %d model(s)", len(arrays))
    pred_frames, metric_rows = [], []
    for a in arrays:
        probs = np.load(a.probs, mmap_mode="r")
        cls, val = topk_of(probs)
        pred_frames.append(_prediction_frame(a.spec.name, cls, val, probs, ds.labels))
        if a in evaluable:
            metric_rows += _evaluate(a.spec.name, cls, [np.load(a.logits, mmap_mode="r")], ds, valid, sigmoid_threshold)
    if evaluable:
        mean = _ensemble_mean([np.load(a.probs, mmap_mode="r") for a in evaluable], valid)
        cls, val = topk_of(mean)
        pred_frames.append(_prediction_frame(ENSEMBLE, cls, val, mean, ds.labels))
        del mean  # an (N, C) matrix: freed before the ensemble's sigmoid scores take its place
        ens_logits = [np.load(a.logits, mmap_mode="r") for a in evaluable]
        metric_rows += _evaluate(ENSEMBLE, cls, ens_logits, ds, valid, sigmoid_threshold)
    inputs_ = _check_inputs(ds, db, scored, evaluable, valid, feats)
    if reference is not None:
        from audit.reference import reference_inputs

        _log.info("scoring the reference set (%d images) for the duplicate checks", len(reference))
        ref = reference_inputs(
            reference,
            specs,
            arrays_dir(db),
            feature_models=inputs_.feature_models,
            models=models,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
            backend=backend,
            precision=precision,
            engine=engine,
        )
        inputs_ = dataclasses.replace(inputs_, reference=ref)
    results, skipped = run_checks(inputs_, selected)
    # The review page's nearest images, from the graph the feature checks shared (audit.neighbours): written
    # before the run's tables and naming this run, so a run that fails after it leaves no neighbours in use.
    write_neighbours(db, run_id, inputs_)
    map_note = _write_map(db, run_id, config, scored, evaluable, feats, ds, valid)
    if map_note:
        notes.append(map_note)
    label = next((r for r in results if r.check == "label"), None)
    if label is not None and ds.truth is not None:
        metric_rows += [(ENSEMBLE, m) for m in flag_metrics(label.score, label.is_issue, ds.labels, ds.truth, valid)]
    if not evaluable:
        notes.append(
            f"no model predicts this dataset's {len(ds.label_space)} classes: their predictions are stored, "
            "but there are no evaluations and no label issues (pass a checkpoint trained on these classes)"
        )
    if ds.real is None and ds.label_space.imagenet:
        notes.append("ReaL labels do not apply to these images: real, sigmoid and clean evaluations skipped")
    elif ds.real is None:
        against = "truth" if ds.truth is not None else "given"
        notes.append(
            "ReaL labels do not apply to a custom label space: real and clean evaluations skipped; the sigmoid "
            f"evaluation is against the {against} labels"
        )
    metrics = pd.DataFrame([_metric_row(run_id, m, r) for m, r in metric_rows])
    ran = {r.check: r for r in results}
    outcomes = tuple(
        CheckOutcome(
            c.name,
            ran[c.name].summary["n_issues"],
            ran[c.name].summary["n_assessed"],
            None,
            ran[c.name].summary.get("note"),
        )
        if c.name in ran
        else CheckOutcome(c.name, None, None, skipped[c.name])
        for c in selected
    )
    check_rows = _check_frames(run_id, selected, results, skipped)
    _ingest(db, run_id, ds, arrays, pred_frames, metrics, label, bad, notes, stats, head_params, heads_info, check_rows)
    n_flag = int(np.count_nonzero(label.is_issue)) if label is not None else 0
    return RunResult(run_id, db, metrics, n_flag, len(bad), tuple(notes), tuple(warnings), outcomes)


def _write_map(
    db: Path,
    run_id: str,
    config: RunConfig,
    scored: Sequence[ModelArrays],
    evaluable: Sequence[ModelArrays],
    feats: Mapping[str, np.ndarray | None],
    ds: AuditDataset,
    valid: np.ndarray,
) -> str | None:
    """The dashboard's map (audit.featuremap): the chosen model's, or the one whose predictions fit best."""
    from audit.featuremap import strongest_model, write_maps

    have = {a.spec.name: f for a in scored if (f := feats.get(a.spec.name)) is not None}
    mc = config.map
    if mc.model is not None and have and mc.model not in have:
        raise OptionError(f"--map-model {mc.model!r} has no features in this run; choose one of: {', '.join(have)}")
    default = mc.model
    if default is None and have:
        probs = {a.spec.name: np.load(a.probs, mmap_mode="r") for a in evaluable}
        arch_of = {a.spec.name: a.spec.arch for a in evaluable if a.spec.arch}
        default = strongest_model(list(have), probs, arch_of, np.asarray(ds.labels), valid)
    return write_maps(
        db, run_id, have, valid, default=default, settings=mc.settings(), enabled=mc.enabled, log=_log.info
    )


def _check_inputs(
    ds: AuditDataset,
    db: Path,
    scored: Sequence[ModelArrays],
    evaluable: Sequence[ModelArrays],
    valid: np.ndarray,
    features: Mapping[str, np.ndarray | None],
) -> CheckInputs:
    """Everything this run can hand a check: the given labels, every evaluable model's probabilities (for a
    custom space, the heads' out-of-fold ones), the scored models' logits and features, the pixel statistics
    of the decode pass where scoring gathered them, the image ids and the valid mask."""
    feats = [(a.spec.name, f) for a in scored if (f := features.get(a.spec.name)) is not None]
    return CheckInputs(
        n=len(ds),
        labels=np.asarray(ds.labels, dtype=np.int64),
        n_classes=len(ds.label_space),
        class_names=tuple(ds.label_space.names),
        valid=valid,
        probs=[np.load(a.probs, mmap_mode="r") for a in evaluable] or None,
        logits=[np.load(a.logits, mmap_mode="r") for a in scored] or None,
        model_names=tuple(a.spec.name for a in evaluable),
        features=[f for _, f in feats] or None,
        pixels=_pixel_stats(ds, arrays_dir(db)),
        image_ids=tuple(ds.image_ids),
        logit_models=tuple(a.spec.name for a in scored),
        feature_models=tuple(name for name, _ in feats),
    )


def _pixel_stats(ds: AuditDataset, arrays: Path) -> Mapping[str, np.ndarray] | None:
    """The per-image pixel statistics scoring gathered in its decode pass, or None where it gathered none."""
    from audit.scoring import load_pixel_stats

    return load_pixel_stats(ds, arrays)


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None and numpy scalars as Python ones: strict JSON for DuckDB's JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _check_frames(
    run_id: str, selected: Sequence[Any], results: Sequence[CheckResult], skipped: Mapping[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``issues`` rows (one per image per check that ran) and ``checks`` rows (one per selected check)."""
    frames = []
    for r in results:
        n = len(r.score)
        score = np.asarray(r.score, dtype=np.float64)
        sug = [None] * n if r.suggestion is None else np.asarray(r.suggestion, dtype=np.int64)
        info = [None] * n if r.info is None else [None if d is None else to_json(_json_safe(d)) for d in r.info]
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    "check": r.check,
                    "image_index": np.arange(n, dtype=np.int32),
                    "score": np.where(np.isfinite(score), score, np.nan),  # NaN is stored as NULL: not assessed
                    "is_issue": np.asarray(r.is_issue, dtype=bool),
                    "suggestion": pd.array(sug, dtype="Int32"),
                    "info": info,
                }
            )
        )
    issues = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ran = {r.check: r for r in results}
    checks = pd.DataFrame(
        [
            {
                "run_id": run_id,
                "check": c.name,
                "params": to_json(_json_safe(ran[c.name].params if c.name in ran else c.params)),
                "summary": to_json(_json_safe(ran[c.name].summary if c.name in ran else {"skipped": skipped[c.name]})),
            }
            for c in selected
        ]
    )
    return issues, checks


def _features_of(arrays: ModelArrays) -> np.ndarray | None:
    """A model's ``(N, D)`` penultimate features, or None: the one seam from scoring to the heads."""
    return features_of(arrays)


def last_run_inputs(db: str | Path) -> dict[str, Any] | None:
    """What the newest run of workspace ``db`` was given, or None for a new workspace.

    Returns
    -------
    dict or None
        ``dataset``, ``labels``, ``real``, ``limit`` and ``models`` (the names
        as the user typed them), as recorded by ``run_audit(inputs=...)``.
    """
    if is_new_workspace(db):
        return None
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT params FROM runs ORDER BY started_at DESC").fetchall()
    for (params,) in rows:
        inputs = json.loads(params or "{}").get("inputs") or {}
        if inputs.get("dataset") and inputs.get("models"):
            return dict(inputs)
    return None


def workspace_inputs(db: str | Path) -> dict[str, set[Path]]:
    """Every input any run of workspace ``db`` read: ``{"dataset": roots, "labels": files, ...}``.

    Keys: ``dataset`` (roots) and the files ``labels``, ``real``, ``classes`` and ``truth``.

    Real paths (symbolic links resolved), from the recorded inputs of every run
    and the dataset root the workspace was made for; empty sets for a new workspace.
    """
    out: dict[str, set[Path]] = {k: set() for k in ("dataset", *_INPUT_FILES)}
    if is_new_workspace(db):
        return out
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT params FROM runs").fetchall()
        root = meta_value(con, "dataset_root")
    if root:
        out["dataset"].add(_real(root))
    for (params,) in rows:
        inputs = json.loads(params or "{}").get("inputs") or {}
        for key, paths in out.items():
            if inputs.get(key):
                paths.add(_real(inputs[key]))
    return out


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_workspace_outside(root: str | Path, db: str | Path) -> None:
    """Refuse a workspace (its DuckDB file or arrays folder) inside dataset folder ``root``.

    Its files would be taken for images or classes by the next run, or change
    the dataset under the workspace that audits it.

    Raises
    ------
    StoreError
    """
    folder = _real(root)
    path = workspace_path(db)
    for what, p in (("workspace", path), ("its arrays folder", arrays_dir(path))):
        if _inside(p, folder):
            raise StoreError(
                f"--db {db}: {what} {p} would lie inside the dataset folder {folder}, where the next run would "
                "read it as part of the dataset; pass a --db outside the dataset"
            )


def check_export_target(db: str | Path, out: str | Path) -> Path:
    """Refuse an export folder whose files would harm the workspace's inputs; return its real path.

    Refused: a file where the folder should be; a folder equal to or inside a
    dataset folder the workspace reads (the export's files would join the
    dataset), inside the workspace's arrays folder, or holding a label file or
    ReaL file the workspace reads (the export would overwrite it, and the next
    run would read other labels).

    Raises
    ------
    OptionError
    """
    target = _real(out)
    if target.exists() and not target.is_dir():
        raise OptionError(f"--out {out} is a file; pass a folder (it is made when missing)")
    path = workspace_path(db)
    if _inside(target, arrays_dir(path)) or target == path:
        raise OptionError(f"--out {out} lies inside workspace {path}'s own files; pass a folder outside them")
    inputs = workspace_inputs(path)
    for root in sorted(inputs["dataset"]):
        if _inside(target, root):
            raise OptionError(
                f"--out {out} lies inside the dataset folder {root} that workspace {path} reads, where its files "
                "would join the dataset; pass a folder outside it"
            )
    for key, what in _INPUT_FILES.items():
        for f in sorted(inputs[key]):
            if f.parent == target:
                raise OptionError(
                    f"--out {out} holds {f}, the {what} workspace {path} reads, which an export could overwrite; "
                    "pass another folder"
                )
    return target


def _ensemble_mean(probs: Sequence[np.ndarray], valid: np.ndarray) -> np.ndarray:
    n, c = probs[0].shape
    out = np.zeros((n, c), dtype=np.float32)
    for p in probs:
        for s in range(0, n, _CHUNK):
            out[s : s + _CHUNK] += np.asarray(p[s : s + _CHUNK])
    out /= len(probs)
    out[~valid] = np.nan
    return out


def _prediction_frame(
    model: str, cls: np.ndarray, val: np.ndarray, probs: np.ndarray, labels: np.ndarray
) -> pd.DataFrame:
    n = len(cls)
    lab = np.clip(labels, 0, probs.shape[1] - 1)
    label_prob = np.empty(n, dtype=np.float32)
    for s in range(0, n, _CHUNK):
        label_prob[s : s + _CHUNK] = np.asarray(probs[s : s + _CHUNK])[
            np.arange(min(_CHUNK, n - s)), lab[s : s + _CHUNK]
        ]
    label_prob[(labels < 0) | (labels >= probs.shape[1])] = np.nan
    return pd.DataFrame(
        {
            "model": model,
            "image_index": np.arange(n, dtype=np.int32),
            "top1": cls[:, 0],
            "top1_prob": val[:, 0],
            "label_prob": label_prob,
            "top_classes": list(cls),
            "top_probs": list(val),
        }
    )


def _evaluate(
    model: str,
    cls: np.ndarray,
    logits: Sequence[np.ndarray],
    ds: AuditDataset,
    valid: np.ndarray,
    threshold: float | None,
) -> list[tuple[str, Metric]]:
    """Every evaluation of one model, or of the ensemble when ``logits`` holds several models'."""
    # One model: its logits themselves (the sigmoid is monotone, and a float32 sigmoid of large
    # logits saturates at 1.0: SqueezeNet's run 0..66). The ensemble: the mean of the sigmoids.
    scale = "logit" if len(logits) == 1 else "probability"
    scores = None
    if logits and (ds.real is not None or not ds.label_space.imagenet):
        scores = logits[0] if scale == "logit" else _sigmoid_scores(logits)
    if threshold is not None and scale == "logit":
        # A probability threshold on the logit scale; 0 and 1 become "every class" and "the argmax only".
        threshold = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else (-1e30 if threshold <= 0 else 1e30)
    rows = evaluate_all(
        cls,
        ds.labels,
        real_sets=ds.real,
        scores=scores if ds.real is not None else None,
        label_sets=None,
        valid=valid & (cls[:, 0] >= 0),
        threshold=threshold,
        scores_scale=scale,
    )
    rel = relabeled_accuracy(cls, [[int(x)] if x >= 0 else [] for x in ds.labels], valid=valid & (cls[:, 0] >= 0))
    if ds.truth is not None:
        rel += truth_metrics(cls, ds.truth, valid)
    if scores is not None and ds.real is None:
        rel += _custom_sigmoid(scores, scale, ds, valid & (cls[:, 0] >= 0), threshold)
    return [(model, m) for m in rows + rel]


def _custom_sigmoid(
    scores: np.ndarray, scale: str, ds: AuditDataset, valid: np.ndarray, threshold: float | None
) -> list[Metric]:
    """The sigmoid (multi-label) evaluation of a custom label space, where no ReaL sets exist.

    Each image's set is its one trusted label (``--truth``) when there is one, else its
    given label, so a sigmoid head's per-class scores (the sigmoid of its logits) are
    scored as a set prediction: F1, precision and recall at a cross-fitted threshold.
    ``scores`` and ``threshold`` are on ``scale``, as :func:`_evaluate` chose them.
    """
    from audit.evaluate import sigmoid_evaluation

    ref = ds.truth if ds.truth is not None else ds.labels
    sets = [[int(x)] if x >= 0 else [] for x in ref]
    against = "truth" if ds.truth is not None else "given labels"
    rows = sigmoid_evaluation(scores, sets, threshold=threshold, valid=valid, scale=scale)
    return [Metric(m.evaluation, m.metric, m.value, m.low, m.high, m.n, {**m.params, "against": against}) for m in rows]


def _sigmoid_scores(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Each class scored on its own, ``(N, C)`` float32: the sigmoid of its logit, averaged over the models.

    The sigmoid whatever loss trained the model; for the ensemble, the mean of the
    models' sigmoid scores (its counterpart of the mean of their probabilities).
    Streamed in chunks so memory-mapped logits are never loaded whole.
    """
    n, c = logits[0].shape
    out = np.zeros((n, c), dtype=np.float32)
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative logits: score 0, as it should
        for lg in logits:
            for s in range(0, n, _CHUNK):
                x = np.nan_to_num(np.asarray(lg[s : s + _CHUNK], dtype=np.float32), nan=0.0)
                out[s : s + _CHUNK] += 1.0 / (1.0 + np.exp(-x))
    if len(logits) > 1:
        out /= len(logits)
    return out


def _metric_row(run_id: str, model: str, m: Metric) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "model": model,
        "evaluation": m.evaluation,
        "metric": m.metric,
        "value": m.value,
        "low": m.low,
        "high": m.high,
        "n": m.n,
        "params": to_json(m.params),
    }


def _ingest(
    db: Path,
    run_id: str,
    ds: AuditDataset,
    arrays: Sequence[ModelArrays],
    preds: Sequence[pd.DataFrame],
    metrics: pd.DataFrame,
    label: CheckResult | None,
    bad: dict[int, str],
    notes: list[str],
    stats: ScoreStats,
    head_params: Mapping[str, dict[str, Any]] | None = None,
    heads_info: Mapping[str, Any] | None = None,
    check_rows: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> None:
    from audit import flag

    models = pd.DataFrame(
        [
            {
                "model": a.spec.name,
                "source": a.spec.source,
                "arch": a.spec.arch,
                "tag": a.spec.tag,
                "loss": a.spec.loss,
                "num_classes": a.num_classes,
                # A head has no preprocessing of its own (it reads its model's features): the column holds
                # its parameters instead (kind, folds, seed, C and its grid, the features' model and width).
                "preprocess": to_json(
                    (head_params or {}).get(a.spec.name) or (a.spec.preprocess.__dict__ if a.spec.preprocess else None)
                ),
                "weights_file": a.spec.weights_file,
                "logits_file": str(a.logits),
                "probs_file": str(a.probs),
                "run_id": run_id,
            }
            for a in arrays
        ]
    )
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    bad_df = pd.DataFrame(
        {
            "image_index": np.array(sorted(bad), dtype=np.int32),
            "image_id": [ds.image_ids[i] for i in sorted(bad)],
            "reason": [bad[i] for i in sorted(bad)],
            "run_id": run_id,
        }
    )
    with connect(db) as con, transaction(con):
        _sync_dataset(con, ds)  # labels, ReaL sets and classes as this run read them
        write_truth(con, ds.truth)  # its own table (created here), so older workspaces open unchanged
        # A run defines the workspace's models: the ensemble, the flags and every table
        # then describe the same set. Earlier models not listed again leave the tables;
        # their arrays stay cached, so listing them again costs no scoring.
        names = [a.spec.name for a in arrays]
        dropped = con.execute(
            "SELECT model FROM models WHERE NOT list_contains(?, model) ORDER BY model", [names]
        ).fetchall()
        if dropped:
            notes.append(
                f"{', '.join(r[0] for r in dropped)} (from an earlier run) left the workspace: this run's "
                "--models define it; their scores stay cached, so listing them again scores nothing"
            )
        con.execute("DELETE FROM models")
        con.execute("DELETE FROM predictions")
        con.execute("DELETE FROM metrics")
        # Any of these may be empty (no evaluable model: no metrics; no bad image; no issues).
        insert_frame(con, "models", models)
        insert_frame(con, "predictions", pred)
        insert_frame(con, "metrics", metrics)
        con.execute("DELETE FROM bad_images")
        insert_frame(con, "bad_images", bad_df)
        con.execute("UPDATE images SET valid = NOT list_contains(?, image_index)", [sorted(bad)])
        # The checks of this run replace the last run's, like the models: every table describes this run.
        con.execute("DELETE FROM label_issues")
        if label is not None:  # the label check's detail table, from the same result as its issues rows
            insert_frame(con, "label_issues", label_issues_frame(label, run_id))
        con.execute("DELETE FROM issues")
        con.execute("DELETE FROM checks")
        issue_rows, checks_rows = check_rows if check_rows is not None else (pd.DataFrame(), pd.DataFrame())
        insert_frame(con, "issues", issue_rows)
        insert_frame(con, "checks", checks_rows)
        # What ran: the backend "auto" resolved to, and how many images were scored (0 when all were cached).
        scoring = {"backend_used": stats.backend, "images_scored": stats.images}
        params = {
            "flag": dict(label.params) if label is not None else flag.flag_params(),
            # Each selected check's summary (what it found, or why it was skipped): the history of every run.
            "check_results": {str(r["check"]): json.loads(r["summary"]) for r in checks_rows.to_dict("records")},
            "notes": notes,
            "scoring": scoring,
            "head_check": dict(heads_info or {}),
        }
        con.execute(
            "UPDATE runs SET finished_at = ?, status = ?, params = json_merge_patch(params, ?) WHERE run_id = ?",
            [now(), "finished", to_json(params), run_id],
        )
