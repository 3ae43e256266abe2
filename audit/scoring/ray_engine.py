"""Scoring on a Ray cluster (``audit run --engine ray``): the local engine's batches, run by Ray Data.

What runs where, for N images and M models:

1. **Driver** (the machine running ``audit run``): plans the work exactly as
   the local engine does (:func:`audit.scoring.score_dataset`: which shards and
   batches are missing, damaged or stale) and makes one Ray Dataset row per
   batch still to do (its first index, its image ids, whether a model needs
   its crops, whether its pixels are measured, which models score it).
2. **Decode** (Ray Data ``map_batches`` tasks, one CPU each, or half the
   average node on nodes under 2 CPUs, as many as the cluster's CPUs allow,
   never fused into an actor pool): each row's images are read and decoded
   once and resized and cropped for every model by
   :func:`audit.scoring.loader.load_batch`, the local loader's own code; pixel
   statistics are measured from the same decode.
3. **Forward** (one actor pool per model: ``map_batches`` with the callable
   class :class:`_Forward`, ``concurrency`` actors, ``num_gpus`` each where
   the cluster has GPUs, ``num_cpus`` otherwise; :func:`plan_sizing` checks
   the layout node by node). With OpenVINO or ONNX Runtime the driver builds
   and exports each model once (the local engine's
   :func:`~audit.scoring.runners.export_onnx`) and each actor compiles that
   graph; with torch each actor builds its model's weights once
   (:func:`audit.scoring.runners.load_models`,
   :func:`~audit.scoring.runners.make_runner`). Each runs its model's crops,
   logits and penultimate features from one pass, with as many compute
   threads as it holds CPUs.
4. **Shards** (driver): the results stream back (``iter_batches``) in any
   order into the local engine's collector (``audit.scoring._Collector``),
   which writes each shard to ``<db>.arrays/`` once its last batch is in.

So the workspace lives on the driver only; the **images** must be readable
at the same path from every node (a shared file system), which is checked at
start (:func:`_check_nodes`: every node that can run work stats a sample of
them and compares it with the driver's view, and, where the actors build their
models, hashes each checkpoint file).
The shards are the local engine's, batch for batch and fingerprint for
fingerprint: an interrupted Ray run resumes on Ray or locally, and a local run
on Ray, with nothing finished recomputed. Ray retries the tasks of an actor
or worker that dies (actors are restarted, ``max_restarts=-1``); the
collector takes each batch once.

Ray is an optional extra (``pip install -e '.[ray]'``): nothing here imports it
until a run asks for the Ray engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit import _options
from audit.errors import ClusterError, OptionError

__all__ = ["ENGINES", "RAY_FIELDS", "RAY_VERSION", "RayEngine", "Sizing", "check_address", "connect", "plan_sizing"]

_log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
# The ScoringConfig fields that only the Ray engine reads.
RAY_FIELDS = ("ray_address", "ray_actors", "ray_cpus_per_actor", "ray_gpus_per_actor")
RAY_VERSION = "2.60.0"  # what pyproject's [ray] extra pins and the tests ran on
_INSTALL = f"pip install -e '.[ray]' (or pip install 'ray[data]=={RAY_VERSION}')"
# Seconds to reach a cluster before saying it cannot be reached; $AUDIT_RAY_CONNECT_TIMEOUT overrides.
_CONNECT_TIMEOUT_S = 30.0
_NODE_TIMEOUT_S = 180.0  # for every node to answer the start-up check (a fresh worker process imports torch)
_DECODE_CPUS = 1.0  # each decode task (at most): one image at a time, PIL is single-threaded


# --------------------------------------------------------------------------- settings (no Ray needed)


def ray_installed() -> bool:
    """Whether Ray Data can be imported here (without importing it: 2 s)."""
    try:
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def _require_ray() -> None:
    if not ray_installed():
        raise ClusterError(f"--engine ray needs Ray Data, which is not installed; install it with {_INSTALL}")


_HOST_PORT = re.compile(r"(?:(ray)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def check_address(value: object) -> str:
    """``--ray-address``: ``auto`` (the cluster ``ray start`` left on this machine), ``HOST:PORT`` (a head's
    GCS, port 6379 by default) or ``ray://HOST:PORT`` (Ray Client, port 10001 by default)."""
    text = str(value).strip()
    if text == "auto":
        return text
    m = _HOST_PORT.fullmatch(text)
    if m is None or not 1 <= int(m.group(3)) <= 65535:
        raise OptionError(
            f"--ray-address {value!r} is not a Ray address; use auto, HOST:PORT (the head's 'ray start --head' "
            "port, 6379 by default) or ray://HOST:10001"
        )
    return text


