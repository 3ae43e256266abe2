"""``audit run --engine ray``: the same shards and results as the local engine, on a local Ray cluster.

The tests marked ``ray`` start one local cluster for the module (``ray.init(num_cpus=2)``) and are skipped where
Ray is not installed (``pip install -e '.[ray]'``); the rest check what needs no cluster (a missing Ray, the
sizing rules, the node comparison).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder

from audit.config import ScoringConfig
from audit.datasets import load_dataset
from audit.errors import ClusterError, OptionError
from audit.scoring import ScoreStats, load_pixel_stats, model_key, score_dataset
from audit.scoring.ray_engine import compare_reports, plan_sizing
from audit.zoo import resolve_model

ROOT = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = [pytest.mark.ray, pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install -e '.[ray]'")]
KW = {"batch_size": 4, "workers": 0, "shard_size": 8, "progress": False, "backend": "torch"}
# The graph path (the driver exports, the actors compile): the CPU default; its actors start without timm or a build.
KW_GRAPH = {**KW, "backend": "onnxruntime"}
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _ray(f):
    for mark in needs_ray:
        f = mark(f)
    return f


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: the engine uses the Ray this process already has."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """24 small images (one of them unreadable) and a random-weights checkpoint, scored by the local engine
    with torch (``local``) and, for the tests of the graph path, with ONNX Runtime (``graph``: None without it)."""
    d = tmp_path_factory.mktemp("raysynth")
    root = make_imagefolder(d / "ds", per_class=6, size=(56, 44))
    broken = sorted((root / "val").rglob("*.JPEG"))[5]
    broken.write_bytes(b"not a jpeg")
    model = make_checkpoint(d / "mnv3.pth")
    ds = load_dataset(root)
    (local,) = score_dataset(ds, [resolve_model(model)], d / "local", **KW)
    graph = score_dataset(ds, [resolve_model(model)], d / "graph", **KW_GRAPH)[0] if HAVE_ORT else None
    return d, root, model, local, graph


def _graph_kw(synth):
    """The graph backend's scoring options and local reference, or the torch ones where ONNX Runtime is absent."""
    return (KW_GRAPH, synth[4]) if synth[4] is not None else (KW, synth[3])


@contextlib.contextmanager
def _engine(**kw):
    from audit.scoring import ray_engine

    cfg = ScoringConfig(engine="ray", **{"backend": "torch", **kw})
    with ray_engine.connect(cfg, [], []) as engine:
        yield engine


