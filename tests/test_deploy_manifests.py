"""deploy/: Kubernetes manifests validated strictly against the Kubernetes OpenAPI schemas
(kubernetes-validate, unknown fields are errors), the KServe InferenceService against a strict
schema generated from KServe's SDK models, and the contract between them and the images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE_MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
KSERVE_MANIFESTS = sorted((DEPLOY / "kserve").glob("*.yaml"))
KSERVE_SCHEMA = DEPLOY / "schemas" / "kserve-inferenceservice-v1beta1.json"
# Oldest Kubernetes minor still supported by the major clouds, and the newest schema shipped.
KUBE_VERSIONS = ["1.29", "1.37"]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind() -> dict[str, dict]:
    found = {}
    for path in KUBE_MANIFESTS:
        for doc in documents(path):
            found[doc["kind"]] = doc
    return found


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_manifests_are_there():
    kinds = set(by_kind())
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Job"}
    assert expected <= kinds
    assert KSERVE_MANIFESTS


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_schema_strict(path, version):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in documents(path):
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in KUBE_MANIFESTS)


@pytest.fixture(scope="module")
def kserve_validator():
    kv = pytest.importorskip("kubernetes_validate")
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    schema = json.loads(KSERVE_SCHEMA.read_text())
    k8s_file = (
        Path(kv.__file__).parent
        / "kubernetes-json-schema"
        / "v1.37.0-local-strict"
        / "_definitions.json"
    )
    k8s = json.loads(k8s_file.read_text())
    registry = referencing.Registry().with_resources(
        [
            (k8s["$id"], referencing.Resource.from_contents(k8s)),
            (schema["$id"], referencing.Resource.from_contents(schema)),
        ]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("path", KSERVE_MANIFESTS, ids=lambda p: p.name)
def test_kserve_schema_strict(path, kserve_validator):
    for doc in documents(path):
        errors = [
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in kserve_validator.iter_errors(doc)
        ]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_kserve_validator_rejects_mistakes(kserve_validator):
    """The generated schema is strict: a misspelt field or a wrong type is an error."""
    isvc = documents(KSERVE_MANIFESTS[0])[0]
    bad_field = json.loads(json.dumps(isvc))
    bad_field["spec"]["predictor"]["minReplica"] = 1
    assert not kserve_validator.is_valid(bad_field)
    bad_type = json.loads(json.dumps(isvc))
    bad_type["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    assert not kserve_validator.is_valid(bad_type)
    no_predictor = json.loads(json.dumps(isvc))
    del no_predictor["spec"]["predictor"]
    assert not kserve_validator.is_valid(no_predictor)


def _probe_paths(container: dict) -> dict[str, str]:
    return {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if kind in container
    }


def _grace(pod_spec: dict, container: dict) -> None:
    """Pod grace period covers the preStop pause plus the service's drain time."""
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env_of(container)["BNSERVE_GRACEFUL_TIMEOUT"])
    assert pod_spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 1


def test_deployment_contract():
    kinds = by_kind()
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert _probe_paths(container) == {
        "startupProbe": "/v2/health/live",
        "livenessProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
    }
    env = env_of(container)
    assert all(name.startswith("BNSERVE_") for name in env)
    assert env["BNSERVE_HOST"] == "0.0.0.0"
    port = int(env["BNSERVE_PORT"])
    assert container["ports"][0]["containerPort"] == port
    assert container["ports"][1]["containerPort"] == int(env["BNSERVE_GRPC_PORT"])
    assert not container.get("command"), "config is env only"
    assert not container.get("args"), "config is env only"
    # non-root, the image's uid; repository read-only
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[env["BNSERVE_REPOSITORY"]]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[env["BNSERVE_REPOSITORY"]]["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    _grace(spec, container)
    # rolling update never drops below the desired ready count
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    service = kinds["Service"]
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", port)
    grpc_port = service["spec"]["ports"][1]
    assert grpc_port["targetPort"] == container["ports"][1]["name"] == "grpc"

    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    # the HPA needs CPU requests to compute utilization
    assert "cpu" in container["resources"]["requests"]


def test_export_job_contract():
    kinds = by_kind()
    job = kinds["Job"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"].split(":")[0] == "bnserve-export"
    assert container["args"][:3] == ["demo", "--repository", "/models"]
    assert spec["restartPolicy"] == "Never"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/models"].get("readOnly"), "the export job writes the repository"
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    # one volume written by the job and read by many pods
    assert "ReadWriteMany" in kinds["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_kserve_custom_v2_predictor():
    isvc = documents(KSERVE_MANIFESTS[0])[0]
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"].split(":")[0] == "bnserve-service"
    env = env_of(container)
    claim = by_kind()["PersistentVolumeClaim"]["metadata"]["name"]
    assert re.fullmatch(rf"pvc://{claim}(/.*)?", env["STORAGE_URI"])
    # KServe mounts the storage at /mnt/models
    assert env["BNSERVE_REPOSITORY"] == "/mnt/models"
    assert container["ports"][0]["containerPort"] == int(env["BNSERVE_PORT"])
    assert container["ports"][1] == {
        "name": "grpc-port", "containerPort": int(env["BNSERVE_GRPC_PORT"]), "protocol": "TCP"
    }  # fmt: skip
    assert _probe_paths(container)["readinessProbe"] == "/v2/health/ready"
    assert _probe_paths(container)["livenessProbe"] == "/v2/health/live"
    _grace(predictor, container)


def test_images_in_manifests_match_dockerfile_user():
    """The pods' runAsUser is the uid the Dockerfile creates and switches to."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    users = set(re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE))
    assert users == {("10001", "10001")}