def check_settings(cfg: Any) -> dict[str, Any]:
    """The Ray part of a :class:`~audit.config.ScoringConfig`, checked and normalised (field -> value).

    Raises :class:`~audit.errors.ClusterError` when Ray is not installed and
    :class:`~audit.errors.OptionError` for a value out of range; the cluster itself is checked by :func:`connect`.
    """
    from audit.scoring.runners import check_precision, resolve_backend

    _require_ray()
    out: dict[str, Any] = {}
    if cfg.ray_address is not None:
        out["ray_address"] = check_address(cfg.ray_address)
    if cfg.ray_actors is not None:
        out["ray_actors"] = _options.check_int("--ray-actors", cfg.ray_actors, lo=1)
    if cfg.ray_cpus_per_actor is not None:
        out["ray_cpus_per_actor"] = _options.check_positive("--ray-cpus-per-actor", cfg.ray_cpus_per_actor)
    if cfg.ray_gpus_per_actor is not None:
        out["ray_gpus_per_actor"] = _options.check_positive("--ray-gpus-per-actor", cfg.ray_gpus_per_actor)
    device = cfg.device
    if device is not None:
        device = str(device).strip().lower()
        if device not in ("cpu", "cuda"):
            raise OptionError(
                f"--device {cfg.device!r} with --engine ray: Ray gives each actor its own GPU, so pass --device "
                "cuda (or cpu), not a device number"
            )
        if device == "cpu" and cfg.ray_gpus_per_actor is not None:
            raise OptionError("--ray-gpus-per-actor with --device cpu: drop one of them")
        out["device"] = device
    # The backend and precision against the actors' device where it is given (else once the cluster is known).
    if device is not None:
        check_precision(cfg.precision, resolve_backend(cfg.backend, device), device)
    else:
        resolve_backend(cfg.backend, "cpu")  # the name, and whether it is installed
    return out


@dataclass(frozen=True)
class Sizing:
    """Each model's actor pool: ``actors`` actors of ``cpus`` CPUs and ``gpus`` GPUs; ``threads`` for a CPU backend;
    ``decode_cpus`` for each decode task."""

    actors: int
    cpus: float
    gpus: float
    threads: int
    decode_cpus: float = _DECODE_CPUS


def _floor2(x: float) -> float:
    """Down to hundredths: a share that, summed over the actors, never exceeds what it was cut from."""
    return math.floor(x * 100 + 1e-6) / 100


