"""tune/ sits below stoker.config and reaches Ray's internals through one seam. Fast: no cluster."""

import ast
import os
import subprocess
import sys
import threading

import pytest
import ray.tune.trainable.trainable_fn_utils as tune_fn_utils

from stoker.tune import ray_internals
from tests.conftest import REPO, write_config

MODULES = sorted((REPO / "tune").glob("*.py"))
SEAM = "ray_internals.py"
# Optional extras are looked for when asked for (an install without them must still run).
OPTIONAL = {"ConfigSpace", "hpbandster"}


def imports(path):
    """(module imported, names, inside a function?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
              for node in ast.walk(fn) if node is not fn}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", [a.name for a in node.names], id(node) in nested


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_tune_imports_nothing_above_it_and_imports_at_module_top(path):
    for module, names, in_function in imports(path):
        assert not module.startswith("stoker.config") and not (module == "stoker" and "config" in names), \
            f"{path.name} imports stoker.config, which composes tune/'s section"
        assert not module.startswith(("stoker.commands", "stoker.cli")), f"{path.name} imports the CLI"
        if in_function:
            assert module in OPTIONAL, f"{path.name}: import of {module} inside a function"


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != SEAM], ids=lambda p: p.name)
def test_private_ray_names_only_through_the_seam(path):
    for module, names, _ in imports(path):
        if not module.startswith("ray"):
            continue
        private = [part for part in module.split(".") if part.startswith("_")] + [n for n in names if n.startswith("_")]
        assert not private and not module.startswith("ray.core.generated"), f"{path.name}: {module} {names}"
    assert "ray._private" not in path.read_text()


def test_a_ray_other_than_the_seams_stops_the_cli_with_one_line_naming_both(tmp_path):
    path = write_config(tmp_path, {"name": "x"})  # never read: the import stops first
    script = ("import sys, ray; ray.__version__ = '2.61.1'\n"
              "from stoker.cli import main\n"
              f"sys.exit(main(['tune', {str(path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray 2.61.1 is installed" in lines[0], done.stderr
    assert f"written for ray {ray_internals.WRITTEN_FOR}" in lines[0]


def test_the_train_api_hook_is_for_one_thread_and_one_block_only():
    original = tune_fn_utils._in_tune_session
    seen = {}

    def other_thread():
        seen["other"] = tune_fn_utils._in_tune_session is not original and tune_fn_utils._in_tune_session()

    with pytest.raises(KeyError), ray_internals.train_api_in_this_thread():
        # Inside: this thread is a Train worker; another thread gets the original answer.
        assert tune_fn_utils._in_tune_session() is False
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        raise KeyError("the loop failed")
    assert seen["other"] == original()
    # Put back even though the block raised: nothing outlives the trial.
    assert tune_fn_utils._in_tune_session is original


def test_a_missing_private_name_fails_with_one_line_naming_it():
    with pytest.raises(RuntimeError, match=r"^ray 2\.60\.0: object has no '_mark_trial_to_checkpoint'; "
                                           r"stoker.tune.ray_internals needs updating"):
        ray_internals.mark_trial_to_checkpoint(object(), None)
