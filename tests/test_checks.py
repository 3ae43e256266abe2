"""The checks' structure: registry, selection and options, the runner's skip rule, storage, CLI."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
from _synth import make_imagefolder, make_predictions

from audit.checks import (
    Check,
    CheckInputs,
    CheckRegistry,
    CheckResult,
    default_checks,
    default_names,
    list_checks,
    make_checks,
    resolve_checks,
    run_checks,
)
from audit.checks.label import LabelCheck
from audit.errors import CheckError, UserError

FLIP = np.array([1, 7, 13])


# --------------------------------------------------------------------------- a registry of toy checks


class _Lowest(Check):
    """Flags the ``k`` images with the lowest given label: a deterministic toy."""

    name = "lowest"
    needs = frozenset({"labels"})
    description = "toy"

    def run(self, inputs: CheckInputs) -> CheckResult:
        lab = inputs.labels.astype(float)
        score = (lab - lab.min()) / max(lab.max() - lab.min(), 1)
        hit = np.zeros(inputs.n, bool)
        hit[np.argsort(score, kind="stable")[: int(self.params.get("k", 2))]] = True
        return CheckResult(self.name, score, hit, params=self.params, summary={"k": int(self.params.get("k", 2))})


class _NeedsFeatures(Check):
    name = "feat"
    needs = frozenset({"features", "pixels"})
    default = False

    def run(self, inputs: CheckInputs) -> CheckResult:  # pragma: no cover - never reached without features
        raise AssertionError("run without its inputs")


class _WrongLength(Check):
    name = "short"
    needs = frozenset({"labels"})
    default = False

    def run(self, inputs: CheckInputs) -> CheckResult:
        return CheckResult(self.name, np.ones(inputs.n - 1), np.zeros(inputs.n - 1, bool))


def _toys() -> CheckRegistry:
    reg = CheckRegistry()
    for cls in (_Lowest, _NeedsFeatures, _WrongLength):
        reg.register(cls)
    return reg


def _inputs(n: int = 6) -> CheckInputs:
    return CheckInputs(n=n, labels=np.arange(n)[::-1].copy(), valid=np.ones(n, bool))


# --------------------------------------------------------------------------- registry


def test_the_default_registry_is_built_once_and_lists_the_label_check_on_by_default():
    reg = default_checks()
    assert reg is default_checks() and "label" in reg
    assert reg.get("label") is LabelCheck and LabelCheck.needs == {"labels", "probs"} and LabelCheck.default
    assert "label" in default_names() and all(reg.get(n).default for n in default_names())
    assert list_checks("label") == [LabelCheck] and list_checks("no-such-*") == []
    assert set(list_checks("lab*")) >= {LabelCheck} and all(c.name.startswith("lab") for c in list_checks("lab*"))
    assert [c.name for c in list_checks()] == reg.names()


def test_selection_keeps_the_order_given_takes_patterns_and_names_each_once():
    reg = _toys()
    assert resolve_checks(None, reg) == ("lowest",)  # only the default-on ones
    assert resolve_checks("short,lowest", reg) == ("short", "lowest")
    assert resolve_checks(["lowest", "*", " lowest "], reg) == ("lowest", "feat", "short")
    assert resolve_checks("s*", reg) == ("short",)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("lowest,nope", r"no check named 'nope'; known checks: feat, lowest, short \(see 'audit checks'\)"),
        ("x*", r"no check named 'x\*'; known checks: feat, lowest, short"),
        (" , ", r"--checks is empty; name at least one check, from: feat, lowest, short"),
    ],
)
def test_an_unknown_or_empty_selection_is_one_line_listing_the_checks(names, message):
    with pytest.raises(CheckError, match=message) as e:
        resolve_checks(names, _toys())
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("names", "params", "message"),
    [
        ("label", {"label": {"weights": "best"}}, r"--check-option label: weights is 'best', expected one of"),
        ("label", {"label": {"frac_flagged": 2}}, r"--check-option label: frac_flagged is 2"),
        ("label", {"label": {"method": "margin"}}, r"--check-option label: method is 'margin'"),
        ("label", {"label": {"kinds": []}}, r"label\.kinds: the label check has no option 'kinds'; its options are"),
        ("label", {"knn": {"k": 3}}, r"--check-option knn\.\*: 'knn' is not a check; selected: label"),
    ],
)
def test_check_options_are_checked_by_the_check_before_anything_runs(names, params, message):
    with pytest.raises(CheckError, match=message):
        make_checks(names, params=params)


def test_options_for_a_registered_check_that_is_not_selected_are_refused():
    with pytest.raises(CheckError, match=r"'short' is not selected by --checks; selected: lowest"):
        make_checks("lowest", registry=_toys(), params={"short": {"x": 1}})


def test_a_checks_own_value_error_becomes_one_line_naming_it():
    class Picky(_Lowest):
        name = "picky"

        def __init__(self, **params):
            if params.get("k", 1) < 1:
                raise ValueError(f"k must be at least 1, got {params['k']}")
            super().__init__(**params)

    reg = CheckRegistry()
    reg.register(Picky)
    with pytest.raises(CheckError, match=r"^--check-option picky: k must be at least 1, got 0$"):
        make_checks("picky", registry=reg, params={"picky": {"k": 0}})


# --------------------------------------------------------------------------- runner


def test_the_runner_runs_in_order_and_skips_a_check_without_its_inputs_with_a_note():
    results, notes = run_checks(_inputs(), "feat,lowest", registry=_toys(), params={"lowest": {"k": 3}})
    assert [r.check for r in results] == ["lowest"]
    assert list(notes) == ["feat"]
    assert notes["feat"] == (
        "skipped: needs features, pixels, which this run lacks (no model recorded features (score a zoo model, "
        "without --no-features); pixel statistics were not gathered in the decode pass)"
    )
    (r,) = results
    assert r.is_issue.tolist() == [False, False, False, True, True, True]  # labels 5..0: the three lowest
    assert r.summary["k"] == 3 and r.summary["n_issues"] == 3 and r.summary["n_assessed"] == 6
    assert r.summary["seconds"] >= 0 and r.params == {"k": 3}


def test_a_check_needing_any_of_its_inputs_runs_on_one_and_its_note_says_or():
    class _Either(_Lowest):
        name = "either"
        needs = frozenset({"labels", "features"})
        needs_any = True

    assert _Either().missing(_inputs()) == frozenset()  # labels alone suffice
    assert _NeedsFeatures().missing(_inputs()) == frozenset({"features", "pixels"})  # all of them, by default
    bare = CheckInputs(n=6)
    assert _Either().missing(bare) == frozenset({"labels", "features"})
    reg = CheckRegistry()
    reg.register(_Either)
    results, _ = run_checks(_inputs(), "either", registry=reg)
    assert results[0].check == "either"
    _, notes = run_checks(bare, "either", registry=reg)
    assert notes["either"].startswith("skipped: needs features or labels, which this run lacks (")


def test_the_runner_takes_configured_checks_and_refuses_a_result_for_other_images():
    results, notes = run_checks(_inputs(), [_Lowest(k=1)])
    assert results[0].is_issue.sum() == 1 and not notes
    with pytest.raises(ValueError, match=r"check 'short' returned a result named 'short' for 5 images, expected"):
        run_checks(_inputs(), "short", registry=_toys())


# --------------------------------------------------------------------------- pipeline: tables and summary


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from audit.datasets import load_dataset
    from audit.pipeline import run_audit
    from audit.zoo import resolve_model

    base = tmp_path_factory.mktemp("checks")
    ds = load_dataset(make_imagefolder(base / "ds"))
    ids = list(ds.image_ids)
    a = make_predictions(base / "a.npy", ids, ds.labels, flip=FLIP, seed=1)
    b = make_predictions(base / "b.npy", ids, ds.labels, flip=FLIP, seed=2, probs=True)
    db = base / "w.duckdb"
    specs = [resolve_model(f"preds:{a}"), resolve_model(f"preds:{b}")]
    res = run_audit(ds, specs, db, progress=False, checks="label")
    return ds, db, res, specs, f"preds:{a},preds:{b}"


def test_a_run_writes_each_checks_rows_and_settings_in_the_issues_and_checks_tables(workspace):
    from audit.store import connect

    ds, db, res, *_ = workspace
    with connect(db, read_only=True) as con:
        issues = con.execute(
            'SELECT "check", image_index, score, is_issue, suggestion, run_id FROM issues ORDER BY image_index'
        ).fetchall()
        label = con.execute(
            "SELECT image_index, label_quality, is_label_issue, suggested_label FROM label_issues ORDER BY 1"
        ).fetchall()
        checks = con.execute('SELECT "check", params, summary, run_id FROM checks').fetchall()
        run = json.loads(con.execute("SELECT params FROM runs").fetchall()[0][0])
    assert len(issues) == len(ds) and {r[0] for r in issues} == {"label"}
    assert [r[1:5] for r in issues] == label  # one result, two tables: the same rows
    assert {r[5] for r in issues} == {res.run_id}
    ((name, params, summary, run_id),) = checks
    summary = json.loads(summary)
    assert (name, run_id) == ("label", res.run_id)
    assert json.loads(params)["weights"] == "equal" and summary["n_issues"] == res.n_flagged >= len(FLIP)
    assert summary["n_assessed"] == len(ds) and summary["weights_used"] == [0.5, 0.5]
    assert run["config"]["checks"]["names"] == ["label"] and run["check_results"]["label"]["n_issues"] == res.n_flagged
    assert [(o.check, o.n_issues, o.skipped) for o in res.checks] == [("label", res.n_flagged, None)]


def test_a_check_without_its_inputs_is_skipped_and_the_workspace_says_why(tmp_path):
    from audit.datasets import load_dataset
    from audit.pipeline import run_audit
    from audit.queries import check_note
    from audit.store import connect
    from audit.zoo import resolve_model

    ds = load_dataset(make_imagefolder(tmp_path / "custom", per_class=3, wnids=("cat", "dog")))
    preds = make_predictions(tmp_path / "p.npy", list(ds.image_ids), ds.labels)  # ImageNet's 1,000 classes
    db = tmp_path / "w.duckdb"
    res = run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False, heads=False, checks="label")
    (outcome,) = res.checks
    assert outcome.n_issues is None and "needs probs" in outcome.skipped
    assert outcome.line() == (
        "check label: skipped: needs probs, which this run lacks (no model predicts the dataset's classes)"
    )
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM issues").fetchall() == [(0,)]
        (summary,) = con.execute("SELECT summary FROM checks").fetchall()[0]
    assert json.loads(summary) == {"skipped": outcome.skipped}
    assert check_note(db, "label") == f"check 'label' was {outcome.skipped}"


def test_a_rerun_replaces_the_checks_of_the_last_run(workspace, tmp_path):
    import shutil

    from audit.pipeline import run_audit
    from audit.store import connect

    ds, db0, _, specs, _ = workspace
    db = tmp_path / "copy.duckdb"
    shutil.copyfile(db0, db)
    res = run_audit(ds, specs, db, progress=False, checks="label", check_options={"label": {"frac_flagged": 0.25}})
    with connect(db, read_only=True) as con:
        rows = con.execute('SELECT DISTINCT run_id, "check" FROM issues').fetchall()
        n = con.execute("SELECT count(*) FILTER (WHERE is_issue) FROM issues").fetchall()[0][0]
        (params,) = con.execute("SELECT params FROM checks").fetchall()[0]
    assert rows == [(res.run_id, "label")] and n == len(ds) // 4 == res.n_flagged
    assert json.loads(params)["frac_flagged"] == 0.25


# --------------------------------------------------------------------------- CLI


def test_audit_checks_lists_name_needs_default_and_description(capsys):
    from audit.cli import main

    assert main(["checks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "needs", "default"]
    row = next(line for line in out if line.split()[0] == "label")
    assert row.split()[1:3] == ["labels,probs", "on"]
    assert main(["checks", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    label = next(r for r in rows if r["name"] == "label")
    assert label == {
        "name": "label",
        "needs": ["labels", "probs"],
        "default": True,
        "description": LabelCheck.description,
        "needs_any": False,
    }
    outlier = next(line for line in out if line.split()[0] == "outlier")
    assert outlier.split()[1] == "features|probs"  # either suffices
    assert next(r for r in rows if r["name"] == "near_duplicate")["needs_any"] is True
    assert main(["checks", "zzz*", "--format", "json"]) == 0 and json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checks", "label,nope"], "audit: error: --checks: no check named 'nope'; known checks: "),
        (["--checks", ","], "audit: error: --checks is empty; name at least one check"),
        (["--check-option", "label.bogus=1"], "the label check has no option 'bogus'"),
        (["--check-option", "label.weights=heavy"], "weights is 'heavy', expected one of"),
        (["--check-option", "weights=fit"], "--check-option 'weights=fit': expected NAME.OPTION=VALUE"),
    ],
)
def test_a_bad_check_selection_or_option_exits_2_before_anything_is_written(tmp_path, capsys, extra, message):
    from audit.cli import main

    ds = make_imagefolder(tmp_path / "ds", per_class=1)
    db = tmp_path / "w.duckdb"
    assert main(["run", str(ds), "--models", f"preds:{tmp_path / 'none.npy'}", "--db", str(db), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_audit_run_prints_one_line_per_check_and_issues_filters_by_check(workspace, tmp_path, capsys):
    import shutil

    from audit.cli import main

    ds, db0, _, _, models = workspace
    db = tmp_path / "w.duckdb"
    shutil.copyfile(db0, db)
    assert main(["run", str(ds.root), "--models", models, "--db", str(db), "-q", "--checks", "label"]) == 0
    err = capsys.readouterr().err
    assert f"audit: check label: {len(FLIP)} issue(s) among {len(ds)} assessed image(s)" in err.splitlines()
    assert main(["issues", "--db", str(db), "--format", "json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["issues", "--db", str(db), "--format", "json", "--check", "label"]) == 0
    assert json.loads(capsys.readouterr().out) == default
    assert sorted(r["image_index"] for r in default) == sorted(FLIP.tolist())
    assert main(["issues", "--db", str(db), "--check", "nope"]) == 2
    assert "no check named 'nope'; known checks: " in capsys.readouterr().err


def test_the_check_selection_of_a_workspace_carries_to_a_bare_rerun(workspace, tmp_path, capsys):
    import shutil

    from audit.cli import main
    from audit.store import connect

    ds, db0, _, _, models = workspace
    db = tmp_path / "w.duckdb"
    shutil.copyfile(db0, db)
    run = ["run", str(ds.root), "--models", models, "--db", str(db), "-q"]
    assert main([*run, "--checks", "label", "--check-option", "label.frac_flagged=0.5"]) == 0
    assert main(["run", "--db", str(db), "-q"]) == 0  # continue the workspace: same checks and options
    capsys.readouterr()
    with connect(db, read_only=True) as con:
        (params,) = con.execute("SELECT params FROM checks").fetchall()[0]
        n = con.execute("SELECT count(*) FILTER (WHERE is_issue) FROM issues").fetchall()[0][0]
    assert json.loads(params)["frac_flagged"] == 0.5 and n == len(ds) // 2


def test_the_issues_of_another_check_come_from_the_issues_table(workspace, tmp_path, monkeypatch):
    """A second check, registered for this test, lists through the generic path of `audit issues --check`."""
    import shutil

    import audit.checks
    from audit.datasets import load_dataset
    from audit.pipeline import run_audit
    from audit.queries import check_issues

    class Partner(Check):
        name = "partner"
        needs = frozenset({"labels"})
        suggests: ClassVar[str] = "image"

        def run(self, inputs: CheckInputs) -> CheckResult:
            score = np.ones(inputs.n)
            score[[2, 3]] = [0.1, 0.2]
            sug = np.full(inputs.n, -1)
            sug[[2, 3]] = [3, 2]
            info = [{"group": 0} if i in (2, 3) else None for i in range(inputs.n)]
            return CheckResult(self.name, score, score < 0.5, suggestion=sug, info=info)

    reg = CheckRegistry()
    for cls in (LabelCheck, Partner):
        reg.register(cls)
    monkeypatch.setattr(audit.checks, "default_checks", lambda: reg)
    ds, db0, _, specs, _ = workspace
    db = tmp_path / "w.duckdb"
    shutil.copyfile(db0, db)
    run_audit(load_dataset(ds.root), specs, db, progress=False, checks="label,partner")
    df = check_issues(db, "partner")
    ids = list(ds.image_ids)
    assert df["image_index"].tolist() == [2, 3] and df["suggested"].tolist() == [ids[3], ids[2]]
    assert df["score"].tolist() == [0.1, 0.2] and [json.loads(x) for x in df["info"]] == [{"group": 0}] * 2
    assert len(check_issues(db, "label")) == len(FLIP)
    with pytest.raises(CheckError):
        check_issues(db, "nope")
