"""The entrypoint of a job that `stoker submit` started: `python -m stoker.cluster.entry`.

The resolved run config travels in the job's runtime_env (STOKER_RUN_CONFIG) rather than as a
file the user must keep inside the uploaded directory; it is written next to the job's working
directory and trained with `stoker train`, which resumes the run if its directory exists.
"""

import os
import sys
import tempfile
from pathlib import Path

from stoker.cli import main
from stoker.cluster.jobs import ENV_CONFIG


def run() -> int:
    text = os.environ.get(ENV_CONFIG)
    if not text:
        print(f"stoker: error: {ENV_CONFIG} is not set; this entrypoint is started by `stoker submit`", file=sys.stderr)
        return 2
    # Not in the working directory: that is the user's uploaded copy, left as it came.
    with tempfile.TemporaryDirectory(prefix="stoker-job-") as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(text)
        # --debug: a job's log is where its traceback is needed.
        return main(["--debug", "train", str(config), *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
