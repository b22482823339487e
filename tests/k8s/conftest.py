"""Shared fixtures for the Kubernetes tests: kustomize builds and schema validators.

Fixtures rather than a helper module, so these tests work under any pytest import mode.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# CI clones the repository with shared/ beside it; the CRDs are never copied into the repo.
CRD_DIR = REPO.parent / "shared" / "schemas" / "kuberay"
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


@pytest.fixture
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


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (clone shared/ beside the repo)")
    validators = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def validate_crd_object(obj: dict) -> None:
    """Validate a ray.io object against its CRD version's openAPIV3Schema; raise with paths."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    validators = _crd_validators()
    assert key in validators, f"no CRD schema for {key}; known: {sorted(validators)}"
    errors = sorted(validators[key].iter_errors(obj), key=lambda e: list(e.absolute_path))
    name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
    assert not errors, "\n".join(
        f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20]
    )


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
def samples() -> list[tuple[str, list[dict]]]:
    return [(p.name, [o for o in yaml.safe_load_all(p.read_text()) if o]) for p in SAMPLES]
