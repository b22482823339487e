"""Where the CRD-schema tests find KubeRay's CRDs, and what they do without them.

Each case copies tests/k8s/conftest.py into a fresh repository-shaped folder under tmp_path
(so `../shared` beside it does not exist) and runs pytest there on one test that validates a
rendered RayJob.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent

PROBE = '''
from stoker.cluster.k8s.render import render_rayjob
from stoker.config import parse_config


def test_rayjob_against_the_crd(validate):
    cfg = parse_config({"name": "x", "storage": "/mnt/shared/runs", "scaling": {"num_workers": 2},
                        "data": {"source": "/mnt/shared/d.csv", "label": "y", "output": "/mnt/shared/p"}}, "run.yaml")
    validate(render_rayjob(cfg, "name: x\\n", "local-cpu", "x")[1])
'''


def run_probe(root: Path, **env) -> subprocess.CompletedProcess:
    tests = root / "repo" / "tests" / "k8s"
    tests.mkdir(parents=True)
    (root / "repo" / "k8s" / "overlays").mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", tests / "conftest.py")
    (tests / "test_probe.py").write_text(PROBE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_KUBERAY_CRDS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tests)],
        cwd=root / "repo",
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_crds_the_schema_tests_skip_with_the_reason(tmp_path):
    done = run_probe(tmp_path, STOKER_KUBERAY_CRDS=str(tmp_path / "nonexistent"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "KubeRay v1.7.0 CRDs" in done.stdout and "set STOKER_KUBERAY_CRDS" in done.stdout
    assert str(tmp_path / "shared" / "schemas" / "kuberay") in done.stdout  # ../shared was tried


def test_ci_can_require_them(tmp_path):
    done = run_probe(tmp_path, STOKER_KUBERAY_CRDS_REQUIRED="1")
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout
    assert "KubeRay v1.7.0 CRDs" in done.stdout


@pytest.mark.parametrize("where", ["env", "shared-beside-the-repo"])
def test_crds_are_found_and_used(tmp_path, where, kuberay_crds):
    if where == "env":
        crds = tmp_path / "elsewhere"
        env = {"STOKER_KUBERAY_CRDS": str(crds)}
    else:
        crds = tmp_path / "shared" / "schemas" / "kuberay"
        env = {"STOKER_KUBERAY_CRDS_REQUIRED": "1"}
    shutil.copytree(kuberay_crds, crds)
    done = run_probe(tmp_path, **env)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr

    # Really validated: a RayJob CRD that refuses every RayJob makes the probe fail.
    rayjobs = crds / "ray.io_rayjobs.yaml"
    crd = yaml.load(rayjobs.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for version in crd["spec"]["versions"]:
        version["schema"]["openAPIV3Schema"]["required"] = ["no-such-field"]
    rayjobs.write_text(yaml.dump(crd, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
    shutil.rmtree(tmp_path / "repo")
    done = run_probe(tmp_path, **env)
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout + done.stderr
