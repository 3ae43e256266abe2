"""Benchmarks (``python -m audit.bench``): each command runs end to end on a tiny set and writes its report.

The figures themselves are measured by running the benchmarks (reports/PERF.md), never in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _synth import make_checkpoint, make_imagefolder

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return d, make_imagefolder(d / "ds", per_class=2), make_checkpoint(d / "m.pth")


@pytest.mark.parametrize("command", ["stages", "scoring", "features"])
def test_scoring_benchmarks_write_their_reports(tiny, command):
    d, root, model = tiny
    out = d / command
    args = ["--dataset", str(root), "--models", model, "--batch-size", "4", "--workers", "1", "--repeats", "1"]
    res = subprocess.run(
        [sys.executable, "-m", "audit.bench", command, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for suffix in (".md", ".csv", ".json"):
        assert out.with_suffix(suffix).stat().st_size > 0
    report = out.with_suffix(".md").read_text()
    assert "Machine:" in report
    want = {"stages": "forward-only ceiling", "scoring": "argmax agreement", "features": "scoring slowdown"}
    assert want[command] in report
    json.loads(out.with_suffix(".json").read_text())


def test_pixels_benchmark_renders_its_report_from_a_measured_run(tmp_path):
    # Its arms are the features benchmark's (audit_arm, pixels off/on), run end to end above; rendering the
    # committed measurement checks the report without two more scoring processes (90 s on 2 cores).
    from audit.bench.common import REPORTS
    from audit.bench.pixels import pixels

    raw = REPORTS / "perf_pixels.json"
    repeats = max(r["repeat"] for r in json.loads(raw.read_text())["runs"])
    out = tmp_path / "pixels"
    assert pixels(["--render", str(raw), "--repeats", str(repeats), "--limit", "200", "--out", str(out)]) == 0
    report = out.with_suffix(".md").read_text()
    assert "Machine:" in report and "slowdown with pixel statistics on" in report and "phash" in report
    assert json.loads(out.with_suffix(".json").read_text())["summary"]["images"] == 200


def test_heads_benchmark_writes_its_report_on_synthetic_and_given_features(tmp_path):
    import numpy as np

    out = tmp_path / "heads"
    res = subprocess.run(
        [sys.executable, "-m", "audit.bench", "heads", "--n", "300", "--dim", "8", "--models", "2", "--folds", "3",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows[0]["images"] == 300 and rows[0]["models"] == 2 and rows[0]["total_s"] > 0
    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.normal(size=(120, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 120))
    res = subprocess.run(
        [sys.executable, "-m", "audit.bench", "heads", "--features", str(tmp_path / "f.npy"), "--labels",
         str(tmp_path / "y.npy"), "--folds", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["data"] == "real"


def test_ray_benchmark_rewrites_only_its_own_section_of_perf_md(tmp_path):
    # The arms themselves need a Ray cluster and minutes (tests/test_ray_engine.py covers the engine): here the
    # report's placement, which must leave every other section of PERF.md as it was.
    from audit.bench.ray import update_perf

    perf = tmp_path / "PERF.md"
    before = "# Perf\n\n## 1. A\n\ntext a\n\n## Reproduce\n\n```bash\nx\n```\n"
    perf.write_text(before)
    update_perf(perf, "first table")
    text = perf.read_text()
    assert text.index("## 1. A") < text.index("first table") < text.index("## Reproduce")
    update_perf(perf, "second table")
    again = perf.read_text()
    assert "first table" not in again and again.count("second table") == 1
    assert again.replace("second table", "first table") == text  # replaced in place, nothing else moved


def test_a_ray_benchmark_arm_that_hangs_is_stopped_with_its_processes_and_reported(tmp_path):
    # The two-node arm once waited for ever on a task no node could fit: an arm now has a time limit, and what it
    # started (the Ray it brought up: here a grandchild) goes with it.
    import time

    from audit.bench.ray import ArmFailed, _alive, _group_alive, run_bounded

    pidfile = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{kid.pid}}')\n"
        "time.sleep(300)\n"
    )
    t = time.monotonic()
    with pytest.raises(ArmFailed, match=r"hang did not finish within 3 s \(--arm-timeout\) and was stopped"):
        run_bounded([sys.executable, "-c", code], 3, "hang")
    assert time.monotonic() - t < 30
    me, kid = (int(x) for x in pidfile.read_text().split())
    assert not _group_alive(me)
    assert not _alive(me) and not _alive(kid)  # gone, or a zombie its new parent has yet to reap
    with pytest.raises(ArmFailed, match=r"bad failed \(exit 3\):\n.*boom"):
        run_bounded([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, "bad")
    assert run_bounded([sys.executable, "-c", "print('fine')"], 30, "ok").strip() == "fine"