def _slots(node_cpus: Sequence[float], node_gpus: Sequence[float], cpus: float, gpus: float) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs the nodes hold: equal actors, so however Ray places
    them, each node ends up with as many as fit in it."""
    total = 0
    for c, g in zip(node_cpus, node_gpus, strict=True):
        fit = math.floor(c / cpus + 1e-6) if cpus > 0 else math.inf
        if gpus > 0:
            fit = min(fit, math.floor(g / gpus + 1e-6))
        total += int(fit) if fit != math.inf else 1 << 30
    return total


def plan_sizing(
    n_models: int,
    node_cpus: Sequence[float],
    node_gpus: Sequence[float],
    device: str,
    *,
    actors: int | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
) -> Sizing:
    """How many actors each model gets and what each holds, checked against the cluster's nodes.

    ``node_cpus`` and ``node_gpus``: what each node that runs work has. Ray
    places each actor and task on one node, so what must fit is checked
    node by node, not only in total: two 1-CPU nodes are not one 2-CPU node.

    Decoding: each decode task takes ``decode_cpus`` (1, or half the average
    node where nodes are smaller than 2 CPUs), and the actors together leave
    that much free per node: then the free CPUs average at least one decode
    task's per node, so some node can always run one, wherever Ray has put
    the actors (a node left with 0.34 CPU beside its actors and another with
    0.67 cannot run a 1-CPU task: the run would wait for ever).

    Defaults: on GPUs, one GPU and one CPU per actor and the cluster's GPUs
    shared evenly among the models (8 GPUs, 4 models: 2 actors each); on CPUs,
    one actor per model and the CPUs left for decoding shared evenly, at most
    1 each (one 2-CPU node, 3 models: 0.33 each; two 1-CPU nodes: 0.33 each
    and 0.5 per decode task).

    Raises
    ------
    ClusterError
        The actors (and decoding) need more than the cluster's nodes have; the message says what to pass.
    """
    on_gpu = device != "cpu"
    node_cpus = [float(c) for c in node_cpus]
    node_gpus = [float(g) for g in node_gpus] or [0.0] * len(node_cpus)
    with_cpus = [c for c in node_cpus if c > 0]
    if not with_cpus:
        raise ClusterError("the Ray cluster has no CPU to decode images on; start its nodes with --num-cpus 1")
    total_cpus, total_gpus = sum(with_cpus), sum(node_gpus)
    decode = min(_DECODE_CPUS, _floor2(total_cpus / len(with_cpus) / 2))
    if decode <= 0:
        raise ClusterError(f"the Ray cluster's nodes have {total_cpus:g} CPU(s) in all: too few to decode on")
    if n_models == 0:  # a decode-only pass for pixel statistics: no actor at all
        return Sizing(0, 0.0, 0.0, 1, decode)
    keep = decode * len(with_cpus)  # CPUs the actors leave for decoding
    if on_gpu:
        g = gpus if gpus is not None else 1.0
        a = actors if actors is not None else max(1, int(total_gpus // (n_models * g)))
        need = n_models * a * g
        if need > total_gpus + 1e-9:
            share = _floor2(total_gpus / (n_models * a))
            fix = f"--ray-gpus-per-actor {share:g}" if share > 0 else "--device cpu"
            raise ClusterError(
                f"{n_models} model(s) x {a} actor(s) x {g:g} GPU need {need:g} GPUs but the Ray cluster has "
                f"{total_gpus:g}; pass {fix} or fewer --ray-actors, or add GPU nodes"
            )
        c = cpus if cpus is not None else 1.0
    else:
        g = 0.0
        a = actors if actors is not None else 1
        if cpus is not None:
            c = cpus
        else:
            c = min(1.0, _floor2((total_cpus - keep) / (n_models * a)))
            if c <= 0:
                raise ClusterError(
                    f"the Ray cluster has {total_cpus:g} CPU(s): decoding needs {keep:g} and each of the "
                    f"{n_models * a} model actor(s) a share; add CPUs (ray start --num-cpus) or use --engine local"
                )
    k = n_models * a
    need_cpus = k * c + keep
    if need_cpus > total_cpus + 1e-9:
        share = _floor2((total_cpus - keep) / k)
        fix = f"--ray-cpus-per-actor {share:g}" if share > 0 else "fewer --ray-actors"
        raise ClusterError(
            f"{n_models} model(s) x {a} actor(s) x {c:g} CPU plus {keep:g} to decode need {need_cpus:g} CPUs "
            f"but the Ray cluster has {total_cpus:g}; pass {fix}, or add CPUs"
        )
    fit = _slots(node_cpus, node_gpus, c, g)
    if fit < k:
        nodes = ", ".join(f"{x:g}" for x in node_cpus)
        raise ClusterError(
            f"{k} model actor(s) of {c:g} CPU{f' and {g:g} GPU' if g else ''} each fit only {fit} at a time on the "
            f"Ray cluster's nodes (CPUs per node: {nodes}); pass a smaller --ray-cpus-per-actor"
            f"{' or --ray-gpus-per-actor' if g else ''}, or fewer --ray-actors"
        )
    return Sizing(a, c, g, max(1, round(c)), decode)


# --------------------------------------------------------------------------- reaching the cluster


def _connect_timeout() -> float:
    raw = os.environ.get("AUDIT_RAY_CONNECT_TIMEOUT")
    return _options.check_positive("$AUDIT_RAY_CONNECT_TIMEOUT", raw) if raw is not None else _CONNECT_TIMEOUT_S


def _unreachable(address: str, why: str) -> ClusterError:
    hint = "start it with 'ray start --head' on the head node, or fix --ray-address"
    if "auth" in why.lower() and not os.environ.get("RAY_AUTH_MODE"):
        # 'ray start --head' turns token authentication on; a driver has to say it uses it.
        hint = "the cluster uses token authentication: set RAY_AUTH_MODE=token (its token in ~/.ray/auth_token)"
    return ClusterError(f"cannot reach a Ray cluster at {address} ({why}); {hint}")


def _probe_tcp(address: str, timeout: float) -> None:
    """Fail fast, in one line, on a host that does not resolve or a port that nothing listens on."""
    m = _HOST_PORT.fullmatch(address)
    if m is None:  # "auto": the address file ray start left on this machine
        return
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or type(e).__name__) from None


# Run in a child process: a Ray client that cannot reach its cluster retries for minutes, and Ray's C++ side can
# end the process it runs in; a child can be timed out and can die without taking the run with it.
_PROBE = """
import json, logging, sys
try:
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)
    out = {"resources": ray.cluster_resources()}
    ray.shutdown()
