"""The Ray engine side by side: the local engine vs Ray on one node vs Ray on two "nodes", the same images.

* **local**: ``score_dataset`` on this machine (DataLoader workers, OpenVINO), as ``audit run`` does.
* **ray, 1 node**: ``--engine ray`` with no address: a Ray started for the run on this machine (all its CPUs).
* **ray, 2 nodes**: a head (``ray start --head --num-cpus 1``) and a second node
  (``ray start --address HEAD --num-cpus 1``) on this host, started before the arm and stopped after it
  (even when it fails); the arm connects with ``--ray-address``.

Each arm runs in a fresh process; wall times include building the models and, for Ray, starting or
reaching the cluster (also reported alone). Peak memory per process is its kernel high-water mark
(VmHWM, read every second) over the driver and every process of its Ray cluster, and the PSS summed
over them all is sampled every second. Each arm runs under ``--arm-timeout`` in its own process
group, and is stopped with all it started when it fails, times out or the bench is interrupted. The
table goes to ``reports/perf_ray.{md,csv,json}`` and into its own section of ``reports/PERF.md``.

The two-node cluster is stopped by killing exactly the processes it started (found by its own
``--temp-dir``), not by ``ray stop``, which stops every Ray on the machine, a test suite's included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import (
    REPORTS,
    ROOT,
    add_run_args,
    machine,
    machine_md,
    md_table,
    write_csv,
    write_json,
)

ARMS = ("local", "ray-1-node", "ray-2-nodes")
_SECTION = "9. Ray engine: local vs Ray on one node vs two nodes"
_BEGIN, _END = "<!-- audit.bench ray: begin -->", "<!-- audit.bench ray: end -->"


# --------------------------------------------------------------------------- processes and their memory


def _children(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            out += [int(k) for k in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    return out


def _tree(roots: list[int]) -> set[int]:
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += _children(p)
    return seen


def _marked(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a Ray cluster's own temp dir), this one left out."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    out.append(int(d))
    return out


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessPeaks:
    """Peak resident memory of each process of the run: this one, its descendants, and (``marker``) a cluster
    started elsewhere; plus the peak of their summed PSS (shared pages counted once)."""

    # Once a second: the sampler reads every process's smaps and, with a marker, every command line on the
    # machine; at 4 Hz that was a tenth of a core taken from the Ray arms (20-odd processes) more than from the
    # local arm (three). The per-process peak is the kernel's high-water mark, so it misses nothing in between.
    def __init__(self, marker: str | None = None, interval: float = 1.0):
        self.marker, self.interval = marker, interval
        self.peak: dict[int, int] = {}  # pid -> peak resident set (VmHWM), KiB
        self.titles: dict[int, set[str]] = {}
        self.total_pss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            roots = [os.getpid(), *(_marked(self.marker) if self.marker else [])]
            pids = _tree(roots)
            pss = 0
            for p in pids:
                rss = _status_kib(p, "VmHWM:")
                if rss:
                    self.peak[p] = max(self.peak.get(p, 0), rss)
                    self.titles.setdefault(p, set()).add(_title(p)[:200])
                    pss += _pss_kib(p)
            self.total_pss_kib = max(self.total_pss_kib, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Per kind of process: how many, the largest peak RSS (MiB); the driver's; the total peak PSS."""
        kinds: dict[str, list[int]] = {}
        me = os.getpid()
        mine = self.titles.get(me, set())
        for p, kib in self.peak.items():
            t = " ".join(self.titles.get(p, ()))
            if p == me:
                kind = "driver"
            elif self.titles.get(p, set()) <= mine:
                kind = "loader worker"  # forked by the driver (the DataLoader's): its command line is the driver's
            elif "_Forward" in t:
                kind = "model actor"
            elif "ray::" in t:
                kind = "ray task worker"  # the decode tasks (and idle workers Ray keeps ready)
            elif any(x in t for x in ("gcs_server", "raylet", "dashboard", "monitor.py", "log_monitor", "agent")):
                kind = "ray system"
            else:
                kind = "other"
            kinds.setdefault(kind, []).append(kib)
        out: dict[str, Any] = {"peak_total_pss_mib": round(self.total_pss_kib / 1024, 1)}
        for kind, vals in sorted(kinds.items()):
            out[kind] = {"processes": len(vals), "max_peak_rss_mib": round(max(vals) / 1024, 1),
                         "sum_peak_rss_mib": round(sum(vals) / 1024, 1)}  # fmt: skip
        return out


# --------------------------------------------------------------------------- the two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else "ray"


