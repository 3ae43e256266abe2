"""A run's settings: typed, frozen dataclasses, validated once when made and stored whole in ``runs.params``.

One place owns each setting's type, default and rule: the CLI builds a :class:`RunConfig` from
its flags, the Python API builds one directly (or :func:`RunConfig.from_options` from the flat
keywords :func:`audit.pipeline.run_audit` has always taken), and every stage reads its own part
(``config.scoring``, ``config.heads``, ``config.checks``). A value that breaks a rule raises
:class:`~audit.errors.OptionError` (or :class:`~audit.errors.CheckError`) naming the option, when
the config is made: before any workspace file is written. The run stores
:meth:`RunConfig.to_params` under ``runs.params["config"]``; :meth:`RunConfig.from_params` reads
it back.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from audit import _options
from audit.errors import OptionError

__all__ = ["ChecksConfig", "HeadsConfig", "MapConfig", "RunConfig", "ScoringConfig"]


def _set(obj: object, name: str, value: Any) -> None:
    # A frozen dataclass normalises its own fields once, in __post_init__, and never again.
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class ScoringConfig:
    """How the images are decoded and the models run (:func:`audit.scoring.score_dataset`)."""

    batch_size: int = 64  # images per forward pass
    workers: int = 2  # loader processes behind the forward passes (0: load in this process)
    device: str | None = None  # torch device; None: "cuda" when present, else "cpu"
    backend: str = "auto"  # "auto" (fastest installed), "openvino", "onnxruntime" or "torch"
    precision: str = "fp32"  # "fp32", or "bf16" / "fp16" where the backend and device run them
    features: bool = True  # record each zoo model's penultimate features beside its logits (heads, checks)
    crop: str = "auto"  # the weights' centre crop: "auto" (off for images smaller than the input), "weights", "full"
    # Where the models run: "local" (this machine) or "ray" (a Ray cluster: audit.scoring.ray_engine). Results,
    # shards and resume are the same either way; the ray_* settings below apply to "ray" only.
    engine: str = "local"
    ray_address: str | None = None  # None: a Ray started for this run; "auto", "HOST:PORT" or "ray://HOST:PORT"
    ray_actors: int | None = None  # actors per model; None: 1 on CPUs, the cluster's GPUs shared evenly on GPUs
    ray_cpus_per_actor: float | None = None  # None: 1 on a GPU cluster; on CPUs, the CPUs left by decoding, shared
    ray_gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs (0.5 puts two actors on a GPU)

    def __post_init__(self) -> None:
        from audit import scoring
        from audit.scoring import ray_engine
        from audit.zoo import CROP_MODES

        _set(self, "batch_size", _options.check_int("--batch-size", self.batch_size, lo=1))
        _set(self, "workers", _options.check_workers("--workers", self.workers))
        _set(self, "features", _options.check_bool("--features", self.features))
        if self.crop not in CROP_MODES:
            raise OptionError(f"--crop {self.crop!r}: expected one of {', '.join(CROP_MODES)}")
        if self.engine not in ray_engine.ENGINES:
            raise OptionError(f"--engine {self.engine!r}: expected one of {', '.join(ray_engine.ENGINES)}")
        if self.engine == "ray":
            # The whole Ray part is checked here, before the dataset is read; reaching the cluster comes next
            # (audit.pipeline.run_audit), still before any workspace file is written.
            for name, value in ray_engine.check_settings(self).items():
                _set(self, name, value)
            return
        given = [f for f in ray_engine.RAY_FIELDS if getattr(self, f) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise OptionError(f"{flag} applies to the Ray engine only; add --engine ray, or drop {flag}")
        _set(self, "device", _options.check_device("--device", self.device))
        # The backend / precision / device combination, refused here rather than after the run is registered.
        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = scoring.resolve_backend(self.backend, device)
        scoring.check_precision(self.precision, backend, device)


@dataclass(frozen=True)
class HeadsConfig:
    """Whether cross-validated heads are fitted on the zoo models' features (:mod:`audit.headmodels`)."""

    enabled: bool | None = None  # None: for a custom label space only; True / False: always / never
    folds: int = 10  # outer cross-validation folds (each image's probabilities come from a head that never saw it)

    def __post_init__(self) -> None:
        if self.enabled is not None:
            _set(self, "enabled", _options.check_bool("--heads", self.enabled))
        _set(self, "folds", _options.check_int("--folds", self.folds, lo=2))


def _frozen(options: Mapping[str, Mapping[str, Any]] | None) -> Mapping[str, Mapping[str, Any]]:
    return types.MappingProxyType({str(k): types.MappingProxyType(dict(v or {})) for k, v in (options or {}).items()})


