"""Search spaces: check every dotted path and value against the run config, turn the space into
Ray Tune domains, and apply a trial's sampled values to the base run config.

Every value a trial could draw is validated before any trial starts, so a space that would
make trial 37 fail (`model.dropout` up to 1.5) is refused up front with the key named.
"""

import copy
import hashlib
import json
from typing import Any

import numpy as np
from pydantic import BaseModel
from ray import tune

from stoker.errors import UserError
from stoker.trainer import metrics as m
from stoker.trainer.run_spec import parse_run
from stoker.tune.config import Choice, Grid, IntRange, LogUniform, TuneConfig, Uniform
from stoker.tune.schema import SearchRun


def field_at(path: str, model: type[BaseModel]) -> Any:
    """The pydantic field a dotted path names in the run config (`model`, the run's type);
    UserError naming the path if it names none."""
    parts = path.split(".")
    field = None
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields or (depth == 0 and part in ("tune", "name", "storage")):
            parent = ".".join(parts[:depth]) or "the run config"
            known = ", ".join(k for k in fields if not (depth == 0 and k in ("tune", "name", "storage")))
            raise UserError(f"tune.space.{path}: names no config field ({parent} has: {known})")
        field = fields[part]
        if depth < len(parts) - 1:
            inner = field.annotation
            if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
                raise UserError(f"tune.space.{path}: {'.'.join(parts[:depth + 1])} has no sub-fields")
            model = inner
    return field


