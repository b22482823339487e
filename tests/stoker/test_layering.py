"""The layering of DESIGN.md and the one seam for Ray's internals, checked on the source. Fast:
no cluster, no Ray import.

- `lint-imports` (import-linter) checks the contracts in pyproject.toml: each layer imports only
  the layers below it (function-level imports included), every module of stoker is in a layer.
- An `ast` walk checks what import-linter cannot see: no module but `stoker.ray_internals`
  imports a private Ray/DeepSpeed module or sets a RAY_/TUNE_ environment variable.

By hand: `.venv/bin/python -m tests.stoker.test_layering` runs `lint-imports` as the test does.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("stoker", "trainer", "tune", "datasets", "cluster")
SEAM = REPO / "stoker" / "ray_internals.py"
MODULES = sorted(path for folder in PACKAGES for path in (REPO / folder).rglob("*.py"))
# Optional extras are looked for when asked for (an install without them must still run).
OPTIONAL = {"ConfigSpace", "hpbandster"}


def package_tree(root: Path) -> Path:
    """`root/stoker` laid out as the installed package (pyproject's `package-dir`): the code
    folders sit at the top of the repository and map into `stoker.*`, while import-linter
    finds a package's modules by walking its one folder. Links, so it reads the working tree."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = root / "stoker"
    package.mkdir(parents=True)
    for entry in (REPO / mapping["stoker"]).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "stoker":
            (package / name.removeprefix("stoker.")).symlink_to(REPO / folder)
    return root


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    # From the tree's root: lint-imports puts its working directory first on the path.
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache", str(REPO / "pyproject.toml")],
                          cwd=tree, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    done = lint_imports(package_tree(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    # Every contract of the file was checked.
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout, done.stdout


def test_a_contract_fails_on_an_upward_import(tmp_path):
    """The tree is the working tree: an upward import added to a module is seen."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert any(c["type"] == "layers" and c.get("exhaustive") for c in config["contracts"])
    root = package_tree(tmp_path)
    errors = root / "stoker" / "errors.py"
    errors.unlink()
    errors.write_text((REPO / "stoker" / "errors.py").read_text() + "\n\ndef late():\n    from stoker.trainer import run\n")
    done = lint_imports(root)
    assert done.returncode == 1, done.stdout
    assert "stoker.errors is not allowed to import stoker.trainer" in done.stdout, done.stdout


# ---- The seam: private Ray names and RAY_/TUNE_ settings -------------------------------------

RAY_SETTING = ("RAY_", "TUNE_")
MUTATORS = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _strings(tree: ast.AST) -> dict[str, str]:
    """Module-level names bound to a string (`X = "..."`, `X, Y = "...", "..."`)."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))
                for name, value in pairs:
                    if isinstance(name, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                        names[name.id] = value.value
    return names


def _is_environ(node: ast.AST, aliases: set[str]) -> bool:
    """`os.environ` (or `environ` imported from os)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os") or (isinstance(node, ast.Name) and node.id in aliases)


def _seam_names() -> tuple[set[str], set[str]]:
    """What the seam holds: the Ray names it resolves (`_PRIVATE`, by either name) and the
    private attributes it reads or writes (`_attribute(owner, "_name")`)."""
    from stoker import ray_internals

    names = {*ray_internals._PRIVATE, *(attribute for _, attribute in ray_internals._PRIVATE.values())}
    attributes = {call.args[1].value for call in ast.walk(ast.parse(SEAM.read_text()))
                  if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "_attribute"
                  and len(call.args) == 2 and isinstance(call.args[1], ast.Constant)
                  and str(call.args[1].value).startswith("_")}
    return names, attributes


SEAM_NAMES, SEAM_ATTRIBUTES = _seam_names()


def _private_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in ("ray", "deepspeed") and (
        any(part.startswith("_") for part in parts[1:]) or module.startswith("ray.core.generated"))


def violations(source: str) -> list[str]:
    """Where `source` imports a private Ray/DeepSpeed module or name (or one the seam holds),
    touches a private attribute the seam handles, or sets a RAY_/TUNE_ environment variable
    (or sets one it cannot name while naming a RAY_/TUNE_ string)."""
    tree = ast.parse(source)
    constants = _strings(tree)
    mentions = any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(RAY_SETTING)
                   for n in ast.walk(tree))
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "os"
               for a in n.names if a.name == "environ"}
    found = []

    def setting(key: ast.AST | None, line: int) -> None:
        """`key` is set: a RAY_/TUNE_ name, or one the source computes while it names such a
        string (a dict of settings, a loop over names)."""
        name = key.value if isinstance(key, ast.Constant) else constants.get(getattr(key, "id", None))
        if (isinstance(name, str) and name.startswith(RAY_SETTING)) or (not isinstance(name, str) and mentions):
            found.append(f"line {line}: sets {name if isinstance(name, str) else 'a variable it computes'}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if _private_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("ray", "deepspeed"):
            private = [a.name for a in node.names if a.name.startswith("_") or a.name in SEAM_NAMES]
            if _private_module(node.module) or private:
                found.append(f"line {node.lineno}: imports {node.module} {private}")
        elif isinstance(node, ast.Call):
            function = node.func
            if (isinstance(function, ast.Attribute) and function.attr == "import_module") or \
                    (isinstance(function, ast.Name) and function.id in ("__import__", "import_module")):
                if node.args and isinstance(node.args[0], ast.Constant) and _private_module(str(node.args[0].value)):
                    found.append(f"line {node.lineno}: imports {node.args[0].value}")
            elif (getattr(function, "id", None) or getattr(function, "attr", None)) == "patched_environ":
                # stoker.environment's helper sets what its mapping names, as os.environ.update.
                keys = [k for arg in node.args if isinstance(arg, ast.Dict) for k in arg.keys]
                keys += [None for arg in node.args if not isinstance(arg, ast.Dict)]
                for key in keys:
                    setting(key, node.lineno)
            elif isinstance(function, ast.Attribute) and function.attr in ("putenv", "unsetenv") \
                    and isinstance(function.value, ast.Name) and function.value.id == "os":
                setting(node.args[0] if node.args else None, node.lineno)
            elif isinstance(function, ast.Attribute) and function.attr in MUTATORS and _is_environ(function.value, aliases):
                if function.attr == "update":
                    # Literal keys by name; a dict passed whole counts as a computed key.
                    keys = [k for arg in node.args if isinstance(arg, ast.Dict) for k in arg.keys]
                    keys += [ast.Constant(k.arg) for k in node.keywords if k.arg]
                    keys += [None for arg in node.args if not isinstance(arg, ast.Dict)]
                    keys += [None for k in node.keywords if not k.arg]
                    for key in keys:
                        setting(key, node.lineno)
                else:
                    setting(node.args[0] if node.args else None, node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr in SEAM_ATTRIBUTES:
            found.append(f"line {node.lineno}: uses Ray's private {node.attr}")
        if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and _is_environ(target.value, aliases):
                    setting(target.slice, node.lineno)
                elif isinstance(node, ast.AugAssign) and _is_environ(target, aliases):
                    setting(None, node.lineno)
    return found


@pytest.mark.parametrize("path", [p for p in MODULES if p != SEAM], ids=lambda p: str(p.relative_to(REPO)))
def test_ray_internals_and_settings_only_through_the_seam(path):
    assert not violations(path.read_text()), f"{path.relative_to(REPO)}: use stoker.ray_internals"


@pytest.mark.parametrize("source", [
    "from ray._private import worker",
    "import ray._raylet as raylet",
    "from ray.train.v2._internal.execution import storage",
    "from deepspeed.runtime import _private_helper",
    "from ray.tune.trainable.trainable_fn_utils import _in_tune_session",
    "from ray.core.generated import gcs_pb2",
    "import importlib\nimportlib.import_module('ray._private.state')",
    "from ray.train.v2.api.context import LocalTrainContext",
    "import ray.data\nray.data.DataContext.get_current()._execution_idx = 3",
    "import os\nos.environ [\n  'RAY_TRAIN_V2_ENABLED'\n] = '1'",
    "import os\nos.environ.setdefault('TUNE_MAX_PENDING_TRIALS_PG', '4')",
    "import os\nos.environ.update(RAY_AIR_NEW_OUTPUT='0')",
    "import os\nos.environ.update({'TUNE_X': '1'})",
    "import os\nos.putenv('RAY_ADDRESS', 'auto')",
    "import os\nos.environ.pop('RAY_ADDRESS', None)",
    "import os\ndel os.environ['RAY_ADDRESS']",
    "from os import environ as env\nenv['RAY_X'] = '1'",
    "import os\nKEY, VALUE = 'RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', '0.1'\nos.environ.setdefault(KEY, VALUE)",
    "import os\nSETTINGS = {'TUNE_DISABLE_AUTO_CALLBACK_LOGGERS': '1'}\nos.environ.update(SETTINGS)",
    "from stoker.environment import patched_environ\nwith patched_environ({'RAY_X': '1'}):\n    pass",
    "from stoker import environment\nNAMES = {'TUNE_X': None}\nwith environment.patched_environ(NAMES):\n    pass",
])
def test_the_source_check_sees_through_formatting_and_names(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    "import os\nos.environ.setdefault('TQDM_DISABLE', '1')",
    "import os\naddress = os.environ.get('RAY_ADDRESS', '')",
    "import os\nenv = dict(os.environ)\nenv['RAY_AUTH_MODE'] = 'disabled'",
    "import os\ndef group(env):\n    os.environ.update(env)",
    "from stoker.environment import patched_environ\nwith patched_environ({'MASTER_PORT': '1'}):\n    pass",
    "from ray.train.v2.api.exceptions import TrainingFailedError",
    "import ray.data",
])
def test_the_source_check_passes_public_names_and_other_settings(source):
    assert not violations(source)


def test_the_seam_is_what_the_check_exempts():
    assert violations(SEAM.read_text()), "the seam sets RAY_/TUNE_ settings: the check would see them"


# ---- Moved from tests/tune/test_tune_layering.py ---------------------------------------------

def _imports(path):
    """(module imported, inside a function?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
              for node in ast.walk(fn) if node is not fn}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", id(node) in nested


@pytest.mark.parametrize("path", sorted((REPO / "tune").glob("*.py")), ids=lambda p: p.name)
def test_tune_imports_at_module_top(path):
    # What tune/ imports it needs for every search: a trial's process pays it once (reused actors).
    for module, in_function in _imports(path):
        assert not in_function or module in OPTIONAL, f"{path.name}: import of {module} inside a function"


def test_the_package_root_imports_nothing():
    # Every layer imports `stoker` (for __version__); the contracts cannot place the root itself.
    assert not list(_imports(REPO / "stoker" / "__init__.py"))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        done = lint_imports(package_tree(Path(tmp)))
    print(done.stdout, done.stderr, sep="", end="")
    sys.exit(done.returncode)