except BaseException as e:
    cause = e.__cause__ or e.__context__
    text = f"{type(e).__name__}: {e}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    out = {"error": " ".join(text.split())[:400]}
print("AUDIT_PROBE " + json.dumps(out), flush=True)
"""


def _probe(address: str, timeout: float) -> None:
    _probe_tcp(address, timeout)
    try:
        res = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_quiet_env(dict(os.environ)),
        )
    except subprocess.TimeoutExpired:
        raise _unreachable(address, f"no answer within {timeout:g} s") from None
    line = next((x for x in reversed(res.stdout.splitlines()) if x.startswith("AUDIT_PROBE ")), None)
    if line is None:
        tail = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise _unreachable(address, tail[:300])
    got = json.loads(line.split(" ", 1)[1])
    if "error" in got:
        raise _unreachable(address, got["error"])


def _quiet_env(env: dict[str, str]) -> dict[str, str]:
    """Ray's C++ logging down to fatal errors, unless the user chose a level: its warnings (an actor's
    constructor arguments in the object store, a slow GCS) are for its log files, not the terminal."""
    env.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[Path]:
    """File descriptor 2 into a temporary file: what Ray's C++ side prints while it starts (no Python handler
    sees it), kept for an error message instead of the terminal."""
    with tempfile.NamedTemporaryFile(prefix="audit-ray-", suffix=".log", delete=False) as f:
        path = Path(f.name)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars, per-execution banners and stats logs off; its logger to warnings (-v) or errors."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # A UserError raised in a task (an unusable checkpoint on a node) reaches the CLI as itself: one line.
    ctx.raise_original_map_exception = True
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


@dataclass
class RayEngine:
    """A connected Ray cluster and how the run uses it (made by :func:`connect`)."""

    address: str  # what was connected to ("local": a Ray started for this run)
    device: str  # where the model actors run: "cpu" or "cuda"
    node_cpus: tuple[float, ...]  # each node's CPUs and GPUs when connected (the nodes that run work)
    node_gpus: tuple[float, ...]
    actors: int | None = None  # the run's settings (None: plan_sizing's defaults)
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None

    @property
    def nodes(self) -> int:
        return len(self.node_cpus)

    @property
    def cpus(self) -> float:
        return float(sum(self.node_cpus))

    @property
    def gpus(self) -> float:
        return float(sum(self.node_gpus))

    def sizing(self, n_models: int) -> Sizing:
        return plan_sizing(
            n_models, self.node_cpus, self.node_gpus, self.device,
            actors=self.actors, cpus=self.cpus_per_actor, gpus=self.gpus_per_actor,
        )  # fmt: skip

    def score(
        self,
        ds: Any,
        specs: Sequence[Any],
        batches: Sequence[Sequence[int]],
        for_models: set[int],
        for_pixels: set[int],
        sink: Any,
        *,
        backend: str,
        precision: str,
        channels_last: bool,
        features: bool,
    ) -> None:
        """Decode and score ``batches`` on the cluster, handing each scored batch to ``sink`` (``_Collector``)."""
        import ray.data

        size = self.sizing(len(specs))
        rows = []
        for b in batches:
            first = b[0]
            row: dict[str, Any] = {
                "first": first,
                "ids": [ds.image_ids[i] for i in b],
                "crop": first in for_models,
                "measure": first in for_pixels,
            }
            for m in range(len(specs)):
                row[f"todo_{m}"] = sink.wants(m, first)
            rows.append(row)
        if not rows:
            return
        graphs = _export_graphs(specs, backend, features, sink.st)
        # Blocks of whole batches, a few per CPU: what Ray spreads over the cluster, streams and retries one by one.
        # (One block per batch costs the driver ~5 ms each: 20,000 batches of a 1.28M-image set would be minutes.)
        blocks = min(len(rows), max(8, 4 * math.ceil(self.cpus)))
        data = ray.data.from_items(rows, override_num_blocks=blocks)
        data = data.map_batches(
            _decode,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"root": str(ds.root), "pres": [s.preprocess for s in specs]},
            num_cpus=size.decode_cpus,
            # Ray's own default for a CPU task (0: a worker runs it any number of times), said here because it keeps
            # decoding out of the first model's actors: Ray Data fuses a task into the actor pool after it when
            # their remote arguments match (1 CPU each: one model on a 2-CPU node), and decoding would then run
            # only as wide as that pool, one batch at a time, every other CPU idle.
            max_calls=0,
        )
        for m, spec in enumerate(specs):
            data = data.map_batches(
                _Forward,
                batch_size=1,
                batch_format="numpy",
                fn_constructor_kwargs={
                    "spec": spec, "m": m, "backend": backend, "device": self.device, "precision": precision,
                    "threads": size.threads, "channels_last": channels_last, "features": features,
                    "graph": graphs.get(m),
                },
                concurrency=size.actors,
                num_cpus=size.cpus,
                num_gpus=size.gpus or None,
            )
        st = sink.st
        done = dict.fromkeys(range(len(specs)), 0)
        t = time.perf_counter()
        try:
            for block in data.iter_batches(batch_size=None, batch_format="numpy"):
                st.wait += time.perf_counter() - t
                for j in range(len(block["first"])):
                    self._take(block, j, specs, sink, features, done)
                sink.bar.set_postfix_str(_rates(specs, done, st.forward, size.actors), refresh=False)
                t = time.perf_counter()
        except Exception as e:
            raise _job_error(e) from e

    @staticmethod
    def _take(
        block: Mapping[str, Any], j: int, specs: Sequence[Any], sink: Any, features: bool, done: dict[int, int]
    ) -> None:
        first = int(block["first"][j])
        index = np.asarray(block["index"][j], dtype=np.int64)
        outputs = {}
        for m, spec in enumerate(specs):
            if not (bool(block[f"todo_{m}"][j]) and len(index)):
                continue
            y = np.asarray(block[f"logits_{m}"][j], dtype=np.float32)
            f = np.asarray(block[f"features_{m}"][j], dtype=np.float16) if features else None
            outputs[m] = (y, f, float(block[f"top_{m}"][j]) if features else 0.0)
            sink.st.forward[spec.name] = sink.st.forward.get(spec.name, 0.0) + float(block[f"seconds_{m}"][j])
            done[m] += len(index)
        bad = json.loads(str(block["bad"][j]))
        pixels = json.loads(str(block["pixels"][j]))
        sink.add(first, index, bad, outputs, pixels, float(block["pixel_seconds"][j]))


def _rates(specs: Sequence[Any], done: Mapping[int, int], busy: Mapping[str, float], actors: int) -> str:
    """Per model, images per second of its actor pool's busy time x its actors: which model holds the run back."""
    parts = []
    for m, spec in enumerate(specs):
        secs = busy.get(spec.name, 0.0)
        if secs > 0:
            parts.append(f"{spec.name} {done[m] / secs * actors:.1f}")
    return ("img/s per model: " + ", ".join(parts)) if parts else ""