def get_path(tree: dict, path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def set_path(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def candidate_values(dist: Any) -> list[Any]:
    """Values that stand for everything a distribution can draw: its bounds or its list."""
    if isinstance(dist, Choice | Grid):
        return list(dist.values)
    if isinstance(dist, IntRange):
        return [int(dist.low), int(dist.high)]
    return [dist.low, dist.high]


def coerce(dist: Any, value: Any) -> Any:
    # BOHB's model-based picks come back as NumPy scalars (np.True_, np.int64), which the
    # config's bool fields and the YAML/JSON writers refuse.
    if isinstance(value, np.generic):
        value = value.item()
    # Bayesian optimisation proposes floats for int parameters (it models only continuous ones).
    return int(round(value)) if isinstance(dist, IntRange) else value


def apply(base: dict[str, Any], values: dict[str, Any], space: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the base run config (as a dict) with each dotted path set to its value."""
    run = copy.deepcopy(base)
    for path, value in values.items():
        set_path(run, path, coerce(space[path], value) if space and path in space else value)
    return run


def check_space(base: dict[str, Any], tune_cfg: TuneConfig, model: type[SearchRun]) -> None:
    """Refuse a space with a path that names no field, a value the field rejects, or a
    distribution the searcher cannot handle, and a point to evaluate outside the space.
    `base` is the run config as a dict, `model` its type (the searched run's: `type(run)`)."""
    for path, dist in tune_cfg.space.items():
        field_at(path, model)
        key = f"tune.space.{path}"
        if tune_cfg.searcher == "grid" and not isinstance(dist, Grid | Choice):
            raise UserError(f"{key}: the grid searcher needs grid or choice values, got {dist.dist}")
        if tune_cfg.searcher in ("tpe", "bayesopt", "bohb") and isinstance(dist, Grid):
            raise UserError(f"{key}: grid values need searcher random or grid; use dist: choice with {tune_cfg.searcher}")
        if tune_cfg.searcher == "bayesopt" and isinstance(dist, Choice):
            raise UserError(f"{key}: bayesopt models continuous and int parameters only; use searcher tpe for choice")
        for value in candidate_values(dist):
            _check_value(model, base, key, path, value)
    for index, point in enumerate(tune_cfg.points_to_evaluate):
        for path, value in point.items():
            key = f"tune.points_to_evaluate[{index}].{path}"
            if path not in tune_cfg.space:
                raise UserError(f"{key}: not a path in tune.space (it has: {', '.join(tune_cfg.space)})")
            # Every searcher models (or enumerates) its space: Optuna rejects a point outside a
            # distribution only when the trial is asked for, BOHB at its first result.
            if not within(tune_cfg.space[path], value):
                raise UserError(f"{key}: {value!r} lies outside tune.space.{path} "
                                f"({describe(tune_cfg.space[path])})")
            _check_value(model, base, key, path, value)


def describe(dist: Any) -> str:
    """A distribution as the user wrote it, for messages."""
    if isinstance(dist, Choice | Grid):
        return f"{dist.dist} of {list(dist.values)!r}"
    return f"{dist.dist} {dist.low:g}..{dist.high:g}"


def within(dist: Any, value: Any) -> bool:
    """Whether a distribution can draw `value`."""
    if isinstance(dist, Choice | Grid):
        return value in dist.values
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dist, IntRange) and value != int(value):
        return False
    return dist.low <= value <= dist.high


def _check_value(model: type[SearchRun], base: dict, key: str, path: str, value: Any) -> None:
    try:
        parse_run(apply(base, {path: value}), "tune", model)
    except UserError as exc:
        raise UserError(f"{key}: value {value!r} is rejected: {exc}") from None


def reported_metrics(task: str, train_metric: str) -> list[str]:
    """Every key a training reports each epoch that a search can optimise."""
    return ["train_loss", *(f"val_{name}" for name in m.metric_names(task)), f"best_val_{train_metric}"]


def resolve_metric(tune_cfg: TuneConfig, task: str, train_metric: str | None) -> tuple[str, str]:
    """(metric, mode) of the search, refusing a metric the trainer never reports."""
    train_metric = train_metric or m.default_metric(task)
    metric = tune_cfg.metric or f"val_{train_metric}"
    known = reported_metrics(task, train_metric)
    if metric not in known:
        raise UserError(f"tune.metric: {metric!r} is never reported for {task}; choose one of {', '.join(known)}")
    bare = metric.removeprefix("best_").removeprefix("val_").removeprefix("train_")
    return metric, tune_cfg.mode or m.metric_mode(bare)


def param_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """The space as nested Ray Tune domains (Tune flattens nested spaces for every searcher)."""
    space: dict[str, Any] = {}
    for path, dist in tune_cfg.space.items():
        set_path(space, path, _domain(dist, tune_cfg.searcher))
    return space


def _domain(dist: Any, searcher: str) -> Any:
    if isinstance(dist, Uniform):
        return tune.uniform(dist.low, dist.high)
    if isinstance(dist, LogUniform):
        return tune.loguniform(dist.low, dist.high)
    if isinstance(dist, IntRange):
        if searcher == "bayesopt":
            # Rounded to the nearest integer in `coerce`; +-0.5 gives the ends a fair share.
            return tune.uniform(dist.low - 0.4999, dist.high + 0.4999)
        if dist.log:
            return tune.lograndint(int(dist.low), int(dist.high) + 1)
        return tune.randint(int(dist.low), int(dist.high) + 1)
    values = [encode(dist, value) for value in dist.values]
    if isinstance(dist, Grid) or searcher == "grid":
        return tune.grid_search(values)
    return tune.choice(values)


def _encoded(dist: Any) -> bool:
    # Optuna (and the experiment's own results) store a categorical value only as None, bool,
    # int, float or str: a choice of lists (layer widths) goes through Tune as JSON text.
    return isinstance(dist, Choice | Grid) and any(not isinstance(v, _SCALARS) for v in dist.values)


_SCALARS = (type(None), bool, int, float, str)


def encode(dist: Any, value: Any) -> Any:
    """A config value as Tune's searchers see it (see `_encoded`)."""
    return json.dumps(value) if _encoded(dist) else value


def decode(dist: Any, value: Any) -> Any:
    """The config value a searcher's choice stands for (inverse of `encode`)."""
    return json.loads(value) if _encoded(dist) and isinstance(value, str) else value


def sampled_values(config: dict[str, Any], tune_cfg: TuneConfig) -> dict[str, Any]:
    """A trial's config (nested, as Tune hands it over) as dotted path -> value."""
    return {path: coerce(dist, decode(dist, get_path(config, path))) for path, dist in tune_cfg.space.items()}


def nested_points(tune_cfg: TuneConfig) -> list[dict[str, Any]]:
    """points_to_evaluate in Tune's nested form. Paths a point leaves out are drawn from the
    space: the random and grid searchers draw them themselves; Ray's wrappers of the
    model-based ones (tpe, bayesopt, bohb) need complete points, so they are drawn here
    (seeded by `tune.seed`)."""
    rng = np.random.default_rng(tune_cfg.seed)
    complete = tune_cfg.searcher not in ("random", "grid")
    points = []
    for point in tune_cfg.points_to_evaluate:
        nested: dict[str, Any] = {}
        for path, dist in tune_cfg.space.items():
            if path in point:
                set_path(nested, path, encode(dist, point[path]))
            elif complete:
                drawn = _domain(dist, tune_cfg.searcher).sample(random_state=rng)
                set_path(nested, path, drawn.item() if isinstance(drawn, np.generic) else drawn)
        points.append(nested)
    return points


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