def _bench_env() -> dict[str, str]:
    # 'ray start --head' turns token authentication on; the second node and the driver say they use it.
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def stop_cluster(marker: str, grace: float = 10.0) -> int:
    """Stop exactly the processes of the cluster whose temp dir is ``marker``, and theirs; how many there were."""
    pids = _tree(_marked(marker))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def two_nodes(cpus: int = 1) -> Iterator[tuple[str, str]]:
    """A head and a second node on this host, ``cpus`` CPUs each; yields (address, temp dir); always stopped."""
    tmp = tempfile.mkdtemp(prefix="audit-ray-bench-")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", str(cpus), "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [_ray_cli(), "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", tmp]
    worker = [_ray_cli(), "start", "--address", address]
    try:
        for cmd in ([*head, *common], [*worker, *common]):
            res = subprocess.run(cmd, env=_bench_env(), capture_output=True, text=True, timeout=180)
            if res.returncode != 0:
                tail = (res.stdout + res.stderr)[-3000:]
                raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{tail}")
        yield address, tmp
    finally:
        stop_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- running an arm, bounded


class ArmFailed(RuntimeError):
    """An arm that failed or ran past its time limit; its processes have been stopped."""


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the arm's whole process group: the driver and the Ray it started (Ray's processes stay in it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM and not _group_alive(proc.pid):
                return
    proc.wait()


def _group_alive(pgid: int) -> bool:
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
    return False