def _same_arrays(a, b, *, exact_features: bool = True) -> None:
    la, lb = np.load(a.logits), np.load(b.logits)
    assert la.shape == lb.shape and np.array_equal(np.isnan(la), np.isnan(lb))
    ok = ~np.isnan(la).any(axis=1)
    # Eager torch on 1 thread (the actor) vs the driver's threads: float rounding may differ, the results not.
    np.testing.assert_allclose(lb[ok], la[ok], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(np.load(b.probs)[ok], np.load(a.probs)[ok], rtol=0, atol=1e-6)
    if exact_features:
        np.testing.assert_allclose(
            np.load(b.features)[ok].astype(np.float32), np.load(a.features)[ok].astype(np.float32), rtol=2e-3
        )
    assert a.bad == b.bad


# --------------------------------------------------------------------------- no cluster needed


def test_without_ray_the_engine_says_in_one_line_how_to_install_it(tmp_path):
    root = make_imagefolder(tmp_path / "ds", per_class=1)
    # Ray made unimportable in the child: what a machine without the extra sees.
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['ray.data'] = None\n"
        "from audit.cli import main\n"
        f"sys.exit(main(['run', {str(root)!r}, '--db', {str(tmp_path / 'w.duckdb')!r}, '--engine', 'ray', "
        "'--models', 'squeezenet1_1', '-q']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    line = _one_error(res)
    assert "pip install -e '.[ray]'" in line and "--engine ray" in line
    assert not (tmp_path / "w.duckdb").exists()


def test_ray_options_without_the_ray_engine_are_refused():
    with pytest.raises(OptionError, match="--ray-actors applies to the Ray engine only"):
        ScoringConfig(ray_actors=2)
    with pytest.raises(OptionError, match="--engine 'spark'"):
        ScoringConfig(engine="spark")


def test_sizing_shares_the_gpus_and_cpus_and_refuses_what_does_not_fit():
    # The README's worked example: 4 models on 8 GPUs -> 2 actors each, one GPU and one CPU apiece.
    s = plan_sizing(4, [64], [8], "cuda")
    assert (s.actors, s.gpus, s.cpus, s.decode_cpus) == (2, 1.0, 1.0, 1.0)
    assert plan_sizing(4, [64], [8], "cuda", gpus=0.5).actors == 4
    with pytest.raises(ClusterError, match=r"need 12 GPUs but the Ray cluster has 8; pass --ray-gpus-per-actor 0\.66"):
        plan_sizing(4, [64], [8], "cuda", actors=3)
    # CPUs only: one decode task's CPU kept free, the rest shared by the actors, at most 1 each.
    s = plan_sizing(3, [2], [0], "cpu")
    assert (s.actors, s.cpus, s.gpus, s.threads, s.decode_cpus) == (1, 0.33, 0.0, 1, 1.0)
    assert plan_sizing(2, [16], [0], "cpu").cpus == 1.0
    assert plan_sizing(2, [16], [0], "cpu", cpus=4).threads == 4
    with pytest.raises(ClusterError, match=r"pass --ray-cpus-per-actor 0\.33"):
        plan_sizing(3, [2], [0], "cpu", cpus=1)
    assert plan_sizing(0, [1], [0], "cpu").actors == 0  # decode-only: no actor


def _worst_free(node_cpus, k, c):
    """The largest CPU left free on any node, minimised over every way Ray could place k actors of c CPUs."""
    best = None

    def place(i, free):
        nonlocal best
        if i == k:
            best = max(free) if best is None else min(best, max(free))
            return
        for j, f in enumerate(free):
            if f >= c - 1e-9:
                place(i + 1, [*free[:j], f - c, *free[j + 1 :]])

    place(0, list(node_cpus))
    return best


@pytest.mark.parametrize(
    "nodes", [[1, 1], [1, 1, 1], [2, 2], [1], [2], [4, 1], [8, 8, 8, 8], [1.5, 1.5], [3, 1, 1]]
)
@pytest.mark.parametrize("n_models", [1, 2, 3, 4])
def test_sizing_leaves_a_decode_task_room_on_some_node_wherever_ray_places_the_actors(nodes, n_models):
    """Checked per node, not in total: on two 1-CPU nodes three 0.33-CPU actors and a 1-CPU decode task fit the
    cluster's 2 CPUs but not its nodes (0.66 + 0.33 used leaves no node a whole CPU); that run waited for ever."""
    s = plan_sizing(n_models, nodes, [0] * len(nodes), "cpu")
    k = n_models * s.actors
    worst = _worst_free(nodes, k, s.cpus)
    assert worst is not None, "the actors themselves do not fit the nodes"
    assert worst >= s.decode_cpus - 1e-9, (s, worst)
    assert 0 < s.decode_cpus <= 1 and 0 < s.cpus <= 1


def test_sizing_refuses_what_fits_the_cluster_in_total_but_not_its_nodes():
    s = plan_sizing(3, [1, 1], [0, 0], "cpu")
    assert (s.cpus, s.decode_cpus) == (0.33, 0.5)
    # 0.6-CPU actors: 1.8 of the 2 CPUs, but one per 1-CPU node; the message says what to pass.
    with pytest.raises(ClusterError, match=r"plus 1 to decode need 2\.8 CPUs .* pass --ray-cpus-per-actor 0\.33"):
        plan_sizing(3, [1, 1], [0, 0], "cpu", cpus=0.6)
    # An actor larger than any node: 1.2 of 4 CPUs fits the total, not a 1-CPU node.
    with pytest.raises(ClusterError, match=r"1 model actor\(s\) of 1\.2 CPU each fit only 0 at a time .* 1, 1, 1, 1"):
        plan_sizing(1, [1, 1, 1, 1], [0] * 4, "cpu", cpus=1.2)
    # GPUs: two 1-GPU nodes hold two 0.6-GPU actors, not three, although 1.8 <= 2 GPUs.
    with pytest.raises(ClusterError, match=r"fit only 2 at a time .*--ray-gpus-per-actor"):
        plan_sizing(3, [8, 8], [1, 1], "cuda", gpus=0.6)
    with pytest.raises(ClusterError, match=r"no CPU to decode images on"):
        plan_sizing(1, [0], [1], "cuda")


def test_a_node_that_does_not_see_the_images_or_the_checkpoint_is_named_in_one_line():
    stamps = np.array([[10, 1], [20, 2], [30, 3]], dtype=np.int64)
    ids, good = ["a.jpg", "b.jpg", "c.jpg"], {"host": "h", "root": True, "stamps": [[10, 1], [30, 3]]}
    compare_reports({"n1": {**good, "weights": {"/w.pth": "ab"}}}, "/data", ids, [0, 2], stamps, {"/w.pth": "ab"})
    cases = [
        ({**good, "root": False, "weights": {}}, {}, "cannot see the images folder /data"),
        ({**good, "stamps": [[10, 1], [31, 3]], "weights": {}}, {}, "sees another version of image 'c.jpg'"),
        ({**good, "stamps": [[10, 1], None], "weights": {}}, {}, "cannot read image 'c.jpg'"),
        ({**good, "weights": {"/w.pth": None}}, {"/w.pth": "ab"}, "cannot read the checkpoint /w.pth"),
        ({**good, "weights": {"/w.pth": "cd"}}, {"/w.pth": "ab"}, "has another file at the checkpoint /w.pth"),
    ]
    for report, weights, want in cases:
        with pytest.raises(ClusterError, match=want) as e:
            compare_reports({"n1": good | {"weights": weights}, "n2": report}, "/data", ids, [0, 2], stamps, weights)
        assert "node n2 (h)" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the CLI's one-line errors


def _one_error(res: subprocess.CompletedProcess) -> str:
    """The run's one error line (exit 2, no traceback); audit's own info lines may come before it."""
    errors = [x for x in res.stderr.splitlines() if x.startswith("audit: error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == errors[0], res.stderr[-3000:]
    return errors[0]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audit.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _cli_all(*commands: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Several ``audit`` commands at once, each in its own process; their results in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "audit.cli", *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        for c in commands
    ]
    out = []
    try:
        for c, p in zip(commands, procs, strict=True):
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@_ray
def test_a_bad_or_unreachable_ray_address_is_one_line_and_exit_2_within_seconds(tmp_path, monkeypatch):
    from audit.scoring import ray_engine

    with pytest.raises(OptionError, match="--ray-address 'not an address' is not a Ray address"):
        ScoringConfig(engine="ray", ray_address="not an address")
    root = make_imagefolder(tmp_path / "ds", per_class=1)
    db = tmp_path / "w.duckdb"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    res = _cli("run", str(root), "--db", str(db), "--engine", "ray", "--models", "squeezenet1_1", "-q",
               "--ray-address", f"127.0.0.1:{port}")  # fmt: skip
    line = _one_error(res)
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in line and "ray start --head" in line
    assert time.monotonic() - t < 90 and not db.exists()
    # A port that accepts and never answers: Ray's client would retry for minutes; the probe gives up in 3 s.
    monkeypatch.setenv("AUDIT_RAY_CONNECT_TIMEOUT", "3")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        t = time.monotonic()
        with pytest.raises(ClusterError, match=r"cannot reach a Ray cluster at .*\(no answer within 3 s\)"):
            ray_engine._probe(f"127.0.0.1:{srv.getsockname()[1]}", ray_engine._connect_timeout())
    assert time.monotonic() - t < 30


# --------------------------------------------------------------------------- same shards, resume, faults


@_ray
def test_ray_writes_the_local_engines_shards_and_each_engine_resumes_the_other(cluster, synth, tmp_path):
    d, root, model, local, _ = synth
    ds, spec = load_dataset(root), resolve_model(model)
    with _engine() as engine:
        assert engine.device == "cpu" and engine.nodes == 1
        st = ScoreStats()
        (got,) = score_dataset(ds, [spec], tmp_path / "ray", engine=engine, stats=st, **KW)
        assert st.images == len(ds) and st.batches == 6 and sum(st.forward.values()) > 0
        _same_arrays(local, got)
        assert len(got.bad) == 1 and "UnidentifiedImageError" in next(iter(got.bad.values()))
        # The pixel statistics and hashes of the decode pass: the local engine's, value for value.
        px_local, px_ray = load_pixel_stats(ds, d / "local"), load_pixel_stats(ds, tmp_path / "ray")
        assert px_local is not None and px_ray is not None
        for k in px_local:
            np.testing.assert_array_equal(px_ray[k], px_local[k], err_msg=k)
        names = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(d / "local") for p in (d / "local").rglob("*") if p.is_file())
        # The same fingerprints: a local workspace resumes on Ray with nothing to score...
        st = ScoreStats()
        score_dataset(ds, [spec], d / "local", engine=engine, stats=st, **KW)
        assert st.images == 0
        # ...and one image changed in place costs its batch, on Ray as locally.
        img = sorted((root / "val").rglob("*.JPEG"))[13]
        os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
        st = ScoreStats()
        (again,) = score_dataset(load_dataset(root), [spec], tmp_path / "ray", engine=engine, stats=st, **KW)
        assert st.images == KW["batch_size"]
        _same_arrays(local, again)


@_ray
def test_an_interrupted_ray_run_resumes_without_recomputing_finished_shards(cluster, synth, tmp_path, monkeypatch):
    import audit.scoring as scoring

    _, root, model, *_ = synth
    kw, local = _graph_kw(synth)
    ds, spec = load_dataset(root), resolve_model(model)
    real, written = scoring._write_pixel_shard, []

    def interrupt_after_two(*a, **k):
        real(*a, **k)  # a shard's pixel statistics: written after its models' shards
        written.append(a[2])
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C between two shards
    monkeypatch.setattr(scoring, "_write_pixel_shard", interrupt_after_two)
    with _engine(backend=kw["backend"]) as engine:
        with pytest.raises(KeyboardInterrupt):
            score_dataset(ds, [spec], tmp_path / "arr", engine=engine, **kw)
        monkeypatch.setattr(scoring, "_write_pixel_shard", real)
        done = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "arr" / "shards").rglob("*.npz")}
        assert len(done) == 2
        st = ScoreStats()
        (got,) = score_dataset(ds, [spec], tmp_path / "arr", engine=engine, stats=st, **kw)
    assert st.images == len(ds) - 2 * kw["shard_size"]  # the two finished shards are not scored again
    after = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "arr" / "shards").rglob("*.npz")}
    assert len(after) == 3 and all(after[p] == s for p, s in done.items())
    _same_arrays(local, got)


