"""The Kubernetes manifests in deploy/k8s/, validated offline.

Every object is checked against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships
(no cluster), for the oldest version the manifests support and the newest it knows, then
against the apps themselves: pods run as non-root with read-only root filesystems and resource
limits, probes name endpoints and ports the apps really serve, and the ConfigMaps' router.yaml
and node.yaml load with fedllm's own loaders and build working apps, with every secret laid out
on disk exactly as the documented `kubectl create secret` commands and `fedllm certs init`
produce it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from fedllm.serving.node.app import create_node_app, create_probe_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.config import load_node_config
from fedllm.serving.router import create_router_app
from fedllm.serving.router.config import load_router_config
from fedllm.serving.router.metrics import RouterMetrics

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
FEDLLM = REPO / ".venv" / "bin" / "fedllm"
# The oldest Kubernetes these manifests support (autoscaling/v2, policy/v1, subPathExpr and
# the restricted Pod Security labels are all GA there) and the newest the package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
DIRECTORIES = ("router", "router-canary", "node")
# Mount points in the manifests, re-rooted under a temporary directory to stand for the pod.
POD_ROOTS = ("/etc/fedllm", "/var/lib/fedllm", "/opt/fedllm")


def render(directory: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` would apply: the kustomization's resources, in order."""
    base = K8S / directory
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((base / resource).read_text()) if doc]
    return objects


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [
        obj
        for directory in DIRECTORIES
        for obj in render(directory)
        if obj["kind"] == kind and obj["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment name, pod spec, container) for every container of every Deployment."""
    return [
        (obj["metadata"]["name"], obj["spec"]["template"]["spec"], container)
        for directory in DIRECTORIES
        for obj in render(directory)
        if obj["kind"] == "Deployment"
        for container in obj["spec"]["template"]["spec"]["containers"]
    ]


def documented_commands(program: str) -> list[str]:
    """The lines of docs/deploy.md's Kubernetes section's shell blocks that run `program`."""
    section = DEPLOY_DOC.read_text().split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith(f"{program} ")]


def documented_secrets() -> dict[tuple[str, str], dict[str, str]]:
    """(namespace, secret) -> {key: source file} from the documented `kubectl create secret`."""
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    for command in documented_commands("kubectl"):
        words = shlex.split(command)
        if words[3:6] not in (["create", "secret", "tls"], ["create", "secret", "generic"]):
            continue
        assert words[1] == "-n", command
        files: dict[str, str] = {}
        for word in words[7:]:
            option, _, value = word.partition("=")
            if option == "--from-file":
                key, _, source = value.partition("=")
                files[key] = source
            elif option in ("--cert", "--key"):
                files["tls.crt" if option == "--cert" else "tls.key"] = value
        secrets[(words[2], words[6])] = files
    return secrets


@pytest.fixture(scope="module")
def credentials_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented `fedllm certs init` command, run as written in a fresh directory."""
    [command] = documented_commands("fedllm certs init")
    cwd = tmp_path_factory.mktemp("k8s-creds")
    words = shlex.split(command)
    result = subprocess.run(
        [str(FEDLLM), *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    postgres = cwd / "postgres"  # the database server's own PKI: any files stand in here
    postgres.mkdir()
    for name in ("ca.crt", "fedllm_router.crt", "fedllm_router.key"):
        (postgres / name).write_text("stand-in\n")
    return cwd


def pod_filesystem(root: Path, deployment: dict[str, Any], workdir: Path) -> None:
    """Lay out under `root` what the pod sees: documented secrets and ConfigMaps at their
    mount paths, empty directories for volumes."""
    namespace = deployment["metadata"]["namespace"]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    secrets = documented_secrets()
    for mount in pod["containers"][0]["volumeMounts"]:
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            for key, source in secrets[(namespace, volume["secret"]["secretName"])].items():
                shutil.copy(workdir / source, target / key)
        elif "configMap" in volume:
            config_map = find("ConfigMap", volume["configMap"]["name"])
            for key, text in config_map["data"].items():
                (target / key).write_text(rerooted(text, root))


def rerooted(text: str, root: Path) -> str:
    for prefix in POD_ROOTS:
        text = text.replace(prefix, f"{root}{prefix}")
    return text


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", DIRECTORIES)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    directory: str, version: str
) -> None:
    objects = render(directory)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_broken_manifest_fails_validation() -> None:
    """The validator really checks: a misspelt field and a wrong type are refused."""
    deployment = find("Deployment", "fedllm-router")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSIONS[0], strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_kustomization_lists_every_manifest(directory: str) -> None:
    listed = set(yaml.safe_load((K8S / directory / "kustomization.yaml").read_text())["resources"])
    present = {path.name for path in (K8S / directory).glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", DIRECTORIES)
def test_kubectl_kustomize_renders_the_same_objects(directory: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(rendered, key=key) == sorted(render(directory), key=key)


def test_every_container_is_non_root_read_only_and_limited() -> None:
    found = containers()
    assert {name for name, _, _ in found} == {
        "fedllm-router",
        "fedllm-router-canary",
        "fedllm-node",
    }
    for name, pod, container in found:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["automountServiceAccountToken"] is False, name
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert resource in resources["requests"], (name, resource)
            assert resource in resources["limits"], (name, resource)
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, (name, probe)


def test_node_requests_a_gpu_and_mounts_the_adapter_volume() -> None:
    deployment = find("Deployment", "fedllm-node")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims["adapter"] == {"claimName": "fedllm-adapter", "readOnly": True}
    find("PersistentVolumeClaim", "fedllm-adapter")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    config = yaml.safe_load(find("ConfigMap", "fedllm-node-config")["data"]["node.yaml"])
    assert str(config["adapter_dir"]).startswith(mounts["adapter"]["mountPath"] + "/")
    assert config["ledger"]["url"].startswith(f"sqlite:///{mounts['ledger']['mountPath']}/")
    # One writer of the SQLite ledger at a time.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_router_scales_on_its_request_rate_with_cpu_fallback_and_keeps_one_pod() -> None:
    hpa = find("HorizontalPodAutoscaler", "fedllm-router")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fedllm-router",
    }
    kinds = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    custom = kinds["Pods"]["pods"]["metric"]["name"]
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    # The documented Prometheus Adapter rule produces that metric from a series the router serves.
    doc = DEPLOY_DOC.read_text()
    assert f'as: "{custom}"' in doc
    metrics = RouterMetrics()
    metrics.requests.labels(endpoint="/v1/inference", status="200").inc()
    assert "fedllm_router_requests_total{" in metrics.render().decode()
    assert "seriesQuery: 'fedllm_router_requests_total{" in doc
    pdb = find("PodDisruptionBudget", "fedllm-router")
    stable = find("Deployment", "fedllm-router")
    assert pdb["spec"]["selector"]["matchLabels"] == stable["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_canary_differs_from_stable_only_in_name_track_image_and_replicas() -> None:
    stable = find("Deployment", "fedllm-router")
    canary = find("Deployment", "fedllm-router-canary")
    assert canary["spec"]["template"]["metadata"]["labels"]["fedllm.io/track"] == "canary"
    image = canary["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image != stable["spec"]["template"]["spec"]["containers"][0]["image"]
    normalised = yaml.safe_dump(canary).replace("canary", "stable").replace(image, "IMAGE")
    expected = yaml.safe_load(
        yaml.safe_dump(stable).replace(
            stable["spec"]["template"]["spec"]["containers"][0]["image"], "IMAGE"
        )
    )
    normalised_obj = yaml.safe_load(normalised)
    normalised_obj["metadata"]["name"] = expected["metadata"]["name"]
    normalised_obj["spec"]["replicas"] = expected["spec"]["replicas"]
    assert normalised_obj == expected
    service = find("Service", "fedllm-router")
    for deployment in (stable, canary):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_documented_secrets_are_exactly_what_the_pods_mount(credentials_dir: Path) -> None:
    secrets = documented_secrets()
    mounted = {
        (deployment["metadata"]["namespace"], volume["secret"]["secretName"])
        for name in ("fedllm-router", "fedllm-node")
        for deployment in [find("Deployment", name)]
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    assert set(secrets) == mounted
    for files in secrets.values():
        for source in files.values():
            assert (credentials_dir / source).is_file(), source


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_documented_secret_commands_run_as_written_with_client_dry_run(
    credentials_dir: Path,
) -> None:
    commands = [c for c in documented_commands("kubectl") if " create secret " in c]
    assert len(commands) == 5
    for command in commands:
        result = subprocess.run(
            [*shlex.split(command), "--dry-run=client", "-o", "yaml"],
            cwd=credentials_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        secret = yaml.safe_load(result.stdout)
        kubernetes_validate.validate(secret, K8S_VERSIONS[0], strict=True)
        words = shlex.split(command)
        assert set(secret["data"]) == set(documented_secrets()[(words[2], words[6])])


def test_router_configmap_loads_and_builds_the_router_from_mounted_secrets(
    credentials_dir: Path, tmp_path: Path
) -> None:
    deployment = find("Deployment", "fedllm-router")
    pod_filesystem(tmp_path, deployment, credentials_dir)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    config_path = Path(rerooted(container["command"][-1], tmp_path))
    config = load_router_config(config_path)
    # The audit directory is the pod's own (subPathExpr), the database the shared PostgreSQL:
    # here a local SQLite file stands in for it, everything else is as mounted.
    audit_mount = next(m for m in container["volumeMounts"] if m["name"] == "audit")
    assert audit_mount["subPathExpr"] == "$(POD_NAME)"
    assert config.audit.path.startswith(str(tmp_path) + audit_mount["mountPath"] + "/")
    assert config.database.url.startswith("postgresql+psycopg://")
    local = config.model_copy(
        update={
            "database": config.database.model_copy(update={"url": f"sqlite:///{tmp_path}/r.db"})
        }
    )
    app = create_router_app(local)
    paths = {route.path for route in app.routes}
    app.state.router.close()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["https"] == config.listen.port
    assert config.listen.host == "0.0.0.0"
    for probe, path in (("livenessProbe", "/v1/health"), ("readinessProbe", "/v1/ready")):
        spec = container[probe]["httpGet"]
        assert (spec["path"], spec["port"], spec["scheme"]) == (path, "https", "HTTPS")
        assert path in paths
    # The node certificate names the host the router calls.
    [node] = config.nodes
    host = urlsplit(node.url).hostname
    cert = x509.load_pem_x509_certificate(
        (credentials_dir / "credentials/nodes/st-mary/server.crt").read_bytes()
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in names.get_values_for_type(x509.DNSName)
    node_service = find("Service", "fedllm-node")
    assert host == f"{node_service['metadata']['name']}.{node_service['metadata']['namespace']}.svc"
    assert urlsplit(node.url).port == node_service["spec"]["ports"][0]["port"]


def test_node_configmap_loads_and_its_probes_hit_served_endpoints(
    credentials_dir: Path, tmp_path: Path
) -> None:
    deployment = find("Deployment", "fedllm-node")
    pod_filesystem(tmp_path, deployment, credentials_dir)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    config = load_node_config(Path(rerooted(container["command"][-1], tmp_path)))
    assert config.authenticates_clients
    assert config.ledger is not None
    app = create_node_app(config, ConstantBackend())
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["https"] == config.port
    assert ports["probe"] == config.probe_port
    readiness = container["readinessProbe"]["httpGet"]
    assert (readiness["port"], readiness["scheme"]) == ("probe", "HTTP")
    assert readiness["path"] in {route.path for route in create_probe_app(app).routes}
    # the node app includes its endpoints as APIRouters, which app.routes lists unexpanded
    assert readiness["path"] in app.openapi()["paths"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == "https"
