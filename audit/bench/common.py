"""Shared pieces of the benchmarks: machine description, memory sampling, child runs, report files."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"
SHARED_SET = ROOT.parent / "shared" / "datasets" / "imagenet-val-1300"
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy as np
    import torch

    cpu = platform.processor() or ""
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f in have]
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "os": platform.platform(),
    }
    for mod in ("timm", "PIL", "openvino", "onnxruntime", "duckdb", "cleanlab"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except ImportError:
            info[mod] = None
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process (VmHWM) and of its largest finished child (getrusage), MiB.

    VmHWM, not getrusage's ru_maxrss, for this process: Linux carries ru_maxrss
    across fork and exec, so a child started by a big parent would report the
    parent's size as its own peak.
    """
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                me = int(line.split()[1]) / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(me, 1), "peak_child_rss_mib": round(kids, 1)}


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
                todo += [int(k) for k in kids]
        except OSError:
            continue
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory:
    """Samples the proportional set size (PSS) of a process and all its descendants.

    PSS splits shared pages between the processes sharing them, so the sum over
    the tree is the memory the whole job holds (forked loader workers included),
    without counting copy-on-write pages twice.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _tree(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)


def run_child(args: Sequence[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m audit.bench <args> --json OUT`` in a fresh process; return its JSON.

    A fresh process per measured arm keeps peak memory and warm caches of one
    arm out of the next.
    """
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        cmd = [sys.executable, "-m", "audit.bench", *args, "--json", str(out)]
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
        res = json.loads(out.read_text())
        res["process_wall_s"] = round(wall, 2)
        return res
    finally:
        out.unlink(missing_ok=True)


def add_run_args(p: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """The options every scoring benchmark shares: what to score, and how."""
    p.add_argument("--dataset", type=Path, default=SHARED_SET)
    p.add_argument("--models", default=",".join(LITE))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    if backend:
        p.add_argument("--backend", default="auto")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    # Model names and paths are the user's: spreadsheet-safe like every CSV audit writes.
    from audit._csvsafe import rows_to_csv

    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.write_bytes(rows_to_csv(keys, ([r.get(k) for k in keys] for r in rows)))


def md_table(rows: Sequence[dict[str, Any]], cols: Sequence[str] | None = None) -> str:
    if cols is None:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols]
    cols = list(cols)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def machine_md(info: dict[str, Any]) -> str:
    keys = ("cpu", "cpu_flags", "cores_available", "memory_gib", "gpu", "torch", "torch_threads", "openvino")
    keys += ("onnxruntime", "timm", "PIL", "load_average_at_start")
    return "Machine: " + "; ".join(f"{k} {info.get(k)}" for k in keys) + "."
