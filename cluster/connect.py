"""Connecting to Ray: an embedded local cluster by default, the job's cluster inside a Ray Job.

A new local `ray.init()` turns token auth on by default (generating ~/.ray/auth_token) unless
RAY_AUTH_MODE says otherwise; stoker leaves that choice to Ray and the environment, so the
embedded cluster is as locked down as a remote one.
"""

import logging
import os
import sys
from pathlib import Path

import ray

from stoker.environment import patched_environ
from stoker.ray_internals import driver_output_to_stderr, forget_jobs_api_address, use_train_v2


def connect_embedded(num_cpus: int | None = None, log_to_driver: bool = False) -> dict[str, float]:
    """Start (or reuse) an in-process local Ray cluster sized to this machine; return its resources.

    Worker logs stay in Ray's session log files unless `log_to_driver`: stoker prints each
    epoch's metrics itself, and a worker's failure comes back as the exception.
    """
    # Before ray.init: Ray's printers bind or look up the function it replaces.
    driver_output_to_stderr()
    if not ray.is_initialized():
        use_train_v2()
        address = os.environ.get("RAY_ADDRESS", "")
        common = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver, "configure_logging": True}
        if address and not address.startswith(("http://", "https://")):
            # Inside a Ray Job (`stoker submit`) Ray sets RAY_ADDRESS to its cluster: join it.
            ray.init(address=address, **common)
        else:
            # An http(s) RAY_ADDRESS names a Jobs API for `stoker submit`, not a cluster to join.
            forget_jobs_api_address()
            # The workers build DeepSpeed's JIT extensions with the `ninja` on their PATH: this
            # environment's, the one `make install` built them with, even when stoker runs
            # without it activated (a different ninja cannot read the other's build log and
            # rebuilds them: minutes on a small machine). The raylet inherits it; this process
            # keeps its own PATH.
            with patched_environ({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}):
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **common)
        # Ray Data logs each execution at INFO on the driver; the epoch lines say what matters.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray.cluster_resources()
