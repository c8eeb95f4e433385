"""The Kubernetes manifests and the image: valid against the Kubernetes API schema, and every pod
pullable from a local build, probed, sized and run as a user other than root."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.helpers import REPO

MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
KUBERNETES_VERSION = "1.33.0"  # a release current clusters run


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def workloads() -> list[tuple[str, dict]]:
    return [(f"{name}:{doc['metadata']['name']}", doc) for name, doc in documents() if doc["kind"] in ("Deployment", "StatefulSet", "Job")]


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_manifest_validates_strictly_against_the_kubernetes_schema(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(("name", "doc"), workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_pod_pulls_a_local_image_is_probed_sized_and_not_root(name, doc):
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"]
    for container in pod["containers"]:
        assert container["imagePullPolicy"] == "IfNotPresent", name
        assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"], name
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def test_the_image_runs_as_the_manifests_user_with_cpu_torch_and_its_build_context_leaves_out_local_state():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile
    assert "ARG TORCH_BACKEND=cpu" in dockerfile and "--torch-backend=$TORCH_BACKEND" in dockerfile, "torch: the CPU build unless asked"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "*.pth"} <= set(ignored)


def test_every_service_is_a_job_so_a_finished_run_is_never_started_again():
    """A Deployment restarts a container that exits 0; a Job restarts only a failed one (which resumes)."""
    kinds = {name: doc["kind"] for name, doc in workloads()}
    assert set(kinds.values()) == {"Job"}, kinds
    for name, doc in workloads():
        assert doc["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure", name
    (rollout,) = [doc for name, doc in workloads() if doc["metadata"]["name"] == "titan-rollout"]
    assert rollout["spec"]["completionMode"] == "Indexed", "each actor pod needs its own replica_id"
    assert "JOB_COMPLETION_INDEX" in " ".join(rollout["spec"]["template"]["spec"]["containers"][0]["command"])