@dataclass(frozen=True)
class ChecksConfig:
    """Which checks run and with which options (:mod:`audit.checks`)."""

    # Names or fnmatch patterns (a comma-separated string or a sequence); None: the registry's default-on
    # checks. Resolved when made, so the stored config names exactly the checks that ran.
    names: tuple[str, ...] | str | Sequence[str] | None = None
    # Options per selected check, {"label": {"weights": "fit"}}; each check refuses its own bad options.
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from audit.checks import make_checks, resolve_checks

        _set(self, "names", resolve_checks(self.names))
        _set(self, "options", _frozen(self.options))
        make_checks(self.names, params=self.options)

    def make(self) -> list[Any]:
        """The configured :class:`~audit.checks.Check` instances, in the selected order."""
        from audit.checks import make_checks

        return make_checks(self.names, params=self.options)


@dataclass(frozen=True)
class MapConfig:
    """The 2-D map of the dataset the run stores for the dashboard's Map page (:mod:`audit.featuremap`)."""

    enabled: bool = True  # compute it (when the run records features and has enough images)
    model: str | None = None  # the zoo model whose features make it; None: the one whose predictions fit best
    method: str = "umap"  # "umap" (umap-learn) or "tsne" (scikit-learn)
    seed: int = 0  # PCA / UMAP / t-SNE seed: the same features and settings give the same map

    def __post_init__(self) -> None:
        _set(self, "enabled", _options.check_bool("--map", self.enabled))
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise OptionError(f"--map-model must name a model of the run, got {self.model!r}")
        _set(self, "seed", _options.check_int("--map-seed", self.seed, lo=0))
        self.settings()  # the method's rule lives with the computation

    def settings(self) -> Any:
        """The :class:`audit.featuremap.MapSettings` of this config."""
        from audit.featuremap import MapSettings

        return MapSettings(method=self.method, seed=self.seed)


# The flat keyword names of run_audit(**options): which part of the config each belongs to, as which field.
_FLAT = {
    **{f: ("scoring", f) for f in ("batch_size", "workers", "device", "backend", "precision", "features", "crop")},
    **{f: ("scoring", f) for f in ("engine", "ray_address", "ray_actors", "ray_cpus_per_actor", "ray_gpus_per_actor")},
    "heads": ("heads", "enabled"),
    "folds": ("heads", "folds"),
    "checks": ("checks", "names"),
    "check_options": ("checks", "options"),
    "sigmoid_threshold": ("run", "sigmoid_threshold"),
    "map": ("map", "enabled"),
    "map_model": ("map", "model"),
    "map_method": ("map", "method"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run's results depend on besides its dataset and models."""

    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    map: MapConfig = field(default_factory=MapConfig)
    # Sigmoid evaluation's threshold on sigmoid(logit); None: cross-fitted on the images themselves.
    sigmoid_threshold: float | None = None

    def __post_init__(self) -> None:
        parts = (("scoring", ScoringConfig), ("heads", HeadsConfig), ("checks", ChecksConfig), ("map", MapConfig))
        for name, cls in parts:
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.sigmoid_threshold is not None:
            _set(self, "sigmoid_threshold", _options.check_probability("--sigmoid-threshold", self.sigmoid_threshold))

    @classmethod
    def from_options(cls, **options: Any) -> RunConfig:
        """A config from :func:`audit.pipeline.run_audit`'s flat keywords (``batch_size=``, ``checks=``, ...).

        Raises
        ------
        TypeError
            A keyword that is no setting (a typo would otherwise be ignored).
        """
        parts: dict[str, dict[str, Any]] = {"scoring": {}, "heads": {}, "checks": {}, "map": {}, "run": {}}
        for key, value in options.items():
            if key not in _FLAT:
                raise TypeError(f"unknown run option {key!r}; known: {', '.join(sorted(_FLAT))}")
            part, name = _FLAT[key]
            if part == "checks" and name == "options" and value is None:
                continue
            parts[part][name] = value
        return cls(
            scoring=ScoringConfig(**parts["scoring"]),
            heads=HeadsConfig(**parts["heads"]),
            checks=ChecksConfig(**parts["checks"]),
            map=MapConfig(**parts["map"]),
            **parts["run"],
        )

    def to_params(self) -> dict[str, Any]:
        """The whole config as JSON-able values (what ``runs.params["config"]`` holds)."""
        out: dict[str, Any] = {}
        for part in ("scoring", "heads", "map"):
            obj = getattr(self, part)
            out[part] = {f.name: getattr(obj, f.name) for f in fields(obj)}
        out["checks"] = {
            "names": list(self.checks.names),  # type: ignore[arg-type]
            "options": {k: dict(v) for k, v in self.checks.options.items()},
        }
        out["sigmoid_threshold"] = self.sigmoid_threshold
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunConfig:
        """The config :meth:`to_params` wrote (validated again: a hand-edited workspace gets the same rules)."""
        return cls(
            scoring=ScoringConfig(**dict(params.get("scoring") or {})),
            heads=HeadsConfig(**dict(params.get("heads") or {})),
            checks=ChecksConfig(**dict(params.get("checks") or {})),
            map=MapConfig(**dict(params.get("map") or {})),
            sigmoid_threshold=params.get("sigmoid_threshold"),
        )
