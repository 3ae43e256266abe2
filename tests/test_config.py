"""Run settings as typed, frozen dataclasses (audit.config): validated once, stored whole, read back equal."""

from __future__ import annotations

import dataclasses
import json

import pytest
from _synth import make_imagefolder, make_predictions

from audit.config import ChecksConfig, HeadsConfig, RunConfig, ScoringConfig
from audit.datasets import load_dataset
from audit.errors import CheckError, OptionError
from audit.pipeline import run_audit
from audit.store import connect
from audit.zoo import resolve_model


def test_defaults_are_the_documented_ones():
    c = RunConfig()
    assert (c.scoring.batch_size, c.scoring.workers, c.scoring.backend, c.scoring.precision) == (64, 2, "auto", "fp32")
    assert (c.scoring.features, c.scoring.crop, c.heads.enabled, c.heads.folds) == (True, "auto", None, 10)
    assert "label" in c.checks.names and c.sigmoid_threshold is None


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: ScoringConfig(batch_size=0), OptionError, "--batch-size"),
        (lambda: ScoringConfig(workers=-1), OptionError, "--workers"),
        (lambda: ScoringConfig(crop="sideways"), OptionError, "--crop"),
        (lambda: ScoringConfig(features="maybe"), OptionError, "--features"),
        (lambda: HeadsConfig(folds=1), OptionError, "--folds"),
        (lambda: ChecksConfig(names="label,nope"), CheckError, "nope"),
        (lambda: ChecksConfig(names="label", options={"label": {"weights": "loudest"}}), CheckError, "label"),
        (lambda: RunConfig(sigmoid_threshold=1.5), OptionError, "--sigmoid-threshold"),
        (lambda: RunConfig.from_options(batch_sise=4), TypeError, "batch_sise"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_made(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_values_are_normalised_once_and_frozen():
    c = RunConfig.from_options(batch_size="8", workers=0, heads="yes", folds="3", checks="label")
    assert (c.scoring.batch_size, c.heads.enabled, c.heads.folds, c.checks.names) == (8, True, 3, ("label",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.scoring.batch_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.checks.options["label"] = {}  # type: ignore[index]


def test_params_round_trip_through_json():
    c = RunConfig(
        scoring=ScoringConfig(batch_size=16, workers=0, crop="full", features=False),
        heads=HeadsConfig(enabled=False, folds=5),
        checks=ChecksConfig(names="label,*_duplicate", options={"label": {"weights": "fit"}}),
        sigmoid_threshold=0.25,
    )
    back = RunConfig.from_params(json.loads(json.dumps(c.to_params())))
    assert back == c and back.to_params() == c.to_params()
    assert back.checks.names == ("label", "exact_duplicate", "near_duplicate")


def test_a_run_stores_its_config_whole(tmp_path):
    root = make_imagefolder(tmp_path / "ds", per_class=3)
    ds = load_dataset(root)
    preds = make_predictions(tmp_path / "p.npy", list(ds.image_ids), ds.labels)
    config = RunConfig(scoring=ScoringConfig(batch_size=4, workers=0), checks=ChecksConfig(names="label"))
    db = tmp_path / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{preds}")], db, config, progress=False)
    with connect(db, read_only=True) as con:
        (params,) = con.execute("SELECT params FROM runs").fetchone()
    stored = json.loads(params)["config"]
    assert stored == config.to_params() and RunConfig.from_params(stored) == config
    with pytest.raises(TypeError, match="not both"):
        run_audit(ds, [resolve_model(f"preds:{preds}")], db, config, batch_size=4)