def _actor_pids() -> list[int]:
    """The model actors' processes: Ray titles them after the class they run."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if b"_Forward" in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
    return out


@_ray
def test_a_model_actor_killed_mid_run_is_restarted_and_the_run_completes(cluster, synth, tmp_path, monkeypatch):
    import audit.scoring as scoring

    _, root, model, *_ = synth
    kw, local = _graph_kw(synth)
    ds, spec = load_dataset(root), resolve_model(model)
    real_add, seen = scoring._Collector.add, {}

    def add_and_kill_first(self, *a, **k):
        if not seen:  # the first batch is back: its actor dies with SIGKILL, the rest must still come
            (pid,) = _actor_pids()
            # Decoding runs in its own tasks, not fused into this pool (one actor: decoding one batch at a time).
            assert b"_decode" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            os.kill(pid, signal.SIGKILL)
            seen["killed"] = pid
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not [p for p in _actor_pids() if p != pid]:
                time.sleep(0.1)
            seen["restarted"] = [p for p in _actor_pids() if p != pid]
        return real_add(self, *a, **k)

    monkeypatch.setattr(scoring._Collector, "add", add_and_kill_first)
    with _engine(backend=kw["backend"]) as engine:
        st = ScoreStats()
        (got,) = score_dataset(ds, [spec], tmp_path / "arr", engine=engine, stats=st, **{**kw, "batch_size": 1})
    assert seen["restarted"], "Ray did not restart the killed actor"
    assert st.images == len(ds) and st.batches == len(ds)  # every batch taken once
    np.testing.assert_allclose(np.load(got.logits)[~np.isnan(np.load(got.logits)).any(1)],
                               np.load(local.logits)[~np.isnan(np.load(local.logits)).any(1)], rtol=1e-4, atol=1e-12)


# --------------------------------------------------------------------------- real images and weights


def _quiet(stderr: str) -> None:
    """Nothing on stderr but audit's own lines and its progress bar: no Ray log line, no Ray progress bar."""
    noise = [x for x in stderr.splitlines() if x.strip() and not x.startswith(("audit:", "scoring", "\r"))]
    assert not noise, noise[:5]


