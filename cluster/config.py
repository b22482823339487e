"""The `cluster:` section of a run config: where runs are recorded, how they are submitted to a
remote Ray cluster, and the thresholds `stoker monitor` applies.

Nothing here holds a credential: the Ray token comes from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH
and a registry password from STOKER_REGISTRY_URL, both in the environment.
"""

from pydantic import Field, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from stoker.strict_model import StrictModel

# Never shipped to a cluster: version control, virtualenvs, caches, local runs and data.
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
    "runs", "*.egg-info", ".mypy_cache", "node_modules",
]


class RegistryConfig(StrictModel):
    """The runs registry: a SQL database of every run and registered model version."""

    url: str | None = None
    """SQLAlchemy URL of the registry (e.g. `postgresql+psycopg://host/stoker`). Default: the
    STOKER_REGISTRY_URL environment variable, else SQLite at `<storage>/registry.db`. A password
    never goes here: put a URL that carries one in STOKER_REGISTRY_URL."""

    @field_validator("url")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"not a SQLAlchemy database URL: {value!r}") from None
        if url.password:
            raise ValueError("the URL carries a password; set it in STOKER_REGISTRY_URL instead")
        return value


class SubmitConfig(StrictModel):
    """How `stoker submit` packages a run as a Ray Job."""

    working_dir: str = "."
    """Directory uploaded with the job (relative to where `stoker submit` runs); the job starts
    in it, so the config's relative paths resolve the same way on the cluster."""
    excludes: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    """Gitignore-style patterns left out of the upload."""
    max_upload_mb: float = Field(100, gt=0)
    """Refuse to submit when the working directory (after excludes) is larger than this; Ray's
    own limit for a working_dir package is 500 MiB."""
    pip: list[str] = Field(default_factory=list)
    """Pinned pip requirements installed for the job (`package==1.2.3`); empty: the cluster's."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables for the job. Not for secrets: they are visible in the job's
    runtime_env to anyone who can list jobs."""
    entrypoint_num_cpus: float = Field(0, ge=0)
    """CPUs reserved for the job's driver (the `stoker train` process on the cluster)."""
    connect_timeout_s: float = Field(10, gt=0)
    """How long to wait for the cluster's Jobs API before giving up."""

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            upper = key.upper()
            if upper.startswith("RAY_AUTH") or any(w in upper for w in ("TOKEN", "SECRET", "PASSWORD", "_KEY")):
                raise ValueError(f"{key}: looks like a secret; secrets come from the cluster's environment, not the config")
        return value

    @field_validator("pip")
    @classmethod
    def _pinned(cls, value: list[str]) -> list[str]:
        for requirement in value:
            if "==" not in requirement:
                raise ValueError(f"{requirement!r} is not pinned; write it as name==version")
        return value


class MonitorConfig(StrictModel):
    """Thresholds `stoker monitor` flags; exceeding any of them exits non-zero."""

    psi: float = Field(0.2, gt=0)
    """Population stability index above which a feature has drifted (0.1 moderate, 0.2 major)."""
    ks_pvalue: float = Field(0.01, gt=0, lt=1)
    """Two-sample Kolmogorov-Smirnov p-value below which a numeric feature has drifted."""
    ks_statistic: float = Field(0.1, gt=0, le=1)
    """...but only when the KS statistic is also above this: with many rows, tiny harmless
    shifts have tiny p-values."""
    max_drifted_fraction: float = Field(0.0, ge=0, le=1)
    """Fraction of features allowed to drift before the data as a whole is flagged."""
    max_metric_drop: float = Field(0.05, ge=0)
    """Largest allowed drop of a test metric on the new data (absolute; for losses and errors,
    the largest allowed rise)."""


class ClusterConfig(StrictModel):
    """Remote clusters, job submission, the runs registry and monitoring."""

    address: str | None = None
    """Jobs API of a remote Ray cluster (`http://head:8265`); `--address` and RAY_ADDRESS
    override it. Empty: train on the embedded local cluster."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Where runs and model versions are recorded."""
    submit: SubmitConfig = Field(default_factory=SubmitConfig)
    """How the run is packaged when submitted as a Ray Job."""
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    """Drift and degradation thresholds for `stoker monitor`."""
