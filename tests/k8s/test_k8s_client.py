"""apply/status/delete through the real `kubernetes` client against a loopback fake API server."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from stoker.cluster.k8s import client
from stoker.cluster.k8s.render import K8sConfigError, render_rayjob
from stoker.config import parse_config

NS = "stoker"
CONFIG = parse_config({"name": "digits-demo", "storage": "/mnt/shared/runs", "scaling": {"num_workers": 2},
                       "data": {"source": "/mnt/shared/data/digits.csv", "label": "target",
                                "output": "/mnt/shared/prepared/digits"}}, "run.yaml")


class FakeAPIServer:
    """Answers the handful of endpoints stoker uses, the way the API server does."""

    def __init__(self):
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}  # path -> stored object
        self.crds = True
        self.job_statuses: list[dict] = []  # popped per GET of a RayJob; last one sticks
        self.pods: list[dict] = []
        self.reject: dict[str, tuple[int, str]] = {}  # path -> (status, message)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append({
                    "method": self.command, "path": url.path, "query": parse_qs(url.query),
                    "headers": dict(self.headers), "body": body,
                })
                status, payload = server.answer(self.command, url.path, parse_qs(url.query), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, method, path, query, body):
        not_found = {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                     "message": f"{path} not found"}
        if path in self.reject:
            code, message = self.reject[path]
            return code, {"kind": "Status", "status": "Failure", "code": code, "message": message}
        if path == "/apis/ray.io/v1":
            if not self.crds:
                return 404, not_found
            return 200, {"kind": "APIResourceList", "groupVersion": "ray.io/v1", "resources": [
                {"name": n, "namespaced": True, "kind": k}
                for n, k in (("rayclusters", "RayCluster"), ("rayjobs", "RayJob"), ("rayservices", "RayService"))
            ]}
        if path.endswith("/pods") and method == "GET":
            selector = query.get("labelSelector", [""])[0]
            key, _, value = selector.partition("=")
            items = [p for p in self.pods if p["metadata"].get("labels", {}).get(key) == value]
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": items}
        if method == "PATCH":
            stored = {**body, "metadata": {**body["metadata"], "uid": "u-1", "resourceVersion": "1"}}
            if "dryRun" not in query:
                self.objects[path] = stored
            return 200, stored
        if method == "GET":
            if path not in self.objects:
                return 404, not_found
            obj = dict(self.objects[path])
            if "/rayjobs/" in path and self.job_statuses:
                obj["status"] = self.job_statuses.pop(0) if len(self.job_statuses) > 1 else self.job_statuses[0]
            return 200, obj
        if method == "DELETE":
            if self.objects.pop(path, None) is None:
                return 404, not_found
            return 200, {"kind": "Status", "status": "Success"}
        return 405, {"kind": "Status", "message": "unexpected"}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    fake = FakeAPIServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "ci", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ci", "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    fake.close()


def rendered():
    return render_rayjob(CONFIG, "name: digits-demo\n", "local-cpu", "digits-demo")


def test_apply_is_a_server_side_apply_per_object(server):
    applied = client.apply(rendered(), NS)
    patches = [r for r in server.requests if r["method"] == "PATCH"]
    config_map = f"/api/v1/namespaces/{NS}/configmaps/digits-demo-config"
    assert [r["path"] for r in patches] == [
        config_map,  # first: the head pod mounts it as soon as KubeRay starts the cluster
        f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/digits-demo",
        config_map,  # then owned by the RayJob, so DeleteSelf takes it along
    ]
    for r in patches:
        assert r["headers"]["Content-Type"] == "application/apply-patch+yaml"
        assert r["headers"]["authorization"] == "Bearer test-token"
        assert r["query"] == {"fieldManager": ["stoker"], "force": ["true"], "fieldValidation": ["Strict"]}
        assert r["body"]["metadata"]["namespace"] == NS
    assert "ownerReferences" not in patches[0]["body"]["metadata"]
    assert patches[2]["body"]["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "digits-demo", "uid": "u-1"}
    ]
    assert [o["kind"] for o in applied] == ["ConfigMap", "RayJob"]
    assert applied[0]["metadata"]["ownerReferences"][0]["uid"] == applied[1]["metadata"]["uid"]
    assert server.objects[config_map]["metadata"]["ownerReferences"][0]["name"] == "digits-demo"
    # The CRD check comes first, so a cluster without KubeRay fails before anything is written.
    assert server.requests[0]["path"] == "/apis/ray.io/v1"


def test_apply_dry_run_stores_nothing(server):
    client.apply(rendered(), NS, dry_run=True)
    patches = [r for r in server.requests if r["method"] == "PATCH"]
    assert len(patches) == 2 and all(r["query"].get("dryRun") == ["All"] for r in patches)
    assert server.objects == {}


def test_missing_kuberay_crds_are_named(server):
    server.crds = False
    with pytest.raises(K8sConfigError, match=r"^KubeRay CRDs: ray.io/v1 is not served"):
        client.apply(rendered(), NS)
    assert not [r for r in server.requests if r["method"] == "PATCH"]


def test_missing_kubeconfig_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(K8sConfigError, match=r"^kubeconfig: "):
        client.apply(rendered(), NS)


def test_unreachable_api_server_is_named(server):
    server.close()
    with pytest.raises(K8sConfigError, match=r"^cluster: cannot reach the API server at http://127"):
        client.status("digits-demo", NS, 0)


def test_rejected_object_names_it(server):
    server.reject[f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/digits-demo"] = (422, 'RayJob "digits-demo" is invalid')
    with pytest.raises(K8sConfigError, match=r"^rayjob/digits-demo: PATCH refused by the API server \(422\): RayJob"):
        client.apply(rendered(), NS)


def test_unknown_kind_is_refused_before_any_request(server):
    with pytest.raises(K8sConfigError, match=r"^objects\[0\]: v1/Secret is not a kind stoker applies"):
        client.apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}], NS)
    assert server.requests == []


def _pod(name, **status):
    return {"metadata": {"name": name, "labels": {"stoker.io/run": "digits-demo"}}, "status": status}


def test_status_reports_a_stuck_image_pull_as_pending_with_reason(server):
    client.apply(rendered(), NS)
    server.job_statuses = [{"jobDeploymentStatus": "Initializing", "jobStatus": "PENDING",
                            "rayClusterName": "digits-demo-abcde"}]
    server.pods = [
        _pod("digits-demo-head", phase="Running"),
        _pod("digits-demo-cpu-worker", phase="Pending", containerStatuses=[{
            "name": "ray-worker",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "stoker:0.1.0"'}},
        }]),
    ]
    started = time.monotonic()
    state = client.status("digits-demo", NS, deadline_s=0.3, poll_s=0.05)
    assert time.monotonic() - started < 5
    assert state.state == "pending" and state.timed_out
    assert state.reason.startswith("ImagePullBackOff: pod digits-demo-cpu-worker container ray-worker")
    assert state.pods == {"digits-demo-head": "Running", "digits-demo-cpu-worker": "ImagePullBackOff"}
    polls = [r for r in server.requests if r["path"].endswith("/rayjobs/digits-demo") and r["method"] == "GET"]
    assert len(polls) >= 2


def test_status_follows_the_job_to_success(server):
    client.apply(rendered(), NS)
    server.job_statuses = [
        {"jobDeploymentStatus": "Initializing", "jobStatus": "PENDING"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
    ]
    state = client.status("digits-demo", NS, deadline_s=10, poll_s=0.01)
    assert (state.state, state.timed_out) == ("succeeded", False)


def test_status_of_a_missing_job_is_named(server):
    with pytest.raises(K8sConfigError, match=f"^rayjob/nope: not found in namespace {NS} \\(a finished RayJob is deleted by its deletion rules"):
        client.status("nope", NS, 0)


def test_delete_removes_job_and_config_and_skips_what_is_gone(server):
    client.apply(rendered(), NS)
    assert client.delete("digits-demo", NS) == ["rayjob/digits-demo", "configmap/digits-demo-config"]
    deletes = [r for r in server.requests if r["method"] == "DELETE"]
    assert deletes[0]["body"] == {"propagationPolicy": "Background"}
    assert client.delete("digits-demo", NS) == []


@pytest.mark.parametrize(
    ("status", "pods", "state", "reason"),
    [
        ({}, [], "pending", "New"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, [], "running", ""),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, [], "succeeded", ""),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "reason": "AppFailed", "message": "exit 1"},
         [], "failed", "AppFailed: exit 1"),
        ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, [], "failed", "DeadlineExceeded"),
        ({"jobDeploymentStatus": "Retrying", "failed": 1}, [], "pending", "Retrying (1 failed of backoffLimit 2)"),
        ({"jobDeploymentStatus": "Initializing"},
         [_pod("w", phase="Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                                   "reason": "Unschedulable", "message": "0/3 nodes: Insufficient nvidia.com/gpu"}])],
         "pending", "Unschedulable: pod w: 0/3 nodes: Insufficient nvidia.com/gpu"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
         [_pod("w", phase="Running", containerStatuses=[{"name": "ray-worker", "state": {},
                                                           "lastState": {"terminated": {"reason": "OOMKilled"}}}])],
         "running", "OOMKilled: pod w container ray-worker"),
    ],
)
def test_reconcile(status, pods, state, reason):
    job = {"spec": {"backoffLimit": 2}, "status": status}
    got = client.reconcile(job, pods)
    assert got.state == state and got.reason.startswith(reason)


@pytest.mark.parametrize("deployment", ["", "New", "Suspended"])
def test_a_queued_job_waits_for_kueue(deployment):
    job = render_rayjob(CONFIG, "name: digits-demo\n", "local-cpu", "digits-demo", queue="team-gpu")[1]
    job["status"] = {"jobDeploymentStatus": deployment} if deployment else {}
    got = client.reconcile(job, [])
    assert (got.state, got.reason) == ("pending", "Suspended: waiting for admission (Kueue queue 'team-gpu')")
    job["spec"]["suspend"] = False  # admitted: KubeRay takes over
    job["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    assert client.reconcile(job, []).state == "running"


def test_against_a_real_cluster():
    """Server-side dry-run apply on whatever cluster KUBECONFIG points at."""
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("KUBECONFIG is not set: no real cluster to test against")
    namespace = os.environ.get("STOKER_K8S_TEST_NAMESPACE", "default")
    applied = client.apply(rendered(), namespace, dry_run=True)
    assert [o["kind"] for o in applied] == ["ConfigMap", "RayJob"]
