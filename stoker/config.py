"""The run config: one YAML file composed of the sections that live next to their code.

`load_config` is the only way the CLI reads a config, so every error names the key path and
the file: `train.deepspeed.zero_stage: must be 0..3, got 5 (run.yaml)`.
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from stoker.cluster.config import ClusterConfig
from stoker.errors import UserError
from stoker.trainer.run_spec import parse_run
from stoker.tune.schema import SearchRun


class RunConfig(SearchRun):
    """One training run: the data, the model, how to train it and on how many workers."""

    # The run's own sections are `RunSpec`'s (stoker.trainer.run_spec), the type every layer
    # below takes; `tune` is `SearchRun`'s (stoker.tune.schema), the type the search takes; the
    # CLI adds only the cluster's.
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Remote cluster submission, the runs registry and monitoring (stoker.cluster.config)."""


def parse_config(raw: Any, source: str) -> RunConfig:
    """Validate an already-parsed YAML document; `source` names it in errors."""
    return parse_run(raw, source, RunConfig)


def recorded_run(run_dir: str | Path) -> RunConfig | None:
    """The run a run (or export) directory's config record describes, validated once; None when
    it holds no config record. A record from another stoker version that no longer validates is
    refused in one line naming the key and the record."""
    from stoker.trainer.run_dir import Records

    records = Records(Path(run_dir))
    config = records.config()
    return None if config is None else parse_config(config, str(records.config_path()))


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config file, raising `UserError` naming the key and the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    return parse_config(raw, path.name)


def json_schema() -> dict[str, Any]:
    """The JSON schema of the run config, for editors and `stoker config schema`."""
    return RunConfig.model_json_schema()
