"""Every private Ray name stoker.tune uses, in one module, for the one Ray release it was written
against (constraints.txt pins it). Another Ray stops the import with one line naming both
versions, instead of a patch release breaking a private name in the middle of a search.

Everything else in tune/ uses Ray's public API. What is here has no public equivalent in 2.60:
- Train V2's function-utils hook and its checkpoint bookkeeping (`TrainFnUtils`,
  `set_train_fn_utils`, `CheckpointManager`, `StorageContext`, `_TrainingReport`,
  `_CheckpointManagerState`): an in-process trial is a Train worker with no controller, and a
  PBT exploit seeds a Train run with a donor's checkpoint in Train's own snapshot format;
- Tune's "in a Tune session" check, which Train's API consults at call time;
- the trial session's `report`, where a nested TorchTrainer's forwarded metrics arrive;
- the per-split execution options of a Train `DataConfig`;
- Tune's controller `_mark_trial_to_checkpoint`, and the scheduler and BOHB fields that the
  subclasses in `stoker.tune.hyperband` read;
- the GCS placement-group table with each group's creator actor (`placement_group_table()`
  leaves the creator out; the state API needs the dashboard, which stoker does not start);
- the environment variables Tune copies from the driver into every trial's `runtime_env`
  (its actor-class cache), which include AWS credentials.
"""

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray

from stoker.errors import UserError

WRITTEN_FOR = "2.60.0"

if ray.__version__ != WRITTEN_FOR:
    raise UserError(f"ray {ray.__version__} is installed, but stoker.tune was written for ray {WRITTEN_FOR} "
                    f"(it relies on Ray internals); install ray=={WRITTEN_FOR} (pip install -c constraints.txt -e .)")

import ray.tune.trainable.trainable_fn_utils as _tune_fn_utils  # noqa: E402
from ray._private import state as _state  # noqa: E402
from ray.core.generated import gcs_pb2  # noqa: E402
from ray.train._internal.session import get_session as _trial_session  # noqa: E402
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (  # noqa: E402
    CheckpointManager,
)
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (  # noqa: E402
    _CheckpointManagerState as CheckpointManagerState,
)
from ray.train.v2._internal.execution.storage import StorageContext  # noqa: E402
from ray.train.v2._internal.execution.train_fn_utils import (  # noqa: E402
    TrainFnUtils,
    set_train_fn_utils,
)
from ray.train.v2._internal.execution.training_report import (  # noqa: E402
    _TrainingReport as TrainingReport,
)
from ray.tune.execution.class_cache import ENV_VARS_TO_PROPAGATE as _TRIAL_ENV_VARS  # noqa: E402

__all__ = [
    "CheckpointManager", "CheckpointManagerState", "StorageContext", "TrainFnUtils", "TrainingReport",
    "mark_trial_to_checkpoint", "placement_groups", "private_field", "resolve_execution_options",
    "set_train_fn_utils", "train_api_in_this_thread", "wrap_trial_report", "PLACEMENT_GROUP_REMOVED",
    "TRIAL_CREDENTIALS", "no_credentials_in_trial_env",
]

PLACEMENT_GROUP_REMOVED = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Value("REMOVED")


def _attribute(owner: Any, name: str) -> Any:
    """`owner.name`, or a one-line error naming it when this Ray has no such attribute."""
    if not hasattr(owner, name):
        what = getattr(owner, "__name__", type(owner).__name__)
        raise RuntimeError(f"ray {ray.__version__}: {what} has no {name!r}; stoker.tune.ray_internals "
                           f"needs updating for this Ray")
    return getattr(owner, name)


_train_worker = threading.local()


@contextlib.contextmanager
def train_api_in_this_thread() -> Iterator[None]:
    """Within the block, Ray's Train API serves this thread though it runs inside a Tune trial.

    Train's API refuses calls from a Tune trial (it expects a nested trainer there), checking
    `trainable_fn_utils._in_tune_session`, which it looks up at each call. An in-process trial's
    loop is that trial's Train worker: for its thread only, and only until the block ends, the
    check says no. The original is put back after, so nothing outlives the trial.
    """
    original = _attribute(_tune_fn_utils, "_in_tune_session")

    def in_tune_session() -> bool:
        return False if getattr(_train_worker, "active", False) else original()

    _tune_fn_utils._in_tune_session = in_tune_session
    _train_worker.active = True
    try:
        yield
    finally:
        _train_worker.active = False
        _tune_fn_utils._in_tune_session = original


def wrap_trial_report(wrap: Callable[[Callable], Callable]) -> None:
    """Replace this trial's session `report` by `wrap(report)`.

    A nested TorchTrainer's `TuneReportCallback` hands rank 0's metrics to the trial's session
    through a queue, and the session calls its own `report` with them on the trial's thread:
    the one place a Tune checkpoint can be attached. The session is the trial's and ends with
    it (trials that launch a TorchTrainer never reuse their process).
    """
    session = _trial_session()
    if session is None:
        raise RuntimeError("wrap_trial_report: not inside a Tune trial")
    session.report = wrap(_attribute(session, "report"))


def resolve_execution_options(data_config: Any, split: str) -> Any:
    """The Ray Data execution options a Train `DataConfig` gives the dataset of `split`."""
    return _attribute(data_config, "_resolve_execution_options")(split)


def mark_trial_to_checkpoint(tune_controller: Any, trial: Any) -> None:
    """Have Tune save `trial`'s status with the next experiment snapshot."""
    _attribute(tune_controller, "_mark_trial_to_checkpoint")(trial)


def private_field(owner: Any, name: str) -> Any:
    """A field Ray keeps private on one of its schedulers or searchers (`_time_attr`, ...)."""
    return _attribute(owner, name)


def placement_groups() -> list[Any]:
    """Every placement group the GCS knows, as `gcs_pb2.PlacementGroupTableData` records."""
    accessor = _attribute(_state.state, "_connect_and_get_accessor")()
    return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]


TRIAL_CREDENTIALS = sorted(name for name in _TRIAL_ENV_VARS if name.startswith("AWS_"))
"""The AWS credential variables Tune would copy into each trial actor's `runtime_env`."""


@contextlib.contextmanager
def no_credentials_in_trial_env() -> Iterator[None]:
    """While the block runs, this process's environment lacks the AWS credentials that Tune
    copies from it into every trial actor's `runtime_env`, where the state API, the dashboard
    and the GCS would show them. Trials get credentials as every other Ray worker here does:
    from their node (the environment the local cluster was started with, or the platform's AWS
    chain: instance profile, IRSA). The driver's own S3 reads happen outside the block."""
    hidden = {name: os.environ.pop(name) for name in TRIAL_CREDENTIALS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)