def _job_error(e: BaseException) -> BaseException:
    """A Ray failure of the cluster (a node lost, the connection gone) as one line; errors of ours pass through."""
    from ray import exceptions as rex

    from audit.errors import UserError

    if isinstance(e, UserError):
        return e
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return cause
    if isinstance(e, rex.RayError) and not isinstance(e, rex.RayTaskError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return ClusterError(
            f"the Ray job stopped ({type(e).__name__}: {first[:200]}); the finished shards are kept: run the same "
            "command again to resume"
        )
    return e


def _decode(batch: Mapping[str, np.ndarray], *, root: str, pres: Sequence[Any]) -> dict[str, np.ndarray]:
    """A Ray decode task: one row (one batch of images) loaded by the local loader's code, as numpy columns."""
    from audit.scoring.loader import load_batch

    first = int(batch["first"][0])
    ids = [str(i) for i in batch["ids"][0]]
    got = load_batch(Path(root), ids, first, pres, crop=bool(batch["crop"][0]), measure=bool(batch["measure"][0]))
    out: dict[str, np.ndarray] = {
        "first": np.array([first], dtype=np.int64),
        "index": got["index"][None],
        "bad": np.array([json.dumps([[int(i), str(r)] for i, r in got["bad"]])]),
        "pixels": np.array([json.dumps(got["pixels"], default=_json_scalar)]),
        "pixel_seconds": np.array([float(got["pixel_seconds"])]),
    }
    for m, pre in enumerate(pres):
        x = got["inputs"][m].numpy() if got["inputs"] else np.zeros((0, pre.crop, pre.crop, 3), dtype=np.uint8)
        out[f"input_{m}"] = x[None]
        out[f"todo_{m}"] = np.asarray(batch[f"todo_{m}"][:1], dtype=bool)
    return out


def _json_scalar(v: Any) -> Any:
    """numpy scalars in pixel statistics as the Python values they hold (exact: JSON keeps ints and float reprs)."""
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


GRAPH_BACKENDS = ("openvino", "onnxruntime")  # the backends whose actors get the driver's exported graph


def _export_graphs(specs: Sequence[Any], backend: str, features: bool, st: Any) -> dict[int, bytes]:
    """Each model built and exported to ONNX once, here on the driver, for a graph backend: the local engine's
    own export, so the actors only compile it. Building in every actor instead costs each one the torch and timm
    imports and the model build (~10 s of CPU apiece, all at once on a small node) and needs the checkpoints on
    every node. A model whose export fails gets no graph: its actor builds it and falls back to torch."""
    from audit.scoring.runners import export_onnx, load_models

    if backend not in GRAPH_BACKENDS:
        return {}
    out: dict[int, bytes] = {}
    for m, spec in enumerate(specs):
        t = time.perf_counter()
        module = load_models([spec])[spec.name]
        st.build += time.perf_counter() - t
        t = time.perf_counter()
        try:
            out[m] = export_onnx(module, spec.preprocess.crop, features=features, num_classes=spec.num_classes)
        except Exception as e:  # exporter gaps are model-specific: the actor's make_runner says so and runs torch
            _log.debug("%s: ONNX export failed on the driver (%s)", spec.name, str(e).splitlines()[0])
        st.prepare += time.perf_counter() - t
        del module
    return out


def _numpy_output(ys: Sequence[np.ndarray], features: bool) -> tuple[np.ndarray, np.ndarray | None, float]:
    """:func:`audit.scoring._output` for numpy results, value for value: float32 logits, float16 features, and
    the largest |feature| before rounding."""
    if not features:
        return ys[0], None, 0.0
    y, f = ys
    return y, f.astype(np.float16), float(np.abs(f).max()) if len(f) else 0.0


class _Forward:
    """One actor of model ``m``'s pool: its runner made once, then its model's crops -> logits (and features).

    With ``graph`` (the driver's ONNX export, :func:`_export_graphs`) the
    actor compiles it and, on OpenVINO, runs it without importing torch;
    without, it builds the model from its weights, as the local engine does.
    A CPU actor's compute threads are its CPU share (``threads``): the
    runtime's default, every core of the node, would have each actor fight
    the others and the decode tasks for them.
    """

    def __init__(
        self,
        spec: Any,
        m: int,
        backend: str,
        device: str,
        precision: str,
        threads: int,
        channels_last: bool,
        features: bool,
        graph: bytes | None = None,
    ):
        self.m, self.features = m, features
        self.numpy = graph is not None and backend == "openvino"
        if graph is not None:
            from audit.scoring.runners import graph_runner

            self.runner = graph_runner(graph, spec, backend=backend, precision=precision, threads=threads)
            return
        import torch

        from audit.scoring.runners import load_models, make_runner

        if device == "cpu":
            torch.set_num_threads(threads)
        module = load_models([spec])[spec.name]
        self.runner = make_runner(
            module, spec, backend=backend, device=device, precision=precision, threads=threads,
            channels_last=channels_last, features=features,
        )  # fmt: skip

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
        if self.numpy:
            return _numpy_output(self.runner.infer(x), self.features)
        import torch

        from audit.scoring import _output
        from audit.scoring.runners import forward_batch

        x = x if x.flags.writeable else np.array(x)  # Ray hands read-only views of its object store
        (res,) = forward_batch([self.runner], [torch.from_numpy(x)])
        return _output(res, self.features)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self.m
        out = {k: v for k, v in batch.items() if k != f"input_{m}"}
        x = batch[f"input_{m}"][0]
        # A batch this model does not score (cached, or no readable image): empty results, never read.
        y, f, top = np.zeros((0, 0), dtype=np.float32), np.zeros((0, 0), dtype=np.float16), 0.0
        secs = 0.0
        if bool(batch[f"todo_{m}"][0]) and len(x):
            t = time.perf_counter()
            y, got, top = self._run(x)
            secs = time.perf_counter() - t
            f = got if got is not None else f
        out[f"logits_{m}"] = y[None]
        out[f"seconds_{m}"] = np.array([secs])
        if self.features:
            out[f"features_{m}"] = f[None]
            out[f"top_{m}"] = np.array([top])
        return out


# --------------------------------------------------------------------------- start-up checks on every node


def _node_report(root: str, sample: Sequence[str], weights: Sequence[str]) -> dict[str, Any]:
    """Run on one node: what it sees of the images and checkpoints (stamps, sha256), and that it imports audit."""
    import audit.scoring.loader  # noqa: F401  (the code the tasks run: a node without audit fails here)

    out: dict[str, Any] = {"host": socket.gethostname(), "root": os.path.isdir(root), "stamps": [], "weights": {}}
    for rel in sample:
        try:
            st = os.stat(os.path.join(root, rel))
            out["stamps"].append([int(st.st_size), int(st.st_mtime_ns)])
        except (OSError, ValueError):
            out["stamps"].append(None)
    for w in weights:
        try:
            with open(w, "rb") as f:
                out["weights"][w] = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            out["weights"][w] = None
    return out


def _sample(n: int) -> list[int]:
    """Which images every node stats at start: the first, the middle and the last."""
    return sorted({0, n // 2, n - 1}) if n else []


def compare_reports(
    reports: Mapping[str, Mapping[str, Any]],
    root: str,
    ids: Sequence[str],
    sample: Sequence[int],
    stamps: np.ndarray,
    weights: Mapping[str, str],
) -> None:
    """Raise one :class:`ClusterError` line for the first node that does not see what the driver sees.

    ``reports``: node name -> :func:`_node_report`; ``weights``: checkpoint path -> the driver's sha256.
    """
    for node, r in sorted(reports.items()):
        where = f"node {node} ({r.get('host', '?')})"
        if not r["root"]:
            raise ClusterError(
                f"{where} cannot see the images folder {root}; put the images on a file system every node mounts "
                "at the same path (NFS, a shared disk, an object store mounted by s3fs / gcsfuse)"
            )
        for k, got in zip(sample, r["stamps"], strict=True):
            if got is None or tuple(got) != tuple(int(x) for x in stamps[k]):
                what = "cannot read" if got is None else "sees another version of"
                raise ClusterError(
                    f"{where} {what} image {ids[k]!r} under {root}; every node must read the same files at the same "
                    "path (one shared file system, not copies)"
                )
        for path, sha in weights.items():
            theirs = r["weights"].get(path)
            if theirs != sha:
                what = "cannot read" if theirs is None else "has another file at"
                raise ClusterError(
                    f"{where} {what} the checkpoint {path}; put it on the shared file system, the same file for "
                    "every node"
                )


def _work_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes that can run work (a head started with ``--num-cpus 0`` runs none)."""
    import ray

    return [
        n for n in ray.nodes()
        if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)
    ]  # fmt: skip


def _check_nodes(datasets: Sequence[Any], specs: Sequence[Any], nodes: Sequence[Mapping[str, Any]]) -> None:
    """Every node of ``nodes`` answers :func:`_node_report` for each dataset, and sees what the driver sees."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    weights: dict[str, str] = {}
    for s in specs:
        w = getattr(s, "weights_file", None)
        if w and Path(w).is_file():
            with open(w, "rb") as f:
                weights[str(w)] = hashlib.file_digest(f, "sha256").hexdigest()
    task = ray.remote(num_cpus=0)(_node_report)
    for i, ds in enumerate(datasets):
        sample = _sample(len(ds))
        refs = {
            n["NodeID"][:12]: task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(ds.root), [ds.image_ids[k] for k in sample], list(weights) if i == 0 else [])
            for n in nodes
        }
        try:
            got = dict(zip(refs, ray.get(list(refs.values()), timeout=_NODE_TIMEOUT_S), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"not every Ray node answered the start-up check within {_NODE_TIMEOUT_S:g} s; check 'ray status'"
            ) from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ImportError):
                raise ClusterError(
                    f"a Ray node cannot import audit ({e.cause}); install the same audit environment on every node"
                ) from None
            raise
        compare_reports(got, str(ds.root), ds.image_ids, sample, ds.file_stamps(), weights if i == 0 else {})


@contextlib.contextmanager
def connect(
    cfg: Any, specs: Sequence[Any], datasets: Sequence[Any], *, verbose: bool = False
) -> Iterator[RayEngine]:
    """Reach the cluster of ``cfg`` (a :class:`~audit.config.ScoringConfig` with ``engine="ray"``), check it
    can hold the run of ``specs`` over ``datasets`` (the set, and a reference set if any), and yield the
    engine; a Ray started here is stopped on the way out.

    ``ray_address`` None: the Ray this process already has (``ray.init`` called before), else one started
    on this machine for the run. Every check is made before the run writes anything: Ray installed, the
    cluster reachable within ``$AUDIT_RAY_CONNECT_TIMEOUT`` seconds (30), the models' actors fitting its
    CPUs and GPUs (:func:`plan_sizing`), and every node seeing the same images and checkpoints.

    Raises
    ------
    ClusterError
        Any of those fails; one line naming the fix.
    """
    from audit.scoring.runners import check_precision, resolve_backend

    _require_ray()
    # $RAY_ADDRESS is where a bare ray.init() would connect: checked like --ray-address.
    address = cfg.ray_address or (check_address(os.environ["RAY_ADDRESS"]) if os.environ.get("RAY_ADDRESS") else None)
    if not verbose:
        _quiet_env(os.environ)  # type: ignore[arg-type]
    import ray

    own = False
    if not ray.is_initialized():
        if address is not None:
            _probe(address, _connect_timeout())
        with _stderr_to_file() as log:
            try:
                ray.init(
                    address=address,
                    log_to_driver=verbose,
                    logging_level=logging.INFO if verbose else logging.ERROR,
                    **({} if address is not None else {"include_dashboard": False}),
                )
            except Exception as e:
                why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                if address is None:
                    tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
                    raise ClusterError(
                        f"could not start Ray on this machine ({why}{'; ' + tail[0][:200] if tail else ''}); "
                        "check 'ray status', or start a cluster and pass --ray-address"
                    ) from None
                raise _unreachable(address, why) from None
            finally:
                log.unlink(missing_ok=True)
        own = True
    try:
        _quiet_ray_data(verbose)
        nodes = _work_nodes()
        node_cpus = tuple(float(n["Resources"].get("CPU", 0)) for n in nodes)
        node_gpus = tuple(float(n["Resources"].get("GPU", 0)) for n in nodes)
        cpus, gpus = sum(node_cpus), sum(node_gpus)
        device = cfg.device or ("cuda" if gpus > 0 and cfg.backend in ("auto", "torch") else "cpu")
        if device == "cuda" and gpus == 0:
            raise ClusterError("--device cuda: the Ray cluster has no GPU; pass --device cpu or add GPU nodes")
        check_precision(cfg.precision, resolve_backend(cfg.backend, device), device)
        run = [s for s in specs if s.source != "predictions"]
        engine = RayEngine(
            address=address or "local", device=device, node_cpus=node_cpus, node_gpus=node_gpus, actors=cfg.ray_actors,
            cpus_per_actor=cfg.ray_cpus_per_actor, gpus_per_actor=cfg.ray_gpus_per_actor,
        )  # fmt: skip
        size = engine.sizing(len(run))
        # The checkpoints are read where the models are built: on the driver for a graph backend, else every node.
        built_on_nodes = run if resolve_backend(cfg.backend, device) not in GRAPH_BACKENDS else []
        _check_nodes([d for d in datasets if d is not None], built_on_nodes, nodes)
        _log.info(
            "Ray: %s, %d node(s), %g CPU(s), %g GPU(s); per model %d actor(s) of %g CPU, %g GPU; decode tasks %g CPU",
            engine.address, engine.nodes, cpus, gpus, size.actors, size.cpus, size.gpus, size.decode_cpus,
        )  # fmt: skip
        yield engine
    finally:
        if own:
            ray.shutdown()
