"""Kubernetes (KubeRay) support for stoker: render, check and submit RayJobs.

Public API (the `stoker k8s render|apply|status|delete` verbs call these):

- `stoker.cluster.k8s.render.render_rayjob(run, config_text, overlay, run_name, **options)
  -> list[dict]`: pure; a ConfigMap carrying the run config plus a RayJob sized from the
  validated run (`stoker.trainer.run_spec.RunSpec`; the CLI's `RunConfig` is one).
- `stoker.cluster.k8s.render.K8sConfigError(ValueError)`: bad input, missing kubeconfig or
  missing KubeRay CRDs; one-line message that names the key at fault.
- `stoker.cluster.k8s.client.apply / status / delete`: talk to a cluster with the official
  `kubernetes` client (imported lazily, so rendering needs no kubeconfig).

The manifests themselves live in the repository's `k8s/` folder (kustomize base + overlays).
The rules every manifest must meet are checked by the tests, not shipped: Checkov for the
generic Pod Security/image/resource/RBAC rules, `tests/k8s/policy.py` for stoker's own.
"""

from stoker.cluster.k8s.profiles import OVERLAYS
from stoker.cluster.k8s.render import K8sConfigError, render_rayjob

__all__ = ["OVERLAYS", "K8sConfigError", "render_rayjob"]