def _compare_runs(ray, shared_dir: Path, tmp_path: Path, models: tuple[str, ...], limit: int) -> None:
    """``audit run`` locally and ``audit run --engine ray`` on the module's cluster: same argmax, probabilities
    within 1e-5, the same flags of every check and byte-identical exports."""
    from audit.store import arrays_dir, connect

    data = shared_dir / "datasets" / "imagenet-val-1300"
    if not data.is_dir():
        pytest.skip(f"{data} is absent")
    base = ["run", str(data), "--limit", str(limit), "--models", ",".join(models), "--format", "json"]
    local, ray_db = tmp_path / "local.duckdb", tmp_path / "ray.duckdb"
    address = ray.get_runtime_context().gcs_address
    # Both runs at once (OpenVINO runs in their processes, never in pytest): each waits on its own start-up
    # (imports, Ray's actors) part of the time, so together they take less than one after the other; neither
    # engine's results depend on the CPU left to it.
    res_local, res = _cli_all(
        [*base, "-q", "--db", str(local)],
        [*base, "--db", str(ray_db), "--engine", "ray", "--ray-address", address],
        timeout=900,
    )
    assert res_local.returncode == 0, res_local.stderr[-3000:]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on Ray" in res.stderr  # its progress bar
    _quiet(res.stderr)
    for m in models:
        key = arrays_dir(local) / f"{model_key(resolve_model(m).name)}.probs.npy"
        pa, pb = np.load(key), np.load(arrays_dir(ray_db) / key.name)
        assert (pa.argmax(1) == pb.argmax(1)).all(), m
        assert np.abs(pa - pb).max() <= 1e-5, m
        fa = arrays_dir(local) / key.name.replace(".probs.", ".features.")
        np.testing.assert_allclose(np.load(arrays_dir(ray_db) / fa.name).astype(np.float32),
                                   np.load(fa).astype(np.float32), rtol=2e-3, atol=2e-3)  # fmt: skip
    flags = {
        "issues": 'SELECT "check", image_index, is_issue, suggestion FROM issues ORDER BY 1, 2',
        "label_issues": "SELECT image_index, is_label_issue, suggested_label, issue_kind, rank FROM label_issues "
        "ORDER BY image_index",
        "bad_images": "SELECT image_index, reason FROM bad_images ORDER BY image_index",
    }
    with connect(local, read_only=True) as a, connect(ray_db, read_only=True) as b:
        for name, q in flags.items():
            assert a.execute(q).fetchall() == b.execute(q).fetchall(), name
    dirs = {db: tmp_path / f"export-{db.stem}" for db in (local, ray_db)}
    done = _cli_all(*(["export", "--db", str(db), "--out", str(out)] for db, out in dirs.items()), timeout=300)
    assert all(r.returncode == 0 for r in done), [r.stderr[-2000:] for r in done]
    outs = [{p.name: p.read_bytes() for p in sorted(out.iterdir())} for out in dirs.values()]
    assert outs[0] == outs[1] and outs[0]


@_ray
def test_ray_and_local_agree_on_shared_images_with_the_three_lite_models(cluster, shared_dir, tmp_path):
    """The issue's comparison, in CI: 100 shared images, the three EfficientNet-Lite models, OpenVINO on both."""
    _compare_runs(cluster, shared_dir, tmp_path, LITE, 100)
