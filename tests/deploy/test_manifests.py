"""The Kubernetes overlays rendered with kustomize and checked as a cluster would: strict schema
validation for 1.30 and the newest Kubernetes kubernetes-validate knows, checkov with no failed
check (each skip justified inline), and the promises the manifests make read from what renders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tests" / "deploy" / ".venv" / "bin"
OVERLAYS = ("single-node", "production")

# Skipped where the tools are not installed, but never in CI, where `make test` installs them.
pytestmark = pytest.mark.skipif(not (TOOLS / "kubectl").exists() and not os.environ.get("CI"),
                                reason="the deployment tools are not installed: make test-tools")


def _render(overlay: str) -> str:
    out = subprocess.run([str(TOOLS / "kubectl"), "kustomize", str(ROOT / "deploy/kubernetes/overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rendered")
    paths = {}
    for overlay in OVERLAYS:
        paths[overlay] = folder / f"{overlay}.yaml"
        paths[overlay].write_text(_render(overlay))
    return paths


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_every_overlay_passes_strict_schema_validation(rendered: dict[str, Path], version: str) -> None:
    out = subprocess.run([str(TOOLS / "kubernetes-validate"), "-k", version, "--strict", "--quiet",
                          *map(str, rendered.values())], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_checkov_finds_no_failed_check(rendered: dict[str, Path]) -> None:
    folder = next(iter(rendered.values())).parent
    (folder / "Dockerfile").write_text((ROOT / "Dockerfile").read_text())
    out = subprocess.run([str(TOOLS / "checkov"), "-d", str(folder), "--framework", "kubernetes", "dockerfile",
                          "--skip-download", "-o", "json"],
                         capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(folder)})
    reports = yaml.safe_load(out.stdout)  # JSON is YAML
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    skipped = [c for r in reports for c in r["results"].get("skipped_checks", [])]
    assert len(skipped) >= 4 and all(c["check_result"].get("suppress_comment") for c in skipped), skipped
    assert sum(r["summary"]["passed"] for r in reports) > 300


def test_pod_security_restricted_holds_in_every_workload(rendered: dict[str, Path]) -> None:
    for path in rendered.values():
        docs = _docs(path)
        namespace = _one(docs, "Namespace", "gateway")["metadata"]["labels"]
        assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
        assert namespace["pod-security.kubernetes.io/enforce-version"] == "v1.30"
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            assert deployment["metadata"]["namespace"] == "gateway"
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            for container in pod.get("initContainers", []) + pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
                assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]


def test_workers_never_share_the_gateways_user_or_keys(rendered: dict[str, Path]) -> None:
    for overlay, path in rendered.items():
        docs = _docs(path)
        containers = {}
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                uid = c.get("securityContext", {}).get("runAsUser", pod["securityContext"]["runAsUser"])
                containers[c["name"]] = (uid, c, volumes)
        gateway_uid, gateway, _ = containers["gateway"]
        worker_uid, worker, volumes = containers["worker"]
        assert gateway_uid == 10001 and worker_uid == 10002, overlay
        mounted = {m["mountPath"]: m for m in worker["volumeMounts"]}
        assert not any(p.startswith("/etc/gateway/certs") for p in mounted), overlay  # no server key
        assert not any(p.startswith("/var/lib/gateway/audit") for p in mounted), overlay
        names = {m["name"] for m in worker["volumeMounts"]}
        assert "keys" not in names and "tls" not in names, overlay
        trust = volumes["signing-key"]  # the model-signing public key alone
        assert trust.get("secret", {}).get("items") == [{"key": "model-signing.pub", "path": "model-signing.pub"}] \
            or trust.get("hostPath", {}).get("path", "").endswith("/trust"), (overlay, trust)


def test_production_availability_placement_and_policies(rendered: dict[str, Path]) -> None:
    docs = _docs(rendered["production"])
    gateway = _one(docs, "Deployment", "gateway")
    assert gateway["spec"]["replicas"] >= 2 and gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = gateway["spec"]["template"]["spec"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    assert container["lifecycle"]["preStop"]
    assert {"name": "GATEWAY__AUDIT__REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    audit = next(v for v in pod["volumes"] if v["name"] == "audit")
    claim = _one(docs, "PersistentVolumeClaim", audit["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # never one RWO volume between replicas
    assert _one(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] == 1
    hpa = _one(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    workers = _one(docs, "Deployment", "gateway-workers")["spec"]["template"]["spec"]
    assert workers["runtimeClassName"] and workers["nodeSelector"] and workers["tolerations"]
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for isolated in ("gateway-workers", "gateway-redis"):  # reach nothing; only the gateway reaches them
        assert policies[isolated]["egress"] == []
        assert policies[isolated]["ingress"][0]["from"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]
    config = tomllib_loads(_one(docs, "ConfigMap", next(
        d["metadata"]["name"] for d in docs if d["metadata"]["name"].startswith("gateway-config")))["data"]["gateway.toml"])
    assert config["limits"]["storage"].startswith("rediss://") and config["limits"]["storage_password_file"]
    for image in (c["image"] for d in docs if d["kind"] == "Deployment"
                  for c in d["spec"]["template"]["spec"]["containers"]):
        assert "@sha256:" in image, image


def tomllib_loads(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


def test_the_rendered_configurations_load(rendered: dict[str, Path], tmp_path: Path) -> None:
    """Every configuration the overlays ship is one the gateway accepts (files it names aside)."""
    from gateway.config import ConfigError, load_config

    for overlay, path in rendered.items():
        for doc in (d for d in _docs(path) if d["kind"] == "ConfigMap"):
            for name, text in doc["data"].items():
                if not name.endswith(".toml"):
                    continue
                (tmp_path / name).write_text(text)
                try:
                    load_config(tmp_path / name)
                except ConfigError as exc:
                    unexpected = [p for p in exc.problems if not any(s in p.lower() for s in ("does not exist", "no such file"))]
                    assert not unexpected, (overlay, name, unexpected)


def test_compose_mounts_only_the_serving_folder_read_only_where_it_can() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    assert sorted(gateway["cap_add"]) == ["SETGID", "SETUID"]  # the worker helper's, dropped by the gateway itself
    assert gateway["ports"] == ["127.0.0.1:8443:8443"]
    sources = {v.split(":")[0]: v.split(":")[1:] for v in gateway["volumes"]}
    assert sources.pop("gateway-run") == ["/run/gateway"]  # the pid file's place: a volume its user owns
    assert all(s.startswith("./dev/serving/") for s in sources), sources
    writable = {s for s, rest in sources.items() if "ro" not in rest}
    assert writable == {"./dev/serving/issuer", "./dev/serving/audit"}
    assert not any(k in s for s in sources for k in ("ca.key", "model-signing.key", "credentials"))


def test_the_cert_manager_component_replaces_the_hand_made_certificates(tmp_path: Path) -> None:
    overlay = tmp_path / "with-cert-manager"
    overlay.mkdir()
    base = ROOT / "deploy/kubernetes"
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(base / 'overlays/production', overlay)}]\n"
        f"components: [{os.path.relpath(base / 'components/cert-manager', overlay)}]\n")
    out = subprocess.run([str(TOOLS / "kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    certificates = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    assert certificates["gateway-client"]["uris"] == ["spiffe://gateway.local/gateway"]
    assert certificates["gateway-worker"]["uris"][0].startswith("spiffe://gateway.local/worker/")
    assert all(d["metadata"]["namespace"] == "gateway" for d in docs if d["kind"] in ("Certificate", "Issuer"))
    volumes = {d["metadata"]["name"]: {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
               for d in docs if d["kind"] == "Deployment"}
    tls = volumes["gateway"]["tls"]
    assert "secret" not in tls
    paths = {i["path"] for s in tls["projected"]["sources"] for i in s["secret"]["items"]}
    assert paths == {"server.pem", "server.key", "ca.pem", "gateway-client.pem", "gateway-client.key"}
    assert volumes["gateway-workers"]["worker-tls"]["secret"]["secretName"] == "gateway-worker-cert"
