"""The entrypoint of a job that `stoker submit` started: `python -m stoker.cluster.entry`.

The resolved run config travels in the job's runtime_env (STOKER_RUN_CONFIG) rather than as a
file the user must keep inside the uploaded directory; it is written next to the job's working
directory and run with `stoker train` (which resumes the run if its directory exists) or, for a
config with a `tune:` section, `stoker tune` (which continues the search): `jobs.job_verb`, the
rule `stoker k8s render` follows too.
"""

import os
import sys
import tempfile
from pathlib import Path

import yaml

from stoker.cli import main
from stoker.cluster.jobs import ENV_CONFIG, job_verb


def run() -> int:
    text = os.environ.get(ENV_CONFIG)
    if not text:
        print(f"stoker: error: {ENV_CONFIG} is not set; this entrypoint is started by `stoker submit`", file=sys.stderr)
        return 2
    verb = job_verb(yaml.safe_load(text) or {})
    # Not in the working directory: that is the user's uploaded copy, left as it came.
    with tempfile.TemporaryDirectory(prefix="stoker-job-") as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(text)
        # --debug: a job's log is where its traceback is needed.
        return main(["--debug", verb, str(config), *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
