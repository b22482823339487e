"""Shared fixtures for the Kubernetes tests: kustomize builds and schema validators.

Fixtures rather than a helper module, so these tests work under any pytest import mode.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# KubeRay's CRDs are never copied into the repository: $STOKER_KUBERAY_CRDS names a folder of
# them, else CI's checkout has shared/ beside the repo. Without either, the tests that need them
# skip with the reason (a bare clone's `make test` passes); CI sets STOKER_KUBERAY_CRDS_REQUIRED=1
# so a lost schema folder fails there instead of quietly skipping.
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
OVERLAY_NAMES = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
SAMPLES = sorted((K8S / "samples").glob("*.yaml"))
# Validate built-in kinds against the newest Kubernetes the installed kubernetes-validate knows.
K8S_VERSION = kubernetes_validate.latest_version()


def kustomize(path: Path) -> list[dict]:
    """`kubectl kustomize PATH` parsed; skips (with the reason) when kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH: cannot run `kubectl kustomize` to build the overlays")
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [o for o in yaml.safe_load_all(done.stdout) if o]


@functools.cache
def _built(name: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / "overlays" / name))


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request) -> tuple[str, list[dict]]:
    """(name, objects) for each overlay, built once per session."""
    return request.param, copy.deepcopy(list(_built(request.param)))


@pytest.fixture(scope="session")
def build():
    return kustomize


def _strict(schema):
    """CRD schemas allow unknown fields; the API server prunes or (strict) rejects them.

    Close every object schema that lists its properties, so a misspelt field fails here
    instead of vanishing silently on the cluster.
    """
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_candidates() -> list[Path]:
    """Where the CRDs are looked for, in order: $STOKER_KUBERAY_CRDS, then ../shared."""
    found = [Path(os.environ["STOKER_KUBERAY_CRDS"])] if os.environ.get("STOKER_KUBERAY_CRDS") else []
    return [*found, REPO.parent / "shared" / "schemas" / "kuberay"]


def crd_dir() -> Path:
    """The first candidate holding all three KubeRay CRDs; skips the calling test otherwise."""
    candidates = crd_candidates()
    for folder in candidates:
        if all((folder / name).is_file() for name in CRD_FILES):
            return folder
    reason = (
        f"KubeRay v1.7.0 CRDs ({', '.join(CRD_FILES)}) not found in "
        + " or ".join(str(c) for c in candidates)
        + "; set STOKER_KUBERAY_CRDS to a folder holding them"
    )
    if os.environ.get("STOKER_KUBERAY_CRDS_REQUIRED") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@functools.cache
def _crd_schemas(folder: Path) -> dict[tuple[str, str], tuple[dict, jsonschema.protocols.Validator]]:
    schemas = {}
    for path in sorted(folder.glob("ray.io_*.yaml")):
        # libyaml's safe loader when present: the pure-Python one takes seconds per CRD.
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            validator = jsonschema.Draft7Validator(_strict(schema))
            schemas[(f"{group}/{version['name']}", kind)] = (schema, validator)
    return schemas


# The CEL rules (x-kubernetes-validations) of KubeRay's CRDs are checked by the API server, not
# by jsonschema. They are small boolean expressions; this evaluates the shapes they use, and an
# unknown shape fails the test instead of passing unchecked.
_CEL_TOKEN = re.compile(r"\s*(has\(self\.\w+\)|self == oldSelf|self in \[[^\]]*\]|&&|\|\||!|\(|\))")


def cel_holds(rule: str, value) -> bool:
    """Evaluate one x-kubernetes-validations rule on `value` (an object being created)."""
    tokens, pos = [], 0
    while pos < len(rule.rstrip()):
        match = _CEL_TOKEN.match(rule, pos)
        if not match:
            raise AssertionError(f"CEL rule {rule!r}: cannot evaluate {rule[pos:]!r}; extend cel_holds")
        tokens.append(match.group(1))
        pos = match.end()

    def atom(token: str) -> bool:
        if token.startswith("has("):
            return isinstance(value, dict) and token[len("has(self."):-1] in value
        if token == "self == oldSelf":
            return True  # a transition rule: only updates are checked
        allowed = [v.strip().strip("'\"") for v in token[len("self in ["):-1].split(",")]
        return value in allowed

    def parse(i: int, level: int) -> tuple[bool, int]:
        # level 0: a || b, level 1: a && b, level 2: !a, (a), atom
        if level == 2:
            if tokens[i] == "!":
                result, i = parse(i + 1, 2)
                return not result, i
            if tokens[i] == "(":
                result, i = parse(i + 1, 0)
                assert tokens[i] == ")", rule
                return result, i + 1
            return atom(tokens[i]), i + 1
        operator = "||" if level == 0 else "&&"
        result, i = parse(i, level + 1)
        while i < len(tokens) and tokens[i] == operator:
            right, i = parse(i + 1, level + 1)
            result = (result or right) if level == 0 else (result and right)
        return result, i

    result, end = parse(0, 0)
    assert end == len(tokens), f"CEL rule {rule!r}: trailing tokens"
    return result


def _cel_errors(schema: dict, value, path: str) -> list[str]:
    errors = [
        f"{path or '.'}: {rule.get('message', rule['rule'])}"
        for rule in schema.get("x-kubernetes-validations") or []
        if not cel_holds(rule["rule"], value)
    ]
    if isinstance(value, dict):
        for key, child in value.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                errors += _cel_errors(sub, child, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            errors += _cel_errors(schema["items"], child, f"{path}[{i}]")
    return errors


def validate_crd_object(obj: dict) -> None:
    """Validate a ray.io object against its CRD version's openAPIV3Schema, CEL rules included;
    raise with paths."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    schemas = _crd_schemas(crd_dir())
    assert key in schemas, f"no CRD schema for {key}; known: {sorted(schemas)}"
    schema, validator = schemas[key]
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
    messages = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20]]
    if not messages:
        messages = [f"{name}: {problem}" for problem in _cel_errors(schema, obj, "")]
    assert not messages, "\n".join(messages)


def validate_builtin_object(obj: dict) -> None:
    """Validate a built-in kind with kubernetes-validate, strict (unknown fields fail)."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
        path = ".".join(map(str, exc.absolute_path))
        raise AssertionError(f"{name}: {path}: {exc.message}") from None


@pytest.fixture
def validate():
    """validate(obj): CRD schema for ray.io objects, kubernetes-validate for the rest."""

    def _validate(obj: dict) -> None:
        if str(obj.get("apiVersion", "")).startswith("ray.io/"):
            validate_crd_object(obj)
        else:
            validate_builtin_object(obj)

    return _validate


@pytest.fixture
def kuberay_crds() -> Path:
    """The folder holding KubeRay's CRDs; the test skips (or fails in CI) without one."""
    return crd_dir()


@pytest.fixture
def cel():
    """cel(rule, value) -> bool: the CEL evaluator validate() applies to ray.io objects."""
    return cel_holds


@pytest.fixture
def samples() -> list[tuple[str, list[dict]]]:
    return [(p.name, [o for o in yaml.safe_load_all(p.read_text()) if o]) for p in SAMPLES]
