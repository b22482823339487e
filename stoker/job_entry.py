"""The entrypoint of a job that `stoker submit` started: `python -m stoker.job_entry`, a
program that runs the CLI (so it sits beside it, above stoker.cluster).

The resolved run config travels in the job's runtime_env (STOKER_RUN_CONFIG) rather than as a
file the user must keep inside the uploaded directory; it is written next to the job's working
directory and run with `stoker train` (which resumes the run if its directory exists) or, for a
config with a `tune:` section, `stoker tune` (which continues the search): `jobs.job_verb`, the
rule `stoker k8s render` follows too. Its paths are absolute (`stoker submit` resolved them on
the submitting machine); a relative storage is refused, since it would put the run in the job's
temporary working directory.
"""

import os
import sys
import tempfile
from pathlib import Path

import yaml

from stoker.cluster.jobs import ENV_CONFIG, job_verb


def run() -> int:
    text = os.environ.get(ENV_CONFIG)
    if not text:
        print(f"stoker: error: {ENV_CONFIG} is not set; this entrypoint is started by `stoker submit`", file=sys.stderr)
        return 2
    config = yaml.safe_load(text) or {}
    verb = job_verb(config)
    storage = str(config.get("storage") or "runs")
    if "://" not in storage and not os.path.isabs(storage):
        # The job's working directory is Ray's temporary copy of the upload, deleted with the
        # job: a run written there would be lost. `stoker submit` always sends absolute paths.
        print(f"stoker: error: storage: {storage} is relative, so the run would be written into the job's "
              "temporary working directory; give an absolute path on shared storage or an s3:// URI",
              file=sys.stderr)
        return 2
    from stoker.cli import main  # after the checks: a refused job answers without the CLI's imports

    # Not in the working directory: that is the user's uploaded copy, left as it came.
    with tempfile.TemporaryDirectory(prefix="stoker-job-") as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text)
        # --debug: a job's log is where its traceback is needed.
        return main(["--debug", verb, str(path), *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