def run_arm(args: list[str], timeout: float) -> dict[str, Any]:
    """``python -m audit.bench <args> --json OUT`` in a fresh process (:func:`run_bounded`); its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        t = time.perf_counter()
        run_bounded([sys.executable, "-m", "audit.bench", *args, "--json", str(out)], timeout, args[1])
        res = json.loads(out.read_text())
        res["process_wall_s"] = round(time.perf_counter() - t, 2)
        return res
    finally:
        out.unlink(missing_ok=True)


def run_bounded(cmd: list[str], timeout: float, name: str) -> str:
    """Run ``cmd`` in its own process group for at most ``timeout`` seconds; its output.

    Whatever ends it (done, failed, timed out, this process interrupted), nothing of its group is left running:
    a Ray that an arm started stays in the arm's group.

    Raises
    ------
    ArmFailed
        It exited non-zero (its output's tail in the message) or ran past ``timeout``.
    """
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise ArmFailed(
                f"{name} did not finish within {timeout:g} s (--arm-timeout) and was stopped; rerun it alone and "
                "look at 'ray status' for pending tasks or actors"
            ) from None
        if proc.returncode != 0:
            raise ArmFailed(f"{name} failed (exit {proc.returncode}):\n{(stdout or '')[-4000:]}")
        return stdout
    finally:
        if proc.poll() is None or _group_alive(proc.pid):  # interrupted, or something of it outlived it
            _stop_group(proc)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI job cancelled, a terminal closed) unwind like Ctrl-C: the arms' and the two-node
    cluster's clean-ups run instead of the process vanishing and leaving them behind."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)


# --------------------------------------------------------------------------- one arm (in a child process)


def ray_arm(
    kind: str,
    dataset: Path,
    models: list[str],
    batch_size: int,
    workers: int,
    limit: int | None,
    address: str | None,
    marker: str | None,
    save_probs: Path,
) -> dict[str, Any]:
    """Score ``dataset`` into a fresh folder with one engine; time, memory, and the probabilities for comparison."""
    from audit.config import ScoringConfig
    from audit.datasets import load_dataset
    from audit.scoring import ScoreStats, load_models, ray_engine, score_dataset
    from audit.zoo import resolve_model

    out: dict[str, Any] = {"arm": kind}
    with tempfile.TemporaryDirectory() as tmp, ProcessPeaks(marker) as mem:
        t0 = time.perf_counter()
        ds = load_dataset(dataset, limit=limit)
        specs = [resolve_model(m) for m in models]
        st = ScoreStats()
        kw: dict[str, Any] = {"batch_size": batch_size, "workers": workers, "progress": False, "stats": st}
        if kind == "local":
            arrays = score_dataset(ds, specs, Path(tmp) / "arrays", models=load_models(specs), **kw)
            out["connect_s"] = 0.0
        else:
            cfg = ScoringConfig(engine="ray", ray_address=address)
            t = time.perf_counter()
            with ray_engine.connect(cfg, specs, [ds]) as engine:
                out["connect_s"] = time.perf_counter() - t
                out["nodes"] = engine.nodes
                out["sizing"] = engine.sizing(len(specs)).__dict__
                arrays = score_dataset(ds, specs, Path(tmp) / "arrays", engine=engine, **kw)
        out["wall_s"] = time.perf_counter() - t0
        save_probs.mkdir(parents=True, exist_ok=True)
        for name, a in zip(models, arrays, strict=True):
            np.save(save_probs / f"{name}.npy", np.load(a.probs))
        out["images"] = len(ds)
        out["stats"] = st.as_dict()
    out["memory"] = mem.summary()
    return out


# --------------------------------------------------------------------------- side by side


def _agreement(ref: Path, got: Path, models: list[str]) -> tuple[float, float]:
    """Lowest argmax agreement and largest |probability difference| over the models, against the local arm."""
    agree, diff = 1.0, 0.0
    for m in models:
        a, b = np.load(ref / f"{m}.npy"), np.load(got / f"{m}.npy")
        ok = ~(np.isnan(a).any(1) | np.isnan(b).any(1))
        agree = min(agree, float((a[ok].argmax(1) == b[ok].argmax(1)).mean()))
        diff = max(diff, float(np.abs(a[ok] - b[ok]).max()) if ok.any() else 0.0)
    return agree, diff


def _mem(res: dict[str, Any], kind: str) -> float | str:
    m = res["memory"].get(kind)
    return m["max_peak_rss_mib"] if m else "-"


def update_perf(path: Path, body: str) -> None:
    """Put ``body`` in PERF.md's own section for this benchmark (replaced in place; else before "## Reproduce")."""
    text = path.read_text() if path.exists() else ""
    block = f"{_BEGIN}\n## {_SECTION}\n\n{body.rstrip()}\n{_END}\n"
    if _BEGIN in text and _END in text:
        head, rest = text.split(_BEGIN, 1)
        tail = rest.split(_END, 1)[1]
        text = head + block + (tail[1:] if tail.startswith("\n") else tail)  # the block ends with that newline
    elif "\n## Reproduce" in text:
        head, rest = text.split("\n## Reproduce", 1)
        text = head.rstrip("\n") + "\n\n" + block + "\n## Reproduce" + rest
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def ray(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench ray", description=__doc__.split("\n\n")[0])
    add_run_args(p, backend=False)
    p.add_argument("--limit", type=int, help="score only this many images (evenly spaced)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three arms (their order alternates)")
    p.add_argument("--out", type=Path, default=REPORTS / "perf_ray")
    p.add_argument("--perf", type=Path, default=REPORTS / "PERF.md", help="the report whose Ray section is rewritten")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument(
        "--arm-timeout", type=float, default=1200.0,
        help="seconds one arm may run before it is stopped and reported as failed (default 1200)",
    )  # fmt: skip
    a = p.parse_args(argv)
    from audit.scoring.ray_engine import ray_installed

    if not ray_installed():
        print("skipped: Ray is not installed (pip install -e '.[ray]')")
        return 0
    if not a.dataset.is_dir():
        print(f"skipped: {a.dataset} not found (the shared 1,300-image set lives in ../shared)")
        return 0
    arms = [x for x in a.arms.split(",") if x]
    if "local" not in arms or any(x not in ARMS for x in arms):
        p.error(f"--arms must include local and name only {', '.join(ARMS)}")
    models = [m for m in a.models.split(",") if m]
    info = machine()
    common = ["--dataset", str(a.dataset), "--models", a.models, "--batch-size", str(a.batch_size)]
    common += ["--workers", str(a.workers)] + (["--limit", str(a.limit)] if a.limit else [])
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, _terminate_as_interrupt():
        for r in range(a.repeats):
            order = arms if r % 2 == 0 else [arms[0], *reversed(arms[1:])]
            for arm in order:
                probs = Path(tmp) / f"{arm}-{r}"
                print(f"repeat {r + 1}/{a.repeats}: {arm} ...", flush=True)
                args = ["ray-arm", arm, *common, "--save-probs", str(probs)]
                try:
                    if arm == "ray-2-nodes":
                        with two_nodes(1) as (address, marker):
                            res = run_arm([*args, "--address", address, "--marker", marker], a.arm_timeout)
                    else:
                        res = run_arm(args, a.arm_timeout)
                except RuntimeError as e:  # ArmFailed, or the two-node cluster did not start
                    # One arm's failure is reported and the others still run; PERF.md is left as it was.
                    why = str(e).strip()
                    print(f"  FAILED: {why.splitlines()[0]}", flush=True)
                    failures.append({"repeat": r + 1, "arm": arm, "error": why[-4000:]})
                    continue
                res["repeat"], res["probs"] = r + 1, str(probs)
                runs.append(res)
                print(f"  {res['wall_s']:.1f} s", flush=True)
        rows = []
        for res in runs:
            local = next((x for x in runs if x["arm"] == "local" and x["repeat"] == res["repeat"]), None)
            if local is None:
                continue  # nothing to compare it with
            agree, diff = _agreement(Path(local["probs"]), Path(res["probs"]), models)
            n = res["images"]
            rows.append({
                "repeat": res["repeat"],
                "arm": res["arm"],
                "nodes": res.get("nodes", 1),
                "wall s": round(res["wall_s"], 1),
                "of which connect s": round(res["connect_s"], 1),
                "img/s": round(n / res["wall_s"], 2),
                "vs local": f"{(res['wall_s'] / local['wall_s'] - 1) * 100:+.1f}%" if res is not local else "-",
                "driver peak RSS MiB": _mem(res, "driver"),
                "largest model actor MiB": _mem(res, "model actor"),
                "largest loader / task worker MiB": (
                    _mem(res, "loader worker") if res["arm"] == "local" else _mem(res, "ray task worker")
                ),
                "Ray system processes MiB (sum)": (res["memory"].get("ray system") or {}).get("sum_peak_rss_mib", "-"),
                "all processes peak PSS MiB": res["memory"]["peak_total_pss_mib"],
                "argmax agreement": round(agree, 5),
                "max abs prob diff": f"{diff:.1e}",
            })  # fmt: skip
    for res in runs:
        res.pop("probs", None)
    one = [r for r in rows if r["arm"] == "ray-1-node"]
    overhead = float(np.median([float(r["vs local"].rstrip("%")) for r in one])) if one else None
    n = runs[0]["images"] if runs else 0
    summary = {"images": n, "models": models, "batch_size": a.batch_size, "workers": a.workers,
               "median_overhead_ray_1_node_pct": overhead, "machine": info}  # fmt: skip
    write_json(a.out.with_suffix(".json"), {"summary": summary, "rows": rows, "runs": runs, "failures": failures})
    write_csv(a.out.with_suffix(".csv"), rows)
    goal = "" if overhead is None else (
        f"**Ray on one node: median {overhead:+.1f}% wall time vs the local engine (goal: at most +25%"
        f"{', met' if overhead <= 25 else ', not met'}).** "
    )  # fmt: skip
    body = "\n".join([
        f"Generated by `python -m audit.bench ray{' --limit ' + str(a.limit) if a.limit else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        f"{n} images of `{a.dataset.name}`, models {', '.join(models)}, batch {a.batch_size}, OpenVINO fp32 on every "
        f"arm. local: `score_dataset` with {a.workers} loader workers. ray-1-node: `--engine ray` with no address "
        "(a Ray started for the run with this machine's CPUs). ray-2-nodes: a head and a second `ray start "
        "--address` on this host, 1 CPU each, `--ray-address` to the head. Each arm in a fresh process; wall time "
        "includes building the models and starting or reaching Ray (the connect column). Memory: peak resident set "
        "per process (the largest of each kind), and the peak of the PSS summed over every process of the arm.",
        "",
        md_table(rows),
        "",
        goal + "Argmax agreement and the largest probability difference are against the local arm of the same "
        "repeat. Raw: `reports/perf_ray.json`.",
    ])  # fmt: skip
    if failures:
        body += "\n\n**Failed arms** (not in the table):\n\n" + "\n".join(
            f"- repeat {f['repeat']}, {f['arm']}: {f['error'].splitlines()[0]}" for f in failures
        )
    md = f"# Ray engine: local vs one node vs two nodes\n\n{body}\n"
    a.out.with_suffix(".md").write_text(md)
    print(md)
    if failures or set(arms) != set(ARMS):
        # PERF.md holds the whole comparison or nothing: a partial table there would read as the result.
        print(f"{a.perf} left as it was: " + ("some arms failed" if failures else f"only {', '.join(arms)} ran"))
        return 1 if failures else 0
    update_perf(a.perf, body)
    return 0


def arm(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench ray-arm")
    p.add_argument("kind", choices=ARMS)
    add_run_args(p, backend=False)
    p.add_argument("--limit", type=int)
    p.add_argument("--address")
    p.add_argument("--marker", help="the cluster's temp dir: its processes are sampled for memory")
    p.add_argument("--save-probs", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    if a.address:
        os.environ.update({k: v for k, v in _bench_env().items() if k.startswith("RAY_")})
    res = ray_arm(
        a.kind, a.dataset, [m for m in a.models.split(",") if m], a.batch_size, a.workers, a.limit, a.address,
        a.marker, a.save_probs,
    )  # fmt: skip
    res["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(ray(sys.argv[1:]))
